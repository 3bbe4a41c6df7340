"""Uploads: a file the data owner's browser encrypted to this kernel, decrypted and registered inside the vault.

The browser seals a fresh content key to the kernel's attested HPKE key with ``info`` naming the descriptor
(dataset name, file format, file name, output policy), and encrypts the file with Tink's streaming AEAD under that
key with the descriptor's canonical JSON as associated data. The Jupyter server and the relay in between see only
ciphertext; if either changes the name, the format or the policy, the key does not open (HPKE) or the first
segment does not authenticate (Tink). Only then is the plaintext parsed, in a confined process of its own
(:mod:`kernel_enclave.vault.upload_parser`), validated by the vault (:mod:`kernel_enclave.vault.untrusted`) and
registered under the owner's policy, like any brokered dataset.

The relay reaches these operations over ``upload.sock`` (the launcher's user only), one connection for all its
uploads; each upload lives in that connection and nothing of it survives a failure, a cancel or the connection::

    upload_begin  {descriptor, ciphertext_size} + [sealed_key]  -> {upload}
    upload_chunk  {upload, seq} + [ciphertext bytes, ...]        -> {received}
    upload_end    {upload}                                       -> {dataset, rows, columns, policy_id}
    upload_cancel {upload}                                       -> {}

Chunks are decrypted as they arrive (one segment of read-ahead, so a tampered segment is reported at the chunk
that completes the next one), into memory the vault holds anyway once the table is registered.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, Final, cast

import pyarrow as pa  # type: ignore[import-untyped]
from cryptography.hazmat.primitives.asymmetric import ec

from confnb import hpke
from confnb.attest.errors import EvidenceError, PolicyError
from confnb.attest.evidence import canonical_claims
from confnb.datasets.errors import IntegrityError
from confnb.datasets.streaming_aead import AES256_GCM_HKDF_1MB, iter_decrypt, plaintext_size
from confnb.policy.output import OutputPolicy
from confnb.policy.schema import OUTPUT_TABLES
from kernel_enclave.vault.protocol import ProtocolError, VaultError, error_reply
from kernel_enclave.vault.upload_parser import parse_upload
from kernel_enclave.vault.vault import Reply, Vault

UPLOAD_FORMAT: Final = "confnb-upload/1"
INFO_PREFIX: Final = b"confnb-upload/1:"
FILE_FORMATS: Final = ("csv", "parquet", "arrow")
DESCRIPTOR_FIELDS: Final = ("format", "name", "file_format", "filename", "policy")
MAX_CIPHERTEXT_BYTES: Final = 4 * 1024**3
MAX_CHUNK_BYTES: Final = 16 * 1024**2
MAX_POLICY_CHARS: Final = 64 * 1024
MAX_FILENAME_CHARS: Final = 255
CONTENT_KEY_BYTES: Final = 32
# The decrypter keeps up with the network by orders of magnitude; a wait this long means it is stuck.
DECRYPT_WAIT_S: Final = 120.0
OPERATIONS: Final = ("upload_begin", "upload_chunk", "upload_end", "upload_cancel")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class UploadError(VaultError):
    """An upload refused or failed; the message is one line naming the check, never file content."""

    kind = "UploadError"


def _one_line(text: str, limit: int = 400) -> str:
    return " ".join(text.split())[:limit]


@dataclass(frozen=True)
class UploadDescriptor:
    """What the browser bound the upload to: every field is covered by the HPKE ``info`` and the AEAD's data."""

    name: str
    file_format: str
    filename: str
    policy: OutputPolicy
    canonical: bytes

    @classmethod
    def from_mapping(cls, value: object) -> UploadDescriptor:
        if not isinstance(value, dict):
            raise UploadError("descriptor: must be an object with string values")
        for key, item in value.items():
            if not isinstance(item, str):
                shown = key if key in DESCRIPTOR_FIELDS else _shown(key)
                raise UploadError(f"descriptor.{shown}: must be a string")
        unknown = sorted(set(value) - set(DESCRIPTOR_FIELDS))
        if unknown:
            fields = ", ".join(DESCRIPTOR_FIELDS)
            raise UploadError(f"descriptor: unknown field {_shown(unknown[0])} (fields: {fields})")
        missing = [key for key in DESCRIPTOR_FIELDS if key not in value]
        if missing:
            raise UploadError(f"descriptor: missing field {missing[0]!r}")
        if value["format"] != UPLOAD_FORMAT:
            raise UploadError(f"descriptor.format: must be {UPLOAD_FORMAT!r}, not {_shown(value['format'])}")
        name = value["name"]
        if not _NAME.fullmatch(name):
            raise UploadError("descriptor.name: must be 1 to 64 letters, digits, '_', '.' or '-'")
        if value["file_format"] not in FILE_FORMATS:
            raise UploadError(
                f"descriptor.file_format: must be one of {', '.join(FILE_FORMATS)}, not {_shown(value['file_format'])}"
            )
        filename = value["filename"]
        if not 1 <= len(filename) <= MAX_FILENAME_CHARS or not filename.isprintable():
            raise UploadError(f"descriptor.filename: must be 1 to {MAX_FILENAME_CHARS} printable characters")
        text = value["policy"]
        if len(text) > MAX_POLICY_CHARS:
            raise UploadError(f"descriptor.policy: the policy TOML is longer than {MAX_POLICY_CHARS} characters")
        try:
            policy = OutputPolicy.from_toml(text, source="upload policy", tables=OUTPUT_TABLES)
        except PolicyError as exc:
            raise UploadError(f"descriptor.policy: {_one_line(str(exc))}") from None
        try:
            canonical = canonical_claims(value)
        except EvidenceError as exc:  # unreachable after the checks above; kept so no path skips the binding
            raise UploadError(f"descriptor: {exc}") from None
        return cls(name=name, file_format=value["file_format"], filename=filename, policy=policy, canonical=canonical)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.canonical).hexdigest()

    def hpke_info(self) -> bytes:
        """``confnb-upload/1:`` + hex SHA-256 of the canonical descriptor: the key opens for this descriptor only."""
        return INFO_PREFIX + self.digest.encode("ascii")


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _AbortedError(Exception):
    """The upload was discarded while the decrypter waited for data."""


