"""Encrypted Arrow IPC files: exact round trips of Arrow types, zero-copy loading, atomic writes, tamper detection,
the low-memory batch iterator, and interoperability with stock Tink + Arrow."""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import io
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confnb.datasets import streaming_aead as sa
from confnb.datasets.errors import DatasetFormatError, IntegrityError
from confnb.datasets.ipc import (
    EncryptedFileInfo,
    iter_encrypted_ipc_batches,
    read_encrypted_ipc,
    write_encrypted_ipc,
)
from tests.confnb.datasets._helpers import AAD, KEY, NonClosingBytesIO, tink_keyset

SEG = sa.Parameters(segment_size=4096)  # small segments: a table of tens of kilobytes spans many of them


def rich_table(rows: int = 240) -> pa.Table:
    """One column per kind of Arrow type a dataset is likely to hold, with nulls wherever the type allows them."""
    n = range(rows)
    berlin = dt.timezone(dt.timedelta(hours=1))
    struct_type = pa.struct([("code", pa.int16()), ("label", pa.string())])
    columns: dict[str, pa.Array] = {
        "int64": pa.array([None if i % 7 == 0 else i * 1_000_003 for i in n], pa.int64()),
        "int8": pa.array([i % 128 - 64 for i in n], pa.int8()),
        "uint32": pa.array([i * 17 for i in n], pa.uint32()),
        "float64": pa.array([None if i % 11 == 0 else (float("nan") if i % 13 == 0 else i / 3) for i in n]),
        "float32": pa.array([i * 0.5 for i in n], pa.float32()),
        "bool": pa.array([None if i % 5 == 0 else i % 2 == 0 for i in n]),
        "string": pa.array([None if i % 9 == 0 else ("" if i % 10 == 0 else f"naïve-ß-{i}-🙂") for i in n]),
        "large_string": pa.array([f"row {i} " * (i % 4) for i in n], pa.large_string()),
        "binary": pa.array([bytes([i % 256]) * (i % 5) for i in n], pa.binary()),
        "fixed_binary": pa.array([i.to_bytes(4, "big") for i in n], pa.binary(4)),
        "dictionary": pa.array([None if i % 8 == 0 else ("north", "south", "east", "west")[i % 4] for i in n])
        .dictionary_encode(),
        "timestamp_tz": pa.array([dt.datetime(2026, 3, 29, 1, 30, tzinfo=berlin) + dt.timedelta(minutes=i) for i in n],
                                 pa.timestamp("us", tz="Europe/Berlin")),
        "timestamp_utc_ns": pa.array([i * 1_000_000_007 for i in n], pa.timestamp("ns", tz="UTC")),
        "date32": pa.array([dt.date(2026, 1, 1) + dt.timedelta(days=i) for i in n], pa.date32()),
        "time64": pa.array([i * 1_000_000 for i in n], pa.time64("us")),
        "duration": pa.array([i for i in n], pa.duration("ms")),
        "decimal128": pa.array([None if i % 6 == 0 else decimal.Decimal(f"{i}.{i % 10000:04d}") for i in n],
                               pa.decimal128(18, 4)),
        "decimal256": pa.array([decimal.Decimal(f"-{i}12345678901234567890.{i:010d}") for i in n],
                               pa.decimal256(40, 10)),
        "list": pa.array([None if i % 10 == 3 else [j if j % 3 else None for j in range(i % 5)] for i in n],
                         pa.list_(pa.int64())),
        "large_list": pa.array([[f"x{j}" for j in range(i % 3)] for i in n], pa.large_list(pa.string())),
        "struct": pa.array([None if i % 12 == 0 else {"code": i % 300, "label": None if i % 4 else f"L{i}"} for i in n],
                           struct_type),
        "list_of_struct": pa.array([[{"code": j, "label": str(j)} for j in range(i % 3)] for i in n],
                                   pa.list_(struct_type)),
        "map": pa.array([[("k", i), ("v", None)] if i % 2 else [] for i in n], pa.map_(pa.string(), pa.int32())),
    }  # fmt: skip
    schema = pa.schema(
        [pa.field(name, array.type, metadata={"column": name}) for name, array in columns.items()],
        metadata={"dataset": "claims", "owner": "data-owner@example.org"},
    )
    return pa.Table.from_arrays(list(columns.values()), schema=schema)


