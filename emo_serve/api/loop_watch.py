"""How late the front end's event loop runs, and what held it when it stalled.

Everything the front end serves (completions, /health, every stream's next event) waits its turn
on one event loop, so a callback that runs long, or a process starved of CPU, delays them all.
Two parts tell those apart:

- a heartbeat task sleeps `interval` s at a time and records how late it woke
  (`emo_event_loop_lag_seconds`): the delay any request met at that moment;
- a watchdog thread notices a heartbeat that is `stall` s overdue, takes the loop thread's stack
  then, and when the loop is back logs one warning: how long it stalled, how much CPU the loop
  thread used meanwhile and how long it waited for one (Linux's schedstat): most of the stall
  in CPU is a callback computing, in waiting a process starved by others, in neither a blocking
  system call; and where it was.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback
from pathlib import Path

from prometheus_client import Histogram

log = logging.getLogger(__name__)

STACK_FRAMES = 12  # innermost frames kept in a stall's log line


class LoopWatch:
    """Heartbeat and stall watchdog of the running event loop; `start` and `stop` from the loop."""

    def __init__(self, lag: Histogram, *, interval: float = 0.05, stall: float = 0.1) -> None:
        self.lag, self.interval, self.stall = lag, interval, stall
        self._beat = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        loop_thread, native_id = threading.get_ident(), threading.get_native_id()
        self._beat = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._heartbeat(), name="emo-loop-heartbeat")
        self._thread = threading.Thread(target=self._watch, args=(loop_thread, native_id), name="emo-loop-watchdog",
                                        daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 1.0)

    async def _heartbeat(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(self.interval)
            self._beat = now = time.monotonic()
            self.lag.observe(max(0.0, now - before - self.interval))

    def _watch(self, loop_thread: int, native_id: int) -> None:
        try:
            clock: int | None = time.pthread_getcpuclockid(loop_thread)
        except (AttributeError, OSError):  # not on this platform: stalls are still timed
            clock = None
        schedstat = Path(f"/proc/self/task/{native_id}/schedstat")

        def times() -> tuple[float | None, float | None]:
            """The loop thread's CPU seconds and seconds spent runnable without a CPU."""
            cpu = time.clock_gettime(clock) if clock is not None else None
            try:
                wait: float | None = int(schedstat.read_text().split()[1]) / 1e9
            except (OSError, IndexError, ValueError):
                wait = None
            return cpu, wait

        at_beat = times()
        while not self._stop.wait(self.interval):
            beat = self._beat
            if time.monotonic() - beat < self.interval + self.stall:  # the beat's own sleep aside
                at_beat = times()  # within one tick of the last beat
                continue
            frame = sys._current_frames().get(loop_thread)
            # `limit`: only the innermost frames' source lines are read (and kept in linecache)
            where = traceback.format_stack(frame, limit=STACK_FRAMES) if frame is not None else []
            del frame
            while self._beat == beat and not self._stop.wait(self.interval / 5):
                pass
            if self._stop.is_set():
                return
            now = times()
            log.warning("event loop stalled", extra={
                "stalled_s": round(self._beat - beat - self.interval, 3),
                "loop_cpu_s": _delta(now[0], at_beat[0]), "loop_waited_for_cpu_s": _delta(now[1], at_beat[1]),
                "where": [" ".join(line.split()) for line in where]})
            at_beat = now


def _delta(now: float | None, then: float | None) -> float | None:
    return None if now is None or then is None else round(now - then, 3)
