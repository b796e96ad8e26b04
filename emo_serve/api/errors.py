"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`, built in one place.

Every failure the API can meet ends here: our own `APIError`s, FastAPI's validation errors
(400, not FastAPI's default 422, as OpenAI and vLLM answer), unknown routes and methods, the
engine manager's errors (unknown model 404, unavailable 503, capacity 429, in use 409) and the
library's typed errors (bad subset or examples: 400).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engines import CapacityExhausted, EngineError, ModelInUse, ModelUnavailable, UnknownModel
from ..engines.manager import UpstreamTimeout
from ..errors import EmoServeError
from ..store import NameTaken, SubsetNotFound

log = logging.getLogger(__name__)

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
         413: "invalid_request_error", 431: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
         503: "service_unavailable_error", 504: "timeout_error"}


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class APIError(Exception):
    """Raise anywhere in a route; becomes an OpenAI-shaped JSON error with `status`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def error_body(status: int, message: str, *, param: str | None = None, code: Any = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.status, exc.message, param=exc.param, code=exc.code),
                        status_code=exc.status, headers=exc.headers)


def from_exception(exc: Exception) -> APIError:
    """The API error for a library or engine error (one mapping, used by routes and handlers)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, UnknownModel):
        return model_not_found(str(exc))
    if isinstance(exc, CapacityExhausted):
        return APIError(429, str(exc), code="engine_capacity_exhausted", headers={"Retry-After": "5"})
    if isinstance(exc, UpstreamTimeout):
        return APIError(504, str(exc), param="model", code="upstream_timeout")
    if isinstance(exc, ModelUnavailable):
        return APIError(503, str(exc), param="model", code="model_unavailable", headers={"Retry-After": "5"})
    if isinstance(exc, ModelInUse):
        return APIError(409, str(exc), code="model_in_use")
    if isinstance(exc, EngineError):
        return APIError(503, str(exc), code="engine_error")
    if isinstance(exc, SubsetNotFound):
        return APIError(404, str(exc), param="name", code="subset_not_found")
    if isinstance(exc, NameTaken):
        return APIError(409, str(exc), param="name", code="name_taken")
    if isinstance(exc, EmoServeError):
        return APIError(400, str(exc))
    return APIError(500, "internal server error", code="internal_error")


def _loc(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _loc(tuple(first.get("loc", ())))
    message = "; ".join(f"{_loc(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg')}" for e in errors[:5])
    return error_response(APIError(400, message or "invalid request", param=param))


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed on "
               f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
    return error_response(APIError(exc.status_code, message, headers=getattr(exc, "headers", None)))


async def _api(request: Request, exc: Exception) -> JSONResponse:
    err = from_exception(exc)
    if err.status >= 500 and not isinstance(exc, (APIError, EngineError)):
        log.error("unhandled error", exc_info=exc)
    return error_response(err)


def install(app: FastAPI) -> None:
    # Starlette types handlers as taking any Exception; these take the class they are registered for.
    app.add_exception_handler(RequestValidationError, _validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http)  # type: ignore[arg-type]
    for cls in (APIError, EngineError, EmoServeError, Exception):
        app.add_exception_handler(cls, _api)


# Documented responses of every route (OpenAPI), so clients and schema fuzzers know the shape.
def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorResponse, "description": TYPES.get(s, "error")} for s in statuses}