def assert_same(result: pa.Table, expected: pa.Table) -> None:
    """Equal data, schema and metadata; NaN counts as equal to NaN (Arrow's ``equals`` says NaN != NaN)."""
    assert result.schema.equals(expected.schema, check_metadata=True)
    assert result.num_rows == expected.num_rows
    for name in expected.column_names:
        got, want = result.column(name), expected.column(name)
        if pa.types.is_floating(want.type):
            assert pc.is_nan(got).equals(pc.is_nan(want))
            got, want = pc.if_else(pc.is_nan(got), 0.0, got), pc.if_else(pc.is_nan(want), 0.0, want)
        assert got.equals(want), name


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return rich_table()


def write(tmp_path: Path, source: Any, name: str = "part-0.arrows", **kwargs: Any) -> tuple[Path, EncryptedFileInfo]:
    path = tmp_path / name
    kwargs.setdefault("params", SEG)
    return path, write_encrypted_ipc(source, path, KEY, AAD, **kwargs)


def read(path: Path, **kwargs: Any) -> pa.Table:
    kwargs.setdefault("params", SEG)
    return read_encrypted_ipc(path, KEY, AAD, **kwargs)


def batches(path: Path, key: bytes = KEY, aad: bytes = AAD, params: sa.Parameters = SEG) -> list[pa.RecordBatch]:
    return list(iter_encrypted_ipc_batches(path, key, aad, params=params))


# ------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("threads", [1, 2, 5, None])
def test_round_trip_of_every_type(tmp_path: Path, table: pa.Table, threads: int | None) -> None:
    source = pa.Table.from_batches(table.to_batches(max_chunksize=50))  # several record batches
    path, info = write(tmp_path, source)
    assert info.size > 10 * SEG.segment_size  # many segments
    result = read(path, threads=threads)
    assert_same(result, source)
    assert result.schema.metadata == {b"dataset": b"claims", b"owner": b"data-owner@example.org"}
    assert str(result.schema.field("timestamp_tz").type) == "timestamp[us, tz=Europe/Berlin]"


def test_batches_come_back_as_written(tmp_path: Path, table: pa.Table) -> None:
    written = table.to_batches(max_chunksize=64)
    path, info = write(tmp_path, iter(written))
    received = batches(path)
    assert [b.num_rows for b in received] == [64, 64, 64, 48]
    for got, want in zip(received, written, strict=True):
        assert_same(pa.Table.from_batches([got]), pa.Table.from_batches([want]))
    assert info.rows == table.num_rows


def test_file_info_describes_the_file(tmp_path: Path, table: pa.Table) -> None:
    path, info = write(tmp_path, table)
    data = path.read_bytes()
    assert info.size == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert info.plaintext_size == sa.plaintext_size(len(data), SEG)
    assert info.rows == 240


def test_empty_table_and_empty_batch_sources(tmp_path: Path, table: pa.Table) -> None:
    empty = table.schema.empty_table()
    path, info = write(tmp_path, empty)
    assert info.rows == 0
    assert_same(read(path), empty)
    assert batches(path) == []
    path, _ = write(tmp_path, [], name="none.arrows", schema=table.schema)
    assert_same(read(path), empty)
    with pytest.raises(ValueError, match="schema="):
        write(tmp_path, [], name="unknown.arrows")


def test_record_batch_reader_and_generator_sources(tmp_path: Path, table: pa.Table) -> None:
    reader = pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=100))
    path, info = write(tmp_path, reader)
    assert info.rows == 240
    assert_same(read(path), table)

    def generate() -> Iterator[pa.RecordBatch]:
        yield from table.to_batches(max_chunksize=30)

    path, _ = write(tmp_path, generate(), name="gen.arrows")
    assert_same(read(path), table)


