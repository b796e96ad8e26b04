"""The outermost layer of every request: a request id, the Host allowlist, a bound on the body,
one log line.

Pure ASGI (not Starlette's BaseHTTPMiddleware), so streamed responses pass through untouched and
the body limit holds for chunked uploads that carry no Content-Length.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..logs import request_id_var
from .errors import error_body

log = logging.getLogger("emo_serve.access")

_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the limit of {limit} bytes")


# Probes and scrapers address the server by whatever name reaches it (a pod IP, a compose
# service name) and these routes are unauthenticated anyway: no Host check.
HOST_EXEMPT_PATHS = frozenset({"/health", "/ready", "/metrics"})


def host_name(value: bytes) -> str:
    """The host part of a Host header (`name`, `name:port`, `[v6]:port`), lower-cased."""
    host = value.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class RequestContext:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, max_header_bytes: int,
                 allowed_hosts: frozenset[str] | None = None) -> None:
        self.app, self.max_body_bytes, self.max_header_bytes = app, max_body_bytes, max_header_bytes
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope.get("headers") or ())
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _CLIENT_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"], state["start"] = rid, start
        token = request_id_var.set(rid)
        status = 0
        limit = self.max_body_bytes
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def send_tagged(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            # uvicorn (h11) refuses header blocks that arrive over several reads past the limit;
            # this catches the ones that arrived in one read.
            header_bytes = sum(len(k) + len(v) + 4 for k, v in scope.get("headers") or ())
            length = headers.get(b"content-length")
            host = host_name(headers.get(b"host", b""))
            if (self.allowed_hosts is not None and scope.get("path") not in HOST_EXEMPT_PATHS
                    and host not in self.allowed_hosts):
                await _reject(send_tagged, 400, f"the Host header `{host[:64]}` is not one this server answers "
                              "(see --allowed-hosts)")
            elif header_bytes > self.max_header_bytes:
                await _reject(send_tagged, 431, f"request headers are larger than the limit of "
                              f"{self.max_header_bytes} bytes")
            elif length is not None and (not length.isdigit() or int(length) > limit):
                await _reject(send_tagged, 413, f"request body is larger than the limit of {limit} bytes")
            else:
                await self.app(scope, receive_limited, send_tagged)
        finally:
            log.info("request", extra={
                "method": scope.get("method"), "path": scope.get("path"), "status": status,
                "ms": round((time.perf_counter() - start) * 1000, 2), "model": state.get("model"),
                "client": (scope.get("client") or ("", 0))[0]})
            request_id_var.reset(token)


async def _reject(send: Send, status: int, message: str) -> None:
    """Answer before the app runs (the body is not read: the connection is closed after)."""
    body = json.dumps(error_body(status, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
