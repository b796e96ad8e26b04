"""`vllm serve` (as `python -m vllm.entrypoints.openai.api_server`, the command the engine
manager spawns) on a subset manifest directory, with nothing but `--model DIR`: it starts with
the plugin loaded from its entry point and answers a completion through the real `openai`
client, greedy tokens and logprobs matching the reference."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from emo_serve.checkpoint import Checkpoint
from emo_serve.export import materialize_subset
from emo_serve.reference import forward, keep_masks
from emo_serve.subset import SubsetSpec, random_subset
from plugin_harness import LOGPROB_TOL, MAX_TOKENS, PROMPTS, engine_env

START_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def quarter_subset(tiny_base: Checkpoint) -> SubsetSpec:
    return random_subset(tiny_base, 4, "quarter", seed=1)  # 4 routed + shared of 16 per layer


@pytest.fixture(scope="module")
def server(quarter_subset: SubsetSpec, tiny_base: Checkpoint,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    model = materialize_subset(tiny_base, quarter_subset, tmp_path_factory.mktemp("serve") / "quarter")
    port = free_port()
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--host", "127.0.0.1", "--port", str(port),
           # test-size settings only; serving the directory needs no flag
           "--dtype", "float32", "--enforce-eager", "--max-model-len", "512"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=engine_env())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"api_server exited with {proc.returncode}:\n{log.read_text()[-6000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"api_server not healthy after {START_TIMEOUT_S} s:\n{log.read_text()[-6000:]}")
            time.sleep(2)
        yield url, model
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.vllm
def test_completion_from_manifest_dir_matches_reference(server, tiny_base: Checkpoint,
                                                        quarter_subset: SubsetSpec) -> None:
    from openai import OpenAI

    url, model = server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    prompt = PROMPTS[1]
    resp = client.completions.create(
        model=str(model), prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=1,
        extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True})
    choice = resp.choices[0]
    assert resp.usage.completion_tokens == MAX_TOKENS and choice.text
    tokens = [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]
    logprobs = torch.tensor(choice.logprobs.token_logprobs)

    keep = keep_masks(tiny_base.config, quarter_subset.experts)
    ref = forward(tiny_base, [torch.tensor(prompt + tokens)], keep=keep)[0].log_softmax(-1)
    n = len(prompt)
    assert ref[n - 1: -1].argmax(-1).tolist() == tokens
    ref_lp = ref[torch.arange(n - 1, n - 1 + len(tokens)), torch.tensor(tokens)]
    assert (ref_lp - logprobs).abs().max().item() <= LOGPROB_TOL
