"""Encrypted Parquet files: Parquet Modular Encryption (PME) with ``AES_GCM_V1`` through ``pyarrow``.

This is confnb's interchange format (``DESIGN.md``, "Datasets and keys"): standard PME, which Spark/parquet-java,
arrow-rs and ParquetSharp implement too, written and read with ``pyarrow.parquet.encryption`` and
``pyarrow.dataset``. What confnb fixes, and why:

- ``AES_GCM_V1`` only. ``AES_GCM_CTR_V1`` authenticates the footer and page headers but not page data, so a flipped
  byte in a page reads back as a silently different value. The writer cannot produce it; the reader looks at the
  file's crypto metadata before handing it to Arrow and refuses it by name.
- An encrypted footer, and only files that have one. The footer holds the schema, statistics and row-group layout,
  which are themselves data. Arrow's key-management reader also accepts *plaintext* Parquet files (the decryption
  properties it builds allow them), so a file swapped for a plaintext one would otherwise be read as data.
- 256-bit data keys (pyarrow's default is 128), a fresh one per file.
- Uniform encryption: one data key per file for the footer and every column, so no column can be left out by a
  mistake in a column list. pyarrow 20 lacks ``uniform_encryption``; there every leaf column is listed under the
  same master key (one data key per column, still 256-bit, same coverage).
- Single wrapping by default: the data key is wrapped directly under the dataset key. Double wrapping (pyarrow's
  default) inserts a key-encryption key that pyarrow always makes 128 bits long (measured: ``wrap_key`` receives
  16 bytes even with ``data_key_length_bits=256``), which would cap the whole chain at AES-128. Its only benefit,
  fewer calls to a remote KMS, does not apply: the "KMS" here is in-process. Reading handles both.
- Internal key material, so a dataset stays exactly the files its manifest lists (no ``_KEY_MATERIAL_FOR_*``).

**The KMS.** A dataset has one 32-byte key, held by the owner's broker and released (HPKE-sealed) only to an attested
kernel. That key is the PME *master key*: :class:`DatasetKeyring` holds the released keys, and the ``KmsClient`` that
pyarrow's ``CryptoFactory`` creates from it wraps and unwraps data keys with AES-256-GCM under the dataset key,
binding the master key identifier, dataset id and key id as associated data. The client never contacts anything:
whatever a file's key material says about a KMS instance or URL is ignored (pyarrow >= 26 also no longer passes
the file's URL on, ``read_kms_url=False``; before 26 the connection configuration confnb passes has a URL of its
own, so the file's is never substituted). The cost: one local unwrap per data key, i.e. one per file.

**Binding a file to its place.** PME authenticates each file, but pyarrow's key-management API has no AAD prefix,
so nothing in PME stops files being swapped within a dataset. The writer therefore puts the file's identity
(dataset id, key id, file name) into the footer's key-value metadata, which the encrypted footer authenticates, and
the reader compares it with what it expects on the very handle it then reads the data from.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pyarrow as pa  # type: ignore[import-untyped]  # pyarrow ships no type information
import pyarrow.dataset as ds  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pyarrow.parquet.encryption as pe  # type: ignore[import-untyped]
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from confnb.datasets.errors import DatasetFormatError, IntegrityError
from confnb.datasets.ipc import _batches as _normalized_batches  # same source handling as the IPC writer
from confnb.fileio import atomic_output

__all__ = [
    "ALGORITHM",
    "DATA_KEY_BITS",
    "ROW_GROUP_ROWS",
    "SCAN_OPTIONS",
    "DatasetFormatError",
    "DatasetKeyring",
    "EncryptedParquetInfo",
    "IntegrityError",
    "KmsCalls",
    "master_key_identifier",
    "read_encrypted_parquet",
    "read_encrypted_parquet_dataset",
    "write_encrypted_parquet",
]

ALGORITHM: Final = "AES_GCM_V1"
DATA_KEY_BITS: Final = 256
DATASET_KEY_SIZE: Final = 32
#: Rows per row group: pyarrow's own default. Batches are gathered up to this (or ``_ROW_GROUP_BYTES``) before each
#: row group is written, because ``ParquetWriter`` turns every write call into at least one row group.
ROW_GROUP_ROWS: Final = 1 << 20
_ROW_GROUP_BYTES: Final = 128 << 20
#: Footer key-value entry that names the file's place in its dataset (authenticated by the encrypted footer).
BINDING_KEY: Final = b"confnb.file"
_BINDING_TAG: Final = "confnb-parquet-file/1"
_WRAP_TAG: Final = "confnb-parquet-key-wrap/1"
_WRAP_PREFIX: Final = "confnb1:"
_NONCE_SIZE: Final = 12
_TAG_SIZE: Final = 16
_DATA_KEY_SIZES: Final = (16, 24, 32)
# What confnb passes as the KMS connection. Its values identify nothing remote; the URL is non-empty so that
# pyarrow < 26, which fills an *empty* URL in from the file's key material, never does so.
_KMS_INSTANCE_ID: Final = "confnb-keyring"
_KMS_INSTANCE_URL: Final = "confnb-keyring:in-process"
_SAFE_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MAGIC_ENCRYPTED_FOOTER: Final = b"PARE"
_MAGIC_PLAIN: Final = b"PAR1"
_THRIFT_STRUCT: Final = 12
#: ``ParquetFragmentScanOptions`` of every confnb Parquet scan. Files are read through ``pa.OSFile``, not memory-
#: mapped: each read copies ciphertext into private memory before AES-GCM sees it, so whoever can change the file
#: (the host, on a shared file system) cannot change bytes between their authentication and their decryption.
#: ``pre_buffer`` (coalesced read-ahead, meant for object stores) is off: on local files it measured 5-20% slower,
#: encrypted or not.
SCAN_OPTIONS: Final[dict[str, Any]] = {"pre_buffer": False}


def _supports(configuration: Any, **option: Any) -> bool:
    try:
        configuration(**option)
    except TypeError:
        return False
    return True


# pyarrow >= 21 has uniform encryption; >= 26 lets a reader refuse the KMS URL in a file's key material.
_HAS_UNIFORM: Final = _supports(pe.EncryptionConfiguration, footer_key="k", uniform_encryption=True)
_HAS_READ_KMS_URL: Final = _supports(pe.DecryptionConfiguration, read_kms_url=False)


def master_key_identifier(dataset_id: str, key_id: str) -> str:
    """The PME master key identifier of a dataset key, as stored (in clear) in each file's key material.

    It names nothing secret: the dataset id and key id are in the manifest too. Both are restricted to letters,
    digits, ``.``, ``_`` and ``-``: then distinct pairs give distinct identifiers, and the identifier survives
    pyarrow's column-keys notation (``id:col,col;id:col``), which it must on pyarrow 20.
    """
    if not isinstance(dataset_id, str) or not _SAFE_ID.fullmatch(dataset_id):
        raise ValueError(f"dataset id {dataset_id!r}: use 1-128 letters, digits, '.', '_' or '-'")
    if not isinstance(key_id, str) or not _SAFE_ID.fullmatch(key_id):
        raise ValueError(f"key id {key_id!r}: use 1-128 letters, digits, '.', '_' or '-'")
    return f"confnb/{dataset_id}/{key_id}"


@dataclass(frozen=True)
class KmsCalls:
    """How often pyarrow called the keyring's KMS client (what a KMS costs: one unwrap per file here)."""

    wraps: int
    unwraps: int


