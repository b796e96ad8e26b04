"""`GET /ui`: one page for operators. Models and subsets with state, memory and engine; per
subset its profiling scores beside its live usage (heatmaps from the JSON API's `format=png`),
and its drift over time. Server-rendered (Jinja2, autoescaped) with one small script that
refreshes it in place; no build step and nothing from a CDN, so it works offline. Behind the API
key when one is set (a browser is asked with a Basic challenge; see `deps.require_page_key`)."""

from __future__ import annotations

import time
from functools import cache
from importlib.resources import files
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape

from ..deps import PageKey, Service
from ..service import EmoService

router = APIRouter(tags=["page"], include_in_schema=False)


@cache
def _templates() -> Environment:
    return Environment(loader=PackageLoader("emo_serve.api", "templates"), autoescape=select_autoescape(["html"]))


def drift_points(series: list[tuple[float, float | None]], width: int = 480, height: int = 90) -> dict[str, Any]:
    """SVG coordinates of a drift series (x: time, y: 0..1 mass outside), one point per bucket."""
    measured = [(t, d) for t, d in series if d is not None]
    if not measured:
        return {"xy": [], "points": "", "count": 0, "width": width, "height": height}
    t0, t1 = measured[0][0], measured[-1][0]
    span = max(t1 - t0, 1.0)
    xy = [(round((t - t0) / span * (width - 10) + 5, 1), round(height - 5 - d * (height - 10), 1), d)
          for t, d in measured]
    return {"xy": xy, "points": " ".join(f"{x},{y}" for x, y, _ in xy), "count": len(xy), "width": width,
            "height": height, "span_minutes": span / 60}


def page(service: EmoService) -> str:
    models = service.models().data
    subsets = service.subsets()
    routing = service.routing
    drift = {s.id: drift_points([(start, t.drift) for start, t in routing.series(s.id)]) if routing else None
             for s in subsets}
    version = service.version()
    table = getattr(service.placement, "expert_slots", None)
    slots = [(layer, held) for layer, held in enumerate(table.occupancy()) if held] if table is not None else None
    return _templates().get_template("ui.html").render(slots=slots,
        version=version, mode=service.engine_mode, capture=service.routing is not None, models=models,
        subsets=subsets, drift=drift, base_id=service.base_id, serve_base=service.settings.serve_base,
        now=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime()))


@router.get("/ui", response_class=HTMLResponse, dependencies=[PageKey])
async def ui(service: Service) -> HTMLResponse:
    """As of the last collection of the routing counters (the page refreshes itself)."""
    await service.pull_fleet()  # the other replicas' saved counts, with a shared store
    return HTMLResponse(page(service), headers={"Cache-Control": "no-store"})


@router.get("/ui/ui.js", dependencies=[PageKey])
async def ui_script() -> Response:
    script = files("emo_serve.api").joinpath("static/ui.js").read_text(encoding="utf-8")
    return Response(script, media_type="text/javascript", headers={"Cache-Control": "no-cache"})
