"""The FastAPI application: the challenge's endpoints over one engine worker.

This module never imports torch: the engine is injected (tests) or built by a factory that is
only imported inside the lifespan.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool

from onegpu import __version__
from onegpu.engine.types import (
    Completion,
    EngineError,
    EngineUnavailableError,
    GenerationRequest,
    RequestCancelledError,
)
from onegpu.engine.worker import EngineWorker
from onegpu.server import errors
from onegpu.server.limits import BodySizeLimit
from onegpu.server.metrics import CONTENT_TYPE_LATEST, Metrics
from onegpu.server.schemas import (
    DecodeRequest,
    DecodeResponse,
    Health,
    ProcessRequest,
    ProcessResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from onegpu.settings import ServeSettings

log = logging.getLogger(__name__)

# How often a waiting request checks for a client that went away.
_POLL_SECONDS = 0.25


def _default_factory(settings: ServeSettings) -> Callable[[], object]:
    def build():
        from onegpu.engine.loading import load_engine

        return load_engine(settings.engine_config())

    return build


def create_app(settings: ServeSettings | None = None, engine=None) -> FastAPI:
    """Build the app. With `engine=None` the lifespan loads the model that `settings` names."""
    settings = settings or ServeSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = engine
        if loaded is None:
            loaded = await run_in_threadpool(_default_factory(settings))
        app.state.worker = EngineWorker(loaded, max_queue=settings.max_queue)
        try:
            yield
        finally:
            await run_in_threadpool(app.state.worker.close)

    app = FastAPI(
        title="onegpu",
        version=__version__,
        summary="NeurIPS LLM Efficiency Challenge server: /process, /tokenize, /decode.",
        lifespan=lifespan,
    )
    errors.install(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    metrics = Metrics()

    def worker_of(request: Request) -> EngineWorker:
        worker: EngineWorker | None = getattr(request.app.state, "worker", None)
        if worker is None or not worker.alive:
            raise EngineUnavailableError("the model is not loaded")
        return worker

    async def complete(request: Request, engine_request: GenerationRequest) -> Completion:
        """Queue one request and wait for it; give up when the client leaves or time runs out."""
        ticket = worker_of(request).submit(engine_request)
        waiter = asyncio.wrap_future(ticket.future)
        deadline = time.monotonic() + settings.request_timeout_s
        try:
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=_POLL_SECONDS)
                if done:
                    return waiter.result()
                if await request.is_disconnected():
                    raise RequestCancelledError("the client disconnected")
                if time.monotonic() > deadline:
                    raise EngineUnavailableError(
                        f"no answer within request_timeout_s={settings.request_timeout_s:g}"
                    )
        finally:
            if not waiter.done():
                ticket.cancel.set()
                # Its eventual RequestCancelledError has no reader: fetch it so it is not logged.
                waiter.add_done_callback(lambda f: f.cancelled() or f.exception())

    @app.post("/process", response_model=ProcessResponse)
    async def process(body: ProcessRequest, request: Request) -> ProcessResponse:
        """Complete `prompt`; returns text, per-token logprobs and their top alternatives."""
        started = time.perf_counter()
        try:
            completion = await complete(request, body.to_engine())
        except EngineError as exc:
            metrics.requests.labels("process", type(exc).__name__).inc()
            raise
        seconds = time.perf_counter() - started
        metrics.requests.labels("process", "ok").inc()
        metrics.latency.labels("process").observe(seconds)
        metrics.prompt_tokens.inc(completion.prompt_tokens)
        metrics.new_tokens.inc(completion.new_tokens)
        if completion.first_token_seconds is not None:
            metrics.first_token.observe(
                seconds - completion.seconds + completion.first_token_seconds
            )
        if completion.seconds > 0:
            metrics.decode_rate.set(completion.new_tokens / completion.seconds)
        return ProcessResponse.from_engine(completion, seconds)

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
        """The ids `/process` feeds the model for `text`, truncated to `max_length` if asked."""
        started = time.perf_counter()
        engine_ = worker_of(request).engine
        ids = await run_in_threadpool(
            engine_.tokenize, body.text, truncation=body.truncation, max_length=body.max_length
        )
        return TokenizeResponse(tokens=ids, request_time=time.perf_counter() - started)

    @app.post("/decode", response_model=DecodeResponse)
    async def decode(body: DecodeRequest, request: Request) -> DecodeResponse:
        """Text for token ids, special tokens skipped."""
        started = time.perf_counter()
        text = await run_in_threadpool(worker_of(request).engine.decode, body.tokens)
        return DecodeResponse(text=text, request_time=time.perf_counter() - started)

    @app.get("/health/live")
    async def live() -> dict[str, str]:
        """Liveness: the process answers HTTP (the model may still be loading)."""
        return {"status": "alive"}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus(request: Request) -> Response:
        """Prometheus metrics."""
        worker: EngineWorker | None = getattr(request.app.state, "worker", None)
        if worker is not None:
            metrics.queue_depth.set(worker.queued)
            engine_ = worker.engine
            stats = engine_.stats()
            metrics.running.set(stats["running"])
            metrics.rows.set(stats["admit_limit"])
            metrics.peak_running.set(stats["peak_running"])
            metrics.reused_tokens.set(stats["reused_prompt_tokens"])
            metrics.preemptions.set(stats["preemptions"])
            for state in ("total", "in_use", "cached"):
                metrics.kv_blocks.labels(state).set(stats[f"blocks_{state}"])
            for kind, value in engine_.memory().items():
                metrics.gpu_memory.labels(kind).set(value)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health", response_model=Health)
    async def health(request: Request, response: Response) -> Health:
        """Readiness: 200 once the model is loaded and the engine thread runs, else 503."""
        worker: EngineWorker | None = getattr(request.app.state, "worker", None)
        if worker is None or not worker.alive:
            response.status_code = 503
            return Health(status="unavailable")
        info = worker.engine.info
        return Health(
            status="ready",
            model=info.name,
            device=info.device,
            quantization=info.quantization,
            adapter=info.adapter,
            max_context=info.max_context,
            queued=worker.queued,
        )

    return app
