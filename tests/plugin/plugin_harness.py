"""Helpers of the plugin tests: one vLLM engine per model in a subprocess (engine_job.py), and
the comparison of what it computed with the reference forward."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from emo_serve.checkpoint import Checkpoint
from emo_serve.reference import forward, keep_masks

ENGINE_JOB = Path(__file__).with_name("engine_job.py")
ENGINE_TIMEOUT_S = 600
LOGPROB_TOL = 1e-3
MAX_TOKENS = 12
# Token ids of three prompts (lengths 5, 17, 40) from the tiny vocab (2048), clear of the
# special tokens 0..3.
PROMPTS = [
    [416, 224, 476, 376, 1052],
    [100 + (37 * i) % 1900 for i in range(17)],
    [200 + (101 * i + 7) % 1800 for i in range(40)],
]


def engine_env() -> dict[str, str]:
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class EngineRun:
    """What one engine produced (see engine_job.py), plus its log for failure messages."""

    model: Path
    results: list[dict[str, Any]]
    log: str


def engine_process(model: Path, work: Path, prompts: list[list[int]] = PROMPTS, dtype: str = "float32"
                   ) -> subprocess.CompletedProcess[str]:
    """Start a vLLM engine on `model` in a fresh interpreter, generate greedily, stop it."""
    work.mkdir(parents=True, exist_ok=True)
    job = {"model": str(model), "prompts": prompts, "max_tokens": MAX_TOKENS,
           "out": str(work / "result.json"), "dtype": dtype}
    (work / "job.json").write_text(json.dumps(job))
    return subprocess.run([sys.executable, str(ENGINE_JOB), str(work / "job.json")], cwd=work,
                          env=engine_env(), capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S)


def run_engine(model: Path, work: Path, prompts: list[list[int]] = PROMPTS,
               dtype: str = "float32") -> EngineRun:
    """`engine_process` that must succeed; its results parsed."""
    proc = engine_process(model, work, prompts, dtype)
    log = proc.stdout + proc.stderr
    (work / "engine.log").write_text(log)  # kept with the session's temp dirs, for reading
    if proc.returncode != 0:
        pytest.fail(f"engine on {model} exited with {proc.returncode}:\n{log[-6000:]}")
    return EngineRun(model, json.loads((work / "result.json").read_text()), log)


@dataclass
class Parity:
    """Largest differences between vLLM and the reference over all prompts."""

    greedy_mismatches: list[tuple[int, int, int, int]]  # prompt, step, vllm token, reference argmax
    prompt_logprob_diff: float
    sampled_logprob_diff: float

    def check(self) -> None:
        assert not self.greedy_mismatches, f"greedy tokens differ: {self.greedy_mismatches}"
        assert self.prompt_logprob_diff <= LOGPROB_TOL, self
        assert self.sampled_logprob_diff <= LOGPROB_TOL, self


def reference_parity(run: EngineRun, ckpt: Checkpoint, experts: list[list[int]] | None = None
                     ) -> Parity:
    """Score vLLM's prompt + continuation with the reference forward (restricted to `experts`
    of the base, if given) and compare token by token."""
    keep = keep_masks(ckpt.config, experts) if experts is not None else None
    seqs = [torch.tensor(r["prompt"] + r["tokens"]) for r in run.results]
    logprobs = [x.log_softmax(-1) for x in forward(ckpt, seqs, keep=keep)]
    mismatches, prompt_diff, sampled_diff = [], 0.0, 0.0
    for i, (r, lp) in enumerate(zip(run.results, logprobs)):
        n = len(r["prompt"])
        ids = torch.tensor(r["prompt"] + r["tokens"])
        ref = lp[torch.arange(len(ids) - 1), ids[1:]]  # logprob of each next token
        prompt_diff = max(prompt_diff, (ref[: n - 1] - torch.tensor(r["prompt_logprobs"])).abs().max().item())
        sampled_diff = max(sampled_diff, (ref[n - 1:] - torch.tensor(r["logprobs"])).abs().max().item())
        argmax = lp[n - 1: -1].argmax(-1).tolist()
        mismatches += [(i, step, tok, a) for step, (tok, a) in enumerate(zip(r["tokens"], argmax))
                       if tok != a]
    return Parity(mismatches, prompt_diff, sampled_diff)


REMOTE_CODE_MODULES = ("configuration_emo", "modeling_emo")  # what the config's auto_map names


def remote_code_markers(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.glob("REMOTE_CODE_RAN_*"))
