"""The service's live-routing half: subsets learnt from the engines' routing (examples scored in
a running engine, or the traffic observed), and the routing statistics the API and `/ui` show.

A mixin of `EmoService` (service.py), which owns the state read here; kept apart so each file
holds one job: service.py the models, subsets and engines, this file what capture feeds.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..checkpoint import Checkpoint
from ..engines import EngineState, Placement, SharedPlacement, UnknownModel
from ..engines.manager import Engine
from ..engines.placement import BASE_SALT
from ..errors import InvalidInput, NotFound, Unavailable
from ..examples import Example
from ..plot import Heatmap
from ..profiler import Scores
from ..selection import SelectionRequest
from ..settings import Settings
from ..sizing import check_budget
from ..store import SubsetStore
from ..subset import SubsetSpec
from ..usage import NotEnoughTraffic, Tally, budget_sizes, check_window, usage_key
from . import live_scores
from .jobs import ProfilingJobs
from .protocol import Drift, DriftPoint, FromTraffic, LayerRoutingStats, ModelRouting, SubsetCreate
from .routing import Incarnation, RoutingCollector

log = logging.getLogger(__name__)

# A read of one subset collects the engines' counts first when the last collection is older than
# this: its drift is fresh right after a burst, yet a client polling in a loop drains the engines
# at most once a second (a drain is a control call between every engine's steps)...
FRESH_SECONDS = 1.0
# ...waiting for it at most this long (an engine that stalls does not stall the read).
FRESH_WAIT_SECONDS = 2.0


class RoutingCaptureOff(NotFound):
    """Routing statistics were asked for on a server started with --no-routing-capture."""

    code = "routing_capture_off"


class LiveRouting:
    """Routing-fed parts of `EmoService`; the attributes below are the service's."""

    settings: Settings
    base: Checkpoint
    base_id: str
    registry: SubsetStore
    placement: Placement
    routing: RoutingCollector | None
    jobs: ProfilingJobs
    max_model_len: int

    def _counted(self, model: str) -> bool:
        """Whether drained counters for `model` belong in the book (the base and live subsets)."""
        return model == self.base_id or model in self.registry.records

    def _incarnation(self, model: str) -> Incarnation | None:
        """The life of `model` whose counts the book keeps, None for a model not counted. On an
        engine, a subset's lives differ by the cache salt its requests carry (a new one per
        creation, for the prefix cache's sake too; `proxy.engine_payload` keys the counts with
        it); on disk, by when its manifest was made (the base: by its fingerprint)."""
        if model == self.base_id:
            return Incarnation(usage_key(model, self._usage_salt(model)), self.base.fingerprint)
        record = self.registry.records.get(model)
        if record is None:
            return None
        identity = record.spec.provenance.created.isoformat() if record.spec is not None else ""
        return Incarnation(usage_key(model, self._usage_salt(model)), identity)

    def _usage_salt(self, model: str) -> str | None:
        """The cache salt the placement gives `model`'s requests (None on dedicated engines, where
        a subset made again gets a new engine)."""
        if not isinstance(self.placement, SharedPlacement):
            return None
        if model == self.base_id:
            return BASE_SALT
        subset = self.placement.subsets.get(model)
        return subset.salt if subset is not None else None

    # -- subsets from live routing --------------------------------------------------------------
    def _routing_on(self) -> RoutingCollector:
        if self.routing is None:
            raise RoutingCaptureOff("routing capture is off on this server (--no-routing-capture)")
        return self.routing

    def _live_engine(self, method: str, request: SelectionRequest) -> Engine | None:
        """A ready engine holding all of the base's experts and counting routing, when the request
        can be scored there (`usage`/`frequency` with a given size)."""
        if self.routing is None or method not in ("usage", "frequency") or request.by_quality:
            return None
        engine = self.placement.engine_of(self.base_id)
        if (engine is None or engine.state is not EngineState.READY or engine.model_id not in self.routing.attached
                or self.placement.local_ids(engine.model_id) is not None):
            return None
        return engine

    async def _example_sequences(self, req: SubsetCreate, examples: list[Example]
                                 ) -> tuple[list[list[int]], list[str]]:
        """The examples' token ids as the profiler feeds them, and its truncation warnings; 400
        when they come to more than --max-profile-tokens, wherever they would be scored."""
        sequences, warnings = await asyncio.to_thread(live_scores.tokenize, self.base, examples,
                                                      req.max_tokens_per_example)
        live_scores.check_total(sequences, self.settings.max_profile_tokens)
        return sequences, warnings

    async def _subset_from_live_engine(self, req: SubsetCreate, request: SelectionRequest, examples: list[Example],
                                       sequences: list[list[int]], warnings: list[str]
                                       ) -> tuple[SubsetSpec, Scores] | None:
        """Score the examples (`sequences`, their token ids) in the running base engine (see
        `live_scores`); None when no such engine is up, or an example is longer than the engine's
        context (the profiler then runs). The run holds a profiling job's place (429 when none is
        free): it loads the engine that every completion of the base needs."""
        if self.routing is None or self._live_engine(req.method, request) is None:
            return None
        if max(len(ids) for ids in sequences) >= self.max_model_len:
            return None
        with self.jobs.live():
            lease = await self.placement.acquire(self.base_id)
            try:
                scores = await live_scores.score_in_engine(
                    lease, self.routing, self.base, examples, sequences, warnings, method=req.method,
                    dtype=self._engine_dtype(), timeout=self.settings.upstream_read_timeout, gate=self.jobs.prefills)
            finally:
                lease.release()
        spec = scores.to_subset(req.size, fraction=req.fraction, sizes=req.sizes, name=req.name, checkpoint=self.base)
        spec.provenance.details["scored_by"] = "engine"
        return spec, scores

    async def _subset_from_traffic(self, req: SubsetCreate, source: FromTraffic) -> tuple[SubsetSpec, Scores]:
        """The experts `source.model`'s observed traffic (or one user's) routed to most."""
        if not self._counted(source.model):
            raise UnknownModel(source.model, param="from_traffic.model")
        if req.budget is not None:  # before the traffic: it depends on the base alone
            check_budget(self.base.config.routed_counts(), req.budget)
        window, tally = await self._observed(source.model, source.window, source.user, field="from_traffic.")
        if tally.seen < source.min_tokens:
            raise NotEnoughTraffic(f"{tally.seen} tokens of traffic to `{source.model}` observed"
                                   + (f" from user {source.user!r}" if source.user else "")
                                   + f", fewer than min_tokens {source.min_tokens}")
        scores = live_scores.scores_from_tally(self.base, tally, req.method, dtype=self._engine_dtype())
        sizes = req.sizes
        if req.budget is not None:
            sizes = budget_sizes(scores.scores, scores.routed, req.budget)
        spec = scores.to_subset(req.size, fraction=req.fraction, sizes=sizes, name=req.name, checkpoint=self.base)
        spec.provenance.details.update(scored_by="traffic", from_traffic={
            "model": source.model, "user": source.user, "window": window, "tokens": tally.seen})
        return spec, scores

    async def _observed(self, model: str, window: float | None, user: str | None, *, field: str = ""
                        ) -> tuple[float | None, Tally]:
        """(window, tally) of `model`'s traffic, freshly collected: over `window` seconds, of one
        `user`, or all of it. `field` prefixes the request fields an error names."""
        collector = self._routing_on()
        window = check_window(window, self.settings.routing_retention, param=f"{field}window")
        if window is not None and user is not None:
            raise InvalidInput(f"{field.rstrip('.') + ': ' if field else ''}give `window` or `user`, not both "
                               "(users are counted over all time)", param=f"{field}window")
        await collector.collect()
        await self.pull_fleet()
        tally = collector.tally(model, window=window, user=user, now=time.time())
        if user is not None and tally.seen == 0:
            raise NotEnoughTraffic(f"no traffic from user {user!r} to `{model}` has been observed (of the "
                                   f"users seen, the {self.settings.routing_max_users} most recent are kept by name)",
                                   param=f"{field}user")
        return window, tally

    def _engine_dtype(self) -> str:
        return self.settings.dtype if self.settings.dtype != "auto" else str(self.base.config.torch_dtype or "auto")

    # -- routing statistics --------------------------------------------------------------------
    def _router(self, model: str) -> str:
        """How much of the base's router the model's engine holds (see `Drift.router`): a shared
        engine always holds all of it (expert slots included); a dedicated one only its subset's."""
        return "full" if isinstance(self.placement, SharedPlacement) else "none"

    async def fresh_routing(self) -> None:
        """Collect the engines' counts unless the last collection is under `FRESH_SECONDS` old
        (and the other replicas' saved counts, with a shared store)."""
        if self.routing is not None:
            await self.routing.refresh(max_age=FRESH_SECONDS, wait=FRESH_WAIT_SECONDS)
            await self.pull_fleet()

    async def pull_fleet(self) -> None:
        """The other replicas' counts from a shared store (at most once per `FRESH_SECONDS`); a
        store that is down leaves the last ones."""
        if self.routing is not None:
            try:
                await self.routing.pull([self.base_id, *self.registry.records], max_age=FRESH_SECONDS)
            except Unavailable as exc:
                log.warning("could not read the other replicas' routing counters", extra={"error": str(exc)})

    def drift(self, name: str, window: float | None = None) -> Drift | None:
        """As of the last collection (`collected_at`; `fresh_routing` first for a fresh one)."""
        if self.routing is None:
            return None
        tally = self.routing.tally(name, window=window, now=time.time())
        router = self._router(name)
        return Drift(mass_outside=tally.drift if router != "none" else None, tokens=tally.seen, window=window,
                     router=router, collected_at=self.routing.collected_at)

    def _routing_model(self, model: str) -> tuple[str, list[list[int]] | None]:
        """(kind, kept experts) of a model with routing statistics, or 404."""
        if model == self.base_id:
            return "base", None
        record = self.registry.records.get(model)
        if record is None:
            raise UnknownModel(model)
        return "subset", record.spec.experts if record.spec is not None else None

    async def routing_of(self, model: str, *, window: float | None, user: str | None) -> tuple[ModelRouting, Tally]:
        kind, kept = self._routing_model(model)
        window, tally = await self._observed(model, window, user)
        collector = self._routing_on()
        means = tally.scores("usage")
        layers = [LayerRoutingStats(layer=i, tokens=int(tally.tokens[i]), counts=tally.counts[i].tolist(),
                                    mass=means[i], kept=kept[i] if kept else None)
                  for i in range(len(tally.tokens))]
        drift = self.drift(model, window) if kind == "subset" else None
        series = [DriftPoint(start=start, mass_outside=t.drift, tokens=t.seen) for start, t in collector.series(model)]
        return ModelRouting(model=model, kind=kind, window=window, user=user, since=collector.since(model),
                            tokens=tally.seen, layers=layers, drift=drift, drift_series=series), tally

    async def routing_heatmap(self, model: str, *, window: float | None, user: str | None) -> Heatmap:
        """What the routing heatmap of `model` shows now (drawn by `HeatmapCache` only when that changed)."""
        stats, tally = await self.routing_of(model, window=window, user=user)
        cfg = self.base.config
        kept = [layer.kept or [] for layer in stats.layers] if stats.kind == "subset" else None
        shared = [cfg.layer_routing(i).shared_ids for i in range(cfg.num_hidden_layers)]
        what = f"{user!r}'s" if user else ("the last " + f"{window:g} s of" if window else "all")
        title = f"{model}: router mass per expert, {what} traffic ({stats.tokens} tokens)"
        return Heatmap(scores=tally.scores("usage"), kept=kept, shared=shared, title=title,
                       experts_per_layer=cfg.experts_per_layer)


__all__ = ["LiveRouting", "RoutingCaptureOff"]
