"""The data owner's side of a dataset: encrypt an input into a signed dataset directory, and decrypt it back.

Two encrypted formats (``DESIGN.md``, "Datasets and keys"): ``"arrow"``, encrypted Arrow IPC (Tink streaming AEAD),
the fast load path; and ``"parquet"``, Parquet Modular Encryption (AES_GCM_V1), the interchange format that other
engines read too. Both use the one dataset key the broker holds.

Encryption happens entirely in a temporary sibling directory; the finished dataset appears under its name in one
rename, and only then is its key registered with the broker. A failure at any step (bad input, full disk,
interrupted run) leaves neither a partial directory nor a registered key behind.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.csv as pacsv  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from confnb.broker.store import OwnerStore, StoreError
from confnb.datasets.inputs import TableInput, open_input
from confnb.datasets.ipc import write_encrypted_ipc
from confnb.datasets.manifest import (
    DatasetFormat,
    DatasetSchema,
    FileEntry,
    Manifest,
    verify_dataset,
    write_dataset_manifest,
)
from confnb.datasets.parquet import write_encrypted_parquet
from confnb.datasets.reader import ARROW_FORMAT, PARQUET_FORMAT, file_associated_data, read_verified
from confnb.fileio import WriteError, describe_os_error, sync_directory, write_atomically
from confnb.policy.output import OutputPolicy

PART_NAME = "part-0000.arrow"
PARQUET_PART_NAME = "part-0000.parquet"

OutputFormat = Literal["arrow", "parquet"]
#: ``encrypt_dataset(format=...)`` -> (manifest format, name of the one encrypted file)
FORMATS: dict[str, tuple[DatasetFormat, str]] = {
    "arrow": (ARROW_FORMAT, PART_NAME),
    "parquet": (PARQUET_FORMAT, PARQUET_PART_NAME),
}

Progress = Callable[[int, int | None], None]  # (rows so far, total rows if known)


@dataclass(frozen=True)
class EncryptedDataset:
    directory: Path
    manifest: Manifest


def encrypt_dataset(
    source: str | os.PathLike[str] | Any,
    out_dir: str | os.PathLike[str],
    store: OwnerStore,
    dataset_id: str,
    output_policy: OutputPolicy,
    attestation_policy_toml: str | None = None,
    *,
    progress: Progress | None = None,
    format: OutputFormat = "arrow",
) -> EncryptedDataset:
    """Encrypt ``source`` into a new dataset directory ``out_dir`` and register its fresh key with ``store``.

    ``format`` is ``"arrow"`` (encrypted Arrow IPC, the fast load path) or ``"parquet"`` (PME Parquet, which other
    engines read). For Parquet the manifest records the schema as Parquet gives it back (``timestamp[s]`` becomes
    ``timestamp[ms]``, for example), so that what the manifest promises is exactly what a reader gets.
    """
    if format not in FORMATS:
        raise StoreError(f"format {format!r}: choose one of {', '.join(FORMATS)}")
    manifest_format, part_name = FORMATS[format]
    target = Path(out_dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise StoreError(f"{target} exists and is not an empty directory; nothing was written")
    try:
        registered = store.dataset(dataset_id) is not None
    except sqlite3.Error as exc:  # a full disk cannot even open SQLite's shared-memory file
        raise StoreError(f"cannot read the broker's database {store.database}: {exc}; nothing was written") from None
    if registered:
        raise StoreError(f"dataset {dataset_id!r} is already registered with this broker")
    table = open_input(source)
    key_id, dataset_key = secrets.token_hex(8), os.urandom(32)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if format == "parquet":
            written = write_encrypted_parquet(
                _counted(table, progress),
                staging / part_name,
                dataset_key,
                key_id,
                dataset_id,
                schema=table.schema,
                mode=0o644,
            )
            schema, size, rows, sha256 = written.schema, written.size, written.rows, written.sha256
        else:
            info = write_encrypted_ipc(
                _counted(table, progress),
                staging / part_name,
                dataset_key,
                file_associated_data(dataset_id, key_id, part_name),
                schema=table.schema,
                mode=0o644,
            )
            schema, size, rows, sha256 = table.schema, info.size, info.rows, info.sha256
        manifest = Manifest(
            dataset_id=dataset_id,
            version=1,
            format=manifest_format,
            schema=DatasetSchema.from_arrow(schema),
            files=(FileEntry(name=part_name, size=size, rows=rows, sha256=sha256),),
            key_id=key_id,
            output_policy_digest=output_policy.digest(),
            owner_public_key=store.owner_public_key.public_bytes_raw(),
            created_at=datetime.now(UTC),
        )
        write_dataset_manifest(staging, manifest, store.owner_key)
        staging.chmod(0o755)
        if target.exists():
            target.rmdir()  # empty, checked above
        os.replace(staging, target)
        sync_directory(target.parent)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):  # a full disk, a quota, an I/O error: one line, nothing left behind
            raise StoreError(f"cannot write {target}: {_cause(exc)}; nothing was written, no key registered") from None
        raise
    try:
        store.register_dataset(
            dataset_id, output_policy, attestation_policy_toml, key_id=key_id, dataset_key=dataset_key
        )
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)  # without its key the directory is unreadable noise
        raise
    return EncryptedDataset(target, manifest)


def _cause(error: OSError) -> str:
    """Arrow's I/O errors wrap the system's; either way, the cause in a few words."""
    if isinstance(error, WriteError) or error.errno is not None:
        return describe_os_error(error)
    text = str(error)
    if "No space left on device" in text:
        return "no space left on device"
    return text.splitlines()[0][:300] if text else "I/O error"


def decrypt_dataset(directory: str | os.PathLike[str], store: OwnerStore, out_file: str | os.PathLike[str]) -> int:
    """The owner's own round trip: verify the signed directory, then write its table as Parquet, CSV or Arrow."""
    verified = verify_dataset(Path(directory), store.owner_public_key)
    table = read_verified(verified, store.dataset_key(verified.manifest.dataset_id))
    destination = Path(out_file)
    sink = pa.BufferOutputStream()
    suffix = destination.suffix.lower()
    if suffix in (".parquet", ".pq"):
        pq.write_table(table, sink)
    elif suffix == ".csv":
        pacsv.write_csv(table, sink)
    elif suffix in (".arrow", ".feather", ".ipc"):
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    else:
        raise StoreError(f"{destination}: name the output .parquet, .csv or .arrow")
    try:
        write_atomically(destination, sink.getvalue().to_pybytes(), mode=0o600)
    except OSError as exc:  # one line for the CLI; the previous file (if any) is intact
        problem = str(exc) if isinstance(exc, WriteError) else f"cannot write {destination}: {describe_os_error(exc)}"
        raise StoreError(problem) from None
    return int(table.num_rows)


def _counted(table: TableInput, progress: Progress | None) -> Iterator[Any]:
    rows = 0
    for batch in table.batches:
        rows += batch.num_rows
        if progress is not None:
            progress(rows, table.total_rows)
        yield batch
