"""Where a server keeps what outlives it: subset manifests, the profiling scores they were chosen
by, profiling jobs' states and routing counters.

Two kinds, one interface (`Catalog`): the server's own state dir (`directory.py`, the default: one
server, embedded, nothing to run) and PostgreSQL (`postgres.py`: a fleet of replicas shares one
database). A catalog keeps text (manifests and scores as their JSON, counters as the collector
encodes them); parsing, checking against the base and materializing stay with `store.SubsetStore`,
which keeps each server's own copy of what it serves.

Every subset row carries a `token`: which creation of the name it is. A name deleted and made
again gets a new token, so a replica that still serves the old one sees the change, and a job that
profiled for a deleted name cannot publish into its successor.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from ..errors import Conflict, NotFound, Unavailable


class SubsetNotFound(NotFound):
    """No subset of that name."""

    code, default_param = "subset_not_found", "name"


class NameTaken(Conflict):
    """The name belongs to the base or to another subset."""

    code, default_param = "name_taken", "name"


class StoreUnavailable(Unavailable):
    """The shared store cannot be reached (503 with Retry-After: what is cached keeps serving)."""

    code = "store_unavailable"


def new_token() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Entry:
    """One subset as the catalog keeps it."""

    name: str
    state: str  # "profiling", "ready" or "failed"
    token: str
    source: str  # where it is kept, for error messages (a file's path, a table row)
    manifest: str | bytes | None = None  # the `SubsetSpec` JSON (ready subsets; None in listings)
    error: str | None = None
    job: dict[str, Any] | None = field(default=None, compare=False)


class Catalog(ABC):
    """Subsets, scores, jobs and routing counters of one base."""

    #: Other servers write it too: the server polls it and looks up names it does not know.
    shared: bool = False

    # -- subsets -------------------------------------------------------------------------------
    @abstractmethod
    def entries(self, *, manifests: bool = True) -> list[Entry]:
        """Every subset kept (with manifests unless `manifests` is False: a cheap listing)."""

    @abstractmethod
    def get(self, name: str) -> Entry | None:
        """One subset with its manifest, None if there is no such name."""

    @abstractmethod
    def claim(self, name: str, token: str, job: dict[str, Any]) -> None:
        """Hold `name` while it is made (profiling); NameTaken if it is held or made already."""

    @abstractmethod
    def publish(self, name: str, token: str, manifest: str, scores: str | None) -> None:
        """Make claimed `name` ready with its manifest (and scores) in one write; SubsetNotFound if
        the claim is gone (deleted meanwhile)."""

    @abstractmethod
    def put(self, name: str, token: str, manifest: str) -> None:
        """Keep a finished subset that was never claimed (a preloaded manifest)."""

    @abstractmethod
    def fail(self, name: str, token: str, error: str) -> None:
        """Mark claimed `name` failed, with why."""

    @abstractmethod
    def release(self, name: str, token: str) -> None:
        """Drop a claim that never completed."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Forget `name`: manifest, scores, job and routing counters."""

    @abstractmethod
    def scores(self, name: str) -> str | bytes | None:
        """The scores `name` was chosen by (JSON), None if none are kept."""

    @abstractmethod
    def where(self, kind: str, name: str) -> str:
        """Where `name`'s `kind` ("manifest", "scores" or "counters") is kept, for messages."""

    def heartbeat(self, alive: list[str]) -> None:
        """Say that this server's profiling jobs `alive` (names) still run, and fail the jobs whose
        server stopped saying so (a shared catalog's rows would otherwise say `profiling` forever:
        a killed replica's, or one whose failure could not be written). Nothing to do where jobs
        are not kept."""
        return None

    def fail_own_jobs(self) -> None:
        """At start: the jobs this server ran before it restarted died with its old process."""
        return None

    # -- routing counters ----------------------------------------------------------------------
    @abstractmethod
    def write_counters(self, model: str, text: str) -> None:
        """This server's counters of `model`, replacing what it wrote before."""

    @abstractmethod
    def read_counters(self, model: str) -> str | bytes | None:
        """What this server wrote for `model` (at start: what a restart keeps)."""

    def other_counters(self, model: str) -> list[str | bytes]:
        """What the other servers sharing the catalog wrote for `model` (their sum is the fleet's)."""
        return []

    @abstractmethod
    def forget_counters(self, model: str) -> None:
        """Remove this server's counters of `model`."""

    def close(self) -> None:
        """Release connections (none to release for files)."""
        return None
