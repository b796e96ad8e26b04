"""Prompt-size checks before a request reaches an engine: a prompt longer than the model's
context is a 413, answered without starting (or occupying) an engine.

Cheap first: a byte-level BPE tokenizer (EMO's) never makes more tokens than the text has UTF-8
bytes, so short prompts pass without tokenizing; only longer ones are counted with the base's
tokenizer (off the event loop). Chat prompts are counted by their message contents, a lower
bound of the templated prompt; the engine still checks the exact length (400).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from .errors import APIError
from .protocol import ChatCompletionRequest, CompletionRequest

_SPECIAL_MARGIN = 8  # tokens a post-processor may add (BOS/EOS)


def _texts(body: CompletionRequest | ChatCompletionRequest) -> tuple[list[str], list[int]]:
    """(texts to count, lengths of prompts given as token ids)."""
    if isinstance(body, CompletionRequest):
        p = body.prompt
        if isinstance(p, str):
            return [p], []
        if p and all(isinstance(x, int) for x in p):
            return [], [len(p)]
        return [x for x in p if isinstance(x, str)], [len(x) for x in p if isinstance(x, list)]
    parts: list[str] = []
    for m in body.messages:
        content: Any = m.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [c["text"] for c in content if isinstance(c, dict) and isinstance(c.get("text"), str)]
    return ["\n".join(parts)], []


async def check_prompt(body: CompletionRequest | ChatCompletionRequest, limit: int,
                       tokenizer: Callable[[], Awaitable[Any]]) -> None:
    """413 if the prompt is longer than `limit` tokens; `tokenizer()` gives the base's tokenizer,
    asked for only when a prompt is long enough to need counting."""
    texts, id_lengths = _texts(body)
    too_long = [n for n in id_lengths if n > limit]
    long_texts = [t for t in texts if len(t.encode("utf-8", "replace")) + _SPECIAL_MARGIN > limit]
    if long_texts:
        tok = await tokenizer()
        counts = await asyncio.to_thread(lambda: [len(tok.encode(t).ids) for t in long_texts])
        too_long += [n for n in counts if n > limit]
    if too_long:
        raise APIError(413, f"the prompt is {max(too_long)} tokens, more than the model's context of "
                       f"{limit} tokens", param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                       code="context_length_exceeded")
