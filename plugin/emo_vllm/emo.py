"""Inference-only EMO (allenai/EMO) model for vLLM, with emo-serve subset manifests.

EMO is an OLMoE-style decoder with pre-norm layer names (`pre_attention_layernorm`,
`pre_feedforward_layernorm`), no QK-norm, and EMO routing (DESIGN.md, "Routing"):

* `s = num_shared > 0`: separate softmaxes over the routed and the shared router logits,
  top-(k - s) of the routed part, all shared experts, no renormalisation. The routed part is
  exactly vLLM's fused MoE with `renormalize=False` over the routed logits only; for `s = 1`
  the shared expert's weight is softmax over one logit, i.e. 1.0, so it is a plain MLP beside
  the fused MoE (wired like `qwen2_moe.py`'s shared expert). For `s > 1` a routing function
  gives every token all shared experts with their own softmax weights, in the same kernel.
* always-active ids (when configured): one softmax over all experts, those ids always
  selected with their softmax weights plus top-(k - len) of the others.
* `s = 0`: softmax -> top-k (-> renormalise if `norm_topk_prob`), vLLM's standard routing.

Expert counts, shared counts, capped top-k and always-active ids come per layer from
`emo_serve.config.EmoConfig.layer_routing` (subsets and pruned checkpoints vary them); a
layer with 0 experts is a dense MLP.
"""

# No `from __future__ import annotations`: @support_torch_compile reads forward()'s type
# hints at class creation to find the dynamic dimensions.
from collections.abc import Callable, Iterable
from functools import partial
from itertools import islice

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.fused_moe import (
    FusedMoEFactory,
    GateLinear,
    fused_moe_make_expert_params_mapping,
)
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    extract_layer_index,
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

from emo_serve.config import EmoConfig as RoutingConfig
from emo_serve.config import LayerRouting

from . import manifest, usage
from .config import EmoConfig
from .cpu import cpu_summary
from .masks import SLOTS_CONFIG, EmoExpertMasks
from .routing_ops import mask_logits, slot_topk
from .slots import SLOTS_CONFIG as EXPERT_SLOTS_CONFIG
from .step_inputs import StepInputs

logger = init_logger("vllm.emo_vllm.emo")

RoutingFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


