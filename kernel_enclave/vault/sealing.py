"""Measurement-bound sealed blobs: a table or model the analyst can keep on disk and bring back to the same kernel.

The executor writes sealed files wherever the analyst likes, so the host and the analyst both hold them. What keeps
their content inside the CVM is the key: ``TeeBackend.derive_sealing_key`` gives a key that only a kernel with the
same launch measurement on the same platform can derive again (SNP_GET_DERIVED_KEY on real hardware), so another
image, a debug build or a patched vault cannot open the blob.

Layout::

    confnb-sealed/1\\n
    <header: canonical JSON object, one line>\\n
    <Tink streaming AEAD AES256_GCM_HKDF_1MB ciphertext of the payload>

The header is ``{"format", "kind", "measurement", "metadata", "created"}``. It stays readable (so an error can say
*which* kernel sealed a blob) but both lines are the ciphertext's associated data, so changing a single byte of
them makes decryption fail. ``metadata`` is therefore authenticated, not secret: callers put schemas, dataset ids
and digests there, never data values.

The measurement in the header is only used to explain a refusal; the refusal itself comes from the key derivation,
so a header edited to claim this kernel's measurement still fails, as an authentication failure.
"""

from __future__ import annotations

import io
import json
import re
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from confnb.attest.evidence import rfc3339
from confnb.attest.report import AttestationReport
from confnb.datasets.errors import IntegrityError
from confnb.datasets.streaming_aead import AES256_GCM_HKDF_1MB, decrypt_to_buffer, encrypt_stream
from kernel_enclave.tee.base import REPORT_DATA_SIZE, TeeBackend

__all__ = [
    "FORMAT",
    "MAGIC",
    "SEALING_CONTEXT",
    "Sealed",
    "SealingError",
    "current_measurement",
    "seal",
    "unseal",
]

FORMAT: Final = "confnb-sealed/1"
MAGIC: Final = FORMAT.encode("ascii") + b"\n"
SEALING_CONTEXT: Final = b"vault/seal/1"
MAX_HEADER_BYTES: Final = 1 << 20
MEASUREMENT_SIZE: Final = 48
_HEADER_FIELDS: Final = frozenset({"format", "kind", "measurement", "metadata", "created"})
_KIND = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_HEX_MEASUREMENT = re.compile(r"[0-9a-f]{96}")


class SealingError(ValueError):
    """A blob cannot be sealed or unsealed; the message names the failed check and never holds payload bytes.

    For a blob sealed by another kernel image, ``sealed_measurement`` and ``current_measurement`` hold both values.
    """

    def __init__(
        self, message: str, *, sealed_measurement: bytes | None = None, current_measurement: bytes | None = None
    ) -> None:
        super().__init__(message)
        self.sealed_measurement = sealed_measurement
        self.current_measurement = current_measurement


@dataclass(frozen=True)
class Sealed:
    """An unsealed blob: what was sealed, and (from the authenticated header) by which kernel and when."""

    kind: str
    payload: bytes = field(repr=False)
    metadata: dict[str, Any]
    created: str = ""
    measurement: bytes = b""


# -- this kernel's measurement ------------------------------------------------------------------------------

_measurements: weakref.WeakKeyDictionary[TeeBackend, bytes] = weakref.WeakKeyDictionary()
_measurements_lock = threading.Lock()


def current_measurement(backend: TeeBackend) -> bytes:
    """The launch MEASUREMENT of the kernel ``backend`` runs in, read from a report (cached per backend).

    The firmware is the authority on what was measured, so the value comes from a real report (REPORT_DATA all
    zero: it binds nothing and is never shown to a verifier) rather than from a configuration that could disagree.
    A measurement is fixed for the life of a VM, so one report per backend is enough.
    """
    with _measurements_lock:
        cached = _measurements.get(backend)
    if cached is not None:
        return cached
    quote = backend.get_quote(bytes(REPORT_DATA_SIZE))
    measurement = AttestationReport.parse(quote.report).measurement
    with _measurements_lock:
        _measurements[backend] = measurement
    return measurement


def _short(measurement: bytes) -> str:
    return measurement.hex()[:16] + "…"


# -- sealing ------------------------------------------------------------------------------------------------


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _key(backend: TeeBackend) -> bytes:
    return backend.derive_sealing_key(SEALING_CONTEXT)


