"""Engine exceptions mapped to HTTP answers, in one place."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from onegpu.engine.types import (
    EngineInternalError,
    EngineUnavailableError,
    InvalidRequestError,
    RequestCancelledError,
)

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 5


# OpenAI's name for each status's kind of error (its routes answer in its shape).
_OPENAI_TYPES = {400: "invalid_request_error", 413: "invalid_request_error", 499: "cancelled",
                 500: "server_error", 503: "server_error"}  # fmt: skip


def openai_route(path: str) -> bool:
    return path.startswith("/v1/")


def answer(request: Request, status: int, message: str, *, param: str | None = None,
           detail: object = None, headers: dict | None = None) -> JSONResponse:  # fmt: skip
    """An error answer: the challenge's {"detail"} shape, or OpenAI's {"error"} on /v1/."""
    if openai_route(request.url.path):
        kind = _OPENAI_TYPES.get(status, "invalid_request_error")
        error = {"message": message, "type": kind, "param": param, "code": None}
        return JSONResponse(status_code=status, content={"error": error}, headers=headers)
    content = {"detail": message if detail is None else detail}
    return JSONResponse(status_code=status, content=content, headers=headers)


def install(app: FastAPI) -> None:
    """Register the handlers that turn engine errors into 4xx/503 answers with a message."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Location, message and type only: echoing the input back could carry NaN (which JSON
        # cannot encode, turning a 422 into a 500) or a very large body.
        errors = exc.errors()
        detail = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in errors
        ]
        first = detail[0] if detail else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(part) for part in first["loc"][1:])  # without "body"
        if openai_route(request.url.path):  # OpenAI answers 400 to a malformed request
            return answer(request, 400, f"{where}: {first['msg']}", param=where or None)
        return answer(request, 422, first["msg"], detail=detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's and Starlette's own refusals: an unparsable body, an unknown route or method.
        return answer(request, exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(InvalidRequestError)
    async def _invalid(request: Request, exc: InvalidRequestError) -> JSONResponse:
        return answer(request, 400, str(exc))

    @app.exception_handler(EngineInternalError)
    async def _internal(request: Request, exc: EngineInternalError) -> JSONResponse:
        return answer(request, 500, str(exc))

    @app.exception_handler(RequestCancelledError)
    async def _cancelled(request: Request, exc: RequestCancelledError) -> JSONResponse:
        # 499 (client closed request): nobody reads it, but the access log shows what happened.
        return answer(request, 499, str(exc))

    @app.exception_handler(EngineUnavailableError)
    async def _unavailable(request: Request, exc: EngineUnavailableError) -> JSONResponse:
        return answer(request, 503, str(exc), headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return answer(request, 500, f"internal error: {type(exc).__name__}")
