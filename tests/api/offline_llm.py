"""Greedy generation with vLLM's offline `LLM` on a model directory, in a fresh process (one CPU
engine per process; engines start with spawn, hence the main guard).

Usage: python offline_llm.py MODEL_DIR MAX_TOKENS OUT_JSON PROMPT... ; writes a JSON list of
{"text", "token_ids", "prompt_token_ids", "prompt_logprobs"} to OUT_JSON (the logprob of each
prompt token from the second on).
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    model, max_tokens, out, prompts = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    llm = LLM(model=model, dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
              trust_remote_code=False)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=0)
    outs = llm.generate(prompts, params)
    with open(out, "w") as f:
        json.dump([{"text": o.outputs[0].text, "token_ids": list(o.outputs[0].token_ids),
                    "prompt_token_ids": list(o.prompt_token_ids),
                    "prompt_logprobs": [lp[tok].logprob for tok, lp in
                                        zip(o.prompt_token_ids[1:], o.prompt_logprobs[1:])]}
                   for o in outs], f)


if __name__ == "__main__":
    main()
