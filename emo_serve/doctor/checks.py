"""The doctor's verdicts: what the shared engine answered, step by step, against what dedicated
engines on each subset's own manifest answered and against what the plan implies.

Pure functions of the engines' records (`engine.py`), so each verdict can be tested without an
engine. A step that failed, or never ran, fails every check that reads it, naming its error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .plan import ALONE, BATCHED, DRAINS, LOAD_Z, PREFIX_A, PREFIX_A_AGAIN, PREFIX_B, RELOAD, RELOADED, A, B, Plan

MASKED_ROUTING, CAPTURE, SLOTS, PREFIX = "masked routing", "capture counts", "expert slots", "prefix-cache isolation"
CHECKS = (MASKED_ROUTING, CAPTURE, SLOTS, PREFIX)

Answer = dict[str, Any]  # one request's record (engine.generate)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


class Failed(Exception):
    """A check's reason to fail, raised from anywhere inside it."""


@dataclass
class EngineRecord:
    """What one engine process wrote (its `out` JSON), and why it stopped early if it did."""

    label: str
    result: dict[str, Any]
    error: str | None = None  # the process failed or timed out (its log's tail is shown apart)

    def step(self, name: str) -> Any:
        """A step's answer, or Failed naming why there is none."""
        for record in self.result.get("steps", []):
            if record["name"] == name:
                if "error" in record:
                    raise Failed(f"{self.label}, step `{name}`: {record['error']}")
                return record["answer"]
        raise Failed(f"{self.label}: {self.result.get('error') or self.error or 'stopped'} before step `{name}`")


class Oracle:
    """The dedicated engines' answers, by (subset, prompt, prompt logprobs asked)."""

    def __init__(self, dedicated: dict[str, EngineRecord]) -> None:
        self.dedicated = dedicated

    def answer(self, served: Answer) -> Answer:
        run = self.dedicated.get(served["subset"])
        if run is None:
            raise Failed(f"no dedicated engine ran for {served['subset']}")
        for answer in run.step("dedicated"):
            if (answer["prompt"], answer["prompt_logprobs"] is not None) == \
                    (served["prompt"], served["prompt_logprobs"] is not None):
                return answer
        raise Failed(f"the dedicated engine of {served['subset']} has no answer to {served['prompt'][:30]!r}")


def difference(served: Answer, reference: Answer, tol: float) -> tuple[str | None, float]:
    """What differs between two answers to one request (None: equal within `tol`), and the largest
    logprob difference seen. Greedy tokens must be equal, except at a near-tie of the reference
    (the served token is its runner-up, within `tol` of its best), after which the two
    continuations may part and are not compared further."""
    if served["prompt_token_ids"] != reference["prompt_token_ids"]:
        return "the prompt was tokenized differently", 0.0
    worst = 0.0
    if served["prompt_logprobs"] is not None:
        worst = max((abs(a - b) for a, b in zip(served["prompt_logprobs"], reference["prompt_logprobs"])),
                    default=0.0)
        if worst > tol:
            return f"prompt logprobs differ by up to {worst:.2g}", worst
    for i, (mine, theirs) in enumerate(zip(served["tokens"], reference["tokens"])):
        if mine != theirs:
            second, margin = reference["runner_up"][i]
            if mine == second and margin <= tol:
                break
            return f"generated token {i} is {mine}, the dedicated engine's is {theirs}", worst
        gap = abs(served["logprobs"][i] - reference["logprobs"][i])
        worst = max(worst, gap)
        if gap > tol:
            return f"generated token {i}'s logprob differs by {gap:.2g}", worst
    return None, worst


def compare_steps(shared: EngineRecord, oracle: Oracle, steps: list[str], tol: float) -> tuple[int, float]:
    """Every request of `steps` against its dedicated answer: (requests, largest difference), or
    Failed listing the first differences."""
    count, worst, wrong = 0, 0.0, []
    for name in steps:
        for i, served in enumerate(shared.step(name)):
            what, gap = difference(served, oracle.answer(served), tol)
            count, worst = count + 1, max(worst, gap)
            if what is not None:
                wrong.append(f"{name} #{i} ({served['subset']}): {what}")
    if wrong:
        more = f" (+{len(wrong) - 2} more)" if len(wrong) > 2 else ""
        raise Failed("; ".join(wrong[:2]) + more)
    return count, worst


def prerequisites(plan: Plan, shared: EngineRecord, ops: tuple[str, ...]) -> None:
    """Failed with the first error among the control calls a check relies on (attaching the hooks,
    then every planned step of the `ops` kinds): the cause, rather than the answers it spoiled."""
    shared.step("attach")
    for step in plan.steps:
        if step.op in ops:
            shared.step(step.name)


def masked_routing(plan: Plan, shared: EngineRecord, oracle: Oracle, tol: float) -> str:
    prerequisites(plan, shared, ("load", "install"))
    steps = [ALONE[A], ALONE[B], BATCHED]
    count, worst = compare_steps(shared, oracle, steps, tol)
    return (f"{count} requests ({', '.join(steps)}) equal dedicated engines: greedy tokens, "
            f"max |d logprob| {worst:.1e}")


def processed_tokens(answer: Answer) -> int:
    """Tokens the engine ran through the model for a request: its prompt less what the prefix
    cache held, and every generated token but the last (sampled, never fed back)."""
    return len(answer["prompt_token_ids"]) - answer["cached"] + len(answer["tokens"]) - 1


