"""Which engine serves each model, and how a request names its subset there.

Two placements, chosen by `--engine-mode`:

* `DedicatedPlacement`: one engine per model (base or subset), each loading only its own
  experts. What per-task Kubernetes endpoints run.
* `SharedPlacement`: one engine holds the non-expert weights once, every router, and either
  every expert (the base is served) or a fixed number of routed-expert slots per layer
  (`--expert-slots`, `emo_vllm.slots`); each subset is a mask row of that engine
  (`emo_vllm.masks`), chosen per request through `vllm_xargs`, with its own prefix-cache salt.
  Like vLLM's LoRA slots, rows are installed by a control call between engine steps, on demand.
  With slots, a subset whose experts are not all resident gets them loaded into free or least
  recently used slots while the engine keeps serving the others (`slots.SlotTable`); its
  requests wait for the load, and routing stays in base ids, so nothing is ever rebuilt.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from .manager import Engine, EngineManager, EngineState, Lease, ModelInUse, ModelUnavailable, UnknownModel
from .process import EngineProcess, EngineStartError
from .slots import LoadPlan, SlotTable

log = logging.getLogger(__name__)

# The plugin's names (emo_vllm.masks); repeated here so the front end never imports vLLM.
WORKER_EXTENSION = "emo_vllm.worker.EmoWorkerExtension"
ROW_ARG = "emo_subset_row"
SLOTS_CONFIG = "emo_subset_slots"
EXPERT_SLOTS_CONFIG = "emo_expert_slots"  # emo_vllm.slots: routed-expert slots per layer
USAGE_CONFIG = "emo_usage"  # emo_vllm.usage: routing capture on
MODEL_ARG, USER_ARG = "emo_model", "emo_user"  # emo_vllm.usage: whose tokens a request's are
BASE_SALT = "emo-base"

SLOTS_ENGINE = "emo-shared"  # the engine's id when the base is not served
STAGE_POLL_SECONDS = 0.02  # how often a load asks the engine whether its experts are read

Experts = list[list[int]]  # per layer, sorted original expert ids (shared ones included)
# (engine id, plan, bytes read, seconds) after each load: the server's metrics
LoadObserver = Callable[[str, LoadPlan, int, float], None]


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
    async def add_subset(self, name: str, experts: Experts, model_dir: str) -> None: ...

    def check_servable(self, name: str, experts: Experts) -> None:  # noqa: B027 (most placements serve any)
        """Raise (400) if this placement could never serve the subset."""

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

    def check_removable(self, model: str, *, force: bool) -> None:
        """Raise what `remove` would for a model in use (409), before anything else is changed."""
        self._refuse_busy(model, force)

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

    async def add_subset(self, name: str, experts: Experts, model_dir: str) -> None:
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
    """Every model on one shared engine: the base's when it is served, else one with expert slots."""

    mode = "shared"

    def __init__(self, manager: EngineManager, *, slots: int, engine_config: dict[str, object] | None = None,
                 expert_slots: SlotTable | None = None, on_expert_load: LoadObserver | None = None) -> None:
        super().__init__(manager, engine_config=engine_config)
        self.slots = slots
        self.expert_slots = expert_slots
        self._on_expert_load = on_expert_load
        self.engine_id: str | None = None
        self.base_id: str | None = None
        self.subsets: dict[str, _Subset] = {}
        self.installed: set[str] = set()  # subsets with a mask row on the engine
        self._row_lock = asyncio.Lock()
        self._load_lock = asyncio.Lock()
        self._salt_counter = 0

    # -- the engine --------------------------------------------------------------------------
    def _register_shared(self, engine_id: str, model_dir: str) -> Engine:
        config: dict[str, object] = {**self.engine_config, SLOTS_CONFIG: self.slots}
        if self.expert_slots is not None:
            config[EXPERT_SLOTS_CONFIG] = self.expert_slots.slots
        self.engine_id = engine_id
        return self._register(engine_id, model_dir, config)

    def add_base(self, base_id: str, model_dir: str) -> None:
        if self.expert_slots is not None:
            raise ValueError("the base is served with every expert resident, not through expert slots")
        self.base_id = base_id
        self._register_shared(base_id, model_dir)

    def add_slots_engine(self, model_dir: str) -> None:
        """The engine of a server that does not serve the base: `model_dir` is a manifest of the
        whole base, from which the engine reads all but the routed experts at start."""
        assert self.expert_slots is not None and self.base_id is None
        self._register_shared(SLOTS_ENGINE, model_dir)

    async def on_started(self, engine: Engine, proc: EngineProcess) -> None:
        """Before the engine is marked ready: hook the runner. No row is installed and no slot
        filled yet (a restart after a crash starts empty; rows and experts return on demand)."""
        if engine.model_id != self.engine_id:
            return
        try:
            info = await proc.rpc("emo_masks_attach")
            if self.expert_slots is not None:
                info.append(await proc.rpc("emo_slots_info"))
        except EngineStartError:
            raise
        except Exception as exc:  # aiohttp or JSON errors: the engine is not usable for masks
            raise EngineStartError(f"the engine of `{engine.model_id}` could not install its mask hook",
                                   repr(exc)) from exc
        self.installed = set()
        if self.expert_slots is not None:
            self.expert_slots.reset()
        log.info("shared engine ready for masks", extra={"engine": engine.model_id, "masks": info})

    def resident_experts(self) -> int | None:
        """Routed experts in the engine's slots, summed over layers (None: the whole base)."""
        return None if self.expert_slots is None else self.expert_slots.count()

    def resident_of(self, name: str) -> Experts | None:
        """Which of a subset's routed experts are in slots (None: all, the base being resident)."""
        sub = self.subsets.get(name)
        if sub is None or self.expert_slots is None:
            return None
        return self.expert_slots.resident(sub.experts)

    # -- models ------------------------------------------------------------------------------
    def _free_row(self) -> int:
        used = {s.row for s in self.subsets.values()}
        for row in range(1, self.slots):
            if row not in used:
                return row
        raise ModelInUse(f"all {self.slots - 1} subset slots of the shared engine are taken; "
                         "delete a subset or raise --subset-slots")

    def check_servable(self, name: str, experts: Experts) -> None:
        if self.expert_slots is not None:
            self.expert_slots.check_fits(experts, where=f"subset `{name}`")

    async def add_subset(self, name: str, experts: Experts, model_dir: str) -> None:
        """Give `name` a mask row on the engine (installed by its first request)."""
        self.check_servable(name, experts)
        assert self.engine_id is not None, "the engine is registered first"
        self._salt_counter += 1
        self.subsets[name] = _Subset(experts, self._free_row(), f"emo-subset-{name}-{self._salt_counter}")

    async def remove(self, name: str, *, force: bool) -> None:
        self._refuse_busy(name, force)
        await self._uninstall(name)
        self.subsets.pop(name, None)

    async def unload(self, model: str, *, force: bool) -> None:
        """A subset's unload clears its mask row (the engine keeps serving the others; its
        experts stay in their slots until others need them)."""
        self._refuse_busy(model, force)
        if model in self.subsets:
            await self._uninstall(model)

    async def _uninstall(self, name: str) -> None:
        sub = self.subsets.get(name)
        if sub is None or name not in self.installed:
            return
        engine = self.engine_of(name)
        async with self._row_lock:
            self.installed.discard(name)
            if engine is not None and engine.state is EngineState.READY and engine.proc is not None:
                try:
                    await engine.proc.rpc("emo_clear_subset", str(sub.row))
                except (EngineStartError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    # The row is free on our side either way: its next owner's install
                    # overwrites it, and a restarted engine starts with an empty table.
                    log.warning("could not clear a mask row", extra={"engine": engine.model_id, "subset": name,
                                                                     "error": repr(exc)})

    async def _install(self, lease: Lease, name: str) -> None:
        """Put `name`'s mask row (in base expert ids) on the engine if it is not there yet."""
        sub = self.subsets[name]
        async with self._row_lock:
            if name in self.installed:
                return
            kept = {str(i): ids for i, ids in enumerate(sub.experts) if ids}
            await lease.proc.rpc("emo_set_subset", str(sub.row), name, json.dumps(kept))
            self.installed.add(name)
        log.info("mask row installed", extra={"engine": lease.engine.model_id, "subset": name, "row": sub.row})

    # -- expert slots ------------------------------------------------------------------------
    def _pinned(self) -> set[tuple[int, int]]:
        """(layer, base id) of every expert a subset with requests admitted to the engine needs
        (not those still waiting for their own experts: two subsets waiting for each other's
        slots would wait forever)."""
        busy = {lease.model for e in self.manager.engines.values() for lease in e.leases if ROW_ARG in lease.extra}
        return {(layer, e) for name in busy if (sub := self.subsets.get(name)) is not None
                for layer, ids in enumerate(sub.experts) for e in ids}

    async def _ensure_resident(self, lease: Lease, name: str, deadline: float) -> None:
        """Wait until `name`'s routed experts are all in slots, loading them (one load at a time,
        evicting the least recently used experts no busy subset needs) as needed."""
        table, experts = self.expert_slots, self.subsets[name].experts
        if table is None:
            return
        while not table.is_resident(experts):
            async with self._load_lock:
                if table.is_resident(experts):
                    break
                plan = table.plan(experts, self._pinned())
                if isinstance(plan, LoadPlan):
                    # Shielded: a client that gives up must not leave a half-done load behind.
                    await asyncio.shield(self._load(lease, name, plan))
                    continue
            if not await self.manager.wait_for_change(deadline):
                raise ModelUnavailable(f"the experts of `{name}` could not be loaded in time: every expert slot "
                                       f"of layer {plan} holds an expert that subsets with requests in flight "
                                       "need; retry later or raise --expert-slots")
        table.touch(experts)

    async def _load(self, lease: Lease, name: str, plan: LoadPlan) -> None:
        """Read the planned experts on the engine's staging thread, then copy them into their
        slots between steps; the engine keeps serving meanwhile."""
        table = self.expert_slots
        assert table is not None
        table.begin(plan)
        ok, t0 = False, time.monotonic()
        try:
            await lease.proc.rpc("emo_slots_stage", json.dumps(plan.wire()))
            while True:
                [answer] = await lease.proc.rpc("emo_slots_commit")
                if answer["state"] == "committed":
                    break
                if answer["state"] != "loading":
                    log.error("loading experts failed", extra={"subset": name, "answer": answer})
                    raise ModelUnavailable(f"the experts of `{name}` could not be loaded; see the server log")
                await asyncio.sleep(STAGE_POLL_SECONDS)
            ok = True
        finally:
            table.finish(plan, ok=ok)
            self.manager.notify()
        seconds = time.monotonic() - t0
        log.info("experts loaded into slots", extra={"engine": lease.engine.model_id, "subset": name,
                                                     "experts": plan.experts, "evicted": plan.evictions,
                                                     "bytes": answer["bytes"], "seconds": round(seconds, 3)})
        if self._on_expert_load is not None:
            self._on_expert_load(lease.engine.model_id, plan, int(answer["bytes"]), seconds)

    # -- requests ----------------------------------------------------------------------------
    async def acquire(self, model: str) -> Lease:
        if self.engine_id is None or (model not in self.subsets and model != self.base_id):
            raise UnknownModel(model)
        deadline = time.monotonic() + self.manager.wait_timeout
        lease = await self.manager.acquire(self.engine_id, model=model)
        sub = self.subsets.get(model)
        if sub is None:
            lease.salt = BASE_SALT
            return lease
        try:
            await self._ensure_resident(lease, model, deadline)
            # Admitted: from here (no await since the check) its experts are pinned (`_pinned`).
            lease.extra = {ROW_ARG: sub.row}
            await self._install(lease, model)
        except EngineStartError:  # a dead engine refuses control calls: 503, and it restarts
            lease.release()
            await lease.check_engine()
            raise
        except BaseException:
            lease.release()
            raise
        lease.salt = sub.salt
        return lease

    async def load(self, model: str) -> None:
        """Start the engine and, for a subset, load its experts and install its row once the
        engine is ready."""
        if self.engine_id is None or (model not in self.subsets and model != self.base_id):
            raise UnknownModel(model)
        engine = await self.manager.load(self.engine_id)
        if model in self.subsets and engine.state is EngineState.READY:
            (await self.acquire(model)).release()

    def engine_of(self, model: str) -> Engine | None:
        if self.engine_id is None or (model not in self.subsets and model != self.base_id):
            return None
        return self.manager.get(self.engine_id)

    def model_state(self, model: str) -> EngineState | None:
        engine = self.engine_of(model)
        if engine is None:
            return None
        if model in self.subsets and engine.state is EngineState.READY:
            sub = self.subsets[model]
            servable = model in self.installed and (self.expert_slots is None
                                                    or self.expert_slots.is_resident(sub.experts))
            return EngineState.READY if servable else EngineState.STOPPED
        return engine.state
