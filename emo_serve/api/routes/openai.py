"""OpenAI-compatible routes: the aggregated model list, and completions routed by `model` to
the model's vLLM engine (which does sampling, chat templates, logprobs and usage)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..deps import Service
from ..errors import APIError, from_exception, responses
from ..limits import check_prompt
from ..protocol import ChatCompletionRequest, Completion, CompletionRequest, ModelCard, ModelList
from ..proxy import Recorder, cancel_on_disconnect, forward
from ..service import EmoService

router = APIRouter(prefix="/v1", tags=["openai"])

_GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": Completion, "description": "the engine's answer; with `stream: true`, "
          "server-sent events ending with `data: [DONE]`",
          "content": {"text/event-stream": {"schema": {"type": "string"}}}},
    **responses(400, 401, 404, 413, 429, 503, 504),
}


@router.get("/models", response_model=ModelList, responses=responses(401))
async def list_models(service: Service) -> ModelList:
    return service.models()


@router.get("/models/{model_id}", response_model=ModelCard, responses=responses(401, 404))
async def get_model(model_id: str, service: Service) -> ModelCard:
    return service.model(model_id)


@router.post("/completions", response_model=None, responses=_GENERATION_RESPONSES)
async def completions(body: CompletionRequest, request: Request, service: Service) -> Response:
    return await _generate(service, request, "/v1/completions", body)


@router.post("/chat/completions", response_model=None, responses=_GENERATION_RESPONSES)
async def chat_completions(body: ChatCompletionRequest, request: Request, service: Service) -> Response:
    return await _generate(service, request, "/v1/chat/completions", body)


async def _generate(service: EmoService, request: Request, endpoint: str,
                    body: CompletionRequest | ChatCompletionRequest) -> Response:
    start = request.state.start if hasattr(request.state, "start") else time.perf_counter()
    try:
        model = service.resolve(body.model)
    except Exception as exc:
        service.metrics.requests.labels("unknown", endpoint, str(from_exception(exc).status)).inc()
        raise
    request.state.model = model
    recorder = Recorder(service.metrics, model, endpoint, start)
    try:
        await _check_bounds(service, body)
    except APIError as exc:
        recorder.finish(exc.status)
        raise

    async def work() -> Response:
        try:
            lease = await service.placement.acquire(model)
        except Exception as exc:
            recorder.finish(from_exception(exc).status)
            raise
        return await forward(lease, endpoint, body.payload(), recorder, getattr(request.state, "request_id", None),
                             service.relay_timeouts)

    return await cancel_on_disconnect(request, work())


async def _check_bounds(service: EmoService, body: CompletionRequest | ChatCompletionRequest) -> None:
    s = service.settings
    if body.n > s.max_n:
        raise APIError(400, f"n = {body.n} is more than the limit of {s.max_n}", param="n")
    limit = service.max_model_len
    out = body.output_tokens
    if out is not None and out > limit:
        param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        raise APIError(400, f"{param} = {out} is more than the model's context of {limit} tokens", param=param)
    await check_prompt(service, body)