def test_dictionaries_that_change_between_batches(tmp_path: Path) -> None:
    column = pa.chunked_array(
        [pa.array(["a", "b", None, "a"]).dictionary_encode(), pa.array(["z", "y", "z"]).dictionary_encode()]
    )
    source = pa.table({"d": column})
    path, _ = write(tmp_path, source)
    assert read(path).column("d").to_pylist() == ["a", "b", None, "a", "z", "y", "z"]
    assert [b.column(0).to_pylist() for b in batches(path)] == [["a", "b", None, "a"], ["z", "y", "z"]]


def test_real_1mib_segments_and_zero_copy(tmp_path: Path) -> None:
    """The real format over several segments; the loaded columns point into one buffer of the plaintext's size."""
    rows = 300_000
    source = pa.table(
        {
            "id": pa.array(range(rows), pa.int64()),
            "value": pa.array([None if i % 97 == 0 else i * 0.25 for i in range(rows)]),
            "name": pa.array([f"user-{i}" for i in range(rows)]),
        }
    )
    path = tmp_path / "big.arrows"
    info = write_encrypted_ipc(source.to_batches(max_chunksize=65_536), path, KEY, AAD, schema=source.schema)
    assert info.size > 3 * (1 << 20)
    allocated = pa.total_allocated_bytes()
    result = read_encrypted_ipc(path, KEY, AAD, threads=2)
    grown = pa.total_allocated_bytes() - allocated
    assert result.equals(source)
    assert info.plaintext_size <= grown <= info.plaintext_size + 4096  # one allocation: the decrypted stream
    spans = [
        (buffer.address, buffer.address + buffer.size)
        for column in result.columns
        for chunk in column.chunks
        for buffer in chunk.buffers()
        if buffer is not None and buffer.size
    ]
    assert max(end for _, end in spans) - min(start for start, _ in spans) <= info.plaintext_size
    assert sum(b.num_rows for b in iter_encrypted_ipc_batches(path, KEY, AAD)) == rows


