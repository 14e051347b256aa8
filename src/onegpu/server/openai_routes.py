"""OpenAI's /v1/completions, /v1/chat/completions and /v1/models over the same engine.

Each prompt of a request is one engine request, queued with everything else; the routes wait
for all of them, as /process waits for its one. Errors come in OpenAI's shape (`errors.py`).
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from onegpu.engine.types import EngineError
from onegpu.server.openai_schemas import (
    ChatRequest,
    ChatResponse,
    CompletionRequest,
    CompletionResponse,
    Model,
    ModelList,
)
from onegpu.server.routes import complete, request_id_of, state_of, worker_of

router = APIRouter(prefix="/v1")


def _model_name(request: Request) -> str:
    return worker_of(request).engine.info.name


@router.get("/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    """The one model this server serves."""
    return ModelList(data=[Model(id=_model_name(request))])


@router.post("/completions", response_model=CompletionResponse)
async def completions(body: CompletionRequest, request: Request) -> CompletionResponse:
    """Complete each prompt (text or token ids); echo and per-token logprobs as OpenAI gives."""
    body.check()
    started = time.perf_counter()
    metrics = state_of(request).metrics
    try:
        jobs = [complete(request, r) for r in body.to_engine(request_id_of(request))]
        answers = list(await asyncio.gather(*jobs))
    except EngineError as exc:
        metrics.failed("completions", exc)
        raise
    seconds = time.perf_counter() - started
    for answer in answers:
        metrics.answered("completions", answer, seconds)
    return CompletionResponse.from_engine(body, answers, _model_name(request))


@router.post("/chat/completions", response_model=ChatResponse)
async def chat(body: ChatRequest, request: Request) -> ChatResponse:
    """Answer a conversation, written out by the tokenizer's chat template."""
    body.check()
    started = time.perf_counter()
    metrics = state_of(request).metrics
    engine = worker_of(request).engine
    messages = [m.model_dump(include={"role", "content"}) for m in body.messages]
    try:
        prompt = await run_in_threadpool(engine.chat_prompt, messages)
        limit = body.limit()
        if limit is None:  # as many tokens as the context window leaves
            used = len(await run_in_threadpool(engine.tokenize, prompt))
            limit = max(engine.info.max_context - used, 0)
        answer = await complete(request, body.to_engine(prompt, limit, request_id_of(request)))
    except EngineError as exc:
        metrics.failed("chat", exc)
        raise
    metrics.answered("chat", answer, time.perf_counter() - started)
    return ChatResponse.from_engine(body, answer, _model_name(request))
