"""Debian packages a test needs (Chromium, PostgreSQL), installed with apt-get when missing: the
project's own files install what its tests use, nothing is installed by hand."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def apt_install(package: str, *, needed_by: str) -> None:
    """`apt-get install package` (after `apt-get update` if the first try fails); a clear test
    failure when that cannot be done here (not root, no apt-get) or does not work."""
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.fail(f"{needed_by} needs {package}: run `apt-get install {package}` as root (Debian)")
    for attempt in (["apt-get", "install", "-y", "-q", package], ["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", package]):
        done = subprocess.run(attempt, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if attempt[1] == "install" and done.returncode == 0:
            return
    pytest.fail(f"apt-get install {package} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
