"""The V2 adapter of `step_inputs`: a `ModelState` for vLLM's Model Runner V2.

Model Runner V2 (the default on NVIDIA GPUs from vLLM 0.32; the only runner from 0.34) asks the
model for its `ModelState` class (`get_model_state_cls`, see `vllm/v1/worker/gpu/model_states/
__init__.py`). Its hooks are the official, CUDA-graph-safe place for per-request model inputs:
`add_request` sees each request's `SamplingParams.extra_args` once, `prepare_inputs` runs before
every forward (dummy runs have `prepare_dummy_inputs`, which CUDA-graph capture uses). The
per-token fill itself is `StepInputs.fill`, shared with the V1 runner hook; batch row `i` of a
step is request slot `idx_mapping_np[i]`, as `lora_utils.LoraState.make_lora_inputs` reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.v1.core.sched.output import NewRequestData
from vllm.v1.worker.gpu.input_batch import InputBatch
from vllm.v1.worker.gpu.model_states.default import DefaultModelState
from vllm.v1.worker.gpu.states import RequestState

from .step_inputs import step_inputs_of


class EmoModelState(DefaultModelState):
    """vLLM's default model state plus the shared engine's per-token mask rows and tally keys."""

    def __init__(self, vllm_config: VllmConfig, model: nn.Module, encoder_cache: Any, device: torch.device) -> None:
        super().__init__(vllm_config, model, encoder_cache, device)
        self.step_inputs = step_inputs_of(model)
        self.request_args: list[Mapping[str, Any]] = [{} for _ in range(self.max_num_reqs)]

    def add_request(self, req_index: int, new_req_data: NewRequestData) -> None:
        super().add_request(req_index, new_req_data)
        params = new_req_data.sampling_params
        self.request_args[req_index] = (getattr(params, "extra_args", None) or {}) if params is not None else {}

    def prepare_inputs(self, input_batch: InputBatch, req_states: RequestState) -> dict[str, Any]:
        out = super().prepare_inputs(input_batch, req_states)
        if self.step_inputs is not None:
            n = input_batch.num_reqs
            self.step_inputs.fill([self.request_args[i] for i in input_batch.idx_mapping_np[:n]],
                                  input_batch.num_scheduled_tokens, padded=input_batch.num_tokens_after_padding,
                                  req_ids=input_batch.req_ids[:n])
        return out

    def prepare_dummy_inputs(self, num_reqs: int, num_tokens: int) -> dict[str, Any]:
        out = super().prepare_dummy_inputs(num_reqs, num_tokens)
        if self.step_inputs is not None:
            self.step_inputs.fill_dummy(num_tokens)
        return out


__all__ = ["EmoModelState"]
