"""Pass an OpenAI request through to the model's vLLM engine and its answer back, byte for byte.

The front end adds what the engine can't know: which engine (by `model`), metrics per model
(tokens from `usage`, time to first token, latency) and clean aborts. A client that goes away
closes our upstream request, and vLLM aborts a request whose connection closes, so a dropped
client never keeps an engine busy: for streams Starlette cancels the body iterator on
disconnect; for plain requests `cancel_on_disconnect` does the same while we wait.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

import aiohttp
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from ..engines import Lease, ModelUnavailable
from ..engines.manager import UpstreamTimeout
from ..engines.placement import MODEL_ARG, ROW_ARG, USER_ARG
from ..metrics import Metrics
from ..usage import usage_key
from .errors import APIError, error_body

_USAGE = b'"usage":{'
_NO_CHOICES = b'"choices":[]'
_DONE = b"data: [DONE]"
_ERROR_EVENT = b'data: {"error"'
log = logging.getLogger(__name__)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Recorder:
    """Metrics of one model request: status, tokens, time to first token, end-to-end latency."""

    def __init__(self, metrics: Metrics, model: str, endpoint: str, start: float) -> None:
        self.metrics, self.model, self.endpoint, self.start = metrics, model, endpoint, start
        self._first = False

    def first_token(self) -> None:
        if not self._first:
            self._first = True
            self.metrics.ttft.labels(self.model).observe(time.perf_counter() - self.start)

    def usage(self, usage: Any) -> None:
        self.metrics.observe_usage(self.model, usage)

    def finish(self, status: int | str) -> None:
        self.metrics.requests.labels(self.model, self.endpoint, str(status)).inc()
        self.metrics.e2e.labels(self.model).observe(time.perf_counter() - self.start)


# What a dead or dying engine looks like from the client side.
UPSTREAM_ERRORS = (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError)


@dataclass(frozen=True)
class RelayTimeouts:
    """Bounds of one relayed request (see Settings): `read` for a whole non-streamed answer,
    `idle` between two events of a stream, `send` for a client to take an event."""

    read: float = 900.0
    idle: float = 300.0
    send: float = 30.0


def _unavailable(model: str, exc: BaseException, timeout: float | None = None,
                 aborted: bool = False) -> ModelUnavailable:
    if aborted:
        return ModelUnavailable(f"the request was ended because `{model}` was unloaded or deleted (force=true)")
    if isinstance(exc, asyncio.TimeoutError) and timeout is not None:
        return UpstreamTimeout(f"the engine of `{model}` did not answer within {timeout:.0f} s")
    return ModelUnavailable(f"the engine of `{model}` failed during the request ({type(exc).__name__}); "
                            "it restarts on the next request")


# vLLM's own answers when its engine core fails: 500 "EngineCore encountered an issue" for the
# request that meets the dead core (then the API server exits), 503 while it shuts down.
ENGINE_FAILED = (500, 503)


async def _engine_failed(lease: Lease, model: str) -> ModelUnavailable | APIError:
    """The error for a request the engine answered with a server error, whose body (a stack-trace
    pointer, vLLM's internals) is never shown. A dead engine is a 503 `model_unavailable` with
    Retry-After, and is restarted; a live one that failed this request alone a plain 500."""
    if not await lease.check_engine():
        return ModelUnavailable(f"the engine of `{model}` failed during the request; it is restarting, "
                                "retry shortly")
    return APIError(500, f"the engine of `{model}` could not complete the request", code="engine_error")


def _close(upstream: aiohttp.ClientResponse, *, finished: bool) -> None:
    """Return a finished answer's connection to the pool; drop an unfinished one's, which is
    what makes vLLM abort the request."""
    if finished:
        upstream.release()
    else:
        upstream.close()


_OURS = (ROW_ARG, MODEL_ARG, USER_ARG)


def engine_payload(payload: dict[str, Any], lease: Lease) -> dict[str, Any]:
    """The body as the engine must see it: the engine's own model name, whose tokens these are
    (the model asked for, with the salt that tells this life of it from an earlier one of the same
    name, and the OpenAI `user`, for the routing counters), and on a shared engine the subset's
    mask row and cache salt. What the client put in those places cannot select another model's
    row, count as another model or user, or share another model's prefix-cache blocks: those
    fields are always ours, and the salt is ours with the client's appended (so a client's own
    salt still isolates its requests)."""
    out = {**payload, "model": lease.served_name}
    xargs = {k: v for k, v in (payload.get("vllm_xargs") or {}).items() if k not in _OURS}
    xargs.update(lease.extra)
    xargs[MODEL_ARG] = usage_key(lease.model, lease.salt)
    user = payload.get("user")
    if isinstance(user, str) and user:
        xargs[USER_ARG] = user
    out["vllm_xargs"] = xargs
    if lease.salt is not None:
        client = payload.get("cache_salt")
        out["cache_salt"] = f"{lease.salt}:{client}" if client else lease.salt
    return out


class ModelRename:
    """Rewrites `"model":"<engine name>"` to the model the client asked for. vLLM writes JSON
    without spaces, and a quote inside a string value is escaped, so the pattern matches only the
    field itself (model ids are letters, digits, `_`, `-` and `.`: nothing JSON escapes)."""

    def __init__(self, lease: Lease) -> None:
        self.old = b'"model":' + json.dumps(lease.served_name).encode()
        self.new = b'"model":' + json.dumps(lease.model).encode()
        self.active = self.old != self.new

    def __call__(self, data: bytes) -> bytes:
        return data.replace(self.old, self.new) if self.active else data


async def forward(lease: Lease, endpoint: str, payload: dict[str, Any], recorder: Recorder,
                  request_id: str | None, timeouts: RelayTimeouts = RelayTimeouts()) -> Response:
    """Send `payload` to the leased engine; the lease is released when the answer is complete
    (for a stream: when the stream ends, fails or its client goes away)."""
    payload = engine_payload(payload, lease)
    rename = ModelRename(lease)
    stream = bool(payload.get("stream"))
    read_timeout = timeouts.idle if stream else timeouts.read
    options = payload.get("stream_options") or {}
    drop_usage = stream and not options.get("include_usage")
    if drop_usage:  # ask for usage to count tokens; the chunk is removed from what the client sees
        payload = {**payload, "stream_options": {**options, "include_usage": True}}
    headers = {"content-type": "application/json"}
    if request_id:
        headers["x-request-id"] = request_id
    try:
        upstream = await lease.proc.session().post(
            endpoint, data=json.dumps(payload).encode(), headers=headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=read_timeout))
        lease.upstream = upstream
        if lease.aborted:  # force-unloaded while the request was being sent
            upstream.close()
    except UPSTREAM_ERRORS as exc:
        lease.release()
        error = _unavailable(recorder.model, exc, read_timeout, lease.aborted)
        recorder.finish(504 if isinstance(error, UpstreamTimeout) else 503)
        raise error from None
    except BaseException:
        lease.release()
        recorder.finish("cancelled")
        raise
    is_sse = upstream.headers.get("content-type", "").startswith("text/event-stream")
    if upstream.status == 200 and is_sse:
        return ProxyStream(upstream, lease, recorder, drop_usage=drop_usage, rename=rename, timeouts=timeouts)
    status: int | str = upstream.status
    try:
        body = await upstream.read()
        if upstream.status in ENGINE_FAILED:
            failure = await _engine_failed(lease, recorder.model)
            status = failure.status if isinstance(failure, APIError) else 503
            raise failure
    except UPSTREAM_ERRORS as exc:
        error = _unavailable(recorder.model, exc, read_timeout, lease.aborted)
        status = 504 if isinstance(error, UpstreamTimeout) else 503
        raise error from None
    except (APIError, ModelUnavailable):
        raise
    except BaseException:
        status = "cancelled"
        raise
    finally:
        _close(upstream, finished=status == upstream.status or upstream.status in ENGINE_FAILED)
        lease.release()
        recorder.finish(status)
    if upstream.status == 200:
        try:
            recorder.usage(json.loads(body).get("usage"))
        except (ValueError, AttributeError):
            pass
    return Response(rename(body), status_code=upstream.status,
                    media_type=upstream.headers.get("content-type", "application/json"))


class ClientTooSlow(Exception):
    """The client left a streamed answer unread past the send timeout."""


class ProxyStream(StreamingResponse):
    """Server-sent events from the engine, passed through event by event."""

    def __init__(self, upstream: aiohttp.ClientResponse, lease: Lease, recorder: Recorder, *,
                 drop_usage: bool, rename: ModelRename, timeouts: RelayTimeouts) -> None:
        self.upstream, self.lease, self.recorder, self.drop_usage = upstream, lease, recorder, drop_usage
        self.rename, self.timeouts = rename, timeouts
        self.outcome: int | str = "cancelled"
        self.last_usage: Any = None  # counted once, by _count_usage
        self._counted = False
        super().__init__(self._events(), status_code=200, media_type="text/event-stream", headers=SSE_HEADERS)

    async def _events(self) -> AsyncIterator[bytes]:
        buf = b""
        try:
            async for chunk in self.upstream.content.iter_any():
                self.recorder.first_token()
                buf += chunk
                while (end := buf.find(b"\n\n")) >= 0:
                    event, buf = buf[: end + 2], buf[end + 2 :]
                    if _USAGE in event and self._usage(event):
                        continue
                    if event.startswith(_ERROR_EVENT) and not await self.lease.check_engine():
                        # The engine core died mid-stream: say so as ours (503), not vLLM's 500.
                        self.outcome = 503
                        yield self._error_event(ModelUnavailable(
                            f"the engine of `{self.recorder.model}` failed during the request; it is "
                            "restarting, retry shortly"))
                        return
                    if event.startswith(_DONE):
                        self._count_usage()
                    yield self.rename(event)
            if buf:
                yield self.rename(buf)
            self.outcome = 200
        except UPSTREAM_ERRORS as exc:
            # Headers are sent; all that's left is an error event, as vLLM itself streams errors.
            error = _unavailable(self.recorder.model, exc, self.timeouts.idle, self.lease.aborted)
            self.outcome = 504 if isinstance(error, UpstreamTimeout) else 503
            yield self._error_event(error)

    def _error_event(self, error: ModelUnavailable) -> bytes:
        """An error as the stream's last event, then `[DONE]`, as vLLM itself streams errors."""
        status = 504 if isinstance(error, UpstreamTimeout) else 503
        code = "upstream_timeout" if isinstance(error, UpstreamTimeout) else "model_unavailable"
        return b"data: " + json.dumps(error_body(status, str(error), code=code)).encode() + b"\n\ndata: [DONE]\n\n"

    def _usage(self, event: bytes) -> bool:
        """Keep the newest usage (with `continuous_usage_stats` every chunk carries the running
        totals, so only the last one counts); True if the event should be dropped (the usage-only
        chunk the client didn't ask for)."""
        try:
            data = json.loads(event.removeprefix(b"data: "))
            if data.get("usage") is not None:
                self.last_usage = data["usage"]
        except (ValueError, AttributeError):
            return False
        return self.drop_usage and _NO_CHOICES in event

    def _count_usage(self) -> None:
        """Count the stream's tokens once: before `[DONE]` reaches the client (so a scrape made
        as soon as the client is done sees them; the response's own end is sent later, and its
        clean-up runs later still), or at clean-up for a stream that broke off before it."""
        if not self._counted:
            self._counted = True
            self.recorder.usage(self.last_usage)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_bounded(message: Message) -> None:
            # uvicorn's send waits while the client's socket buffer is full: a client that stops
            # reading would hold its lease (and an engine slot) for as long as it likes.
            # `asyncio.timeout`, not `wait_for`: no task per event (on Python 3.11 `wait_for` makes
            # one, a measurable share of the relay's CPU per token).
            try:
                async with asyncio.timeout(self.timeouts.send):
                    await send(message)
            except TimeoutError:
                self.outcome = "client_timeout"
                raise ClientTooSlow(f"client did not read for {self.timeouts.send:.0f} s") from None

        try:
            await super().__call__(scope, receive, send_bounded)
        except ClientTooSlow as exc:
            log.warning("dropped a client that stopped reading", extra={"model": self.recorder.model,
                                                                         "error": str(exc)})
        finally:
            _close(self.upstream, finished=self.outcome == 200)
            self.lease.release()
            self._count_usage()
            self.recorder.finish(self.outcome)


async def cancel_on_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Await `work` unless the client disconnects first; then cancel it (closing its upstream
    request) — as vLLM's own `with_cancellation`. The request body must already be read."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)  # its cleanup (release, metrics) runs here
    return Response(status_code=499)  # nobody is listening; for the access log only
