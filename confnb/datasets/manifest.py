"""Dataset manifests: what binds an encrypted dataset's files into one signed, versioned whole.

Each encrypted file authenticates its own bytes (Tink streaming AEAD, Parquet Modular Encryption), but nothing in
a file says which *other* files belong with it. Whoever stores the dataset (the untrusted host) could therefore drop
a file, add one, swap two, or put back last month's files, and every file would still decrypt. A dataset is
therefore a directory::

    claims/
      manifest.json     dataset id, version, format, schema, files (size, rows, SHA-256), key id,
                        output-policy digest, owner's Ed25519 public key, created_at, format_version
      manifest.sig      64-byte Ed25519 signature over the canonical JSON of manifest.json
      part-0001.arrow   the encrypted files, each named in manifest.json
      ...

and :func:`verify_dataset` accepts it only when the signature verifies, every listed file is present with the
listed size and SHA-256, and nothing else is in the directory. ``version`` increases with every re-publication of a
dataset id; a caller that remembers the highest version it has seen passes it as ``min_version`` so an old,
correctly signed manifest cannot be replayed.

The canonical form that is signed is the parsed manifest serialized as UTF-8 JSON with sorted keys and no whitespace
(the same convention as evidence claims). ``manifest.json`` itself is written indented for people to read; parsing is
strict enough (no unknown or duplicate keys, exact types, one spelling per value) that the file and its canonical
form always mean the same thing, in this parser and in any other.

This module is shared by the data owner's tools, the broker and the vault inside the CVM, so it depends only on the
standard library and ``cryptography`` (``pyarrow`` is imported only to check the schema).
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import hmac
import json
import os
import re
import stat
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, get_args

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from confnb.fileio import write_atomically

__all__ = [
    "DATASET_FORMATS",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "SIGNATURE_NAME",
    "DatasetFormat",
    "DatasetIntegrityError",
    "DatasetSchema",
    "FileEntry",
    "Manifest",
    "ManifestError",
    "SchemaField",
    "VerifiedDataset",
    "canonical_json",
    "describe_file",
    "public_key_fingerprint",
    "sign_manifest",
    "verify_dataset",
    "write_dataset_manifest",
]

MANIFEST_FORMAT: Final = "confnb-manifest/1"
MANIFEST_NAME: Final = "manifest.json"
SIGNATURE_NAME: Final = "manifest.sig"
DatasetFormat = Literal["arrow-ipc-tink-aes256-gcm-hkdf-1mb", "parquet-pme-aes-gcm-v1"]
DATASET_FORMATS: Final[tuple[str, ...]] = get_args(DatasetFormat)

HASH_CHUNK: Final = 1 << 20
SIGNATURE_SIZE: Final = 64
PUBLIC_KEY_SIZE: Final = 32
# A manifest lists files, not data: 32 MiB is room for a few hundred thousand files and stops a hostile
# directory from making a verifier read an unbounded file into memory.
MAX_MANIFEST_BYTES: Final = 32 << 20
# Integers stay within what every JSON implementation represents exactly (I-JSON, RFC 7493), so a
# JavaScript or Java reader of manifest.json sees the same sizes and versions as this one.
MAX_JSON_INT: Final = 2**53 - 1
MAX_TEXT = 1024

# Dataset ids appear in broker URLs (/v1/datasets/{id}/key-release), audit entries and CLI output.
_DATASET_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# File names: one path component, portable, unambiguous to a shell and on case-insensitive file systems.
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_POLICY_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_CREATED_AT = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})Z")
# Control characters could hide or rewrite text when a manifest is shown in a terminal; bidirectional and other
# format characters could make a column name read as a different one; lone surrogates cannot be encoded as UTF-8.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs"})
_RESERVED_NAMES = frozenset({MANIFEST_NAME, SIGNATURE_NAME})


class ManifestError(ValueError):
    """A manifest is malformed; the one-line message starts with the field it is about (``files[2].sha256: ...``)."""


class DatasetIntegrityError(Exception):
    """A dataset directory does not match its signed manifest.

    ``problems`` lists every problem found, each starting with the file it is about
    (``part-0002.arrow: SHA-256 mismatch``); the message is the first of them, plus how many more there are.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        if not problems:
            raise ValueError("DatasetIntegrityError needs at least one problem")
        self.problems: tuple[str, ...] = tuple(problems)
        message = self.problems[0]
        if len(self.problems) > 1:
            more = len(self.problems) - 1
            message += f" (and {more} more problem{'s' if more > 1 else ''})"
        super().__init__(message)