# -- routing functions (vLLM's custom_routing_function contract) -------------------------------
def split_softmax_topk(hidden_states: torch.Tensor, gating_output: torch.Tensor, topk: int,
                       renormalize: bool, *, num_shared: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EMO with `s` shared experts (the last `s` ids): top-(k-s) of softmax(routed logits), plus
    every shared expert weighted by softmax(shared logits); no renormalisation."""
    logits = gating_output.float()
    num_routed = logits.shape[-1] - num_shared
    routed_w, routed_ids = logits[:, :num_routed].softmax(-1).topk(topk - num_shared, dim=-1)
    shared_w = logits[:, num_routed:].softmax(-1)
    shared_ids = torch.arange(num_routed, num_routed + num_shared, device=logits.device)
    shared_ids = shared_ids.expand(logits.shape[0], num_shared)
    return torch.cat([routed_w, shared_w], -1), torch.cat([routed_ids, shared_ids], -1)


def always_active_topk(hidden_states: torch.Tensor, gating_output: torch.Tensor, topk: int,
                       renormalize: bool, *, always: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """EMO's always-active path: one softmax over all experts; `always` (ids, on the logits'
    device, made once: no host copy inside a CUDA graph) are selected with their softmax weights,
    plus top-(k - len(always)) of the others; no renormalisation."""
    probs = gating_output.float().softmax(-1)
    n = always.shape[0]
    other_w, other_ids = probs.index_fill(-1, always, float("-inf")).topk(topk - n, dim=-1)
    always_w = probs.index_select(-1, always)
    return (torch.cat([other_w, always_w], -1),
            torch.cat([other_ids, always.expand(probs.shape[0], n)], -1))


# -- modules -----------------------------------------------------------------------------------
class EmoMLP(nn.Module):
    """SwiGLU MLP: the dense layers' MLP and the single shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, bias: bool = False,
                 quant_config: QuantizationConfig | None = None, reduce_results: bool = True,
                 prefix: str = "") -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size] * 2, bias=bias, quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(
            intermediate_size, hidden_size, bias=bias, quant_config=quant_config,
            reduce_results=reduce_results, prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(self.act_fn(gate_up))
        return out


class EmoSparseMoeBlock(nn.Module):
    """Router over all of the layer's experts + vLLM's fused MoE, routed as DESIGN.md says.

    Checkpoint expert ids are kept as fused-MoE ids, except that with the single-shared-expert
    fast path the last id is the `shared_expert` MLP (see `shared_expert_name`).
    """

    def __init__(self, config: EmoConfig, routing: LayerRouting, *,
                 quant_config: QuantizationConfig | None = None,
                 expert_masks: EmoExpertMasks | None = None,
                 routing_usage: usage.RoutingUsage | None = None, expert_slots: int = 0,
                 prefix: str = "") -> None:
        super().__init__()
        self.routing = routing
        self.layer_index = extract_layer_index(prefix)
        # Live routing capture (see usage.py): the step's tally, tensor work in the forward. A
        # plain object, not a module: fixed for the model's life, so a trace keeps or drops it.
        self.routing_usage = routing_usage
        # Shared-engine mode (see masks.py): a row of 0 / -inf per subset, added to the router
        # logits of each token by the row its request names. The row index is the model's
        # buffer, held here as a plain attribute so it is not registered once per layer.
        self.token_rows = expert_masks.token_rows if expert_masks is not None else None
        self.subset_masks: torch.Tensor | None
        self.register_buffer("subset_masks", None if expert_masks is None else
                             torch.zeros(expert_masks.slots, routing.num_experts), persistent=False)
        tp_size = get_tensor_model_parallel_world_size()
        self.gate = GateLinear(config.hidden_size, routing.num_experts, prefix=f"{prefix}.gate")

        # The released model's case: fused MoE over the routed logits + a plain MLP (weight 1.0).
        self.fast_shared = (not routing.always_active and routing.num_shared == 1
                            and routing.num_routed > 0 and routing.routed_top_k > 0)
        self.shared_expert: EmoMLP | None = None
        routing_fn: RoutingFn | None = None
        num_experts, top_k = routing.num_experts, routing.top_k
        if self.fast_shared:
            self.shared_expert = EmoMLP(config.hidden_size, config.intermediate_size,
                                        quant_config=quant_config, reduce_results=False,
                                        prefix=f"{prefix}.shared_expert")
            num_experts, top_k = routing.num_routed, routing.routed_top_k
        elif routing.always_active:
            routing_fn = self._route_always
        elif routing.num_shared:
            routing_fn = partial(split_softmax_topk, num_shared=routing.num_shared)
        # Expert slots (see slots.py): the fused MoE holds `expert_slots` routed experts, filled
        # while serving; routing picks base ids and `slot_of` moves each pick to its slot.
        self.slot_of: torch.Tensor | None  # base id -> slot
        self.slot_resident: torch.Tensor | None  # base id -> 1.0 if resident, else 0.0
        self.slot_occupant: torch.Tensor | None  # slot -> base id, -1 if empty
        if expert_slots:
            if not self.fast_shared or routing.norm_topk_prob:
                raise ValueError(f"{prefix}: expert slots need EMO's routing with one shared expert "
                                 "and no renormalisation (the released model's); this layer has "
                                 f"{routing.num_shared} shared experts")
            num_experts = min(expert_slots, routing.num_routed)
            routing_fn = self._route_to_slots
        self.always_ids: torch.Tensor
        self.register_buffer("always_ids", torch.tensor(routing.always_active, dtype=torch.long), persistent=False)
        for buffer, value in (("slot_of", torch.zeros(routing.num_routed, dtype=torch.long)),
                              ("slot_resident", torch.zeros(routing.num_routed)),
                              ("slot_occupant", torch.full((num_experts,), -1, dtype=torch.long))):
            self.register_buffer(buffer, value if expert_slots else None, persistent=False)
        self.num_fused = num_experts
        if tp_size > num_experts:
            raise ValueError(f"{prefix}: tensor parallel size {tp_size} exceeds the "
                             f"{num_experts} experts of this layer")
        self.experts = FusedMoEFactory(
            shared_experts=self.shared_expert,
            num_experts=num_experts,
            top_k=top_k,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            # Only the plain path renormalises: the config rejects norm_topk_prob with shared
            # experts, and the always-active path ignores it (as the reference does).
            renormalize=routing.norm_topk_prob and routing_fn is None,
            custom_routing_function=routing_fn,
            quant_config=quant_config,
            prefix=f"{prefix}.experts",
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        orig_shape = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
        router_logits, _ = self.gate(hidden_states)
        if self.routing_usage is not None:
            self.routing_usage.record(self.layer_index, router_logits)
        if self.subset_masks is not None and self.token_rows is not None:
            router_logits = mask_logits(router_logits, self.subset_masks, self.token_rows)
        # Fast path: the shared logit is dropped; softmax over one logit is 1.0.
        out = self.experts(hidden_states=hidden_states,
                           router_logits=router_logits[:, : self.routing.num_routed if self.fast_shared
                                                       else self.num_fused])
        return out.view(orig_shape)

    def _route_always(self, hidden_states: torch.Tensor, gating_output: torch.Tensor, topk: int,
                      renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return always_active_topk(hidden_states, gating_output, topk, renormalize, always=self.always_ids)

    def _route_to_slots(self, hidden_states: torch.Tensor, gating_output: torch.Tensor, topk: int,
                        renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # A method, not a partial over the buffers: it reads them from the module at each call.
        assert self.slot_of is not None and self.slot_resident is not None
        return slot_topk(hidden_states, gating_output, topk, renormalize,
                         slot_of=self.slot_of, resident=self.slot_resident)

    def shared_expert_name(self, expert_id: int) -> str | None:
        """Where checkpoint expert `expert_id` lives if it is the fast path's shared MLP."""
        if self.fast_shared and expert_id == self.routing.num_routed:
            return "shared_expert"
        return None


class EmoAttention(nn.Module):
    def __init__(self, config: EmoConfig, *, cache_config: CacheConfig | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        self.total_num_heads = config.num_attention_heads
        self.total_num_kv_heads = config.num_key_value_heads
        assert self.total_num_heads % tp_size == 0
        if self.total_num_kv_heads >= tp_size:
            # More KV heads than ranks: partition them.
            assert self.total_num_kv_heads % tp_size == 0
        else:
            # Fewer KV heads than ranks: replicate them.
            assert tp_size % self.total_num_kv_heads == 0
        self.num_heads = self.total_num_heads // tp_size
        self.num_kv_heads = max(1, self.total_num_kv_heads // tp_size)
        self.head_dim: int = config.head_dim or config.hidden_size // self.total_num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim

        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim, self.total_num_heads, self.total_num_kv_heads,
            bias=config.attention_bias, quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(
            self.total_num_heads * self.head_dim, config.hidden_size, bias=config.attention_bias,
            quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(
            self.head_dim, max_position=config.max_position_embeddings,
            rope_parameters=config.rope_parameters, is_neox_style=True)
        self.attn = Attention(
            self.num_heads, self.head_dim, self.head_dim**-0.5, num_kv_heads=self.num_kv_heads,
            cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        output, _ = self.o_proj(self.attn(q, k, v))
        return output


class EmoDecoderLayer(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, routing: LayerRouting,
                 expert_masks: EmoExpertMasks | None = None,
                 routing_usage: usage.RoutingUsage | None = None, expert_slots: int = 0,
                 prefix: str = "") -> None:
        super().__init__()
        config: EmoConfig = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        self.self_attn = EmoAttention(config, cache_config=vllm_config.cache_config,
                                      quant_config=quant_config, prefix=f"{prefix}.self_attn")
        self.mlp: EmoSparseMoeBlock | EmoMLP
        if routing.is_dense:
            self.mlp = EmoMLP(config.hidden_size,
                              getattr(config, "dense_intermediate_size", None) or config.intermediate_size,
                              bias=bool(getattr(config, "dense_mlp_bias", False)),
                              quant_config=quant_config, prefix=f"{prefix}.mlp")
        else:
            self.mlp = EmoSparseMoeBlock(config, routing, quant_config=quant_config,
                                         expert_masks=expert_masks, routing_usage=routing_usage,
                                         expert_slots=expert_slots, prefix=f"{prefix}.mlp")
            if routing_usage is not None:
                routing_usage.add_block(self.mlp.layer_index, self.mlp)
        self.pre_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.pre_attention_layernorm(hidden_states)
        else:
            hidden_states, residual = self.pre_attention_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        hidden_states, residual = self.pre_feedforward_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


@support_torch_compile
class EmoModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: EmoConfig = vllm_config.model_config.hf_config
        self.config = config
        self.routing: RoutingConfig = config.routing_config()
        extra = vllm_config.additional_config or {}
        max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        slots = int(extra.get(SLOTS_CONFIG, 0))
        self.expert_masks = EmoExpertMasks(slots, max_tokens) if slots > 0 else None
        max_reqs = vllm_config.scheduler_config.max_num_seqs
        routing_usage = usage.enable(max_tokens, max_reqs) if extra.get(usage.USAGE_CONFIG) else None
        self.expert_slots = int(extra.get(EXPERT_SLOTS_CONFIG, 0))
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.embed_tokens")
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: EmoDecoderLayer(
                vllm_config=vllm_config, prefix=prefix, expert_masks=self.expert_masks,
                routing_usage=routing_usage, expert_slots=self.expert_slots,
                routing=self.routing.layer_routing(extract_layer_index(prefix))),
            prefix=f"{prefix}.layers",
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # Each step's per-token mask rows and tally keys, filled before the forward by the runner's
        # adapter (step_inputs.py); None on a plain engine.
        token_rows = self.expert_masks.token_rows if self.expert_masks is not None else None
        tally = routing_usage.build(token_rows) if routing_usage is not None else None
        self.step_inputs = None if token_rows is None and tally is None else StepInputs(
            token_rows=token_rows, installed_rows=self.expert_masks.installed if self.expert_masks else None,
            token_keys=tally.token_keys if tally is not None else None,
            key_index=routing_usage.key_index if routing_usage is not None else None)
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            if inputs_embeds is None:
                assert input_ids is not None, "the first pipeline stage needs token ids or embeddings"
                inputs_embeds = self.embed_input_ids(input_ids)
            hidden_states = inputs_embeds
            residual = None
        else:
            assert intermediate_tensors is not None
            hidden_states = intermediate_tensors["hidden_states"]
            residual = intermediate_tensors["residual"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, residual = layer(positions, hidden_states, residual)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states

    def _checkpoint_to_module_name(self, name: str) -> str:
        """`layers.{i}.mlp.experts.{R}.*` -> `layers.{i}.mlp.shared_expert.*` for the fast path."""
        parts = name.split(".")
        if len(parts) > 5 and parts[0] == "layers" and parts[2:4] == ["mlp", "experts"]:
            layer = self.layers[int(parts[1])]
            mlp = getattr(layer, "mlp", None)  # PPMissingLayer has none
            if isinstance(mlp, EmoSparseMoeBlock) and (shared := mlp.shared_expert_name(int(parts[4]))):
                return ".".join([*parts[:3], shared, *parts[5:]])
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        stacked_params_mapping = [
            # (param_name, shard_name, shard_id)
            (".qkv_proj", ".q_proj", "q"),
            (".qkv_proj", ".k_proj", "k"),
            (".qkv_proj", ".v_proj", "v"),
            (".gate_up_proj", ".gate_proj", 0),
            (".gate_up_proj", ".up_proj", 1),
        ]
        # (param_name, weight_name, expert_id, shard_id) for experts 0..max-1 of any layer.
        expert_params_mapping = fused_moe_make_expert_params_mapping(
            self, ckpt_gate_proj_name="gate_proj", ckpt_down_proj_name="down_proj",
            ckpt_up_proj_name="up_proj", num_experts=max(self.routing.experts_per_layer))
        params_dict = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, loaded_weight in weights:
            name = self._checkpoint_to_module_name(name)
            if is_pp_missing_parameter(name, self):
                continue  # the layer lives on another pipeline stage
            for param_name, shard_name, shard_id in stacked_params_mapping:
                # Routed experts' gate/up go to the fused w13 below, not to a gate_up_proj.
                if shard_name not in name or ".experts." in name:
                    continue
                name = name.replace(shard_name, param_name)
                param = params_dict[name]
                # vLLM's parallel layers attach `weight_loader` to their parameters at run time.
                param.weight_loader(param, loaded_weight, shard_id)  # type: ignore[attr-defined]
                break
            else:
                for param_name, weight_name, expert_id, shard_id in expert_params_mapping:
                    if weight_name not in name:
                        continue
                    name = name.replace(weight_name, param_name)
                    param = params_dict[name]
                    param.weight_loader(param, loaded_weight, name,  # type: ignore[attr-defined]  # (as above)
                                        shard_id=shard_id, expert_id=expert_id)
                    break
                else:
                    param = params_dict[name]
                    weight_loader = getattr(param, "weight_loader", default_weight_loader)
                    weight_loader(param, loaded_weight)
            loaded.add(name)
        return loaded


class EmoForCausalLM(nn.Module, SupportsPP):
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    fall_back_to_pt_during_load = False  # safetensors only: pickle files can run code

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: EmoConfig = vllm_config.model_config.hf_config
        self.config = config
        logger.info(cpu_summary())
        self.model_dir = vllm_config.model_config.model
        self.model = EmoModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                      quant_config=vllm_config.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    @staticmethod
    def get_model_state_cls() -> type:
        """Model Runner V2's per-request extension point (masks and capture; see model_state.py).
        The V1 runner never asks; there `runner_hook` fills the same buffers."""
        from .model_state import EmoModelState

        return EmoModelState

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if self.model.expert_slots:
            return self._load_slot_engine()
        if manifest.is_manifest_dir(self.model_dir):
            # A manifest dir has no weight files, so vLLM's iterator (never started) would find
            # nothing; the subset's tensors come from the base's byte ranges instead.
            weights = manifest.subset_weights(self.model_dir, getattr(self.config, "emo_subset", None))
        return AutoWeightsLoader(self).load_weights(weights)

    def _load_slot_engine(self) -> set[str]:
        """Everything but the routed experts, from the base the manifest names; the slots start
        empty (zeros, so that a weight-0 pick of an empty slot adds exactly 0)."""
        if not manifest.is_manifest_dir(self.model_dir):
            raise ValueError(f"expert slots need a manifest of the base (emo-serve writes one), not {self.model_dir}")
        spec, base = manifest.open_base(self.model_dir, getattr(self.config, "emo_subset", None))
        if spec.experts != [base.config.layer_routing(i).kept_ids(base.config.layer_routing(i).routed_ids)
                            for i in range(base.config.num_hidden_layers)]:
            raise ValueError(f"{self.model_dir}: expert slots need a manifest keeping every expert of the base")
        self.slot_source = base.location
        loaded = AutoWeightsLoader(self).load_weights(manifest.slot_engine_weights(base, spec.name))
        for name, param in self.named_parameters():
            if ".mlp.experts.w" in name and name not in loaded:  # the fused routed experts
                param.data.zero_()
                loaded.add(name)
        return loaded
