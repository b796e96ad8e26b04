"""The start-up sweep: temporaries that a killed server left (a counter write interrupted by
kill -9 left a 51.8 MB `usage/.emo-demo.json.*.tmp` that survived restarts) are removed from
every directory the server writes, before anything writes there again."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import emo_serve
from emo_serve.checkpoint import Checkpoint
from emo_serve.store import STATE_DIRS, SubsetStore

# Directories of the state dir that hold no file written through a temporary.
APPENDED_ONLY = {"logs"}  # engine logs: opened for appending, never renamed into place


@pytest.fixture(scope="module")
def base(tiny_ckpt: Path) -> Checkpoint:
    return Checkpoint(tiny_ckpt)


def test_every_directory_the_server_writes_is_swept(base: Checkpoint, tmp_path: Path) -> None:
    state = tmp_path / "state"
    left = []
    for name in STATE_DIRS:
        (state / name).mkdir(parents=True)
        left += [state / name / ".emo-demo.json.k2j3h4.tmp", state / name / ".engine-1.a8b7c6.tmp"]
        left[-2].write_bytes(b"\0" * 1024)                     # a file cut short
        left[-1].mkdir()                                       # a staged directory never renamed
        (left[-1] / "config.json").write_text("{}")
    kept = [state / "usage" / "emo-demo.json", state / "scores" / ".hidden-but-not-a-temporary"]
    for path in kept:
        path.write_text("{}")
    SubsetStore(base, "tiny", state)
    assert [p for p in left if p.exists()] == []
    assert all(p.exists() for p in kept)


def test_the_swept_list_names_every_state_directory_in_the_code() -> None:
    """A directory added to the state dir later must join the sweep (or say why it needs none)."""
    package = Path(emo_serve.__file__).parent
    pattern = re.compile(r"""state_dir\s*/\s*["']([\w.-]+)["']""")
    used = {name for path in package.rglob("*.py") for name in pattern.findall(path.read_text())}
    assert {"subsets", "materialized", "usage", "scores", "engines", "models"} <= used
    assert used - APPENDED_ONLY <= set(STATE_DIRS), used - APPENDED_ONLY - set(STATE_DIRS)
