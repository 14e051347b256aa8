"""The FastAPI application: the challenge's endpoints (`routes`) and OpenAI's (`openai_routes`)
over one engine worker.

This module never imports torch: the engine is loaded by the caller (`onegpu serve` loads it
before the port opens; tests build small ones) and handed to `create_app`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from onegpu import __version__
from onegpu.engine.worker import EngineWorker
from onegpu.server import errors, openai_routes
from onegpu.server.limits import BodySizeLimit
from onegpu.server.metrics import Metrics
from onegpu.server.request_id import RequestId
from onegpu.server.routes import ServerState, router
from onegpu.settings import ServeSettings


def create_app(settings: ServeSettings, engine) -> FastAPI:
    """The app serving `engine` (an `Engine`, or anything with its methods) with `settings`;
    its lifespan runs the engine's worker thread."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state: ServerState = app.state.onegpu
        state.worker = EngineWorker(engine, max_queue=settings.max_queue)
        try:
            yield
        finally:
            await run_in_threadpool(state.worker.close)

    app = FastAPI(
        title="onegpu",
        version=__version__,
        summary="NeurIPS LLM Efficiency Challenge server: /process, /tokenize, /decode.",
        lifespan=lifespan,
    )
    app.state.onegpu = ServerState(settings=settings, metrics=Metrics())
    errors.install(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestId)
    app.include_router(router)
    app.include_router(openai_routes.router)
    return app
