"""X-Request-Id: every answer carries one, the caller's when it sent a usable one, and the
request's log line names it (`request.state.request_id`)."""

from __future__ import annotations

import re
import uuid

HEADER = b"x-request-id"
# A caller's id is kept only when it is short and plain (it goes into logs and headers).
_USABLE = re.compile(rb"[A-Za-z0-9._:-]{1,64}")


class RequestId:
    """ASGI middleware: take or make the request's id, and echo it in the response headers."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(HEADER)
        request_id = given if given and _USABLE.fullmatch(given) else uuid.uuid4().hex.encode()
        scope.setdefault("state", {})["request_id"] = request_id.decode()

        async def with_id(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, request_id)]}
            await send(message)

        await self.app(scope, receive, with_id)
