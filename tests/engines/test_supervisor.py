"""The engine manager as a supervisor, on stand-in engine processes (fake_engine.py: real child
processes that answer `/health` on a Unix socket, started in about a second): starts, the
before-ready hook, LRU eviction, crashes and restarts, back-off of failing starts and crash
loops that never evicts a healthy engine, and the health probe that kills a hung engine."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from emo_serve.engines import manager as manager_module
from emo_serve.engines import process
from emo_serve.engines.manager import (
    EngineManager,
    EngineState,
    ModelUnavailable,
    Probe,
    retry_delay,
)
from emo_serve.engines.process import EngineOptions

FAKE = Path(__file__).with_name("fake_engine.py")


@pytest.fixture(autouse=True)
def fake_engines(monkeypatch: pytest.MonkeyPatch) -> None:
    def command(model_dir: str, model_id: str, socket_path: Path, opts: EngineOptions) -> list[str]:
        return [sys.executable, str(FAKE), "--model", model_dir, "--uds", str(socket_path)]

    monkeypatch.setattr(process, "engine_command", command)


def run(tmp_path: Path, scenario: Callable[[EngineManager], Awaitable[None]], **kw: object) -> None:
    async def main() -> None:
        opts = EngineOptions(logs_dir=tmp_path / "logs", socket_dir=tmp_path, start_timeout=60)
        mgr = EngineManager(opts, max_engines=int(kw.pop("max_engines", 2)), wait_timeout=60, **kw)  # type: ignore[arg-type]
        try:
            await scenario(mgr)
        finally:
            await mgr.shutdown(5)

    asyncio.run(main())


def test_retry_delays_grow_and_are_bounded() -> None:
    assert [retry_delay(n) for n in range(1, 7)] == [0, 10, 20, 40, 80, 160]
    assert retry_delay(50) == manager_module.MAX_RETRY_SECONDS


def test_start_runs_the_before_ready_hook_then_serves(tmp_path: Path) -> None:
    seen: list[EngineState] = []

    async def hook(engine, proc) -> None:  # type: ignore[no-untyped-def]
        seen.append(engine.state)

    async def scenario(mgr: EngineManager) -> None:
        mgr.set_on_started(hook)
        engine = mgr.register("a", "dir-a")
        lease = await mgr.acquire("a")
        assert engine.state is EngineState.READY and seen == [EngineState.STARTING]
        assert engine.inflight == 1 and lease.model == "a"
        lease.release()
        lease.release()  # idempotent
        assert engine.inflight == 0

    run(tmp_path, scenario)


def test_least_recently_used_idle_engine_is_evicted(tmp_path: Path) -> None:
    async def scenario(mgr: EngineManager) -> None:
        a, b = mgr.register("a", "dir-a"), mgr.register("b", "dir-b")
        (await mgr.acquire("a")).release()
        (await mgr.acquire("b")).release()
        assert a.state is EngineState.STOPPED and b.state is EngineState.READY
        assert not a.down  # stopped on purpose: not reported as down

    run(tmp_path, scenario, max_engines=1)


def test_a_crash_restarts_at_once_then_a_crash_loop_backs_off(tmp_path: Path) -> None:
    async def scenario(mgr: EngineManager) -> None:
        engine = mgr.register("a", "dir-a")
        (await mgr.acquire("a")).release()
        assert engine.proc is not None
        segments = engine.proc.shm_segments
        assert [p.name for p in segments] == [f"psm_fake_{engine.proc.pid}"] and all(p.exists() for p in segments)
        os.killpg(engine.proc.pid, signal.SIGKILL)
        while engine.state is EngineState.READY:
            await asyncio.sleep(0.05)
        assert engine.down and engine.crashes == 1 and "exited" in (engine.error or "")
        deadline = asyncio.get_running_loop().time() + 10
        while any(p.exists() for p in segments):  # a killed engine's /dev/shm files are removed
            assert asyncio.get_running_loop().time() < deadline, f"{segments} left behind"
            await asyncio.sleep(0.05)
        (await mgr.acquire("a")).release()  # the first crash of a healthy engine: no back-off
        assert engine.state is EngineState.READY and engine.starts == 2 and not engine.down
        assert engine.proc is not None
        os.killpg(engine.proc.pid, signal.SIGKILL)  # again, soon after its start: a crash loop
        while engine.state is EngineState.READY:
            await asyncio.sleep(0.05)
        with pytest.raises(ModelUnavailable, match="next start in"):
            await mgr.acquire("a")
        assert engine.starts == 2

    run(tmp_path, scenario)


def test_a_request_that_meets_a_dead_engine_first_still_cleans_it_up(tmp_path: Path) -> None:
    """Found by the soak: a request arriving between an engine's death and its watcher's turn
    started the successor itself, and the watcher, seeing another process in place, skipped both
    the crash count and the clean-up; each such kill left the engine's /dev/shm files (~400 MB
    for the demo) and its client session behind."""
    async def scenario(mgr: EngineManager) -> None:
        engine = mgr.register("a", "dir-a")
        (await mgr.acquire("a")).release()
        dead = engine.proc
        assert dead is not None
        segments = dead.shm_segments
        assert segments and all(p.exists() for p in segments)
        os.killpg(dead.pid, signal.SIGKILL)
        while dead.alive:  # one loop turn at a time: the watcher resumes only turns after this
            await asyncio.sleep(0)
        assert engine.state is EngineState.READY and engine.proc is dead, "the watcher ran first"
        lease = await mgr.acquire("a")  # the request that meets the dead engine starts the next one
        lease.release()
        assert engine.proc is not dead and engine.crashes == 1 and engine.starts == 2
        deadline = asyncio.get_running_loop().time() + 10
        while any(p.exists() for p in segments) or not dead.client.closed:
            assert asyncio.get_running_loop().time() < deadline, f"{segments} or the client left behind"
            await asyncio.sleep(0.05)

    run(tmp_path, scenario)


def test_a_failing_start_backs_off_and_never_evicts_a_healthy_engine(tmp_path: Path) -> None:
    async def scenario(mgr: EngineManager) -> None:
        good = mgr.register("good", "dir-good")
        (await mgr.acquire("good")).release()
        bad = mgr.register("bad", "dir-bad", env={"FAKE_ENGINE": "exit"})
        # One slot, held by the idle healthy engine: the first start of `bad` may evict it.
        with pytest.raises(ModelUnavailable):
            await mgr.acquire("bad")
        while bad.state is not EngineState.FAILED:
            await asyncio.sleep(0.05)
        assert bad.failures == 2 and bad.retry_at > 0
        assert "exited with code 3" in (bad.error or "") and "refusing to start" in (bad.detail or "")
        assert "Traceback" not in (bad.error or "") and "/" not in (bad.error or "")
        (await mgr.acquire("good")).release()  # the healthy one comes back
        bad.failed_at -= 60  # its back-off is over ...
        with pytest.raises(ModelUnavailable, match="retried when an engine slot is free"):
            await mgr.acquire("bad")  # ... but the slot is the healthy engine's: it is not evicted
        assert good.state is EngineState.READY

    run(tmp_path, scenario, max_engines=1)


def test_the_health_probe_kills_a_hung_engine(tmp_path: Path) -> None:
    async def scenario(mgr: EngineManager) -> None:
        engine = mgr.register("a", "dir-a")
        (await mgr.acquire("a")).release()
        assert engine.proc is not None
        os.kill(engine.proc.pid, signal.SIGSTOP)  # hung: alive, but answers nothing
        deadline = asyncio.get_running_loop().time() + 30
        while engine.state is EngineState.READY:
            assert asyncio.get_running_loop().time() < deadline, "the hung engine was never killed"
            await asyncio.sleep(0.1)
        assert engine.down and "health probe" in (engine.error or "")
        (await mgr.acquire("a")).release()
        assert engine.state is EngineState.READY and engine.starts == 2

    run(tmp_path, scenario, probe=Probe(interval=0.3, timeout=0.3, misses=3))
