"""The event-loop watchdog: a stalled loop is timed, its cause told apart (computing or blocked)
and its place named; the lag histogram fills from the heartbeat. Real loops, real threads."""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import CollectorRegistry, Histogram

from emo_serve.api.loop_watch import LoopWatch
from emo_serve.metrics import LAG_BUCKETS, Metrics


def _blocked_in_a_system_call() -> None:
    time.sleep(0.4)  # the loop thread waits in the kernel: it uses no CPU


def _computing() -> None:
    end = time.monotonic() + 0.4
    while time.monotonic() < end:
        pass


async def _watched(block) -> Histogram:
    lag = Histogram("lag", "", buckets=LAG_BUCKETS, registry=CollectorRegistry())
    watch = LoopWatch(lag, interval=0.02, stall=0.1)
    watch.start()
    await asyncio.sleep(0.1)
    block()
    await asyncio.sleep(0.1)  # the heartbeat runs again; the watchdog logs the stall
    await watch.stop()
    return lag


def _sample(histogram: Histogram, suffix: str) -> float:
    return next(s.value for s in histogram.collect()[0].samples if s.name.endswith(suffix))


def _stalls(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "emo_serve.api.loop_watch" and r.getMessage() == "event loop stalled"]


def test_a_loop_blocked_in_a_system_call_is_timed_and_named(caplog):
    caplog.set_level(logging.WARNING, logger="emo_serve.api.loop_watch")
    lag = asyncio.run(_watched(_blocked_in_a_system_call))
    (stall,) = _stalls(caplog)
    assert 0.3 <= stall.stalled_s <= 1.0
    assert stall.loop_cpu_s < 0.1  # waiting in the kernel, neither computing nor starved
    assert stall.loop_waited_for_cpu_s < 0.1
    assert any("_blocked_in_a_system_call" in line for line in stall.where)
    assert _sample(lag, "_sum") >= 0.3  # the late wake-up is in the histogram


def test_a_loop_busy_computing_is_told_apart(caplog):
    caplog.set_level(logging.WARNING, logger="emo_serve.api.loop_watch")
    asyncio.run(_watched(_computing))
    (stall,) = _stalls(caplog)
    assert stall.loop_cpu_s >= 0.2  # the loop thread ran the whole time
    assert any("_computing" in line for line in stall.where)


def test_a_loop_that_keeps_up_logs_nothing_and_records_its_lag(caplog):
    caplog.set_level(logging.WARNING, logger="emo_serve.api.loop_watch")
    lag = asyncio.run(_watched(lambda: None))
    assert _stalls(caplog) == []
    assert _sample(lag, "_count") >= 5


def test_the_front_ends_metrics_carry_the_lag():
    assert b"emo_event_loop_lag_seconds" in Metrics().render()
