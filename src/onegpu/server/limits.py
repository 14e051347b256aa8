"""Input limits: bounds on what one request may ask for, each named in its 4xx message."""

from __future__ import annotations

import json

# Field bounds (pydantic constraints, so they show in the OpenAPI schema and answer 422).
MAX_PROMPT_CHARS = 200_000  # a 2,048-token context holds ~10k characters; HELM truncates first
MAX_TOKENIZE_CHARS = 1_000_000  # HELM tokenizes whole documents to count them
MAX_NEW_TOKENS = 4096
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
MAX_TOP_K_PER_TOKEN = 20
MAX_DECODE_TOKENS = 100_000
MAX_DEFAULT_BODY_BYTES = 4 * 2**20


class BodySizeLimit:
    """ASGI middleware: answer 413 to bodies over `max_bytes`, without reading them whole."""

    def __init__(self, app, max_bytes: int = MAX_DEFAULT_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, send)
            return
        # Read the body here (bounded), then replay it: the app never sees an oversized one.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                chunks = []
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(scope, send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, send) -> None:
        message = f"request body exceeds the limit of {self.max_bytes} bytes"
        if scope.get("path", "").startswith("/v1/"):  # OpenAI's routes answer in its shape
            content = {"error": {"message": message, "type": "invalid_request_error",
                                 "param": None, "code": None}}  # fmt: skip
        else:
            content = {"detail": message}
        body = json.dumps(content).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})
