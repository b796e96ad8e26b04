"""The subset store of a running server: manifests in `<state-dir>/subsets/<name>.json` (written
atomically), a materialized manifest directory per subset for its engine, and the in-memory state
of each subset (`profiling`, `ready` or `failed`; `loading`/`loaded` come from the engines).

A restarted server reads the manifests back, so its subsets survive with no profiling redone.
The store only touches files and records: making a subset from examples is `selection`'s job,
and running that in the background is the API's (`api/jobs.py`).
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

from .checkpoint import Checkpoint
from .errors import Conflict, EmoServeError, NotFound, SubsetError
from .export import materialize_subset
from .files import fsync_dir, sweep_temporaries, temporary_path
from .names import is_valid_name, validate_name
from .stream import subset_sizes
from .subset import MANIFEST_FILE, SubsetSpec

log = logging.getLogger(__name__)

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


class SubsetNotFound(NotFound):
    """No subset of that name."""

    code, default_param = "subset_not_found", "name"


class NameTaken(Conflict):
    """The name belongs to the base or to another subset."""

    code, default_param = "name_taken", "name"


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


class SubsetStore:
    """Subsets of one base checkpoint, persisted under the server's state dir."""

    def __init__(self, base: Checkpoint, base_id: str, state_dir: Path) -> None:
        self.base, self.base_id = base, base_id
        self.subsets_dir = state_dir / "subsets"
        self.materialized_dir = state_dir / "materialized"
        self.usage_dir = state_dir / "usage"  # routing counters per model (api/routing.py)
        self.scores_dir = state_dir / "scores"  # the profiling scores a subset was chosen by
        self.subsets_dir.mkdir(parents=True, exist_ok=True)
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

    def scores_path(self, name: str) -> Path:
        """The scores a subset was chosen by (`emo-scores/v1`), when one profiling run chose it."""
        return self._child(self.scores_dir, name, MANIFEST_SUFFIX)

    def usage_path(self, name: str) -> Path:
        """The routing counters of a subset (or of the base), kept beside its manifest."""
        return self._child(self.usage_dir, name, MANIFEST_SUFFIX)

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
            if not is_valid_name(name):
                log.warning("ignoring a file with an invalid subset name", extra={"path": str(path)})
                continue
            try:
                self.manifest_path(name)
                spec = SubsetSpec.load(path)
                if spec.name != name:
                    raise SubsetError(f"{path}: holds subset {spec.name!r}, not {name!r}")
                self.records[name] = self.build(spec, save=False)
            except (EmoServeError, OSError, ValueError) as exc:
                # One bad file (not UTF-8, unreadable, a full disk while materializing) must not
                # stop the server: the subset is listed as failed, with why.
                error = str(exc) if isinstance(exc, EmoServeError) else f"{path.name}: {type(exc).__name__}: {exc}"
                log.warning("stored subset not usable", extra={"subset": name, "error": error})
                self.records[name] = SubsetRecord(name, SubsetState.FAILED, error=error)
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
        record = self.records[spec.name] = self.build(spec, save=True)
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

    def begin(self, name: str, job: dict[str, Any]) -> SubsetRecord:
        """Register `name` as profiling (`job`: what was asked for); `complete` or `fail` ends it."""
        self.reserve(name)
        record = self.records[name] = SubsetRecord(name, SubsetState.PROFILING, job=job)
        return record

    def is_current(self, record: SubsetRecord) -> bool:
        """Whether `record` is still registered (a subset deleted while profiling is not)."""
        return self.records.get(record.name) is record

    def complete(self, record: SubsetRecord, built: SubsetRecord) -> None:
        """Make a profiling `record` ready with what `build` returned for its spec."""
        record.state, record.spec, record.sizes = SubsetState.READY, built.spec, built.sizes
        record.model_dir, record.created = built.model_dir, built.created

    def discard(self, record: SubsetRecord) -> None:
        """Forget a record that never completed (its files were never committed)."""
        if self.is_current(record):
            del self.records[record.name]

    def fail(self, record: SubsetRecord, error: str) -> None:
        record.state, record.error = SubsetState.FAILED, error

    def build(self, spec: SubsetSpec, *, save: bool, model_dir: Path | None = None) -> SubsetRecord:
        """Check `spec` against the base, materialize it (into `model_dir` if given) and then,
        if asked, save its manifest: a subset is persisted only once everything it needs is
        written, so a failed write never comes back as a ready subset after a restart. Touches
        only files (no record), so it may run on a worker thread."""
        spec.check_against(self.base)
        # The engine reads the base from the manifest: point it at the base this server checked.
        spec = spec.model_copy(update={"base": spec.base.model_copy(update={"location": self.base.location})})
        built = SubsetRecord(spec.name, SubsetState.READY, spec=spec, sizes=subset_sizes(self.base, spec),
                             created=int(spec.provenance.created.timestamp()),
                             model_dir=self.materialize(spec, model_dir))
        if save:
            try:
                spec.save(self.manifest_path(spec.name))
            except BaseException:  # no manifest: the materialized dir would be an orphan
                if built.model_dir is not None:
                    shutil.rmtree(built.model_dir, ignore_errors=True)
                raise
        return built

    def staging_dir(self, name: str) -> Path:
        """A private place for a background job to materialize `name` before it commits."""
        return temporary_path(self.model_dir(name), uuid.uuid4().hex[:12])

    def commit(self, record: SubsetRecord, built: SubsetRecord) -> None:
        """Make a profiling `record` ready with what `build` staged for it: the staged dir
        becomes the subset's, then the manifest is saved. Runs on the event loop, where it
        cannot interleave with a delete or a re-create of the same name (a few renames)."""
        assert built.spec is not None and built.model_dir is not None
        target = self.model_dir(record.name)
        if target.exists():
            shutil.rmtree(target)
        built.model_dir.rename(target)
        fsync_dir(target.parent)
        built.spec.save(self.manifest_path(record.name))
        built.model_dir = target
        self.complete(record, built)

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

    # -- deleting ------------------------------------------------------------------------------
    def remove(self, name: str) -> None:
        """Forget `name` and delete its files (a profiling job's result is then discarded)."""
        self.get(name)
        del self.records[name]
        self.delete_files(name)

    def delete_files(self, name: str) -> None:
        self.manifest_path(name).unlink(missing_ok=True)
        self.usage_path(name).unlink(missing_ok=True)
        self.scores_path(name).unlink(missing_ok=True)
        target = self.model_dir(name)
        if target.exists():
            shutil.rmtree(target)
