"""Which engine serves each model, and how a request names its subset there.

Two placements, chosen by `--engine-mode`:

* `DedicatedPlacement`: one engine per model (base or subset), each loading only its own
  experts. What per-task Kubernetes endpoints run.
* `SharedPlacement`: one engine holds the non-expert weights once and a set of resident experts
  (all of them when the base is served, else the union of the subsets placed on it); each subset
  is a mask row of that engine (`emo_vllm.masks`), chosen per request through `vllm_xargs`, with
  its own prefix-cache salt. Like vLLM's LoRA slots, rows are installed by a control call
  between engine steps, on demand, so a subset of resident experts is servable at once.

  A subset that needs experts the running engine lacks gets a new engine built for the larger
  union in the background, while the old one keeps serving; models move to the new engine once
  it is ready, and the old one stops after its in-flight requests finish. Why not hot-add into
  spare slots: vLLM's CPU fused-MoE prepacks expert weights after loading
  (`process_weights_after_loading`), and `reload_weights` rebuilds layers, so writing into a
  running engine's expert tensors depends on kernel layouts that differ by platform and release.
  A second engine for a minute costs memory once; it never touches weights in use.
"""

from __future__ import annotations

import asyncio
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from .manager import Engine, EngineManager, EngineState, Lease, ModelInUse, UnknownModel
from .process import EngineProcess, EngineStartError

log = logging.getLogger(__name__)

# The plugin's names (emo_vllm.masks); repeated here so the front end never imports vLLM.
WORKER_EXTENSION = "emo_vllm.worker.EmoWorkerExtension"
ROW_ARG = "emo_subset_row"
SLOTS_CONFIG = "emo_subset_slots"
USAGE_CONFIG = "emo_usage"  # emo_vllm.usage: routing capture on
MODEL_ARG, USER_ARG = "emo_model", "emo_user"  # emo_vllm.usage: whose tokens a request's are
BASE_SALT = "emo-base"

Experts = list[list[int]]  # per layer, sorted original expert ids (shared ones included)
EngineDirMaker = Callable[[Experts, str], str]  # (union of experts, engine id) -> model dir


class Placement(ABC):
    """The interface the service uses; both placements implement it."""

    mode: str

    def __init__(self, manager: EngineManager, *, engine_config: dict[str, object] | None = None) -> None:
        self.manager = manager
        # vLLM `--additional-config` every engine gets (e.g. routing capture on).
        self.engine_config = dict(engine_config or {})

    def _register(self, engine_id: str, model_dir: str, config: dict[str, object]) -> Engine:
        """Register an engine; with a plugin config it gets the plugin's control calls too
        (`/collective_rpc` exists only in vLLM's dev mode; the engine listens on a private Unix
        socket and the front end relays only the OpenAI routes, so no client can reach it)."""
        if not config:
            return self.manager.register(engine_id, model_dir)
        return self.manager.register(engine_id, model_dir, env={"VLLM_SERVER_DEV_MODE": "1"}, extra_args=(
            "--worker-extension-cls", WORKER_EXTENSION, "--additional-config", json.dumps(config)))

    def local_ids(self, engine_id: str) -> Experts | None:
        """Base ids of an engine's experts, per layer, in the engine's order (None: the engine
        numbers them as the base does)."""
        return None

    @abstractmethod
    def add_base(self, base_id: str, model_dir: str) -> None: ...

    @abstractmethod
    async def add_subset(self, name: str, experts: Experts, model_dir: str, *, grow: bool = True,
                         start: bool = False) -> None: ...

    @abstractmethod
    async def remove(self, name: str, *, force: bool) -> None: ...

    @abstractmethod
    async def acquire(self, model: str) -> Lease: ...

    @abstractmethod
    async def load(self, model: str) -> None: ...

    @abstractmethod
    async def unload(self, model: str, *, force: bool) -> None: ...

    @abstractmethod
    def engine_of(self, model: str) -> Engine | None: ...

    def model_state(self, model: str) -> EngineState | None:
        """The model's serving state: READY only when a request would be served at once."""
        engine = self.engine_of(model)
        return engine.state if engine is not None else None

    def placed(self, model: str) -> bool:
        return self.engine_of(model) is not None

    def leases_of(self, model: str) -> list[Lease]:
        return [lease for e in self.manager.engines.values() for lease in e.leases if lease.model == model]

    def _refuse_busy(self, model: str, force: bool) -> None:
        """409 while `model` has requests in flight, unless forced (then they are ended)."""
        leases = self.leases_of(model)
        if leases and not force:
            raise ModelInUse(f"the model `{model}` has {len(leases)} requests in flight; "
                             "retry when they finish or pass force=true")
        for lease in leases:
            lease.abort()


