"""The V2 adapter (emo_vllm.model_state.EmoModelState) with vLLM's real Model Runner V2 classes
on CPU: `InputBatch` (made by its own `make_dummy`, then given the batch layout of a real step),
`NewRequestData` and `SamplingParams`, and the model state built from a real `VllmConfig` of the
shipped demo model. What it fills is what the model reads: each token's mask row and tally key,
in buffers whose addresses never change (CUDA-graph replay reads only captured addresses)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from emo_serve.default_model import shipped_default_model
from emo_vllm import usage
from emo_vllm.step_inputs import MODEL_ARG, ROW_ARG, USER_ARG, StepInputs

pytestmark = pytest.mark.vllm

MAX_TOKENS = 64


class _Model(nn.Module):
    """Stands in for EmoForCausalLM: the model state reads only `model.step_inputs` (and vLLM's
    default state asks the model nothing for a text-only model with 1-D positions)."""

    def __init__(self, step_inputs: StepInputs) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.step_inputs = step_inputs


@pytest.fixture(scope="module")
def v2():
    import emo_vllm
    from vllm.config import ModelConfig, VllmConfig
    from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers

    from emo_vllm.model_state import EmoModelState

    emo_vllm.register()
    config = VllmConfig(model_config=ModelConfig(model=str(shipped_default_model()), dtype="float32"))
    return config, EmoModelState, InputBatch, InputBuffers


@pytest.fixture
def state(v2):
    config, EmoModelState, _, _ = v2
    u = usage.RoutingUsage(max_tokens=MAX_TOKENS, max_reqs=config.scheduler_config.max_num_seqs)
    token_rows = torch.zeros(MAX_TOKENS, dtype=torch.long)
    u.add_block(0, type("Block", (), {"routing": config.model_config.hf_config.routing_config().layer_routing(0),
                                      "subset_masks": torch.zeros(4, 16)})())
    tally = u.build(token_rows)
    inputs = StepInputs(token_rows=token_rows, installed_rows={1: "a", 2: "b"}, token_keys=tally.token_keys,
                        key_index=u.key_index)
    return EmoModelState(config, _Model(inputs), None, torch.device("cpu")), inputs


def new_request(req_id: str, model: str, row: int | None, user: str = ""):
    from vllm import SamplingParams
    from vllm.v1.core.sched.output import NewRequestData

    extra = {MODEL_ARG: model, USER_ARG: user} | ({ROW_ARG: row} if row is not None else {})
    return NewRequestData(req_id=req_id, prompt_token_ids=[1, 2, 3], mm_features=[],
                          sampling_params=SamplingParams(max_tokens=4, extra_args=extra), pooling_params=None,
                          block_ids=([],), num_computed_tokens=0, lora_request=None)


def batch(v2, rows_of_batch: list[int], scheduled: list[int], padded: int | None = None):
    """A real step's layout: batch row i is request slot `rows_of_batch[i]` with `scheduled[i]` tokens."""
    config, _, InputBatch, InputBuffers = v2
    n_tokens = sum(scheduled)
    buffers = InputBuffers(config.scheduler_config.max_num_seqs, MAX_TOKENS, torch.device("cpu"))
    dummy = InputBatch.make_dummy(len(rows_of_batch), n_tokens, buffers, is_padding=False)
    idx = np.asarray(rows_of_batch, dtype=np.intp)
    return dataclasses.replace(dummy, idx_mapping_np=idx, idx_mapping=torch.from_numpy(idx.astype(np.int64)),
                               num_scheduled_tokens=np.asarray(scheduled, dtype=np.int32),
                               num_tokens_after_padding=padded or n_tokens)


def keys_of(inputs: StepInputs, names: dict[str, int]) -> dict[str, int]:
    return {name: inputs.key_index.of[(name, "")] for name in names}