def test_stream_that_ends_exactly_on_a_segment_boundary(tmp_path: Path, table: pa.Table) -> None:
    _, info = write(tmp_path, table)
    virtual = info.plaintext_size + 40  # the header takes the first 40 bytes of segment 0
    divisors = [k for k in range(1, virtual) if virtual % k == 0 and 100 <= virtual // k + 16 <= 2000]
    params = sa.Parameters(segment_size=virtual // divisors[0] + 16)
    path, exact = write(tmp_path, table, name="exact.arrows", params=params)
    assert exact.size % params.segment_size == 0
    assert_same(read(path, params=params), table)
    assert_same(pa.Table.from_batches(batches(path, params=params), table.schema), table)


# ------------------------------------------------------------------------------------------------- writing safely


def test_files_are_private_by_default(tmp_path: Path, table: pa.Table) -> None:
    path, _ = write(tmp_path, table)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path, _ = write(tmp_path, table, name="shared.arrows", mode=0o644)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path: Path, table: pa.Table) -> None:
    path, _ = write(tmp_path, table)
    before = path.read_bytes()

    def failing() -> Iterator[pa.RecordBatch]:
        yield from table.to_batches(max_chunksize=100)[:2]
        raise RuntimeError("source went away")

    with pytest.raises(RuntimeError, match="source went away"):
        write(tmp_path, failing(), schema=table.schema)
    assert path.read_bytes() == before
    with pytest.raises(RuntimeError):
        write(tmp_path, failing(), name="new.arrows", schema=table.schema)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-0.arrows"]


def test_batches_that_do_not_match_the_schema(tmp_path: Path, table: pa.Table) -> None:
    other = pa.record_batch({"x": [1, 2]})
    with pytest.raises(ValueError, match="schema"):
        write(tmp_path, [table.to_batches()[0], other])
    with pytest.raises(ValueError, match="does not match"):
        write(tmp_path, table, schema=other.schema)
    with pytest.raises(TypeError, match="RecordBatch"):
        write(tmp_path, other)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------- failures


@pytest.fixture
def encrypted(tmp_path: Path, table: pa.Table) -> Path:
    path, _ = write(tmp_path, pa.Table.from_batches(table.to_batches(max_chunksize=40)))
    return path


def load_all_ways(path: Path, key: bytes = KEY, aad: bytes = AAD) -> list[type[BaseException]]:
    """The exception type each reader raises (both must raise)."""
    raised = []
    for load in (lambda: read_encrypted_ipc(path, key, aad, params=SEG), lambda: batches(path, key, aad)):
        with pytest.raises((IntegrityError, DatasetFormatError)) as caught:
            load()
        assert "\n" not in str(caught.value) and key.hex() not in str(caught.value)
        raised.append(type(caught.value))
    return raised


def test_wrong_key_and_associated_data(encrypted: Path) -> None:
    path = encrypted
    assert load_all_ways(path, key=bytes(32)) == [IntegrityError, IntegrityError]
    assert load_all_ways(path, aad=b"dataset=claims;file=part-1.arrows") == [IntegrityError, IntegrityError]


def test_truncation_and_extension(encrypted: Path) -> None:
    path, data = encrypted, encrypted.read_bytes()
    size = SEG.segment_size
    variants = {
        "empty": b"",
        "header only": data[:40],
        "at a segment boundary": data[: 3 * size],
        "mid-segment": data[: 3 * size + 1000],
        "last tag cut": data[:-5],
        "dropped middle segment": data[: 2 * size] + data[3 * size :],
        "swapped segments": data[:size] + data[2 * size : 3 * size] + data[size : 2 * size] + data[3 * size :],
        "appended bytes": data + b"\x00" * 20,
        "appended segment": data + data[size : 2 * size],
    }
    for name, variant in variants.items():
        path.write_bytes(variant)
        assert load_all_ways(path) == [IntegrityError, IntegrityError], name


def test_appended_segment_from_another_file(tmp_path: Path, table: pa.Table) -> None:
    first, _ = write(tmp_path, table, name="a.arrows")
    second, _ = write(tmp_path, table.slice(0, 100), name="b.arrows")
    data, other = first.read_bytes(), second.read_bytes()
    full = len(data) - len(data) % SEG.segment_size
    first.write_bytes(data[:full] + other[SEG.segment_size : 2 * SEG.segment_size])
    assert load_all_ways(first) == [IntegrityError, IntegrityError]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_property_bit_flips_are_integrity_errors(encrypted: Path, position: int, bit: int) -> None:
    path, data = encrypted, encrypted.read_bytes()
    tampered = bytearray(data)
    tampered[position % len(data)] ^= 1 << bit
    path.write_bytes(bytes(tampered))
    try:
        assert load_all_ways(path) == [IntegrityError, IntegrityError]
    finally:
        path.write_bytes(data)


def test_authentic_data_that_is_not_arrow(tmp_path: Path) -> None:
    path = tmp_path / "notes.arrows"
    with path.open("wb") as sink:
        sa.encrypt_stream(KEY, AAD, io.BytesIO(b"these are not the rows you are looking for" * 300), sink, params=SEG)
    assert load_all_ways(path) == [DatasetFormatError, DatasetFormatError]
    with pytest.raises(DatasetFormatError, match="not a valid Arrow IPC stream"):
        read(path)


def test_full_validation_catches_a_malformed_but_authentic_stream(tmp_path: Path) -> None:
    """A key holder can write structurally valid IPC whose strings are not UTF-8 (Arrow checks that only in full)."""
    raw = pa.array([b"\xff\xfe", b"ok"], pa.binary())
    bad = pa.StringArray.from_buffers(2, raw.buffers()[1], raw.buffers()[2])
    stream = pa.BufferOutputStream()
    with pa.ipc.new_stream(stream, pa.schema([("s", pa.string())])) as writer:
        writer.write_batch(pa.record_batch([bad], names=["s"]))
    path = tmp_path / "malformed.arrows"
    with path.open("wb") as sink:
        sa.encrypt_stream(KEY, AAD, [stream.getvalue().to_pybytes()], sink, params=SEG)
    assert read(path).num_rows == 2  # authentic, structurally fine: loads without the full check
    with pytest.raises(DatasetFormatError, match="UTF8"):
        read(path, validate=True)


def test_authentic_data_after_the_end_of_the_stream(tmp_path: Path, table: pa.Table) -> None:
    stream = pa.BufferOutputStream()
    with pa.ipc.new_stream(stream, table.schema) as writer:
        writer.write_table(table)
    path = tmp_path / "trailing.arrows"
    with path.open("wb") as sink:
        sa.encrypt_stream(KEY, AAD, [stream.getvalue().to_pybytes(), b"smuggled"], sink, params=SEG)
    assert load_all_ways(path) == [DatasetFormatError, DatasetFormatError]


def test_batches_before_a_truncation_are_yielded_then_the_iterator_raises(encrypted: Path, table: pa.Table) -> None:
    path, data = encrypted, encrypted.read_bytes()
    path.write_bytes(data[: 6 * SEG.segment_size])
    received: list[pa.RecordBatch] = []
    iterator = iter_encrypted_ipc_batches(path, KEY, AAD, window_segments=2, params=SEG)
    with pytest.raises(IntegrityError):
        received.extend(iterator)  # extend keeps what arrived before the exception
    assert 0 < len(received) < 6
    assert_same(pa.Table.from_batches(received), table.slice(0, sum(b.num_rows for b in received)))


def test_a_file_truncated_while_it_is_read_raises(encrypted: Path, table: pa.Table) -> None:
    """The layout is computed from the length when reading starts; segments no longer there are not read as short
    windows: the iterator fails, naming the truncation."""
    iterator = iter_encrypted_ipc_batches(encrypted, KEY, AAD, window_segments=2, threads=2, params=SEG)
    received = [next(iterator)]
    with encrypted.open("r+b") as handle:
        handle.truncate(4 * SEG.segment_size)
    with pytest.raises(IntegrityError, match="truncated while it was read"):
        received.extend(iterator)
    assert_same(pa.Table.from_batches(received), table.slice(0, sum(b.num_rows for b in received)))


@pytest.mark.parametrize(("window_segments", "threads"), [(1, 1), (3, 2), (1000, None)])
def test_batches_are_the_table_whatever_the_window(
    encrypted: Path, table: pa.Table, window_segments: int, threads: int | None
) -> None:
    """Batches inside one window are views into it, those straddling two are copied: the same table either way."""
    found = iter_encrypted_ipc_batches(
        encrypted, KEY, AAD, window_segments=window_segments, threads=threads, params=SEG
    )
    assert_same(pa.Table.from_batches(list(found)), table)


# ------------------------------------------------------------------------------------------------- Tink


def test_tink_decrypts_a_confnb_file_and_arrow_reads_it(tmp_path: Path, table: pa.Table, tink: Any) -> None:
    from tink import streaming_aead

    path = tmp_path / "part-0.arrows"
    write_encrypted_ipc(table, path, KEY, AAD)  # the real format
    primitive = tink_keyset(KEY).primitive(streaming_aead.StreamingAead)
    with path.open("rb") as source, primitive.new_decrypting_stream(source, AAD) as stream:
        plaintext = stream.read()
    assert_same(pa.ipc.open_stream(plaintext).read_all(), table)


def test_confnb_reads_a_file_tink_encrypted(tmp_path: Path, table: pa.Table, tink: Any) -> None:
    from tink import streaming_aead

    stream = pa.BufferOutputStream()
    with pa.ipc.new_stream(stream, table.schema) as writer:
        writer.write_table(table, max_chunksize=77)
    primitive = tink_keyset(KEY).primitive(streaming_aead.StreamingAead)
    sink = NonClosingBytesIO()
    with primitive.new_encrypting_stream(sink, AAD) as encrypting:
        encrypting.write(stream.getvalue().to_pybytes())
    path = tmp_path / "from-tink.arrows"
    path.write_bytes(sink.getvalue())
    assert_same(read_encrypted_ipc(path, KEY, AAD), table)
    assert_same(pa.Table.from_batches(list(iter_encrypted_ipc_batches(path, KEY, AAD))), table)