class _Feed:
    """A blocking byte source for :func:`iter_decrypt`, filled by chunk requests, so that the published
    decryption code (which pulls from a file) runs unchanged on a stream that is pushed in pieces."""

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self._parts: deque[memoryview] = deque()
        self._eof = False
        self._aborted = False
        self.waiting = False  # the reader is blocked on an empty feed: everything pushed has been consumed

    def push(self, data: bytes) -> None:
        with self.condition:
            self._parts.append(memoryview(data))
            self.condition.notify_all()

    def finish(self) -> None:
        with self.condition:
            self._eof = True
            self.condition.notify_all()

    def abort(self) -> None:
        with self.condition:
            self._aborted = True
            self._parts.clear()
            self.condition.notify_all()

    def drained(self) -> bool:
        return self.waiting and not self._parts

    def readinto(self, buffer: bytearray | memoryview) -> int:
        with self.condition:
            while not self._parts and not self._eof and not self._aborted:
                self.waiting = True
                self.condition.notify_all()
                self.condition.wait()
            self.waiting = False
            if self._aborted:
                raise _AbortedError
            if not self._parts:
                return 0  # the end of the stream
            with memoryview(buffer) as raw, raw.cast("B") as target:
                filled = 0
                while self._parts and filled < len(target):
                    part = self._parts[0]
                    count = min(len(part), len(target) - filled)
                    target[filled : filled + count] = part[:count]
                    filled += count
                    if count == len(part):
                        self._parts.popleft()
                    else:
                        self._parts[0] = part[count:]
            return filled


