"""Run the doctor: the shared engine through the plan, then a dedicated engine per subset, then
the verdicts. One engine at a time, each in a process of its own (`engine.py`), so a machine
that holds one small engine can run it; a finished engine's teardown (vLLM waits 5 s for its
worker) overlaps the next one's start.

With `--work-dir`, a dedicated engine's answers are kept there and reused by a later run whose
dedicated job is the same: same requests, dtype and subset manifest, same vLLM on the same
device, same emo-serve and plugin code. Only the shared engine then starts again (what a planted
fault or a changed setting affects).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidInput
from ..subset import MANIFEST_FILE
from .checks import Check, EngineRecord, run_checks
from .plan import A, B, Plan, make_plan

# float32 (the CPU default): vLLM against itself, so "equal" is meant to rounding. A 16-bit
# engine (a GPU's default, the model's own dtype) differs by batch shape far more.
TOLERANCE = {"float32": 1e-3}
TOLERANCE_16BIT = 0.1
KV_CACHE_BYTES = 256 * 2**20
HEARTBEAT_S = 15  # progress is repeated with the time taken when nothing new was said for this long
EXIT_GRACE_S = 30  # an engine process that wrote its answers and lingers is stopped after this
TERM_GRACE_S = 10
# What a reused dedicated answer must have been computed on, besides the same job.
SAME_ENGINE = ("vllm", "distribution", "platform", "device", "dtype")

Say = Callable[[str], None]


@dataclass
class Options:
    dtype: str = "auto"  # auto: float32 on CPU, the model's dtype elsewhere
    tolerance: float | None = None  # None: from the dtype the engines ran
    work_dir: Path | None = None  # kept when given (manifests, jobs, engine logs, dedicated answers)
    timeout_s: float = 600.0  # per engine process
    faults: tuple[str, ...] = ()


@dataclass
class Report:
    facts: dict[str, Any]
    checks: list[Check]
    plan: Plan
    tolerance: float
    seconds: float
    engines: dict[str, str] = field(default_factory=dict)  # label -> how long it ran, or that it was reused
    logs: dict[str, str] = field(default_factory=dict)  # label -> the log tail of an engine that failed

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


@contextmanager
def _work_dir(given: Path | None) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="emo-doctor-") as tmp:
        yield Path(tmp)


def engine_env() -> dict[str, str]:
    # The demo model and its manifests are local: nothing to fetch from the Hub.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


class EngineProcess:
    """One engine process (`python -m emo_serve.doctor.engine JOB`), its progress relayed."""

    def __init__(self, label: str, job: dict[str, Any], work: Path, say: Say) -> None:
        self.label, self.work, self.say = label, work, say
        slug = label.replace(" ", "-")
        self.out, self.progress = work / f"{slug}.json", work / f"{slug}.progress"
        self.log = work / f"{slug}.log"
        self.job = {**job, "out": str(self.out), "progress": str(self.progress)}
        self.proc: subprocess.Popen[bytes] | None = None

    def run(self, timeout_s: float) -> tuple[EngineRecord, float]:
        """Start it and wait until its answers are written (or it ended or timed out): what it wrote."""
        for stale in (self.out, self.progress):
            stale.unlink(missing_ok=True)
        job_path = self.work / f"{self.log.stem}.job.json"
        job_path.write_text(json.dumps(self.job))
        t0 = time.monotonic()
        self.say(f"{self.label}: starting")
        with self.log.open("w") as log:
            # Its own process group: vLLM's engine core and worker are its children, stopped with it.
            self.proc = subprocess.Popen([sys.executable, "-m", "emo_serve.doctor.engine", str(job_path)],
                                         cwd=self.work, stdout=log, stderr=subprocess.STDOUT, env=engine_env(),
                                         process_group=0)
        relayed, error, said = 0, None, t0
        while True:
            try:
                rc: int | None = self.proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                rc = None
            lines = self.progress.read_text().splitlines() if self.progress.exists() else []
            now = time.monotonic()
            for line in lines[relayed:]:
                self.say(f"{self.label}: {line}")
                said = now
            if relayed == len(lines) and now - said > HEARTBEAT_S:  # an engine start takes a while
                self.say(f"{self.label}: {lines[-1] if lines else 'starting'} ({now - t0:.0f} s)")
                said = now
            relayed = len(lines)
            if lines and lines[-1] == "done":
                break  # its answers are written; it exits on its own (see `stop`)
            if rc is not None:
                error = f"the engine process exited with {rc}"
                break
            if time.monotonic() - t0 > timeout_s:
                error = f"timed out after {timeout_s:.0f} s"
                self.kill()
                break
        result = json.loads(self.out.read_text()) if self.out.exists() else {}
        if error is None and not result.get("done"):
            error = "the engine process stopped before it finished"
        seconds = time.monotonic() - t0
        self.say(f"{self.label}: {'answered' if error is None else error} ({seconds:.0f} s)")
        return EngineRecord(self.label, result, error), seconds

    def stop(self, grace_s: float = EXIT_GRACE_S) -> None:
        """Let it exit (vLLM tears its engine down), or stop its process group after `grace_s`."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """Stop its process group: SIGTERM (vLLM shuts its engine down and frees its shared
        memory), then SIGKILL what is left."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=TERM_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the whole group is gone
            pass
        self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def code_digest() -> str:
    """The sources of emo-serve and of its vLLM plugin (found without importing it, so no vLLM)."""
    roots = [Path(__file__).resolve().parent.parent]
    spec = importlib.util.find_spec("emo_vllm")
    if spec is not None and spec.submodule_search_locations:
        roots += [Path(p) for p in spec.submodule_search_locations]
    digest = hashlib.sha256()
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def dedicated_key(job: dict[str, Any], model_dir: Path, facts: dict[str, Any], code: str) -> str:
    """What a dedicated engine's answers depend on (see the module's docstring)."""
    manifest = []
    for path in sorted(p for p in model_dir.iterdir() if p.is_file()):
        data = path.read_bytes()
        if path.name == MANIFEST_FILE:  # less its provenance, which stamps the time it was written
            spec = json.loads(data)
            spec.pop("provenance", None)
            data = json.dumps(spec, sort_keys=True).encode()
        manifest.append((path.name, hashlib.sha256(data).hexdigest()))
    same = {k: facts.get(k) for k in SAME_ENGINE}
    return hashlib.sha256(json.dumps([job, manifest, same, code], sort_keys=True).encode()).hexdigest()


