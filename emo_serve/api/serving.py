"""Serving OpenAI completions and chat, apart from HTTP routing: the steps every generation
request takes, in order, as vLLM's `OpenAIServingCompletion` does for its engine.

resolve the model -> check the request's bounds -> check the prompt's length -> acquire the
model's engine (starting it if needed) -> forward the body and relay the answer. A failure at any
step is recorded once (status, latency) by the request's `Recorder` and raised as the library's
typed error; the routes only turn it into a response.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import Response

from .errors import APIError, from_exception
from .limits import check_encodable, check_prompt, check_size
from .protocol import ChatCompletionRequest, CompletionRequest
from .proxy import Recorder, cancel_on_disconnect, forward
from .service import EmoService

GenerationRequest = CompletionRequest | ChatCompletionRequest
T = TypeVar("T")


class OpenAIServing:
    def __init__(self, service: EmoService) -> None:
        self.service = service

    async def create_completion(self, body: CompletionRequest, request: Request) -> Response:
        return await self._generate(request, "/v1/completions", body)

    async def create_chat_completion(self, body: ChatCompletionRequest, request: Request) -> Response:
        return await self._generate(request, "/v1/chat/completions", body)

    async def _generate(self, request: Request, endpoint: str, body: GenerationRequest) -> Response:
        service = self.service
        start = getattr(request.state, "start", None) or time.perf_counter()
        # Until the model is known, failures count under "unknown" (no label per bad model name).
        recorder = Recorder(service.metrics, "unknown", endpoint, start)
        model = await _recorded(recorder, _resolve(service, body.model))
        recorder.model = request.state.model = model
        await _recorded(recorder, self._check(body))

        async def work() -> Response:
            lease = await _recorded(recorder, service.placement.acquire(model))
            return await forward(lease, endpoint, body.payload(), recorder,
                                 getattr(request.state, "request_id", None), service.relay_timeouts)

        return await cancel_on_disconnect(request, work())

    async def _check(self, body: GenerationRequest) -> None:
        """The front end's own bounds (vLLM checks the sampling parameters themselves)."""
        s, limit = self.service.settings, self.service.max_model_len
        check_size(body, max_n=s.max_n, max_choices=s.max_choices, context=limit,
                   max_tokens=s.max_request_tokens or s.max_n * limit)
        check_encodable(body.payload())
        out = body.output_tokens
        if out is not None and out > limit:
            param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
            raise APIError(400, f"{param} = {out} is more than the model's context of {limit} tokens", param=param)
        await check_prompt(body, limit, self.service.tokenizer)


async def _resolve(service: EmoService, model: str) -> str:
    return await service.resolve_model(model)


async def _recorded(recorder: Recorder, step: Awaitable[T]) -> T:
    """Await one step of a request; if it fails, record the failure's status before raising."""
    try:
        return await step
    except Exception as exc:
        recorder.finish(from_exception(exc).status)
        raise
