"""State across restarts, and preloading: a restarted server lists its subsets with no profiling
redone; a server started with `EMO_PRELOAD_SUBSETS` (the env form of `--preload-subset`) serves
that subset at start, with no API call."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest

from api_harness import ADMIN_KEY, API_KEY, CLI, EXAMPLES, Server

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("restart-state")


@pytest.fixture(scope="module")
def first(server_factory, tiny_ckpt: Path, state: Path) -> dict:
    """A server that profiles one subset (no engine needed), then is stopped."""
    server = server_factory(tiny_ckpt, "--no-serve-base", state_dir=state)
    with server.client(ADMIN_KEY) as c:
        assert c.post("/v1/subsets", json={"name": "kept", "examples": EXAMPLES, "fraction": 0.25}).status_code == 202
        server.wait_until(lambda: c.get("/v1/subsets/kept").json()["state"] != "profiling", 300, "profiling")
        kept = c.get("/v1/subsets/kept").json()
    assert kept["state"] == "ready"
    assert server.stop() == set()
    return kept


@pytest.fixture(scope="module")
def manifest(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest made offline with the CLI, as an operator ships it in a ConfigMap."""
    out = tmp_path_factory.mktemp("preload") / "task.json"
    r = subprocess.run([*CLI, "subset", "create", "--base", str(tiny_ckpt), "--random", "3", "--seed", "4",
                        "--name", "task", "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def second(server_factory, tiny_ckpt: Path, state: Path, first: dict, manifest: Path) -> Server:
    server = server_factory(tiny_ckpt, "--no-serve-base", "--dtype", "float32", "--max-model-len", "512",
                            state_dir=state, env={"EMO_PRELOAD_SUBSETS": str(manifest)})
    server.wait_ready()
    return server


def test_restarted_server_keeps_its_subsets(second: Server, first: dict) -> None:
    with second.client(API_KEY) as c:
        kept = c.get("/v1/subsets/kept").json()
        assert kept["state"] == "ready"  # not loaded: only preloads start at boot
        for key in ("experts", "created", "example_fingerprints", "method", "fraction", "bytes"):
            assert kept[key] == first[key], key
        assert "emo_subset_profiling_seconds_count" not in c.get("/metrics").text  # nothing profiled again
        assert {m["id"] for m in c.get("/v1/models").json()["data"]} == {"kept", "task"}


def test_preloaded_subset_serves_without_any_api_call(second: Server, manifest: Path) -> None:
    ready = httpx.get(f"{second.url}/ready").json()
    assert ready["status"] == "ready" and ready["models"] == {"task": "ready"}
    spec = json.loads(manifest.read_text())
    client = second.openai(API_KEY)
    card = client.models.retrieve("task").model_dump()
    assert card["emo"]["state"] == "loaded" and card["emo"]["experts_per_layer"] == [len(e) for e in spec["experts"]]
    out = client.completions.create(model="task", prompt="def f(x):", max_tokens=5)
    assert out.usage.completion_tokens >= 1
    stored = json.loads((second.state_dir / "subsets" / "task.json").read_text())
    assert stored["experts"] == spec["experts"]


def test_delete_removes_it_for_good(second: Server) -> None:
    with second.client(ADMIN_KEY) as c:
        assert c.delete("/v1/subsets/kept").status_code == 200
        assert c.get("/v1/subsets/kept").status_code == 404
    assert not (second.state_dir / "subsets" / "kept.json").exists()
    assert second.stop() == set()
