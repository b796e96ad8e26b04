"""Weights of an emo-serve subset manifest directory, streamed from its base checkpoint.

`emo-serve subset materialize` writes a directory vLLM can be pointed at like any model
(config.json, tokenizer, `subset.json`) but without weights. When `EmoForCausalLM` loads such a
directory, vLLM's default loader has nothing to read; the model takes its weights from here
instead: the base named in the manifest (a local path or any fsspec URL) is opened by its
headers only and exactly the subset's byte ranges are read, experts renamed to 0..k-1 and the
router rows sliced (`emo_serve.stream.iter_subset_tensors`).

Why in the model and not a registered load format: a load format needs `--load-format` on
every command line (the engine manager spawns plain `--model DIR`), and making it the default
would mean replacing vLLM's "auto" loader for every model in the process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from vllm.logger import init_logger

from emo_serve.checkpoint import Checkpoint
from emo_serve.errors import SubsetError
from emo_serve.stream import iter_planned, iter_subset_tensors, plan_slot_engine
from emo_serve.subset import MANIFEST_FILE, SubsetSpec

# Under "vllm." so the line shows in vLLM's own log stream and format.
logger = init_logger("vllm.emo_vllm.manifest")


def is_manifest_dir(model_dir: str | os.PathLike[str]) -> bool:
    """A local directory with `subset.json` and no safetensors of its own (an exported subset
    also carries `subset.json`, as provenance, but holds its weights)."""
    path = Path(model_dir)
    return (path / MANIFEST_FILE).is_file() and not any(path.glob("*.safetensors"))


def base_location(spec: SubsetSpec, model_dir: Path) -> str:
    """The manifest's base; a relative local path is taken relative to the manifest dir."""
    loc = spec.base.location
    if "://" not in loc and not os.path.isabs(loc) and (model_dir / loc).exists():
        return str(model_dir / loc)
    return loc


def check_config(spec: SubsetSpec, config_subset: dict | None, where: Path) -> None:
    """The directory's config.json must describe the same subset as its subset.json: the model
    was built from the config, the weights come from the manifest."""
    if config_subset is None:
        raise SubsetError(f"{where}/config.json has no 'emo_subset' block; rewrite the directory "
                          "with `emo-serve subset materialize`")
    if config_subset.get("experts") != spec.experts or config_subset.get("name") != spec.name:
        raise SubsetError(f"{where}: config.json and {MANIFEST_FILE} describe different subsets "
                          f"({config_subset.get('name')!r} vs {spec.name!r}); rewrite the directory "
                          "with `emo-serve subset materialize`")


def open_base(model_dir: str | os.PathLike[str], config_subset: dict | None) -> tuple[SubsetSpec, Checkpoint]:
    """The manifest in `model_dir` and its base, opened by its headers and checked to be the
    checkpoint the manifest was made from (SubsetError naming both fingerprints if not)."""
    where = Path(model_dir)
    spec = SubsetSpec.load(where / MANIFEST_FILE)
    check_config(spec, config_subset, where)
    base = Checkpoint(base_location(spec, where))
    try:
        spec.check_against(base)
    except SubsetError as exc:
        raise SubsetError(f"{where}: {exc}") from None
    return spec, base


def subset_weights(model_dir: str | os.PathLike[str], config_subset: dict | None
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, tensor)` of the subset in `model_dir`, read by byte range from its base.

    Raises SubsetError (naming both fingerprints) if the base is not the checkpoint the subset
    was made from.
    """
    spec, base = open_base(model_dir, config_subset)
    start = time.perf_counter()
    yield from iter_subset_tensors(base, spec, progress=f"subset {spec.name}")
    _log_read(spec.name, base, start)


def slot_engine_weights(base: Checkpoint, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    """What an engine with expert slots loads at start (`stream.plan_slot_engine`): no routed
    expert; those are read into slots later (`slots.py`)."""
    start = time.perf_counter()
    yield from iter_planned(base, plan_slot_engine(base), progress=f"{name} (no routed experts)")
    _log_read(name, base, start)


def _log_read(name: str, base: Checkpoint, start: float) -> None:
    logger.info("emo subset %s: read %d tensor bytes in %d requests (+%d header bytes) from %s "
                "in %.1f s", name, base.stats.bytes_read, base.stats.requests,
                base.header_bytes, base.location, time.perf_counter() - start)