@dataclass(frozen=True)
class _Entry:
    dataset_id: str
    key_id: str
    key: bytes = b""

    def __repr__(self) -> str:  # never show the key
        return f"_Entry({self.dataset_id!r}, {self.key_id!r})"


class DatasetKeyring:
    """Dataset keys released to this process, and the pyarrow ``CryptoFactory`` that reads and writes with them.

    The keyring is the only place the KMS client gets keys from, so which keys a process can use is exactly what was
    added here (by the vault after a key release, or by the owner's tools), never something a file names. One
    keyring can be shared by any number of threads: its table is guarded by a lock and the client keeps no other
    state. pyarrow calls the client with the GIL held, from whichever thread reads the footer.

    ``forget`` and ``clear`` also empty the factory's caches, so a forgotten key stops working at once rather than
    after pyarrow's cache lifetime (which applies to key-encryption keys of double-wrapped files). The factory and
    the clients it caches (inside Arrow's C++, where Python's garbage collector cannot see) refer back to the keyring
    only weakly, so a keyring and its keys are freed as soon as its last user lets go of it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._factory: Any = None
        self._wraps = 0
        self._unwraps = 0

    def __repr__(self) -> str:
        with self._lock:
            names = sorted(self._entries)
        return f"DatasetKeyring({names})"

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def add(self, dataset_id: str, key_id: str, dataset_key: bytes) -> str:
        """Hold ``dataset_key`` for (``dataset_id``, ``key_id``); returns its master key identifier.

        Adding the same key again is a no-op; a *different* key under an identifier already held is refused, since
        files wrapped under the first would silently stop opening.
        """
        identifier = master_key_identifier(dataset_id, key_id)
        if not isinstance(dataset_key, bytes | bytearray) or len(dataset_key) != DATASET_KEY_SIZE:
            raise ValueError(f"a dataset key is {DATASET_KEY_SIZE} bytes")
        entry = _Entry(dataset_id, key_id, bytes(dataset_key))
        with self._lock:
            held = self._entries.get(identifier)
            if held is not None and not hmac.compare_digest(held.key, entry.key):
                raise ValueError(f"{identifier}: a different key is already held for this dataset and key id")
            self._entries[identifier] = entry
        return identifier

    def holds(self, dataset_id: str, key_id: str) -> bool:
        with self._lock:
            return master_key_identifier(dataset_id, key_id) in self._entries

    def forget(self, dataset_id: str, key_id: str) -> bool:
        """Drop one key (for instance when a session ends); True if it was held."""
        with self._lock:
            removed = self._entries.pop(master_key_identifier(dataset_id, key_id), None) is not None
            factory = self._factory
        if factory is not None:
            factory.remove_cache_entries_for_all_tokens()
        return removed

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            factory = self._factory
        if factory is not None:
            factory.remove_cache_entries_for_all_tokens()

    @property
    def calls(self) -> KmsCalls:
        with self._lock:
            return KmsCalls(self._wraps, self._unwraps)

    # -- what pyarrow uses ------------------------------------------------------------------------------------------

    def kms_client(self, kms_connection_config: Any) -> _KeyringKmsClient:
        """What pyarrow's ``kms_client_factory`` returns. The connection configuration is deliberately not used: it
        may carry values from a file's key material, and keys come only from this keyring."""
        del kms_connection_config
        return _KeyringKmsClient(weakref.ref(self))

    def crypto_factory(self) -> Any:
        with self._lock:
            if self._factory is None:
                self._factory = pe.CryptoFactory(_ClientFactory(weakref.ref(self)))
            return self._factory

    def encryption_properties(self, identifier: str, schema: pa.Schema, *, double_wrapping: bool = False) -> Any:
        """``FileEncryptionProperties`` for one new file (pyarrow draws a fresh data key for each call)."""
        with self._lock:
            if identifier not in self._entries:
                raise ValueError(f"{identifier}: this keyring holds no such key")
        return self.crypto_factory().file_encryption_properties(
            _kms_connection(), _encryption_configuration(identifier, schema, double_wrapping=double_wrapping)
        )

    def decryption_properties(self) -> Any:
        return self.crypto_factory().file_decryption_properties(_kms_connection(), _decryption_configuration())

    def parquet_format(self) -> Any:
        """A ``pyarrow.dataset.ParquetFileFormat`` that decrypts every file it scans with this keyring."""
        config = ds.ParquetDecryptionConfig(self.crypto_factory(), _kms_connection(), _decryption_configuration())
        return ds.ParquetFileFormat(
            default_fragment_scan_options=ds.ParquetFragmentScanOptions(decryption_config=config, **SCAN_OPTIONS)
        )

    # -- what the KMS client calls ----------------------------------------------------------------------------------

    def _entry(self, identifier: str, *, wrapping: bool) -> _Entry:
        with self._lock:
            if wrapping:
                self._wraps += 1
            else:
                self._unwraps += 1
            entry = self._entries.get(identifier)
        if entry is None:
            raise IntegrityError(f"the file's key material names master key {identifier!r}, which was not released")
        return entry


