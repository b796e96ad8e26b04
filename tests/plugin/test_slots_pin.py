"""Expert slots (emo_vllm.slots) copy experts into a running engine's fused-MoE tensors in the
layout vLLM's CPU kernel computes with. These checks fail loudly, naming the internal, when an
upgrade of vLLM changes it; tests/api/test_expert_slots.py then shows whether slot engines still
match dedicated ones."""

from __future__ import annotations

import inspect

import pytest
import torch

from emo_vllm import slots


def test_the_cpu_kernel_the_copy_writes_for() -> None:
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    assert "routed_experts" in inspect.getsource(MoERunner.__init__), "MoERunner no longer has routed_experts"
    cls = cpu_moe.CPUUnquantizedExperts
    assert cls.isa == "vec" and hasattr(cls, "_pad_moe_intermediate"), "CPUUnquantizedExperts changed"
    body = inspect.getsource(cls.process_weights_after_loading)
    # What runtime_layout repeats for the new experts, in this order, and nothing else.
    assert body.index("self._pad_moe_intermediate(layer)") < body.index("cpu_prepack_moe_weight(layer.w13_weight"), \
        "CPUUnquantizedExperts.process_weights_after_loading no longer pads, then prepacks"
    assert body.count("replace_parameter") == 2, "CPUUnquantizedExperts now transforms more than w13/w2"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_are_prepacked_independently(dtype: torch.dtype) -> None:
    """The copy prepacks only the new experts and writes their rows: that is right only while the
    packed tensor is the per-expert packing, stacked (checked on every ISA this CPU runs)."""
    from vllm._custom_ops import cpu_prepack_moe_weight
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe

    isas = ["vec"] + (["amx"] if cpu_moe.X86CPUUnquantizedExperts._supports_current_device() else [])
    w = torch.randn(5, 64, 96).to(dtype)
    for isa in isas:
        if isa == "amx" and dtype is not torch.bfloat16:
            continue  # the AMX kernel is bfloat16 only
        whole = cpu_prepack_moe_weight(w, isa)
        one_by_one = torch.cat([cpu_prepack_moe_weight(w[i : i + 1].contiguous(), isa) for i in range(5)])
        assert whole.shape[0] == 5 and torch.equal(whole, one_by_one), f"{isa}: experts are packed together"


def test_routing_to_slots_is_exact_in_base_ids() -> None:
    """Top-k in base ids, each pick moved to its slot, non-resident picks weighted 0."""
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    slot_of = torch.tensor([0, 2, 0, 1])
    resident = torch.tensor([0.0, 1.0, 0.0, 1.0])
    weights, ids = slots.slot_topk(logits, logits, 3, False, slot_of=slot_of, resident=resident)
    probs = logits.softmax(-1)[0]
    assert ids.tolist() == [[2, 1, 0]]
    assert torch.allclose(weights, torch.stack([probs[1], probs[3], probs[2] * 0]).unsqueeze(0))


def test_gpu_triton_kernels_compute_with_the_checkpoint_layout() -> None:
    """On a GPU the slots are filled in the checkpoint layout: right for vLLM's Triton fused MoE,
    whose weight conversion only makes the tensors contiguous. Read from the installed source,
    since no GPU runs here; other backends (FlashInfer, AITER, ...) reshuffle and are refused."""
    from vllm.model_executor.layers.fused_moe.oracle import unquantized

    names = {b.name for b in unquantized.UnquantizedMoeBackend}
    assert set(slots.CHECKPOINT_LAYOUT_BACKENDS) <= names, f"UnquantizedMoeBackend is now {sorted(names)}"
    body = inspect.getsource(unquantized.convert_to_unquantized_kernel_format)
    assert body.rstrip().endswith("return w13_weight.contiguous(), w2_weight.contiguous()"), \
        "convert_to_unquantized_kernel_format no longer leaves Triton's weights in the checkpoint layout"


def test_slots_on_an_unsupported_gpu_kernel_are_refused_by_name() -> None:
    """Weights on the `meta` device stand in for a GPU's (none here): the layout check runs the GPU branch."""
    from types import SimpleNamespace

    from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend

    def routed(backend: UnquantizedMoeBackend) -> torch.nn.Module:
        m = torch.nn.Module()
        m.w13_weight = torch.nn.Parameter(torch.empty(2, 8, 4, device="meta"), requires_grad=False)
        m.w2_weight = torch.nn.Parameter(torch.empty(2, 4, 4, device="meta"), requires_grad=False)
        m.quant_method = SimpleNamespace(unquantized_backend=backend)
        return m

    slots.check_layout(routed(UnquantizedMoeBackend.TRITON))
    w13, w2 = slots.runtime_layout(routed(UnquantizedMoeBackend.TRITON), torch.ones(1, 8, 4), torch.ones(1, 4, 4))
    assert w13.device.type == "meta" and w2.shape == (1, 4, 4)
    with pytest.raises(RuntimeError, match="FLASHINFER_CUTLASS"):
        slots.check_layout(routed(UnquantizedMoeBackend.FLASHINFER_CUTLASS))
