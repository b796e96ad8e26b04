"""Sharded safetensors checkpoints on disk: tensors streamed into shard files plus the index.

Used by `subset export` (a subset's tensors), the demo generator and the trainer; every tensor's
place is known before its data (`TensorSpec`), so a 28 GB checkpoint streams through one tensor
at a time. Callers write into a staged directory (`files.staged_dir`), renamed into place when
the whole checkpoint is written.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .checkpoint import INDEX_FILE
from .safetensors_format import SafetensorsWriter, TensorSpec


def shard_plan(specs: list[TensorSpec], shards: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into `shards` files of about equal bytes."""
    total = sum(s.nbytes for s in specs) or 1
    groups: list[list[TensorSpec]] = [[] for _ in range(shards)]
    offset = 0
    for s in specs:
        groups[min(shards - 1, offset * shards // total)].append(s)
        offset += s.nbytes
    return [g for g in groups if g]


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_sharded(out_dir: Path, groups: list[list[TensorSpec]], tensors: Iterator[tuple[str, torch.Tensor]],
                  *, desc: str) -> dict[str, Any]:
    """Write tensors (yielded in the order of `groups`) as shards + index into `out_dir`."""
    weight_map: dict[str, str] = {}
    total = sum(s.nbytes for g in groups for s in g)
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False) as bar:
        for i, group in enumerate(groups):
            name = shard_name(i, len(groups))
            with SafetensorsWriter(out_dir / name, group) as writer:
                for spec in group:
                    got_name, tensor = next(tensors)
                    writer.write(got_name, tensor)
                    del tensor  # may view a read buffer: don't pin it while the next one is read
                    weight_map[spec.name] = name
                    bar.update(spec.nbytes)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return index
