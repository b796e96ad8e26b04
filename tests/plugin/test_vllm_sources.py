"""vLLM's sources, as the plugin relies on them, in every release the `cuda` extra allows.

scripts/check-vllm-sources.py reads each release's CUDA wheel as a zip (CI has no GPU, and the wheels
cannot be imported without one): the plugin's vLLM imports and call keywords, Model Runner V2's
model-state interface, and the model registry. The first run downloads the wheels (~0.9 GB for three
releases) into ${XDG_CACHE_HOME:-~/.cache}/emo-serve/vllm-wheels; later runs read them from there.
Offline, deselect the downloading tests with `-m "not network"`.

The fake-wheel tests below show the checker fails loudly, naming the file and what changed, when
something the plugin relies on is missing.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
CHECKER_PATH = REPO / "scripts" / "check-vllm-sources.py"


def load_checker() -> ModuleType:
    """The checker script as a module (its file name has dashes, so no plain import)."""
    spec = importlib.util.spec_from_file_location("check_vllm_sources", CHECKER_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


checker = load_checker()


# -- the real releases ------------------------------------------------------------------------------
@pytest.mark.network
@pytest.mark.parametrize("version", checker.checked_versions())
def test_checked_vllm_release_has_what_the_plugin_relies_on(version: str) -> None:
    wheel = checker.fetch_wheel(version, checker.wheel_cache_dir())
    report = checker.check_wheel(wheel)
    assert report.version == version
    assert not report.failures(), "\n".join(report.failures())


def test_the_scan_sees_the_plugins_vllm_imports_and_calls() -> None:
    """The source checks are only as good as the scan: it must find the plugin's vLLM imports (at
    module level and inside functions) and the keyword calls into vLLM, or the checks pass vacuously."""
    plugin = checker.scan_plugin(checker.PLUGIN_DIR)
    assert any(imp.eager for imp in plugin.imports) and any(not imp.eager for imp in plugin.imports)
    assert any(use.is_call and use.keywords for use in plugin.uses)


def test_cuda_extra_allows_exactly_the_checked_minors() -> None:
    """The `cuda` extra's range and the checked list agree: each minor release the extra allows has a
    checked version, and the extra allows nothing before the first or after the last."""
    with (REPO / "pyproject.toml").open("rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]["cuda"]
    [spec] = [Requirement(r).specifier for r in extras if Requirement(r).name == "vllm"]
    checked = sorted(Version(v) for v in checker.checked_versions())
    minors = sorted({(v.major, v.minor) for v in checked})
    assert all(spec.contains(v) for v in checked), f"the cuda extra ({spec}) excludes a checked version"
    assert all(b == (a[0], a[1] + 1) for a, b in zip(minors, minors[1:])), f"a minor is not checked: {minors}"
    first, last = minors[0], minors[-1]
    if first[1] > 0:
        assert not spec.contains(f"{first[0]}.{first[1] - 1}.99"), f"{spec} allows a release before {checked[0]}"
    assert not spec.contains(f"{last[0]}.{last[1] + 1}.0"), f"{spec} allows a release after the {last} series"


# -- a fake vLLM: what the checks read, and nothing else ----------------------------------------------
FAKE_VLLM = {
    # the lazy export the real vllm/__init__.py uses for ModelRegistry
    "vllm/__init__.py": """
        import typing

        MODULE_ATTRS = {"ModelRegistry": ".model_executor.models:ModelRegistry"}

        if typing.TYPE_CHECKING:
            from vllm.model_executor.models import ModelRegistry
        else:
            def __getattr__(name):
                from importlib import import_module

                module_name, attr_name = MODULE_ATTRS[name].split(":")
                return getattr(import_module(module_name, __package__), attr_name)
    """,
    "vllm/model_executor/models/__init__.py": """
        from .registry import ModelRegistry
    """,
    "vllm/model_executor/models/registry.py": """
        class _ModelRegistry:
            def get_supported_archs(self):
                return set()

            def register_model(self, model_arch, model_cls):
                pass

        ModelRegistry = _ModelRegistry()
    """,
    "vllm/model_executor/layers/fused_moe/__init__.py": """
        from vllm.model_executor.layers.fused_moe.layer import FusedMoEFactory
    """,
    "vllm/model_executor/layers/fused_moe/layer.py": """
        def FusedMoEFactory(num_experts, top_k, hidden_size, intermediate_size, renormalize=True,
                            quant_config=None, prefix="", custom_routing_function=None, shared_experts=None):
            pass
    """,
    "vllm/model_executor/layers/fused_moe/router/fused_moe_router.py": """
        class FusedMoERouter:
            def set_capture_fn(self, capture_fn):
                pass
    """,
    "vllm/v1/core/sched/output.py": """
        from dataclasses import dataclass

        @dataclass
        class NewRequestData:
            req_id: str
            sampling_params: object
    """,
    "vllm/v1/worker/gpu/input_batch.py": """
        from dataclasses import dataclass

        import numpy as np

        @dataclass
        class InputBatch:
            req_ids: list[str]
            num_reqs: int
            idx_mapping_np: np.ndarray
            num_scheduled_tokens: np.ndarray
            num_tokens: int
            num_tokens_after_padding: int
    """,
    "vllm/v1/worker/gpu/model_states/__init__.py": """
        def resolve_model_state_cls(vllm_config, model):
            if hasattr(model, "get_model_state_cls"):
                return model.get_model_state_cls()
            from vllm.v1.worker.gpu.model_states.default import DefaultModelState
            return DefaultModelState
    """,
    "vllm/v1/worker/gpu/model_states/interface.py": """
        from abc import ABC, abstractmethod

        class ModelState(ABC):
            def __init__(self, vllm_config, model, encoder_cache, device):
                self.max_num_reqs = vllm_config.scheduler_config.max_num_seqs

            @abstractmethod
            def add_request(self, req_index, new_req_data):
                raise NotImplementedError

            @abstractmethod
            def remove_request(self, req_id):
                raise NotImplementedError

            @abstractmethod
            def prepare_inputs(self, input_batch, req_states):
                raise NotImplementedError

            @abstractmethod
            def prepare_dummy_inputs(self, num_reqs, num_tokens):
                raise NotImplementedError
    """,
    "vllm/v1/worker/gpu/model_states/default.py": """
        from vllm.v1.worker.gpu.model_states.interface import ModelState

        class DefaultModelState(ModelState):
            def add_request(self, req_index, new_req_data):
                pass

            def remove_request(self, req_id):
                pass

            def prepare_inputs(self, input_batch, req_states):
                return {}

            def prepare_dummy_inputs(self, num_reqs, num_tokens):
                return {}
    """,
}

FAKE_PLUGIN = {
    "emo_vllm/__init__.py": """
        def register():
            from vllm import ModelRegistry

            if "EmoForCausalLM" not in ModelRegistry.get_supported_archs():
                ModelRegistry.register_model("EmoForCausalLM", "emo_vllm.emo:EmoForCausalLM")
    """,
    "emo_vllm/emo.py": """
        from vllm.model_executor.layers.fused_moe import FusedMoEFactory
        from vllm.v1.worker.gpu.model_states.default import DefaultModelState


        def experts(shared):
            return FusedMoEFactory(shared_experts=shared, num_experts=8, top_k=2, hidden_size=16,
                                   intermediate_size=32, renormalize=False, prefix="model.experts")


        def capture(router, fn):
            router.set_capture_fn(fn)


        def v1_runner():
            from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # V1 only: gone in 0.34

            return GPUModelRunner
    """,
}

FAKE_VERSION = "9.9.9"


def write_fake(tmp_path: Path, vllm: dict[str, str] = FAKE_VLLM,
               plugin: dict[str, str] = FAKE_PLUGIN) -> tuple[Path, Path]:
    """A fake vLLM wheel and a fake plugin package, in tmp_path."""
    wheel = tmp_path / f"vllm-{FAKE_VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, source in vllm.items():
            zf.writestr(name, textwrap.dedent(source).lstrip())
    for name, source in plugin.items():
        (tmp_path / "plugin" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "plugin" / name).write_text(textwrap.dedent(source).lstrip())
    return wheel, tmp_path / "plugin" / "emo_vllm"


def with_fault(files: dict[str, str], path: str, old: str, new: str) -> dict[str, str]:
    source = textwrap.dedent(files[path])
    assert old in source, f"the fault's text is not in {path}"
    return {**files, path: source.replace(old, new)}


def test_complete_fake_passes(tmp_path: Path) -> None:
    """The fake is complete, so each fault below fails because of that fault alone; the V1-only
    import inside a function is noted, not failed, for a release after 0.34."""
    report = checker.check_wheel(*write_fake(tmp_path))
    assert report.failures() == []
    assert report.outcomes["router set_capture_fn"].skipped is None
    [note] = report.notes()
    assert "vllm.v1.worker.gpu_model_runner.GPUModelRunner inside a function: V1-only" in note


def test_cli_fails_loudly_naming_what_changed(tmp_path: Path) -> None:
    """Fake fault: this vLLM's InputBatch has no `idx_mapping_np`, which the plugin's model state reads."""
    vllm = with_fault(FAKE_VLLM, "vllm/v1/worker/gpu/input_batch.py", "    idx_mapping_np: np.ndarray\n", "")
    wheel, plugin_dir = write_fake(tmp_path, vllm)
    run = subprocess.run([sys.executable, str(CHECKER_PATH), "--wheel", str(wheel), "--plugin", str(plugin_dir)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "vLLM 9.9.9: vllm/v1/worker/gpu/input_batch.py InputBatch lacks field idx_mapping_np" in run.stdout
    assert "InputBatch fields      FAIL (1)" in run.stdout


VLLM_FAULTS = {
    "fused MoE drops a keyword the plugin passes": (
        "vllm/model_executor/layers/fused_moe/layer.py", ", shared_experts=None", "",
        "vllm/model_executor/layers/fused_moe/layer.py FusedMoEFactory() has no parameter `shared_experts` "
        "(emo_vllm/emo.py:6 passes it)"),
    "ModelState.prepare_inputs gains a parameter": (
        "vllm/v1/worker/gpu/model_states/interface.py", "def prepare_inputs(self, input_batch, req_states)",
        "def prepare_inputs(self, input_batch, req_states, extra)",
        "vllm/v1/worker/gpu/model_states/interface.py ModelState.prepare_inputs takes "
        "(self, input_batch, req_states, extra), the plugin's override takes (self, input_batch, req_states)"),
    "DefaultModelState no longer a ModelState": (
        "vllm/v1/worker/gpu/model_states/default.py", "class DefaultModelState(ModelState):",
        "class DefaultModelState:",
        "vllm/v1/worker/gpu/model_states/default.py DefaultModelState does not subclass ModelState"),
    "the runner stops asking the model for its state": (
        "vllm/v1/worker/gpu/model_states/__init__.py", "get_model_state_cls", "model_state_cls",
        "vllm/v1/worker/gpu/model_states/__init__.py resolve_model_state_cls does not ask the model "
        "for get_model_state_cls()"),
    "NewRequestData renames sampling_params": (
        "vllm/v1/core/sched/output.py", "sampling_params: object", "params: object",
        "vllm/v1/core/sched/output.py NewRequestData lacks field sampling_params"),
    "the lazy export of ModelRegistry goes": (
        "vllm/__init__.py", '"ModelRegistry": ".model_executor.models:ModelRegistry"', "",
        "vllm/__init__.py has no ModelRegistry (emo_vllm/__init__.py:2 imports it)"),
    "the registry loses register_model": (
        "vllm/model_executor/models/registry.py", "def register_model(", "def add_model(",
        "vllm/model_executor/models/registry.py ModelRegistry lacks method register_model"),
    "the router loses its capture hook": (
        "vllm/model_executor/layers/fused_moe/router/fused_moe_router.py", "def set_capture_fn(", "def capture(",
        "vllm/model_executor/layers/fused_moe/router/fused_moe_router.py FusedMoERouter lacks method "
        "set_capture_fn"),
}


@pytest.mark.parametrize("fault", VLLM_FAULTS)
def test_each_fault_in_vllm_is_named(tmp_path: Path, fault: str) -> None:
    """Fake faults: one thing the plugin relies on changes in the fake vLLM, and a failure names it
    (with what follows from it: a registry no longer exported also fails the registry check)."""
    path, old, new, expected = VLLM_FAULTS[fault]
    report = checker.check_wheel(*write_fake(tmp_path, with_fault(FAKE_VLLM, path, old, new)))
    assert f"vLLM {FAKE_VERSION}: {expected}" in report.failures()
    assert all(f.startswith(f"vLLM {FAKE_VERSION}: {path}") or "ModelRegistry" in f for f in report.failures())


def test_v1_only_module_imported_at_module_level_fails(tmp_path: Path) -> None:
    """Fake fault in the plugin: a V1-only module imported at module level would break importing the
    plugin module on vLLM >= 0.34, so the allow-list does not cover it."""
    plugin = with_fault(FAKE_PLUGIN, "emo_vllm/emo.py", "from vllm.v1.worker.gpu.model_states.default",
                        "from vllm.v1.worker.gpu_model_runner import GPUModelRunner\n"
                        "from vllm.v1.worker.gpu.model_states.default")
    report = checker.check_wheel(*write_fake(tmp_path, plugin=plugin))
    [failure] = report.failures()
    assert failure.startswith("vLLM 9.9.9: vllm/v1/worker/gpu_model_runner.py is missing (emo_vllm/emo.py:2 imports "
                              "vllm.v1.worker.gpu_model_runner.GPUModelRunner at module level")


def test_a_new_plugin_module_is_scanned(tmp_path: Path) -> None:
    """Fake fault: a plugin module added later imports a name this vLLM lacks; no list to edit."""
    plugin = {**FAKE_PLUGIN, "emo_vllm/later.py": "from vllm.v1.worker.gpu.input_batch import InputBuffers\n"}
    report = checker.check_wheel(*write_fake(tmp_path, plugin=plugin))
    assert report.failures() == [
        "vLLM 9.9.9: vllm/v1/worker/gpu/input_batch.py has no InputBuffers (emo_vllm/later.py:1 imports it)"]
