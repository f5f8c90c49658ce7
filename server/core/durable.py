"""Writes that survive a power cut, in the order the records that point at them need.

A database row that names a file is committed with ``synchronous=FULL``; the file it names must be on disk first,
or a crash leaves a committed row pointing at a file the kernel never wrote. So every file the service keeps is
written to a temporary name in the same folder, fsynced, renamed into place, and the folder fsynced (the rename
itself is a folder entry); every folder it creates is fsynced into its parent.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

PART = ".part-"  # a temporary name's prefix (the suffix stays, for writers that choose a format by it): a file
# found with it at start-up is a write that never finished


PRIVATE_UMASK = 0o077


def private_storage(storage: Path) -> Path:
    """The storage folder, readable by the service user only, and every file made from here on too: uploads,
    received instances, results and the databases hold patient data. Called before anything is created in it (the
    storage lock, the databases, ``incoming/``), and inherited by the worker processes, which start later."""
    os.umask(PRIVATE_UMASK)
    storage = Path(storage)
    storage.mkdir(parents=True, exist_ok=True)
    storage.chmod(0o700)
    return storage


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> Path:
    """``mkdir -p`` whose new entries are durable: each created folder is fsynced into its parent."""
    path = Path(path)
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        fsync_dir(folder.parent)
    return path


def temporary(path: Path) -> Path:
    """A name of its own for each write (two writers of one path, say a sender's two associations storing the same
    instance at once, never share a temporary file); the suffix stays."""
    return path.with_name(f"{PART}{uuid.uuid4().hex[:12]}-{path.name}")


def write_bytes(path: Path, data: bytes) -> None:
    """``data`` at ``path``, durable before this returns."""
    write_with(path, lambda tmp: tmp.write_bytes(data))


def write_with(path: Path, writer: Callable[[Path], object]) -> None:
    """``writer(tmp)`` writes the file (any library: SimpleITK, PIL); it is then fsynced and renamed to ``path``."""
    tmp = temporary(path)
    try:
        writer(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no copy of the bytes) where the file system allows it, else a durable copy."""
    try:
        os.link(source, target)
    except OSError:
        write_bytes(target, source.read_bytes())