class UploadSession:
    """One upload in progress: the ciphertext is pushed in, decrypted by a thread, and parsed at the end."""

    def __init__(self, descriptor: UploadDescriptor, key: bytes, ciphertext_size: int) -> None:
        self.descriptor = descriptor
        self.ciphertext_size = ciphertext_size
        self.received = 0
        self._last_seq: int | None = None
        self._hash = hashlib.sha256()
        self._feed = _Feed()
        self._plaintext = pa.BufferOutputStream()
        self._error: str | None = None
        self._finished = False
        self._thread = threading.Thread(target=self._decrypt, args=(key,), name="confnb-upload", daemon=True)
        self._thread.start()

    def _decrypt(self, key: bytes) -> None:
        source = cast(BinaryIO, self._feed)
        try:
            for segment in iter_decrypt(key, self.descriptor.canonical, source, params=AES256_GCM_HKDF_1MB):
                self._plaintext.write(segment)
        except _AbortedError:
            pass
        except IntegrityError as exc:
            self._error = f"decryption failed: {_one_line(str(exc))}"
        except Exception as exc:  # anything else is still a failed upload, reported by type only
            self._error = f"decryption failed ({type(exc).__name__})"
        finally:
            with self._feed.condition:
                self._finished = True
                self._feed.condition.notify_all()

    def _settle(self) -> None:
        """Wait until the decrypter has consumed everything pushed (or stopped), then report its failure."""
        with self._feed.condition:
            settled = self._feed.condition.wait_for(lambda: self._finished or self._feed.drained(), DECRYPT_WAIT_S)
        if not settled:
            raise UploadError(f"decryption did not keep up within {DECRYPT_WAIT_S:g} s")
        if self._error is not None:
            raise UploadError(self._error)

    def add(self, seq: int, chunks: list[bytes]) -> int:
        if self._last_seq is not None and seq != self._last_seq + 1:
            raise UploadError(f"chunk seq {seq} after {self._last_seq}: chunks must be numbered consecutively")
        size = sum(len(chunk) for chunk in chunks)
        if size == 0:
            raise UploadError(f"chunk {seq} is empty")
        if size > MAX_CHUNK_BYTES:
            raise UploadError(f"chunk {seq} is {size} bytes; a chunk is at most {MAX_CHUNK_BYTES} bytes")
        if self.received + size > self.ciphertext_size:
            raise UploadError(
                f"chunk {seq} brings the ciphertext past the announced ciphertext_size {self.ciphertext_size}"
            )
        self._last_seq = seq
        for chunk in chunks:
            self._hash.update(chunk)
            self._feed.push(chunk)
        self.received += size
        self._settle()
        return self.received

    def finish(self) -> pa.Buffer:
        """The authenticated plaintext: every byte announced arrived and Tink's last segment checked out."""
        if self.received != self.ciphertext_size:
            raise UploadError(
                f"the upload ended after {self.received} of the {self.ciphertext_size} announced ciphertext bytes"
            )
        self._feed.finish()
        self._thread.join(DECRYPT_WAIT_S)
        if self._thread.is_alive():
            raise UploadError(f"decryption did not finish within {DECRYPT_WAIT_S:g} s")
        if self._error is not None:
            raise UploadError(self._error)
        return self._plaintext.getvalue()

    @property
    def ciphertext_digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()

    def discard(self) -> None:
        self._feed.abort()
        self._thread.join(5)
        self._plaintext = pa.BufferOutputStream()


def parse_table(data: pa.Buffer, file_format: str) -> pa.Table:
    """The decrypted file as a validated table, parsed in a process of its own (:mod:`.upload_parser`): the vault
    runs no CSV or Parquet reader on upload bytes, only the checked IPC reader on what the parser hands back.
    Errors name the check or the format and pyarrow's error type, never the content."""
    try:
        return parse_upload(data, file_format)
    except VaultError as exc:
        raise UploadError(str(exc)) from None


class Uploads:
    """The upload operations of one vault; names of uploads in progress are reserved across connections."""

    def __init__(self, vault: Vault, hpke_private_key: ec.EllipticCurvePrivateKey) -> None:
        self.vault = vault
        self.hpke_private_key = hpke_private_key
        self._lock = threading.Lock()
        self._reserved: set[str] = set()

    def connection(self) -> UploadConnection:
        return UploadConnection(self)

    def reserve(self, name: str) -> None:
        with self._lock:
            if name in self._reserved:
                raise UploadError(f"the dataset name {name!r} is already being uploaded")
            if self.vault.has_dataset(name):
                raise UploadError(f"the dataset name {name!r} is already taken in this kernel")
            self._reserved.add(name)

    def release(self, name: str) -> None:
        with self._lock:
            self._reserved.discard(name)


