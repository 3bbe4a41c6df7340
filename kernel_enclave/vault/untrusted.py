"""Tabular input from outside the vault, checked before any compute touches it.

Arrow arrays are trusted by Arrow's own kernels: a string column whose offsets point past its data buffer makes a
filter or a ``value_counts`` read whatever lies beyond, in this process, which holds every other owner's plaintext.
pyarrow's IPC reader checks the framing and buffer bounds, and its ``validate()`` the buffer sizes, but only
``validate(full=True)`` checks offsets, dictionary indices, UTF-8 and nested children value by value. So every table
the vault did not build itself (an upload's parsed form, public data from the executor, a sealed table read back)
comes in through :func:`read_ipc` here, in two passes over the bytes:

1. the IPC messages' flatbuffer metadata, before pyarrow decodes a batch: only the stream format's schema, record
   batch and (non-delta) dictionary messages; little-endian; no body compression (a compressed buffer declares its
   own decompressed size, which would be allocated before any check could run); declared row counts, node lengths
   and buffer ranges within the limits and within the message body; the total body bytes bounded;
2. the schema against the limits (column count, name lengths, nesting depth, an allowlist of types without
   unions, views, run-end encoding or extension types), then every batch, one at a time, with
   ``validate(full=True)`` (recursively: dictionaries and nested children included) and the running row count.

The IPC reader itself is the one part of Arrow the vault runs on untrusted bytes; CSV and Parquet are parsed in a
separate process (:mod:`kernel_enclave.vault.upload_parser`), which hands back an IPC stream that comes through here.

Every refusal is an :class:`UntrustedInputError`: one line naming the check (``check`` is one of :data:`CHECKS`),
with counts and limits, never a value from the data. pyarrow's own messages are not passed on: some quote values.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Final

import pyarrow as pa  # type: ignore[import-untyped]

from kernel_enclave.vault.protocol import VaultError

# What each check is, as the refusal names it.
CHECKS: Final[dict[str, str]] = {
    "ipc-framing": "not an Arrow IPC stream",
    "ipc-version": "Arrow IPC metadata older than version 4",
    "ipc-message": "an Arrow IPC message this input may not carry",
    "ipc-metadata-size": "an Arrow IPC message's metadata is too large",
    "ipc-endianness": "big-endian Arrow data",
    "ipc-compression": "compressed Arrow IPC buffers",
    "ipc-dictionary-delta": "an Arrow dictionary delta",
    "declared-rows": "a record batch declares too many rows",
    "declared-length": "an array declares an impossible length",
    "declared-buffers": "a buffer lies outside its message",
    "size": "too many bytes",
    "rows": "too many rows",
    "batches": "too many record batches",
    "schema-columns": "the number of columns",
    "schema-name": "a column name that is not accepted",
    "schema-duplicate": "two columns with the same name",
    "schema-depth": "nesting too deep",
    "schema-type": "a column type that is not accepted",
    "validation": "Arrow full validation failed",
}

MESSAGE_SCHEMA: Final = 1
MESSAGE_DICTIONARY_BATCH: Final = 2
MESSAGE_RECORD_BATCH: Final = 3
_METADATA_V4: Final = 3  # the flatbuffer enum: V1 = 0 ... V4 = 3, V5 = 4
_VALIDATION_ERRORS = (pa.ArrowException, ValueError, IndexError, OverflowError)


class UntrustedInputError(VaultError):
    """Input from outside the vault refused: one line naming the check, never content."""

    kind = "UntrustedInputError"

    def __init__(self, what: str, check: str, detail: str = "", column: int | None = None) -> None:
        self.what = what
        self.check = check if check in CHECKS else "validation"
        self.column = column
        where = f" (column {column})" if column is not None else ""
        rest = f": {detail}" if detail else ""
        super().__init__(f"{what}: refused by check {self.check}, {CHECKS[self.check]}{where}{rest}")


@dataclass(frozen=True)
class Limits:
    """What one kind of input may declare; everything beyond is refused before it is decoded."""

    max_rows: int
    max_bytes: int
    max_columns: int = 4096
    max_name_chars: int = 256
    max_depth: int = 4  # a top-level column of a primitive type has depth 1, a list of them depth 2
    max_batches: int = 1_000_000
    max_metadata_bytes: int = 1 << 20


UPLOAD_LIMITS: Final = Limits(max_rows=1 << 31, max_bytes=16 * 1024**3)
PUBLIC_LIMITS: Final = Limits(max_rows=10_000_000, max_bytes=2 * 1024**3)
SEALED_LIMITS: Final = Limits(max_rows=1 << 31, max_bytes=8 * 1024**3, max_columns=8192)


# -- pass 1: the flatbuffer metadata of each message ---------------------------------------------------------------


class _FlatTable:
    """One flatbuffer table, read with bounds checks (``struct.error`` on any offset outside the buffer)."""

    def __init__(self, data: bytes, position: int) -> None:
        self.data = data
        self.position = position
        self.vtable = position - struct.unpack_from("<i", data, position)[0]
        self.vtable_size = struct.unpack_from("<H", data, self.vtable)[0]
        if self.vtable < 0 or self.vtable_size < 4 or self.vtable + self.vtable_size > len(data):
            raise struct.error("vtable outside the buffer")

    def _field(self, index: int) -> int | None:
        entry = 4 + 2 * index
        if entry + 2 > self.vtable_size:
            return None
        offset = int(struct.unpack_from("<H", self.data, self.vtable + entry)[0])
        return self.position + offset if offset else None

    def scalar(self, index: int, fmt: str, default: int) -> int:
        where = self._field(index)
        return default if where is None else int(struct.unpack_from(fmt, self.data, where)[0])

    def table(self, index: int) -> _FlatTable | None:
        where = self._field(index)
        if where is None:
            return None
        return _FlatTable(self.data, where + struct.unpack_from("<I", self.data, where)[0])

    def pairs(self, index: int) -> list[tuple[int, int]]:
        """A vector of 16-byte structs of two int64 (FieldNode, Buffer)."""
        where = self._field(index)
        if where is None:
            return []
        vector = where + struct.unpack_from("<I", self.data, where)[0]
        count = struct.unpack_from("<I", self.data, vector)[0]
        if vector + 4 + 16 * count > len(self.data):
            raise struct.error("vector outside the buffer")
        return [struct.unpack_from("<qq", self.data, vector + 4 + 16 * i) for i in range(count)]


def _root(metadata: bytes) -> _FlatTable:
    return _FlatTable(metadata, struct.unpack_from("<I", metadata, 0)[0])


def _check_batch(what: str, batch: _FlatTable, body_size: int, limits: Limits) -> int:
    """A RecordBatch table's declarations; returns its row count."""
    rows = batch.scalar(0, "<q", 0)
    if rows < 0 or rows > limits.max_rows:
        raise UntrustedInputError(what, "declared-rows", f"{rows} declared, at most {limits.max_rows}")
    if batch.table(3) is not None:
        raise UntrustedInputError(what, "ipc-compression", "send uncompressed IPC (compression=None)")
    # Every accepted type needs at least one bit of buffer per value, so no honest length exceeds this.
    longest = 8 * body_size + 512
    for length, null_count in batch.pairs(1):
        if length < 0 or null_count < 0 or null_count > length or length > longest:
            raise UntrustedInputError(what, "declared-length", f"length {length} with a {body_size}-byte body")
    for offset, length in batch.pairs(2):
        if offset < 0 or length < 0 or offset + length > body_size:
            raise UntrustedInputError(what, "declared-buffers", f"a {body_size}-byte body")
    return rows


