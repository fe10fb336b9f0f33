"""ASGI middleware that rejects request bodies above a size limit with 413.

It checks Content-Length first and also counts the bytes of chunked bodies as
they arrive, so a client cannot bypass the limit by omitting the header.
Uploads to ``/v1/datasets`` get the upload limit plus room for the multipart
framing; every other request gets the JSON body limit.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.errors import PayloadTooLarge

MULTIPART_OVERHEAD = 64 * 1024
UPLOAD_PATH = "/v1/datasets"


class BodySizeLimit:
    def __init__(self, app: ASGIApp, *, max_request_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        is_upload = scope["path"].rstrip("/") == UPLOAD_PATH
        limit = self.max_upload_bytes + MULTIPART_OVERHEAD if is_upload else self.max_request_bytes
        shown_limit = self.max_upload_bytes if is_upload else self.max_request_bytes
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_413(send, shown_limit)
            return

        received = 0
        rejected = False
        response_started = False

        async def counting_receive() -> Message:
            # Past the limit, send 413 at once and tell the app the client left, so
            # that whatever it does next (400, ClientDisconnect) never reaches the client.
            nonlocal received, rejected, response_started
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    rejected = True
                    if not response_started:
                        response_started = True
                        await _send_413(send, shown_limit)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if rejected:
                return
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not rejected:
                raise


async def _send_413(send: Send, limit: int) -> None:
    error = PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
    body = json.dumps(error.problem()).encode()
    headers: list[Any] = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
