"""Request body limits, enforced while the body streams in (before anything is parsed or stored): its size, how
long it may stall and how slowly it may trickle (a body that holds a queue slot must keep arriving), and the size of
a JSON body (read whole, so it gets a small limit of its own)."""

from __future__ import annotations

import asyncio
import json

from starlette.exceptions import HTTPException
from starlette.requests import Request

from server.core.errors import PayloadTooLarge

BODY_METHODS = ("POST", "PUT", "PATCH")


class BodySizeLimit:
    """ASGI middleware: 413 as soon as a request body passes the limit (declared or streamed)."""

    def __init__(self, app, max_bytes: int) -> None:  # type: ignore[no-untyped-def]
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            return await self.app(scope, receive, send)
        limit = self.max_bytes
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                return await _reject(send, limit)
        seen = 0

        async def limited_receive():  # type: ignore[no-untyped-def]
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(_message(limit))
            return message

        await self.app(scope, limited_receive, send)


class BodyTooLarge(HTTPException):
    """Raised while the body streams in; an HTTPException so FastAPI's form parsing passes it through."""

    def __init__(self, detail: str) -> None:
        super().__init__(status_code=413, detail=detail)


def _message(limit: int) -> str:
    return f"upload larger than the limit of {limit // (1024 * 1024)} MB (CTSEG_MAX_UPLOAD_MB)"


async def _reject(send, limit: int) -> None:  # type: ignore[no-untyped-def]
    body = json.dumps({"detail": _message(limit)}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BodyDeadlines:
    """ASGI middleware: 408 (and the connection closed) for a request body that sends nothing for ``idle_s``, or
    that averages under ``min_bytes_s`` since its first read once ``grace_s`` has passed. Without it a client that
    trickles a byte now and then holds its upload's queue slot, and a connection, for as long as it likes.

    The deadline of each read is the earlier of the two: the idle limit, and the moment the average would fall
    under the floor if nothing more arrived. A cut-off body raises in the route's read, so the route removes the
    job it opened as it does for any other error."""

    def __init__(self, app, idle_s: float, min_bytes_s: float, grace_s: float) -> None:  # type: ignore[no-untyped-def]
        self.app, self.idle_s, self.min_bytes_s, self.grace_s = app, idle_s, min_bytes_s, grace_s

    async def __call__(self, scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        start: float | None = None
        seen, done = 0, False

        async def paced_receive():  # type: ignore[no-untyped-def]
            nonlocal start, seen, done
            if done:  # the body is in; later reads wait for the disconnect and have no deadline
                return await receive()
            now = loop.time()
            start = now if start is None else start
            wait, reason = self.idle_s, _idle_message(self.idle_s)
            if self.min_bytes_s > 0:
                falls_under = start + max(self.grace_s, seen / self.min_bytes_s)
                if falls_under - now < wait:
                    wait, reason = falls_under - now, _rate_message(self.min_bytes_s, self.grace_s)
            try:
                async with asyncio.timeout(max(wait, 0.0)):
                    message = await receive()
            except TimeoutError:
                raise UploadTimeout(reason) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                done = not message.get("more_body", False)
            else:
                done = True
            return message

        await self.app(scope, paced_receive, send)


class UploadTimeout(HTTPException):
    """A body that stalled or trickled: 408, and the connection is closed (the rest of the body is not wanted)."""

    def __init__(self, detail: str) -> None:
        super().__init__(status_code=408, detail=detail, headers={"Connection": "close"})


def _idle_message(idle_s: float) -> str:
    return f"request body cut off: nothing arrived for {idle_s:g} s (CTSEG_UPLOAD_IDLE_TIMEOUT_S); send it again"


def _rate_message(min_bytes_s: float, grace_s: float) -> str:
    return (f"request body cut off: it arrived at under {min_bytes_s / 1024:g} KiB/s on average after the first "
            f"{grace_s:g} s (CTSEG_UPLOAD_MIN_KIB_S); send it again")


async def read_json_body(request: Request, max_bytes: int) -> bytes:
    """The whole body of a JSON request, refused (413) as soon as it passes ``max_bytes``: a pull request is a few
    hundred bytes, and the upload limit (gigabytes) would let one request fill the API's memory."""
    message = f"JSON request body larger than the limit of {max_bytes // 1024} KB (CTSEG_MAX_JSON_KB)"
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(message)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise PayloadTooLarge(message)
    return bytes(body)