class _ClientFactory:
    """The ``kms_client_factory`` given to pyarrow; holds its keyring weakly (see :class:`DatasetKeyring`)."""

    def __init__(self, keyring: weakref.ref[DatasetKeyring]) -> None:
        self._keyring = keyring

    def __call__(self, kms_connection_config: Any) -> _KeyringKmsClient:
        return _alive(self._keyring).kms_client(kms_connection_config)


def _alive(reference: weakref.ref[DatasetKeyring]) -> DatasetKeyring:
    keyring = reference()
    if keyring is None:  # only reachable if pyarrow outlives the keyring that created it
        raise IntegrityError("the keyring holding the dataset keys no longer exists")
    return keyring


class _KeyringKmsClient(pe.KmsClient):  # type: ignore[misc]  # pyarrow is untyped
    """Wraps data keys with AES-256-GCM under a dataset key; text out, because pyarrow stores and passes it as str.

    Wire form: ``confnb1:`` + base64(12-byte random nonce || ciphertext || 16-byte tag). The associated data binds
    the master key identifier, dataset id and key id, so a wrapped key opens only under the identifier it was made
    for. A random nonce is safe: a dataset key wraps one data key per file, far below GCM's 2^32 limit.
    """

    def __init__(self, keyring: weakref.ref[DatasetKeyring]) -> None:
        super().__init__()
        self._keyring = keyring

    def wrap_key(self, key_bytes: bytes, master_key_identifier: str) -> str:
        entry = _alive(self._keyring)._entry(master_key_identifier, wrapping=True)
        nonce = os.urandom(_NONCE_SIZE)
        sealed = AESGCM(entry.key).encrypt(nonce, bytes(key_bytes), _wrap_aad(master_key_identifier, entry))
        return _WRAP_PREFIX + _b64encode(nonce + sealed)

    def unwrap_key(self, wrapped_key: str | bytes, master_key_identifier: str) -> bytes:
        entry = _alive(self._keyring)._entry(master_key_identifier, wrapping=False)
        text = wrapped_key.decode("ascii", "replace") if isinstance(wrapped_key, bytes) else str(wrapped_key)
        if not text.startswith(_WRAP_PREFIX):
            raise IntegrityError("a wrapped key in the file was not made by confnb's keyring")
        try:
            blob = _b64decode(text.removeprefix(_WRAP_PREFIX))
        except ValueError:
            raise IntegrityError("a wrapped key in the file is not valid base64") from None
        if len(blob) - _NONCE_SIZE - _TAG_SIZE not in _DATA_KEY_SIZES:
            raise IntegrityError("a wrapped key in the file has an impossible length")
        try:
            return AESGCM(entry.key).decrypt(
                blob[:_NONCE_SIZE], blob[_NONCE_SIZE:], _wrap_aad(master_key_identifier, entry)
            )
        except InvalidTag:
            raise IntegrityError(
                f"the dataset key of {entry.dataset_id!r} (key id {entry.key_id!r}) does not open the file's key "
                "material: a wrong key, or altered key material"
            ) from None


