"""The catalog in the server's own state dir (the default): one server, nothing to run.

`<state-dir>/subsets/<name>.json` (manifests), `scores/<name>.json` (what a subset was chosen by),
`usage/<name>.json` (routing counters), each written atomically (`files`). Jobs are not kept: a
profiling job dies with its server, which keeps no claim to release.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..errors import SubsetError
from ..files import atomic_write_text
from ..names import is_valid_name, validate_name
from .base import Catalog, Entry

log = logging.getLogger(__name__)

SUFFIX = ".json"
TOKEN = "local"  # one server: nobody else makes a name again behind its back


def child_path(parent: Path, name: str, suffix: str = "") -> Path:
    """`parent/<name><suffix>`, refused if `name` is invalid or the path leaves `parent`."""
    validate_name(name)
    path = parent / f"{name}{suffix}"
    if path.is_symlink() or path.resolve().parent != parent.resolve():
        raise SubsetError(f"subset {name!r}: {path} is a symlink or leaves the state directory")
    return path


class DirectoryCatalog(Catalog):
    def __init__(self, state_dir: Path) -> None:
        self.subsets_dir = state_dir / "subsets"
        self.scores_dir = state_dir / "scores"  # the profiling scores a subset was chosen by
        self.usage_dir = state_dir / "usage"  # routing counters per model (api/routing.py)
        self.subsets_dir.mkdir(parents=True, exist_ok=True)

    def manifest_path(self, name: str) -> Path:
        return child_path(self.subsets_dir, name, SUFFIX)

    def scores_path(self, name: str) -> Path:
        return child_path(self.scores_dir, name, SUFFIX)

    def usage_path(self, name: str) -> Path:
        return child_path(self.usage_dir, name, SUFFIX)

    def where(self, kind: str, name: str) -> str:
        path = {"manifest": self.manifest_path, "scores": self.scores_path, "counters": self.usage_path}[kind]
        return str(path(name))

    # -- subsets -------------------------------------------------------------------------------
    def entries(self, *, manifests: bool = True) -> list[Entry]:
        out = []
        for path in sorted(self.subsets_dir.glob(f"*{SUFFIX}")):
            name = path.name[: -len(SUFFIX)]
            if not is_valid_name(name):
                log.warning("ignoring a file with an invalid subset name", extra={"path": str(path)})
                continue
            out.append(self._entry(name, path, manifests))
        return out

    def _entry(self, name: str, path: Path, manifest: bool) -> Entry:
        try:
            self.manifest_path(name)
            text = path.read_bytes() if manifest else None
        except SubsetError as exc:
            return Entry(name, "failed", TOKEN, str(path), error=str(exc))
        except OSError as exc:
            return Entry(name, "failed", TOKEN, str(path),
                         error=f"{path}: cannot read subset manifest ({exc.strerror})")
        return Entry(name, "ready", TOKEN, str(path), manifest=text)

    def get(self, name: str) -> Entry | None:
        path = self.manifest_path(name)
        return self._entry(name, path, True) if path.exists() else None

    def claim(self, name: str, token: str, job: dict[str, Any]) -> None:
        pass  # the server's own records hold the name while it profiles

    def publish(self, name: str, token: str, manifest: str, scores: str | None) -> None:
        if scores is not None:
            atomic_write_text(self.scores_path(name), scores)
        atomic_write_text(self.manifest_path(name), manifest)  # last: a manifest means a whole subset

    def put(self, name: str, token: str, manifest: str) -> None:
        atomic_write_text(self.manifest_path(name), manifest)

    def fail(self, name: str, token: str, error: str) -> None:
        pass  # a failed job is kept in memory only, as it was never written

    def release(self, name: str, token: str) -> None:
        pass

    def delete(self, name: str) -> None:
        for path in (self.manifest_path(name), self.usage_path(name), self.scores_path(name)):
            path.unlink(missing_ok=True)

    def scores(self, name: str) -> bytes | None:
        path = self.scores_path(name)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    # -- routing counters ----------------------------------------------------------------------
    def write_counters(self, model: str, text: str) -> None:
        atomic_write_text(self.usage_path(model), text)

    def read_counters(self, model: str) -> bytes | None:
        path = self.usage_path(model)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def forget_counters(self, model: str) -> None:
        self.usage_path(model).unlink(missing_ok=True)
