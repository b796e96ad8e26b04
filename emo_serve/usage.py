"""Live routing statistics of the served models, as the front end keeps them.

Engines tally routing per request key (model, OpenAI `user`) in their own expert numbering and
hand the tallies out when drained (`emo_vllm.usage`). The book turns them into the base's expert
ids and keeps, per model: the total since the counters began (persisted beside the subsets, so a
restart keeps what was learnt), totals per user (what a tenant's subset is learnt from), and
time buckets over a retention window (what `?window=` and the drift-over-time figure read).

No torch here: the front end reads and writes these with numpy and JSON only.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from .errors import InvalidInput

USAGE_FORMAT: Final = "emo-usage/v1"
# Drained keys whose model starts with this are engine-side profiling runs, not traffic.
PROFILE_KEY_PREFIX: Final = "emo-profile:"
Experts = list[list[int]]


class WindowOutOfRange(InvalidInput):
    """A `window` outside 1 s .. the retention of the time buckets."""

    code, default_param = "window_out_of_range", "window"


class NotEnoughTraffic(InvalidInput):
    """Too few tokens observed to learn a subset from (or to show a user's routing)."""

    code, default_param = "not_enough_traffic", "from_traffic.min_tokens"


@dataclass
class Tally:
    """Routing of some tokens, per layer and base expert id: router mass (probability summed over
    tokens), top-k counts, tokens; and the per-token mass outside a subset (mean over layers),
    summed and bucketed by `bounds` (upper bounds; the engine's histogram)."""

    tokens: np.ndarray  # [layers] int64
    mass: list[np.ndarray]  # per layer [experts] float64
    counts: list[np.ndarray]  # per layer [experts] int64
    bounds: tuple[float, ...] = ()
    outside_sum: float = 0.0
    outside_tokens: int = 0
    hist: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @classmethod
    def empty(cls, experts_per_layer: Sequence[int], bounds: Sequence[float] = ()) -> Tally:
        return cls(np.zeros(len(experts_per_layer), dtype=np.int64),
                   [np.zeros(n, dtype=np.float64) for n in experts_per_layer],
                   [np.zeros(n, dtype=np.int64) for n in experts_per_layer],
                   tuple(bounds), hist=np.zeros(len(bounds), dtype=np.int64))

    def add(self, other: Tally) -> None:
        self.tokens += other.tokens
        for mine, theirs in zip(self.mass + self.counts, other.mass + other.counts, strict=True):
            mine += theirs
        if other.bounds and not self.bounds:
            self.bounds, self.hist = other.bounds, np.zeros(len(other.bounds), dtype=np.int64)
        if other.outside_tokens:
            self.outside_sum += other.outside_sum
            self.outside_tokens += other.outside_tokens
            self.hist += other.hist

    def copy(self) -> Tally:
        return Tally(self.tokens.copy(), [m.copy() for m in self.mass], [c.copy() for c in self.counts],
                     self.bounds, self.outside_sum, self.outside_tokens, self.hist.copy())

    @property
    def seen(self) -> int:
        """Tokens routed (each MoE layer sees every token once)."""
        return int(self.tokens.max(initial=0))

    @property
    def drift(self) -> float | None:
        """Mean router mass outside the subset per token, None when no token was measured."""
        return self.outside_sum / self.outside_tokens if self.outside_tokens else None

    def scores(self, method: str) -> list[list[float]]:
        """Per-layer means over tokens: `usage` (router probability) or `frequency` (top-k share),
        as the profiler defines them."""
        table = self.mass if method == "usage" else self.counts
        return [(t / n).tolist() if n else [0.0] * len(t) for t, n in zip(table, self.tokens.tolist())]

    # -- JSON ------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"tokens": self.tokens.tolist(), "mass": [m.tolist() for m in self.mass],
                "counts": [c.tolist() for c in self.counts], "bounds": list(self.bounds),
                "outside_sum": self.outside_sum, "outside_tokens": self.outside_tokens, "hist": self.hist.tolist()}

    @classmethod
    def from_json(cls, d: dict[str, Any], experts_per_layer: Sequence[int]) -> Tally:
        t = cls(np.asarray(d["tokens"], dtype=np.int64), [np.asarray(m, dtype=np.float64) for m in d["mass"]],
                [np.asarray(c, dtype=np.int64) for c in d["counts"]], tuple(d.get("bounds") or ()),
                float(d.get("outside_sum", 0.0)), int(d.get("outside_tokens", 0)),
                np.asarray(d.get("hist") or [0] * len(d.get("bounds") or ()), dtype=np.int64))
        if [len(m) for m in t.mass] != list(experts_per_layer) or len(t.tokens) != len(experts_per_layer):
            raise ValueError("the tallies' layer shapes differ from the base's")
        return t


def from_engine(entry: dict[str, Any], layers: Sequence[int], bounds: Sequence[float],
                experts_per_layer: Sequence[int], local_ids: Experts | None) -> Tally:
    """One drained key of an engine as a tally in base ids. `local_ids[layer][j]` is the base id
    of the engine's expert j (None: the engine numbers experts as the base does)."""
    t = Tally.empty(experts_per_layer, bounds)
    for j, layer in enumerate(layers):
        ids = np.arange(len(entry["mass"][j])) if local_ids is None else np.asarray(local_ids[layer])
        t.tokens[layer] = entry["tokens"][j]
        t.mass[layer][ids] += entry["mass"][j]
        t.counts[layer][ids] += entry["counts"][j]
    t.outside_sum, t.outside_tokens = float(entry["outside_sum"]), int(entry["outside_tokens"])
    t.hist = np.asarray(entry["hist"], dtype=np.int64)
    return t


