"""Mock data: made-up rows with a sealed table's columns and Arrow types, to write and debug code against.

Analysts cannot look at the rows, so a typo in a column name or a wrong assumption about a type otherwise shows up
only as a refused or failed release. A mock table has exactly the schema the vault reports and values drawn from a
seeded generator that has never seen the data: nothing in it is evidence about the dataset, and it may be printed,
plotted and kept like any other local value. Strings repeat a handful of values (``region_0`` … ``region_4``) so
that group-bys and joins on them produce groups. There are no nulls unless asked for (``null_rate``): whether a
column holds any is a fact about the data, and a null in an integer column would turn it into floats in pandas.
"""

from __future__ import annotations

import decimal
from collections.abc import Callable
from typing import Any, Final

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]  # pyarrow ships no type information

__all__ = ["DEFAULT_ROWS", "MAX_ROWS", "mock_table"]

DEFAULT_ROWS: Final = 100
MAX_ROWS: Final = 1_000_000
DISTINCT_STRINGS: Final = 5
_EPOCH_SECOND: Final = np.datetime64("2024-01-01T00:00:00", "s")
_EPOCH_DAY: Final = np.datetime64("2024-01-01", "D")
_SPAN_SECONDS: Final = 365 * 24 * 3600


def mock_table(schema: pa.Schema, rows: int = DEFAULT_ROWS, seed: int = 0, null_rate: float = 0.0) -> pa.Table:
    """``rows`` made-up rows of ``schema``: the same column names and Arrow types, values from ``seed`` alone;
    about ``null_rate`` of the values of each nullable column are null."""
    if not isinstance(rows, int) or isinstance(rows, bool) or not 0 <= rows <= MAX_ROWS:
        raise ValueError(f"rows must be an integer from 0 to {MAX_ROWS:,}, not {rows!r}")
    if not isinstance(null_rate, (int, float)) or isinstance(null_rate, bool) or not 0.0 <= null_rate <= 1.0:
        raise ValueError(f"null_rate must be a number from 0 to 1, not {null_rate!r}")
    rng = np.random.default_rng(seed)
    columns = [_column(field.name, field.type, field.nullable and null_rate, rows, rng) for field in schema]
    return pa.Table.from_arrays(columns, schema=pa.schema([pa.field(f.name, f.type, f.nullable) for f in schema]))


def _column(name: str, arrow_type: pa.DataType, null_rate: float, rows: int, rng: np.random.Generator) -> pa.Array:
    if pa.types.is_string_view(arrow_type):  # Arrow cannot take from views yet: make strings, then view them
        return _column(name, pa.string(), null_rate, rows, rng).cast(arrow_type)
    values = _values(name, arrow_type, rows, rng)
    if not null_rate or rows == 0 or pa.types.is_null(arrow_type):
        return values
    # Take from the values with one null appended: works for every type, where if_else lacks kernels for some.
    picks = np.where(rng.random(rows) < null_rate, rows, np.arange(rows))
    return pa.concat_arrays([values, pa.nulls(1, arrow_type)]).take(pa.array(picks))


def _values(name: str, arrow_type: pa.DataType, rows: int, rng: np.random.Generator) -> pa.Array:
    for matches, make in _MAKERS:
        if matches(arrow_type):
            return make(name, arrow_type, rows, rng)
    return pa.nulls(rows, arrow_type)  # a type with no maker: typed, and plainly made up


def _integers(name: str, arrow_type: pa.DataType, rows: int, rng: np.random.Generator) -> pa.Array:
    return pa.array(rng.integers(0, 100, rows), type=arrow_type)


def _floats(name: str, arrow_type: pa.DataType, rows: int, rng: np.random.Generator) -> pa.Array:
    values = np.round(rng.normal(50.0, 15.0, rows), 2)
    return pa.array(values.astype(np.float16) if pa.types.is_float16(arrow_type) else values, type=arrow_type)


def _decimals(name: str, arrow_type: pa.DataType, rows: int, rng: np.random.Generator) -> pa.Array:
    whole = min(10 ** (arrow_type.precision - arrow_type.scale), 1000)
    units = rng.integers(0, whole * 10**arrow_type.scale, rows)
    return pa.array([decimal.Decimal(int(unit)).scaleb(-arrow_type.scale) for unit in units], type=arrow_type)


def _booleans(name: str, arrow_type: pa.DataType, rows: int, rng: np.random.Generator) -> pa.Array:
    return pa.array(rng.random(rows) < 0.5, type=arrow_type)


