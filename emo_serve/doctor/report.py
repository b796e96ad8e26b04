"""The doctor's report as text: what the engines ran on, then one row per check."""

from __future__ import annotations

from typing import Any

from .plan import FAULT_ENV, FAULTS, A, B
from .run import Report

UNKNOWN = "unknown (the shared engine did not report it)"


def header(facts: dict[str, Any], report: Report) -> list[tuple[str, str]]:
    def fact(key: str) -> Any:
        return facts.get(key, UNKNOWN)

    platform = f"{fact('platform')}: {facts['device']}" if "device" in facts else UNKNOWN
    runner = UNKNOWN
    if "runner" in facts:
        env = facts.get("v2_env")
        runner = (f"{facts['runner']} (vLLM's vllm_config.use_v2_model_runner, which picks the worker's runner; "
                  f"VLLM_USE_V2_MODEL_RUNNER={'unset' if env is None else env})")
    graphs = UNKNOWN
    if "cudagraph_mode" in facts:
        mode = facts["cudagraph_mode"]
        graphs = (f"on ({mode})" if mode != "NONE" else
                  "off (enforce_eager)" if facts.get("enforce_eager") else "off")
    flags = UNKNOWN
    if "cpu_flags" in facts:
        present = list(facts["cpu_flags"])
        if "amx_tile" in present:
            present[present.index("amx_tile")] = ("amx_tile (tile permission held)" if facts.get("amx_permission")
                                                  else "amx_tile (tile permission REFUSED)")
        missing = [f for f in ("avx2", "avx512f", "amx_tile") if f not in facts["cpu_flags"]]
        flags = " ".join(present) or "none of avx2, avx512f, amx_tile"
        if missing and present:
            flags += f"; no {', '.join(missing)}"
    vllm = f"{fact('vllm')} ({facts['distribution']})" if "distribution" in facts else UNKNOWN
    plan = report.plan
    routed = max(len(ids) for ids in plan.routed)
    rows = [("platform", platform), ("vLLM", vllm), ("runner", runner), ("CUDA graphs", graphs),
            ("CPU flags", flags), ("dtype", f"{fact('dtype')}, logprob tolerance {report.tolerance:.0e}"),
            ("setup", f"demo model, {routed} routed experts/layer; subsets {A}, {B} on mask rows "
                      f"{plan.subsets[A].row}, {plan.subsets[B].row}; {plan.expert_slots} expert slots/layer")]
    for fault in plan.faults:
        rows.append(("FAULT", f"{fault} planted by {FAULT_ENV}: {FAULTS[fault]}"))
    return rows


def render(report: Report) -> str:
    lines = ["emo-serve doctor: one shared engine against dedicated engines", ""]
    rows = header(report.facts, report)
    width = max(len(k) for k, _ in rows)
    lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
    lines.append("")
    table = [("check", "result", "detail")] + [(c.name, "pass" if c.ok else "FAIL", c.detail) for c in report.checks]
    name_w, result_w = (max(len(r[i]) for r in table) for i in (0, 1))
    lines += [f"  {n.ljust(name_w)}  {r.ljust(result_w)}  {d}" for n, r, d in table]
    passed = sum(c.ok for c in report.checks)
    engines = ", ".join(f"{label} {how}" for label, how in report.engines.items())
    lines += ["", f"{passed} of {len(report.checks)} checks passed in {report.seconds:.0f} s ({engines})"]
    return "\n".join(lines)


def render_logs(report: Report) -> str:
    """The log tails of engines that failed, for the error stream."""
    return "\n".join(f"--- {label} (last lines of its log) ---\n{tail}" for label, tail in report.logs.items())


__all__ = ["render", "render_logs"]
