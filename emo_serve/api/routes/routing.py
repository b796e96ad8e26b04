"""Live routing statistics: which experts a model's traffic (or one user's) uses, as JSON or as
a heatmap, counted in the engines (see `api/routing.py`).

Heatmaps carry an ETag (a digest of what they show, `plot.Heatmap`): `/ui` refreshes every few
seconds, and a browser that holds the picture already gets a 304 instead of a new drawing."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from ...plot import Heatmap, HeatmapCache
from ...usage import MAX_USER_CHARS
from ..deps import Service
from ..errors import responses
from ..protocol import ModelRouting

router = APIRouter(prefix="/v1", tags=["routing"])

Window = Query(None, description="only the last `window` seconds (1 .. --routing-retention; default: all time)")
User = Query(None, min_length=1, max_length=MAX_USER_CHARS, description="only requests whose OpenAI `user` field "
             "was this (counted over all time)")


def _matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an `If-None-Match` header names `etag` (weak or strong: a PNG has one encoding)."""
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags


async def heatmap_response(request: Request, heatmap: Heatmap, cache: HeatmapCache) -> Response:
    """The heatmap as a PNG, drawn at most once per change (`cache`); 304 when the client has it.
    `no-cache`: the browser keeps it but asks again each time, since a new request may change it."""
    etag = f'"{heatmap.etag}"'
    headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
    if _matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    return Response(await cache.png(heatmap), media_type="image/png", headers=headers)


@router.get("/models/{model}/routing", response_model=ModelRouting,
            responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                             "description": "JSON, or with `format=png` a layers x experts heatmap"},
                       **responses(400, 401, 404)})
async def model_routing(request: Request, model: str, service: Service, window: float | None = Window,
                        user: str | None = User, format: Literal["json", "png"] = Query("json")) -> Response:
    """Per layer and expert: tokens routed (top-k counts) and mean router probability; for a
    subset, its drift (router mass outside its experts) now and over time."""
    if format == "png":
        heatmap = await service.routing_heatmap(model, window=window, user=user)
        return await heatmap_response(request, heatmap, service.heatmaps)
    stats, _ = await service.routing_of(model, window=window, user=user)
    return Response(stats.model_dump_json(), media_type="application/json")
