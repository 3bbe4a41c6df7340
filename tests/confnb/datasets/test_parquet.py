"""PME Parquet: exact round trips, every kind of tampering refused, AES_GCM_CTR_V1 refused, no KMS URL from a file
ever used, one keyring shared by threads, and the KMS cost (one unwrap per file, or per cache lifetime)."""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import gc
import hashlib
import json
import os
import shutil
import socket
import struct
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pe
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from confnb.broker.store import OwnerStore
from confnb.datasets import parquet as pm
from confnb.datasets.errors import DatasetFormatError, IntegrityError
from confnb.datasets.manifest import DatasetIntegrityError, verify_dataset
from confnb.datasets.owner import PARQUET_PART_NAME, decrypt_dataset, encrypt_dataset
from confnb.datasets.parquet import (
    DatasetKeyring,
    read_encrypted_parquet,
    read_encrypted_parquet_dataset,
    write_encrypted_parquet,
)
from confnb.datasets.reader import PARQUET_FORMAT, read_verified
from confnb.policy.output import OutputPolicy

NEEDS_UNIFORM = pytest.mark.skipif(
    not pm._HAS_UNIFORM,
    reason="pyarrow < 21 has no uniform encryption: one data key per column, unwrapped per column chunk",
)
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
DATASET, KEY_ID = "claims", "k-2026"
POLICY = OutputPolicy.from_toml('[policy]\nid = "p"\n[release]\nallow = ["aggregate"]\nmin_group_size = 10\n')


def rich_table(rows: int = 600) -> pa.Table:
    """Every kind of column a dataset has: nulls everywhere, strings, dictionaries, tz timestamps, decimals, nested."""
    n = range(rows)
    return pa.table(
        {
            "id": pa.array(list(n), pa.int64()),
            "name": pa.array([None if i % 7 == 0 else f"patient-{i:05d}" for i in n]),
            "ward": pa.array([None if i % 11 == 0 else "abc"[i % 3] for i in n]).dictionary_encode(),
            "admitted": pa.array(
                [None if i % 13 == 0 else dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(minutes=i) for i in n],
                pa.timestamp("us", tz="Europe/Berlin"),
            ),
            "born": pa.array([dt.date(1950, 1, 1) + dt.timedelta(days=i) for i in n], pa.date32()),
            "cost": pa.array([None if i % 5 == 0 else decimal.Decimal(i) / 100 for i in n], pa.decimal128(12, 2)),
            "big": pa.array([decimal.Decimal(i) * 10**30 for i in n], pa.decimal256(40, 0)),
            "score": pa.array([None if i % 3 == 0 else i / 7 for i in n], pa.float64()),
            "flag": pa.array([None if i % 4 == 0 else i % 2 == 0 for i in n]),
            "blob": pa.array([bytes([i % 256]) * (i % 5) for i in n], pa.binary()),
            "notes": pa.array([f"n{i}" for i in n], pa.large_string()),
            "codes": pa.array(
                [None if i % 6 == 0 else [f"c{i}", None, "x"][: i % 4] for i in n], pa.list_(pa.string())
            ),
            "visit": pa.array(
                [None if i % 9 == 0 else {"room": i % 40, "tags": [i, None]} for i in n],
                pa.struct([("room", pa.int16()), ("tags", pa.list_(pa.int32()))]),
            ),
            "labs": pa.array(
                [None if i % 8 == 0 else [("hb", i % 17), ("wbc", None)] for i in n], pa.map_(pa.string(), pa.int64())
            ),
        }
    )


def assert_same(actual: pa.Table, expected: pa.Table) -> None:
    assert actual.schema.equals(expected.schema, check_metadata=False), f"{actual.schema}\nvs\n{expected.schema}"
    assert actual.equals(expected)
    assert pm.BINDING_KEY not in (actual.schema.metadata or {})


def write(path: Path, table: pa.Table, key: bytes | DatasetKeyring = KEY, **kwargs: object) -> pm.EncryptedParquetInfo:
    return write_encrypted_parquet(table, path, key, KEY_ID, DATASET, **kwargs)