def _check_messages(data: pa.Buffer, what: str, limits: Limits) -> None:
    """Pass 1: walk the stream's messages without decoding a batch."""
    reader = pa.ipc.MessageReader.open_stream(pa.BufferReader(data))
    total_bytes = 0
    total_rows = 0
    batches = 0
    schema_seen = False
    while True:
        try:
            message = reader.read_next_message()
        except StopIteration:
            break
        except (pa.ArrowException, ValueError, OSError):
            raise UntrustedInputError(what, "ipc-framing") from None
        metadata = message.metadata.to_pybytes()
        if len(metadata) > limits.max_metadata_bytes:
            raise UntrustedInputError(what, "ipc-metadata-size", f"{len(metadata)} bytes")
        body_size = message.body.size if message.body is not None else 0
        total_bytes += body_size + len(metadata)
        if total_bytes > limits.max_bytes:
            raise UntrustedInputError(what, "size", f"more than {limits.max_bytes} bytes")
        try:
            root = _root(metadata)
            if root.scalar(0, "<h", 0) < _METADATA_V4:
                raise UntrustedInputError(what, "ipc-version")
            kind = root.scalar(1, "<B", 0)
            header = root.table(2)
            declared_body = root.scalar(3, "<q", 0)
            if header is None or declared_body != body_size:
                raise UntrustedInputError(what, "ipc-framing")
            if kind == MESSAGE_SCHEMA:
                if schema_seen:
                    raise UntrustedInputError(what, "ipc-message", "a second schema")
                schema_seen = True
                if header.scalar(0, "<h", 0) != 0:
                    raise UntrustedInputError(what, "ipc-endianness", "only little-endian data is accepted")
                continue
            if not schema_seen:
                raise UntrustedInputError(what, "ipc-message", "data before the schema")
            if kind == MESSAGE_DICTIONARY_BATCH:
                if header.scalar(2, "<B", 0):
                    raise UntrustedInputError(what, "ipc-dictionary-delta", "dictionaries must be sent whole")
                dictionary = header.table(1)
                if dictionary is None:
                    raise UntrustedInputError(what, "ipc-framing")
                _check_batch(what, dictionary, body_size, limits)
            elif kind == MESSAGE_RECORD_BATCH:
                total_rows += _check_batch(what, header, body_size, limits)
                batches += 1
                if total_rows > limits.max_rows:
                    raise UntrustedInputError(what, "rows", f"more than {limits.max_rows}")
                if batches > limits.max_batches:
                    raise UntrustedInputError(what, "batches", f"more than {limits.max_batches}")
            else:
                raise UntrustedInputError(what, "ipc-message", f"message type {kind}")
        except struct.error:
            raise UntrustedInputError(what, "ipc-framing") from None
    if not schema_seen:
        raise UntrustedInputError(what, "ipc-framing", "no schema")


