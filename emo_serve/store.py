"""The subsets a running server knows: a record per subset (`profiling`, `ready` or `failed`;
`loading`/`loaded` come from the engines), a materialized manifest directory per subset for its
engine, and the catalog that keeps them (`catalog`: the state dir, or a PostgreSQL database a fleet
of replicas shares).

A restarted server reads the catalog back, so its subsets survive with no profiling redone; a
replica of a fleet also takes in what the others made (`api/store_sync.py`). The store only
touches files, records and the catalog: making a subset from examples is `selection`'s job, and
running that in the background is the API's (`api/jobs.py`).
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from .catalog import Catalog, DirectoryCatalog, Entry, NameTaken, SubsetNotFound, new_token
from .catalog.directory import child_path
from .checkpoint import Checkpoint
from .errors import EmoServeError, SubsetError
from .export import materialize_subset
from .files import fsync_dir, sweep_temporaries, temporary_path
from .names import validate_name
from .stream import subset_sizes
from .subset import MANIFEST_FILE, SubsetSpec

log = logging.getLogger(__name__)

__all__ = ["NameTaken", "STATE_DIRS", "SubsetNotFound", "SubsetRecord", "SubsetState", "SubsetStore"]

MANIFEST_SUFFIX = ".json"
# Every directory of the state dir that the server writes through temporaries (`files`): subsets'
# manifests and materialized dirs, routing counters (api/routing.py), profiling scores, shared
# engines' model dirs (api/service.py) and the generated demo model (default_model.py). A write
# cut short by kill -9 leaves a `.<name>.*.tmp` there, which the next start removes.
STATE_DIRS = ("subsets", "materialized", "usage", "scores", "engines", "models")


class SubsetState(str, Enum):
    """Where a subset stands: the store sets the first three and `failed`; the engines' state
    turns `ready` into `loading`/`loaded` when the API reports it."""

    PROFILING = "profiling"
    READY = "ready"
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"


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
    token: str = field(default_factory=new_token)  # which creation of the name (see `catalog.base`)
    # Made by this server and not yet in the catalog (a claim under way): a shared catalog's
    # listing without it does not mean it was deleted.
    pending: bool = False
    # Being made by this server (claimed, profiling, publishing): the store's poll leaves it to
    # the job, which may find the catalog's row ahead of the record.
    local: bool = False


class SubsetStore:
    """Subsets of one base checkpoint: records and materialized dirs here, manifests in the catalog."""

    def __init__(self, base: Checkpoint, base_id: str, state_dir: Path, catalog: Catalog | None = None) -> None:
        self.base, self.base_id = base, base_id
        self.catalog = catalog or DirectoryCatalog(state_dir)
        self.subsets_dir = state_dir / "subsets"
        self.materialized_dir = state_dir / "materialized"
        self.materialized_dir.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, SubsetRecord] = {}
        self._sweep(state_dir)

    @staticmethod
    def _sweep(state_dir: Path) -> None:
        """Remove what interrupted writes left in the state dir; the store is made at start-up,
        after the demo model (if any) is in place and before anything else writes there."""
        for directory in (state_dir / name for name in STATE_DIRS):
            if directory.is_dir():
                for leftover in sweep_temporaries(directory):
                    log.info("removed a temporary file left by an interrupted write", extra={"path": str(leftover)})

    # -- paths (names cannot escape the state dir) ---------------------------------------------
    def manifest_path(self, name: str) -> Path:
        return child_path(self.subsets_dir, name, MANIFEST_SUFFIX)

    def model_dir(self, name: str) -> Path:
        return child_path(self.materialized_dir, name)

    # -- reading -------------------------------------------------------------------------------
    def get(self, name: str) -> SubsetRecord:
        record = self.records.get(name)
        if record is None:
            raise SubsetNotFound(f"The subset `{name}` does not exist.")
        return record

    def load_existing(self) -> list[SubsetRecord]:
        """Register every subset the catalog keeps; one that no longer fits the base is listed as
        failed (with why) rather than dropped, so nothing disappears silently."""
        self.catalog.fail_own_jobs()
        for entry in self.catalog.entries():
            self.records[entry.name] = self.from_entry(entry)
        return list(self.records.values())

    def from_entry(self, entry: Entry) -> SubsetRecord:
        """A record for what the catalog keeps under a name (materialized if ready: runs on a
        thread at start-up and when another replica made it)."""
        name = entry.name
        if entry.state == "profiling":
            return SubsetRecord(name, SubsetState.PROFILING, job=entry.job, token=entry.token)
        if entry.state != "ready" or entry.manifest is None:
            return SubsetRecord(name, SubsetState.FAILED, error=entry.error, job=entry.job, token=entry.token)
        try:
            spec = SubsetSpec.parse(entry.manifest, source=entry.source)
            if spec.name != name:
                raise SubsetError(f"{entry.source}: holds subset {spec.name!r}, not {name!r}")
            record = self.build(spec, save=False)
        except (EmoServeError, OSError, ValueError) as exc:
            # One bad manifest (not UTF-8, unreadable, a full disk while materializing) must not
            # stop the server: the subset is listed as failed, with why.
            error = str(exc) if isinstance(exc, EmoServeError) else f"{entry.source}: {type(exc).__name__}: {exc}"
            log.warning("stored subset not usable", extra={"subset": name, "error": error})
            return SubsetRecord(name, SubsetState.FAILED, error=error, token=entry.token)
        record.token = entry.token
        return record

    # -- creating ------------------------------------------------------------------------------
    def reserve(self, name: str) -> None:
        """Raise unless `name` is a valid name that this server does not know (a shared catalog
        may still know it: `claim` asks it)."""
        validate_name(name)
        if name == self.base_id or name in self.records:
            raise NameTaken(f"the name `{name}` is already taken by "
                            f"{'the base model' if name == self.base_id else 'a subset'}")
        self.manifest_path(name)

    def add(self, spec: SubsetSpec) -> SubsetRecord:
        """Register a finished spec (explicit ids, a preloaded manifest): checked, saved, ready."""
        self.reserve(spec.name)
        record = self.records[spec.name] = self.build(spec, save=True)
        return record

    def adopt(self, spec: SubsetSpec) -> SubsetRecord:
        """Like `add`, but a stored subset with the same name and experts is reused (preloading
        the same manifest at every start, or on every replica of a fleet)."""
        existing = self.records.get(spec.name)
        if existing is not None and existing.spec is not None and existing.spec.experts == spec.experts:
            return existing
        if existing is not None and existing.state is SubsetState.FAILED:
            self.remove(spec.name)
        try:
            return self.add(spec)
        except NameTaken:  # another replica preloaded it just now
            entry = self.catalog.get(spec.name)
            if entry is None:
                raise
            record = self.from_entry(entry)
            if record.spec is None or record.spec.experts != spec.experts:
                raise
            self.records[spec.name] = record
            return record

    def begin(self, name: str, job: dict[str, Any]) -> SubsetRecord:
        """Register `name` as profiling (`job`: what was asked for); `claim` then holds it in the
        catalog, and `api/store_calls`' `publish` or `mark_failed` ends it."""
        self.reserve(name)
        record = self.records[name] = SubsetRecord(name, SubsetState.PROFILING, job=job, pending=True, local=True)
        return record

    def claim(self, record: SubsetRecord) -> None:
        """Hold the name of a `begin`-registered record in the catalog (409 if another replica
        holds it; 503 if the catalog is down). The caller drops the record on failure."""
        self.catalog.claim(record.name, record.token, record.job or {})

    def is_current(self, record: SubsetRecord) -> bool:
        """Whether `record` is still registered (a subset deleted while profiling is not)."""
        return self.records.get(record.name) is record

    def complete(self, record: SubsetRecord, built: SubsetRecord) -> None:
        """Make a profiling `record` ready with what `build` returned for its spec."""
        record.state, record.spec, record.sizes = SubsetState.READY, built.spec, built.sizes
        record.model_dir, record.created, record.local = built.model_dir, built.created, False

    def discard(self, record: SubsetRecord) -> None:
        """Forget a record that never completed (its files were never committed)."""
        if self.is_current(record):
            del self.records[record.name]

    def fail(self, record: SubsetRecord, error: str) -> None:
        record.state, record.error, record.local = SubsetState.FAILED, error, False

    def build(self, spec: SubsetSpec, *, save: bool, model_dir: Path | None = None) -> SubsetRecord:
        """Check `spec` against the base, materialize it (into `model_dir` if given) and then,
        if asked, keep its manifest in the catalog: a subset is kept only once everything it
        needs is written, so a failed write never comes back as a ready subset after a restart.
        Touches only files and the catalog (no record), so it may run on a worker thread."""
        spec.check_against(self.base)
        # The engine reads the base from the manifest: point it at the base this server checked.
        spec = spec.model_copy(update={"base": spec.base.model_copy(update={"location": self.base.location})})
        built = SubsetRecord(spec.name, SubsetState.READY, spec=spec, sizes=subset_sizes(self.base, spec),
                             created=int(spec.provenance.created.timestamp()),
                             model_dir=self.materialize(spec, model_dir))
        if save:
            try:
                self.catalog.put(spec.name, built.token, spec.to_json() + "\n")
            except BaseException:  # no manifest: the materialized dir would be an orphan
                if built.model_dir is not None:
                    shutil.rmtree(built.model_dir, ignore_errors=True)
                raise
        return built

    def staging_dir(self, name: str) -> Path:
        """A private place for a background job to materialize `name` before it commits."""
        return temporary_path(self.model_dir(name), uuid.uuid4().hex[:12])

    def stage(self, record: SubsetRecord, built: SubsetRecord) -> None:
        """The first half of making a profiling `record` ready: what `build` staged for it becomes
        its materialized dir. The catalog's `publish` of its manifest follows (`api/store_calls`),
        then `complete`."""
        assert built.spec is not None and built.model_dir is not None
        target = self.model_dir(record.name)
        if target.exists():
            shutil.rmtree(target)
        built.model_dir.rename(target)
        fsync_dir(target.parent)
        built.model_dir = target

    def materialize(self, spec: SubsetSpec, target: Path | None = None) -> Path:
        """The weightless model dir the engine loads; reused if it already holds this spec."""
        target = target or self.model_dir(spec.name)
        if target.exists():
            try:
                if SubsetSpec.load(target / MANIFEST_FILE) == spec:
                    return target
            except SubsetError:
                pass  # unreadable or stale: rebuilt below
            shutil.rmtree(target)
        return materialize_subset(self.base, spec, target)

    def scores(self, name: str) -> str | bytes | None:
        """The scores `name` was chosen by (their JSON), None when none are kept."""
        return self.catalog.scores(name)

    def scores_source(self, name: str) -> str:
        """Where `scores` came from, for error messages."""
        return self.catalog.where("scores", name)

    # -- deleting ------------------------------------------------------------------------------
    def remove(self, name: str) -> None:
        """Forget `name` and delete it from the catalog (a profiling job's result is then discarded)."""
        self.get(name)
        self.catalog.delete(name)
        self.forget(name)

    def forget(self, name: str) -> None:
        """Drop this server's record and files of `name` (the catalog is someone else's business:
        another replica deleted it, or `delete` did)."""
        self.records.pop(name, None)
        target = self.model_dir(name)
        if target.exists():
            shutil.rmtree(target)
