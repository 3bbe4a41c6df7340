"""What the enclave's code *is*, as a digest: the simulated launch measurement and the bundle digest claim.

On real SEV-SNP hardware the launch MEASUREMENT covers only what the firmware measured at boot (firmware, kernel,
initrd, command line); the ``bundle_digest`` claim adds the exact Python code of ``kernel_enclave`` that is
answering, so a verifier can pin both. The simulated TEE has no firmware to measure, so it uses the same digest
(SHA-384 instead of SHA-256) as its MEASUREMENT: change one byte of the enclave's code and the "measurement"
changes, like a real one would, and allowlists behave the same way in both modes.

Digest input, for each file in :func:`code_files` order: the path relative to the directory that contains the
``kernel_enclave`` package (so it starts with ``kernel_enclave/``), UTF-8; one NUL byte; the content length as
8 bytes big-endian; the content. The length prefix and NUL make the encoding unambiguous.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

_PACKAGE_DIR = Path(__file__).resolve().parent


class _Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...


def code_files() -> list[Path]:
    """The installed ``kernel_enclave`` package's ``*.py`` files (no ``__pycache__``), sorted by relative path."""
    files = [
        path
        for path in _PACKAGE_DIR.rglob("*.py")
        if "__pycache__" not in path.relative_to(_PACKAGE_DIR).parts and path.is_file()
    ]
    return sorted(files, key=_relative_name)


def simulated_measurement() -> bytes:
    """SHA-384 (48 bytes, the size of a real MEASUREMENT) over the enclave's code."""
    hasher = hashlib.sha384()
    _feed(hasher)
    return hasher.digest()


def bundle_digest() -> str:
    """``sha256:<hex>`` over the enclave's code, for the evidence claims."""
    hasher = hashlib.sha256()
    _feed(hasher)
    return "sha256:" + hasher.hexdigest()


def _relative_name(path: Path) -> str:
    return path.relative_to(_PACKAGE_DIR.parent).as_posix()


def _records() -> Iterator[bytes]:
    for path in code_files():
        content = path.read_bytes()
        yield _relative_name(path).encode("utf-8") + b"\0" + len(content).to_bytes(8, "big")
        yield content


def _feed(hasher: _Hasher) -> None:
    for chunk in _records():
        hasher.update(chunk)
