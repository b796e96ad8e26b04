"""`emo-serve doctor`: the real command on this machine passes, and a planted fault (a mask row
left unset) makes it fail with exit status 1; its plan, verdicts and report without an engine.

The engine tests run the CLI twice on one work dir: the second run (the planted fault) reuses the
dedicated engines' answers of the first, so each dedicated engine starts once.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from emo_serve.checkpoint import Checkpoint
from emo_serve.cli import main
from emo_serve.default_model import shipped_default_model
from emo_serve.doctor.checks import CHECKS, EngineRecord, difference, processed_tokens, run_checks
from emo_serve.doctor.plan import FAULT_ENV, LONG_PROMPT, PREFIX_B, A, B, Z, make_plan
from emo_serve.doctor.report import render
from emo_serve.doctor.run import Report

CLI = Path(sys.executable).with_name("emo-serve")
DOCTOR_TIMEOUT_S = 900
HEAVY = ("torch", "vllm", "transformers")


@pytest.fixture(scope="module")
def demo_config():
    path = shipped_default_model()
    assert path is not None, "the package ships emo-demo"
    return Checkpoint(path).config


# -- without an engine ------------------------------------------------------------------------------
def test_help_loads_no_model_stack() -> None:
    probe = ("import sys\nfrom emo_serve.cli import main\ntry:\n    main(['doctor', '--help'])\nexcept SystemExit:\n"
             f"    pass\nprint([m for m in {HEAVY!r} if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_an_unknown_fault_is_bad_usage(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(FAULT_ENV, "mask-row-unset,no-such-fault")
    assert main(["doctor"]) == 2
    assert "no-such-fault" in capsys.readouterr().err


def test_the_plan_fills_and_evicts_slots_with_two_subsets(demo_config) -> None:
    plan = make_plan(demo_config)
    a, b, z = (plan.subsets[n].routed for n in (A, B, Z))
    unions = [len(set(x) | set(y)) for x, y in zip(a, b)]
    assert plan.expert_slots == max(unions) < min(len(ids) for ids in plan.routed)  # both fit, yet evicting
    assert sum(len(set(x) & set(y)) for x, y in zip(a, b)) == 1  # disjoint but for one expert at one layer
    k = demo_config.layer_routing(0).routed_top_k
    assert sorted(len(ids) for ids in a) == [k - 1] + [k] * 3  # one layer where top-k shrinks
    assert all(not set(w) & (set(x) | set(y)) and len(w) == plan.expert_slots for w, x, y in zip(z, a, b))
    assert "install b" in [s.name for s in plan.steps]
    assert len(plan.dedicated_requests(A)) == len(plan.dedicated_requests(B)) == 3  # 2 short prompts + the long one


def test_faults_are_planted_in_the_plan_only(demo_config) -> None:
    unset = make_plan(demo_config, ("mask-row-unset",))
    assert "install b" not in [s.name for s in unset.steps] and "install a" in [s.name for s in unset.steps]
    salted = make_plan(demo_config, ("shared-cache-salt",))
    [request] = salted.step(PREFIX_B).requests
    assert request.prompt == LONG_PROMPT and request.salt == salted.subsets[A].salt
    assert unset.dedicated_requests(B) == make_plan(demo_config).dedicated_requests(B)  # the oracle is unchanged


def answer(tokens: list[int], logprobs: list[float], runner_up: list[list[float]]) -> dict:
    return {"prompt_token_ids": [5, 6, 7], "prompt_logprobs": [-1.0, -2.0], "tokens": tokens, "logprobs": logprobs,
            "runner_up": runner_up, "cached": 0}


def test_answers_are_equal_within_the_tolerance_and_may_part_only_at_a_near_tie() -> None:
    ref = answer([1, 2, 3], [-0.5, -0.7, -0.9], [[9, 0.4], [4, 0.0005], [8, 0.3]])
    assert difference(answer([1, 2, 3], [-0.5, -0.7, -0.9004], []), ref, 1e-3) == (None, pytest.approx(4e-4))
    assert difference(answer([1, 4, 0], [-0.5, -0.7, -5.0], []), ref, 1e-3)[0] is None  # token 1: a near-tie
    assert "generated token 0" in difference(answer([9, 2, 3], [-0.9, -0.7, -0.9], []), ref, 1e-3)[0]
    assert "logprob differs" in difference(answer([1, 2, 3], [-0.5, -0.8, -0.9], []), ref, 1e-3)[0]
    shifted = {**answer([1, 2, 3], [-0.5, -0.7, -0.9], []), "prompt_logprobs": [-1.0, -2.5]}
    assert "prompt logprobs differ" in difference(shifted, ref, 1e-3)[0]
    # the last generated token is sampled, never run through the model; cached prompt tokens are not run either
    assert processed_tokens({**ref, "cached": 2}) == 3 - 2 + 3 - 1


def test_an_engine_that_never_started_fails_every_check_and_says_why(demo_config) -> None:
    plan = make_plan(demo_config)
    shared = EngineRecord("shared engine", {"facts": {"platform": "cpu"}, "error": "the engine did not start: boom"},
                          "the engine process exited with 1")
    checks = run_checks(plan, shared, {}, 1e-3)
    assert [c.name for c in checks] == list(CHECKS) and not any(c.ok for c in checks)
    assert all("the engine did not start: boom" in c.detail for c in checks)
    text = render(Report(shared.result["facts"], checks, plan, 1e-3, 1.0, {"shared engine": "3 s"}))
    assert "unknown" in text and text.count("FAIL") == 4 and "0 of 4 checks passed" in text


# -- the real command ------------------------------------------------------------------------------
def run_doctor(work: Path, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run([str(CLI), "doctor", "--work-dir", str(work)], capture_output=True, text=True,
                          timeout=DOCTOR_TIMEOUT_S, env={**env, "HF_HUB_OFFLINE": "1"})


def results(stdout: str) -> dict[str, str]:
    """The table's result column, by check."""
    found = {}
    for name in CHECKS:
        match = re.search(rf"^\s+{re.escape(name)}\s+(pass|FAIL)\s+\S", stdout, re.MULTILINE)
        assert match, f"no row for {name}:\n{stdout}"
        found[name] = match.group(1)
    return found


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("doctor")


@pytest.mark.vllm
def test_doctor_passes_here(work: Path) -> None:
    r = run_doctor(work)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr[-6000:]}"
    assert results(r.stdout) == dict.fromkeys(CHECKS, "pass")
    for label in ("platform", "vLLM", "runner", "CUDA graphs", "CPU flags", "dtype"):
        assert re.search(rf"^\s+{label}\s+\S", r.stdout, re.MULTILINE), label
    assert "unknown" not in r.stdout
    assert "4 of 4 checks passed" in r.stdout


@pytest.mark.vllm
def test_a_mask_row_left_unset_fails_the_doctor(work: Path) -> None:
    r = run_doctor(work, fault="mask-row-unset")
    assert r.returncode == 1, f"{r.stdout}\n{r.stderr[-6000:]}"
    rows = results(r.stdout)
    assert rows["masked routing"] == "FAIL", r.stdout
    assert re.search(r"^\s+masked routing\s+FAIL\s+.*doctor-b", r.stdout, re.MULTILINE), r.stdout
    assert "mask-row-unset planted" in r.stdout
