"""Expert slots: a running engine whose resident routed experts change between steps.

An engine started with `--additional-config '{"emo_expert_slots": N}'` on a manifest of the whole
base holds the non-expert weights, every layer's full router, the shared experts, and N routed
experts per layer in the fused-MoE tensors (`w13_weight`/`w2_weight`, N rows each), which start
empty. Routing stays exact and in base ids:

    router logits over all base experts (+ the request's mask row, `masks.py`)
    -> softmax and top-k in base ids -> base id -> slot (`slot_of`) -> the fused experts

`slot_of` and `slot_resident` are persistent per-layer buffers updated in place, never Python
values read in `forward()`, so a traced or graph-captured model sees every change. A pick of an
expert that is not resident gets weight 0 (it can only come from an unmasked request: a subset's
requests are admitted by the front end once all of its experts are resident).

Experts are loaded like vLLM's LoRA adapters are: the bytes are read and laid out off the step
loop, on a thread of the worker (`emo_slots_stage`), then copied into their slots by a short
control call between steps (`emo_slots_commit`). The copy writes the layout the platform's
fused-MoE kernel uses after loading: vLLM 0.32's CPU experts (`fused_moe/experts/cpu_moe.py`)
pad the intermediate size and prepack each expert independently (`cpu_prepack_moe_weight`), so
the new experts go through the kernel's own padding and prepacking and land in their rows.
The staging thread leaves the cores vLLM bound the worker's compute to (`_off_the_compute_cores`),
so a load runs on the spare core while the step loop goes on.
`check_kernel` names the internal that is missing if that changes (tests/plugin/test_slots_pin.py).
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch
from torch import nn
from vllm.logger import init_logger

from emo_serve.checkpoint import Checkpoint
from emo_serve.stream import plan_experts

from .routing_ops import remap_slots, slot_topk
from .runner_hook import SUPPORTED_VLLM

logger = init_logger("vllm.emo_vllm.slots")

# vLLM's `--additional-config` key: routed-expert slots per MoE layer (0 or absent: no slots).
SLOTS_CONFIG = "emo_expert_slots"
# Seconds each load waits before reading: slow storage on demand, for tests that need a load in
# progress (a stream beside it, an engine killed during it); unset in production.
STAGE_DELAY_ENV = "EMOVLLM_STAGE_DELAY_S"
# What the copy reads of a fused-MoE layer and its kernel, checked before the first load.
KERNEL_INTERNALS = ("MoERunner.routed_experts", "quant_method.moe_kernel.fused_experts",
                    "CPUUnquantizedExperts._pad_moe_intermediate", "CPUUnquantizedExperts.isa",
                    "vllm._custom_ops.cpu_prepack_moe_weight")


class SlotBlock(Protocol):
    """What this module reads of an `emo.EmoSparseMoeBlock` built with slots."""

    layer_index: int
    num_fused: int  # slots
    experts: nn.Module  # vLLM's MoERunner
    slot_of: torch.Tensor
    slot_resident: torch.Tensor
    slot_occupant: torch.Tensor


def fused_weights(routed: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused `w13_weight` (`[slots, 2I, H]`) and `w2_weight` (`[slots, H, I]`), runtime layout."""
    return cast(torch.Tensor, routed.w13_weight), cast(torch.Tensor, routed.w2_weight)


def routed_experts(block: SlotBlock) -> nn.Module:
    """The module holding a MoE block's fused routed-expert weights (`w13_weight`, `w2_weight`)."""
    routed = getattr(block.experts, "routed_experts", None)
    if routed is None or not hasattr(routed, "w13_weight") or not hasattr(routed, "w2_weight"):
        raise RuntimeError(f"emo-vllm's expert slots were written for vLLM {SUPPORTED_VLLM}'s fused MoE; "
                           f"{type(block.experts).__name__} lacks {KERNEL_INTERNALS[0]} (with w13_weight, w2_weight)")
    return routed