def _wrap_aad(identifier: str, entry: _Entry) -> bytes:
    return json.dumps([_WRAP_TAG, identifier, entry.dataset_id, entry.key_id], separators=(",", ":")).encode()


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as error:
        raise ValueError(str(error)) from None


def _kms_connection() -> Any:
    return pe.KmsConnectionConfig(kms_instance_id=_KMS_INSTANCE_ID, kms_instance_url=_KMS_INSTANCE_URL)


def _decryption_configuration() -> Any:
    if not _HAS_READ_KMS_URL:
        return pe.DecryptionConfiguration()
    configuration = pe.DecryptionConfiguration(read_kms_url=False)
    if configuration.read_kms_url is not False:  # not an assert: it must hold under python -O as well
        raise RuntimeError("pyarrow did not accept read_kms_url=False")
    return configuration


def _encryption_configuration(identifier: str, schema: pa.Schema, *, double_wrapping: bool) -> Any:
    options: dict[str, Any] = {
        "footer_key": identifier,
        "encryption_algorithm": ALGORITHM,
        "plaintext_footer": False,
        "double_wrapping": double_wrapping,
        "internal_key_material": True,
        "data_key_length_bits": DATA_KEY_BITS,
    }
    if _HAS_UNIFORM:
        options["uniform_encryption"] = True
    else:
        options["column_keys"] = {identifier: _leaf_column_paths(schema)}
    configuration = pe.EncryptionConfiguration(**options)
    if configuration.encryption_algorithm != ALGORITHM or configuration.plaintext_footer:
        raise RuntimeError("pyarrow did not accept confnb's PME settings (AES_GCM_V1, encrypted footer)")
    return configuration


