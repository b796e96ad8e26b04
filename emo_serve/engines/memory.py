"""Will it fit: the base's bytes against the memory an engine may use, before anything is loaded.

Measured on a 24 GB machine: serving the 27 GB `emo-1b14b` base whole made the kernel's OOM
killer end the engine a minute into its load, and nothing had warned. So the server compares
first, from the checkpoint's headers alone: the base served whole must fit in the memory
available (RAM on CPU, as the kernel reports it to this process, cgroup limit included), and
without the base the expert slots are sized to fit.

GPU memory is not read here (that would start a CUDA context in the front end); on GPUs the
checks use host memory only, and `--expert-slots` should be given.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from ..checkpoint import Checkpoint
from ..errors import SettingsError

GIB = 1024**3
# The server's own memory beside weights and KV cache: the front end, vLLM's API server, engine
# core and worker processes (Python, torch), activations. Measured at the 14B shape with expert
# slots, bf16: 11.6 GiB for the process tree = 1.5 (non-expert) + 6.0 (32 slots) + 1 (KV) + 3.1.
RUNTIME_BYTES = 3 * GIB
# Expert slots take at most this share of what is left after the non-expert weights, the runtime
# and the KV cache: the rest stays free for profiling jobs, page cache and the front end.
SLOTS_MEMORY_SHARE = 0.5
_EXPERT = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.\d+\.")


def available_memory() -> int | None:
    """Bytes this process may still allocate: MemAvailable, capped by a cgroup v2 limit."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    m = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.M)
    avail = int(m[1]) * 1024 if m else None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max" and avail is not None:
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail


def engine_bytes_per_element(base: Checkpoint, dtype: str) -> int:
    """Bytes per weight in the engine: the `--dtype` given, else the checkpoint's."""
    name = {"float": "float32", "half": "float16", "auto": base.config.torch_dtype}.get(dtype, dtype)
    return torch.empty((), dtype=getattr(torch, name, torch.bfloat16)).element_size()


def weight_bytes(base: Checkpoint, dtype: str) -> tuple[int, int, int]:
    """(non-routed-expert bytes, all routed experts' bytes, bytes of one routed expert in every
    MoE layer), in the engine's dtype."""
    cfg = base.config
    per = engine_bytes_per_element(base, dtype)
    routed = {(i, e) for i in range(cfg.num_hidden_layers) for e in cfg.layer_routing(i).routed_ids}
    other = experts = 0
    for name, info in base.tensors.items():
        parts = name.split(".")
        if _EXPERT.match(name) and (int(parts[2]), int(parts[5])) in routed:
            experts += math.prod(info.shape) * per
        else:
            other += math.prod(info.shape) * per
    one_each = 3 * cfg.hidden_size * cfg.intermediate_size * per * len(cfg.moe_layers())
    return other, experts, one_each


def default_expert_slots(base: Checkpoint, *, dtype: str, kv_cache_gb: float) -> int:
    """Slots per layer that fit: `SLOTS_MEMORY_SHARE` of the memory left after the non-expert
    weights, runtime and KV cache, at most every routed expert, at least 1."""
    most = max(base.config.routed_counts())
    avail = available_memory()
    if avail is None:
        return most
    other, _, one_each = weight_bytes(base, dtype)
    left = avail - other - RUNTIME_BYTES - int(kv_cache_gb * GIB)
    if left < one_each:
        raise SettingsError(f"the base's non-expert weights ({other / GIB:.1f} GiB), an engine's runtime "
                            f"({RUNTIME_BYTES / GIB:.0f} GiB) and its KV cache ({kv_cache_gb} GiB) leave no room "
                            f"for expert slots in the {avail / GIB:.1f} GiB available; lower --kv-cache-gb "
                            "or give --expert-slots")
    return max(1, min(most, int(left * SLOTS_MEMORY_SHARE // one_each)))


def check_base_fits(base: Checkpoint, *, dtype: str, kv_cache_gb: float) -> None:
    """Refuse to load a base that cannot fit whole (the OOM killer would end it mid-load)."""
    avail = available_memory()
    if avail is None:
        return
    other, experts, _ = weight_bytes(base, dtype)
    need = other + experts + RUNTIME_BYTES + int(kv_cache_gb * GIB)
    if need > avail:
        raise SettingsError(f"serving the whole base needs about {need / GIB:.1f} GiB (weights, an engine's "
                            f"runtime, a {kv_cache_gb} GiB KV cache) and {avail / GIB:.1f} GiB is available; "
                            "serve task subsets instead: --no-serve-base, with --expert-slots N routed experts "
                            "per layer resident (default: sized to fit)")
