"""Datasets larger than the vault's memory: encrypted Arrow IPC files scanned segment by segment into Polars.

A dataset whose plaintext would not fit the vault's memory budget is not decrypted up front. It becomes a Polars
IO source (``polars.io.plugins.register_io_source``) whose reader decrypts each file a window of 1 MiB segments at
a time, on every core (:func:`confnb.datasets.ipc.iter_encrypted_ipc_batches`; a window is the size of the frames
handed to Polars), keeps only the columns the query needs (projection pushdown) and the rows its pushed-down filter
keeps (predicate pushdown), and hands Polars' streaming engine a few record batches at a time. Filters, group-bys
and aggregates over such a dataset run in memory bounded by the batches and the aggregation state, not by the
dataset. The reader also gives each row its record id (its position in the dataset, counted across segments and
files before any filter) and its weight for the difference checks, so that a checked release sums its records'
weights as it streams instead of listing their ids.

The reader is the vault's own code: nothing of a plan is a Python callable, and the predicate Polars passes in is an
expression the vault compiled. Every batch is authenticated before Polars sees it, and a file is checked complete
(its last segment authenticated, its row count the signed manifest's) before the query that read it can finish,
so a truncated or swapped file fails the query rather than shortening a result.

Plaintext never reaches a disk the host can read: the decrypted segments live in memory only, and should Polars'
streaming engine spill, the vault process points it at memory of its own (``/dev/shm`` of the confidential VM,
mode 0700; see :func:`kernel_enclave.vault.process.private_spill_directory`), never at a disk.
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa  # type: ignore[import-untyped]  # pyarrow ships no type information
import pyarrow.compute as pc  # type: ignore[import-untyped]

from confnb.datasets.errors import DatasetFormatError, IntegrityError
from confnb.datasets.ipc import iter_encrypted_ipc_batches
from confnb.datasets.manifest import VerifiedDataset
from confnb.datasets.reader import ARROW_FORMAT, file_associated_data
from confnb.datasets.streaming_aead import SEGMENT_SIZE
from kernel_enclave.vault.differences import weights_of

MEMORY_BUDGET_VARIABLE = "CONFNB_VAULT_MEMORY_BUDGET"
# The share of the vault's memory limit a decrypted dataset may take; the rest is for the queries over it.
IN_MEMORY_SHARE = 4
# Decrypted batches are handed to Polars in frames of about this size: large enough that the engine's per-morsel
# costs vanish, small enough that the frames the engine holds in flight stay far below the budget.
FRAME_BYTES = 16 * 2**20
FRAMES_PER_BUDGET = 64


def memory_budget() -> int | None:
    """Bytes of plaintext the vault decrypts into memory; a larger dataset is scanned. None: no limit known.

    ``CONFNB_VAULT_MEMORY_BUDGET`` (bytes) when set, else :func:`memory_share`.
    """
    configured = os.environ.get(MEMORY_BUDGET_VARIABLE)
    if configured:
        return max(int(configured), 0)
    return memory_share()


def memory_share() -> int | None:
    """A quarter of the tightest of the process's address-space and data-segment limits and the machine's memory."""
    limits = []
    for which in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
        soft, _ = resource.getrlimit(which)
        if soft != resource.RLIM_INFINITY:
            limits.append(soft)
    with contextlib.suppress(ValueError, OSError):
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return min(limits) // IN_MEMORY_SHARE if limits else None


def should_scan(verified: VerifiedDataset) -> bool:
    """Whether a verified dataset is scanned rather than decrypted whole: an Arrow IPC dataset over the budget."""
    manifest = verified.manifest
    if manifest.format != ARROW_FORMAT:
        return False
    budget = memory_budget()
    return budget is not None and sum(entry.size for entry in manifest.files) > budget


def polars_schema(schema: pa.Schema) -> pl.Schema:
    """The Polars schema the reader's frames have: the Arrow schema as ``pl.from_arrow`` reads it."""
    frame = pl.from_arrow(schema.empty_table())
    assert isinstance(frame, pl.DataFrame)
    return frame.schema


