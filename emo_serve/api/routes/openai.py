"""OpenAI-compatible routes: the aggregated model list, and completions routed by `model` to
the model's vLLM engine (which does sampling, chat templates, logprobs and usage)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..deps import Service, Serving
from ..errors import responses
from ..protocol import ChatCompletionRequest, Completion, CompletionRequest, ModelCard, ModelList

router = APIRouter(prefix="/v1", tags=["openai"])

# One server-sent event as clients parse it (`data` is a JSON chunk, or `[DONE]` at the end).
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
                            "retry": {"type": "integer"}}}

_GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": Completion, "description": "the engine's answer; with `stream: true`, "
          "server-sent events ending with `data: [DONE]`",
          "content": {"text/event-stream": {"schema": SSE_EVENT}}},
    **responses(400, 401, 404, 413, 429, 503, 504),
}


@router.get("/models", response_model=ModelList, responses=responses(401))
async def list_models(service: Service) -> ModelList:
    return service.models()


@router.get("/models/{model_id}", response_model=ModelCard, responses=responses(401, 404))
async def get_model(model_id: str, service: Service) -> ModelCard:
    return service.model(model_id)


@router.post("/completions", response_model=None, responses=_GENERATION_RESPONSES)
async def completions(body: CompletionRequest, request: Request, serving: Serving) -> Response:
    return await serving.create_completion(body, request)


@router.post("/chat/completions", response_model=None, responses=_GENERATION_RESPONSES)
async def chat_completions(body: ChatCompletionRequest, request: Request, serving: Serving) -> Response:
    return await serving.create_chat_completion(body, request)