def fused_kernel(routed: nn.Module) -> Any:
    """The CPU fused-MoE experts object of a layer, or RuntimeError naming what is missing."""
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe

    impl = getattr(getattr(getattr(routed, "quant_method", None), "moe_kernel", None), "fused_experts", None)
    missing = []
    if impl is None:
        missing.append(KERNEL_INTERNALS[1])
    elif not isinstance(impl, cpu_moe.CPUUnquantizedExperts):
        raise RuntimeError(f"emo-vllm's expert slots copy experts in the layout of vLLM {SUPPORTED_VLLM}'s "
                           f"CPU unquantized fused MoE; this engine runs {type(impl).__name__}")
    else:
        if not hasattr(impl, "_pad_moe_intermediate"):
            missing.append(KERNEL_INTERNALS[2])
        if not isinstance(getattr(impl, "isa", None), str):
            missing.append(KERNEL_INTERNALS[3])
        if getattr(impl, "_use_zentorch", False):
            raise RuntimeError("emo-vllm's expert slots do not support zentorch's fused MoE layout")
    if not hasattr(cpu_moe, "cpu_prepack_moe_weight"):
        missing.append(KERNEL_INTERNALS[4])
    if missing:
        raise RuntimeError(f"emo-vllm's expert slots were written for vLLM {SUPPORTED_VLLM}'s fused MoE; "
                           f"this vLLM lacks {', '.join(missing)}")
    return impl


# Fused-MoE backends of vLLM's unquantized method (`oracle/unquantized.py`) that compute with the
# checkpoint layout (`convert_to_unquantized_kernel_format` only makes them contiguous).
CHECKPOINT_LAYOUT_BACKENDS = ("TRITON", "BATCHED_TRITON")


def check_layout(routed: nn.Module) -> None:
    """Fail at attach, naming the kernel, when slots cannot be filled in its layout."""
    if fused_weights(routed)[0].device.type == "cpu":
        fused_kernel(routed)
        return
    backend = getattr(getattr(routed, "quant_method", None), "unquantized_backend", None)
    if getattr(backend, "name", None) not in CHECKPOINT_LAYOUT_BACKENDS:
        raise RuntimeError(f"emo-vllm's expert slots fill GPU experts in the checkpoint layout of vLLM's Triton "
                           f"fused MoE ({', '.join(CHECKPOINT_LAYOUT_BACKENDS)}); this engine runs {backend}")


def runtime_layout(routed: nn.Module, w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Checkpoint-layout experts (`[k, 2I, H]`, `[k, H, I]`) in the layout the layer's kernel
    computes with: on CPU its own padding and prepacking, applied to these experts alone; on a
    GPU's Triton kernel the checkpoint layout itself, moved to the device (not yet run on a GPU)."""
    device = fused_weights(routed)[0].device
    if device.type != "cpu":
        check_layout(routed)
        return w13.to(device), w2.to(device)
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe

    impl = fused_kernel(routed)
    holder = nn.Module()
    holder.w13_weight = nn.Parameter(w13, requires_grad=False)
    holder.w2_weight = nn.Parameter(w2, requires_grad=False)
    impl._pad_moe_intermediate(holder)
    return (cpu_moe.cpu_prepack_moe_weight(holder.w13_weight, impl.isa),
            cpu_moe.cpu_prepack_moe_weight(holder.w2_weight, impl.isa))


# Laid-out layers waiting for their copy: a load holds at most this many beside the engine's own
# weights (measured at the 14B shape: staging all 16 layers of a 16-expert subset first took
# the process tree from 11.6 to 18.6 GiB).
STAGED_LAYERS = 2
Layer = tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # layer, slots, ids, w13, w2


@dataclass
class _Staged:
    """One load: read and laid out layer by layer on a thread, each layer copied in by the next
    `commit` call (a layer's new experts are usable only once the front end admits the subset,
    after the last layer: the others' requests meanwhile route as before)."""

    plan: dict[int, list[tuple[int, int]]]  # layer -> [(slot, base id)]
    ready: queue.Queue[Layer] = field(default_factory=lambda: queue.Queue(maxsize=STAGED_LAYERS))
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)  # every layer queued, or failed
    abandoned: threading.Event = field(default_factory=threading.Event)
    bytes_read: int = 0
    seconds: float = 0.0
    evicted: int = 0