def test_mixed_batch_rows_and_keys_per_token(v2, state) -> None:
    ms, inputs = state
    ptrs = (inputs.rows.device.data_ptr(), inputs.keys.device.data_ptr())
    ms.add_request(0, new_request("r0", "base", None))
    ms.add_request(3, new_request("r3", "a", 1))
    ms.add_request(5, new_request("r5", "b", 2))
    # Batch order is not slot order: a decode of r5, a 3-token prefill of r0, a decode of r3.
    assert ms.prepare_inputs(batch(v2, [5, 0, 3], [1, 3, 1]), None) == {}
    assert inputs.rows.device[:5].tolist() == [2, 0, 0, 0, 1]
    k = keys_of(inputs, {"base": 0, "a": 0, "b": 0})
    assert inputs.keys.device[:5].tolist() == [k["b"], k["base"], k["base"], k["base"], k["a"]]
    assert len(set(k.values())) == 3 and 0 not in k.values()
    # The next step is shorter and padded for a CUDA graph: the rest is row 0 and the trash key.
    ms.prepare_inputs(batch(v2, [3], [1], padded=4), None)
    assert inputs.rows.device[:6].tolist() == [1, 0, 0, 0, 0, 0]
    assert inputs.keys.device[:6].tolist() == [k["a"], 0, 0, 0, 0, 0]
    assert (inputs.rows.device.data_ptr(), inputs.keys.device.data_ptr()) == ptrs


def test_preempted_request_readded_elsewhere_keeps_its_row_and_key(v2, state) -> None:
    ms, inputs = state
    ms.add_request(1, new_request("r1", "a", 1, user="u"))
    ms.prepare_inputs(batch(v2, [1], [2]), None)
    key = inputs.keys.device[0].item()
    ms.remove_request("r1")  # preempted: V2 removes it and later adds it again, maybe in another slot
    ms.add_request(7, new_request("r1", "a", 1, user="u"))
    ms.add_request(1, new_request("r9", "b", 2))  # its old slot now holds another request
    ms.prepare_inputs(batch(v2, [1, 7], [1, 1]), None)
    assert inputs.rows.device[:2].tolist() == [2, 1]
    assert inputs.keys.device[1].item() == key


def test_dummy_runs_route_unmasked_and_count_nothing(v2, state) -> None:
    ms, inputs = state
    ms.add_request(0, new_request("r0", "a", 1))
    ms.prepare_inputs(batch(v2, [0], [5]), None)
    ms.prepare_dummy_inputs(num_reqs=2, num_tokens=8)  # e.g. CUDA-graph capture
    assert inputs.rows.device[:8].tolist() == [0] * 8 and inputs.keys.device[:8].tolist() == [0] * 8


def test_a_row_that_is_not_installed_routes_unmasked(v2, state) -> None:
    ms, inputs = state
    ms.add_request(0, new_request("r0", "x", 9))
    ms.prepare_inputs(batch(v2, [0], [2]), None)
    assert inputs.rows.device[:2].tolist() == [0, 0]


def test_the_model_names_this_state_and_v2_resolves_it(v2) -> None:
    config, EmoModelState, _, _ = v2
    from vllm.v1.worker.gpu.model_states import resolve_model_state_cls
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    from emo_vllm.emo import EmoForCausalLM

    assert issubclass(EmoModelState, DefaultModelState)
    assert resolve_model_state_cls(config, EmoForCausalLM.__new__(EmoForCausalLM)) is EmoModelState


def test_attach_names_the_runner_and_refuses_a_foreign_model_state(v2, state) -> None:
    """Which adapter a worker's control call finds. Model Runner V2 cannot run on this CPU (it needs
    Triton's CPU backend), so the runners are stand-ins holding the real model state: a fake, said so."""
    from types import SimpleNamespace

    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    from emo_vllm.step_inputs import attach_step_inputs

    ms, inputs = state
    model = _Model(inputs)
    ms.step_inputs = inputs
    assert attach_step_inputs(SimpleNamespace(get_model=lambda: model, model_state=ms)) == "V2"
    foreign = DefaultModelState(v2[0], model, None, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="runs DefaultModelState, not emo-vllm's EmoModelState"):
        attach_step_inputs(SimpleNamespace(get_model=lambda: model, model_state=foreign))
