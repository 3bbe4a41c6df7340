"""Encrypted Arrow IPC files: an Arrow IPC *stream* encrypted with Tink's streaming AEAD ``AES256_GCM_HKDF_1MB``.

This is confnb's fast load path (``DESIGN.md``, "Datasets and keys"): the file is exactly what
:mod:`confnb.datasets.streaming_aead` produces for the bytes of an uncompressed Arrow IPC stream, so stock Tink can
decrypt it and stock Arrow can read the result. Loading maps the file, decrypts its 1 MiB segments on several
threads straight into one Arrow-allocated buffer and lets Arrow read the stream from that buffer without copying:
the columns of the returned table point into it, so the table costs about 1.0x its size in memory and the load runs
at close to the speed of reading the plaintext file. :func:`iter_encrypted_ipc_batches` is the low-memory
alternative: it decrypts a window of segments at a time, also in parallel, and yields the record batches inside it.

The associated data binds a file to its place: pass something that names it exactly (for a dataset: the dataset
id, its version and the file name), so that a file cannot be swapped for, or replayed as, another file encrypted
under the same key. It is not stored in the file; the reader must supply the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import mmap
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa  # type: ignore[import-untyped]  # pyarrow ships no type information

from confnb.datasets.errors import DatasetFormatError, IntegrityError
from confnb.datasets.streaming_aead import (
    AES256_GCM_HKDF_1MB,
    Parameters,
    PlaintextReader,
    StreamEncryptor,
    decrypt_to_buffer,
    iter_decrypt_windows,
    plaintext_size,
)
from confnb.fileio import atomic_output

__all__ = [
    "DatasetFormatError",
    "EncryptedFileInfo",
    "IntegrityError",
    "iter_encrypted_ipc_batches",
    "read_encrypted_ipc",
    "write_encrypted_ipc",
]

# Segments per window of iter_encrypted_ipc_batches: 16 MiB, enough for every thread to have several segments, few
# enough that memory holds a small fraction of any file worth reading this way.
WINDOW_SEGMENTS = 16


@dataclass(frozen=True)
class EncryptedFileInfo:
    """What a dataset manifest records about one encrypted file."""

    size: int
    """Bytes on disk (the ciphertext)."""
    rows: int
    plaintext_size: int
    """Bytes of the Arrow IPC stream inside."""
    sha256: str
    """Lower-case hex SHA-256 of the ciphertext, computed while writing (no second pass over the file)."""


class _HashingSink:
    """Passes ciphertext to the file and hashes it on the way, so the manifest digest costs no re-read."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.digest = hashlib.sha256()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.digest.update(data)
        return self._handle.write(data)


def _batches(
    source: pa.Table | pa.RecordBatchReader | Iterable[pa.RecordBatch], schema: pa.Schema | None
) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    if isinstance(source, pa.Table):
        batches: Iterator[pa.RecordBatch] = iter(source.to_batches())
        found: pa.Schema | None = source.schema
    elif isinstance(source, pa.RecordBatchReader):
        batches, found = iter(source), source.schema
    elif isinstance(source, pa.RecordBatch):
        raise TypeError("pass a single RecordBatch as [batch] or pa.Table.from_batches([batch])")
    else:
        batches, found = iter(source), None
        if schema is None:
            first = next(batches, None)
            if first is None:
                raise ValueError("an empty iterable of record batches needs schema= to write an empty table")
            found = first.schema
            batches = itertools.chain([first], batches)
    if schema is not None and found is not None and not schema.equals(found, check_metadata=True):
        raise ValueError(f"schema= does not match the data's schema:\n{schema}\nversus\n{found}")
    chosen = schema if schema is not None else found
    assert chosen is not None
    return chosen, batches


def write_encrypted_ipc(
    source: pa.Table | pa.RecordBatchReader | Iterable[pa.RecordBatch],
    path: str | os.PathLike[str],
    key: bytes,
    associated_data: bytes,
    *,
    schema: pa.Schema | None = None,
    mode: int = 0o600,
    params: Parameters = AES256_GCM_HKDF_1MB,
) -> EncryptedFileInfo:
    """Write ``source`` as an encrypted Arrow IPC stream to ``path``, replacing it atomically.

    Record batches flow through Arrow's IPC stream writer into the segment encryptor and on to a temporary file in
    the same directory, which is fsynced and renamed over ``path`` only when everything succeeded: a failure at any
    point (a bad batch, a full disk, an interrupt) leaves no partial file and the old one, if any, untouched. Memory
    is bounded by the batch being written plus one segment (for a ``RecordBatchReader`` or an iterator; a ``Table``
    is already in memory). Batches are written as they are; the IPC stream is uncompressed, which is what lets the
    reader map columns without copying.

    ``params`` exists for tests (small segments); confnb datasets always use the default.
    """
    target = Path(path)
    chosen, batches = _batches(source, schema)
    rows = 0
    with atomic_output(target, mode) as (handle, _temporary):
        sink = _HashingSink(handle)
        encryptor = StreamEncryptor(key, associated_data, sink, params=params)
        # Order matters on failure: the IPC writer's exit writes an end-of-stream marker, then the encryptor's
        # exit (seeing the exception) withholds the final segment, then the temporary file is removed.
        with encryptor, pa.ipc.new_stream(encryptor, chosen) as writer:
            for batch in batches:
                writer.write_batch(batch)
                rows += batch.num_rows
    return EncryptedFileInfo(
        size=encryptor.ciphertext_bytes,
        rows=rows,
        plaintext_size=encryptor.plaintext_bytes,
        sha256=sink.digest.hexdigest(),
    )