# -- value checks: each returns the value or raises ManifestError("<field>: <problem>") -----------------------------


def _show(value: object) -> str:
    """A value quoted for a one-line error message, shortened so hostile input cannot flood a log."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _require_type(where: str, value: object, expected: type, noun: str) -> None:
    # bool is a subclass of int, but true is not a file size.
    if type(value) is not expected:
        raise ManifestError(f"{where}: must be {noun}, got {_type_name(value)}")


def _check_text(where: str, value: object, max_length: int = MAX_TEXT) -> str:
    _require_type(where, value, str, "a string")
    assert isinstance(value, str)
    if not value:
        raise ManifestError(f"{where}: must not be empty")
    if len(value) > max_length:
        raise ManifestError(f"{where}: must be at most {max_length} characters, got {len(value)}")
    for character in value:
        if unicodedata.category(character) in _FORBIDDEN_CATEGORIES:
            raise ManifestError(
                f"{where}: must not contain control, format or surrogate characters, found U+{ord(character):04X}"
            )
    return value


def _check_int(where: str, value: object, minimum: int) -> int:
    _require_type(where, value, int, "an integer")
    assert isinstance(value, int)
    if not minimum <= value <= MAX_JSON_INT:
        raise ManifestError(f"{where}: must be between {minimum} and {MAX_JSON_INT}, got {value}")
    return value


def _check_file_name(where: str, value: object) -> str:
    _require_type(where, value, str, "a string")
    assert isinstance(value, str)
    if not value:
        raise ManifestError(f"{where}: must not be empty")
    if value.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", value):
        raise ManifestError(f"{where}: must be a relative file name, not an absolute path: {_show(value)}")
    if "/" in value or "\\" in value:
        raise ManifestError(f"{where}: must be a plain file name, not a path: {_show(value)}")
    if value in (".", ".."):
        raise ManifestError(f"{where}: must be a file name, not {value!r}")
    if value.lower() in _RESERVED_NAMES:
        raise ManifestError(f"{where}: {value!r} is reserved for the manifest itself")
    if not _FILE_NAME.fullmatch(value):
        raise ManifestError(
            f"{where}: must start with a letter or digit and contain only letters, digits, '.', '_' and '-' "
            f"(at most 255 characters): {_show(value)}"
        )
    return value


def _check_bytes(where: str, value: object, size: int | None = None) -> bytes:
    _require_type(where, value, bytes, "bytes")
    assert isinstance(value, bytes)
    if size is not None and len(value) != size:
        raise ManifestError(f"{where}: must be {size} bytes, got {len(value)}")
    if not value:
        raise ManifestError(f"{where}: must not be empty")
    return value


def _decode_base64(where: str, value: object) -> bytes:
    """Strict standard base64 with padding, in its one canonical spelling (so re-encoding gives the same text)."""
    _require_type(where, value, str, "a base64 string")
    assert isinstance(value, str)
    try:
        decoded = base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise ManifestError(f"{where}: not valid base64") from None
    if base64.b64encode(decoded).decode("ascii") != value:
        raise ManifestError(f"{where}: not in canonical base64 (standard alphabet, padded, no line breaks)")
    return decoded


def _check_object(where: str, value: object, required: Iterable[str]) -> dict[str, Any]:
    """A JSON object with exactly the ``required`` keys: unknown keys are an error, not something to ignore."""
    _require_type(where, value, dict, "an object")
    assert isinstance(value, dict)
    names = list(required)
    prefix = f"{where}." if where else ""
    for key in sorted(value, key=str):
        if key not in names:
            raise ManifestError(f"{prefix}{_label(key)}: unknown field")
    for name in names:
        if name not in value:
            raise ManifestError(f"{prefix}{name}: missing")
    return value


def _check_list(where: str, value: object) -> list[Any]:
    _require_type(where, value, list, "an array")
    assert isinstance(value, list)
    if not value:
        raise ManifestError(f"{where}: must not be empty")
    return value


def _nested(prefix: str, error: ManifestError) -> ManifestError:
    """Put the path of a nested object in front of an error about one of its fields (``files[2]`` + ``.size``)."""
    message = str(error)
    return ManifestError(prefix + message if message.startswith(":") else f"{prefix}.{message}")


def _label(key: object) -> str:
    """A JSON key as a field name in a message, quoted only when it is not a plain identifier."""
    return key if isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", key) else _show(key)


def canonical_json(value: object) -> bytes:
    """UTF-8 JSON with sorted keys and no whitespace: the bytes that signatures and digests cover."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def public_key_fingerprint(key: Ed25519PublicKey | bytes) -> str:
    """``sha256:<hex>`` of a raw Ed25519 public key: how messages and the audit log name an owner key."""
    raw = key if isinstance(key, bytes) else key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