def read(path: Path, key: bytes | DatasetKeyring = KEY, **kwargs: object) -> pa.Table:
    return read_encrypted_parquet(path, key, KEY_ID, DATASET, **kwargs)


# -- round trips ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["table", "reader", "batches"])
def test_round_trip_is_exact_and_the_info_describes_the_file(tmp_path, kind):
    table = rich_table()
    source: object = {
        "table": table,
        "reader": pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=70)),
        "batches": iter(table.to_batches(max_chunksize=70)),
    }[kind]
    path = tmp_path / "part.parquet"
    info = write_encrypted_parquet(source, path, KEY, KEY_ID, DATASET, row_group_rows=250)  # type: ignore[arg-type]
    data = path.read_bytes()
    assert (info.size, info.sha256, info.rows) == (len(data), hashlib.sha256(data).hexdigest(), table.num_rows)
    assert info.row_groups == 3 and info.schema.equals(table.schema)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert_same(read(path), table)
    assert_same(read_encrypted_parquet_dataset([path], KEY, KEY_ID, DATASET), table)
    assert_same(read(path, columns=["visit", "id"]), table.select(["visit", "id"]))
    assert not [item for item in tmp_path.iterdir() if item.name != "part.parquet"], "no temporary files left"


def test_empty_table_and_empty_batches(tmp_path):
    schema = rich_table().schema
    info = write_encrypted_parquet(iter([]), tmp_path / "e.parquet", KEY, KEY_ID, DATASET, schema=schema)
    assert info.rows == 0 and info.row_groups == 0
    assert_same(read(tmp_path / "e.parquet"), schema.empty_table())


def test_the_recorded_schema_is_what_parquet_gives_back(tmp_path):
    """Parquet has no seconds timestamps or date64; the info (and so the manifest) says what a reader really gets."""
    table = pa.table(
        {
            "t": pa.array([dt.datetime(2026, 1, 1, 12, tzinfo=dt.UTC)], pa.timestamp("s")),
            "d": pa.array([0], pa.date64()),
        }
    )
    info = write(tmp_path / "p.parquet", table)
    assert str(info.schema.field("t").type) == "timestamp[ms]" and str(info.schema.field("d").type) == "date32[day]"
    back = read(tmp_path / "p.parquet")
    assert back.schema.equals(info.schema) and back.cast(table.schema).equals(table)


def test_input_schema_metadata_survives_and_the_binding_does_not_leak(tmp_path):
    table = pa.table({"a": [1, 2]}).replace_schema_metadata({"pandas": "{}", "owner": "x"})
    write(tmp_path / "m.parquet", table)
    assert read(tmp_path / "m.parquet").schema.metadata == {b"pandas": b"{}", b"owner": b"x"}


# -- what the writer produces ----------------------------------------------------------------------------------------


def key_material(path: Path) -> dict[str, object]:
    data = path.read_bytes()
    footer = struct.unpack("<I", data[-8:-4])[0]
    crypto = data[-8 - footer : -8]
    start = crypto.index(b'{"keyMaterialType"')
    return json.JSONDecoder().raw_decode(crypto[start:].decode("ascii", "replace"))[0]


def test_the_file_is_aes_gcm_v1_with_an_encrypted_footer_and_a_256_bit_data_key(tmp_path):
    path = tmp_path / "f.parquet"
    write(path, rich_table(50))
    data = path.read_bytes()
    assert data[:4] == data[-4:] == b"PARE"
    footer = struct.unpack("<I", data[-8:-4])[0]
    assert pm._algorithm(data[-8 - footer :]) == "AES_GCM_V1"
    material = key_material(path)
    assert material["masterKeyID"] == f"confnb/{DATASET}/{KEY_ID}" and material["doubleWrapping"] is False
    # The data key is wrapped under the dataset key itself: open it by hand, with the documented associated data.
    wrapped = base64.b64decode(str(material["wrappedDEK"]).removeprefix("confnb1:"))
    aad = json.dumps(
        ["confnb-parquet-key-wrap/1", material["masterKeyID"], DATASET, KEY_ID], separators=(",", ":")
    ).encode()
    assert len(AESGCM(KEY).decrypt(wrapped[:12], wrapped[12:], aad)) == 32
    with pytest.raises(OSError, match="Could not read encrypted metadata"):
        pq.read_table(path)  # nothing readable without the key


