"""The subset tensor stream: exactly a subset's tensors, read by byte range from the base shards.

Non-expert tensors pass unchanged; `mlp.experts.{orig}.*` becomes `mlp.experts.{new}.*` with
`new = kept.index(orig)`; the router keeps only the kept rows, in the same order. Only those
bytes are read (the router row by row run), adjacent ranges are fetched together, and a shard
that holds nothing the subset needs is never opened.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .checkpoint import Checkpoint
from .safetensors_format import TensorInfo
from .subset import SubsetSpec

_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(.+)$")
_ROUTER = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.weight$")


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor of the stream and the byte ranges of the base it is read from."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    sources: tuple[TensorInfo, ...]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.sources)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def plan_subset(ckpt: Checkpoint, spec: SubsetSpec) -> list[PlannedTensor]:
    """Every tensor of the subset, in base file order, from the headers alone."""
    spec.check_against(ckpt)
    new_index = [{orig: new for new, orig in enumerate(ids)} for ids in spec.experts]
    plan: list[PlannedTensor] = []
    for name in ckpt.expected_tensor_names():
        info = ckpt.tensors[name]
        if m := _EXPERT.match(name):
            layer, orig, rest = int(m[1]), int(m[2]), m[3]
            if orig in new_index[layer]:
                new = f"model.layers.{layer}.mlp.experts.{new_index[layer][orig]}.{rest}"
                plan.append(PlannedTensor(new, info.torch_dtype, info.shape, (info,)))
        elif m := _ROUTER.match(name):
            kept = spec.experts[int(m[1])]
            plan.append(PlannedTensor(name, info.torch_dtype, (len(kept), *info.shape[1:]),
                                      tuple(row_runs(info, kept))))
        else:
            plan.append(PlannedTensor(name, info.torch_dtype, info.shape, (info,)))
    return _in_file_order(plan)


def plan_slot_engine(ckpt: Checkpoint) -> list[PlannedTensor]:
    """What an engine with expert slots loads at start, base names kept: every tensor but the
    routed experts (non-expert weights, each layer's full router, the shared experts). Routed
    experts come later, into slots, as `plan_experts` reads them."""
    cfg = ckpt.config
    plan = []
    for name in ckpt.expected_tensor_names():
        m = _EXPERT.match(name)
        if m and int(m[2]) not in cfg.layer_routing(int(m[1])).shared_ids:
            continue
        info = ckpt.tensors[name]
        plan.append(PlannedTensor(name, info.torch_dtype, info.shape, (info,)))
    return _in_file_order(plan)


def plan_experts(ckpt: Checkpoint, experts: dict[int, list[int]]) -> list[PlannedTensor]:
    """The tensors of `experts` (layer -> base expert ids), base names kept, in file order."""
    plan = []
    for name in ckpt.expected_tensor_names():
        m = _EXPERT.match(name)
        if m and int(m[2]) in experts.get(int(m[1]), ()):
            info = ckpt.tensors[name]
            plan.append(PlannedTensor(name, info.torch_dtype, info.shape, (info,)))
    return _in_file_order(plan)


def _in_file_order(plan: list[PlannedTensor]) -> list[PlannedTensor]:
    """Sorted by where the bytes are, so adjacent ranges are read as one."""
    return sorted(plan, key=lambda t: (t.sources[0].shard, t.sources[0].start))


def subset_sizes(ckpt: Checkpoint, spec: SubsetSpec) -> dict[str, int]:
    """Parameters and bytes of the subset vs its base, from the tensor table alone."""
    plan = plan_subset(ckpt, spec)
    return {
        "subset_bytes": sum(t.nbytes for t in plan),
        "base_bytes": ckpt.total_tensor_bytes,
        "subset_params": sum(t.numel for t in plan),
        "base_params": sum(t.numel for t in ckpt.tensors.values()),
    }


def row_runs(info: TensorInfo, rows: list[int]) -> list[TensorInfo]:
    """Byte ranges of `rows` (sorted) of a 2-D tensor, one per run of consecutive rows."""
    row_bytes = info.nbytes // info.shape[0]
    runs: list[TensorInfo] = []
    start = prev = rows[0]
    for r in [*rows[1:], None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        begin = info.start + start * row_bytes
        runs.append(TensorInfo(f"{info.name}[{start}:{prev + 1}]", info.shard, info.dtype,
                               (prev + 1 - start, *info.shape[1:]), begin,
                               begin + (prev + 1 - start) * row_bytes))
        if r is not None:
            start = prev = r
    return runs


def iter_subset_tensors(ckpt: Checkpoint, spec: SubsetSpec, *, progress: str | None = None
                        ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` for the subset, in `plan_subset` order, reading only its bytes."""
    return iter_planned(ckpt, plan_subset(ckpt, spec), progress=progress)


def iter_planned(ckpt: Checkpoint, plan: list[PlannedTensor], *, progress: str | None = None
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` for each planned tensor, in plan order, reading only its bytes."""
    owner = {src.name: out for out in plan for src in out.sources}
    pieces: dict[str, list[torch.Tensor]] = {}
    # Tensors are views of the chunk just read; holding one while the next chunk is read would
    # keep two chunks in memory, so references are dropped as soon as they are handed on, and
    # router row runs (a few kB each, possibly from different chunks) are copied.
    for src_name, tensor in ckpt.read_infos([s for t in plan for s in t.sources], progress=progress):
        out = owner[src_name]
        if len(out.sources) == 1:
            yield out.name, tensor
            del tensor
            continue
        got = pieces.setdefault(out.name, [])
        got.append(tensor.clone())
        del tensor
        if len(got) == len(out.sources):
            del pieces[out.name]
            yield out.name, torch.cat(got, dim=0)