@dataclass(frozen=True)
class Numbering:
    """The hidden columns a scan adds to each row: its record id (its position in the dataset, across the files in
    the manifest's order) and, with ``bits``, its weight for the difference checks (:mod:`.differences`)."""

    record_column: str
    weight_column: str | None = None
    bits: int | None = None

    def names(self) -> list[str]:
        return [self.record_column] + ([self.weight_column] if self.weight_column and self.bits else [])

    def numbered(self, batches: list[Any], start: int, names: set[str]) -> list[Any]:
        """The batches with the hidden columns among ``names``, their rows numbered from ``start``. Each batch gets
        columns of its own: a frame of one chunk per batch takes them without rechunking, and arrays of a batch's
        size are made two to three times faster than one array for the frame (memory the allocator reuses)."""
        found = []
        for read in batches:
            ids = np.arange(start, start + read.num_rows, dtype=np.int64)
            start += read.num_rows
            batch = read.append_column(self.record_column, pa.array(ids)) if self.record_column in names else read
            if self.weight_column is not None and self.bits is not None and self.weight_column in names:
                batch = batch.append_column(self.weight_column, pa.array(weights_of(ids, self.bits)))
            found.append(batch)
        return found


class ScanFacts:
    """What the reads of a scanned dataset have shown: which float columns hold no NaN, and whether a file failed
    its checks.

    A dataset in memory is checked once, at load, and its NaN-free columns are read without a NaN-to-null pass (see
    :attr:`.plan.SourceTable.nan_free`); a scanned one cannot be checked without decrypting it, so the first query
    that reads every file to its end checks each float column of every batch on the way, whatever the query reads,
    and its findings hold for the dataset's lifetime in the vault (its files are authenticated and immutable).

    A file that fails authentication, or disagrees with the signed manifest, was altered on disk after the owner
    sealed it: the dataset is then failed for the kernel's lifetime (every later read fails at once, with the same
    reason), and :meth:`failures` counts the reads that failed so that the vault can tell the analyst which check
    failed rather than that a query did. Safe across threads: the vault may run one query while another's scan is
    in flight.
    """

    def __init__(self, dataset_id: str) -> None:
        self._dataset_id = dataset_id
        self._lock = threading.Lock()
        self._free: frozenset[str] = frozenset()
        self._known = False
        self._failure: str | None = None
        self._failures = 0

    def nan_free(self) -> frozenset[str]:
        with self._lock:
            return self._free

    def known(self) -> bool:
        with self._lock:
            return self._known

    def learn(self, free: Iterable[str]) -> None:
        """What a complete read found: ``free``, every float column without a NaN in any batch."""
        with self._lock:
            self._free, self._known = frozenset(free), True

    def failure(self) -> str | None:
        """Why the dataset failed, once a read found one of its files altered."""
        with self._lock:
            return self._failure

    def failures(self) -> int:
        with self._lock:
            return self._failures

    def fail(self, error: Exception) -> None:
        """Record a read that failed; the first reason is kept, naming the dataset."""
        reason = str(error)
        if not reason.startswith(f"{self._dataset_id}: "):
            reason = f"{self._dataset_id}: {reason}"
        with self._lock:
            self._failure = self._failure or (
                f"dataset {self._dataset_id!r} failed its checks while it was read ({reason}): its files on disk "
                "were altered after the owner sealed them; nothing read from them was released"
            )
            self._failures += 1


def _floats_with_nan(batch: Any, floats: list[str]) -> set[str]:
    """The columns of ``floats`` holding a NaN in ``batch`` (a type Arrow cannot check counts as holding one)."""
    found = set()
    for name in floats:
        try:
            if pc.any(pc.is_nan(batch.column(name))).as_py():
                found.add(name)
        except pa.ArrowNotImplementedError:
            found.add(name)
    return found


