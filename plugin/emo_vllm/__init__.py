"""vLLM plugin for EMO mixture-of-experts checkpoints and emo-serve subset manifests.

vLLM calls `register()` (entry point group `vllm.general_plugins`) in every process it starts:
the API server, the engine core and each worker. It must therefore be cheap and idempotent,
and it registers the model by its import string, so loading the plugin imports no model code.
It is also the first code of ours in each of those processes, so it is where the process asks
for the CPU permission that vLLM's AMX kernels need (`emo_vllm.cpu`).

Three kinds of directory then serve with no extra flag and `trust_remote_code` off::

    python -m vllm.entrypoints.openai.api_server --model DIR

(a) a base EMO checkpoint, (b) a subset written by `emo-serve subset export`, and (c) a
manifest directory written by `emo-serve subset materialize` (config + tokenizer +
`subset.json`, no weights), whose weights are streamed from the base checkpoint named in the
manifest, reading only the subset's byte ranges (see `emo_vllm.manifest`).
"""

from __future__ import annotations

ARCHITECTURE = "EmoForCausalLM"
MODEL_CLASS = "emo_vllm.emo:EmoForCausalLM"

__all__ = ["register", "ARCHITECTURE", "MODEL_CLASS"]


def register() -> None:
    """Register the EMO config with transformers and the model with vLLM (safe to repeat)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from .config import EmoConfig
    from .cpu import prepare_cpu

    prepare_cpu()  # before any kernel of this process runs: AMX needs a permission (see .cpu)
    AutoConfig.register(EmoConfig.model_type, EmoConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
