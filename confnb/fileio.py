"""Writing files so that a crash, a full disk or a concurrent reader never sees half of one.

Shared by everything that persists state (the KDS cache, the simulated TEE's keys, CLI outputs): the content goes
to a temporary file in the same directory, is flushed to disk, and replaces the target in one rename. A write that
fails (a full disk, a quota, an I/O error) removes the temporary file and raises :class:`WriteError`, whose message
is one line naming the file and the cause; the target is left exactly as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

#: The errors of the storage itself (as opposed to a wrong path or a missing permission, reported as they are).
WRITE_FAULTS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS})


class WriteError(OSError):
    """A file could not be written; nothing was: the previous file (or its absence) is intact.

    An ``OSError`` (same ``errno``), so callers that handle I/O errors keep doing so, with a message fit for a
    notebook or a terminal: ``cannot write PATH: no space left on device; nothing was written``.
    """

    def __init__(self, path: Path, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause), str(path))
        self.path = path

    def __str__(self) -> str:
        return f"cannot write {self.path}: {describe_os_error(self)}; nothing was written"


def describe_os_error(error: OSError) -> str:
    """The cause of an I/O error in a few lowercase words ("no space left on device"), without errno noise."""
    text = error.strerror or str(error) or type(error).__name__
    return text[:1].lower() + text[1:]


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
    try:
        fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        if exc.errno in WRITE_FAULTS:
            raise WriteError(target, exc) from None
        raise
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle, Path(temporary)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(exc, OSError) and not isinstance(exc, WriteError) and exc.errno in WRITE_FAULTS:
            raise WriteError(target, exc) from None  # say which file, in one line
        raise
    sync_directory(target.parent)


def sync_directory(directory: Path) -> None:
    """The rename itself must reach the disk too, or a crash can bring back the old file."""
    with contextlib.suppress(OSError):
        directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)
