"""Multipart uploads streamed straight into a job's input folder, one part at a time.

Why not ``request.form()``: Starlette keeps each uploaded file part in memory up to 1 MB (a 300-slice series of
0.5 MB files is 150 MB per request, held by the API process) and keeps every part open as a temporary file until
the request ends (a 10,000-file upload is 10,000 open descriptors), then the route copies them again. Here each
part is written as it arrives, in the chunks the server receives, to its final place; one file is open at a time,
and the API process holds a bounded amount per request whatever the upload (the parser's buffer and a chunk).

The parser (and so every file open and write) runs in a worker thread, one chunk at a time: a slow disk never
stalls the event loop that serves the other requests. The folder is asked for when the first file part begins, so
a request that never sends a file never opens a job (nor takes a queue slot).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from server.core.archives import stored_name
from server.core.errors import InputError

FIELD = "files"


class _Receiver:
    def __init__(self, open_inbox: Callable[[], Path], max_files: int) -> None:
        self.open_inbox, self.max_files = open_inbox, max_files
        self.inbox: Path | None = None
        self.headers: dict[bytes, bytes] = {}
        self.field = self.value = b""
        self.out = None  # the open file of the current part, if it is a file of FIELD
        self.names: list[str] = []

    # python-multipart callbacks: data arrives as (buffer, start, end)
    def on_part_begin(self) -> None:
        self.headers = {}

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def on_header_end(self) -> None:
        self.headers[self.field.strip().lower()] = self.value.strip()
        self.field = self.value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        if name != FIELD or filename is None:
            return  # other form fields are ignored (parameters are query parameters)
        if len(self.names) >= self.max_files:
            raise InputError(f"more than {self.max_files} files in one upload (CTSEG_ZIP_MAX_MEMBERS); send a zip")
        if self.inbox is None:
            self.inbox = self.open_inbox()
        stored = stored_name(len(self.names), filename.decode("utf-8", "replace"), width=5)
        self.names.append(stored)
        self.out = open(self.inbox / stored, "wb")  # noqa: SIM115 - closed at the part's end

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.out is not None:
            self.out.write(data[start:end])

    def on_part_end(self) -> None:
        if self.out is not None:
            self.out.close()
            self.out = None

    def close(self) -> None:
        if self.out is not None:
            self.out.close()
            self.out = None


async def receive_files(request: Request, open_inbox: Callable[[], Path], max_files: int) -> list[str]:
    """Write the request's ``files`` parts into the folder ``open_inbox`` gives (called once, in a worker thread,
    when the first file part begins); returns their stored names (in order)."""
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise InputError("send the files as multipart/form-data (field 'files'), or a JSON pull request")
    receiver = _Receiver(open_inbox, max_files)
    callbacks = {name: getattr(receiver, name) for name in (
        "on_part_begin", "on_header_field", "on_header_value", "on_header_end", "on_headers_finished",
        "on_part_data", "on_part_end")}
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    try:
        async for chunk in request.stream():
            if chunk:
                await run_in_threadpool(parser.write, chunk)
        await run_in_threadpool(parser.finalize)
    except InputError:
        raise
    except Exception as err:  # python-multipart's parse errors
        if type(err).__name__ in ("MultipartParseError", "FormParserError", "ParseError"):
            raise InputError(f"the multipart body is malformed ({str(err)[:120]})") from None
        raise
    finally:
        receiver.close()
    if not receiver.names:
        raise InputError("no file uploaded (multipart field 'files')")
    return receiver.names
