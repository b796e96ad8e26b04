"""The CPU image, built and run for real: scripts/image-test.sh builds it with podman, runs it
with the compose `emo-serve-cpu` service's settings, completes on the demo model and on a subset,
restarts it on the same state volume (the subset is still there) and stops it with SIGTERM within
the service's stop_grace_period. The script installs podman, runc and debootstrap from Debian's
packages when they are missing, so it needs root, not a preinstalled container engine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from deploy_helpers import REPO

SCRIPT = REPO / "scripts" / "image-test.sh"

pytestmark = [
    pytest.mark.image,
    pytest.mark.skipif(not sys.platform.startswith("linux"),
                       reason="the image test runs Linux containers with podman: Linux only"),
    pytest.mark.skipif(sys.platform.startswith("linux") and os.geteuid() != 0,
                       reason="the image test needs root: it installs podman/runc/debootstrap with "
                              "apt-get and runs rootful podman"),
]


@pytest.mark.timeout(45 * 60)
def test_cpu_image_builds_serves_keeps_subsets_and_stops_on_sigterm() -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    # Its own process group: on a timeout the whole group gets SIGTERM, so podman stops and the
    # script's exit trap still removes the containers and volumes it made.
    proc = subprocess.Popen(["bash", str(SCRIPT)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=44 * 60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        pytest.fail(f"scripts/image-test.sh ran past 44 minutes:\n{out[-6000:]}")
    print(out)  # every step with its duration (pytest -rP shows it)
    assert proc.returncode == 0, f"scripts/image-test.sh failed (status {proc.returncode}):\n{out[-6000:]}"
    assert "PASSED" in out and "survived the restart" in out
