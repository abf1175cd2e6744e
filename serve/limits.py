"""The whole-request body limit: a body over ``max_bytes`` gets 413 before it is read to the end.

A ``Content-Length`` over the limit is refused before any byte of the body is read; a body without one
(chunked, streamed) is read until it passes the limit, then refused. A body within the limit is handed to the
app as one message, so routes never see a partial body. A client that disconnects before its body is whole is
one INFO line in the log (``mpsclip.serve``) and no answer.
"""

from __future__ import annotations

import logging

from mpsclip.serve import metrics
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOG = logging.getLogger("mpsclip.serve")


def too_large(max_bytes: int) -> JSONResponse:
    metrics.ERRORS.labels("body_too_large").inc()
    return JSONResponse(
        {"detail": f"request body: larger than {max_bytes} bytes; send less (the server's --max-body-mib)"},
        status_code=413,
        headers={"Connection": "close"},
    )


class BodyLimitMiddleware:
    """ASGI middleware enforcing the body limit on every HTTP request."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes: the body limit must be 1 byte or more, got {max_bytes}")
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length")
        if length is not None and not length.isdigit():
            bad = JSONResponse({"detail": f"Content-Length: not a byte count ({length[:40]!r})"}, 400)
            return await bad(scope, receive, send)
        if length is not None and int(length) > self.max_bytes:
            return await too_large(self.max_bytes)(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                LOG.info("%s %s: the client went away after %d of %s body bytes; nothing answered",
                         scope["method"], scope["path"], size, length or "unknown")
                return None
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                return await too_large(self.max_bytes)(scope, receive, send)
            chunks.append(body)
            if not message.get("more_body", False):
                break
        await self.app(scope, replay(b"".join(chunks), receive), send)


def replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` giving ``body`` as one message, then the client's own messages (its disconnect)."""
    sent = False

    async def receive_again() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive_again