class DedicatedPlacement(Placement):
    """One engine per model: the engine's id is the model's."""

    mode = "dedicated"

    def __init__(self, manager: EngineManager, *, engine_config: dict[str, object] | None = None) -> None:
        super().__init__(manager, engine_config=engine_config)
        self.experts: dict[str, Experts] = {}  # subset engines: the subset's experts

    def add_base(self, base_id: str, model_dir: str) -> None:
        self._register(base_id, model_dir, self.engine_config)

    async def add_subset(self, name: str, experts: Experts, model_dir: str, *, grow: bool = True,
                         start: bool = False) -> None:
        self.experts[name] = experts
        self._register(name, model_dir, self.engine_config)

    def local_ids(self, engine_id: str) -> Experts | None:
        return self.experts.get(engine_id)

    async def remove(self, name: str, *, force: bool) -> None:
        if self.manager.get(name) is not None:
            await self.manager.unregister(name, force=force)
        self.experts.pop(name, None)

    async def acquire(self, model: str) -> Lease:
        return await self.manager.acquire(model)

    async def load(self, model: str) -> None:
        await self.manager.load(model)

    async def unload(self, model: str, *, force: bool) -> None:
        await self.manager.unload(model, force=force)

    def engine_of(self, model: str) -> Engine | None:
        return self.manager.get(model)


@dataclass
class _Subset:
    experts: Experts
    row: int
    salt: str


