"""What the doctor runs: two subsets of the demo model, the steps the shared engine goes through,
and the requests a dedicated engine on each subset answers for comparison.

The plan is data (JSON to the engine processes, `engine.py`), so the engine side only executes
steps and the verdicts (`checks.py`) only read what came back. Two subsets, `doctor-a` and
`doctor-b`, keep the routed top-k experts each at every layer, disjoint but for one shared id at
one layer, and `doctor-a` keeps one fewer at another layer (its top-k shrinks there). The shared
engine has exactly enough expert slots for both (fewer than the routed experts), so both are
resident at once for a batch that interleaves them; a third set, `doctor-z` (never served, no
mask row), fills every slot afterwards, so that both subsets are evicted and loaded again.

Faults are injected only here, by leaving something out of the plan (`FAULTS`); the engine side
cannot tell a faulty plan from a good one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..config import EmoConfig
from ..errors import InvalidInput

# Test-only fault injection: `EMO_DOCTOR_FAULT=name[,name]` plants a fault the checks must catch.
FAULT_ENV = "EMO_DOCTOR_FAULT"
FAULTS = {
    "mask-row-unset": "doctor-b's mask row is never installed: its requests route unmasked",
    "shared-cache-salt": "doctor-b's long prompt carries doctor-a's cache salt: it may reuse doctor-a's KV blocks",
}

A, B, Z = "doctor-a", "doctor-b", "doctor-z"
MAX_TOKENS = 8
TOP_LOGPROBS = 2  # top-2 at each generated step: the margin that tells a near-tie from a wrong token
SHORT_PROMPTS = (
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "This Agreement shall be governed by and construed in accordance with the laws of",
)
# ~350 tokens: whole KV blocks (128 tokens on vLLM's CPU backend, 16 on most GPU ones), so that a
# prefix-cache hit is possible and visible in `num_cached_tokens`.
LONG_PROMPT = (
    "Any technical data or software which is licensed to the United States of America, its agencies "
    "and/or instrumentalities under this Agreement is commercial technical data or commercial computer "
    "software developed exclusively at private expense. For technical data, use, duplication, or "
    "disclosure by the Government is subject to restrictions as set forth in this Agreement. The "
    "Licensee shall not sublicense, sell, lease or otherwise transfer the software to any third party "
    "without the prior written consent of the Licensor, and any attempt to do so shall be void. "
    "def merge(left, right):\n    out = []\n    while left and right:\n"
    "        out.append(left.pop(0) if left[0] <= right[0] else right.pop(0))\n"
    "    return out + left + right\n\n"
    "If x + 109 = 227, then x = 118. Compute 33 times 3: 99. The sum of 332, 301 and 9 is 642. "
    "This command ensures that the changes in the experimental branch are already in the current "
    "branch. Branches are cheap and easy, so this is a good way to try something out."
)

# Step names the checks read.
LOAD = {A: "load a", B: "load b"}
INSTALL = {A: "install a", B: "install b"}
ALONE = {A: "a alone", B: "b alone"}
BATCHED = "a+b batched"
PREFIX_A, PREFIX_A_AGAIN, PREFIX_B = "prefix a", "prefix a again", "prefix b"
RELOADED = {A: "a after reload", B: "b after reload"}
LOAD_Z = "load z"
RELOAD = {A: "reload a", B: "reload b"}
DRAINS = ("drain 1", "drain 2")

Experts = list[list[int]]  # per layer, base expert ids


@dataclass(frozen=True)
class Subset:
    name: str
    routed: Experts  # the routed ids chosen per layer
    kept: Experts  # those and the shared ids: what its spec, its mask row and its slot load hold
    row: int  # its mask row on the shared engine (0: none, never served)
    salt: str  # its prefix-cache salt on the shared engine


@dataclass(frozen=True)
class Request:
    subset: str
    prompt: str
    prompt_logprobs: bool  # asking for them makes vLLM skip prefix-cache reads, so the long prompt does not
    salt: str  # "" on dedicated engines

    @property
    def key(self) -> tuple[str, str, bool]:
        """What a dedicated engine's answer is looked up by."""
        return self.subset, self.prompt, self.prompt_logprobs


@dataclass(frozen=True)
class Step:
    op: str  # load | install | generate | drain
    name: str
    subset: str = ""  # load, install
    requests: tuple[Request, ...] = ()  # generate: one `LLM.generate` call, so one batch


