"""Where a load's staging thread runs (emo_vllm.slots): off the core vLLM's CPU worker binds its
main thread to. Whether loads are then fast enough is measured in bench/bench_slots.py, not here."""

from __future__ import annotations

import os
import threading

import pytest

from emo_vllm import slots


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two usable CPUs to bind a thread to one of them")
def test_a_load_leaves_the_core_its_creator_was_bound_to() -> None:
    """vLLM binds the worker's main thread to its compute cores; the staging thread it starts
    inherits that, and must widen it to every CPU the process may use."""
    allowed = os.sched_getaffinity(0)
    seen: dict[str, set[int]] = {}

    def worker_main() -> None:  # a thread, so the test's own affinity is left alone
        os.sched_setaffinity(0, {min(allowed)})  # what VLLM_CPU_OMP_THREADS_BIND=auto does

        def staging() -> None:
            seen["inherited"] = os.sched_getaffinity(0)
            slots._off_the_compute_cores()
            seen["staging"] = os.sched_getaffinity(0)

        t = threading.Thread(target=staging)
        t.start()
        t.join()
        seen["main"] = os.sched_getaffinity(0)

    t = threading.Thread(target=worker_main)
    t.start()
    t.join()
    assert seen["inherited"] == {min(allowed)}
    assert seen["staging"] == allowed
    assert seen["main"] == {min(allowed)}, "the worker's main thread must keep its binding"
