"""API keys, enforced for every request path but the probes: an ASGI guard, so a route added later cannot forget
its dependency. Keys are compared in constant time, each one, so timing tells nothing about which or how much of a
key matched."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable

from fastapi.security import APIKeyHeader

HEADER = "x-api-key"
PROBES = frozenset({"/healthz", "/readyz"})
# Declares the scheme in the OpenAPI schema (the guard below enforces it).
api_key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="one of CTSEG_API_KEYS; every endpoint but /healthz and /readyz needs it")


def key_accepted(given: str, keys: list[str]) -> bool:
    results = [hmac.compare_digest(given.encode(), key.encode()) for key in keys]
    return any(results)


class ApiKeyGuard:
    """401 without a key, 403 with a wrong one, before the request body is read. The outermost middleware: a refused
    request costs nothing more (no metrics series, no body read); ``on_refused(scope, status)`` may count it."""

    def __init__(self, app, keys: list[str], open_paths: frozenset[str],  # type: ignore[no-untyped-def]
                 on_refused: Callable[[dict, int], None] | None = None) -> None:
        self.app, self.keys, self.open_paths, self.on_refused = app, list(keys), open_paths, on_refused

    async def __call__(self, scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http" or not self.keys or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        given = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == HEADER.encode()), None)
        if not given:
            return await self._refuse(scope, send, 401, "missing API key: send it in the X-API-Key header")
        if not key_accepted(given, self.keys):
            return await self._refuse(scope, send, 403, "API key not accepted")
        return await self.app(scope, receive, send)

    async def _refuse(self, scope, send, status: int, detail: str) -> None:  # type: ignore[no-untyped-def]
        await _deny(send, status, detail)
        if self.on_refused is not None:
            self.on_refused(scope, status)


async def _deny(send, status: int, detail: str) -> None:  # type: ignore[no-untyped-def]
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"ApiKey"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