# -- the manifest ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SchemaField:
    """One top-level column as people read it; ``type`` is Arrow's own spelling (``int64``, ``timestamp[us]``)."""

    name: str
    type: str
    nullable: bool

    def __post_init__(self) -> None:
        _check_text("name", self.name)
        _check_text("type", self.type)
        _require_type("nullable", self.nullable, bool, "a boolean")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "nullable": self.nullable}

    @classmethod
    def from_dict(cls, value: object) -> SchemaField:
        data = _check_object("", value, ("name", "type", "nullable"))
        return cls(name=data["name"], type=data["type"], nullable=data["nullable"])


@dataclass(frozen=True)
class DatasetSchema:
    """The Arrow schema twice: ``ipc`` (a serialized IPC schema message) for readers, ``fields`` for people.

    Both are signed. Output policies name columns (``never_release = ["patient_id"]``), so column names must be
    unique: with two columns of one name a rule about that name would be ambiguous.
    """

    ipc: bytes
    fields: tuple[SchemaField, ...]

    def __post_init__(self) -> None:
        _check_bytes("ipc", self.ipc)
        given: object = self.fields
        if isinstance(given, list):  # accepted for convenience; stored as a tuple so the schema stays immutable
            object.__setattr__(self, "fields", tuple(given))
        _require_type("fields", self.fields, tuple, "a tuple of SchemaField")
        if not self.fields:
            raise ManifestError("fields: must not be empty")
        seen: dict[str, int] = {}
        for index, column in enumerate(self.fields):
            if not isinstance(column, SchemaField):
                raise ManifestError(f"fields[{index}]: must be a SchemaField, got {type(column).__name__}")
            if column.name in seen:
                first = seen[column.name]
                raise ManifestError(
                    f"fields[{index}].name: duplicate column name {_show(column.name)} (fields[{first}])"
                )
            seen[column.name] = index

    def to_dict(self) -> dict[str, Any]:
        return {
            "ipc": base64.b64encode(self.ipc).decode("ascii"),
            "fields": [column.to_dict() for column in self.fields],
        }

    @classmethod
    def from_dict(cls, value: object) -> DatasetSchema:
        data = _check_object("", value, ("ipc", "fields"))
        ipc = _decode_base64("ipc", data["ipc"])
        columns = []
        for index, item in enumerate(_check_list("fields", data["fields"])):
            try:
                columns.append(SchemaField.from_dict(item))
            except ManifestError as error:
                raise _nested(f"fields[{index}]", error) from None
        return cls(ipc=ipc, fields=tuple(columns))

    @classmethod
    def from_arrow(cls, schema: Any) -> DatasetSchema:
        """Both forms from one ``pyarrow.Schema``, so they cannot disagree.

        The field list is taken from the schema as the IPC bytes give it back, not from ``schema`` itself: IPC does
        not keep everything a type's text shows (a map read from Parquet names its entries after the column,
        ``map<string, int64 ('labs')>``, and comes back from IPC as ``map<string, int64>``).
        """
        ipc = bytes(schema.serialize().to_pybytes())
        stored = _read_ipc_schema(ipc)
        columns = tuple(SchemaField(item.name, str(item.type), bool(item.nullable)) for item in stored)
        return cls(ipc=ipc, fields=columns)

    def to_arrow(self) -> Any:
        """The ``pyarrow.Schema``, after checking that ``fields`` describes exactly it.

        The signed field list is what a data owner or analyst reads; the IPC schema is what readers use. A
        manifest in which they differ would show people one table and give programs another, so it is rejected.
        """
        schema = _read_ipc_schema(self.ipc)
        actual = [(item.name, str(item.type), bool(item.nullable)) for item in schema]
        listed = [(column.name, column.type, column.nullable) for column in self.fields]
        if actual != listed:
            if len(actual) != len(listed):
                detail = f"the IPC schema has {len(actual)} columns, the list {len(listed)}"
            else:
                index = next(i for i, (a, b) in enumerate(zip(actual, listed, strict=True)) if a != b)
                detail = (
                    f"column {index} is {_show(actual[index])} in the IPC schema, {_show(listed[index])} in the list"
                )
            raise ManifestError(f"schema.fields: does not describe schema.ipc: {detail}")
        return schema


