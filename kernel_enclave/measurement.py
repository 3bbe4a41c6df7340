"""What the enclave's code *is*, as a digest: the simulated launch measurement and the bundle digest claim.

On real SEV-SNP hardware the launch MEASUREMENT covers only what the firmware measured at boot (firmware, kernel,
initrd, command line); the ``bundle_digest`` claim adds the exact Python code of confnb that the enclave runs, so a
verifier can pin both. The simulated TEE has no firmware to measure, so it uses the same digest (SHA-384 instead of
SHA-256) as its MEASUREMENT: change one byte of the enclave's code and the "measurement" changes, like a real one
would, and allowlists behave the same way in both modes.

The enclave's code is an explicit set, :func:`code_files`: every ``*.py`` file of ``kernel_enclave``, plus the
confnb modules in :data:`ENCLAVE_CONFNB_MODULES`, the formats and rules the launcher, the relay and the vault share
with the client side (the output policy that the vault enforces among them). Anything the enclave imports from
confnb must be on that list, so that pinning the digest pins the code that enforces the owners' policies; a test
starts a real kernel and fails when the launcher, the relay or the vault executes a project file outside the set.

Not in the set: the executor's ``confnb.analyst`` (``import confnb as cn``). It runs in the analyst's process with
the analyst's own code, which the threat model already treats as hostile: it builds requests and shows results, and
protects nothing; every rule is checked again in the vault. ``kernel_enclave/executor.py``, which drops the
executor's privileges before any analyst code runs, is in the set like the rest of ``kernel_enclave``. Python and
third-party libraries (pyarrow, scikit-learn, cryptography, pyzmq) are not either: the measured image pins them.

Digest input, for each file in :func:`code_files` order: the path relative to the directory that contains the
``kernel_enclave`` and ``confnb`` packages (so it starts with ``kernel_enclave/`` or ``confnb/``), UTF-8; one NUL
byte; the content length as 8 bytes big-endian; the content. The length prefix and NUL make the encoding
unambiguous.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

_PACKAGE_DIR = Path(__file__).resolve().parent
_ROOT = _PACKAGE_DIR.parent  # one distribution ships both packages side by side

# The confnb files the enclave may import, reviewed one by one: adding an import of another confnb module to the
# enclave means adding it here, where the reviewer sees that it becomes part of the measured code.
ENCLAVE_CONFNB_MODULES: tuple[str, ...] = (
    "confnb/__init__.py",  # the analyst API it names loads on attribute access, which the enclave never makes
    "confnb/attest/__init__.py",  # lazy exports only: the verifier, KDS client and policies are never loaded
    "confnb/attest/certs.py",  # the simulated chip's and /dev/sev-guest's certificates
    "confnb/attest/certtable.py",  # the GHCB certificate table the host hands over with a report
    "confnb/attest/der.py",
    "confnb/attest/errors.py",
    "confnb/attest/evidence.py",  # the evidence bundle and REPORT_DATA binding the kernel issues
    "confnb/attest/report.py",  # the ATTESTATION_REPORT layout the TEE backends produce and parse
    "confnb/attest/tcb.py",
    "confnb/datasets/__init__.py",
    "confnb/datasets/errors.py",
    "confnb/datasets/ipc.py",
    "confnb/datasets/manifest.py",  # the owner's signature over a dataset's files
    "confnb/datasets/parquet.py",
    "confnb/datasets/reader.py",  # decryption of the datasets the vault opens
    "confnb/datasets/streaming_aead.py",
    "confnb/fileio.py",
    "confnb/hpke.py",  # key release, uploads and launch secrets
    "confnb/policy/__init__.py",
    "confnb/policy/output.py",  # the output policy the vault enforces and the relay's display rules
    "confnb/policy/privacy.py",  # its [privacy] table: exact or differentially private releases
    "confnb/policy/schema.py",  # the names a policy file may use, checked before either half is read
    "confnb/policy/toml.py",
    "confnb/receipt_format.py",  # the receipts the vault signs
)


class MeasurementError(RuntimeError):
    """A file of the enclave's code is missing: a digest without it would claim code that is not there."""


class _Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...


def code_files() -> list[Path]:
    """The enclave's code: ``kernel_enclave``'s ``*.py`` files (no ``__pycache__``) and the listed confnb modules.

    Sorted by relative path. Raises :class:`MeasurementError` when a listed confnb module is absent.
    """
    files = [
        path
        for path in _PACKAGE_DIR.rglob("*.py")
        if "__pycache__" not in path.relative_to(_PACKAGE_DIR).parts and path.is_file()
    ]
    for name in ENCLAVE_CONFNB_MODULES:
        path = _ROOT / name
        if not path.is_file():
            raise MeasurementError(f"the enclave's code is incomplete: {name} is missing beside {_PACKAGE_DIR.name}")
        files.append(path)
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
    return path.relative_to(_ROOT).as_posix()


def _records() -> Iterator[bytes]:
    for path in code_files():
        content = path.read_bytes()
        yield _relative_name(path).encode("utf-8") + b"\0" + len(content).to_bytes(8, "big")
        yield content


def _feed(hasher: _Hasher) -> None:
    for chunk in _records():
        hasher.update(chunk)
