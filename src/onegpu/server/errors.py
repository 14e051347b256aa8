"""Engine exceptions mapped to HTTP answers, in one place."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from onegpu.engine.types import (
    EngineInternalError,
    EngineUnavailableError,
    InvalidRequestError,
    RequestCancelledError,
)

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 5


def install(app: FastAPI) -> None:
    """Register the handlers that turn engine errors into 4xx/503 answers with a message."""

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        # Location, message and type only: echoing the input back could carry NaN (which JSON
        # cannot encode, turning a 422 into a 500) or a very large body.
        detail = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return JSONResponse(status_code=422, content={"detail": detail})

    @app.exception_handler(InvalidRequestError)
    async def _invalid(_: Request, exc: InvalidRequestError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": str(exc)})

    @app.exception_handler(EngineInternalError)
    async def _internal(_: Request, exc: EngineInternalError) -> JSONResponse:
        return JSONResponse(status_code=500, content={"detail": str(exc)})

    @app.exception_handler(RequestCancelledError)
    async def _cancelled(_: Request, exc: RequestCancelledError) -> JSONResponse:
        # 499 (client closed request): nobody reads it, but the access log shows what happened.
        return JSONResponse(status_code=499, content={"detail": str(exc)})

    @app.exception_handler(EngineUnavailableError)
    async def _unavailable(_: Request, exc: EngineUnavailableError) -> JSONResponse:
        return JSONResponse(
            status_code=503,
            content={"detail": str(exc)},
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse(
            status_code=500, content={"detail": f"internal error: {type(exc).__name__}"}
        )
