"""Reading a verified dataset with its key: what the vault does after a key release, and the owner's round trip.

Kept apart from :mod:`confnb.datasets.owner` (which needs the broker's store) so that the code inside the CVM can
read datasets without importing anything of the data owner's side.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped]

from confnb.datasets.errors import DatasetFormatError, IntegrityError
from confnb.datasets.ipc import read_encrypted_ipc
from confnb.datasets.manifest import DatasetFormat, Manifest, VerifiedDataset

ARROW_FORMAT: DatasetFormat = "arrow-ipc-tink-aes256-gcm-hkdf-1mb"
PARQUET_FORMAT: DatasetFormat = "parquet-pme-aes-gcm-v1"


def file_associated_data(dataset_id: str, key_id: str, file_name: str) -> bytes:
    """Tink's associated data for one file: a ciphertext moved to another dataset, key or name does not open."""
    return json.dumps(["confnb-dataset-file/1", dataset_id, key_id, file_name], separators=(",", ":")).encode()


def read_verified(verified: VerifiedDataset, dataset_key: bytes) -> Any:
    """Every file of a verified dataset, decrypted and concatenated (what the vault does after a key release).

    Dispatches on the signed manifest's format. Whatever the format, the result must have the manifest's schema and
    row count: each file is bound to its name in this dataset, so a mismatch means the files are not the ones
    signed.
    """
    manifest = verified.manifest
    if manifest.format == PARQUET_FORMAT:
        # Imported here: pyarrow's Parquet dataset reader loads pandas, which a vault reading Arrow IPC never needs.
        from confnb.datasets.parquet import read_encrypted_parquet_dataset

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
        raise DatasetFormatError(f"{manifest.dataset_id}: format {manifest.format!r} is not one this version reads")
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
        raise DatasetFormatError(f"{manifest.dataset_id}: decrypted schema differs from the signed manifest")
    expected = sum(entry.rows for entry in manifest.files)
    if table.num_rows != expected:
        raise IntegrityError(
            f"{manifest.dataset_id}: decrypted {table.num_rows} rows, the signed manifest lists {expected}"
        )
