"""The plugin's registration: idempotent, lazy (no model code imported), and enough for vLLM's
own config resolution to take an auto_map checkpoint without trust_remote_code."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

from plugin_harness import remote_code_markers

import emo_vllm
from emo_vllm.config import EmoConfig


def test_entry_point_is_declared() -> None:
    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("emo") == "emo_vllm:register"


def test_register_is_idempotent_and_registers_by_string() -> None:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from vllm import ModelRegistry

    emo_vllm.register()
    emo_vllm.register()
    assert CONFIG_MAPPING["emo"] is EmoConfig
    assert isinstance(AutoConfig.for_model("emo"), EmoConfig)
    assert emo_vllm.ARCHITECTURE in ModelRegistry.get_supported_archs()


def test_register_imports_no_model_code() -> None:
    """What vLLM does in every process: load the entry point, call it. The model module (and
    with it vLLM's layers) must only be imported when a model is built (`cpu` only asks for the
    CPU's AMX permission: no torch, no vLLM)."""
    code = ("import sys, emo_vllm; emo_vllm.register(); "
            "print(sorted(m for m in sys.modules if m.startswith('emo_vllm')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "['emo_vllm', 'emo_vllm.config', 'emo_vllm.cpu']"


def test_vllm_resolves_auto_map_config_without_remote_code(hub_style_ckpt: Path) -> None:
    from vllm.transformers_utils.config import get_config

    emo_vllm.register()
    config = get_config(str(hub_style_ckpt), trust_remote_code=False)
    assert type(config) is EmoConfig
    assert config.auto_map  # the Hub pointer is still there, it just isn't followed
    assert config.num_shared_experts == 1 and config.head_dim == 64
    assert config.rope_parameters["rope_theta"] == 500000.0
    assert remote_code_markers(hub_style_ckpt) == []


def test_routing_config_matches_emo_serve(tiny_base) -> None:
    emo_vllm.register()
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_base.location, trust_remote_code=False)
    routing = config.routing_config()
    for layer in range(tiny_base.config.num_hidden_layers):
        assert routing.layer_routing(layer) == tiny_base.config.layer_routing(layer)
    assert routing.rope_theta == tiny_base.config.rope_theta
