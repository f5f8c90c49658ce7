"""Uploaded files on disk: size limits enforced while the body streams in, safe zip extraction."""

from __future__ import annotations

import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from starlette.exceptions import HTTPException

from server.errors import InputError, PayloadTooLarge

CHUNK = 1 << 20


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


@dataclass(frozen=True)
class ZipLimits:
    """What one zip may unpack to; checked from the central directory before anything is written, and again while
    members stream out (a member that inflates past its declared size is cut off)."""

    max_bytes: int = 2 * 1024**3
    max_members: int = 10_000
    max_ratio: float = 200.0  # uncompressed / compressed, per member and for the whole archive
    max_depth: int = 1  # 1: zips inside the zip are not unpacked (they are skipped as non-DICOM files)


RATIO_FLOOR_BYTES = 1 << 20  # smaller members may compress as well as they like


def _check_directory(members: list[zipfile.ZipInfo], archive_size: int, limits: ZipLimits) -> None:
    if len(members) > limits.max_members:
        raise InputError(f"the zip holds {len(members)} files; the limit is {limits.max_members} (CTSEG_ZIP_MAX_MEMBERS)")
    total = sum(m.file_size for m in members)
    if total > limits.max_bytes:
        raise PayloadTooLarge(f"the zip unpacks to {total / 2**20:.0f} MB; the limit is "
                              f"{limits.max_bytes / 2**20:.0f} MB (CTSEG_ZIP_MAX_UNPACKED_MB)")
    for index, m in enumerate(members):
        if m.flag_bits & 0x1:
            raise InputError(f"member {index + 1} of the zip is encrypted; send an unencrypted zip")
        if m.file_size > RATIO_FLOOR_BYTES and m.file_size / max(m.compress_size, 1) > limits.max_ratio:
            raise InputError(f"member {index + 1} of the zip inflates {m.file_size / max(m.compress_size, 1):.0f}-fold; "
                             f"the limit is {limits.max_ratio:g} (CTSEG_ZIP_MAX_RATIO): a zip bomb?")
    if total > RATIO_FLOOR_BYTES and total / max(archive_size, 1) > limits.max_ratio:
        raise InputError(f"the zip inflates {total / max(archive_size, 1):.0f}-fold; the limit is {limits.max_ratio:g} "
                         "(CTSEG_ZIP_MAX_RATIO): a zip bomb?")


def _member_name(index: int, name: str) -> str:
    """Never the member's path ('../', absolute, device names): its index and a sanitised last component."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", PurePosixPath(name.replace("\\", "/")).name)[:100].lstrip(".")
    return f"{index:06d}_{base or 'member'}"


def extract_zip(path: Path, target: Path, limits: ZipLimits) -> list[Path]:
    """Unpack a zip into ``target`` safely: limits checked first, members streamed in chunks, damage a 422."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise InputError("an uploaded zip is not a valid zip archive (damaged or truncated?)") from None
    out: list[Path] = []
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        _check_directory(members, path.stat().st_size, limits)
        written = 0
        for index, member in enumerate(members):
            dest = target / _member_name(index, member.filename)
            size = 0
            try:
                with archive.open(member) as src, open(dest, "wb") as dst:
                    while chunk := src.read(CHUNK):
                        size += len(chunk)
                        written += len(chunk)
                        if size > member.file_size or written > limits.max_bytes:
                            raise InputError(f"member {index + 1} of the zip inflates past its declared size")
                        dst.write(chunk)
            except (zipfile.BadZipFile, zlib.error, EOFError) as err:
                reason = "bad CRC" if "CRC" in str(err) else type(err).__name__
                raise InputError(f"member {index + 1} of the zip is damaged ({reason})") from None
            except NotImplementedError:
                raise InputError(f"member {index + 1} of the zip uses a compression method that cannot be read "
                                 "(use deflate or store)") from None
            out.append(dest)
    if not out:
        raise InputError("an uploaded zip holds no files")
    return out