def _leaf_column_paths(schema: pa.Schema) -> list[str]:
    """Every Parquet leaf column of ``schema`` as PME names it (``s.f``, ``l.list.element``, ``m.key_value.key``):
    taken from the Parquet schema pyarrow itself derives, so nested naming cannot drift from the writer's."""
    sink = pa.BufferOutputStream()
    pq.write_table(schema.empty_table(), sink)
    metadata = pq.read_metadata(pa.BufferReader(sink.getvalue()))
    return [metadata.schema.column(index).path for index in range(metadata.num_columns)]


# -- the file's place in its dataset -----------------------------------------------------------------------------------


def _binding(dataset_id: str, key_id: str, name: str) -> bytes:
    return json.dumps([_BINDING_TAG, dataset_id, key_id, name], separators=(",", ":")).encode()


def _check_binding(metadata: dict[bytes, bytes] | None, expected: bytes, label: str) -> None:
    found = (metadata or {}).get(BINDING_KEY)
    if found is None:
        raise IntegrityError(f"{label}: carries no confnb file binding, so it was not written for this dataset")
    if hmac.compare_digest(found, expected):
        return
    try:
        _, dataset_id, key_id, name = json.loads(found)
        where = f"file {name!r} of dataset {dataset_id!r} (key id {key_id!r})"
    except (ValueError, TypeError):
        where = "another place"
    raise IntegrityError(f"{label}: is {where}, not the file expected here (moved, swapped or replayed)")


def _without_binding(schema: pa.Schema) -> pa.Schema:
    metadata = {key: value for key, value in (schema.metadata or {}).items() if key != BINDING_KEY}
    return schema.with_metadata(metadata) if metadata else schema.remove_metadata()


# -- the file's layout, checked before Arrow parses it -----------------------------------------------------------------


def _thrift_field(data: bytes, position: int) -> tuple[int, int, int]:
    """One Thrift compact-protocol field header: (position after it, field id, type); only the short and the
    zigzag-varint long forms that a struct's first field can take."""
    if position >= len(data):
        raise ValueError("truncated")
    byte = data[position]
    delta, kind = byte >> 4, byte & 0x0F
    if delta:
        return position + 1, delta, kind
    value, shift, position = 0, 0, position + 1
    while True:
        if position >= len(data) or shift > 14:
            raise ValueError("bad field id")
        part = data[position]
        value |= (part & 0x7F) << shift
        position, shift = position + 1, shift + 7
        if not part & 0x80:
            return position, (value >> 1) ^ -(value & 1), kind


def _algorithm(crypto_metadata: bytes) -> str | None:
    """The algorithm in a ``FileCryptoMetaData`` (field 1: the ``EncryptionAlgorithm`` union, whose field 1 is
    ``AES_GCM_V1`` and field 2 ``AES_GCM_CTR_V1``); None when it is neither or does not parse."""
    try:
        position, field, kind = _thrift_field(crypto_metadata, 0)
        if (field, kind) != (1, _THRIFT_STRUCT):
            return None
        _, field, kind = _thrift_field(crypto_metadata, position)
    except ValueError:
        return None
    if kind != _THRIFT_STRUCT:
        return None
    return {1: "AES_GCM_V1", 2: "AES_GCM_CTR_V1"}.get(field)


def _check_layout(source: Any, label: str) -> None:
    """Refuse, before Arrow sees it, anything but a PME file with an encrypted footer and ``AES_GCM_V1``.

    The crypto metadata in front of the encrypted footer is plaintext; reading it here costs two small reads. A
    plaintext file must be refused here because Arrow's key-management reader would accept it.
    """
    size = source.size()
    if size < 12:
        raise IntegrityError(f"{label}: {size} bytes, too short to be an encrypted Parquet file")
    head, tail = bytes(source.read_at(4, 0)), bytes(source.read_at(8, size - 8))
    if tail[4:] == _MAGIC_PLAIN:
        raise IntegrityError(
            f"{label}: its Parquet footer is not encrypted (a plaintext file, or PME with a plaintext footer); "
            "confnb reads only files with an encrypted footer"
        )
    if head != _MAGIC_ENCRYPTED_FOOTER or tail[4:] != _MAGIC_ENCRYPTED_FOOTER:
        raise IntegrityError(f"{label}: not a Parquet file with an encrypted footer")
    footer = int.from_bytes(tail[:4], "little")
    if not 2 <= footer <= size - 12:
        raise IntegrityError(f"{label}: its footer length ({footer} bytes) does not fit a {size}-byte file")
    algorithm = _algorithm(bytes(source.read_at(min(footer, 16), size - 8 - footer)))
    if algorithm == "AES_GCM_CTR_V1":
        raise DatasetFormatError(
            f"{label}: encrypted with AES_GCM_CTR_V1, which does not authenticate page data (a changed value would "
            "go unnoticed); confnb reads only AES_GCM_V1 files"
        )
    if algorithm != ALGORITHM:
        raise IntegrityError(f"{label}: its crypto metadata names no encryption algorithm confnb knows")


