"""The data owner's side of a dataset: encrypt an input into a signed dataset directory, and decrypt it back.

Two encrypted formats (``DESIGN.md``, "Datasets and keys"): ``"arrow"``, encrypted Arrow IPC (Tink streaming AEAD),
the fast load path; and ``"parquet"``, Parquet Modular Encryption (AES_GCM_V1), the interchange format that other
engines read too. Both use the one dataset key the broker holds.

Encryption happens entirely in a temporary sibling directory; the finished dataset appears under its name in one
rename, and only then is its key registered with the broker. A failure at any step (bad input, full disk,
interrupted run) leaves neither a partial directory nor a registered key behind.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
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
from confnb.datasets.errors import IntegrityError
from confnb.datasets.inputs import TableInput, open_input
from confnb.datasets.ipc import read_encrypted_ipc, write_encrypted_ipc
from confnb.datasets.manifest import (
    DatasetFormat,
    DatasetSchema,
    FileEntry,
    Manifest,
    VerifiedDataset,
    verify_dataset,
    write_dataset_manifest,
)
from confnb.datasets.parquet import read_encrypted_parquet_dataset, write_encrypted_parquet
from confnb.fileio import write_atomically
from confnb.policy.output import OutputPolicy

ARROW_FORMAT: DatasetFormat = "arrow-ipc-tink-aes256-gcm-hkdf-1mb"
PARQUET_FORMAT: DatasetFormat = "parquet-pme-aes-gcm-v1"
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


def file_associated_data(dataset_id: str, key_id: str, file_name: str) -> bytes:
    """Tink's associated data for one file: a ciphertext moved to another dataset, key or name does not open."""
    return json.dumps(["confnb-dataset-file/1", dataset_id, key_id, file_name], separators=(",", ":")).encode()


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
    if store.dataset(dataset_id) is not None:
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
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        store.register_dataset(
            dataset_id, output_policy, attestation_policy_toml, key_id=key_id, dataset_key=dataset_key
        )
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)  # without its key the directory is unreadable noise
        raise
    return EncryptedDataset(target, manifest)


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
    write_atomically(destination, sink.getvalue().to_pybytes(), mode=0o600)
    return int(table.num_rows)


def read_verified(verified: VerifiedDataset, dataset_key: bytes) -> Any:
    """Every file of a verified dataset, decrypted and concatenated (what the vault does after a key release).

    Dispatches on the signed manifest's format. Whatever the format, the result must have the manifest's schema and
    row count: each file is bound to its name in this dataset, so a mismatch means the files are not the ones
    signed.
    """
    manifest = verified.manifest
    if manifest.format == PARQUET_FORMAT:
        table = read_encrypted_parquet_dataset(
            [verified.path(entry.name) for entry in manifest.files],
            dataset_key,
            manifest.key_id,
            manifest.dataset_id,
            schema=manifest.schema.to_arrow(),
        )
        _check_against_manifest(table, manifest)
        return table
    if manifest.format != ARROW_FORMAT:
        raise StoreError(f"{manifest.dataset_id}: format {manifest.format!r} is not one this version reads")
    tables = [
        read_encrypted_ipc(
            verified.path(entry.name),
            dataset_key,
            file_associated_data(manifest.dataset_id, manifest.key_id, entry.name),
        )
        for entry in manifest.files
    ]
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    _check_against_manifest(table, manifest)
    return table


def _check_against_manifest(table: Any, manifest: Manifest) -> None:
    if not table.schema.equals(manifest.schema.to_arrow(), check_metadata=False):
        raise StoreError(f"{manifest.dataset_id}: decrypted schema differs from the signed manifest")
    expected = sum(entry.rows for entry in manifest.files)
    if table.num_rows != expected:
        raise IntegrityError(
            f"{manifest.dataset_id}: decrypted {table.num_rows} rows, the signed manifest lists {expected}"
        )


def _counted(table: TableInput, progress: Progress | None) -> Iterator[Any]:
    rows = 0
    for batch in table.batches:
        rows += batch.num_rows
        if progress is not None:
            progress(rows, table.total_rows)
        yield batch
