"""Run one vLLM engine on a model directory, in this fresh process, and write what it produced.

Usage: python engine_job.py JOB.json  (JOB: {"model", "prompts": [[token ids]], "max_tokens",
"out", "dtype" (float32 if absent)}). The result is the greedy continuation of each prompt with
the logprob of every prompt token (from the second on) and of every generated token, as vLLM
computed them.

The tests run engines here rather than in the pytest process: one process holds one vLLM CPU
engine reliably (engine shutdown leaves workers to be force-killed), and a fresh interpreter
is what `vllm serve` gets too, plugin loaded from its entry point, nothing preloaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(job_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    job = json.loads(Path(job_path).read_text())
    llm = LLM(model=job["model"], dtype=job.get("dtype", "float32"), enforce_eager=True,
              max_model_len=512, trust_remote_code=False, seed=0)
    params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, logprobs=0,
                            prompt_logprobs=0, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], params)
    results = []
    for out in outputs:
        gen = out.outputs[0]
        results.append({
            "prompt": list(out.prompt_token_ids),
            "prompt_logprobs": [lp[tok].logprob for tok, lp in
                                zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:])],
            "tokens": list(gen.token_ids),
            "logprobs": [lp[tok].logprob for tok, lp in zip(gen.token_ids, gen.logprobs)],
        })
    Path(job["out"]).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
