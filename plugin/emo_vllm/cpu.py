"""The CPU's instruction paths, and the one permission AMX needs before any kernel runs.

Linux lets a process execute AMX tile instructions only after it has asked for the tile state
(`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`); the first tile instruction of a process
that did not ask dies with SIGILL. vLLM 0.32's CPU attention picks its AMX kernel
(`cpu_attn_amx.hpp`) for bf16 whenever the CPU reports AMX, and never asks: only torch's oneDNN
does, and only once a forward pass of 5 or more tokens reaches it. An engine whose first request
is shorter (and `--enforce-eager` skips the warm-up that would have been longer) died on every
AMX Xeon. The plugin is loaded in every vLLM process (API server, engine core, each worker), so
asking here, in `register()`, holds the permission before any kernel runs and keeps AMX's speed.

The permission is per process and is not inherited across `exec`, which is how vLLM starts its
processes (spawn): each asks for itself. Nothing here imports torch or vLLM.
"""

from __future__ import annotations

import ctypes
import platform
import sys
from functools import cache
from pathlib import Path
from typing import Final

_SYS_ARCH_PRCTL: Final = 158  # x86-64 syscall number
ARCH_GET_XCOMP_PERM: Final = 0x1022
ARCH_REQ_XCOMP_PERM: Final = 0x1023
XFEATURE_XTILEDATA: Final = 18

# What each path needs in /proc/cpuinfo's flags; listed fastest first.
PATHS: Final = (("AMX", ("amx_tile", "amx_bf16")), ("AVX-512", ("avx512f",)), ("AVX2", ("avx2",)))


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first processor's flags (every core of a machine reports the same set)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def cpu_paths(flags: frozenset[str]) -> list[str]:
    """The vector paths these flags allow, fastest first (e.g. `["AMX", "AVX-512", "AVX2"]`)."""
    return [name for name, needs in PATHS if all(f in flags for f in needs)]


def _arch_prctl(code: int, arg: int | ctypes.c_uint64) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.syscall(_SYS_ARCH_PRCTL, code, arg if isinstance(arg, int) else ctypes.byref(arg)))


def _linux_x86_64() -> bool:
    return sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")


def amx_permitted() -> bool:
    """Whether this process may execute AMX tile instructions now."""
    if not _linux_x86_64():
        return False
    mask = ctypes.c_uint64(0)
    if _arch_prctl(ARCH_GET_XCOMP_PERM, mask) != 0:
        return False
    return bool(mask.value & (1 << XFEATURE_XTILEDATA))


def request_amx() -> bool:
    """Ask Linux for the AMX tile state for this process (a no-op without AMX); True if held."""
    if not _linux_x86_64() or "amx_tile" not in cpu_flags():
        return False
    if _arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0:
        return False
    return amx_permitted()


@cache
def prepare_cpu() -> tuple[list[str], bool]:
    """Once per process: hold the AMX permission where the CPU has AMX. Returns the paths the
    CPU offers and whether the AMX permission is held."""
    paths = cpu_paths(cpu_flags())
    return paths, request_amx() if "AMX" in paths else False


def cpu_summary() -> str:
    """One log line naming the CPU paths this process can take (the model logs it when built:
    vLLM configures its loggers only after the plugin has loaded)."""
    paths, amx = prepare_cpu()
    line = "emo-vllm: CPU paths " + (", ".join(paths) or "none of AMX, AVX-512, AVX2")
    if "AMX" in paths:
        # Without the permission the AMX kernels crash this process: say so loudly.
        line += (" (AMX tile permission held)" if amx else
                 " (Linux REFUSED the AMX tile permission: vLLM's AMX kernels will crash this engine)")
    return line


__all__ = ["amx_permitted", "cpu_flags", "cpu_paths", "cpu_summary", "prepare_cpu", "request_amx"]
