"""One hook on vLLM's V1 model runner, read by the expert masks and the routing capture.

Both need, once per engine step and before the forward, which request each scheduled token
belongs to: the mask row it routes with (`masks`) and the model and user its routing is counted
for (`usage`). vLLM computes that map in `_prepare_inputs` (`req_indices`, as `set_active_loras`
uses it for adapters); the hook wraps that method once and hands every registered filler the
step's requests and the token -> batch-row map.

It relies on internals of the V1 model runner (the one the CPU platform runs); `check_runner`
names the one that is missing if they change, and `SUPPORTED_VLLM` pins the version the hook was
written and tested against (tests/plugin/test_masks_runner_pin.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

SUPPORTED_VLLM = "0.32.0"
# What the hook reads of the runner, checked before it is installed.
RUNNER_INTERNALS = ("_prepare_inputs", "req_indices", "input_batch", "requests", "get_model")

# (step's request states by batch row, batch row of each scheduled token) -> None
StepFiller = Callable[[Sequence[Any], np.ndarray], None]


def check_runner(runner: Any) -> None:
    """Fail loudly, naming the internal, if vLLM's runner no longer has what the hook reads."""
    missing = [name for name in RUNNER_INTERNALS if not hasattr(runner, name)]
    if not hasattr(getattr(runner, "input_batch", None), "req_ids"):
        missing.append("input_batch.req_ids")
    if not hasattr(getattr(runner, "req_indices", None), "np"):
        missing.append("req_indices.np")
    if missing:
        raise RuntimeError(f"emo-vllm's runner hook was written for vLLM {SUPPORTED_VLLM}'s V1 "
                           f"model runner; {type(runner).__name__} lacks {', '.join(missing)}")


def on_each_step(runner: Any, name: str, fill: StepFiller) -> None:
    """Call `fill` every step, after `_prepare_inputs` has mapped tokens to requests (idempotent
    per `name`: attaching twice keeps one filler)."""
    fillers: dict[str, StepFiller] | None = getattr(runner, "_emo_step_fillers", None)
    if fillers is None:
        check_runner(runner)
        fillers = {}
        prepare = runner._prepare_inputs

        def _prepare_inputs(scheduler_output: Any, num_scheduled_tokens: np.ndarray) -> Any:
            out = prepare(scheduler_output, num_scheduled_tokens)
            num_tokens = int(scheduler_output.total_num_scheduled_tokens)
            batch = runner.input_batch
            states = [runner.requests[r] for r in batch.req_ids[: batch.num_reqs]]
            token_batch_rows = runner.req_indices.np[:num_tokens]
            for filler in fillers.values():
                filler(states, token_batch_rows)
            return out

        runner._prepare_inputs = _prepare_inputs
        runner._emo_step_fillers = fillers
    fillers[name] = fill


def extra_args(state: Any) -> dict[str, Any]:
    """A request's `SamplingParams.extra_args` (the OpenAI body's `vllm_xargs`), or {}."""
    params = getattr(state, "sampling_params", None)
    return getattr(params, "extra_args", None) or {}


__all__ = ["RUNNER_INTERNALS", "SUPPORTED_VLLM", "StepFiller", "check_runner", "extra_args", "on_each_step"]
