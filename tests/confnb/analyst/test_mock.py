"""Mock data: the schema of a sealed table, values that owe nothing to the data."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import confnb as cn
from confnb.analyst.mock import DISTINCT_STRINGS, MAX_ROWS, mock_table

SCALAR_TYPES = [
    pa.bool_(),
    pa.int8(),
    pa.uint16(),
    pa.int32(),
    pa.int64(),
    pa.uint64(),
    pa.float16(),
    pa.float32(),
    pa.float64(),
    pa.decimal128(10, 2),
    pa.decimal128(3, 3),
    pa.decimal256(40, 5),
    pa.string(),
    pa.large_string(),
    pa.string_view(),
    pa.binary(),
    pa.large_binary(),
    pa.binary(4),
    pa.date32(),
    pa.date64(),
    pa.timestamp("s"),
    pa.timestamp("ms", tz="UTC"),
    pa.timestamp("us"),
    pa.timestamp("ns", tz="Europe/Paris"),
    pa.time32("s"),
    pa.time32("ms"),
    pa.time64("us"),
    pa.time64("ns"),
    pa.duration("s"),
    pa.duration("ns"),
    pa.null(),
    pa.dictionary(pa.int32(), pa.string()),
    pa.dictionary(pa.int8(), pa.int64(), ordered=True),
]
NESTED_TYPES = [
    pa.list_(pa.int64()),
    pa.large_list(pa.string()),
    pa.list_(pa.float64(), 3),
    pa.struct([("x", pa.int32()), ("label", pa.string()), ("when", pa.timestamp("us"))]),
    pa.map_(pa.string(), pa.float64()),
    pa.list_(pa.struct([("a", pa.list_(pa.bool_()))])),
    pa.month_day_nano_interval(),  # no maker: all null, still of its type
]


def _schema(types: list[pa.DataType], nullable: bool = True) -> pa.Schema:
    return pa.schema([pa.field(f"c{i}", arrow_type, nullable) for i, arrow_type in enumerate(types)])


@pytest.mark.parametrize("arrow_type", SCALAR_TYPES + NESTED_TYPES, ids=str)
def test_every_column_has_exactly_its_type(arrow_type: pa.DataType) -> None:
    schema = _schema([arrow_type])
    table = mock_table(schema, rows=50, seed=3)
    assert table.schema.equals(schema)
    assert table.num_rows == 50
    table.validate(full=True)
    table.to_pandas()  # what the analyst gets: it must convert


def test_the_same_seed_gives_the_same_rows_and_another_seed_others() -> None:
    schema = _schema(SCALAR_TYPES + NESTED_TYPES)
    assert mock_table(schema, 40, seed=1).equals(mock_table(schema, 40, seed=1))
    assert not mock_table(schema, 40, seed=1).equals(mock_table(schema, 40, seed=2))


def test_no_nulls_unless_asked_for_and_never_in_a_non_nullable_column() -> None:
    types = [pa.int64(), pa.string(), pa.timestamp("us"), pa.dictionary(pa.int32(), pa.string())]
    plain = mock_table(_schema(types), 500)
    assert all(column.null_count == 0 for column in plain.columns)
    assert all(dtype.kind == "i" for dtype in plain.to_pandas().dtypes[:1])  # ints stay ints in pandas
    holey = mock_table(_schema(types), 500, null_rate=0.2)
    assert all(50 < column.null_count < 150 for column in holey.columns)
    strict = mock_table(_schema(types, nullable=False), 500, null_rate=0.9)
    assert all(column.null_count == 0 for column in strict.columns)


def test_strings_repeat_a_few_values_named_after_their_column() -> None:
    table = mock_table(pa.schema([("region", pa.string()), ("ward", pa.dictionary(pa.int16(), pa.string()))]), 300)
    regions = set(table.column("region").to_pylist())
    assert regions <= {f"region_{i}" for i in range(DISTINCT_STRINGS)} and len(regions) > 1
    assert set(table.column("ward").to_pylist()) <= {f"ward_{i}" for i in range(DISTINCT_STRINGS)}


def test_decimals_fit_their_precision_and_scale() -> None:
    values = mock_table(pa.schema([("d", pa.decimal128(4, 2))]), 200).column("d").to_pylist()
    assert all(Decimal("0") <= value < Decimal("100") and value.as_tuple().exponent == -2 for value in values)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rows": -1}, "rows must be an integer"),
        ({"rows": MAX_ROWS + 1}, "rows must be an integer"),
        ({"rows": 2.5}, "rows must be an integer"),
        ({"rows": True}, "rows must be an integer"),
        ({"null_rate": 1.5}, "null_rate must be a number"),
        ({"null_rate": "0.1"}, "null_rate must be a number"),
    ],
)
def test_bad_arguments_are_refused_by_name(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mock_table(_schema([pa.int64()]), **options)


def test_no_rows_is_an_empty_table_of_the_schema() -> None:
    schema = _schema(SCALAR_TYPES + NESTED_TYPES)
    assert mock_table(schema, 0).equals(schema.empty_table())


@settings(max_examples=60, deadline=None)
@given(
    types=st.lists(st.sampled_from(SCALAR_TYPES + NESTED_TYPES), min_size=1, max_size=6),
    rows=st.integers(0, 60),
    seed=st.integers(0, 2**32),
    null_rate=st.floats(0, 1),
)
def test_any_schema_any_seed(types: list[pa.DataType], rows: int, seed: int, null_rate: float) -> None:
    schema = _schema(types)
    table = mock_table(schema, rows, seed, null_rate)
    assert table.schema.equals(schema) and table.num_rows == rows
    table.validate(full=True)


# -- through a real vault -------------------------------------------------------------------------------------------


def test_a_sealed_table_mocks_its_columns_and_pandas_types(vault: Any) -> None:
    claims = cn.open("claims")
    mocked = claims.mock(rows=30, seed=5)
    assert isinstance(mocked, pd.DataFrame) and len(mocked) == 30
    assert list(mocked.columns) == claims.columns
    real = pa.Table.from_pandas(vault.owner.frames["claims"], preserve_index=False).to_pandas()
    assert mocked.dtypes.to_dict() == real.dtypes.to_dict()
    assert mocked.equals(claims.mock(rows=30, seed=5))
    # Made up, not sampled: no value of the data's own string columns appears.
    assert not set(mocked["region"]) & {"north", "south", "island"}
    assert set(mocked["region"]) <= {f"region_{i}" for i in range(DISTINCT_STRINGS)}


def test_mock_data_follows_a_derived_tables_schema(vault: Any) -> None:
    claims = cn.open("claims")
    older = claims[claims["age"] > 40].assign(cost_per_year=claims["cost"] / claims["age"])
    derived = older[["region", "cost_per_year"]]
    mocked = derived.mock(rows=10)
    assert list(mocked.columns) == ["region", "cost_per_year"]
    assert mocked["cost_per_year"].dtype == "float64"
