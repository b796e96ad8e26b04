"""Live routing statistics of the served models, as the front end keeps them.

Engines tally routing per request key (model, OpenAI `user`) in their own expert numbering and
hand the tallies out when drained (`emo_vllm.usage`). The book turns them into the base's expert
ids and keeps, per model: the total since the counters began (persisted beside the subsets, so a
restart keeps what was learnt), totals per user (what a tenant's subset is learnt from), and
time buckets over a retention window (what `?window=` and the drift-over-time figure read).

Users are whatever clients put in `user`, so their number is bounded per model (`max_users`):
beyond it the least recently seen user is folded into one "other users" tally, which keeps the
model's total exact and the memory and file of a model bounded however many names clients invent.
The model's *identity* tells apart the lives of a subset name (deleted and made again): counts
and files of another identity are never mixed into the current one.

No torch here: the front end reads and writes these with numpy and JSON only.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from .errors import InvalidInput

USAGE_FORMAT: Final = "emo-usage/v1"
# Drained keys whose model starts with this are engine-side profiling runs, not traffic.
PROFILE_KEY_PREFIX: Final = "emo-profile:"
# The longest OpenAI `user` kept by name: requests with a longer one are refused (400), and the
# routing queries accept no longer one, so a user kept is a user that can be asked for.
MAX_USER_CHARS: Final = 256
# Between a model's name and its incarnation in the key the engines count under (model names
# are letters, digits, `_`, `-` and `.`: never this).
KEY_SEPARATOR: Final = "@"
Experts = list[list[int]]


def usage_key(model: str, incarnation: str | None) -> str:
    """The key a request's tokens are counted under in the engine: the model and which of its
    lives it is (None: a model that has only one, e.g. on its own dedicated engine)."""
    return f"{model}{KEY_SEPARATOR}{incarnation}" if incarnation else model


def key_model(key: str) -> str:
    """The model named by an engine key (see `usage_key`)."""
    return key.split(KEY_SEPARATOR, 1)[0]


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
    """One model's routing: all time, per user (least recently seen first) and the users beyond
    the cap together, and in time buckets (start time, tally); `identity` is the model's life
    these counts belong to. `touched` and `full` say what the next snapshot must copy."""

    total: Tally
    users: OrderedDict[str, Tally] = field(default_factory=OrderedDict)
    others: Tally | None = None
    buckets: deque[tuple[float, Tally]] = field(default_factory=deque)
    since: float = 0.0
    identity: str = ""
    dirty: bool = False
    touched: set[str] = field(default_factory=set)  # users changed since the last snapshot
    full: bool = True  # the next snapshot copies every user (none of this model's encoded yet)


@dataclass
class UsageSnapshot:
    """One model's routing as the event loop copied it for a writer thread: only what may change
    afterwards is copied (the total, the open bucket, the users changed since the last snapshot);
    closed buckets never change again and are shared. `UsageEncoder` turns it into the file."""

    model: str
    usage: ModelUsage  # the live record, to tell whether the model was forgotten meanwhile
    header: dict[str, Any]
    total: Tally
    others: Tally | None
    users: list[str]  # every user kept, least recently seen first
    changed: dict[str, Tally]  # copies of the users changed since the last snapshot (all when `complete`)
    complete: bool
    buckets: list[tuple[float, Tally]]  # the last one copied (still filling), the others shared


class UsageBook:
    """Every model's routing, fed by drained engine tallies; at most `max_users` users per model."""

    def __init__(self, experts_per_layer: Sequence[int], *, retention: float = 3600.0, bucket: float = 10.0,
                 max_users: int = 1000) -> None:
        self.experts_per_layer = list(experts_per_layer)
        self.retention, self.bucket, self.max_users = retention, bucket, max_users
        self.models: dict[str, ModelUsage] = {}

    def _model(self, model: str, now: float, identity: str) -> ModelUsage:
        """The model's record; a new one when its identity changed (a subset made again under
        the same name starts from nothing)."""
        usage = self.models.get(model)
        if usage is None or usage.identity != identity:
            usage = self.models[model] = ModelUsage(Tally.empty(self.experts_per_layer), since=now,
                                                    identity=identity)
        return usage

    def add(self, model: str, user: str, tally: Tally, now: float, *, identity: str = "") -> None:
        usage = self._model(model, now, identity)
        usage.total.add(tally)
        if len(user) > MAX_USER_CHARS:  # no query can name it (the API refuses such requests)
            self._other_users(usage).add(tally)
        elif user:
            self._user(usage, user).add(tally)
        if usage.buckets and usage.buckets[-1][0] > now - self.bucket:
            usage.buckets[-1][1].add(tally)
        else:
            usage.buckets.append((now, tally.copy()))
        while usage.buckets and usage.buckets[0][0] < now - self.retention:
            usage.buckets.popleft()
        usage.dirty = True

    def _user(self, usage: ModelUsage, user: str) -> Tally:
        """`user`'s tally, now the most recently seen; the least recent beyond the cap are folded
        into the other users'."""
        tally = usage.users.get(user)
        if tally is None:
            tally = usage.users[user] = Tally.empty(self.experts_per_layer)
        else:
            usage.users.move_to_end(user)
        usage.touched.add(user)
        self._evict(usage)
        return tally

    def _evict(self, usage: ModelUsage) -> None:
        while len(usage.users) > self.max_users:
            name, tally = usage.users.popitem(last=False)
            usage.touched.discard(name)
            self._other_users(usage).add(tally)

    def _other_users(self, usage: ModelUsage) -> Tally:
        if usage.others is None:
            usage.others = Tally.empty(self.experts_per_layer)
        return usage.others

    def other_users(self, model: str) -> Tally:
        """The users no longer kept by name (beyond `max_users`), together."""
        usage = self.models.get(model)
        return usage.others if usage is not None and usage.others is not None else Tally.empty(self.experts_per_layer)

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
    def snapshot(self, model: str) -> UsageSnapshot:
        """What a writer thread needs to save one model (see `UsageSnapshot`), copied on the event
        loop where the book changes; marks the model saved. Costs copies of what changed since the
        last snapshot, not of every user."""
        usage = self.models[model]
        names = list(usage.users) if usage.full else [u for u in usage.touched if u in usage.users]
        buckets = list(usage.buckets)
        if buckets:
            buckets[-1] = (buckets[-1][0], buckets[-1][1].copy())
        snap = UsageSnapshot(
            model, usage, {"format": USAGE_FORMAT, "model": model, "identity": usage.identity,
                           "experts_per_layer": self.experts_per_layer, "since": usage.since},
            usage.total.copy(), usage.others.copy() if usage.others is not None else None, list(usage.users),
            {u: usage.users[u].copy() for u in names}, usage.full, buckets)
        usage.dirty, usage.full = False, False
        usage.touched.clear()
        return snap

    def load(self, model: str, path: Path, *, identity: str | None = None) -> None:
        """`loads` of a file."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ValueError(f"{os.fspath(path)}: unreadable routing counters ({exc})") from None
        self.loads(model, data, source=os.fspath(path), identity=identity)

    def loads(self, model: str, data: str | bytes, *, source: str, identity: str | None = None) -> None:
        """Read one model's routing back. Refused: counters from another base shape, or (given
        `identity`) of another life of the model; a document from before identities is read."""
        self.models[model] = self.parse(model, data, source=source, identity=identity)

    def parse(self, model: str, data: str | bytes, *, source: str, identity: str | None = None) -> ModelUsage:
        """One model's routing from its document (`UsageEncoder`'s), not yet in the book."""
        try:
            doc = json.loads(data)
            if doc.get("format") != USAGE_FORMAT or doc.get("experts_per_layer") != self.experts_per_layer:
                raise ValueError(f"not {USAGE_FORMAT} for this base")
            stored = doc.get("identity")
            if identity is not None and stored and stored != identity:
                raise ValueError(f"counters of another incarnation of `{model}` ({stored}, not {identity})")
            shape = self.experts_per_layer
            others = doc.get("other_users")
            usage = ModelUsage(
                Tally.from_json(doc["total"], shape),
                OrderedDict((u, Tally.from_json(t, shape)) for u, t in doc.get("users", {}).items()),
                Tally.from_json(others, shape) if others else None,
                deque((float(b["start"]), Tally.from_json(b["tally"], shape)) for b in doc.get("buckets", [])),
                since=float(doc.get("since", 0.0)), identity=identity if identity is not None else stored or "")
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{source}: unreadable routing counters ({exc})") from None
        self._evict(usage)  # a smaller --routing-max-users than when it was written
        return usage

    def dirty(self) -> Iterable[str]:
        return [m for m, u in self.models.items() if u.dirty]


def aligned_buckets(series: Iterable[Iterable[tuple[float, Tally]]], size: float) -> list[tuple[float, Tally]]:
    """Several replicas' time buckets summed on one grid of `size`-second buckets (each replica
    starts its buckets when its first tokens came), oldest first; the inputs are not changed."""
    grid: dict[float, Tally] = {}
    for buckets in series:
        for start, tally in buckets:
            key = start - start % size
            if key in grid:
                grid[key].add(tally)
            else:
                grid[key] = tally.copy()
    return sorted(grid.items(), key=lambda item: item[0])


def merge_usage(into: ModelUsage, other: ModelUsage, size: float) -> None:
    """Add another replica's routing of the same model into `into` (the fleet's sum): totals, users
    and the users beyond the cap add up, buckets on one grid (`aligned_buckets`)."""
    into.total.add(other.total)
    for user, tally in other.users.items():
        if user in into.users:
            into.users[user].add(tally)
        else:
            into.users[user] = tally.copy()
    if other.others is not None:
        if into.others is None:
            into.others = other.others.copy()
        else:
            into.others.add(other.others)
    into.buckets = deque(aligned_buckets([into.buckets, other.buckets], size))
    into.since = min(into.since, other.since) if into.since else other.since


class UsageEncoder:
    """Snapshots to JSON text (the document `UsageBook.load` reads), on a writer thread.

    Encoding every number is the costly part of saving (tens of MB for thousands of users), so
    each user's and each closed bucket's JSON is kept and only what a snapshot copied is encoded
    again. One encoder per book, fed each model's snapshots in the order they were taken, one at
    a time (the collector's saves wait for the one before).
    """

    def __init__(self) -> None:
        self._users: dict[str, dict[str, str]] = {}  # model -> user -> its tally's JSON
        self._buckets: dict[str, dict[float, str]] = {}  # model -> closed bucket's start -> its JSON

    def encode(self, snap: UsageSnapshot) -> str:
        cached = {} if snap.complete else self._users.get(snap.model, {})
        cached.update((u, _dumps(t.to_json())) for u, t in snap.changed.items())
        self._users[snap.model] = cached = {u: cached[u] for u in snap.users}  # the evicted go
        old = {} if snap.complete else self._buckets.get(snap.model, {})
        closed = {start: old.get(start) or _dumps({"start": start, "tally": t.to_json()})
                  for start, t in snap.buckets[:-1]}
        self._buckets[snap.model] = closed
        buckets = list(closed.values())
        if snap.buckets:
            start, t = snap.buckets[-1]
            buckets.append(_dumps({"start": start, "tally": t.to_json()}))
        head = {**snap.header, "total": snap.total.to_json(),
                "other_users": snap.others.to_json() if snap.others is not None else None}
        users = ",".join(f"{json.dumps(u)}:{cached[u]}" for u in snap.users)
        return f'{_dumps(head)[:-1]},"users":{{{users}}},"buckets":[{",".join(buckets)}]}}\n'

    def keep(self, models: Iterable[str]) -> None:
        """Drop what is kept for models no longer in the book (deleted subsets)."""
        kept = set(models)
        for cache in (self._users, self._buckets):
            for model in [m for m in cache if m not in kept]:
                del cache[model]


def _dumps(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"))


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


__all__ = ["MAX_USER_CHARS", "NotEnoughTraffic", "PROFILE_KEY_PREFIX", "Tally", "UsageBook", "UsageEncoder",
           "UsageSnapshot", "WindowOutOfRange", "budget_sizes", "check_window", "from_engine", "key_model",
           "usage_key"]
