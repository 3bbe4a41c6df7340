"""Reading what data owners have (Parquet, CSV, Arrow IPC, DataFrames, Tables) as a stream of record batches.

Inputs can be larger than memory, so every file format is read batch by batch; the encryptor holds one batch and
one 1 MiB segment at a time. The format is taken from the file's magic bytes, falling back to its name, so a
mislabelled file is read correctly or refused with a message that says what it looked like.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.csv as pacsv  # type: ignore[import-untyped]
import pyarrow.ipc as paipc  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

BATCH_ROWS = 65_536
_CSV_BLOCK = 8 << 20


class InputError(ValueError):
    """The input cannot be read as a table (unknown format, unreadable, malformed)."""


@dataclass
class TableInput:
    """A schema, its batches (consumed once), and what is known of the size for progress reports."""

    schema: Any
    batches: Iterator[Any]
    total_rows: int | None
    description: str


def open_input(source: str | os.PathLike[str] | Any) -> TableInput:
    """A Parquet/CSV/Arrow file path, a ``pyarrow.Table``, ``RecordBatchReader`` or a pandas ``DataFrame``."""
    if isinstance(source, pa.Table):
        return TableInput(source.schema, iter(source.to_batches(BATCH_ROWS)), source.num_rows, "table")
    if isinstance(source, pa.RecordBatchReader):
        return TableInput(source.schema, iter(source), None, "record batch reader")
    if type(source).__name__ == "DataFrame" and hasattr(source, "to_records"):
        table = pa.Table.from_pandas(source, preserve_index=False)
        return TableInput(table.schema, iter(table.to_batches(BATCH_ROWS)), table.num_rows, "DataFrame")
    path = Path(source)
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror or exc}") from None
    kind = _sniff(head, path)
    try:
        if kind == "parquet":
            parquet = pq.ParquetFile(path)
            return TableInput(
                parquet.schema_arrow,
                parquet.iter_batches(batch_size=BATCH_ROWS),
                parquet.metadata.num_rows,
                f"Parquet {path.name}",
            )
        if kind == "arrow-file":
            reader = paipc.open_file(pa.memory_map(str(path)))
            batches = (reader.get_batch(index) for index in range(reader.num_record_batches))
            return TableInput(reader.schema, batches, None, f"Arrow IPC file {path.name}")
        if kind == "arrow-stream":
            stream = paipc.open_stream(pa.memory_map(str(path)))
            return TableInput(stream.schema, iter(stream), None, f"Arrow IPC stream {path.name}")
        csv = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK))
        return TableInput(csv.schema, _guard(iter(csv), path), None, f"CSV {path.name}")
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise InputError(f"{path}: not readable as {kind}: {_first_line(exc)}") from None


def _sniff(head: bytes, path: Path) -> str:
    if head[:4] == b"PAR1":
        return "parquet"
    if head[:6] == b"ARROW1":
        return "arrow-file"
    if head[:4] == b"\xff\xff\xff\xff":
        return "arrow-stream"
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq", ".arrow", ".feather", ".ipc"):
        raise InputError(f"{path}: named like {suffix} but its first bytes are not that format")
    if b"\0" in head:
        raise InputError(f"{path}: binary data that is neither Parquet nor Arrow IPC (CSV is text)")
    return "csv"


def _guard(batches: Iterator[Any], path: Path) -> Iterator[Any]:
    """CSV errors surface while reading later blocks; report them as input errors naming the file."""
    try:
        yield from batches
    except (pa.ArrowInvalid, pa.ArrowIOError) as exc:
        raise InputError(f"{path}: malformed CSV: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
