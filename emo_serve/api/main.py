"""The FastAPI application: routers, error handlers, request context, and the service's life
cycle (engines start with the app and are all stopped when it shuts down)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .. import __version__
from ..settings import Settings
from . import errors
from .deps import ApiKey
from .middleware import RequestContext
from .routes import health, openai, routing, subsets, ui
from .service import EmoService
from .serving import OpenAIServing


def create_app(settings: Settings) -> FastAPI:
    service = EmoService(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="emo-serve", version=__version__, lifespan=lifespan,
                  description="Task-specific expert subsets of EMO models behind OpenAI-compatible endpoints.")
    app.state.service = service
    app.state.serving = OpenAIServing(service)
    errors.install(app)
    app.include_router(openai.router, dependencies=[ApiKey])
    app.include_router(subsets.router, dependencies=[ApiKey])
    app.include_router(routing.router, dependencies=[ApiKey])
    app.include_router(health.router)
    app.include_router(ui.router)
    app.add_middleware(RequestContext, max_body_bytes=settings.max_body_bytes,
                       max_header_bytes=settings.max_header_bytes, allowed_hosts=settings.host_allowlist)
    return app
