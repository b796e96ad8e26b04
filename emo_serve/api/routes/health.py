"""Operational routes, unauthenticated as probes and scrapers expect: liveness, readiness,
Prometheus metrics, version. `GET /v1/engines` (API key) shows the engines for operators, and
`GET /v1/engines/{engine}/failure` (admin key) why one failed, with its log tail: the only place
outside the server log where engine log lines are shown."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from ..deps import AdminKey, ApiKey, Service
from ..errors import responses
from ..protocol import Health, Readiness, Version

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=Health)
async def health() -> Health:
    """The process is up and serving HTTP."""
    return Health(status="ok")


@router.get("/ready", response_model=Readiness, responses={503: {"model": Readiness}})
async def ready(service: Service) -> JSONResponse:
    """200 once the startup models (the base if served, preloaded subsets) have loaded."""
    r = service.readiness()
    return JSONResponse(r.model_dump(), status_code=200 if r.status == "ready" else 503)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(service: Service) -> Response:
    return Response(service.metrics.render(), media_type=service.metrics.content_type)


@router.get("/version", response_model=Version)
async def version(service: Service) -> Version:
    return service.version()


@router.get("/v1/engines", dependencies=[ApiKey], responses=responses(401))
async def engines(service: Service) -> dict[str, Any]:
    return {"object": "list", "data": service.engine_info()}


@router.get("/v1/engines/{engine}/failure", dependencies=[AdminKey], responses=responses(401, 404))
async def engine_failure(engine: str, service: Service) -> dict[str, Any]:
    return service.engine_failure(engine)