# -- pass 2: the schema, then every batch fully validated ---------------------------------------------------------


def _type_refusal(data_type: Any, depth: int, limits: Limits) -> str | None:
    """Why a type is not accepted (None if it is). Each accepted type spends at least a bit per value."""
    if depth > limits.max_depth:
        return f"nested deeper than {limits.max_depth} levels"
    types = pa.types
    if isinstance(data_type, pa.ExtensionType):
        return "an extension type"
    if types.is_dictionary(data_type):
        if not types.is_integer(data_type.index_type):
            return "dictionary with non-integer indices"
        value_type = data_type.value_type
        if types.is_dictionary(value_type) or types.is_nested(value_type):
            return "dictionary of a nested type"
        return _type_refusal(value_type, depth, limits)
    if types.is_fixed_size_binary(data_type) and not types.is_decimal(data_type):
        return None if data_type.byte_width > 0 else "fixed-size binary of width 0"
    if (
        types.is_boolean(data_type)
        or types.is_integer(data_type)
        or types.is_float32(data_type)
        or types.is_float64(data_type)
        or types.is_decimal(data_type)
        or types.is_string(data_type)
        or types.is_large_string(data_type)
        or types.is_binary(data_type)
        or types.is_large_binary(data_type)
        or types.is_temporal(data_type)
    ):
        return None
    if types.is_fixed_size_list(data_type) and data_type.list_size <= 0:
        return "fixed-size list of size 0"
    if types.is_list(data_type) or types.is_large_list(data_type) or types.is_fixed_size_list(data_type):
        return _type_refusal(data_type.value_type, depth + 1, limits)
    if types.is_map(data_type):
        return _type_refusal(data_type.key_type, depth + 2, limits) or _type_refusal(
            data_type.item_type, depth + 2, limits
        )
    if types.is_struct(data_type):
        if data_type.num_fields == 0:
            return "struct without fields"
        for index in range(data_type.num_fields):
            child = data_type.field(index)
            if len(child.name) > limits.max_name_chars:
                return f"a struct field name longer than {limits.max_name_chars} characters"
            refusal = _type_refusal(child.type, depth + 1, limits)
            if refusal is not None:
                return refusal
        return None
    return f"type {_type_name(data_type)}"


