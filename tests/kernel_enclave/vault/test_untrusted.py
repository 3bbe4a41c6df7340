"""The vault's checks on Arrow from outside it: what passes comes back unchanged, what is broken never decodes.

Properties over generated tables (hypothesis): every valid table of the accepted types round-trips; any offset,
dictionary index or nested child pointing outside its buffer is refused by full validation; any flipped byte in a
valid stream is refused with :class:`UntrustedInputError` or yields a table that passes full validation, never any
other outcome. Then the limits one by one, the refusal's wording, and the vault's own call sites (public prediction
input, a sealed table read back).
"""

from __future__ import annotations

import struct
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped]
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confnb.policy.output import OutputPolicy
from kernel_enclave.tee.simulated import SimulatedBackend
from kernel_enclave.vault import sealing
from kernel_enclave.vault.keys import VaultKeys
from kernel_enclave.vault.untrusted import (
    CHECKS,
    Limits,
    UntrustedInputError,
    read_ipc,
    validate_table,
)
from kernel_enclave.vault.vault import Vault

SMALL = Limits(max_rows=1000, max_bytes=1 << 20)


def stream(table: pa.Table | pa.RecordBatch, **options: Any) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(**options)) as writer:
        writer.write(table) if isinstance(table, pa.RecordBatch) else writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def refusal(data: bytes, limits: Limits = SMALL) -> UntrustedInputError:
    with pytest.raises(UntrustedInputError) as caught:
        read_ipc(data, "input", limits)
    return caught.value


def _int32s(values: list[int]) -> pa.Buffer:
    return pa.py_buffer(struct.pack(f"<{len(values)}i", *values))


# -- generated tables -------------------------------------------------------------------------------------------------

_texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8)
COLUMNS = {
    "int64": (st.integers(-(2**63), 2**63 - 1), pa.int64()),
    "float64": (st.floats(allow_nan=False), pa.float64()),
    "string": (_texts, pa.string()),
    "large_string": (_texts, pa.large_string()),
    "bool": (st.booleans(), pa.bool_()),
    "list<int32>": (st.lists(st.integers(-(2**31), 2**31 - 1), max_size=4), pa.list_(pa.int32())),
    "struct": (
        st.fixed_dictionaries({"a": st.integers(-5, 5), "b": _texts}),
        pa.struct([("a", pa.int64()), ("b", pa.string())]),
    ),
    "timestamp": (st.integers(0, 2**40), pa.timestamp("ms")),
}


@st.composite
def tables(draw: st.DrawFn) -> pa.Table:
    names = draw(st.lists(st.sampled_from(sorted(COLUMNS)), min_size=1, max_size=4, unique=True))
    rows = draw(st.integers(0, 12))
    columns = {}
    for name in names:
        values_strategy, data_type = COLUMNS[name]
        values = draw(st.lists(st.one_of(st.none(), values_strategy), min_size=rows, max_size=rows))
        columns[name] = pa.array(values, data_type)
    if draw(st.booleans()) and rows:
        columns["dictionary"] = pa.array(draw(st.lists(_texts, min_size=rows, max_size=rows))).dictionary_encode()
    return pa.table(columns)


@settings(max_examples=60, deadline=None)
@given(tables())
def test_every_valid_table_of_accepted_types_round_trips(table: pa.Table) -> None:
    assert read_ipc(stream(table), "input", SMALL).equals(table)


@st.composite
def broken_offsets(draw: st.DrawFn) -> tuple[str, pa.Array]:
    """A string, list or dictionary column with one offset or index pointing outside its buffer, reached through
    zero to two levels of nesting (list, struct)."""
    values = draw(st.lists(st.text(alphabet="abc", min_size=1, max_size=3), min_size=2, max_size=10))
    n = len(values)
    kind = draw(st.sampled_from(["string", "list", "dictionary"]))
    slot = draw(st.integers(1, n - 1))
    if kind == "dictionary":
        indices = [i % 2 for i in range(n)]
        indices[slot] = draw(st.one_of(st.integers(2, 2**31 - 1), st.integers(-(2**31), -1)))
        array = pa.DictionaryArray.from_arrays(pa.array(indices, pa.int32()), pa.array(["x", "y"]), safe=False)
    else:
        good = pa.array(values) if kind == "string" else pa.array([[1, 2]] * n, pa.list_(pa.int64()))
        size = len(good.buffers()[2]) if kind == "string" else 2 * n
        bad = draw(st.one_of(st.integers(size + 1, 2**31 - 1), st.integers(-(2**31), -1)))
        offsets = list(struct.unpack(f"<{n + 1}i", good.buffers()[1].to_pybytes()[: 4 * (n + 1)]))
        offsets[slot] = bad
        if kind == "string":
            array = pa.Array.from_buffers(pa.string(), n, [None, _int32s(offsets), good.buffers()[2]])
        else:
            child = good.values
            array = pa.Array.from_buffers(good.type, n, [None, _int32s(offsets)], children=[child])
    for _ in range(draw(st.integers(0, 2))):
        if draw(st.booleans()):
            array = pa.ListArray.from_arrays(pa.array(range(len(array) + 1), pa.int32()), array)
        else:
            array = pa.StructArray.from_arrays([array], names=["inner"])
    return kind, array


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(broken_offsets())
def test_any_offset_or_index_outside_its_buffer_is_refused_by_full_validation(case: tuple[str, pa.Array]) -> None:
    _, array = case
    table = pa.table({"ok": pa.array(range(len(array))), "broken": array})
    refused = refusal(stream(table))
    assert refused.check == "validation" and refused.column == 1
    with pytest.raises(UntrustedInputError, match="check validation"):
        validate_table(table, "parsed", SMALL)  # the parser's own check on what it built in memory