def _not_arrow(error: Exception, reader: _WindowReader | None = None) -> Exception:
    """What to raise for an Arrow error: the decryption failure behind it if there was one (pyarrow passes Python
    exceptions from file objects through, but may wrap them), otherwise a format error."""
    if reader is not None and reader.error is not None:
        return reader.error
    return DatasetFormatError(f"decrypted data is not a valid Arrow IPC stream: {error}")


def read_encrypted_ipc(
    path: str | os.PathLike[str],
    key: bytes,
    associated_data: bytes,
    *,
    threads: int | None = None,
    validate: bool = False,
    params: Parameters = AES256_GCM_HKDF_1MB,
) -> pa.Table:
    """Load a whole encrypted Arrow IPC file as a table, fast, at about 1.0x the table's size in memory.

    The file is memory-mapped and its segments are decrypted in parallel (``threads``, default: the usable CPUs)
    into one buffer from Arrow's allocator; Arrow then reads the IPC stream from that buffer without copying, so
    the table's columns are views into it. Ciphertext pages are released from this process as soon as they are
    decrypted, so the ciphertext does not add to the peak either. Every segment is authenticated before Arrow sees
    a single byte. Raises :class:`IntegrityError` if the file is not what ``key`` and ``associated_data`` produced,
    :class:`DatasetFormatError` if it is authentic but not an Arrow IPC stream.

    Authentic means written by the key holder, not well-formed: Arrow checks the stream's structure as it reads,
    but not, say, that string offsets stay inside their data. ``validate=True`` runs Arrow's full validation too
    (about as long again as the load itself), for data whose writer is trusted with the key but not with the
    reader's memory safety.
    """
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            plaintext_size(0, params)  # raises IntegrityError (truncated header); an empty file cannot be mapped
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        size = plaintext_size(len(mapping), params)  # raises IntegrityError for impossible lengths
        buffer = pa.allocate_buffer(size)
        with memoryview(buffer) as out:
            decrypt_to_buffer(key, associated_data, mapping, threads, out=out, release_consumed=True, params=params)
    finally:
        # Never let a failure to unmap replace the error that got us here; the mapping then goes with its last view.
        with contextlib.suppress(BufferError):
            mapping.close()
    source = pa.BufferReader(buffer)  # zero-copy: record batches are slices of ``buffer``
    try:
        table = pa.ipc.open_stream(source).read_all()
    except pa.ArrowException as error:
        raise _not_arrow(error) from None
    if source.tell() != size:
        raise DatasetFormatError("the file holds data after the end of its Arrow IPC stream")
    if validate:
        try:
            table.validate(full=True)
        except pa.ArrowException as error:
            raise _not_arrow(error) from None
    return table


def iter_encrypted_ipc_batches(
    path: str | os.PathLike[str],
    key: bytes,
    associated_data: bytes,
    *,
    window_segments: int = WINDOW_SEGMENTS,
    threads: int | None = None,
    params: Parameters = AES256_GCM_HKDF_1MB,
) -> Iterator[pa.RecordBatch]:
    """Yield the record batches of an encrypted Arrow IPC file, decrypting ``window_segments`` segments at a time.

    Each window is decrypted on ``threads`` threads (default: the usable CPUs) into an Arrow buffer, and the batches
    inside it are views into that buffer (a batch that straddles two windows is copied once), so memory holds the
    windows the yielded batches still use plus the one being read, whatever the file's size. Each batch is authentic
    when yielded, but whether the file is complete is known only at the end: a truncated or extended file raises
    :class:`IntegrityError` after the earlier batches were yielded, so consume the iterator to the end before
    trusting (or releasing anything derived from) what it gave. The file must also end where the Arrow stream
    ends; authentic bytes after the end-of-stream marker raise :class:`DatasetFormatError`.
    """
    with open(path, "rb") as handle:
        windows = iter_decrypt_windows(
            key,
            associated_data,
            handle,
            window_segments=window_segments,
            threads=threads,
            allocate=pa.allocate_buffer,
            params=params,
        )
        reader = _WindowReader(windows)
        with contextlib.closing(windows):
            try:
                stream = pa.ipc.open_stream(reader)
            except pa.ArrowException as error:
                raise _not_arrow(error, reader) from None
            while True:
                try:
                    batch = stream.read_next_batch()
                except StopIteration:
                    break
                except pa.ArrowException as error:
                    raise _not_arrow(error, reader) from None
                yield batch
            if reader.read(1):  # also authenticates the final window if Arrow stopped short of it
                raise DatasetFormatError("the file holds data after the end of its Arrow IPC stream")


class _WindowReader(PlaintextReader[pa.Buffer]):
    """:class:`PlaintextReader` over decrypted windows (Arrow buffers) for Arrow's IPC reader: a read inside one
    window is a zero-copy slice of it, so the record batches Arrow builds point into the window."""

    def _piece(self, chunk: pa.Buffer, start: int, size: int) -> pa.Buffer:
        return chunk.slice(start, size)
