"""Will it fit: the base's bytes against the memory an engine may use, before anything is loaded.

Measured on a 24 GB machine: serving the 27 GB `emo-1b14b` base whole made the kernel's OOM
killer end the engine a minute into its load, and nothing had warned. So the server compares
first, from the checkpoint's headers alone: the base served whole must fit in the memory an engine
may use, and without the base the expert slots are sized to fit.

What an engine may use (`engine_memory`): on CPU, the RAM available (as the kernel reports it to
this process, cgroup limit included); on GPUs, each GPU's share that vLLM will
request (`--gpu-memory-utilization` of its total, capped by what is free now), read with
`torch.cuda.mem_get_info` in a short child process, so that the front end never holds a CUDA
context (hundreds of MiB of every GPU, for as long as it runs). Weights are divided among the
tensor-parallel GPUs. Where the GPU memory cannot be read, nothing is checked and slots default
to every expert. None of the GPU side has run on a GPU yet (see README, "On NVIDIA GPUs").
"""

from __future__ import annotations

import logging
import math
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import Checkpoint
from ..errors import SettingsError
from .process import GIB, kv_cache_bytes

log = logging.getLogger(__name__)

# The server's own memory beside weights and KV cache: the front end, vLLM's API server, engine
# core and worker processes (Python, torch), activations. Measured at the 14B shape with expert
# slots, bf16: 11.6 GiB for the process tree = 1.5 (non-expert) + 6.0 (32 slots) + 1 (KV) + 3.1.
# On GPUs the same figure stands for the CUDA context, activations and CUDA graphs (not measured).
RUNTIME_BYTES = 3 * GIB
# Expert slots take at most this share of what is left after the non-expert weights, the runtime
# and the KV cache: on CPU the rest stays free for profiling jobs, page cache and the front end; on
# GPUs, where vLLM sizes the KV cache from what the model leaves, the rest becomes KV cache.
SLOTS_MEMORY_SHARE = 0.5
GPU_QUERY_TIMEOUT = 120.0  # seconds for the child that reads GPU memory (it imports torch)
# Prints "free total" in bytes for each of the first N visible GPUs (N: argv[1]).
_GPU_QUERY = ("import sys, torch\n"
              "if torch.cuda.is_available():\n"
              "    for i in range(min(int(sys.argv[1]), torch.cuda.device_count())):\n"
              "        print(*torch.cuda.mem_get_info(i))\n")
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


def gpu_memory(count: int = 1) -> list[tuple[int, int]] | None:
    """(free, total) bytes of each of the first `count` GPUs this process sees (CUDA_VISIBLE_DEVICES,
    as its engines will), from `torch.cuda.mem_get_info` in a child process; None when there are
    fewer GPUs or they cannot be read."""
    try:
        out = subprocess.run([sys.executable, "-c", _GPU_QUERY, str(count)], capture_output=True, text=True,
                             timeout=GPU_QUERY_TIMEOUT, check=True).stdout
        gpus = [(int(free), int(total)) for free, total in (line.split() for line in out.splitlines())]
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        log.warning("could not read the GPUs' memory; not checked", extra={"error": repr(exc)[:500]})
        return None
    if len(gpus) < count:
        log.warning("GPU memory not checked: %d GPUs needed, %d visible", count, len(gpus))
        return None
    return gpus


@dataclass(frozen=True)
class EngineMemory:
    """What one engine may fill: `available` bytes (per GPU on GPUs; None: unknown, nothing is
    checked) of `where`, `kv_cache` of them its KV cache (0 where vLLM sizes it from what is left),
    the weights split over `shards` GPUs (tensor parallelism; 1 on CPU)."""

    available: int | None
    where: str
    kv_cache: int
    shards: int = 1


def engine_memory(platform: str, *, kv_cache_gb: float | None, gpu_memory_utilization: float,
                  tensor_parallel_size: int = 1) -> EngineMemory:
    """The memory one engine may use: RAM on CPU (`available_memory`); on GPUs the least, over its
    `tensor_parallel_size` GPUs, of what vLLM will request (`gpu_memory_utilization`, the engine's
    share, of the GPU's total) and of what is free now (`gpu_memory`)."""
    kv = kv_cache_bytes(kv_cache_gb, platform) or 0
    if platform == "cpu":
        return EngineMemory(available_memory(), "RAM", kv)
    gpus = gpu_memory(tensor_parallel_size)
    avail = min(min(free, int(total * gpu_memory_utilization)) for free, total in gpus) if gpus else None
    return EngineMemory(avail, "GPU memory" + (" per GPU" if tensor_parallel_size > 1 else ""), kv,
                        tensor_parallel_size)


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


def default_expert_slots(base: Checkpoint, *, dtype: str, memory: EngineMemory) -> int:
    """Slots per layer that fit: `SLOTS_MEMORY_SHARE` of the memory left after the non-expert
    weights, runtime and KV cache, at most every routed expert, at least 1."""
    most = max(base.config.routed_counts())
    if memory.available is None:
        return most
    other, _, one_each = (n // memory.shards for n in weight_bytes(base, dtype))
    left = memory.available - other - RUNTIME_BYTES - memory.kv_cache
    if left < one_each:
        lower = "lower --kv-cache-gb" if memory.kv_cache else "raise --gpu-memory-utilization"
        raise SettingsError(f"the base's non-expert weights ({other / GIB:.1f} GiB), an engine's runtime "
                            f"({RUNTIME_BYTES / GIB:.0f} GiB){_kv(memory)} leave no room for expert slots in the "
                            f"{memory.available / GIB:.1f} GiB of {memory.where} an engine may use; {lower} "
                            "or give --expert-slots")
    return max(1, min(most, int(left * SLOTS_MEMORY_SHARE // one_each)))


def check_base_fits(base: Checkpoint, *, dtype: str, memory: EngineMemory) -> None:
    """Refuse to load a base that cannot fit whole (on CPU the OOM killer would end it mid-load;
    on GPUs vLLM would fail after reading the weights). Host RAM on CPU, GPU memory on GPUs."""
    if memory.available is None:
        return
    other, experts, _ = weight_bytes(base, dtype)
    weights = (other + experts) // memory.shards
    need = weights + RUNTIME_BYTES + memory.kv_cache
    if need > memory.available:
        raise SettingsError(f"serving the whole base needs about {need / GIB:.1f} GiB of {memory.where} (weights "
                            f"{weights / GIB:.1f} GiB, an engine's runtime{_kv(memory)}) and an engine may use "
                            f"{memory.available / GIB:.1f} GiB; serve task subsets instead: --no-serve-base, with "
                            "--expert-slots N routed experts per layer resident (default: sized to fit)")


def _kv(memory: EngineMemory) -> str:
    return f", its KV cache ({memory.kv_cache / GIB:g} GiB)" if memory.kv_cache else ""