def reused(engine: EngineProcess, key: str) -> EngineRecord | None:
    """The answers an earlier run left for this very job, if any."""
    key_file = engine.out.with_suffix(".key")
    if not (engine.out.exists() and key_file.exists() and key_file.read_text() == key):
        return None
    result = json.loads(engine.out.read_text())
    return EngineRecord(engine.label, result) if result.get("done") and not result.get("error") else None


def run_doctor(options: Options, say: Say) -> Report:
    """Start the demo model in a shared engine (mask rows, expert slots, routing capture, prefix
    caching), drive it through the plan, compare with a dedicated engine per subset."""
    from ..checkpoint import Checkpoint
    from ..default_model import shipped_default_model
    from ..export import materialize_subset
    from ..subset import make_subset

    t0 = time.monotonic()
    model = shipped_default_model()
    if model is None:
        raise InvalidInput("this build of emo-serve ships no demo model (emo_serve/data/models/emo-demo)")
    base = Checkpoint(str(model))
    plan = make_plan(base.config, options.faults)
    engines: dict[str, str] = {}
    logs: dict[str, str] = {}
    started: list[EngineProcess] = []
    with _work_dir(options.work_dir) as work:
        try:
            # The shared engine runs on a manifest keeping every expert (expert slots need one), as
            # a server that does not serve the base starts it; each dedicated engine on its subset's.
            shutil.rmtree(work / "manifests", ignore_errors=True)  # an earlier run's (a kept --work-dir)
            whole = make_subset(base, plan.routed, "emo-doctor-base")
            dirs = {"shared": materialize_subset(base, whole, work / "manifests" / whole.name)}
            for name in (A, B):
                spec = make_subset(base, plan.subsets[name].routed, name)
                dirs[name] = materialize_subset(base, spec, work / "manifests" / name)
            common = {"dtype": options.dtype, "kv_cache_bytes": KV_CACHE_BYTES}
            engine = EngineProcess("shared engine", {**common, "model": str(dirs["shared"]), "shared": True,
                                                     "plan": plan.to_json()}, work, say)
            started.append(engine)
            shared, seconds = engine.run(options.timeout_s)
            engines[engine.label] = f"{seconds:.0f} s"
            dedicated: dict[str, EngineRecord] = {}
            if shared.result.get("steps"):  # it started: its answers are worth comparing
                facts, code = shared.result.get("facts", {}), code_digest()
                for name in (A, B):
                    job = {**common, "model": str(dirs[name]), "shared": False, "max_tokens": plan.max_tokens,
                           "top_logprobs": plan.top_logprobs,
                           "requests": [asdict(r) for r in plan.dedicated_requests(name)]}
                    engine = EngineProcess(f"dedicated {name}", job, work, say)
                    key = dedicated_key(job, dirs[name], facts, code)
                    earlier = reused(engine, key)
                    if earlier is not None:
                        say(f"{engine.label}: answers reused from {engine.out}")
                        dedicated[name], engines[engine.label] = earlier, "reused"
                        continue
                    engine.out.with_suffix(".key").unlink(missing_ok=True)
                    started.append(engine)
                    dedicated[name], seconds = engine.run(options.timeout_s)
                    engines[engine.label] = f"{seconds:.0f} s"
                    if dedicated[name].error is None:
                        engine.out.with_suffix(".key").write_text(key)
            for engine in started:
                record = shared if engine.label == "shared engine" else dedicated.get(engine.label.split()[-1])
                if record is not None and (record.error is not None or record.result.get("error")):
                    logs[engine.label] = engine.log_tail()
        except BaseException:  # Ctrl-C included: engines run in process groups of their own
            for engine in started:
                engine.kill()
            raise
        finally:
            for engine in started:
                engine.stop()
    facts = dict(shared.result.get("facts", {}))
    dtype = str(facts.get("dtype", options.dtype))
    tol = options.tolerance if options.tolerance is not None else TOLERANCE.get(dtype, TOLERANCE_16BIT)
    checks = run_checks(plan, shared, dedicated, tol)
    return Report(facts, checks, plan, tol, time.monotonic() - t0, engines, logs)


__all__ = ["Options", "Report", "run_doctor"]
