"""Datasets larger than the vault's memory: encrypted Arrow IPC files scanned segment by segment into Polars.

A dataset whose plaintext would not fit the vault's memory budget is not decrypted up front. It becomes a Polars
IO source (``polars.io.plugins.register_io_source``) whose reader decrypts each file one 1 MiB segment at a time
(:func:`confnb.datasets.ipc.iter_encrypted_ipc_batches`), keeps only the columns the query needs (projection
pushdown) and the rows its pushed-down filter keeps (predicate pushdown), and hands Polars' streaming engine one
record batch at a time. Filters, group-bys and aggregates over such a dataset run in memory bounded by the batch
and the aggregation state, not by the dataset. The reader also gives each row its record id (its position in the
dataset, counted across segments and files before any filter) and its weight for the difference checks, so that a
checked release sums its records' weights as it streams instead of listing their ids.

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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa  # type: ignore[import-untyped]  # pyarrow ships no type information

from confnb.datasets.errors import IntegrityError
from confnb.datasets.ipc import iter_encrypted_ipc_batches
from confnb.datasets.manifest import VerifiedDataset
from confnb.datasets.reader import ARROW_FORMAT, file_associated_data
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

    def columns(self, start: int, rows: int) -> dict[str, np.ndarray]:
        ids = np.arange(start, start + rows, dtype=np.int64)
        found = {self.record_column: ids}
        if self.weight_column is not None and self.bits is not None:
            found[self.weight_column] = weights_of(ids, self.bits)
        return found


def scan_dataset(verified: VerifiedDataset, key: bytes, numbering: Numbering | None = None) -> pl.LazyFrame:
    """A lazy frame over an encrypted Arrow IPC dataset, read segment by segment when a query runs; with
    ``numbering``, each row also carries its record id and weight, made as it is read."""
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

    def read(
        with_columns: list[str] | None, predicate: pl.Expr | None, n_rows: int | None, batch_size: int | None
    ) -> Iterator[pl.DataFrame]:
        # n_rows is a hint: every file is read to its end, so its completeness is checked before the query ends.
        wanted = list(schema) if with_columns is None else with_columns
        needed = set(wanted) | (set(predicate.meta.root_names()) if predicate is not None else set())
        read_columns = [name for name in arrow_schema.names if name in needed] or arrow_schema.names[:1]
        numbered = {name for name in hidden if name in needed}
        position = 0  # the record id of the next row: rows are numbered across the files, before any filter

        def frame(batches: list[Any], rows: int) -> pl.DataFrame:
            found = _frame(batches)
            if numbered:
                assert numbering is not None
                made = numbering.columns(position, rows)
                found = found.with_columns(pl.Series(name, made[name]) for name in numbered)
            found = found if predicate is None else found.filter(predicate)
            return found.select(wanted)

        for path, associated_data, rows in files:
            seen = 0
            pending: list[Any] = []
            pending_bytes = 0
            pending_rows = 0
            for batch in iter_encrypted_ipc_batches(path, key, associated_data):
                seen += batch.num_rows
                if not batch.schema.equals(arrow_schema):
                    raise IntegrityError(f"{manifest.dataset_id}: a file's schema is not the signed manifest's")
                pending.append(batch.select(read_columns))
                pending_bytes += pending[-1].nbytes
                pending_rows += batch.num_rows
                if pending_bytes >= frame_bytes:
                    yield frame(pending, pending_rows)
                    position += pending_rows
                    pending, pending_bytes, pending_rows = [], 0, 0
            if pending:
                yield frame(pending, pending_rows)
                position += pending_rows
            if seen != rows:
                raise IntegrityError(f"{manifest.dataset_id}: a file holds {seen} rows, its manifest says {rows}")

    return pl.io.plugins.register_io_source(io_source=read, schema=schema)


def _frame(batches: list[Any]) -> pl.DataFrame:
    """A few record batches as one Polars frame (fewer, larger morsels for the engine)."""
    frame = pl.from_arrow(pa.Table.from_batches(batches), rechunk=False)
    assert isinstance(frame, pl.DataFrame)
    return frame
