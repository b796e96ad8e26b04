"""Fixtures of the checkpoint tests."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def ckpt_copy(tiny_ckpt: Path, tmp_path: Path) -> Callable[[str], Path]:
    """`ckpt_copy(name)` -> a fresh copy of the tiny checkpoint to damage."""

    def make(name: str = "copy") -> Path:
        return Path(shutil.copytree(tiny_ckpt, tmp_path / name))

    return make