def _blocks(model: nn.Module) -> dict[int, SlotBlock]:
    """The MoE blocks with slots, by layer index."""
    blocks = {cast(SlotBlock, m).layer_index: cast(SlotBlock, m) for m in model.modules()
              if getattr(m, "slot_of", None) is not None}
    if not blocks:
        raise RuntimeError(f"the model has no expert slots: start it with --additional-config "
                           f"'{{\"{SLOTS_CONFIG}\": N}}' on a manifest of the base")
    return blocks


def _stage(model: nn.Module, staged: _Staged) -> None:
    """Read the planned experts from the base one layer at a time, straight into checkpoint-layout
    tensors (the next layer is read while this one is laid out for the kernel), and queue each
    layer for `commit` (a worker thread)."""
    t0 = time.perf_counter()
    try:
        _off_the_compute_cores()
        time.sleep(float(os.environ.get(STAGE_DELAY_ENV) or 0))
        blocks = _blocks(model)
        base = Checkpoint(str(model.slot_source))
        layers = sorted(staged.plan.items())
        with ThreadPoolExecutor(1, thread_name_prefix="emo-slots-read") as reader:
            reading = reader.submit(_read_layer, base, blocks, *layers[0])
            for k, (layer, pairs) in enumerate(layers):
                w13, w2 = reading.result()
                if k + 1 < len(layers):
                    reading = reader.submit(_read_layer, base, blocks, *layers[k + 1])
                w13, w2 = runtime_layout(routed_experts(blocks[layer]), w13, w2)
                item = (layer, torch.tensor([s for s, _ in pairs]), torch.tensor([e for _, e in pairs]), w13, w2)
                while not staged.abandoned.is_set():
                    try:
                        staged.ready.put(item, timeout=1.0)
                        break
                    except queue.Full:
                        continue
                if staged.abandoned.is_set():
                    return
        staged.bytes_read = base.stats.bytes_read
    except Exception as exc:  # reported by the next commit call, which the front end makes anyway
        logger.exception("emo expert slots: staging a load failed")
        staged.error = f"{type(exc).__name__}: {exc}"
    staged.seconds = time.perf_counter() - t0
    staged.done.set()


def _off_the_compute_cores() -> None:
    """Let this thread, and the threads it starts (they inherit it), run on every CPU the process
    may use.

    vLLM's CPU worker binds its main thread to the cores it computes on (`VLLM_CPU_OMP_THREADS_BIND`,
    `auto`: all but one reserved core) and a thread inherits its creator's affinity, so a load's
    reading and prepacking shared that core with the worker's main thread, which computes steps
    or busy-polls its message queue. Measured at the 14B shape on 2 vCPUs (py-spy): prepacking took
    ~0.9 s a layer instead of ~0.14 s while the reserved core sat partly idle. Where nothing was
    bound (a GPU worker), this changes nothing."""
    if not hasattr(os, "sched_setaffinity"):
        return
    try:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))  # the kernel keeps the cpuset's CPUs of these
    except OSError as exc:
        logger.warning("emo expert slots: the staging thread stays on its cores %s (%s)", os.sched_getaffinity(0), exc)


