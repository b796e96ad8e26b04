"""The service's subsets: create (from expert ids, examples, or traffic), read, delete, load and
unload, each change through the store (`store_calls`: the state dir, or a database a fleet of
replicas shares) before this replica's records, engines and counters.

A mixin of `EmoService` (service.py), which owns the state declared here; kept apart so each file
holds one job: service.py the server's life cycle, models and engines, this file the catalogue of
subsets, live_routing.py what routing capture feeds.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from typing import Any, cast

from ..engines import EngineState, ModelUnavailable, SharedPlacement, engine_platform
from ..engines.slots import SubsetTooLarge
from ..errors import Busy, Unavailable
from ..examples import load_examples
from ..metrics import Metrics
from ..plot import Heatmap
from ..profiler import ProfileError, Scores
from ..selection import SelectionRequest
from ..store import SubsetRecord, SubsetState
from ..subset import SubsetSpec, make_subset
from . import store_calls
from .jobs import ProfilingJobs
from .live_routing import LiveRouting
from .protocol import ExpertCounts, SubsetCreate, SubsetObject
from .store_sync import CatalogueSync

log = logging.getLogger(__name__)

_ENGINE_TO_SUBSET = {EngineState.STARTING: SubsetState.LOADING, EngineState.READY: SubsetState.LOADED,
                     EngineState.FAILED: SubsetState.FAILED}


class SubsetUnavailable(ModelUnavailable):
    pass


class SubsetCatalogue(LiveRouting):
    """Subset-facing parts of `EmoService`; the attributes below are the service's."""

    metrics: Metrics
    catalogue_sync: CatalogueSync | None

    async def lookup(self, name: str) -> None:
        """Ask a shared store about a subset this replica may hold stale: one it has not seen yet
        (made on another replica since the last poll), or another replica's job it last saw
        profiling (which may be ready since), so that a request naming it never meets a 404 or a
        "still profiling" the store no longer says."""
        if self.catalogue_sync is not None and name != self.base_id and self.catalogue_sync.stale(name):
            await self.catalogue_sync.fetch(name)

    # -- subsets -------------------------------------------------------------------------------
    def _subset_state(self, r: SubsetRecord) -> SubsetState:
        if r.state is not SubsetState.READY:
            return r.state
        state = self.placement.model_state(r.name)
        return _ENGINE_TO_SUBSET.get(state, SubsetState.READY) if state else SubsetState.READY

    def subset(self, name: str, *, window: float | None = None) -> SubsetObject:
        r = self.registry.get(name)
        engine = self.placement.engine_of(name)
        state = self._subset_state(r)
        error = r.error or (engine.error if engine and state is SubsetState.FAILED else None)
        out = SubsetObject(id=r.name, state=state.value, created=r.created, base=self.base_id,
                           base_fingerprint=self.base.fingerprint, error=error,
                           profile_seconds=r.profile_seconds,
                           engine=engine.info() if engine and engine.state is not EngineState.STOPPED else None,
                           engine_id=engine.model_id if engine else None,
                           resident_experts=self.placement.resident_of(name)
                           if isinstance(self.placement, SharedPlacement) else None,
                           drift=self.drift(name, window))
        if r.spec is not None and r.sizes is not None:
            p = r.spec.provenance
            out.scored_by = (p.details or {}).get("scored_by") or ("profiler" if p.example_fingerprints else None)
            out.experts, out.experts_per_layer = r.spec.experts, [len(e) for e in r.spec.experts]
            out.params = ExpertCounts(subset=r.sizes["subset_params"], base=r.sizes["base_params"])
            out.bytes = ExpertCounts(subset=r.sizes["subset_bytes"], base=r.sizes["base_bytes"])
            out.method, out.size, out.fraction = p.method, p.size, p.fraction
            out.example_fingerprints = p.example_fingerprints
            quality = (p.details or {}).get("quality")
            if isinstance(quality, dict):
                out.quality, out.max_loss_increase, out.budget = (quality, quality.get("max_loss_increase"),
                                                                  quality.get("budget"))
        elif r.job:
            out.method, out.fraction = r.job["method"], r.job.get("fraction")
            out.size = r.job.get("size") or r.job.get("sizes")
            out.max_loss_increase, out.budget = r.job.get("max_loss_increase"), r.job.get("budget")
            out.example_fingerprints = r.job["example_fingerprints"]
        return out

    def subsets(self) -> list[SubsetObject]:
        return [self.subset(n) for n in sorted(self.registry.records)]

    async def create_subset(self, req: SubsetCreate) -> tuple[bool, SubsetObject]:
        """Returns (immediate, subset): explicit ids are ready at once, examples are profiled."""
        self.registry.reserve(req.name)
        if req.experts is not None:
            n = self.base.config.num_hidden_layers
            flat = all(isinstance(x, int) for x in req.experts)
            # pydantic parsed one of the two shapes `experts` allows; `flat` says which.
            routed = cast(list[list[int]], [list(req.experts)] * n if flat else req.experts)
            spec = make_subset(self.base, [list(ids) for ids in routed], req.name)
            self.placement.check_servable(req.name, spec.experts)
            record = await self._build_now(spec, {"method": "explicit"})
            await self._subset_ready(record, load=req.load)
            return True, self.subset(req.name)
        if req.from_traffic is not None:
            spec, scores = await self._subset_from_traffic(req, req.from_traffic)
            self.placement.check_servable(req.name, spec.experts)
            record = await self._build_now(spec, {"method": req.method, "from_traffic": req.from_traffic.model},
                                           scores=scores)
            await self._subset_ready(record, load=req.load)
            return True, self.subset(req.name)
        s = self.settings
        examples = load_examples(req.example_items(), max_examples=s.max_examples, max_chars=s.max_example_chars)
        request = self._selection(req)
        request.check(self.base.config)  # a request the base can't satisfy is a 400 now, not a failure later
        t0 = time.monotonic()
        sequences, warnings = await self._example_sequences(req, examples)
        live = await self._subset_from_live_engine(req, request, examples, sequences, warnings)
        if live is not None:
            self.placement.check_servable(req.name, live[0].experts)
            record = await self._build_now(live[0], {"method": req.method, "example_fingerprints":
                                                     [ex.fingerprint for ex in examples]}, scores=live[1])
            record.profile_seconds = round(time.monotonic() - t0, 3)
            self.metrics.profiling.labels(req.method).observe(record.profile_seconds)
            await self._subset_ready(record, load=req.load)
            return True, self.subset(req.name)
        load = req.load

        async def done(record: SubsetRecord) -> None:
            await self._subset_ready(record, load=load)

        self.jobs.admit()
        record = self.registry.begin(req.name, ProfilingJobs.describe(examples, request))
        await store_calls.claim(self.registry, record)  # 409: another replica holds the name; 503: store down
        try:
            self.jobs.start(req.name, examples, request, on_done=done, record=record,
                            on_seconds=lambda m, sec: self.metrics.profiling.labels(m).observe(sec))
        except BaseException:
            await self._abandon(record)
            raise
        return False, self.subset(req.name)

    async def _abandon(self, record: SubsetRecord) -> None:
        """Drop a subset that was never made, and its claim in the store (which a database that is
        down keeps until its heartbeat goes stale and any replica fails it)."""
        try:
            await store_calls.abandon(self.registry, record)
        except Unavailable as exc:
            log.warning("could not release a claim in the store", extra={"subset": record.name, "error": str(exc)})

    def _selection(self, req: SubsetCreate) -> SelectionRequest:
        s = self.settings
        device = s.device if s.device != "auto" else ("cuda" if engine_platform() == "cuda" else "cpu")
        return SelectionRequest(
            method=req.method, size=req.size, fraction=req.fraction,
            sizes=tuple(req.sizes) if req.sizes is not None else None, max_loss_increase=req.max_loss_increase,
            budget=req.budget, folds=req.folds, device=device, dtype="float32" if device == "cpu" else "bfloat16",
            max_tokens_per_example=req.max_tokens_per_example, seed=req.seed)

    async def _build_now(self, spec: SubsetSpec, job: dict[str, Any], *, scores: Scores | None = None) -> SubsetRecord:
        """Write a subset chosen without a profiling job, off the event loop (materializing reads
        the base's config and tokenizer, perhaps remotely); the name is held meanwhile, as while
        profiling."""
        record = self.registry.begin(spec.name, {"examples": 0, "example_fingerprints": [], **job})
        staging = self.registry.staging_dir(spec.name)
        try:
            await store_calls.claim(self.registry, record)  # 409 when another replica holds the name
            built = await asyncio.to_thread(self.registry.build, spec, save=False, model_dir=staging)
            await store_calls.publish(self.registry, record, built, scores.to_json() + "\n" if scores else None)
        except BaseException:
            await self._abandon(record)
            raise
        finally:
            if staging.exists():
                await asyncio.to_thread(shutil.rmtree, staging, ignore_errors=True)
        return record

    def subset_scores(self, name: str) -> Scores | None:
        """The scores a subset was chosen by, if one profiling run (or traffic) chose it; reads the
        catalog (a database, perhaps): call it off the event loop."""
        self.registry.get(name)
        try:
            text = self.registry.scores(name)
            return Scores.parse(text, source=self.registry.scores_source(name)) if text is not None else None
        except ProfileError as exc:  # damaged on disk: the subset itself is fine
            log.warning("unreadable scores", extra={"subset": name, "error": str(exc)})
            return None

    def scores_absent(self, name: str) -> str:
        """Why the subset `name` has no scores to show (the 404 of `GET /v1/subsets/{name}/scores`)."""
        record = self.registry.get(name)
        if record.spec is None:
            return f"the subset `{name}` is {record.state.value}; it has no scores" + (
                "" if record.state is SubsetState.FAILED else " yet")
        return f"the subset `{name}` {self._unscored(record.spec)}"

    @staticmethod
    def _unscored(spec: SubsetSpec) -> str:
        """How a subset without a scores file was chosen, as the end of a sentence."""
        p = spec.provenance
        quality = (p.details or {}).get("quality")
        if isinstance(quality, dict):
            # `sizing.auto_subset` ranks by `method` scores of every example but keeps only the subset.
            given = ("max_loss_increase", "budget")
            sized = ", ".join(f"{k} {quality[k]}" for k in given if quality.get(k) is not None)
            return (f"was sized by measured quality ({sized}; a {quality.get('estimate')} estimate over "
                    f"{quality.get('examples')} examples, in `quality` of GET /v1/subsets/{spec.name}): its experts "
                    f"are the top of `{p.method}` scores of its examples, which are not kept")
        if p.method == "explicit":
            return "was not chosen by scores (explicit expert ids)"
        return f"was chosen by `{p.method}` scores, which this server does not hold (missing or unreadable)"

    async def subset_scores_heatmap(self, name: str) -> Heatmap:
        """The subset's scores with its experts marked (its kept experts alone when it has no
        scores); drawn by `HeatmapCache` once per subset."""
        record = self.registry.get(name)
        if record.spec is None:
            raise SubsetUnavailable(f"the subset `{name}` is {record.state.value}; it has no experts yet")
        scores = await asyncio.to_thread(self.subset_scores, name)
        cfg = self.base.config
        shared = [cfg.layer_routing(i).shared_ids for i in range(cfg.num_hidden_layers)]
        method = record.spec.provenance.method
        what = (f"{scores.method} scores" if scores else
                "kept experts " + ("(explicit ids)" if method == "explicit" else f"({method} scores not kept)"))
        return Heatmap(scores=scores.scores if scores else None, kept=record.spec.experts, shared=shared,
                       title=f"{name}: {what}", experts_per_layer=cfg.experts_per_layer)

    async def subset_ready(self, record: SubsetRecord) -> None:
        """Serve a subset another replica made (its mask row; its experts load on first request)."""
        await self._subset_ready(record, load=False)

    async def _subset_ready(self, record: SubsetRecord, *, load: bool) -> None:
        if record.state is not SubsetState.READY:
            return
        assert record.spec is not None
        try:
            await self.placement.add_subset(record.name, record.spec.experts, str(record.model_dir))
        except SubsetTooLarge as exc:  # a profiled subset larger than the slots: kept, not served
            record.state, record.error = SubsetState.FAILED, str(exc)
            return
        if load:
            try:
                await self.placement.load(record.name)
            except (Busy, Unavailable) as exc:  # no free slot: the subset stays ready; say why
                log.warning("could not load subset", extra={"subset": record.name, "error": str(exc)})

    async def delete_subset(self, name: str, *, force: bool) -> None:
        """Delete `name` everywhere: the store first (a database that is down refuses it with a 503
        and nothing changes), then this replica's job, mask row or engine, files and counters;
        other replicas see it gone at their next poll of a shared store."""
        await self.lookup(name)
        async with store_calls.changes(self.registry):
            self.registry.get(name)
            if self.placement.placed(name):
                self.placement.check_removable(name, force=force)
            await store_calls.call(self.registry, self.registry.catalog.delete, name)
            await self.forget_subset(name, force=force)

    async def forget_subset(self, name: str, *, force: bool = True) -> None:
        """Drop this replica's side of a subset the store no longer keeps."""
        self.jobs.cancel(name)  # a queued job never starts; a running one's result is dropped
        if self.placement.placed(name):
            await self.placement.remove(name, force=force)
        self.registry.forget(name)
        if self.routing is not None:
            self.routing.forget(name)

    def _servable(self, name: str) -> None:
        r = self.registry.get(name)
        if r.state is not SubsetState.READY:
            raise SubsetUnavailable(f"the subset `{name}` is {r.state.value}"
                                    + (f": {r.error}" if r.error else "; retry when it is ready"))

    async def load_subset(self, name: str) -> SubsetObject:
        await self.lookup(name)
        self._servable(name)
        await self.placement.load(name)
        return self.subset(name)

    async def unload_subset(self, name: str, *, force: bool) -> SubsetObject:
        await self.lookup(name)
        self._servable(name)
        await self.placement.unload(name, force=force)
        return self.subset(name)
