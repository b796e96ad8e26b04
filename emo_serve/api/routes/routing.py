"""Live routing statistics: which experts a model's traffic (or one user's) uses, as JSON or as
a heatmap, counted in the engines (see `api/routing.py`)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response

from ..deps import Service
from ..errors import responses
from ..protocol import ModelRouting

router = APIRouter(prefix="/v1", tags=["routing"])

Window = Query(None, description="only the last `window` seconds (1 .. --routing-retention; default: all time)")
User = Query(None, min_length=1, max_length=256, description="only requests whose OpenAI `user` field was this "
             "(counted over all time)")


@router.get("/models/{model}/routing", response_model=ModelRouting,
            responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                             "description": "JSON, or with `format=png` a layers x experts heatmap"},
                       **responses(400, 401, 404)})
async def model_routing(model: str, service: Service, window: float | None = Window, user: str | None = User,
                        format: Literal["json", "png"] = Query("json")) -> Response:
    """Per layer and expert: tokens routed (top-k counts) and mean router probability; for a
    subset, its drift (router mass outside its experts) now and over time."""
    if format == "png":
        png = await service.routing_png(model, window=window, user=user)
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})
    stats, _ = await service.routing_of(model, window=window, user=user)
    return Response(stats.model_dump_json(), media_type="application/json")