def seal(backend: TeeBackend, kind: str, payload: bytes, metadata: Mapping[str, Any]) -> bytes:
    """Encrypt ``payload`` so that only a kernel with this launch measurement on this platform can read it.

    ``kind`` (lowercase identifier such as ``table`` or ``model``) and ``metadata`` (a JSON object) are stored in
    the clear but authenticated; ``payload`` is encrypted.
    """
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise SealingError("kind must be a lowercase identifier of 1 to 64 characters (a-z, 0-9, '_', '.', '-')")
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
    if not isinstance(metadata, Mapping):
        raise SealingError(f"metadata must be a JSON object, not {type(metadata).__name__}")
    header = {
        "format": FORMAT,
        "kind": kind,
        "measurement": current_measurement(backend).hex(),
        "metadata": dict(metadata),
        "created": rfc3339(datetime.now(UTC)),
    }
    try:
        header_line = _canonical(header)
    except (TypeError, ValueError, RecursionError) as exc:
        raise SealingError(f"metadata cannot be stored as canonical JSON ({type(exc).__name__})") from None
    if len(header_line) > MAX_HEADER_BYTES:
        raise SealingError(f"the header is larger than {MAX_HEADER_BYTES} bytes; keep metadata small")
    prefix = MAGIC + header_line + b"\n"
    sink = io.BytesIO()
    sink.write(prefix)
    encrypt_stream(_key(backend), prefix, [payload], sink, params=AES256_GCM_HKDF_1MB)
    return sink.getvalue()


def _parse_header(blob: bytes) -> tuple[dict[str, Any], bytes, int]:
    """The header, the associated data (magic + header line) and where the ciphertext starts; checks shape only."""
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise TypeError(f"a sealed blob is bytes, not {type(blob).__name__}")
    data = bytes(blob[: len(MAGIC) + MAX_HEADER_BYTES + 1])
    if not data.startswith(MAGIC):
        first_line = data.split(b"\n", 1)[0]
        if first_line.startswith(b"confnb-sealed/"):
            version = first_line.decode("ascii", "replace")[:40]
            raise SealingError(f"magic: unsupported sealed-blob version {version!r} (this kernel reads {FORMAT})")
        raise SealingError(f"magic: not a confnb sealed blob (it does not start with {FORMAT!r})")
    end = data.find(b"\n", len(MAGIC))
    if end < 0:
        if len(data) > len(MAGIC) + MAX_HEADER_BYTES:
            raise SealingError(f"header: longer than {MAX_HEADER_BYTES} bytes")
        raise SealingError("header: truncated (no end of the header line)")
    try:
        header = json.loads(data[len(MAGIC) : end])
    except (ValueError, RecursionError):
        raise SealingError("header: not valid JSON") from None
    if not isinstance(header, dict):
        raise SealingError("header: not a JSON object")
    if set(header) != _HEADER_FIELDS:
        missing, extra = sorted(_HEADER_FIELDS - set(header)), sorted(set(header) - _HEADER_FIELDS)
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unexpected {', '.join(repr(name)[:40] for name in extra)}"] if extra else []
        )
        raise SealingError(f"header: {'; '.join(parts)}")
    if header["format"] != FORMAT:
        raise SealingError(f"header: format is not {FORMAT!r}")
    if not isinstance(header["kind"], str) or not _KIND.fullmatch(header["kind"]):
        raise SealingError("header: kind is not a lowercase identifier")
    if not isinstance(header["measurement"], str) or not _HEX_MEASUREMENT.fullmatch(header["measurement"]):
        raise SealingError("header: measurement is not 96 lowercase hex digits")
    if not isinstance(header["metadata"], dict):
        raise SealingError("header: metadata is not a JSON object")
    if not isinstance(header["created"], str):
        raise SealingError("header: created is not a timestamp")
    return header, data[: end + 1], end + 1


def unseal(backend: TeeBackend, blob: bytes) -> Sealed:
    """Decrypt a blob made by :func:`seal` in a kernel with this kernel's measurement, or raise :class:`SealingError`.

    Checks, in order: magic and version, header shape, the sealing kernel's measurement (for a clear refusal),
    then the authenticated decryption, which covers the header bytes and detects any edit, truncation or extension.
    """
    header, associated_data, start = _parse_header(blob)
    sealed_by = bytes.fromhex(header["measurement"])
    mine = current_measurement(backend)
    if sealed_by != mine:
        raise SealingError(
            f"sealed by a kernel with measurement {_short(sealed_by)}; this kernel's measurement is {_short(mine)}: "
            "only the same kernel image can unseal it",
            sealed_measurement=sealed_by,
            current_measurement=mine,
        )
    try:
        with memoryview(blob) as view, view[start:] as ciphertext:
            plaintext = decrypt_to_buffer(_key(backend), associated_data, ciphertext, params=AES256_GCM_HKDF_1MB)
    except IntegrityError as exc:
        raise SealingError(
            f"authentication: the sealed blob was modified, truncated or extended, or sealed on another platform "
            f"({exc})"
        ) from None
    return Sealed(
        kind=header["kind"],
        payload=bytes(plaintext),
        metadata=header["metadata"],
        created=header["created"],
        measurement=sealed_by,
    )
