"""Request size limits, enforced while the body streams in (before anything is parsed or stored)."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException


class BodySizeLimit:
    """ASGI middleware: 413 as soon as a request body passes the limit (declared or streamed)."""

    def __init__(self, app, max_bytes: int) -> None:  # type: ignore[no-untyped-def]
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
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
