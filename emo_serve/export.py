"""Write a subset as a standalone HF-format checkpoint (`subset export`) or as a weightless
manifest directory that the vLLM plugin loads from the base's byte ranges (`subset materialize`).

Both write into a temporary sibling directory renamed into place at the end: a failure leaves
nothing half-written.
"""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import TOKENIZER_FILES, Checkpoint
from .files import staged_dir
from .safetensors_format import TensorSpec
from .shards import write_sharded
from .stream import iter_subset_tensors, plan_subset
from .subset import MANIFEST_FILE, SubsetSpec

DEFAULT_SHARD_BYTES = 2 * 1024**3


def write_model_files(ckpt: Checkpoint, spec: SubsetSpec, out: Path) -> None:
    """The subset's config.json, its manifest and the base's tokenizer files."""
    config = spec.subset_config(ckpt.config)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / MANIFEST_FILE).write_text(spec.to_json() + "\n")
    for name in TOKENIZER_FILES:
        if ckpt.exists(name):
            (out / name).write_bytes(ckpt.read_file(name))


def export_subset(ckpt: Checkpoint, spec: SubsetSpec, out_dir: str | Path, *,
                  shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """A standalone checkpoint holding only the subset's tensors (renamed, router sliced)."""
    plan = plan_subset(ckpt, spec)
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for t in plan:
        if groups[-1] and size + t.nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(TensorSpec(t.name, t.dtype, t.shape))
        size += t.nbytes
    with staged_dir(out_dir) as tmp:
        write_model_files(ckpt, spec, tmp)
        stream = iter_subset_tensors(ckpt, spec, progress="reading")
        write_sharded(tmp, groups, stream, desc=f"export {spec.name}")
    return Path(out_dir)


def materialize_subset(ckpt: Checkpoint, spec: SubsetSpec, out_dir: str | Path) -> Path:
    """A manifest directory: config, tokenizer and `subset.json`, no weights. The plugin reads
    the subset's bytes from the base named in the manifest when the engine loads."""
    spec.check_against(ckpt)
    with staged_dir(out_dir) as tmp:
        write_model_files(ckpt, spec, tmp)
    return Path(out_dir)

