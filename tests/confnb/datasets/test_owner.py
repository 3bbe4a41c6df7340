"""The owner's pipeline: every input format in, the exact table back out, and nothing left behind on failure."""

from __future__ import annotations

import datetime as dt
import decimal

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from confnb.broker.store import OwnerStore, StoreError
from confnb.datasets.errors import IntegrityError
from confnb.datasets.inputs import InputError
from confnb.datasets.ipc import read_encrypted_ipc
from confnb.datasets.manifest import DatasetIntegrityError, verify_dataset
from confnb.datasets.owner import PART_NAME, decrypt_dataset, encrypt_dataset, file_associated_data, read_verified
from confnb.policy.output import OutputPolicy

POLICY = OutputPolicy.from_toml('[policy]\nid = "p"\n[release]\nallow = ["aggregate"]\nmin_group_size = 10\n')


def _table(rows: int = 1000) -> pa.Table:
    n = range(rows)
    return pa.table(
        {
            "id": pa.array(list(n), pa.int64()),
            "name": pa.array([None if i % 7 == 0 else f"patient-{i}" for i in n]),
            "ward": pa.array([["a", "b", "c"][i % 3] for i in n]).dictionary_encode(),
            "admitted": pa.array(
                [dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(hours=i) for i in n],
                pa.timestamp("us", tz="UTC"),
            ),
            "cost": pa.array([decimal.Decimal(i) / 100 for i in n], pa.decimal128(12, 2)),
            "flag": pa.array([i % 2 == 0 for i in n]),
        }
    )


@pytest.fixture
def store(tmp_path) -> OwnerStore:
    return OwnerStore.create(tmp_path / "owner")


@pytest.mark.parametrize("kind", ["parquet", "arrow-file", "arrow-stream", "table", "dataframe"])
def test_every_input_round_trips_exactly(tmp_path, store, kind):
    table = _table()
    source: object
    if kind == "parquet":
        source = tmp_path / "in.parquet"
        pq.write_table(table, source, row_group_size=300)
    elif kind == "arrow-file":
        source = tmp_path / "in.arrow"
        with pa.ipc.new_file(source, table.schema) as writer:
            writer.write_table(table, max_chunksize=250)
    elif kind == "arrow-stream":
        source = tmp_path / "in.stream"
        with pa.ipc.new_stream(source, table.schema) as writer:
            writer.write_table(table, max_chunksize=250)
    elif kind == "dataframe":
        table = table.drop_columns(["ward"])  # pandas turns dictionaries into categoricals; compared separately
        source = table.to_pandas()
    else:
        source = table
    dataset = encrypt_dataset(source, tmp_path / "out", store, "claims", POLICY)
    verified = verify_dataset(dataset.directory, store.owner_public_key)
    back = read_verified(verified, store.dataset_key("claims"))
    assert back.equals(table if kind != "dataframe" else pa.Table.from_pandas(source, preserve_index=False))
    assert verified.manifest.files[0].rows == table.num_rows


def test_csv_input_and_every_output_format(tmp_path, store):
    source = tmp_path / "in.csv"
    pacsv.write_csv(pa.table({"a": [1, 2, 3], "b": ["x", None, "z"]}), source)
    encrypt_dataset(source, tmp_path / "out", store, "csv-data", POLICY)
    for suffix in (".parquet", ".csv", ".arrow"):
        assert decrypt_dataset(tmp_path / "out", store, tmp_path / f"back{suffix}") == 3
    assert pq.read_table(tmp_path / "back.parquet").column("a").to_pylist() == [1, 2, 3]
    with pytest.raises(StoreError, match="name the output"):
        decrypt_dataset(tmp_path / "out", store, tmp_path / "back.xlsx")


def test_a_failed_encryption_leaves_nothing(tmp_path, store):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n" + "3,4\n" * 10 + "5,6,7\n")  # a ragged row, found while streaming
    with pytest.raises(InputError, match="Expected 2 columns, got 3"):
        encrypt_dataset(bad, tmp_path / "out", store, "claims", POLICY)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert store.dataset("claims") is None
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\x01\x02" * 10)
    with pytest.raises(InputError, match="neither Parquet nor Arrow"):
        encrypt_dataset(binary, tmp_path / "out", store, "claims", POLICY)


def test_refuses_to_overwrite_or_reuse_an_id(tmp_path, store):
    encrypt_dataset(_table(10), tmp_path / "out", store, "claims", POLICY)
    with pytest.raises(StoreError, match="not an empty directory"):
        encrypt_dataset(_table(10), tmp_path / "out", store, "other", POLICY)
    with pytest.raises(StoreError, match="already registered"):
        encrypt_dataset(_table(10), tmp_path / "out2", store, "claims", POLICY)
    assert not (tmp_path / "out2").exists()


def test_tampered_files_fail_closed(tmp_path, store):
    dataset = encrypt_dataset(_table(5000), tmp_path / "out", store, "claims", POLICY)
    part = dataset.directory / PART_NAME
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x01
    part.write_bytes(bytes(data))
    with pytest.raises(DatasetIntegrityError, match=r"part-0000\.arrow: SHA-256 mismatch"):
        verify_dataset(dataset.directory, store.owner_public_key)
    with pytest.raises(DatasetIntegrityError):
        decrypt_dataset(dataset.directory, store, tmp_path / "back.parquet")
    assert not (tmp_path / "back.parquet").exists()


def test_a_file_moved_to_another_dataset_does_not_open(tmp_path, store):
    one = encrypt_dataset(_table(100), tmp_path / "one", store, "one", POLICY)
    two = encrypt_dataset(_table(100), tmp_path / "two", store, "two", POLICY)
    verified_two = verify_dataset(two.directory, store.owner_public_key)
    # one's ciphertext under two's key and name: the associated data (dataset, key id, name) differs
    with pytest.raises(IntegrityError):
        read_encrypted_ipc(
            one.directory / PART_NAME,
            store.dataset_key("two"),
            file_associated_data("two", verified_two.manifest.key_id, PART_NAME),
        )