def _type_name(data_type: Any) -> str:
    """A type's name without parameters the input chose (a struct's field names, a timezone)."""
    text = str(data_type)
    return text.split("<", 1)[0].split("[", 1)[0][:40]


def check_schema(schema: pa.Schema, what: str, limits: Limits) -> None:
    """Column count, names and types against ``limits``; raises :class:`UntrustedInputError`."""
    if not 1 <= len(schema) <= limits.max_columns:
        raise UntrustedInputError(what, "schema-columns", f"{len(schema)}; between 1 and {limits.max_columns}")
    seen: set[str] = set()
    for index in range(len(schema)):
        try:
            field = schema.field(index)
            name = field.name
            str(field.type)  # every name and parameter in the type (struct fields, time zone) must be text
            refusal = _type_refusal(field.type, 1, limits)
        except UnicodeDecodeError:
            raise UntrustedInputError(what, "schema-name", "a name that is not UTF-8", index) from None
        if len(name) > limits.max_name_chars:
            raise UntrustedInputError(what, "schema-name", f"at most {limits.max_name_chars} characters", index)
        if name in seen:
            raise UntrustedInputError(what, "schema-duplicate", column=index)
        seen.add(name)
        if refusal is not None:
            check = "schema-depth" if refusal.startswith("nested deeper") else "schema-type"
            raise UntrustedInputError(what, check, refusal, index)


def _validate_column(column: Any) -> None:
    column.validate(full=True)
    if pa.types.is_dictionary(column.type):
        column.dictionary.validate(full=True)
        column.indices.validate(full=True)


def validate_batch(batch: pa.RecordBatch, what: str) -> None:
    """``validate(full=True)`` on the batch and each column (dictionaries and nested children included)."""
    for index, column in enumerate(batch.columns):
        try:
            _validate_column(column)
        except _VALIDATION_ERRORS:
            raise UntrustedInputError(what, "validation", column=index) from None
    try:
        batch.validate(full=True)
    except _VALIDATION_ERRORS:
        raise UntrustedInputError(what, "validation", "the columns' lengths disagree") from None


def validate_table(table: pa.Table, what: str, limits: Limits) -> pa.Table:
    """An in-memory table from an untrusted parser: schema, limits and full validation of every chunk."""
    check_schema(table.schema, what, limits)
    if table.num_rows > limits.max_rows:
        raise UntrustedInputError(what, "rows", f"{table.num_rows}; at most {limits.max_rows}")
    for batch in table.to_batches():
        validate_batch(batch, what)
    size = table.get_total_buffer_size()
    if size > limits.max_bytes:
        raise UntrustedInputError(what, "size", f"{size}; at most {limits.max_bytes}")
    return table


def read_ipc(data: bytes | bytearray | memoryview | pa.Buffer, what: str, limits: Limits) -> pa.Table:
    """An Arrow IPC stream from outside the vault as a table, or :class:`UntrustedInputError`.

    Nothing of the input is decoded before its metadata passed; no batch is kept before it passed full validation.
    """
    buffer = data if isinstance(data, pa.Buffer) else pa.py_buffer(data)
    if buffer.size > limits.max_bytes:
        raise UntrustedInputError(what, "size", f"{buffer.size}; at most {limits.max_bytes}")
    _check_messages(buffer, what, limits)
    try:
        reader = pa.ipc.open_stream(buffer)
    except (pa.ArrowException, ValueError, OSError):
        raise UntrustedInputError(what, "ipc-framing") from None
    check_schema(reader.schema, what, limits)
    batches = []
    rows = 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            break
        except (pa.ArrowException, ValueError, OSError):
            raise UntrustedInputError(what, "ipc-framing", "a record batch does not decode") from None
        validate_batch(batch, what)
        rows += batch.num_rows
        if rows > limits.max_rows:
            raise UntrustedInputError(what, "rows", f"more than {limits.max_rows}")
        batches.append(batch)
    # The input's own key-value metadata is not the vault's business (nor UTF-8 necessarily): dropped.
    return pa.Table.from_batches(batches, schema=reader.schema).replace_schema_metadata(None)
