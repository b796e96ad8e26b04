"""The EMO config schema and its per-layer routing defaults (DESIGN.md, "Routing in the
reference implementation")."""

from __future__ import annotations

from typing import Any

import pytest

from emo_serve.config import EmoConfig, LayerRouting
from emo_serve.demo import demo_config
from emo_serve.errors import ConfigError


def cfg(**overrides: Any) -> EmoConfig:
    base = demo_config("tiny")
    base.update(overrides)
    return EmoConfig.from_dict(base, source="test/config.json")


def test_released_schema_defaults() -> None:
    c = cfg()
    assert c.experts_per_layer == [16] * 4 and c.moe_layers() == [0, 1, 2, 3]
    assert c.head_size == 64 and c.kv_heads == 2
    r = c.layer_routing(0)
    assert r == LayerRouting(num_experts=16, num_shared=1, top_k=4, norm_topk_prob=False)
    assert (r.num_routed, r.routed_top_k, r.is_dense) == (15, 3, False)
    # Hub-only keys survive a round trip (the plugin and exports write them back).
    assert c.to_dict()["auto_map"]["AutoConfig"] == "configuration_emo.EmoConfig"


def test_per_layer_counts_default_shared_to_min_of_global_and_count() -> None:
    c = cfg(num_shared_experts=2, num_experts_per_layer=[16, 1, 3, 0], dense_intermediate_size=256)
    assert [c.layer_routing(i).num_shared for i in range(4)] == [2, 1, 2, 0]
    assert [c.layer_routing(i).top_k for i in range(4)] == [4, 1, 3, 0]
    assert c.layer_routing(3).is_dense and c.moe_layers() == [0, 1, 2]


def test_explicit_per_layer_shared_and_always_active() -> None:
    c = cfg(num_experts_per_layer=[16, 8, 8, 8], num_shared_experts_per_layer=[1, 0, 2, 1],
            always_active_experts_per_layer=[[], [0], [], [7, 2]])
    assert [c.layer_routing(i).num_shared for i in range(4)] == [1, 0, 2, 1]
    assert c.layer_routing(1).always_active == (0,)
    assert c.layer_routing(3).always_active == (7, 2)
    g = cfg(always_active_experts=[15])
    assert all(g.layer_routing(i).always_active == (15,) for i in range(4))


def test_shared_and_routed_ids_per_layer() -> None:
    """One answer to "which experts must a subset keep, which may it choose": the shared (last)
    ids plus any always-active ones; a dense layer has neither and keeps nothing."""
    c = cfg(num_experts_per_layer=[16, 8, 0, 8], num_shared_experts_per_layer=[1, 2, 0, 0],
            always_active_experts_per_layer=[[], [], [], [3]], dense_intermediate_size=256)
    r = [c.layer_routing(i) for i in range(4)]
    assert r[0].shared_ids == [15] and r[0].routed_ids == list(range(15))
    assert r[1].shared_ids == [6, 7] and r[1].routed_ids == list(range(6))
    assert r[2].shared_ids == [] and r[2].routed_ids == [] and r[2].kept_ids([0, 1]) == []
    assert r[3].shared_ids == [3] and r[3].routed_ids == [0, 1, 2, 4, 5, 6, 7]
    assert r[0].kept_ids([4, 2]) == [2, 4, 15] and r[3].kept_ids([5, 3]) == [3, 5]
    assert c.routed_counts() == [15, 6, 0, 7]


def test_top_k_is_capped_at_the_layer_count() -> None:
    c = cfg(num_experts_per_layer=[2, 16, 16, 16], num_experts_per_tok=8)
    assert c.layer_routing(0).top_k == 2 and c.layer_routing(0).routed_top_k == 1
    assert c.layer_routing(1).top_k == 8


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_experts_per_layer": [16, 16]}, r"num_experts_per_layer has 2 entries, num_hidden_layers is 4"),
        ({"num_experts_per_layer": [16, 0, 16, 16]}, r"dense layer \(0 experts\) needs dense_intermediate_size"),
        ({"num_experts_per_layer": [16, -1, 16, 16]}, r"entries must be >= 0"),
        ({"num_shared_experts_per_layer": [1, 1, 17, 1]}, r"layer 2: 17 shared experts but 16 experts"),
        ({"always_active_experts": [16]}, r"layer 0: always-active expert ids \[16\] out of range 0\.\.15"),
        ({"always_active_experts": [1, 1]}, r"layer 0: always-active ids \[1, 1\] repeat"),
        ({"always_active_experts": [0, 1, 2, 3, 4]}, r"exceed top-k 4"),
        ({"norm_topk_prob": True}, r"layer 0: norm_topk_prob is not supported with shared experts"),
        ({"num_shared_experts": 5}, r"layer 0: top-k 4 is smaller than the 5 shared experts"),
        ({"num_experts_per_tok": 0}, r"num_experts_per_tok must be >= 1"),
        ({"num_key_value_heads": 3}, r"not a multiple of num_key_value_heads"),
        ({"hidden_size": "wide"}, r"hidden_size: Input should be a valid integer"),
        ({"model_type": "olmoe"}, r"model_type is 'olmoe', expected 'emo'"),
    ],
)
def test_inconsistent_configs_are_refused_with_the_key_named(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=r"^test/config\.json: .*" + message):
        cfg(**overrides)


def test_missing_required_key() -> None:
    data = demo_config("tiny")
    del data["num_experts"]
    with pytest.raises(ConfigError, match=r"^c\.json: num_experts: Field required"):
        EmoConfig.from_dict(data, source="c.json")


def test_s0_with_norm_topk_prob_is_accepted() -> None:
    r = cfg(num_shared_experts=0, norm_topk_prob=True).layer_routing(0)
    assert r.num_shared == 0 and r.norm_topk_prob and r.top_k == 4