@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "column-keys (pyarrow 20)"])
def test_no_plaintext_in_the_file_whatever_the_key_layout(tmp_path, monkeypatch, uniform):
    """pyarrow 20 lacks uniform encryption; its fallback lists every leaf column, nested ones included."""
    if uniform and not pm._HAS_UNIFORM:
        pytest.skip("this pyarrow has no uniform encryption")
    monkeypatch.setattr(pm, "_HAS_UNIFORM", uniform)
    marker = "PLAINTEXT-MARKER"
    table = pa.table(
        {
            "s": [f"{marker}-s{i}" for i in range(50)],
            "nested": [{"inner": [f"{marker}-n{i}"]} for i in range(50)],
            "m": [[(f"{marker}-k{i}", f"{marker}-v{i}")] for i in range(50)],
            "dotted.name": [f"{marker}-d{i}" for i in range(50)],
        },
        schema=pa.schema(
            [
                ("s", pa.string()),
                ("nested", pa.struct([("inner", pa.list_(pa.string()))])),
                ("m", pa.map_(pa.string(), pa.string())),
                ("dotted.name", pa.string()),
            ]
        ),
    )
    path = tmp_path / "c.parquet"
    write(path, table, compression=None)
    assert marker.encode() not in path.read_bytes()
    assert_same(read(path), table)


def test_the_writer_configuration_cannot_be_ctr_or_plaintext_footer():
    config = pm._encryption_configuration("confnb/a/b", pa.schema([("a", pa.int8())]), double_wrapping=False)
    assert config.encryption_algorithm == "AES_GCM_V1" and config.plaintext_footer is False
    assert config.data_key_length_bits == 256 and config.internal_key_material is True


def test_a_failed_write_leaves_nothing_and_keeps_an_old_file(tmp_path):
    path = tmp_path / "part.parquet"
    path.write_bytes(b"old")
    table = rich_table(100)

    def batches():
        yield from table.to_batches(max_chunksize=40)[:2]
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_encrypted_parquet(batches(), path, KEY, KEY_ID, DATASET, schema=table.schema, row_group_rows=10)
    assert path.read_bytes() == b"old" and [item.name for item in tmp_path.iterdir()] == ["part.parquet"]


# -- tampering, wrong keys, foreign files -----------------------------------------------------------------------------


@pytest.fixture
def written(tmp_path) -> tuple[Path, pa.Table]:
    table = rich_table(300)
    path = tmp_path / "part.parquet"
    write(path, table, compression=None)
    return path, table


def test_wrong_dataset_key_is_an_integrity_error_naming_the_file(written):
    path, _ = written
    with pytest.raises(IntegrityError, match=r"part\.parquet: the dataset key of 'claims'.*wrong key") as caught:
        read(path, OTHER_KEY)
    assert "\n" not in str(caught.value) and KEY.hex() not in str(caught.value)
    with pytest.raises(IntegrityError, match="wrong key"):
        read_encrypted_parquet_dataset([path], OTHER_KEY, KEY_ID, DATASET)


@pytest.mark.parametrize(
    ("dataset_id", "key_id", "name"),
    [("other", KEY_ID, None), (DATASET, "k-2025", None), (DATASET, KEY_ID, "part-0001.parquet")],
    ids=["dataset", "key-id", "name"],
)
def test_a_file_read_as_another_dataset_key_or_name_is_refused(written, dataset_id, key_id, name):
    path, _ = written
    keyring = DatasetKeyring()
    keyring.add(DATASET, KEY_ID, KEY)
    keyring.add(dataset_id, key_id, KEY)  # even with the right key at hand, the file is bound to its place
    with pytest.raises(IntegrityError, match=r"is file 'part\.parquet' of dataset 'claims'"):
        read_encrypted_parquet(path, keyring, key_id, dataset_id, name=name)