def capture_counts(plan: Plan, shared: EngineRecord) -> str:
    prerequisites(plan, shared, ())
    keys_seen, tokens_seen = 0, 0
    since: list[str] = []
    for step in plan.steps:
        if step.op == "generate":
            since.append(step.name)
            continue
        if step.op != "drain":
            continue
        expected: dict[tuple[str, str], int] = {}
        for name in since:
            for answer in shared.step(name):
                key = (answer["subset"], name)
                expected[key] = expected.get(key, 0) + processed_tokens(answer)
        since = []
        drained = shared.step(step.name)
        got = {(k["model"], k["user"]): k for k in drained["keys"]}
        if set(got) != set(expected):
            raise Failed(f"{step.name}: keys {sorted(got)} drained, {sorted(expected)} sent")
        layers = drained["layers"]
        for key, tokens in expected.items():
            entry, kept = got[key], plan.subsets[key[0]].kept
            if entry["tokens"] != [tokens] * len(layers):
                raise Failed(f"{step.name}, {key[0]} in `{key[1]}`: {entry['tokens'][0]} tokens counted, "
                             f"{tokens} processed")
            for layer, counts in zip(layers, entry["counts"]):
                outside = {e: c for e, c in enumerate(counts) if c and e not in kept[layer]}
                if outside:
                    raise Failed(f"{step.name}, {key[0]} in `{key[1]}`, layer {layer}: counts on experts it "
                                 f"does not keep: {outside}")
                picks = min(plan.top_k[layer], len(kept[layer]))
                if sum(counts) != tokens * picks:
                    raise Failed(f"{step.name}, {key[0]} in `{key[1]}`, layer {layer}: {sum(counts)} picks "
                                 f"counted, {tokens} tokens x top-{picks} expected")
            keys_seen, tokens_seen = keys_seen + 1, tokens_seen + tokens
    return (f"{len(DRAINS)} drains, {keys_seen} (subset, user) keys, {tokens_seen} tokens: each key's tokens = "
            "prompt - cached + generated - 1; picks only on kept experts, tokens x min(top-k, kept) per layer")


def expert_slots(plan: Plan, shared: EngineRecord, oracle: Oracle, tol: float) -> str:
    prerequisites(plan, shared, ("install",))  # the loads are this check's own
    loads = [s.name for s in plan.steps if s.op == "load"]
    evicted: dict[str, int] = {}
    for name in loads:
        answer = shared.step(name)
        for layer, held in answer["engine_slots"].items():
            table = [-1 if e is None else e for e in answer["table_slots"][int(layer)]]
            if held != table:
                raise Failed(f"after `{name}`, layer {layer}: the engine's slots hold {held}, the front end's "
                             f"table says {table}")
        if answer["evicted"] != answer["planned_evictions"]:
            raise Failed(f"`{name}` evicted {answer['evicted']} experts, {answer['planned_evictions']} planned")
        evicted[name] = answer["evicted"]
    for name in (LOAD_Z, RELOAD[A], RELOAD[B]):
        if not evicted.get(name):
            raise Failed(f"`{name}` evicted nothing: the eviction path was not exercised")
    steps = [RELOADED[A], RELOADED[B]]
    count, worst = compare_steps(shared, oracle, steps, tol)
    routed = max(len(ids) for ids in plan.routed)
    return (f"{plan.expert_slots} slots/layer for {routed} routed experts; evicted {evicted[LOAD_Z]} "
            f"(z), {evicted[RELOAD[A]]} (reload a), {evicted[RELOAD[B]]} (reload b); engine slots = front end's "
            f"table after {len(loads)} loads; {count} requests after reload equal dedicated, "
            f"max |d logprob| {worst:.1e}")


def prefix_isolation(plan: Plan, shared: EngineRecord, oracle: Oracle, tol: float) -> str:
    prerequisites(plan, shared, ("load", "install"))
    [again] = shared.step(PREFIX_A_AGAIN)
    [other] = shared.step(PREFIX_B)
    if again["cached"] == 0:
        raise Failed("a's repeated prompt reused no cached tokens: prefix caching is off, so isolation is not shown")
    if other["cached"] != 0:
        raise Failed(f"b's request reused {other['cached']} tokens cached under a (cache salt {other['salt']!r})")
    count, worst = compare_steps(shared, oracle, [PREFIX_A, PREFIX_A_AGAIN, PREFIX_B], tol)
    return (f"a's repeat reused {again['cached']} of {len(again['prompt_token_ids'])} prompt tokens, b (other "
            f"salt) 0; {count} answers equal dedicated, max |d logprob| {worst:.1e}")


def run_checks(plan: Plan, shared: EngineRecord, dedicated: dict[str, EngineRecord], tol: float) -> list[Check]:
    oracle = Oracle(dedicated)
    verdicts = {
        MASKED_ROUTING: lambda: masked_routing(plan, shared, oracle, tol),
        CAPTURE: lambda: capture_counts(plan, shared),
        SLOTS: lambda: expert_slots(plan, shared, oracle, tol),
        PREFIX: lambda: prefix_isolation(plan, shared, oracle, tol),
    }
    checks = []
    for name in CHECKS:
        try:
            checks.append(Check(name, True, verdicts[name]()))
        except Failed as exc:
            checks.append(Check(name, False, str(exc)))
        except (KeyError, IndexError, TypeError, ValueError) as exc:  # a record not shaped as expected
            checks.append(Check(name, False, f"unexpected answer from the engine: {type(exc).__name__}: {exc}"))
    return checks


__all__ = ["CHECKS", "Check", "EngineRecord", "difference", "processed_tokens", "run_checks"]