_VALID = stream(
    pa.table(
        {
            "s": ["alpha", "beta", None, "gamma"] * 4,
            "d": pa.array(["x", "y"] * 8).dictionary_encode(),
            "l": [[1, 2], [], None, [3]] * 4,
            "n": list(range(16)),
        }
    )
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(1, 255)), min_size=1, max_size=4))
def test_flipped_bytes_are_refused_or_give_a_fully_valid_table(flips: list[tuple[int, int]]) -> None:
    data = bytearray(_VALID)
    for position, mask in flips:
        data[position] ^= mask
    try:
        table = read_ipc(bytes(data), "input", SMALL)
    except UntrustedInputError as exc:
        refused = exc.check
    else:
        table.validate(full=True)
        return
    assert refused in CHECKS


# -- limits and message-level checks ----------------------------------------------------------------------------------


def _nested(depth: int) -> pa.Array:
    array: pa.Array = pa.array([1, 2])
    for _ in range(depth - 1):
        array = pa.ListArray.from_arrays(pa.array([0, 1, 2], pa.int32()), array)
    return array


@pytest.mark.parametrize(
    ("table", "check"),
    [
        (pa.table({f"c{i}": [1] for i in range(SMALL.max_columns + 1)}), "schema-columns"),
        (pa.table({"n" * (SMALL.max_name_chars + 1): [1]}), "schema-name"),
        (pa.Table.from_arrays([pa.array([1]), pa.array([2])], names=["a", "a"]), "schema-duplicate"),
        (pa.table({"deep": _nested(SMALL.max_depth + 1)}), "schema-depth"),
        (pa.table({"null": pa.nulls(3)}), "schema-type"),
        (pa.table({"view": pa.array(["a"], pa.string_view())}), "schema-type"),
        (pa.table({"ree": pa.RunEndEncodedArray.from_arrays([2], ["a"])}), "schema-type"),
        (pa.table({"union": pa.UnionArray.from_sparse(pa.array([0], pa.int8()), [pa.array([1])])}), "schema-type"),
        (pa.table({"empty": pa.array([[]], pa.list_(pa.int64(), 0))}), "schema-type"),
        (pa.table({"uuid": pa.array([b"0" * 16], pa.uuid())}), "schema-type"),
        (pa.table({"many": range(SMALL.max_rows + 1)}), "declared-rows"),
    ],
    ids=["columns", "name", "duplicate", "depth", "null", "view", "ree", "union", "fsl0", "extension", "rows"],
)
def test_schema_and_size_limits(table: pa.Table, check: str) -> None:
    assert refusal(stream(table)).check == check


def test_the_limits_just_inside_are_accepted() -> None:
    wide = pa.table({f"c{i}": [1] for i in range(SMALL.max_columns)})
    assert read_ipc(stream(wide), "input", SMALL).num_columns == SMALL.max_columns
    named = pa.table({"n" * SMALL.max_name_chars: [1]})
    assert read_ipc(stream(named), "input", SMALL).column_names == ["n" * SMALL.max_name_chars]
    deep = pa.table({"deep": _nested(SMALL.max_depth)})
    assert read_ipc(stream(deep), "input", SMALL).equals(deep)
    rows = pa.table({"many": range(SMALL.max_rows)})
    assert read_ipc(stream(rows), "input", SMALL).num_rows == SMALL.max_rows
    mapped = pa.table({"m": pa.array([[("k", 1)]], pa.map_(pa.string(), pa.int64()))})
    assert read_ipc(stream(mapped), "input", SMALL).equals(mapped)


