"""Schemathesis hooks for fuzzing a live server (loaded through SCHEMATHESIS_HOOKS).

Half of the generated completion requests are sent to a real, already loaded model (from
EMO_FUZZ_MODEL) with small outputs, so the fuzzing reaches the engines without running for
hours on a CPU; subset creation never starts engines (`load` off), and load/unload get names
that exist nowhere, so fuzzing never starts or stops an engine.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

import schemathesis

MODEL = os.environ["EMO_FUZZ_MODEL"]
OUTPUT_CAPS = {"n": 2, "best_of": 2, "max_tokens": 8, "max_completion_tokens": 8, "min_tokens": 8,
               "top_logprobs": 5, "logprobs": 5}


@schemathesis.hook
def map_body(context: Any, body: Any) -> Any:
    if not isinstance(body, dict):
        return body
    path = context.operation.path
    if path in ("/v1/completions", "/v1/chat/completions"):
        if zlib.crc32(json.dumps(body, sort_keys=True, default=str).encode()) % 2 == 0:
            body = {**body, "model": MODEL}
        for key, cap in OUTPUT_CAPS.items():
            if isinstance(body.get(key), int) and not isinstance(body.get(key), bool) and body[key] > cap:
                body[key] = cap
    elif path == "/v1/subsets":
        body = {**body, "load": False}
    return body


@schemathesis.hook
def map_path_parameters(context: Any, path_parameters: dict[str, Any]) -> dict[str, Any]:
    if context.operation.path.endswith(("/load", "/unload")) and "name" in path_parameters:
        return {**path_parameters, "name": f"fuzz-absent-{path_parameters['name']}"}
    return path_parameters
