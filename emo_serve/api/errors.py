"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`, built in one place.

Every failure the API can meet ends here: our own `APIError`s, FastAPI's validation errors
(400, not FastAPI's default 422, as OpenAI and vLLM answer), unknown routes and methods, and the
library's typed errors, whose kind (`emo_serve.errors`: invalid input, not found, conflict, busy,
unavailable, timed out) picks the status in `STATUS_OF_KIND`.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import Busy, Conflict, EmoServeError, InvalidInput, NotFound, TimedOut, Unavailable

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


def error_body(status: int, message: str, *, param: str | None = None, code: Any = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.status, exc.message, param=exc.param, code=exc.code),
                        status_code=exc.status, headers=exc.headers)


# One table from the library's kinds of error to HTTP; the first kind that matches wins.
STATUS_OF_KIND: list[tuple[type[EmoServeError], int, dict[str, str] | None]] = [
    (TimedOut, 504, None),
    (NotFound, 404, None),
    (Conflict, 409, None),
    (Busy, 429, {"Retry-After": "5"}),
    (Unavailable, 503, {"Retry-After": "5"}),
    (InvalidInput, 400, None),
    (EmoServeError, 400, None),
]


def from_exception(exc: Exception) -> APIError:
    """The API error for any exception (one mapping, used by routes and handlers); anything
    that is not one of ours is a 500 that says nothing of its cause."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EmoServeError):
        for kind, status, headers in STATUS_OF_KIND:
            if isinstance(exc, kind):
                return APIError(status, str(exc), param=exc.param, code=exc.code, headers=headers)
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
    if err.status >= 500 and not isinstance(exc, (APIError, EmoServeError)):
        log.error("unhandled error", exc_info=exc)
    return error_response(err)


def install(app: FastAPI) -> None:
    # Starlette types handlers as taking any Exception; these take the class they are registered for.
    app.add_exception_handler(RequestValidationError, _validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http)  # type: ignore[arg-type]
    for cls in (APIError, EmoServeError, Exception):
        app.add_exception_handler(cls, _api)


# Documented responses of every route (OpenAPI), so clients and schema fuzzers know the shape.
def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorResponse, "description": TYPES.get(s, "error")} for s in statuses}