@dataclass
class ModelUsage:
    """One model's routing: all time, per user, and in time buckets (start time, tally)."""

    total: Tally
    users: dict[str, Tally] = field(default_factory=dict)
    buckets: deque[tuple[float, Tally]] = field(default_factory=deque)
    since: float = 0.0
    dirty: bool = False


class UsageBook:
    """Every model's routing, fed by drained engine tallies."""

    def __init__(self, experts_per_layer: Sequence[int], *, retention: float = 3600.0, bucket: float = 10.0) -> None:
        self.experts_per_layer = list(experts_per_layer)
        self.retention, self.bucket = retention, bucket
        self.models: dict[str, ModelUsage] = {}

    def _model(self, model: str, now: float) -> ModelUsage:
        usage = self.models.get(model)
        if usage is None:
            usage = self.models[model] = ModelUsage(Tally.empty(self.experts_per_layer), since=now)
        return usage

    def add(self, model: str, user: str, tally: Tally, now: float) -> None:
        usage = self._model(model, now)
        usage.total.add(tally)
        if user:
            usage.users.setdefault(user, Tally.empty(self.experts_per_layer)).add(tally)
        if usage.buckets and usage.buckets[-1][0] > now - self.bucket:
            usage.buckets[-1][1].add(tally)
        else:
            usage.buckets.append((now, tally.copy()))
        while usage.buckets and usage.buckets[0][0] < now - self.retention:
            usage.buckets.popleft()
        usage.dirty = True

    def tally(self, model: str, *, window: float | None = None, user: str | None = None,
              now: float) -> Tally:
        """A model's routing: all time, over the last `window` seconds, or one user's (all time)."""
        usage = self.models.get(model)
        if usage is None:
            return Tally.empty(self.experts_per_layer)
        if user is not None:
            return usage.users.get(user) or Tally.empty(self.experts_per_layer)
        if window is None:
            return usage.total
        out = Tally.empty(self.experts_per_layer)
        for start, t in usage.buckets:
            if start >= now - window:
                out.add(t)
        return out

    def series(self, model: str) -> list[tuple[float, Tally]]:
        usage = self.models.get(model)
        return list(usage.buckets) if usage else []

    def forget(self, model: str) -> None:
        self.models.pop(model, None)

    # -- persistence -----------------------------------------------------------------------------
    def snapshot(self, model: str) -> dict[str, Any]:
        """One model's routing as a JSON document (what `load` reads back); marks it saved."""
        usage = self.models[model]
        doc = {"format": USAGE_FORMAT, "model": model, "experts_per_layer": self.experts_per_layer,
               "since": usage.since, "total": usage.total.to_json(),
               "users": {u: t.to_json() for u, t in usage.users.items()},
               "buckets": [{"start": s, "tally": t.to_json()} for s, t in usage.buckets]}
        usage.dirty = False
        return doc

    def load(self, model: str, path: Path) -> None:
        """Read one model's routing back; a file from another base shape is refused."""
        try:
            doc = json.loads(Path(path).read_bytes())
            if doc.get("format") != USAGE_FORMAT or doc.get("experts_per_layer") != self.experts_per_layer:
                raise ValueError(f"not {USAGE_FORMAT} for this base")
            shape = self.experts_per_layer
            self.models[model] = ModelUsage(
                Tally.from_json(doc["total"], shape),
                {u: Tally.from_json(t, shape) for u, t in doc.get("users", {}).items()},
                deque((float(b["start"]), Tally.from_json(b["tally"], shape)) for b in doc.get("buckets", [])),
                since=float(doc.get("since", 0.0)))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{os.fspath(path)}: unreadable routing counters ({exc})") from None

    def dirty(self) -> Iterable[str]:
        return [m for m, u in self.models.items() if u.dirty]


def check_window(window: float | None, retention: float, *, param: str = "window") -> float | None:
    """A `?window=` in seconds: 1 .. the retention, or none (all time)."""
    if window is None:
        return None
    if not math.isfinite(window) or not 1 <= window <= retention:
        raise WindowOutOfRange(f"window {window:g} s is out of range: give 1 to {retention:g} seconds "
                               "(or none, for all time)", param=param)
    return window


def budget_sizes(scores: Sequence[Sequence[float]], routed: Sequence[Sequence[int]], budget: int) -> list[int]:
    """Routed experts per layer for a total `budget`: one per MoE layer, then the highest
    scores across layers (layers compare: each layer's routed mass sums to the same top-k)."""
    sizes = [1 if ids else 0 for ids in routed]
    rest = sorted(((scores[layer][e], layer) for layer, ids in enumerate(routed)
                   for e in sorted(ids, key=lambda e: -scores[layer][e])[1:]), reverse=True)
    for _, layer in rest[: max(0, budget - sum(sizes))]:
        sizes[layer] += 1
    return sizes


__all__ = ["NotEnoughTraffic", "PROFILE_KEY_PREFIX", "Tally", "UsageBook", "WindowOutOfRange", "budget_sizes",
           "check_window", "from_engine"]