def test_rows_and_bytes_are_counted_across_batches() -> None:
    batch = pa.record_batch({"n": pa.array(range(600))})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write(batch)
        writer.write(batch)
    assert refusal(bytes(sink.getvalue().to_pybytes())).check == "rows"
    big = pa.table({"b": [b"x" * 600_000, b"y" * 600_000]})
    assert refusal(stream(big)).check == "size"


def test_compression_and_dictionary_deltas_are_refused_before_decoding() -> None:
    table = pa.table({"n": range(100)})
    assert refusal(stream(table, compression="zstd")).check == "ipc-compression"
    assert refusal(stream(table, compression="lz4")).check == "ipc-compression"
    first = pa.table({"d": pa.array(["a", "b"]).dictionary_encode()})
    second = pa.table({"d": pa.array(["c", "a"]).dictionary_encode()})
    grown = pa.table({"d": pa.array(["a", "b", "c"]).dictionary_encode()})  # the first dictionary and one more
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, first.schema, options=pa.ipc.IpcWriteOptions(emit_dictionary_deltas=True)) as w:
        w.write_table(first)
        w.write_table(grown)
    assert refusal(bytes(sink.getvalue().to_pybytes())).check == "ipc-dictionary-delta"
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, first.schema) as writer:  # whole replacement dictionaries are fine
        writer.write_table(first)
        writer.write_table(second)
    replaced = read_ipc(bytes(sink.getvalue().to_pybytes()), "input", SMALL)
    assert replaced.column("d").to_pylist() == ["a", "b", "c", "a"]


def test_framing_errors_are_refused() -> None:
    data = stream(pa.table({"n": [1, 2, 3]}))
    assert refusal(b"").check == "ipc-framing"
    assert refusal(b"\xff\xff\xff\xff\x10\x00\x00\x00" + b"A" * 64).check == "ipc-framing"
    assert refusal(data[: len(data) // 2]).check == "ipc-framing"
    assert refusal(data[:-8] + b"\x00" * 3).check == "ipc-framing"


def test_a_refusal_is_one_line_and_quotes_no_value() -> None:
    secret = "SECRET-4711"
    good = pa.array([secret, secret + "\u00e9"])
    raw = bytearray(good.buffers()[2].to_pybytes())
    raw[-1] = 0xFF  # invalid UTF-8 in the second value
    broken = pa.Array.from_buffers(pa.string(), 2, [None, good.buffers()[1], pa.py_buffer(bytes(raw))])
    message = str(refusal(stream(pa.table({"s": broken}))))
    assert message == "input: refused by check validation, Arrow full validation failed (column 0)"
    decimal = pa.array([12345], pa.decimal128(10, 0)).cast(pa.decimal128(3, 0), safe=False)
    message = str(refusal(stream(pa.table({"d": decimal}))))
    assert "12345" not in message and "\n" not in message


# -- the vault's call sites ---------------------------------------------------------------------------------------


def _bad_strings() -> pa.Array:
    good = pa.array(["a", "b", "c"])
    return pa.Array.from_buffers(pa.string(), 3, [None, _int32s([0, 1 << 24, 2, 3]), good.buffers()[2]])


def test_a_sealed_table_read_back_is_validated(simulated_backend: SimulatedBackend) -> None:
    """A sealed file is authenticated, but the vault checks its table like any input all the same."""
    vault = Vault(backend=simulated_backend, keys=VaultKeys.generate())
    policy = OutputPolicy.from_toml('[policy]\nid = "p"\n[release]\nallow = ["schema", "row_count"]\n')
    metadata = {"policies": {"d": policy.to_dict()}, "lineage": {}, "datasets": ["d"], "record_columns": []}
    for column, expected in ((_bad_strings(), False), (pa.array(["a", "b", "c"]), True)):
        blob = sealing.seal(simulated_backend, "table", stream(pa.table({"s": column})), metadata)
        reply, _ = vault.handle({"op": "unseal"}, [blob])
        assert reply["ok"] is expected, reply
        if not expected:
            assert reply["error"]["message"] == (
                "the sealed table: refused by check validation, Arrow full validation failed (column 0)"
            )


def test_declared_rows_beyond_the_limit_are_refused_before_decoding() -> None:
    data = stream(pa.record_batch({"x": pa.array([0.0, 1.0])}))
    assert refusal(data, Limits(max_rows=1, max_bytes=1 << 20)).check == "declared-rows"
    assert read_ipc(data, "input", Limits(max_rows=2, max_bytes=1 << 20)).num_rows == 2
