"""The subsets API: create (from expert ids or task examples), list, inspect, delete, load and
unload. Mutations need the admin key."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from ...errors import NotFound
from ...usage import check_window
from ..deps import AdminKey, Service
from ..errors import responses
from ..protocol import Deleted, SubsetCreate, SubsetList, SubsetObject
from .routing import heatmap_response

router = APIRouter(prefix="/v1/subsets", tags=["subsets"])



class ScoresNotFound(NotFound):
    code, default_param = "scores_not_found", "name"


Force = Query(False, description="also when requests are in flight (they fail with 503)")


@router.post("", status_code=201, response_model=SubsetObject, dependencies=[AdminKey],
             responses={202: {"model": SubsetObject, "description": "profiling started"},
                        **responses(400, 401, 409, 413, 429, 503)})
async def create_subset(body: SubsetCreate, service: Service) -> JSONResponse:
    """201 with a ready subset for explicit `experts`; 202 with state `profiling` for `examples`
    (poll `GET /v1/subsets/{name}` until `ready` or `failed`)."""
    immediate, subset = await service.create_subset(body)
    return JSONResponse(subset.model_dump(mode="json"), status_code=201 if immediate else 202)


@router.get("", response_model=SubsetList, responses=responses(401))
async def list_subsets(service: Service) -> SubsetList:
    return SubsetList(data=service.subsets())


@router.get("/{name}", response_model=SubsetObject, responses=responses(400, 401, 404))
async def get_subset(name: str, service: Service,
                     window: float | None = Query(None, description="seconds of traffic `drift` looks back "
                                                  "(1 .. --routing-retention; default: all time)")) -> SubsetObject:
    """The subset, with its `drift`: how much router mass its traffic puts outside its experts,
    collected from the engines now unless that was done under a second ago (`collected_at`)."""
    await service.lookup(name)
    service.registry.get(name)
    window = check_window(window, service.settings.routing_retention)
    await service.fresh_routing()
    return service.subset(name, window=window)


@router.get("/{name}/scores", responses={200: {"content": {"image/png": {"schema": {"type": "string",
                                                                                     "format": "binary"}}},
                                                "description": "the scores file (`emo-scores/v1`), or with "
                                                "`format=png` a layers x experts heatmap with the kept experts"},
                                           **responses(400, 401, 404, 503)})
async def subset_scores(request: Request, name: str, service: Service,
                        format: Literal["json", "png"] = Query("json")) -> Response:
    """The scores the subset's experts were chosen by (profiler, live engine or traffic)."""
    await service.lookup(name)
    if format == "png":
        return await heatmap_response(request, await service.subset_scores_heatmap(name), service.heatmaps)
    scores = await asyncio.to_thread(service.subset_scores, name)
    if scores is None:
        raise ScoresNotFound(service.scores_absent(name))
    return Response(scores.to_json(), media_type="application/json")


@router.delete("/{name}", response_model=Deleted, dependencies=[AdminKey], responses=responses(400, 401, 404, 409))
async def delete_subset(name: str, service: Service, force: bool = Force) -> Deleted:
    await service.delete_subset(name, force=force)
    return Deleted(id=name)


@router.post("/{name}/load", status_code=202, response_model=SubsetObject, dependencies=[AdminKey],
             responses=responses(400, 401, 404, 429, 503))
async def load_subset(name: str, service: Service) -> SubsetObject:
    """Start the subset's engine (state `loading`, then `loaded`)."""
    return await service.load_subset(name)


@router.post("/{name}/unload", response_model=SubsetObject, dependencies=[AdminKey],
             responses=responses(400, 401, 404, 409, 503))
async def unload_subset(name: str, service: Service, force: bool = Force) -> SubsetObject:
    return await service.unload_subset(name, force=force)
