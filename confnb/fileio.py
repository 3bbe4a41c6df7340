"""Writing files so that a crash, a full disk or a concurrent reader never sees half of one.

Shared by everything that persists state (the KDS cache, the simulated TEE's keys, CLI outputs): the content goes
to a temporary file in the same directory, is flushed to disk, and replaces the target in one rename.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def write_atomically(path: str | Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` all at once; on any error the old file (or no file) remains."""
    with atomic_output(path, mode) as (handle, _temporary):
        handle.write(data)


@contextlib.contextmanager
def atomic_output(path: str | Path, mode: int = 0o600) -> Iterator[tuple[BinaryIO, Path]]:
    """The streaming sibling of :func:`write_atomically`, for content too large to hold in memory.

    Yields an open binary handle on a temporary file in the target's directory together with that file's path (so a
    writer can re-open and check what it wrote before it is published). When the block ends normally the file is
    flushed, fsynced, given ``mode`` and renamed over ``path``; when it raises, the temporary file is removed and
    ``path`` is left as it was, so a reader never sees a partial file.
    """
    target = Path(path)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle, Path(temporary)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _sync_directory(target.parent)


def _sync_directory(directory: Path) -> None:
    """The rename itself must reach the disk too, or a crash can bring back the old file."""
    with contextlib.suppress(OSError):
        directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)
