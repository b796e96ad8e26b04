"""Checks before a request reaches an engine, so that no body can occupy the engines for long
or crash them: how many choices and tokens it asks for (one 6 kB body with a prompt list once
asked for 16,000 choices), strings vLLM cannot encode (a lone surrogate crashed its tokenizer
path with a 500), and a prompt longer than the model's context (413), all answered without
starting (or occupying) an engine.

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
GenerationRequest = CompletionRequest | ChatCompletionRequest


def prompt_count(body: GenerationRequest) -> int:
    """Prompts in the request: a completion's prompt list (of strings or of token-id lists) is
    several; a string, one token-id list or a chat is one."""
    if isinstance(body, CompletionRequest) and isinstance(body.prompt, list) and body.prompt:
        if not all(isinstance(x, int) for x in body.prompt):
            return len(body.prompt)
    return 1


def check_size(body: GenerationRequest, *, max_n: int, max_choices: int, max_tokens: int, context: int) -> None:
    """400 when the request asks for more than one client may: `n`, choices (`n`, or `best_of`
    where larger, times the prompts) and tokens (choices times `max_tokens`, or the context
    length when it is absent, which is what vLLM then allows)."""
    if body.n > max_n:
        raise APIError(400, f"n = {body.n} is more than the limit of {max_n}", param="n")
    best_of = (body.model_extra or {}).get("best_of")
    per_prompt = max(body.n, best_of) if isinstance(best_of, int) and not isinstance(best_of, bool) else body.n
    prompts = prompt_count(body)
    choices = per_prompt * prompts
    if choices > max_choices:
        param = "prompt" if prompts > 1 else ("best_of" if per_prompt > body.n else "n")
        raise APIError(400, f"the request asks for {choices} choices ({per_prompt} for each of {prompts} "
                       f"prompts), more than the limit of {max_choices}", param=param)
    out = body.output_tokens
    tokens = choices * (out if out is not None else context)
    if tokens > max_tokens:
        param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        raise APIError(400, f"the request asks for up to {tokens} tokens ({choices} choices x "
                       f"{out if out is not None else context} tokens), more than the limit of {max_tokens}: "
                       "lower `max_tokens`, `n` or the number of prompts", param=param)


def check_encodable(value: Any, path: str = "") -> None:
    """400 naming the first string that is not valid Unicode (a lone surrogate such as `\\ud800`
    passes JSON parsing but cannot be encoded as UTF-8, and vLLM answered it with a 500)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"{path or 'body'}: the string holds a lone surrogate (invalid Unicode)",
                           param=path or None) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_encodable(key, path)
            check_encodable(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_encodable(item, f"{path}.{i}" if path else str(i))


def _texts(body: GenerationRequest) -> tuple[list[str], list[int]]:
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


async def check_prompt(body: GenerationRequest, limit: int,
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