def _read_ipc_schema(ipc: bytes) -> Any:
    import pyarrow as pa  # type: ignore[import-untyped]
    import pyarrow.ipc  # type: ignore[import-untyped]

    try:
        return pyarrow.ipc.read_schema(pa.py_buffer(ipc))
    except (pa.ArrowException, ValueError, TypeError) as error:
        raise ManifestError(f"schema.ipc: not a serialized Arrow IPC schema ({error})") from None


@dataclass(frozen=True)
class FileEntry:
    """One encrypted file of a dataset: a plain name inside the dataset directory, its size, rows and SHA-256."""

    name: str
    size: int
    rows: int
    sha256: str

    def __post_init__(self) -> None:
        _check_file_name("name", self.name)
        _check_int("size", self.size, 0)
        _check_int("rows", self.rows, 0)
        _require_type("sha256", self.sha256, str, "a string")
        if not _SHA256_HEX.fullmatch(self.sha256):
            raise ManifestError(f"sha256: must be 64 lowercase hex digits, got {_show(self.sha256)}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "rows": self.rows, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, value: object) -> FileEntry:
        data = _check_object("", value, ("name", "size", "rows", "sha256"))
        return cls(name=data["name"], size=data["size"], rows=data["rows"], sha256=data["sha256"])


_MANIFEST_FIELDS = (
    "format_version",
    "dataset_id",
    "version",
    "format",
    "schema",
    "files",
    "key_id",
    "output_policy_digest",
    "owner_public_key",
    "created_at",
)


@dataclass(frozen=True)
class Manifest:
    """The signed description of one version of a dataset. Every instance is valid: the constructor checks all.

    ``created_at`` is kept in UTC at second precision (the form it is written in), so a manifest written and read
    back is equal to the original and its signature covers exactly what was parsed.
    """

    dataset_id: str
    version: int
    format: DatasetFormat
    schema: DatasetSchema
    files: tuple[FileEntry, ...]
    key_id: str
    output_policy_digest: str
    owner_public_key: bytes
    created_at: datetime
    format_version: str = field(default=MANIFEST_FORMAT)

    def __post_init__(self) -> None:
        if self.format_version != MANIFEST_FORMAT:
            raise ManifestError(f"format_version: must be {MANIFEST_FORMAT!r}, got {_show(self.format_version)}")
        _require_type("dataset_id", self.dataset_id, str, "a string")
        if not _DATASET_ID.fullmatch(self.dataset_id):
            raise ManifestError(
                "dataset_id: must be 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit, "
                f"got {_show(self.dataset_id)}"
            )
        _check_int("version", self.version, 1)
        if self.format not in DATASET_FORMATS:
            raise ManifestError(f"format: must be one of {', '.join(DATASET_FORMATS)}; got {_show(self.format)}")
        if not isinstance(self.schema, DatasetSchema):
            raise ManifestError(f"schema: must be a DatasetSchema, got {type(self.schema).__name__}")
        self._check_files()
        _check_text("key_id", self.key_id, max_length=256)
        _require_type("output_policy_digest", self.output_policy_digest, str, "a string")
        if not _POLICY_DIGEST.fullmatch(self.output_policy_digest):
            raise ManifestError(
                f"output_policy_digest: must be 'sha256:' and 64 lowercase hex digits, "
                f"got {_show(self.output_policy_digest)}"
            )
        _check_bytes("owner_public_key", self.owner_public_key, PUBLIC_KEY_SIZE)
        self._normalize_created_at()

    def _check_files(self) -> None:
        given: object = self.files
        if isinstance(given, list):  # accepted for convenience; stored as a tuple so the manifest stays immutable
            object.__setattr__(self, "files", tuple(given))
        _require_type("files", self.files, tuple, "a tuple of FileEntry")
        if not self.files:
            raise ManifestError("files: must list at least one file")
        # Case-folded, so the manifest means the same on a case-insensitive file system (macOS, Windows).
        seen: dict[str, int] = {}
        for index, entry in enumerate(self.files):
            if not isinstance(entry, FileEntry):
                raise ManifestError(f"files[{index}]: must be a FileEntry, got {type(entry).__name__}")
            folded = entry.name.casefold()
            if folded in seen:
                raise ManifestError(
                    f"files[{index}].name: duplicate of files[{seen[folded]}] ({self.files[seen[folded]].name!r})"
                )
            seen[folded] = index

    def _normalize_created_at(self) -> None:
        moment = self.created_at
        if not isinstance(moment, datetime):
            raise ManifestError(f"created_at: must be a datetime, got {type(moment).__name__}")
        offset = moment.utcoffset()
        if offset is None:
            raise ManifestError("created_at: must be timezone-aware")
        object.__setattr__(self, "created_at", moment.astimezone(UTC).replace(microsecond=0))

    # -- serialization ----------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of manifest.json."""
        return {
            "format_version": self.format_version,
            "dataset_id": self.dataset_id,
            "version": self.version,
            "format": self.format,
            "schema": self.schema.to_dict(),
            "files": [entry.to_dict() for entry in self.files],
            "key_id": self.key_id,
            "output_policy_digest": self.output_policy_digest,
            "owner_public_key": base64.b64encode(self.owner_public_key).decode("ascii"),
            "created_at": self.created_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    def to_json(self) -> str:
        """manifest.json as written: indented and key-sorted for people and diffs; the signature does not depend on
        the layout (see :meth:`canonical_bytes`)."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, ensure_ascii=False) + "\n"

    def canonical_bytes(self) -> bytes:
        """The exact bytes manifest.sig signs."""
        return canonical_json(self.to_dict())

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` of the canonical bytes: names this exact manifest in audit entries and receipts."""
        return "sha256:" + hashlib.sha256(self.canonical_bytes()).hexdigest()

    @property
    def owner_fingerprint(self) -> str:
        return public_key_fingerprint(self.owner_public_key)

    def file(self, name: str) -> FileEntry:
        """The entry for ``name``; ``KeyError`` if the manifest does not list it."""
        for entry in self.files:
            if entry.name == name:
                return entry
        raise KeyError(name)

    @classmethod
    def from_dict(cls, value: object) -> Manifest:
        """A manifest from parsed JSON, checking every field; raises :class:`ManifestError` for anything else."""
        data = _check_object("", value, _MANIFEST_FIELDS)
        format_version = data["format_version"]
        _require_type("format_version", format_version, str, "a string")
        if format_version != MANIFEST_FORMAT:
            # Checked first: a future format deserves "unsupported version", not a complaint about its fields.
            raise ManifestError(f"format_version: unsupported {_show(format_version)}, expected {MANIFEST_FORMAT!r}")
        try:
            schema = DatasetSchema.from_dict(data["schema"])
        except ManifestError as error:
            raise _nested("schema", error) from None
        files = []
        for index, item in enumerate(_check_list("files", data["files"])):
            try:
                files.append(FileEntry.from_dict(item))
            except ManifestError as error:
                raise _nested(f"files[{index}]", error) from None
        owner_public_key = _decode_base64("owner_public_key", data["owner_public_key"])
        created_at = _parse_created_at(data["created_at"])
        return cls(
            format_version=format_version,
            dataset_id=data["dataset_id"],
            version=data["version"],
            format=data["format"],
            schema=schema,
            files=tuple(files),
            key_id=data["key_id"],
            output_policy_digest=data["output_policy_digest"],
            owner_public_key=owner_public_key,
            created_at=created_at,
        )

    @classmethod
    def from_json(cls, data: str | bytes) -> Manifest:
        """Parse manifest.json. Any input gives a :class:`Manifest` or a :class:`ManifestError`, nothing else."""
        if isinstance(data, bytes):
            if len(data) > MAX_MANIFEST_BYTES:
                raise ManifestError(f"manifest: larger than {MAX_MANIFEST_BYTES} bytes")
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ManifestError(f"manifest: not UTF-8 (byte {error.start})") from None
        elif isinstance(data, str):
            text = data
            if len(text) > MAX_MANIFEST_BYTES:
                raise ManifestError(f"manifest: larger than {MAX_MANIFEST_BYTES} characters")
        else:
            raise ManifestError(f"manifest: expected str or bytes, got {type(data).__name__}")
        try:
            parsed = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
        except ManifestError:
            raise
        except RecursionError:
            raise ManifestError("manifest: JSON nested too deeply") from None
        except ValueError as error:
            raise ManifestError(f"manifest: not valid JSON ({error})") from None
        if not isinstance(parsed, dict):
            raise ManifestError(f"manifest: must be a JSON object, got {_type_name(parsed)}")
        return cls.from_dict(parsed)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Duplicate keys are an error: parsers disagree on which one wins, so the signed meaning would be unclear."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ManifestError(f"{_label(key)}: duplicate key in a JSON object")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ManifestError(f"manifest: {name} is not JSON")


def _parse_created_at(value: object) -> datetime:
    _require_type("created_at", value, str, "a string")
    assert isinstance(value, str)
    match = _CREATED_AT.fullmatch(value)
    if not match:
        raise ManifestError(f"created_at: must be RFC 3339 UTC like 2026-05-01T12:00:00Z, got {_show(value)}")
    try:
        year, month, day, hour, minute, second = (int(part) for part in match.groups())
        return datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError as error:
        raise ManifestError(f"created_at: not a valid time ({error})") from None


# -- signing and writing ----------------------------------------------------------------------------------------------


def _raw_public_key(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def sign_manifest(manifest: Manifest, private_key: Ed25519PrivateKey) -> bytes:
    """The 64-byte Ed25519 signature (the content of manifest.sig) over the manifest's canonical bytes.

    Refuses a key that is not the manifest's ``owner_public_key``: such a signature could never verify, and finding
    that out at signing time is much cheaper than when an analyst's kernel rejects the dataset.
    """
    if not isinstance(private_key, Ed25519PrivateKey):
        raise TypeError(f"private_key must be an Ed25519PrivateKey, got {type(private_key).__name__}")
    actual = _raw_public_key(private_key.public_key())
    if not hmac.compare_digest(actual, manifest.owner_public_key):
        raise ManifestError(
            f"owner_public_key: is {manifest.owner_fingerprint}, but the signing key's public key is "
            f"{public_key_fingerprint(actual)}"
        )
    return private_key.sign(manifest.canonical_bytes())


def write_dataset_manifest(directory: str | Path, manifest: Manifest, private_key: Ed25519PrivateKey) -> None:
    """Sign ``manifest`` and write manifest.json and manifest.sig into ``directory``, each atomically.

    The two files are replaced one after the other (manifest.json first), so a reader racing a re-publication may
    see a new manifest with the old signature: that fails verification, never passes it, and verifying again later
    succeeds. Both files are world-readable: they hold what the host may know anyway (names, sizes, schema).
    """
    target = Path(directory)
    signature = sign_manifest(manifest, private_key)
    write_atomically(target / MANIFEST_NAME, manifest.to_json().encode("utf-8"), mode=0o644)
    write_atomically(target / SIGNATURE_NAME, signature, mode=0o644)


def describe_file(path: str | Path, rows: int) -> FileEntry:
    """A :class:`FileEntry` for an encrypted file as it is now (size and SHA-256 read from disk)."""
    source = Path(path)
    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        size, digest = _hash_open_file(fd)
    finally:
        os.close(fd)
    return FileEntry(name=source.name, size=size, rows=rows, sha256=digest)


# -- verification -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifiedDataset:
    """A dataset directory whose files matched its signed manifest when :func:`verify_dataset` checked them.

    The check is a point in time: the host can still change a file afterwards. The encrypted formats authenticate
    every segment they decrypt and bind each file to the dataset, and readers should compare what they read with
    ``manifest.file(name).sha256`` where they can.
    """

    directory: Path
    manifest: Manifest
    signature: bytes
    #: ``sha256:<hex>`` of the manifest's canonical bytes, for audit entries.
    manifest_digest: str
    #: ``sha256:<hex>`` of the owner's public key.
    owner_fingerprint: str

    def path(self, name: str) -> Path:
        """Path of a listed file; ``KeyError`` for any name the manifest does not list."""
        return self.directory / self.manifest.file(name).name


def _normalize_trusted_key(key: Ed25519PublicKey | bytes) -> bytes:
    if isinstance(key, Ed25519PublicKey):
        return _raw_public_key(key)
    if isinstance(key, bytes) and len(key) == PUBLIC_KEY_SIZE:
        return key
    raise ValueError("trusted_owner_key must be an Ed25519PublicKey or its 32 raw bytes")


def _read_small_regular_file(path: Path, limit: int) -> bytes:
    """Read a manifest file, refusing symlinks and anything but a regular file of at most ``limit`` bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DatasetIntegrityError([f"{path.name}: not a regular file"])
        if info.st_size > limit:
            raise DatasetIntegrityError([f"{path.name}: larger than {limit} bytes"])
        chunks = []
        remaining = limit + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, HASH_CHUNK))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:
            raise DatasetIntegrityError([f"{path.name}: larger than {limit} bytes"])
        return data
    finally:
        os.close(fd)


def _read_manifest_file(directory: Path, name: str, limit: int) -> bytes:
    try:
        return _read_small_regular_file(directory / name, limit)
    except FileNotFoundError:
        raise DatasetIntegrityError([f"{name}: missing"]) from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise DatasetIntegrityError([f"{name}: is a symbolic link, not a regular file"]) from None
        raise DatasetIntegrityError([f"{name}: cannot be read ({error.strerror})"]) from None


def _hash_open_file(fd: int) -> tuple[int, str]:
    """Size and SHA-256 of an open file, read in 1 MiB chunks so memory stays flat for any file size."""
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK)
    view = memoryview(buffer)
    size = 0
    with open(fd, "rb", buffering=0, closefd=False) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
            size += count
    return size, digest.hexdigest()


def _check_file(directory: Path, entry: FileEntry) -> str | None:
    """The problem with one listed file, or None when it has the listed size and SHA-256."""
    path = directory / entry.name
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return f"{entry.name}: listed in the manifest but missing"
    except OSError as error:
        return f"{entry.name}: cannot be read ({error.strerror})"
    if stat.S_ISLNK(info.st_mode):
        return f"{entry.name}: is a symbolic link, not a regular file"
    if not stat.S_ISREG(info.st_mode):
        return f"{entry.name}: not a regular file"
    if info.st_size != entry.size:
        return f"{entry.name}: size is {info.st_size} bytes, the manifest says {entry.size}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as error:
        return f"{entry.name}: cannot be read ({error.strerror})"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return f"{entry.name}: not a regular file"
        size, digest = _hash_open_file(fd)
    except OSError as error:
        return f"{entry.name}: cannot be read ({error.strerror})"
    finally:
        os.close(fd)
    if size != entry.size:
        return f"{entry.name}: changed while it was being read ({size} bytes read, the manifest says {entry.size})"
    if not hmac.compare_digest(digest, entry.sha256):
        return f"{entry.name}: SHA-256 mismatch"
    return None


def verify_dataset(
    directory: str | Path,
    trusted_owner_key: Ed25519PublicKey | bytes | None = None,
    *,
    min_version: int | None = None,
    dataset_id: str | None = None,
) -> VerifiedDataset:
    """Check a dataset directory against its signed manifest; raise :class:`DatasetIntegrityError` otherwise.

    In order: manifest.json parses strictly; its owner key is ``trusted_owner_key`` (when given); manifest.sig
    verifies with that key; the dataset id is ``dataset_id`` and the version at least ``min_version`` (when given);
    the schema's field list describes its IPC schema; every listed file exists as a regular file with the listed
    size and SHA-256; and the directory holds nothing else besides manifest.json and manifest.sig (a file slipped
    into the directory must never be read as part of the dataset). File problems are all collected; the first
    problem with the manifest itself stops the check, since nothing it lists can be trusted.

    Without ``trusted_owner_key`` this only shows that the directory is consistent with *some* key: anyone can
    sign a manifest with their own key. Whoever decides anything (the broker, the vault) must pass the owner's key.
    """
    root = Path(directory)
    if not root.is_dir():
        raise DatasetIntegrityError([f"{root}: not a dataset directory"])
    if min_version is not None and (type(min_version) is not int or min_version < 1):
        raise ValueError(f"min_version must be a positive integer, got {min_version!r}")
    trusted = None if trusted_owner_key is None else _normalize_trusted_key(trusted_owner_key)

    manifest_bytes = _read_manifest_file(root, MANIFEST_NAME, MAX_MANIFEST_BYTES)
    signature = _read_manifest_file(root, SIGNATURE_NAME, SIGNATURE_SIZE)
    if len(signature) != SIGNATURE_SIZE:
        raise DatasetIntegrityError(
            [f"{SIGNATURE_NAME}: must be a {SIGNATURE_SIZE}-byte Ed25519 signature, got {len(signature)} bytes"]
        )
    try:
        manifest = Manifest.from_json(manifest_bytes)
    except ManifestError as error:
        # "manifest: not valid JSON" reads better as "manifest.json: not valid JSON" than with both prefixes.
        raise DatasetIntegrityError([f"{MANIFEST_NAME}: {str(error).removeprefix('manifest: ')}"]) from None

    if trusted is not None and not hmac.compare_digest(manifest.owner_public_key, trusted):
        raise DatasetIntegrityError(
            [
                f"{MANIFEST_NAME}: owner key {manifest.owner_fingerprint} is not the trusted owner key "
                f"{public_key_fingerprint(trusted)}"
            ]
        )
    try:
        Ed25519PublicKey.from_public_bytes(manifest.owner_public_key).verify(signature, manifest.canonical_bytes())
    except (InvalidSignature, ValueError):
        raise DatasetIntegrityError([f"{SIGNATURE_NAME}: signature does not verify with the owner key"]) from None

    if dataset_id is not None and manifest.dataset_id != dataset_id:
        raise DatasetIntegrityError(
            [f"{MANIFEST_NAME}: dataset id is {manifest.dataset_id!r}, expected {dataset_id!r}"]
        )
    if min_version is not None and manifest.version < min_version:
        raise DatasetIntegrityError(
            [
                f"{MANIFEST_NAME}: version {manifest.version} of {manifest.dataset_id!r} is older than version "
                f"{min_version} already seen (a replayed manifest?)"
            ]
        )
    try:
        manifest.schema.to_arrow()
    except ManifestError as error:
        raise DatasetIntegrityError([f"{MANIFEST_NAME}: {error}"]) from None

    problems = [problem for entry in manifest.files if (problem := _check_file(root, entry)) is not None]
    listed = {entry.name for entry in manifest.files} | _RESERVED_NAMES
    with os.scandir(root) as listing:
        extra = sorted(item.name for item in listing if item.name not in listed)
    problems.extend(f"{name}: not listed in the manifest" for name in extra)
    if problems:
        raise DatasetIntegrityError(problems)
    return VerifiedDataset(
        directory=root,
        manifest=manifest,
        signature=signature,
        manifest_digest=manifest.digest,
        owner_fingerprint=manifest.owner_fingerprint,
    )