class UploadConnection:
    """The uploads of one connection (the relay's); they are discarded when it closes."""

    def __init__(self, uploads: Uploads) -> None:
        self._uploads = uploads
        self._sessions: dict[str, UploadSession] = {}
        self._counter = 0
        self._handlers = {
            "upload_begin": self._begin,
            "upload_chunk": self._chunk,
            "upload_end": self._end,
            "upload_cancel": self._cancel,
        }

    def handle(self, header: dict[str, Any], buffers: list[bytes]) -> Reply:
        """Answer one request; never raises. A failed operation ends its upload: nothing of it stays."""
        op = header.get("op")
        handler = self._handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            shown = op if isinstance(op, str) and op.isidentifier() and len(op) < 40 else "?"
            refusal = ProtocolError(f"unknown upload operation {shown!r} (this socket serves {', '.join(OPERATIONS)})")
            return error_reply(refusal), []
        try:
            return handler(header, buffers), []
        except VaultError as exc:
            self._fail(header, str(exc))
            return error_reply(exc), []
        except Exception as exc:
            message = f"{op} failed inside the vault ({type(exc).__name__})"
            self._fail(header, message)
            return error_reply(UploadError(message)), []

    def close(self) -> None:
        for upload_id in list(self._sessions):
            self._drop(upload_id)

    # -- operations -------------------------------------------------------------------------------------------

    def _begin(self, header: dict[str, Any], buffers: list[bytes]) -> dict[str, Any]:
        descriptor = UploadDescriptor.from_mapping(header.get("descriptor"))
        size = header.get("ciphertext_size")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise UploadError("ciphertext_size: must be a positive integer")
        if size > MAX_CIPHERTEXT_BYTES:
            raise UploadError(f"ciphertext_size {size} exceeds the limit of {MAX_CIPHERTEXT_BYTES} bytes (4 GiB)")
        try:
            plaintext_size(size, AES256_GCM_HKDF_1MB)
        except IntegrityError:
            raise UploadError(
                f"ciphertext_size {size} is not the length of any AES256_GCM_HKDF_1MB ciphertext"
            ) from None
        if len(buffers) != 1:
            raise ProtocolError("upload_begin: send the sealed key as one buffer")
        try:
            key = hpke.open_sealed(self._uploads.hpke_private_key, buffers[0], descriptor.hpke_info())
        except hpke.HpkeError:
            raise UploadError(
                "HPKE: the sealed key does not open with this kernel's key for this descriptor "
                "(sealed to another kernel, or the descriptor was changed after sealing)"
            ) from None
        if len(key) != CONTENT_KEY_BYTES:
            raise UploadError(f"the sealed content key is {len(key)} bytes, not {CONTENT_KEY_BYTES}")
        self._uploads.reserve(descriptor.name)
        try:
            session = UploadSession(descriptor, key, size)
        except BaseException:
            self._uploads.release(descriptor.name)
            raise
        self._counter += 1
        upload_id = f"u{self._counter}"
        self._sessions[upload_id] = session
        return {"ok": True, "upload": upload_id, "dataset": descriptor.name}

    def _chunk(self, header: dict[str, Any], buffers: list[bytes]) -> dict[str, Any]:
        session = self._session(header)
        seq = header.get("seq")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise UploadError("chunk: seq must be a non-negative integer")
        if not buffers:
            raise UploadError(f"chunk {seq} carries no ciphertext buffer")
        return {"ok": True, "received": session.add(seq, buffers)}

    def _end(self, header: dict[str, Any], buffers: list[bytes]) -> dict[str, Any]:
        upload_id, session = _text(header, "upload"), self._session(header)
        descriptor = session.descriptor
        table = parse_table(session.finish(), descriptor.file_format)
        record = {
            "descriptor": "sha256:" + descriptor.digest,
            "ciphertext": session.ciphertext_digest,
            "file_format": descriptor.file_format,
            "policy": descriptor.policy.digest(),
            "rows": table.num_rows,
        }
        self._uploads.vault.add_table(descriptor.name, table, descriptor.policy, source="upload", record=record)
        self._drop(upload_id)
        return {
            "ok": True,
            "dataset": descriptor.name,
            "rows": table.num_rows,
            "columns": list(table.column_names),
            "policy_id": descriptor.policy.id,
        }

    def _cancel(self, header: dict[str, Any], buffers: list[bytes]) -> dict[str, Any]:
        self._drop(_text(header, "upload"))
        return {"ok": True}

    # -- state ------------------------------------------------------------------------------------------------

    def _session(self, header: Mapping[str, Any]) -> UploadSession:
        upload_id = _text(header, "upload")
        session = self._sessions.get(upload_id)
        if session is None:
            raise UploadError(f"no upload {_shown(upload_id)} in progress (it ended, failed or was cancelled)")
        return session

    def _fail(self, header: Mapping[str, Any], reason: str) -> None:
        upload_id = header.get("upload")
        session = self._sessions.get(upload_id) if isinstance(upload_id, str) else None
        if session is not None:
            self._drop(str(upload_id))
            name: str | None = session.descriptor.name
        else:
            descriptor = header.get("descriptor")
            candidate = descriptor.get("name") if isinstance(descriptor, dict) else None
            name = candidate if isinstance(candidate, str) and _NAME.fullmatch(candidate) else None
            if header.get("op") != "upload_begin":
                return  # a request about no upload in progress: nothing happened worth a log entry
        # Refusals are recorded like refused key releases; the reason names checks, never file content.
        # The upload is gone either way; a log that cannot record refuses every later release by itself.
        with contextlib.suppress(Exception):
            self._uploads.vault.audit.append(
                "upload-refused", op=str(header.get("op")), dataset=name, reason=_one_line(reason, 300)
            )

    def _drop(self, upload_id: str) -> None:
        session = self._sessions.pop(upload_id, None)
        if session is not None:
            session.discard()
            self._uploads.release(session.descriptor.name)


def _text(header: Mapping[str, Any], key: str) -> str:
    value = header.get(key)
    if not isinstance(value, str) or not value or len(value) > 64:
        raise ProtocolError(f"{header.get('op', 'request')}: {key} must be a short non-empty string")
    return value