def _strings(name: str, arrow_type: pa.DataType, rows: int, rng: np.random.Generator) -> pa.Array:
    picks = rng.integers(0, DISTINCT_STRINGS, rows)
    return pa.array([f"{name}_{pick}" for pick in picks], type=arrow_type)


def _binaries(name: str, arrow_type: pa.DataType, rows: int, rng: np.random.Generator) -> pa.Array:
    width = arrow_type.byte_width if pa.types.is_fixed_size_binary(arrow_type) else 8
    return pa.array([rng.bytes(width) for _ in range(rows)], type=arrow_type)


def _seconds(rows: int, rng: np.random.Generator) -> np.ndarray[Any, np.dtype[np.int64]]:
    return rng.integers(0, _SPAN_SECONDS, rows)


def _timestamps(name: str, arrow_type: pa.DataType, rows: int, rng: np.random.Generator) -> pa.Array:
    moments = _EPOCH_SECOND + _seconds(rows, rng).astype("timedelta64[s]")
    return pa.array(moments).cast(arrow_type)


def _dates(name: str, arrow_type: pa.DataType, rows: int, rng: np.random.Generator) -> pa.Array:
    days = _EPOCH_DAY + rng.integers(0, 365, rows).astype("timedelta64[D]")
    return pa.array(days).cast(arrow_type)


def _times(name: str, arrow_type: pa.DataType, rows: int, rng: np.random.Generator) -> pa.Array:
    return pa.array(rng.integers(0, 24 * 3600, rows), type=pa.int32()).cast(pa.time32("s")).cast(arrow_type)


def _durations(name: str, arrow_type: pa.DataType, rows: int, rng: np.random.Generator) -> pa.Array:
    return pa.array(rng.integers(0, 24 * 3600, rows).astype("timedelta64[s]")).cast(arrow_type)


def _dictionaries(name: str, arrow_type: pa.DataType, rows: int, rng: np.random.Generator) -> pa.Array:
    return _values(name, arrow_type.value_type, rows, rng).dictionary_encode().cast(arrow_type)


def _lists(name: str, arrow_type: pa.DataType, rows: int, rng: np.random.Generator) -> pa.Array:
    child = arrow_type.value_type
    if pa.types.is_fixed_size_list(arrow_type):
        values = _values(name, child, rows * arrow_type.list_size, rng)
        return pa.FixedSizeListArray.from_arrays(values, type=arrow_type)
    lengths = rng.integers(0, 4, rows)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = _values(name, child, int(offsets[-1]), rng)
    array_class = pa.LargeListArray if pa.types.is_large_list(arrow_type) else pa.ListArray
    offset_type = pa.int64() if pa.types.is_large_list(arrow_type) else pa.int32()
    return array_class.from_arrays(pa.array(offsets, type=offset_type), values, type=arrow_type)


def _structs(name: str, arrow_type: pa.DataType, rows: int, rng: np.random.Generator) -> pa.Array:
    fields = [arrow_type.field(i) for i in range(arrow_type.num_fields)]
    children = [_values(f"{name}.{f.name}", f.type, rows, rng) for f in fields]
    return pa.StructArray.from_arrays(children, fields=fields)


def _maps(name: str, arrow_type: pa.DataType, rows: int, rng: np.random.Generator) -> pa.Array:
    lengths = rng.integers(0, 3, rows)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    count = int(lengths.sum())
    keys = _values(f"{name}.key", arrow_type.key_type, count, rng)
    items = _values(f"{name}.value", arrow_type.item_type, count, rng)
    return pa.MapArray.from_arrays(offsets, keys, items, type=arrow_type)


_Maker = Callable[[str, pa.DataType, int, np.random.Generator], pa.Array]
_MAKERS: Final[tuple[tuple[Callable[[pa.DataType], bool], _Maker], ...]] = (
    (pa.types.is_dictionary, _dictionaries),
    (pa.types.is_boolean, _booleans),
    (pa.types.is_integer, _integers),
    (pa.types.is_floating, _floats),
    (pa.types.is_decimal, _decimals),
    (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t), _strings),
    (lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t), _binaries),
    (pa.types.is_timestamp, _timestamps),
    (pa.types.is_date, _dates),
    (pa.types.is_time, _times),
    (pa.types.is_duration, _durations),
    (pa.types.is_map, _maps),  # before lists: a map is a list of entries to Arrow
    (lambda t: pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t), _lists),
    (pa.types.is_struct, _structs),
)
