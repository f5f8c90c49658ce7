"""Zip archives unpacked safely: limits checked from the central directory first, members streamed in chunks."""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from server.core.errors import InputError, PayloadTooLarge

CHUNK = 1 << 20


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


# The only part of a client's file name kept on disk: the suffixes that decide how a file is read.
KEPT_SUFFIXES = (".nii.gz", ".nii", ".zip", ".dcm")


def stored_name(index: int, client_name: str | None, width: int = 6) -> str:
    """A received file's name on disk: its position and, if it has one of ``KEPT_SUFFIXES``, that suffix. Nothing
    else of the client's name (which often names the patient) ever reaches the disk, a path in a message or a
    log; and no path component ('../', absolute or device names) can be one."""
    base = PurePosixPath((client_name or "").replace("\\", "/")).name.lower()
    suffix = next((x for x in KEPT_SUFFIXES if base.endswith(x)), "")
    return f"{index:0{width}d}{suffix}"


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
            dest = target / stored_name(index, member.filename)
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