@dataclass
class Plan:
    subsets: dict[str, Subset]
    expert_slots: int
    routed: Experts  # the base's routed ids per layer (the slot table's universe)
    top_k: list[int]  # the base's top-k per layer, shared experts included (0: dense)
    steps: list[Step] = field(default_factory=list)
    max_tokens: int = MAX_TOKENS
    top_logprobs: int = TOP_LOGPROBS
    faults: tuple[str, ...] = ()

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)

    def dedicated_requests(self, subset: str) -> list[Request]:
        """Each distinct request made of `subset` on the shared engine, without salt: what its
        dedicated engine answers."""
        seen: dict[tuple[str, str, bool], Request] = {}
        for s in self.steps:
            for r in s.requests:
                if r.subset == subset and r.key not in seen:
                    seen[r.key] = Request(r.subset, r.prompt, r.prompt_logprobs, "")
        return list(seen.values())

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_faults(text: str | None) -> tuple[str, ...]:
    """The faults named in `EMO_DOCTOR_FAULT` (comma-separated), or InvalidInput naming the known ones."""
    names = tuple(sorted({n.strip() for n in (text or "").split(",") if n.strip()}))
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        raise InvalidInput(f"{FAULT_ENV}: unknown fault {', '.join(unknown)}; known: {', '.join(FAULTS)}")
    return names


def doctor_subsets(cfg: EmoConfig) -> tuple[Experts, Experts, Experts, int]:
    """Routed ids per layer of A, B and Z, and the expert slots per layer (|A ∪ B| at its largest).

    At MoE layer i, A takes the routed top-k ids from offset i·k, B the next k; at the second MoE
    layer A keeps one fewer (top-k shrinks to what is kept), at the third B swaps its last id for
    A's first (an expert both use). Z takes as many of the others as there are slots."""
    a: Experts = []
    b: Experts = []
    for i in range(cfg.num_hidden_layers):
        r = cfg.layer_routing(i)
        ids, k = r.routed_ids, r.routed_top_k
        if not ids:
            a.append([])
            b.append([])
            continue
        if k < 1 or len(ids) <= 2 * k:
            raise InvalidInput(f"layer {i}: the doctor needs more than 2 x top-k ({k}) routed experts per "
                               f"layer to fill and evict expert slots; it has {len(ids)}")
        start = i * k
        a.append([ids[(start + j) % len(ids)] for j in range(k)])
        b.append([ids[(start + k + j) % len(ids)] for j in range(k)])
    moe = [i for i in range(cfg.num_hidden_layers) if a[i]]
    if len(moe) > 1 and len(a[moe[1]]) > 1:
        a[moe[1]] = a[moe[1]][:-1]
    if len(moe) > 2:
        b[moe[2]] = b[moe[2]][:-1] + [a[moe[2]][0]]
    slots = max(len(set(x) | set(y)) for x, y in zip(a, b))
    z: Experts = []
    for i, (x, y) in enumerate(zip(a, b)):
        others = [e for e in cfg.layer_routing(i).routed_ids if e not in set(x) | set(y)]
        z.append(others[:slots])
    return a, b, z, slots


def make_plan(cfg: EmoConfig, faults: tuple[str, ...] = ()) -> Plan:
    """The steps of the shared engine, in order (see the module's docstring)."""
    a, b, z, slots = doctor_subsets(cfg)

    def subset(name: str, routed: Experts, row: int) -> Subset:
        kept = [cfg.layer_routing(i).kept_ids(ids) for i, ids in enumerate(routed)]
        return Subset(name, routed, kept, row, name if row else "")

    subsets = {A: subset(A, a, 1), B: subset(B, b, 2), Z: subset(Z, z, 0)}
    layers = [cfg.layer_routing(i) for i in range(cfg.num_hidden_layers)]
    plan = Plan(subsets, slots, [r.routed_ids for r in layers], [r.top_k for r in layers], faults=faults)

    def short(name: str) -> list[Request]:
        return [Request(name, p, True, subsets[name].salt) for p in SHORT_PROMPTS]

    def long(name: str, salt: str) -> Request:
        return Request(name, LONG_PROMPT, False, salt)

    steps = plan.steps
    for name in (A, B):
        steps.append(Step("load", LOAD[name], name))
        if not (name == B and "mask-row-unset" in faults):
            steps.append(Step("install", INSTALL[name], name))
        steps.append(Step("generate", ALONE[name], requests=tuple(short(name))))
    sa, sb = short(A), short(B)
    steps.append(Step("generate", BATCHED, requests=(sa[0], sb[0], sa[1], sb[1])))
    b_salt = subsets[A].salt if "shared-cache-salt" in faults else subsets[B].salt
    steps += [Step("generate", PREFIX_A, requests=(long(A, subsets[A].salt),)),
              Step("generate", PREFIX_A_AGAIN, requests=(long(A, subsets[A].salt),)),
              Step("generate", PREFIX_B, requests=(long(B, b_salt),)),
              Step("drain", DRAINS[0]),
              Step("load", LOAD_Z, Z)]
    for name in (A, B):
        steps += [Step("load", RELOAD[name], name), Step("generate", RELOADED[name], requests=tuple(short(name)))]
    steps.append(Step("drain", DRAINS[1]))
    return plan


__all__ = ["FAULTS", "FAULT_ENV", "Plan", "Request", "Step", "Subset", "doctor_subsets", "make_plan", "parse_faults"]