def _read_layer(base: Checkpoint, blocks: dict[int, SlotBlock], layer: int, pairs: list[tuple[int, int]]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's planned experts in checkpoint layout (`[k, 2I, H]` gate|up, `[k, H, I]` down),
    in the engine's dtype, read straight into place."""
    inter, hidden = base.config.intermediate_size, base.config.hidden_size
    dtype = fused_weights(routed_experts(blocks[layer]))[0].dtype
    column = {e: j for j, (_, e) in enumerate(pairs)}
    w13 = torch.empty(len(pairs), 2 * inter, hidden, dtype=dtype)
    w2 = torch.empty(len(pairs), hidden, inter, dtype=dtype)
    targets = []
    for planned in plan_experts(base, {layer: list(column)}):
        _, _, _, _, _, expert, proj, _ = planned.name.split(".")  # model.layers.L.mlp.experts.E.P.weight
        j = column[int(expert)]
        out = {"gate_proj": w13[j, :inter], "up_proj": w13[j, inter:], "down_proj": w2[j]}[proj]
        targets.append((planned.sources[0], out))
    base.read_into(targets)
    return w13, w2


def _commit_layer(blocks: dict[int, SlotBlock], layer: int, slots: torch.Tensor, ids: torch.Tensor,
                  w13: torch.Tensor, w2: torch.Tensor) -> int:
    """Copy one layer's new experts into their slots and remap; returns the experts evicted."""
    block = blocks[layer]
    w13_slots, w2_slots = fused_weights(routed_experts(block))
    slots, ids = slots.to(block.slot_of.device), ids.to(block.slot_of.device)
    with torch.no_grad():
        w13_slots.data.index_copy_(0, slots, w13)
        w2_slots.data.index_copy_(0, slots, w2)
        return remap_slots(block.slot_of, block.slot_resident, block.slot_occupant, slots, ids)


class SlotControl:
    """The worker's slot control calls (mixed into `emo_vllm.worker.EmoWorkerExtension`)."""

    model_runner: Any
    _emo_staged: _Staged | None = None

    def emo_slots_info(self) -> dict[str, Any]:
        """Slots per layer and which base expert each holds (-1: empty)."""
        blocks = _blocks(self.model_runner.get_model())
        for block in blocks.values():
            check_layout(routed_experts(block))  # fail at attach, not at the first load
        return {"slots": next(iter(blocks.values())).num_fused,
                "layers": {str(i): b.slot_occupant.tolist() for i, b in sorted(blocks.items())}}

    def emo_slots_stage(self, plan: str) -> dict[str, Any]:
        """Begin a load: `plan` is JSON {layer: [[slot, base id], ...]}. Returns at once; the
        bytes are read on a thread while the engine keeps stepping."""
        if self._emo_staged is not None:  # a load the front end gave up on (it does not, short of a crash)
            self._emo_staged.abandoned.set()
        model = self.model_runner.get_model()
        blocks = _blocks(model)
        parsed = {int(layer): [(int(s), int(e)) for s, e in pairs] for layer, pairs in json.loads(plan).items()}
        for layer, pairs in parsed.items():
            check_pairs(pairs)
            block = blocks.get(layer)
            if block is None:
                raise ValueError(f"layer {layer} has no expert slots")
            bad = [(s, e) for s, e in pairs if not (0 <= s < block.num_fused and 0 <= e < block.slot_of.numel())]
            if bad:
                raise ValueError(f"layer {layer}: slot/expert pairs {bad} out of range "
                                 f"(slots 0..{block.num_fused - 1}, experts 0..{block.slot_of.numel() - 1})")
        staged = self._emo_staged = _Staged(parsed)
        threading.Thread(target=_stage, args=(model, staged), name="emo-slots-stage", daemon=True).start()
        return {"experts": sum(len(p) for p in parsed.values())}

    def emo_slots_commit(self) -> dict[str, Any]:
        """Copy the layers staged so far into their slots (between steps): `state` is `loading`
        until every layer is in, then `committed` (with the bytes, seconds and experts evicted),
        or `failed` (the layers already copied stay; the front end counts the load's slots empty)."""
        staged = self._emo_staged
        if staged is None:
            return {"state": "idle"}
        finished = staged.done.is_set()  # before draining: a layer queued after this is seen next call
        blocks = _blocks(self.model_runner.get_model())
        while True:
            try:
                staged.evicted += _commit_layer(blocks, *staged.ready.get_nowait())
            except queue.Empty:
                break
        if staged.error is not None:
            self._emo_staged = None
            return {"state": "failed", "error": staged.error}
        if not finished:
            return {"state": "loading"}
        self._emo_staged = None
        return {"state": "committed", "bytes": staged.bytes_read, "seconds": round(staged.seconds, 4),
                "evicted": staged.evicted}


def check_pairs(pairs: Sequence[tuple[int, int]]) -> None:
    """No slot or expert twice in one layer's plan."""
    slots, ids = [s for s, _ in pairs], [e for _, e in pairs]
    if len(set(slots)) != len(slots) or len(set(ids)) != len(ids):
        raise ValueError(f"a slot or an expert appears twice in {list(pairs)}")


__all__ = ["KERNEL_INTERNALS", "SLOTS_CONFIG", "SlotControl", "check_layout", "fused_kernel", "routed_experts",
           "runtime_layout", "slot_topk"]