class SharedPlacement(Placement):
    """Every model on one shared engine (two while a larger union is being built)."""

    mode = "shared"

    def __init__(self, manager: EngineManager, *, slots: int, make_engine_dir: EngineDirMaker,
                 num_layers: int, engine_config: dict[str, object] | None = None) -> None:
        super().__init__(manager, engine_config=engine_config)
        self.slots = slots
        self._make_engine_dir = make_engine_dir
        self._num_layers = num_layers
        self.base_id: str | None = None
        self.subsets: dict[str, _Subset] = {}
        self.model_engine: dict[str, str] = {}        # model -> engine id
        self.resident: dict[str, Experts | None] = {}  # engine id -> its experts (None: all)
        self.installed: dict[str, set[str]] = {}       # engine id -> subsets with a mask row there
        self._locks: dict[str, asyncio.Lock] = {}
        self._generation = 0
        self._salt_counter = 0
        self._pending: asyncio.Task | None = None
        manager.max_engines = max(manager.max_engines, 2)  # the serving engine and its successor

    # -- engines -----------------------------------------------------------------------------
    def _register_shared(self, engine_id: str, model_dir: str, experts: Experts | None) -> Engine:
        engine = self._register(engine_id, model_dir, {**self.engine_config, SLOTS_CONFIG: self.slots})
        self.resident[engine_id] = experts
        self.installed[engine_id] = set()
        return engine

    async def on_started(self, engine: Engine, proc: EngineProcess) -> None:
        """Before an engine is marked ready: hook the runner; no row is installed yet (a restart
        after a crash starts with an empty table, so rows are installed again on demand)."""
        if engine.model_id not in self.resident:
            return
        try:
            info = await proc.rpc("emo_masks_attach")
        except EngineStartError:
            raise
        except Exception as exc:  # aiohttp or JSON errors: the engine is not usable for masks
            raise EngineStartError(f"the engine of `{engine.model_id}` could not install its mask hook",
                                   repr(exc)) from exc
        self.installed[engine.model_id] = set()
        log.info("shared engine ready for masks", extra={"engine": engine.model_id, "masks": info})

    def local_ids(self, engine_id: str) -> Experts | None:
        return self.resident.get(engine_id)

    def resident_experts(self, engine_id: str) -> int | None:
        """Experts held by an engine, summed over layers (None: the whole base)."""
        experts = self.resident.get(engine_id)
        return None if experts is None else sum(len(e) for e in experts)

    # -- models ------------------------------------------------------------------------------
    def add_base(self, base_id: str, model_dir: str) -> None:
        self.base_id = base_id
        self._register_shared(base_id, model_dir, None)
        self.model_engine[base_id] = base_id

    def _fits(self, engine_id: str, experts: Experts) -> bool:
        resident = self.resident.get(engine_id)
        return resident is None or all(set(e) <= set(r) for e, r in zip(experts, resident, strict=True))

    def _current(self) -> str | None:
        """The newest engine models are placed on (the base's when it is served)."""
        if self.base_id is not None:
            return self.base_id
        engines = [e for e in self.resident if e in self.manager.engines]
        return engines[-1] if engines else None

    def _free_row(self) -> int:
        used = {s.row for s in self.subsets.values()}
        for row in range(1, self.slots):
            if row not in used:
                return row
        raise ModelInUse(f"all {self.slots - 1} subset slots of the shared engine are taken; "
                         "delete a subset or raise --subset-slots")

    async def add_subset(self, name: str, experts: Experts, model_dir: str, *, grow: bool = True,
                         start: bool = False) -> None:
        """Give `name` a mask row on the current engine, or (unless `grow` is off, as while
        starting up) register an engine that holds its experts: started now if `start`, else by
        the first request for a model placed on it."""
        self._salt_counter += 1
        self.subsets[name] = _Subset(experts, self._free_row(), f"emo-subset-{name}-{self._salt_counter}")
        current = self._current()
        if current is not None and self._fits(current, experts):
            self.model_engine[name] = current
        elif grow:
            await self._grow(start=start)

    async def place_pending(self) -> None:
        """One engine for every subset added with `grow` off that no engine holds yet."""
        if any(name not in self.model_engine for name in self.subsets):
            await self._grow(start=False)

    async def _grow(self, *, start: bool) -> None:
        """Register an engine for the union of every subset; once it is ready (started now, or
        by the first request for a subset only it holds) every model moves onto it."""
        union = [sorted(set().union(*(s.experts[i] for s in self.subsets.values())))
                 for i in range(self._num_layers)]
        self._generation += 1
        engine_id = f"emo-shared-{self._generation}"
        model_dir = await asyncio.to_thread(self._make_engine_dir, union, engine_id)
        new = self._register_shared(engine_id, model_dir, union)
        previous = {m: e for m, e in self.model_engine.items()}
        for name, sub in self.subsets.items():  # those the old engine cannot serve wait for the new one
            if name not in previous or not self._fits(previous[name], sub.experts):
                self.model_engine[name] = engine_id
        log.info("a shared engine for a larger union of experts",
                 extra={"engine": engine_id, "experts": sum(len(e) for e in union), "starting": start})
        if start:
            await self.manager.load(engine_id)
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()
        self._pending = asyncio.create_task(self._switch_when_ready(new, set(previous.values())))

    async def _switch_when_ready(self, new: Engine, old_ids: set[str]) -> None:
        # Until it is ready (it may not be started yet, or be backing off after a failed start)
        # the old engine keeps serving every model it holds; a newer union cancels this task.
        while new.state is not EngineState.READY:
            if self.manager.get(new.model_id) is not new:
                return
            await asyncio.sleep(0.2)
        for name in self.subsets:
            self.model_engine[name] = new.model_id
        for engine_id in old_ids - {new.model_id}:
            await self._retire(engine_id)

    async def _retire(self, engine_id: str) -> None:
        """Stop an engine no model points at, once its in-flight requests have finished."""
        while True:
            engine = self.manager.get(engine_id)
            if engine is not None and engine.inflight:
                await asyncio.sleep(0.2)
                continue
            try:
                await self.manager.unregister(engine_id)
                break
            except ModelInUse:  # a request resolved before the switch got in after all
                continue
        log.info("retired shared engine", extra={"engine": engine_id})
        self.resident.pop(engine_id, None)
        self.installed.pop(engine_id, None)

    async def remove(self, name: str, *, force: bool) -> None:
        self._refuse_busy(name, force)
        await self._uninstall(name)
        self.subsets.pop(name, None)
        self.model_engine.pop(name, None)

    async def unload(self, model: str, *, force: bool) -> None:
        """A subset's unload clears its mask row (the engine keeps serving the others)."""
        self._refuse_busy(model, force)
        if model in self.subsets:
            await self._uninstall(model)

    async def _uninstall(self, name: str) -> None:
        sub = self.subsets.get(name)
        for engine_id, names in self.installed.items():
            engine = self.manager.get(engine_id)
            if sub is None or name not in names:
                continue
            async with self._lock(engine_id):
                names.discard(name)
                if engine is not None and engine.state is EngineState.READY and engine.proc is not None:
                    try:
                        await engine.proc.rpc("emo_clear_subset", str(sub.row))
                    except (EngineStartError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
                        # The row is free on our side either way: its next owner's install
                        # overwrites it, and a restarted engine starts with an empty table.
                        log.warning("could not clear a mask row", extra={"engine": engine_id, "subset": name,
                                                                         "error": repr(exc)})

    def _lock(self, engine_id: str) -> asyncio.Lock:
        return self._locks.setdefault(engine_id, asyncio.Lock())

    async def _install(self, lease: Lease, name: str) -> None:
        """Put `name`'s mask row on the leased engine if it is not there yet."""
        engine_id = lease.engine.model_id
        sub = self.subsets[name]
        async with self._lock(engine_id):
            names = self.installed.setdefault(engine_id, set())
            if name in names:
                return
            resident = self.resident.get(engine_id)
            # Engine-local ids: original ids on the base, positions in the union otherwise.
            kept = {str(i): (ids if resident is None else [resident[i].index(e) for e in ids])
                    for i, ids in enumerate(sub.experts) if ids}
            await lease.proc.rpc("emo_set_subset", str(sub.row), name, json.dumps(kept))
            names.add(name)
        log.info("mask row installed", extra={"engine": engine_id, "subset": name, "row": sub.row})

    async def acquire(self, model: str) -> Lease:
        engine_id = self.model_engine.get(model)
        if engine_id is None:
            raise UnknownModel(model)
        lease = await self.manager.acquire(engine_id, model=model)
        sub = self.subsets.get(model)
        if sub is None:
            lease.salt = BASE_SALT
            return lease
        try:
            await self._install(lease, model)
        except EngineStartError:  # a dead engine refuses control calls: 503, and it restarts
            lease.release()
            await lease.check_engine()
            raise
        except BaseException:
            lease.release()
            raise
        lease.extra, lease.salt = {ROW_ARG: sub.row}, sub.salt
        return lease

    async def load(self, model: str) -> None:
        """Start the model's engine and, for a subset, install its row once it is ready."""
        engine_id = self.model_engine.get(model)
        if engine_id is None:
            raise UnknownModel(model)
        engine = await self.manager.load(engine_id)
        if model in self.subsets and engine.state is EngineState.READY:
            (await self.acquire(model)).release()

    def engine_of(self, model: str) -> Engine | None:
        engine_id = self.model_engine.get(model)
        return self.manager.get(engine_id) if engine_id else None

    def model_state(self, model: str) -> EngineState | None:
        engine = self.engine_of(model)
        if engine is None:
            return None
        if model in self.subsets and engine.state is EngineState.READY:
            return EngineState.READY if model in self.installed.get(engine.model_id, ()) else EngineState.STOPPED
        return engine.state
