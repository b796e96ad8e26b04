"""vLLM with the plugin vs the reference forward, on the tiny float32 model: greedy tokens equal,
prompt and sampled logprobs within 1e-3, for the base (a), an exported subset (b) and a subset
manifest read over http:// (c); (b) and (c) identical; (c) fetches only the subset's bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from emo_serve.checkpoint import Checkpoint
from emo_serve.demo import write_demo_checkpoint
from emo_serve.stream import plan_subset
from emo_serve.subset import SubsetSpec
from plugin_harness import EngineRun, reference_parity, remote_code_markers, run_engine

pytestmark = pytest.mark.vllm


def test_base_matches_reference(base_run: EngineRun, tiny_base: Checkpoint) -> None:
    reference_parity(base_run, tiny_base).check()


def test_base_with_auto_map_ran_no_remote_code(base_run: EngineRun, hub_style_ckpt: Path) -> None:
    """The base run loaded a config with the Hub's auto_map, trust_remote_code=False, with the
    remote modules present as traps."""
    assert "trust_remote_code=False" in base_run.log
    assert remote_code_markers(hub_style_ckpt) == []


def test_exported_subset_matches_reference(exported_run: EngineRun, tiny_base: Checkpoint,
                                           small_subset: SubsetSpec) -> None:
    reference_parity(exported_run, tiny_base, small_subset.experts).check()


def test_http_manifest_matches_reference(http_manifest_run, tiny_base: Checkpoint,
                                         small_subset: SubsetSpec) -> None:
    reference_parity(http_manifest_run.run, tiny_base, small_subset.experts).check()


def test_exported_and_manifest_are_identical(exported_run: EngineRun, http_manifest_run) -> None:
    assert http_manifest_run.run.results == exported_run.results


def test_http_manifest_reads_only_the_subset(http_manifest_run, http_base: Checkpoint,
                                            small_subset: SubsetSpec, range_server) -> None:
    """Bytes the engine fetched from the base <= 1.02 x the subset's tensor bytes + what one
    opening of the base costs (config, index, safetensors headers, fingerprint sample)."""
    subset_bytes = sum(t.nbytes for t in plan_subset(http_base, small_subset))
    range_server.reset()
    Checkpoint(http_base.location).fingerprint  # noqa: B018 - headers + fingerprint sample
    open_cost = range_server.bytes_served
    assert http_manifest_run.bytes_served <= 1.02 * subset_bytes + open_cost, (
        http_manifest_run.bytes_served, subset_bytes, open_cost)
    assert subset_bytes < 0.5 * http_base.total_tensor_bytes
    assert all(p.startswith("/plugin-tiny/") for p in http_manifest_run.paths)
    assert not any(p.endswith((".py", "tokenizer.json")) for p in http_manifest_run.paths)


@pytest.fixture(scope="session")
def exotic_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every other routing path in one model: a dense first layer (biased MLP), two shared
    experts (split softmax in the fused kernel), always-active ids, plain top-k without shared
    experts; per-layer expert counts, grouped-query attention and tied embeddings."""
    return write_demo_checkpoint(
        tmp_path_factory.mktemp("exotic") / "exotic", "tiny", seed=3,
        num_experts_per_layer=[0, 16, 12, 8], num_shared_experts_per_layer=[0, 2, 1, 0],
        always_active_experts_per_layer=[[], [], [0, 5], []], dense_intermediate_size=192,
        dense_mlp_bias=True, num_key_value_heads=1, tie_word_embeddings=True)


def test_exotic_routing_matches_reference(exotic_ckpt: Path, engine_work: Path) -> None:
    run = run_engine(exotic_ckpt, engine_work / "exotic")
    reference_parity(run, Checkpoint(exotic_ckpt)).check()
