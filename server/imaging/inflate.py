"""Deflate inflated in bounded steps, for Deflated Explicit VR Little Endian (1.2.840.10008.1.2.1.99).

pydicom inflates a deflated data set whole with one ``zlib.decompress``, before ``stop_before_pixels`` applies:
half a megabyte of zeros can become gigabytes in the API process. Here every step holds at most what the caller
asks for (input is read in small chunks too), so the caller states the bound.
"""

from __future__ import annotations

import zlib
from typing import BinaryIO

READ_CHUNK = 1 << 16  # compressed bytes read from the file per step
SKIP_CHUNK = 1 << 20  # inflated bytes held at a time while counting


class InflateError(ValueError):
    """The deflate stream is damaged or ends before its end marker."""


class Inflater:
    """The raw deflate stream (no zlib header, PS3.5 A.5) that follows the file meta in ``fp``."""

    def __init__(self, fp: BinaryIO) -> None:
        self._fp = fp
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self.total = 0  # inflated bytes produced so far
        self.done = False  # the stream's end marker was reached

    def read(self, n: int) -> bytes:
        """Up to ``n`` more inflated bytes; fewer only at the end of the stream."""
        parts: list[bytes] = []
        got = 0
        while got < n and not self.done:
            data = self._z.unconsumed_tail or self._fp.read(READ_CHUNK)
            try:
                chunk = self._z.decompress(data, n - got)  # n - got > 0: a max_length of 0 would mean unbounded
            except zlib.error as err:
                raise InflateError(f"damaged deflate stream ({err})") from None
            if self._z.eof:
                self.done = True
            elif not chunk and not data:
                raise InflateError("the deflate stream ends early (file cut short)")
            parts.append(chunk)
            got += len(chunk)
        self.total += got
        return b"".join(parts)

    def skip(self, n: int) -> int:
        """Inflate up to ``n`` more bytes and drop them; returns how many there were."""
        start = self.total
        while self.total - start < n and not self.done:
            self.read(min(SKIP_CHUNK, n - (self.total - start)))
        return self.total - start
