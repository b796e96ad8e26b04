"""The subset store of a running server: manifests in `<state-dir>/subsets/<name>.json` (written
atomically), a materialized manifest directory per subset for its engine, and the in-memory state
of each subset (`profiling`, `ready` or `failed`; `loading`/`loaded` come from the engines).

A restarted server reads the manifests back, so its subsets survive with no profiling redone.
Profiling runs on a worker thread, one job at a time (it is CPU/GPU-bound and the machine is
shared with the engines); its result is committed on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint
from .errors import EmoServeError, SubsetError
from .examples import Example
from .export import materialize_subset
from .config import EmoConfig
from .subset import MANIFEST_FILE, SubsetSpec, routed_ids, subset_sizes, validate_name

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".json"


class SubsetState(str, Enum):
    PROFILING = "profiling"
    READY = "ready"
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"


class SubsetNotFound(EmoServeError):
    pass


class NameTaken(EmoServeError):
    pass


@dataclass(frozen=True)
class SizeSelection:
    """How many routed experts to keep once experts are scored: exactly one of `size` (per
    layer), `fraction` (of each layer's routed experts) or `sizes` (a list, one per layer)."""

    size: int | None = None
    fraction: float | None = None
    sizes: tuple[int, ...] | None = None

    def layerwise_size(self) -> int | float | None:
        """What the `layerwise` method needs up front (it chooses greedily, layer by layer)."""
        if self.sizes is not None:
            raise SubsetError("method 'layerwise' needs `size` or `fraction`, not per-layer `sizes`")
        return self.size if self.size is not None else self.fraction

    def check(self, cfg: EmoConfig) -> None:
        """Raise SubsetError unless every layer of `cfg` can keep this many routed experts."""
        from .profiler import resolve_sizes

        counts = [len(routed_ids(cfg, i)) if cfg.experts_per_layer[i] else 0 for i in range(cfg.num_hidden_layers)]
        resolve_sizes(counts, size=self.size, fraction=self.fraction, sizes=self.sizes)

    def build(self, ckpt: Checkpoint, job: ProfileJob, name: str, dtype: str) -> SubsetSpec:
        """Score the experts on the job's examples, keep the asked-for count."""
        from .profiler import profile

        layerwise = self.layerwise_size() if job.method == "layerwise" else None
        scores = profile(ckpt, list(job.examples), method=job.method, device=job.device, dtype=dtype,
                         max_tokens_per_example=job.max_tokens_per_example, seed=job.seed,
                         layerwise_size=layerwise, progress=False)
        return scores.to_subset(self.size, fraction=self.fraction, sizes=self.sizes, name=name,
                                checkpoint=ckpt)

    def describe(self) -> dict[str, Any]:
        return _given(size=self.size, fraction=self.fraction, sizes=list(self.sizes) if self.sizes else None)


@dataclass(frozen=True)
class QualitySizing:
    """The size chosen by measured quality (`sizing.auto_subset`): the smallest subset within
    `max_loss_increase` (relative perplexity), or `budget` routed experts summed over layers
    placed where they lower the loss most; estimated on held-out folds of the examples."""

    max_loss_increase: float | None = None
    budget: int | None = None
    folds: int = 5

    def check(self, cfg: EmoConfig, method: str) -> None:
        """Raise SizingError now (a 400) for a request `auto_subset` would refuse later."""
        from .sizing import check_request

        check_request(cfg, max_loss_increase=self.max_loss_increase, budget=self.budget, method=method)

    def build(self, ckpt: Checkpoint, job: ProfileJob, name: str, dtype: str) -> SubsetSpec:
        from .sizing import auto_subset

        return auto_subset(ckpt, list(job.examples), name=name, max_loss_increase=self.max_loss_increase,
                           budget=self.budget, method=job.method, folds=self.folds, device=job.device,
                           dtype=dtype, max_tokens_per_example=job.max_tokens_per_example, seed=job.seed,
                           progress=False)

    def describe(self) -> dict[str, Any]:
        return _given(max_loss_increase=self.max_loss_increase, budget=self.budget)


def _given(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


@dataclass(frozen=True)
class ProfileJob:
    examples: Sequence[Example]
    method: str
    selection: SizeSelection | QualitySizing
    device: str
    max_tokens_per_example: int = 512
    seed: int = 0


@dataclass
class SubsetRecord:
    name: str
    state: SubsetState
    spec: SubsetSpec | None = None
    sizes: dict[str, int] | None = None
    error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    job: dict[str, Any] | None = None  # what profiling was asked for (while profiling / if failed)
    model_dir: Path | None = None
    profile_seconds: float | None = None


class SubsetRegistry:
    """Subsets of one base checkpoint, persisted under the server's state dir."""

    def __init__(self, base: Checkpoint, base_id: str, state_dir: Path) -> None:
        self.base, self.base_id = base, base_id
        self.subsets_dir = state_dir / "subsets"
        self.materialized_dir = state_dir / "materialized"
        self.subsets_dir.mkdir(parents=True, exist_ok=True)
        self.materialized_dir.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, SubsetRecord] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emo-profile")
        self._jobs: set[asyncio.Task] = set()

    # -- paths (names cannot escape the state dir) ---------------------------------------------
    def _child(self, parent: Path, name: str, suffix: str = "") -> Path:
        validate_name(name)
        path = parent / f"{name}{suffix}"
        if path.is_symlink() or path.resolve().parent != parent.resolve():
            raise SubsetError(f"subset {name!r}: {path} is a symlink or leaves the state directory")
        return path

    def manifest_path(self, name: str) -> Path:
        return self._child(self.subsets_dir, name, MANIFEST_SUFFIX)

    def model_dir(self, name: str) -> Path:
        return self._child(self.materialized_dir, name)

    # -- reading -------------------------------------------------------------------------------
    def get(self, name: str) -> SubsetRecord:
        record = self.records.get(name)
        if record is None:
            raise SubsetNotFound(f"The subset `{name}` does not exist.")
        return record

    def load_existing(self) -> list[SubsetRecord]:
        """Register every manifest in the state dir; one that no longer fits the base is listed
        as failed (with why) rather than dropped, so nothing disappears silently."""
        for path in sorted(self.subsets_dir.glob(f"*{MANIFEST_SUFFIX}")):
            name = path.name[: -len(MANIFEST_SUFFIX)]
            if not _valid_name(name):
                log.warning("ignoring a file with an invalid subset name", extra={"path": str(path)})
                continue
            try:
                self.manifest_path(name)
                spec = SubsetSpec.load(path)
                if spec.name != name:
                    raise SubsetError(f"{path}: holds subset {spec.name!r}, not {name!r}")
                self.records[name] = self._build(spec, save=False)
            except EmoServeError as exc:
                log.warning("stored subset not usable", extra={"subset": name, "error": str(exc)})
                self.records[name] = SubsetRecord(name, SubsetState.FAILED, error=str(exc))
        return list(self.records.values())

    # -- creating ------------------------------------------------------------------------------
    def reserve(self, name: str) -> None:
        """Raise unless `name` is a valid, free subset name."""
        validate_name(name)
        if name == self.base_id or name in self.records:
            raise NameTaken(f"the name `{name}` is already taken by "
                            f"{'the base model' if name == self.base_id else 'a subset'}")
        self.manifest_path(name)

    def add(self, spec: SubsetSpec) -> SubsetRecord:
        """Register a finished spec (explicit ids, a preloaded manifest): checked, saved, ready."""
        self.reserve(spec.name)
        record = self.records[spec.name] = self._build(spec, save=True)
        return record

    def adopt(self, spec: SubsetSpec) -> SubsetRecord:
        """Like `add`, but a stored subset with the same name and experts is reused (preloading
        the same manifest at every start)."""
        existing = self.records.get(spec.name)
        if existing is not None and existing.spec is not None and existing.spec.experts == spec.experts:
            return existing
        if existing is not None and existing.state is SubsetState.FAILED:
            self.remove(spec.name)
        return self.add(spec)

    def _build(self, spec: SubsetSpec, *, save: bool) -> SubsetRecord:
        """Check `spec` against the base, save it (if asked) and materialize it; touches only
        files, so it may run on a worker thread."""
        spec.check_against(self.base)
        # The engine reads the base from the manifest: point it at the base this server checked.
        spec = spec.model_copy(update={"base": spec.base.model_copy(update={"location": self.base.location})})
        if save:
            spec.save(self.manifest_path(spec.name))
        return SubsetRecord(spec.name, SubsetState.READY, spec=spec, sizes=subset_sizes(self.base, spec),
                            created=int(spec.provenance.created.timestamp()),
                            model_dir=self.materialize(spec))

    def materialize(self, spec: SubsetSpec) -> Path:
        """The weightless model dir the engine loads; reused if it already holds this spec."""
        target = self.model_dir(spec.name)
        if target.exists():
            try:
                if SubsetSpec.load(target / MANIFEST_FILE) == spec:
                    return target
            except SubsetError:
                pass
            shutil.rmtree(target)
        return materialize_subset(self.base, spec, target)

    def start_profiling(self, name: str, job: ProfileJob,
                        on_done: Callable[[SubsetRecord], Awaitable[None]] | None = None,
                        on_seconds: Callable[[str, float], None] | None = None) -> SubsetRecord:
        """Register `name` as profiling and score the examples on the worker thread."""
        self.reserve(name)
        record = SubsetRecord(name, SubsetState.PROFILING, job={
            "method": job.method, **job.selection.describe(), "examples": len(job.examples),
            "example_fingerprints": [e.fingerprint for e in job.examples]})
        self.records[name] = record
        task = asyncio.create_task(self._profile(record, job, on_done, on_seconds))
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        return record

    async def _profile(self, record: SubsetRecord, job: ProfileJob,
                       on_done: Callable[[SubsetRecord], Awaitable[None]] | None,
                       on_seconds: Callable[[str, float], None] | None) -> None:
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        try:
            spec = await loop.run_in_executor(self._pool, self._profile_sync, record.name, job)
            if self.records.get(record.name) is not record:
                return  # deleted while profiling
            built = await loop.run_in_executor(None, lambda: self._build(spec, save=True))
            if self.records.get(record.name) is not record:  # deleted while writing
                self._delete_files(record.name)
                return
            record.state, record.spec, record.sizes = SubsetState.READY, built.spec, built.sizes
            record.model_dir, record.created = built.model_dir, built.created
        except (EmoServeError, ValueError) as exc:
            record.state, record.error = SubsetState.FAILED, str(exc)
        except Exception as exc:  # a bug or an I/O failure: keep serving, report it on the subset
            log.exception("profiling failed", extra={"subset": record.name})
            record.state, record.error = SubsetState.FAILED, f"internal error while profiling: {exc!r}"
        record.profile_seconds = round(time.monotonic() - t0, 3)
        log.info("profiling finished", extra={"subset": record.name, "state": record.state.value,
                                              "seconds": record.profile_seconds, "error": record.error})
        if record.state is SubsetState.READY and on_seconds:
            on_seconds(job.method, record.profile_seconds)
        if on_done and self.records.get(record.name) is record:
            await on_done(record)

    def _profile_sync(self, name: str, job: ProfileJob) -> SubsetSpec:
        dtype = "float32" if job.device == "cpu" else "bfloat16"
        return job.selection.build(self.base, job, name, dtype)

    # -- deleting ------------------------------------------------------------------------------
    def remove(self, name: str) -> None:
        """Forget `name` and delete its files (a profiling job's result is then discarded)."""
        self.get(name)
        del self.records[name]
        self._delete_files(name)

    def _delete_files(self, name: str) -> None:
        self.manifest_path(name).unlink(missing_ok=True)
        target = self.model_dir(name)
        if target.exists():
            shutil.rmtree(target)

    def close(self) -> None:
        for task in self._jobs:
            task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _valid_name(name: str) -> bool:
    try:
        validate_name(name)
        return True
    except SubsetError:
        return False
