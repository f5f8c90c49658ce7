"""Uploaded files on disk: size limits enforced while the body streams in, safe zip extraction."""

from __future__ import annotations

import zipfile
from pathlib import Path

from starlette.exceptions import HTTPException

from server.errors import InputError, PayloadTooLarge

MAX_ZIP_MEMBERS = 20000


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
    import json

    body = json.dumps({"detail": _message(limit)}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def extract_zip(path: Path, target: Path, max_bytes: int) -> list[Path]:
    """Extract a zip of DICOM files, refusing path tricks and zip bombs (uncompressed size limit)."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise InputError(f"{path.name}: not a valid zip archive") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if len(members) > MAX_ZIP_MEMBERS:
            raise InputError(f"{path.name}: {len(members)} files in the zip (limit {MAX_ZIP_MEMBERS})")
        total = sum(m.file_size for m in members)
        if total > max_bytes:
            raise PayloadTooLarge(f"{path.name}: unpacks to {total // 2**20} MB, over the upload limit")
        out = []
        for i, member in enumerate(members):
            name = Path(member.filename).name
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            dest = target / f"{i:06d}_{name}"[:200]
            with archive.open(member) as src, open(dest, "wb") as dst:
                dst.write(src.read())
            out.append(dest)
    if not out:
        raise InputError(f"{path.name}: the zip holds no files")
    return out