def _failure(label: str, error: BaseException) -> IntegrityError:
    """A one-line IntegrityError for what pyarrow raised: its messages ("Failed decryption finalization", "Couldn't
    deserialize thrift", JSON errors in key material, ...) all mean the file is not what the key wrote."""
    if isinstance(error, IntegrityError):
        return IntegrityError(f"{label}: {error}")
    lines = str(error).strip().splitlines()
    detail = lines[0] if lines else type(error).__name__
    return IntegrityError(f"{label}: does not decrypt with the dataset key (wrong key, or altered file): {detail}")


def _difference(found: pa.Schema, expected: pa.Schema) -> str:
    if found.names != expected.names:
        return f"columns {found.names}, expected {expected.names}"
    for mine, theirs in zip(found, expected, strict=True):
        if not mine.equals(theirs):
            return f"column {mine.name!r} is {mine.type}{'' if mine.nullable else ' not null'}, expected {theirs.type}"
    return "different field metadata"


def _culprit(fragments: list[Any], files: list[Path], schema: Any, columns: Any, filter: Any) -> str:
    """Which file a failed scan tripped over (scans run in parallel, so the error does not say): only on the error
    path, each fragment is scanned again on its own."""
    if len(files) == 1:
        return str(files[0])
    for fragment, file in zip(fragments, files, strict=True):
        try:
            fragment.to_table(schema=schema, columns=columns, filter=filter)
        except (pa.ArrowException, OSError, IntegrityError):
            return str(file)
    return f"one of {len(files)} files"


# -- writing -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncryptedParquetInfo:
    """What a dataset manifest records about one encrypted Parquet file."""

    size: int
    """Bytes on disk."""
    rows: int
    sha256: str
    """Lower-case hex SHA-256 of the file, computed while writing (no second pass over the file)."""
    schema: pa.Schema
    """The schema a reader gets back: Parquet stores some types differently (``timestamp[s]`` as milliseconds,
    ``date64`` as ``date32``, dictionaries of non-strings as plain values), so this, not the input's schema, is what
    a manifest must record. Read from the written file's footer."""
    row_groups: int


