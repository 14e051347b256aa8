"""The challenge's endpoints, and health and metrics, as plain functions over the app's state.

Each route reads what it needs from `ServerState` (settings, metrics, the engine's worker), which
`create_app` puts on the app; none of them holds anything of its own.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from fastapi import APIRouter, Request, Response
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

# How often a waiting request checks for a client that went away.
POLL_SECONDS = 0.25

router = APIRouter()


@dataclass
class ServerState:
    """What the routes share: set up by `create_app`, the worker started by its lifespan."""

    settings: ServeSettings
    metrics: Metrics
    worker: EngineWorker | None = None


def state_of(request: Request) -> ServerState:
    return request.app.state.onegpu


def request_id_of(request: Request) -> str | None:
    """The id the RequestId middleware gave this request (None outside the app)."""
    return getattr(request.state, "request_id", None)


def worker_of(request: Request) -> EngineWorker:
    """The running engine worker, or EngineUnavailableError (503)."""
    worker = state_of(request).worker
    if worker is None or not worker.alive:
        raise EngineUnavailableError("the model is not loaded")
    return worker


async def complete(request: Request, engine_request: GenerationRequest) -> Completion:
    """Queue one request and wait for it; give up when the client leaves or time runs out."""
    timeout = state_of(request).settings.request_timeout_s
    ticket = worker_of(request).submit(engine_request)
    waiter = asyncio.wrap_future(ticket.future)
    deadline = time.monotonic() + timeout
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=POLL_SECONDS)
            if done:
                return waiter.result()
            if await request.is_disconnected():
                raise RequestCancelledError("the client disconnected")
            if time.monotonic() > deadline:
                raise EngineUnavailableError(f"no answer within request_timeout_s={timeout:g}")
    finally:
        if not waiter.done():
            ticket.cancel.set()
            # Its eventual RequestCancelledError has no reader: fetch it so it is not logged.
            waiter.add_done_callback(lambda f: f.cancelled() or f.exception())


@router.post("/process", response_model=ProcessResponse)
async def process(body: ProcessRequest, request: Request) -> ProcessResponse:
    """Complete `prompt`; returns text, per-token logprobs and their top alternatives."""
    started = time.perf_counter()
    metrics = state_of(request).metrics
    try:
        completion = await complete(request, body.to_engine(request_id_of(request)))
    except EngineError as exc:
        metrics.failed("process", exc)
        raise
    seconds = time.perf_counter() - started
    metrics.answered("process", completion, seconds)
    return ProcessResponse.from_engine(completion, seconds)


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """The ids `/process` feeds the model for `text`, truncated to `max_length` if asked."""
    started = time.perf_counter()
    engine = worker_of(request).engine
    ids = await run_in_threadpool(
        engine.tokenize, body.text, truncation=body.truncation, max_length=body.max_length
    )
    return TokenizeResponse(tokens=ids, request_time=time.perf_counter() - started)


@router.post("/decode", response_model=DecodeResponse)
async def decode(body: DecodeRequest, request: Request) -> DecodeResponse:
    """Text for token ids, special tokens skipped."""
    started = time.perf_counter()
    text = await run_in_threadpool(worker_of(request).engine.decode, body.tokens)
    return DecodeResponse(text=text, request_time=time.perf_counter() - started)


@router.get("/health/live")
async def live() -> dict[str, str]:
    """Liveness: the process answers HTTP (the model may still be loading)."""
    return {"status": "alive"}


@router.get("/health", response_model=Health)
async def health(request: Request, response: Response) -> Health:
    """Readiness: 200 once the model is loaded and the engine thread runs, else 503."""
    worker = state_of(request).worker
    if worker is None or not worker.alive:
        response.status_code = 503
        return Health(status="unavailable", version=__version__)
    info = worker.engine.info
    return Health(
        status="ready",
        version=__version__,
        model=info.name,
        device=info.device,
        quantization=info.quantization,
        adapter=info.adapter,
        max_context=info.max_context,
        queued=worker.queued,
    )


@router.get("/metrics", include_in_schema=False)
async def prometheus(request: Request) -> Response:
    """Prometheus metrics."""
    state = state_of(request)
    if state.worker is not None:
        state.metrics.sample(state.worker)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
