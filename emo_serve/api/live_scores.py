"""Expert scores from live routing instead of a layer-streamed profile.

Two sources, one result (`profiler.Scores`, so a subset is chosen exactly as `emo-serve profile`
chooses it):

* `score_in_engine`: when a running engine holds all of the base's experts, the examples are
  prefilled there (`max_tokens` 1, each with a cache salt of its own, so no prefix-cache hit
  skips a token, not even of a prefix two examples share) with routing capture on, under a
  private counting key. The engine's router is the model's, so
  `usage` and `frequency` come out as the profiler's (same experts chosen; scores equal within
  float tolerance), in the time of their prefills rather than of streaming the checkpoint again.
  That engine serves completions meanwhile, so the examples go in one at a time, each behind a
  semaphore shared by every profiling run (a completion waits for at most one example), and at a
  lower vLLM `priority` where the engine schedules by priority; `check_total` bounds a request.
* `scores_from_tally`: any counted routing, e.g. a model's (or one user's) observed traffic, as
  the engines counted it (`POST /v1/subsets` with `from_traffic`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import aiohttp

from ..checkpoint import Checkpoint
from ..engines import EngineProcess, Lease, ModelUnavailable
from ..engines.placement import MODEL_ARG
from ..errors import ExamplesError
from ..examples import Example, tokenize_examples
from ..profiler import ProfileError, Scores
from ..subset import BaseRef
from ..usage import PROFILE_KEY_PREFIX, Tally
from .routing import RoutingCollector

# vLLM schedules a lower `priority` value first; completions carry 0.
PROFILE_PRIORITY = 10


def scores_from_tally(ckpt: Checkpoint, tally: Tally, method: str, *, examples: Sequence[Example] = (),
                      example_tokens: Sequence[int] = (), warnings: Sequence[str] = (), dtype: str) -> Scores:
    cfg = ckpt.config
    routing = [cfg.layer_routing(i) for i in range(cfg.num_hidden_layers)]
    scores = Scores(method=method, base=BaseRef(location=ckpt.location, fingerprint=ckpt.fingerprint),
                    scores=tally.scores(method), counts=[c.tolist() for c in tally.counts],
                    tokens=tally.tokens.tolist(), routed=[r.routed_ids for r in routing],
                    shared=[r.shared_ids for r in routing], example_fingerprints=[ex.fingerprint for ex in examples],
                    example_tokens=list(example_tokens), warnings=list(warnings), dtype=dtype)
    scores._checkpoint = ckpt
    return scores


def tokenize(ckpt: Checkpoint, examples: Sequence[Example], max_tokens: int) -> tuple[list[list[int]], list[str]]:
    """The examples' token ids exactly as the profiler feeds them (truncation included)."""
    sequences, warnings = tokenize_examples(ckpt, examples, max_tokens)
    return [s.tolist() for s in sequences], warnings


def check_total(sequences: Sequence[Sequence[int]], limit: int) -> None:
    """400 naming `examples` when the examples come to more than `limit` tokens in all: each is a
    prefill in an engine (or a pass of the profiler) that everyone else waits behind."""
    total = sum(len(ids) for ids in sequences)
    if total > limit:
        raise ExamplesError(f"the {len(sequences)} examples come to {total} tokens after truncation, more than "
                            f"the server's limit of {limit} (--max-profile-tokens); send fewer or shorter "
                            "examples, or a lower max_tokens_per_example")


def priority_scheduled(proc: EngineProcess) -> bool:
    """Whether the engine was started with `--scheduling-policy priority` (vLLM refuses a request
    priority other than 0 on any other policy)."""
    args = [*proc.opts.extra_args, *proc.extra_args]
    return "--scheduling-policy=priority" in args or any(
        a == "--scheduling-policy" and b == "priority" for a, b in zip(args, args[1:]))


async def score_in_engine(lease: Lease, collector: RoutingCollector, ckpt: Checkpoint, examples: Sequence[Example],
                          sequences: list[list[int]], warnings: list[str], *, method: str, dtype: str,
                          timeout: float, gate: asyncio.Semaphore) -> Scores:
    """Prefill `sequences` (the examples' token ids) on the leased engine, one at a time through
    `gate` (shared by every profiling run on the engine), and score its routing."""
    key = f"{PROFILE_KEY_PREFIX}{uuid.uuid4().hex}"
    extra = {"priority": PROFILE_PRIORITY} if priority_scheduled(lease.proc) else {}

    async def prefill(index: int, ids: list[int]) -> None:
        body = {"model": lease.served_name, "prompt": ids, "max_tokens": 1, "temperature": 0.0,
                "vllm_xargs": {MODEL_ARG: key}, "cache_salt": f"{key}-{index}", **extra}
        failed = ModelUnavailable(f"the engine of `{lease.model}` failed while scoring the examples; retry")
        try:
            async with lease.proc.session().post("/v1/completions", json=body,
                                                 timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                await r.read()
        except (TimeoutError, aiohttp.ClientError):
            raise failed from None
        if r.status >= 500:  # a dead engine core (vLLM's 500), killed here so that it restarts
            await lease.check_engine()
            raise failed
        if r.status != 200:
            raise ProfileError(f"examples[{index}]: the engine refused the example ({r.status})", param="examples")

    collector.open_profile(key)
    try:
        for index, ids in enumerate(sequences):
            async with gate:
                await prefill(index, ids)
        await collector.collect()
        tally = collector.profiles.pop(key, None)
    finally:
        collector.profiles.pop(key, None)
    expected = sum(len(ids) for ids in sequences)
    if tally is None or tally.seen != expected:
        raise ModelUnavailable(f"the engine counted {0 if tally is None else tally.seen} of the examples' "
                               f"{expected} tokens; retry (it may have restarted meanwhile)")
    return scores_from_tally(ckpt, tally, method, examples=examples, example_tokens=[len(s) for s in sequences],
                             warnings=warnings, dtype=dtype)