class _HashingFile:
    """The file-like object pyarrow writes through: passes bytes on to the real file and hashes them on the way."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self.digest = hashlib.sha256()
        self.position = 0
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self._handle.write(view)
        self.position += view.nbytes
        return int(view.nbytes)

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        self._handle.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:  # the staging context owns the real handle
        self.closed = True


def _row_groups(batches: Iterator[pa.RecordBatch], schema: pa.Schema, rows: int) -> Iterator[pa.Table]:
    """Cut the stream of batches into tables of exactly ``rows`` rows (the last may be shorter), or fewer where
    ``_ROW_GROUP_BYTES`` is reached first. ``ParquetWriter`` turns every write into at least one row group, so
    writing input batches as they come would give many small row groups; gathering them (zero-copy slices) gives
    row groups of a useful size while memory holds about one row group, whatever the input's size. Empty batches
    are skipped: a writer that is never given a row still writes a valid file with the schema and no row groups."""
    pending: list[pa.RecordBatch] = []
    pending_rows = pending_bytes = 0
    for batch in batches:
        if not batch.num_rows:
            continue
        pending.append(batch)
        pending_rows += batch.num_rows
        pending_bytes += batch.nbytes
        while pending_rows >= rows or (pending_bytes >= _ROW_GROUP_BYTES and pending_rows):
            table = pa.Table.from_batches(pending, schema=schema)
            take = min(rows, pending_rows)
            yield table.slice(0, take)
            rest = table.slice(take)
            pending = rest.to_batches() if rest.num_rows else []
            pending_rows, pending_bytes = rest.num_rows, rest.nbytes if rest.num_rows else 0
    if pending_rows:
        yield pa.Table.from_batches(pending, schema=schema)


def _keyring(dataset_key: bytes | DatasetKeyring, dataset_id: str, key_id: str) -> tuple[DatasetKeyring, str]:
    if isinstance(dataset_key, DatasetKeyring):
        if not dataset_key.holds(dataset_id, key_id):
            raise ValueError(f"the keyring holds no key for dataset {dataset_id!r}, key id {key_id!r}")
        return dataset_key, master_key_identifier(dataset_id, key_id)
    keyring = DatasetKeyring()
    return keyring, keyring.add(dataset_id, key_id, dataset_key)


def write_encrypted_parquet(
    source: pa.Table | pa.RecordBatchReader | Iterable[pa.RecordBatch],
    path: str | os.PathLike[str],
    dataset_key: bytes | DatasetKeyring,
    key_id: str,
    dataset_id: str,
    *,
    schema: pa.Schema | None = None,
    name: str | None = None,
    mode: int = 0o600,
    compression: str | None = "snappy",
    row_group_rows: int = ROW_GROUP_ROWS,
    double_wrapping: bool = False,
) -> EncryptedParquetInfo:
    """Write ``source`` as a PME Parquet file (AES_GCM_V1, encrypted footer, 256-bit data key) at ``path``.

    ``dataset_key`` is the dataset's 32-byte key, or a :class:`DatasetKeyring` holding it (share one to count or
    reuse KMS work). ``name`` is the file's name in its dataset (default: the last part of ``path``); it is bound into
    the footer with ``dataset_id`` and ``key_id``, and the reader must expect the same.

    Batches stream through ``pyarrow.parquet.ParquetWriter`` into a temporary file beside ``path``; memory holds one
    row group. Before the file is renamed into place its layout is checked and its footer decrypted again, so what
    appears at ``path`` is known to be readable with the key; on any failure nothing appears and an old file at
    ``path`` is left untouched.
    """
    target = Path(path)
    file_name = target.name if name is None else name
    keyring, identifier = _keyring(dataset_key, dataset_id, key_id)
    if row_group_rows < 1:
        raise ValueError("row_group_rows must be positive")
    chosen, batches = _normalized_batches(source, schema)
    binding = _binding(dataset_id, key_id, file_name)
    file_schema = chosen.with_metadata({**(chosen.metadata or {}), BINDING_KEY: binding})
    properties = keyring.encryption_properties(identifier, chosen, double_wrapping=double_wrapping)
    rows = 0
    with atomic_output(target, mode) as (handle, temporary):
        sink = _HashingFile(handle)
        with pq.ParquetWriter(
            pa.PythonFile(sink, mode="w"), file_schema, compression=compression, encryption_properties=properties
        ) as writer:
            for group in _row_groups(batches, chosen, row_group_rows):
                writer.write_table(group, row_group_size=row_group_rows)
                rows += group.num_rows
        handle.flush()
        stored, row_groups = _check_written(temporary, keyring, binding, rows, f"{target} (as written)")
        stored = _recorded_schema(stored, chosen)
    return EncryptedParquetInfo(
        size=sink.position, rows=rows, sha256=sink.digest.hexdigest(), schema=stored, row_groups=row_groups
    )


def _recorded_schema(stored: pa.Schema, given: pa.Schema) -> pa.Schema:
    """The schema to record: the input's field wherever Parquet gives back an equal type, Parquet's where the type
    really changed (``timestamp[s]`` -> ``timestamp[ms]``). Equal types can still differ in inner names (a map read
    back from Parquet names its entries after the column), which pyarrow's equality ignores but a manifest's field
    list would show."""
    if stored.names != given.names:  # cannot happen with pyarrow's writer; never paper over it
        raise RuntimeError(f"the written file's columns {stored.names} are not the input's {given.names}")
    fields = [mine if mine.equals(theirs) else theirs for mine, theirs in zip(given, stored, strict=True)]
    return pa.schema(fields, metadata=_without_binding(given).metadata)


def _check_written(path: Path, keyring: DatasetKeyring, binding: bytes, rows: int, label: str) -> tuple[Any, int]:
    with pa.OSFile(str(path)) as source:
        _check_layout(source, label)
        try:
            parquet = pq.ParquetFile(source, decryption_properties=keyring.decryption_properties())
            metadata, stored = parquet.metadata, _without_binding(parquet.schema_arrow)
        except (pa.ArrowException, OSError, IntegrityError) as error:
            raise _failure(label, error) from None
        _check_binding(metadata.metadata, binding, label)
        if metadata.num_rows != rows:
            raise RuntimeError(f"{label}: holds {metadata.num_rows} rows, {rows} were written")
        return stored, int(metadata.num_row_groups)


# -- reading -----------------------------------------------------------------------------------------------------------


def read_encrypted_parquet(
    path: str | os.PathLike[str],
    dataset_key: bytes | DatasetKeyring,
    key_id: str,
    dataset_id: str,
    *,
    name: str | None = None,
    columns: Sequence[str] | None = None,
) -> pa.Table:
    """Read a PME Parquet file written by :func:`write_encrypted_parquet` for this dataset, key and name.

    ``name`` is the name the file was bound to (default: the last part of ``path``). The file is opened once; its
    layout (encrypted footer, AES_GCM_V1), its footer binding and its data are all read from that one handle, so a
    file renamed or swapped in the meantime cannot be mixed in. Every page is authenticated by AES-GCM as Arrow
    decrypts it. Raises :class:`IntegrityError` for a wrong key, a tampered, truncated, swapped or plaintext file,
    :class:`DatasetFormatError` for an ``AES_GCM_CTR_V1`` file. This is :func:`read_encrypted_parquet_dataset` with
    one file: the ``pyarrow.dataset`` scan measured faster here than ``ParquetFile.read``, encrypted or not.
    """
    return read_encrypted_parquet_dataset(
        [path], dataset_key, key_id, dataset_id, names=None if name is None else [name], columns=columns
    )


def read_encrypted_parquet_dataset(
    paths: Sequence[str | os.PathLike[str]],
    dataset_key: bytes | DatasetKeyring,
    key_id: str,
    dataset_id: str,
    *,
    names: Sequence[str] | None = None,
    schema: pa.Schema | None = None,
    columns: Sequence[str] | None = None,
    filter: Any = None,
) -> pa.Table:
    """Read several PME Parquet files of one dataset as one table through ``pyarrow.dataset``.

    Each file is opened once, its layout checked, and a fragment made from that open handle; each fragment's footer
    is decrypted (one KMS unwrap per file) and its binding to (``dataset_id``, ``key_id``, name) checked before the
    scan, which then reuses that footer. ``columns`` and ``filter`` are passed to the scan (projection and row-group
    pruning on decrypted statistics). ``schema`` (for instance the manifest's) is what every file must have; by
    default the first file's. Errors as for :func:`read_encrypted_parquet`, plus :class:`DatasetFormatError` for a
    file whose schema differs.
    """
    files = [Path(item) for item in paths]
    if not files:
        raise ValueError("no files to read")
    file_names = [item.name for item in files] if names is None else list(names)
    if len(file_names) != len(files):
        raise ValueError("names must name each path")
    keyring, _ = _keyring(dataset_key, dataset_id, key_id)
    parquet_format = keyring.parquet_format()
    with ExitStack() as stack:
        fragments = []
        chosen = schema
        for file, file_name in zip(files, file_names, strict=True):
            label = str(file)
            source = stack.enter_context(pa.OSFile(str(file)))
            _check_layout(source, label)
            try:
                fragment = parquet_format.make_fragment(source)
                fragment.ensure_complete_metadata()  # decrypts the footer once; the scan reuses it
                metadata, physical = fragment.metadata, _without_binding(fragment.physical_schema)
            except (pa.ArrowException, OSError, IntegrityError) as error:
                raise _failure(label, error) from None
            _check_binding(metadata.metadata, _binding(dataset_id, key_id, file_name), label)
            chosen = physical if chosen is None else chosen
            if not physical.equals(chosen, check_metadata=False):
                raise DatasetFormatError(
                    f"{label}: its schema differs from the dataset's: {_difference(physical, chosen)}"
                )
            fragments.append(fragment)
        dataset = ds.FileSystemDataset(fragments, schema=chosen, format=parquet_format)
        selected = None if columns is None else list(columns)
        try:
            table = dataset.to_table(columns=selected, filter=filter)
        except (pa.ArrowException, OSError, IntegrityError) as error:
            raise _failure(_culprit(fragments, files, chosen, selected, filter), error) from None
    return table.replace_schema_metadata(_without_binding(table.schema).metadata)
