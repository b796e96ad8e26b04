"""The CPU paths the plugin reports, and the AMX permission it holds in every vLLM process.

vLLM's CPU attention runs AMX tile instructions for bf16 whenever the CPU has AMX, without asking
Linux for the tile state; a process that did not ask dies with SIGILL on its first tile
instruction (an engine whose first request had at most 4 tokens died 9 times out of 9 on an AMX
Xeon). The AMX tests need such a CPU and skip elsewhere, saying why.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from plugin_harness import EngineRun, run_engine

from emo_serve.default_model import shipped_default_model
from emo_vllm.cpu import cpu_flags, cpu_paths

HAS_AMX = "AMX" in cpu_paths(cpu_flags())
needs_amx = pytest.mark.skipif(not HAS_AMX, reason="this CPU has no AMX (amx_tile, amx_bf16 not in "
                               "/proc/cpuinfo): vLLM never takes its AMX kernels here")


def test_paths_follow_the_cpu_flags() -> None:
    assert cpu_paths(frozenset({"avx2"})) == ["AVX2"]
    assert cpu_paths(frozenset({"avx2", "avx512f"})) == ["AVX-512", "AVX2"]
    assert cpu_paths(frozenset({"avx2", "avx512f", "amx_tile", "amx_bf16"})) == ["AMX", "AVX-512", "AVX2"]
    assert cpu_paths(frozenset({"amx_tile"})) == []  # tiles without bf16 are not vLLM's AMX path
    assert cpu_paths(frozenset()) == []


def test_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\nbogomips\t: 1\n")
    assert cpu_flags(info) == {"fpu", "sse", "avx2", "avx512f"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_engine_log_names_the_cpu_paths(base_run: EngineRun) -> None:
    """Every vLLM process logs the paths once, when the plugin loads (before any kernel)."""
    paths = ", ".join(cpu_paths(cpu_flags())) or "none of AMX, AVX-512, AVX2"
    assert f"emo-vllm: CPU paths {paths}" in base_run.log


@needs_amx
def test_register_holds_the_amx_permission() -> None:
    """A fresh interpreter does not hold it; one that loaded the plugin does."""
    check = "from emo_vllm.cpu import amx_permitted; print(amx_permitted())"
    before = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    after = subprocess.run([sys.executable, "-c", "import emo_vllm; emo_vllm.register(); " + check],
                           capture_output=True, text=True, check=True, timeout=300)
    assert before.stdout.split()[-1] == "False"
    assert after.stdout.split()[-1] == "True"


@needs_amx
def test_fresh_bf16_engine_answers_a_one_token_first_request(tmp_path: Path) -> None:
    """What died with SIGILL: a fresh eager bf16 engine whose first forward pass has 1 token."""
    model = shipped_default_model()
    assert model is not None, "the shipped emo-demo model is missing from the package"
    run = run_engine(model, tmp_path / "bf16", prompts=[[416]], dtype="bfloat16")
    assert len(run.results) == 1 and run.results[0]["tokens"], run.log[-4000:]