def scan_dataset(
    verified: VerifiedDataset, key: bytes, numbering: Numbering | None = None, facts: ScanFacts | None = None
) -> pl.LazyFrame:
    """A lazy frame over an encrypted Arrow IPC dataset, read segment by segment when a query runs; with
    ``numbering``, each row also carries its record id and weight, made as it is read; with ``facts``, the first
    complete read learns which float columns hold no NaN, and a read that finds a file altered fails the dataset."""
    manifest = verified.manifest
    arrow_schema = manifest.schema.to_arrow()
    files = [
        (verified.path(entry.name), file_associated_data(manifest.dataset_id, manifest.key_id, entry.name), entry.rows)
        for entry in manifest.files
    ]
    schema = polars_schema(arrow_schema)
    hidden = [] if numbering is None else numbering.names()
    for name in hidden:
        schema[name] = pl.Int64
    share = memory_share()  # what the process may hold, whatever the configured budget for decrypting up front
    frame_bytes = FRAME_BYTES if share is None else max(2**20, min(FRAME_BYTES, share // FRAMES_PER_BUDGET))
    window_segments = max(1, frame_bytes // SEGMENT_SIZE)  # each file is decrypted a frame's worth at a time
    floats = [field.name for field in arrow_schema if pa.types.is_floating(field.type)]

    def read_all(
        with_columns: list[str] | None, predicate: pl.Expr | None, n_rows: int | None, batch_size: int | None
    ) -> Iterator[pl.DataFrame]:
        # n_rows is a hint: every file is read to its end, so its completeness is checked before the query ends.
        wanted = list(schema) if with_columns is None else with_columns
        needed = set(wanted) | (set(predicate.meta.root_names()) if predicate is not None else set())
        read_columns = [name for name in arrow_schema.names if name in needed] or arrow_schema.names[:1]
        numbered = {name for name in hidden if name in needed}
        position = 0  # the record id of the next row: rows are numbered across the files, before any filter
        checking = facts is not None and bool(floats) and not facts.known()
        with_nan: set[str] = set()

        def frame(batches: list[Any]) -> pl.DataFrame:
            if numbered:
                assert numbering is not None
                batches = numbering.numbered(batches, position, numbered)
            found = _frame(batches)
            found = found if predicate is None else found.filter(predicate)
            return found.select(wanted)

        for path, associated_data, rows in files:
            seen = 0
            pending: list[Any] = []
            pending_bytes = 0
            pending_rows = 0
            for batch in iter_encrypted_ipc_batches(path, key, associated_data, window_segments=window_segments):
                seen += batch.num_rows
                if not batch.schema.equals(arrow_schema):
                    raise IntegrityError(f"{manifest.dataset_id}: a file's schema is not the signed manifest's")
                if checking:
                    with_nan |= _floats_with_nan(batch, [name for name in floats if name not in with_nan])
                pending.append(batch.select(read_columns))
                pending_bytes += pending[-1].nbytes
                pending_rows += batch.num_rows
                if pending_bytes >= frame_bytes:
                    yield frame(pending)
                    position += pending_rows
                    pending, pending_bytes, pending_rows = [], 0, 0
            if pending:
                yield frame(pending)
                position += pending_rows
            if seen != rows:
                raise IntegrityError(f"{manifest.dataset_id}: a file holds {seen} rows, its manifest says {rows}")
        if checking:  # every file read to its end and found complete: what it showed holds for the dataset
            assert facts is not None
            facts.learn(name for name in floats if name not in with_nan)

    def read(
        with_columns: list[str] | None, predicate: pl.Expr | None, n_rows: int | None, batch_size: int | None
    ) -> Iterator[pl.DataFrame]:
        failed = None if facts is None else facts.failure()
        try:
            if failed is not None:  # a file was found altered before: nothing of the dataset is read again
                raise IntegrityError(failed)
            yield from read_all(with_columns, predicate, n_rows, batch_size)
        except (IntegrityError, DatasetFormatError) as error:
            if facts is not None:
                facts.fail(error)
            raise

    return pl.io.plugins.register_io_source(io_source=read, schema=schema)


def _frame(batches: list[Any]) -> pl.DataFrame:
    """A few record batches as one Polars frame (fewer, larger morsels for the engine). Strings and binaries become
    Arrow's view types first, which are Polars' own representation: Arrow makes the views several times faster than
    Polars converts offsets, and Polars then takes the columns without copying."""
    table = pa.Table.from_batches(batches)
    viewed = pa.schema([field.with_type(_VIEWS.get(field.type, field.type)) for field in table.schema])
    frame = pl.from_arrow(table if viewed.equals(table.schema) else table.cast(viewed), rechunk=False)
    assert isinstance(frame, pl.DataFrame)
    return frame


_VIEWS = {
    pa.string(): pa.string_view(),
    pa.large_string(): pa.string_view(),
    pa.binary(): pa.binary_view(),
    pa.large_binary(): pa.binary_view(),
}