def test_files_swapped_within_a_dataset_are_refused(tmp_path):
    first, second = tmp_path / "part-0000.parquet", tmp_path / "part-0001.parquet"
    write(first, pa.table({"a": [1, 2]}))
    write(second, pa.table({"a": [3]}))
    swap = tmp_path / "swap"
    first.rename(swap)
    second.rename(first)
    swap.rename(second)
    with pytest.raises(IntegrityError, match=r"part-0000\.parquet: is file 'part-0001\.parquet'"):
        read_encrypted_parquet_dataset([first, second], KEY, KEY_ID, DATASET)


def flipped(path: Path, position: int, target: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x04
    target.write_bytes(bytes(data))
    return target


def test_a_flipped_bit_in_page_data_or_footer_is_an_integrity_error(written, tmp_path):
    path, _ = written
    size = path.stat().st_size
    footer = struct.unpack("<I", path.read_bytes()[-8:-4])[0]
    keyring = DatasetKeyring()
    keyring.add(DATASET, KEY_ID, KEY)
    metadata = pq.ParquetFile(path, decryption_properties=keyring.decryption_properties()).metadata
    column = metadata.row_group(0).column(0)
    page = column.data_page_offset + column.total_compressed_size // 2
    for where, position in {"page data": page, "encrypted footer": size - 8 - footer // 3}.items():
        with pytest.raises(IntegrityError, match=r"part\.parquet\.x: does not decrypt") as caught:
            read(flipped(path, position, tmp_path / "part.parquet.x"), name="part.parquet")
        assert "\n" not in str(caught.value), where


def test_every_bit_flip_is_refused_or_changes_nothing(tmp_path):
    """A sweep over the whole file: a flip either fails to read, or lands in the key material's KMS instance id or
    URL, which confnb ignores by design (and the manifest's SHA-256 covers), and then the table is unchanged."""
    table = rich_table(40)
    path = tmp_path / "part.parquet"
    write(path, table, compression=None)
    data = path.read_bytes()
    ignored: set[int] = set()
    for field in (b'"kmsInstanceID":"', b'"kmsInstanceURL":"'):
        start = data.index(field) + len(field)
        ignored.update(range(start, data.index(b'"', start)))
    keyring = DatasetKeyring()
    keyring.add(DATASET, KEY_ID, KEY)
    target = tmp_path / "part.parquet.x"
    unchanged = []
    for position in [*range(0, len(data), 23), *range(len(data) - 500, len(data))]:
        try:
            back = read(flipped(path, position, target), keyring, name="part.parquet")
        except (IntegrityError, DatasetFormatError):
            continue
        assert back.equals(table), f"flip at {position} changed the data silently"
        unchanged.append(position)
    assert set(unchanged) <= ignored, sorted(set(unchanged) - ignored)


@pytest.mark.parametrize("cut", [1, 8, 100, 5000])
def test_truncation_is_refused(written, tmp_path, cut):
    path, _ = written
    short = tmp_path / "short.parquet"
    short.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(IntegrityError, match=r"short\.parquet"):
        read(short, name="part.parquet")


def test_a_ctr_file_is_refused_by_name_even_with_the_right_key(tmp_path):
    keyring = DatasetKeyring()
    identifier = keyring.add(DATASET, KEY_ID, KEY)
    table = pa.table({"a": [1, 2, 3]})
    schema = table.schema.with_metadata({pm.BINDING_KEY: pm._binding(DATASET, KEY_ID, "ctr.parquet")})
    config = pe.EncryptionConfiguration(
        footer_key=identifier, column_keys={identifier: ["a"]}, encryption_algorithm="AES_GCM_CTR_V1"
    )
    properties = keyring.crypto_factory().file_encryption_properties(pm._kms_connection(), config)
    pq.write_table(table.cast(schema), tmp_path / "ctr.parquet", encryption_properties=properties)
    # pyarrow itself would read it, tampered pages included: the refusal is confnb's.
    assert pq.read_table(tmp_path / "ctr.parquet", decryption_properties=keyring.decryption_properties()).num_rows == 3
    with pytest.raises(DatasetFormatError, match=r"ctr\.parquet: encrypted with AES_GCM_CTR_V1, which does not"):
        read(tmp_path / "ctr.parquet", keyring)
    with pytest.raises(DatasetFormatError, match="AES_GCM_CTR_V1"):
        read_encrypted_parquet_dataset([tmp_path / "ctr.parquet"], keyring, KEY_ID, DATASET)


def test_a_plaintext_file_is_refused_even_with_a_forged_binding(tmp_path):
    """pyarrow's key-management reader accepts plaintext files; confnb must not."""
    keyring = DatasetKeyring()
    keyring.add(DATASET, KEY_ID, KEY)
    binding = pm._binding(DATASET, KEY_ID, "part.parquet")
    pq.write_table(
        pa.table({"a": [6, 6, 6]}).replace_schema_metadata({pm.BINDING_KEY: binding}), tmp_path / "part.parquet"
    )
    assert pq.read_table(tmp_path / "part.parquet", decryption_properties=keyring.decryption_properties()).num_rows == 3
    with pytest.raises(IntegrityError, match=r"part\.parquet: its Parquet footer is not encrypted"):
        read(tmp_path / "part.parquet", keyring)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(IntegrityError, match="not a Parquet file with an encrypted footer"):
        read(tmp_path / "junk.parquet", name="part.parquet")
    (tmp_path / "empty.parquet").write_bytes(b"")
    with pytest.raises(IntegrityError, match="too short"):
        read(tmp_path / "empty.parquet")


def test_a_kms_url_in_the_file_is_never_used_or_contacted(tmp_path, monkeypatch):
    keyring = DatasetKeyring()
    identifier = keyring.add(DATASET, KEY_ID, KEY)
    hostile = "https://kms.attacker.example:8443/v1/unwrap"
    table = pa.table({"a": [1, 2, 3]})
    schema = table.schema.with_metadata({pm.BINDING_KEY: pm._binding(DATASET, KEY_ID, "part.parquet")})
    config = pe.EncryptionConfiguration(footer_key=identifier, column_keys={identifier: ["a"]}, double_wrapping=False)
    properties = keyring.crypto_factory().file_encryption_properties(
        pe.KmsConnectionConfig(kms_instance_id="attacker", kms_instance_url=hostile), config
    )
    pq.write_table(table.cast(schema), tmp_path / "part.parquet", encryption_properties=properties)
    assert key_material(tmp_path / "part.parquet")["kmsInstanceURL"] == hostile

    seen: list[tuple[str, str]] = []
    original = DatasetKeyring.kms_client

    def recording(self: DatasetKeyring, connection: object) -> object:
        seen.append((connection.kms_instance_id, connection.kms_instance_url))  # type: ignore[attr-defined]
        return original(self, connection)

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network used: {args}")

    monkeypatch.setattr(DatasetKeyring, "kms_client", recording)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    fresh = DatasetKeyring()  # a new factory, so pyarrow asks for a client again
    fresh.add(DATASET, KEY_ID, KEY)
    assert_same(read(tmp_path / "part.parquet", fresh), table)
    assert seen and all(url == pm._KMS_INSTANCE_URL and instance == pm._KMS_INSTANCE_ID for instance, url in seen)
    if pm._HAS_READ_KMS_URL:
        assert pm._decryption_configuration().read_kms_url is False


# -- keyring, threads, KMS cost ---------------------------------------------------------------------------------------


def test_keyring_refuses_a_second_key_under_one_identifier_and_shows_no_key():
    keyring = DatasetKeyring()
    assert keyring.add(DATASET, KEY_ID, KEY) == keyring.add(DATASET, KEY_ID, bytearray(KEY))
    with pytest.raises(ValueError, match="different key is already held"):
        keyring.add(DATASET, KEY_ID, OTHER_KEY)
    with pytest.raises(ValueError, match="32 bytes"):
        keyring.add(DATASET, "k2", b"short")
    with pytest.raises(ValueError, match="dataset id"):
        keyring.add("a/b", KEY_ID, KEY)
    with pytest.raises(ValueError, match="key id"):
        keyring.add(DATASET, "k:1", KEY)
    assert KEY.hex() not in repr(keyring) and repr(KEY) not in repr(keyring) and len(keyring) == 1
    with pytest.raises(ValueError, match="holds no key"):
        read_encrypted_parquet("x.parquet", keyring, "k9", DATASET)


def test_a_dropped_keyring_and_its_keys_are_freed(tmp_path):
    """Arrow's C++ factory keeps the client factory and clients alive where Python's garbage collector cannot see;
    strong references back to the keyring would keep every keyring, and its dataset keys, in memory for good."""
    write(tmp_path / "part.parquet", pa.table({"a": [1]}))
    references = []
    for _ in range(3):
        keyring = DatasetKeyring()
        keyring.add(DATASET, KEY_ID, KEY)
        read(tmp_path / "part.parquet", keyring)
        references.append(weakref.ref(keyring))
        del keyring
    gc.collect()
    assert [reference() for reference in references] == [None, None, None]


def test_one_keyring_serves_concurrent_reads_and_writes(tmp_path):
    keyring = DatasetKeyring()
    keyring.add(DATASET, KEY_ID, KEY)
    tables = [rich_table(200 + 10 * index) for index in range(6)]
    paths = [tmp_path / f"part-{index:04d}.parquet" for index in range(6)]
    with ThreadPoolExecutor(6) as pool:
        list(
            pool.map(lambda pair: write(pair[0], pair[1], keyring, row_group_rows=64), zip(paths, tables, strict=True))
        )
    barrier = threading.Barrier(6)

    def load(index: int) -> bool:
        barrier.wait()
        return all(read(paths[index], keyring).equals(tables[index]) for _ in range(4))

    with ThreadPoolExecutor(6) as pool:
        assert all(pool.map(load, range(6)))
        together = pool.submit(read_encrypted_parquet_dataset, paths, keyring, KEY_ID, DATASET).result()
    assert together.equals(pa.concat_tables(tables))
    assert keyring.calls.wraps == 6 or not pm._HAS_UNIFORM


@NEEDS_UNIFORM
def test_kms_cost_is_one_unwrap_per_file(tmp_path):
    keyring = DatasetKeyring()
    keyring.add(DATASET, KEY_ID, KEY)
    paths = [tmp_path / f"part-{index:04d}.parquet" for index in range(3)]
    for index, path in enumerate(paths):
        write(path, pa.table({"a": [index] * 10}), keyring)
    assert keyring.calls.wraps == 3  # one data key per file, wrapped directly under the dataset key
    before = keyring.calls.unwraps  # the writer's own check of each file decrypted its footer once
    selected = read_encrypted_parquet_dataset(paths, keyring, KEY_ID, DATASET, columns=["a"], filter=ds.field("a") > 0)
    assert selected.column("a").to_pylist() == [1] * 10 + [2] * 10
    assert keyring.calls.unwraps - before == 3
    read(paths[0], keyring)
    assert keyring.calls.unwraps - before == 4


def test_double_wrapped_files_cost_one_unwrap_per_cache_lifetime_and_forget_ends_it(tmp_path):
    writer = DatasetKeyring()
    writer.add(DATASET, KEY_ID, KEY)
    paths = [tmp_path / f"part-{index:04d}.parquet" for index in range(3)]
    for index, path in enumerate(paths):
        write(path, pa.table({"a": [index]}), writer, double_wrapping=True)
    assert writer.calls.wraps == 1 and key_material(paths[0])["doubleWrapping"] is True
    reader = DatasetKeyring()
    reader.add(DATASET, KEY_ID, KEY)
    for _ in range(3):
        assert read_encrypted_parquet_dataset(paths, reader, KEY_ID, DATASET).num_rows == 3
    assert reader.calls.unwraps == 1
    assert reader.forget(DATASET, KEY_ID) and not reader.holds(DATASET, KEY_ID)
    with pytest.raises(ValueError, match="holds no key"):
        read_encrypted_parquet_dataset(paths, reader, KEY_ID, DATASET)
    reader.add(DATASET, KEY_ID, KEY)  # released again: the cached key-encryption key went with forget()
    read_encrypted_parquet_dataset(paths, reader, KEY_ID, DATASET)
    assert reader.calls.unwraps == 2


def test_the_dataset_reader_checks_every_schema(tmp_path):
    write(tmp_path / "a.parquet", pa.table({"a": [1]}))
    write(tmp_path / "b.parquet", pa.table({"a": ["x"]}))
    with pytest.raises(DatasetFormatError, match=r"b\.parquet: its schema differs"):
        read_encrypted_parquet_dataset([tmp_path / "a.parquet", tmp_path / "b.parquet"], KEY, KEY_ID, DATASET)
    with pytest.raises(ValueError, match="no files"):
        read_encrypted_parquet_dataset([], KEY, KEY_ID, DATASET)


# -- the owner's pipeline ---------------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path) -> OwnerStore:
    return OwnerStore.create(tmp_path / "owner")


def test_owner_round_trip_in_parquet(tmp_path, store):
    table = rich_table(500)
    source = tmp_path / "in.parquet"
    pq.write_table(table, source, row_group_size=128)
    dataset = encrypt_dataset(source, tmp_path / "out", store, DATASET, POLICY, format="parquet")
    assert dataset.manifest.format == PARQUET_FORMAT == "parquet-pme-aes-gcm-v1"
    assert sorted(item.name for item in dataset.directory.iterdir()) == [
        "manifest.json",
        "manifest.sig",
        PARQUET_PART_NAME,
    ]
    verified = verify_dataset(dataset.directory, store.owner_public_key)
    assert_same(read_verified(verified, store.dataset_key(DATASET)), table)
    assert decrypt_dataset(dataset.directory, store, tmp_path / "back.parquet") == 500
    assert pq.read_table(tmp_path / "back.parquet").equals(table)
    with pytest.raises(IntegrityError, match="wrong key"):
        read_verified(verified, OTHER_KEY)


def test_owner_parquet_tampering_and_failure(tmp_path, store):
    dataset = encrypt_dataset(
        pa.table({"a": list(range(50))}), tmp_path / "out", store, DATASET, POLICY, format="parquet"
    )
    part = dataset.directory / PARQUET_PART_NAME
    verified = verify_dataset(dataset.directory, store.owner_public_key)
    shutil.copy(part, tmp_path / "saved")
    flipped(tmp_path / "saved", os.path.getsize(part) // 2, part)
    with pytest.raises(DatasetIntegrityError, match="SHA-256 mismatch"):
        verify_dataset(dataset.directory, store.owner_public_key)
    with pytest.raises(IntegrityError, match=r"part-0000\.parquet"):  # changed after it was verified
        read_verified(verified, store.dataset_key(DATASET))
    with pytest.raises(Exception, match="format 'csv'"):
        encrypt_dataset(pa.table({"a": [1]}), tmp_path / "x", store, "x", POLICY, format="csv")  # type: ignore[arg-type]
    assert not (tmp_path / "x").exists() and store.dataset("x") is None


@pytest.mark.parametrize("output", ["arrow", "parquet"])
def test_a_parquet_input_with_a_map_column_gives_a_verifiable_dataset(tmp_path, store, output):
    """pyarrow names a map's entries after the column when reading Parquet (``map<string, int64 ('labs')>``); the
    manifest's field list must describe the schema as its IPC bytes give it back, or verification fails."""
    table = pa.table({"labs": pa.array([[("hb", 1)], None], pa.map_(pa.string(), pa.int64())), "n": [1, 2]})
    pq.write_table(table, tmp_path / "in.parquet")
    dataset = encrypt_dataset(tmp_path / "in.parquet", tmp_path / "out", store, DATASET, POLICY, format=output)
    verified = verify_dataset(dataset.directory, store.owner_public_key)
    assert read_verified(verified, store.dataset_key(DATASET)).equals(table)
