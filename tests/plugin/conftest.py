"""Fixtures for the plugin tests: the tiny model and subsets of it in the three directory
kinds, and one engine run per model, shared by the session (an engine start costs ~30-60 s)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from emo_serve.checkpoint import Checkpoint
from emo_serve.export import export_subset, materialize_subset
from emo_serve.subset import SubsetSpec, make_subset
from plugin_harness import REMOTE_CODE_MODULES, EngineRun, run_engine


# -- models --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_base(tiny_ckpt: Path) -> Checkpoint:
    return Checkpoint(tiny_ckpt)


@pytest.fixture(scope="session")
def small_subset(tiny_base: Checkpoint) -> SubsetSpec:
    """2 routed experts per layer (different ones per layer) + the shared one: 3 of 16 experts,
    fewer than top-k (4), so top-k shrinks to 3."""
    routed = [[(3 + 4 * layer) % 15, (8 + 5 * layer) % 15] for layer in range(4)]
    return make_subset(tiny_base, routed, "small")


@pytest.fixture(scope="session")
def exported_small(small_subset: SubsetSpec, tiny_base: Checkpoint,
                   tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_subset(tiny_base, small_subset, tmp_path_factory.mktemp("export") / "small")


@pytest.fixture(scope="session")
def http_base(tiny_ckpt: Path, range_server) -> Checkpoint:
    """The tiny checkpoint served over HTTP by the counting range server."""
    shutil.copytree(tiny_ckpt, range_server.root / "plugin-tiny")
    return Checkpoint(range_server.url("plugin-tiny"))


@pytest.fixture(scope="session")
def http_manifest_small(small_subset: SubsetSpec, http_base: Checkpoint,
                        tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest dir for `small_subset` whose base is the HTTP copy of the tiny model."""
    spec = small_subset.model_copy(deep=True)
    spec.base.location = http_base.location
    return materialize_subset(http_base, spec, tmp_path_factory.mktemp("manifest") / "small-http")


@pytest.fixture(scope="session")
def engine_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="session")
def hub_style_ckpt(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny model with the Hub's remote code beside its auto_map config, as traps:
    importing either module leaves a marker file (and fails)."""
    out = tmp_path_factory.mktemp("hub-style") / "tiny"
    shutil.copytree(tiny_ckpt, out)
    for module in REMOTE_CODE_MODULES:
        (out / f"{module}.py").write_text(
            "from pathlib import Path\n"
            f"(Path(__file__).parent / 'REMOTE_CODE_RAN_{module}').touch()\n"
            "raise RuntimeError('remote code must not run')\n")
    return out


@pytest.fixture(scope="session")
def base_run(hub_style_ckpt: Path, engine_work: Path) -> EngineRun:
    """(a) the base checkpoint, auto_map and remote code included, trust_remote_code off."""
    return run_engine(hub_style_ckpt, engine_work / "base")


@pytest.fixture(scope="session")
def exported_run(exported_small: Path, engine_work: Path) -> EngineRun:
    return run_engine(exported_small, engine_work / "exported")


@dataclass
class HttpManifestRun:
    run: EngineRun
    bytes_served: int
    paths: set[str]


@pytest.fixture(scope="session")
def http_manifest_run(http_manifest_small: Path, range_server, engine_work: Path) -> HttpManifestRun:
    """(c) over http://: every byte the engine fetched from the base is counted."""
    range_server.reset()
    run = run_engine(http_manifest_small, engine_work / "manifest-http")
    return HttpManifestRun(run, range_server.bytes_served, range_server.paths_requested())
