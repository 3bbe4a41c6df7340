"""The plan evaluator: strict parsing of hostile plan JSON, every node and function, lineage, and safe errors."""

from __future__ import annotations

import math
import operator
from datetime import UTC, date, datetime
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plan_json import assign, col, fn, lit, src

from kernel_enclave.vault.plan import SourceTable, evaluate, parse_plan, plan_datasets, uses_window
from kernel_enclave.vault.protocol import VaultError

CANARY = "CANARY-7f3a9c"


def naive(*parts: int) -> datetime:
    """A wall-clock time, as a timezone-less Arrow timestamp column holds it."""
    return datetime(*parts, tzinfo=UTC).replace(tzinfo=None)


@pytest.fixture
def people() -> dict[str, SourceTable]:
    return people_sources()


def people_sources() -> dict[str, SourceTable]:
    table = pa.table(
        {
            "id": pa.array([1, 2, 3, 4, 5], pa.int64()),
            "age": pa.array([34, 51, None, 19, 67], pa.int64()),
            "score": pa.array([1.5, -2.25, float("nan"), None, 10.0], pa.float64()),
            "name": pa.array(["Ann", "bob", "Cid", None, "ann"], pa.string()),
            "vip": pa.array([True, False, None, True, False], pa.bool_()),
            "seen": pa.array(
                [
                    naive(2024, 1, 1, 8, 30),
                    naive(2024, 2, 29, 23, 0),
                    None,
                    naive(2023, 12, 31, 0, 0),
                    naive(2024, 6, 3, 12, 15),
                ],
                pa.timestamp("us"),
            ),
            "born": pa.array([date(1990, 1, 1), date(1973, 5, 2), None, date(2005, 7, 7), date(1957, 3, 3)]),
        }
    )
    return {"t": SourceTable.from_dataset("people", table)}


def out(plan: dict[str, Any], sources: dict[str, SourceTable], name: str = "out") -> list[Any]:
    return evaluate(plan, sources).table.column(name).to_pylist()


# -- sources, nodes -------------------------------------------------------------------------------------------


def test_from_dataset_lineage_is_each_column_itself() -> None:
    source = SourceTable.from_dataset("d1", pa.table({"a": [1], "b": ["x"]}))
    assert source.lineage == {"a": frozenset({("d1", "a")}), "b": frozenset({("d1", "b")})}
    assert source.datasets == frozenset({"d1"})
    # Each record carries its position in the dataset, the same in every release (the difference checks need it).
    assert [(dataset, ids.to_pylist()) for dataset, ids in source.record_ids or ()] == [("d1", [0])]


def test_from_dataset_refuses_duplicate_column_names() -> None:
    table = pa.Table.from_arrays([pa.array([1]), pa.array([2])], names=["a", "a"])
    with pytest.raises(VaultError, match="duplicate column names"):
        SourceTable.from_dataset("d1", table)


def test_source_unknown_handle(people: dict[str, SourceTable]) -> None:
    with pytest.raises(VaultError, match="no dataset or table with handle 'nope'"):
        evaluate(src("nope"), people)


def test_select_keeps_order_and_lineage(people: dict[str, SourceTable]) -> None:
    result = evaluate({"node": "select", "input": src(), "columns": ["name", "id"]}, people)
    assert result.table.column_names == ["name", "id"]
    assert result.lineage == {"name": frozenset({("people", "name")}), "id": frozenset({("people", "id")})}


def test_unknown_column_lists_the_columns(people: dict[str, SourceTable]) -> None:
    with pytest.raises(VaultError) as caught:
        evaluate({"node": "select", "input": src(), "columns": ["x"]}, people)
    assert str(caught.value) == "select: no column 'x'; columns are id, age, score, name, vip, seen, born"
    with pytest.raises(VaultError, match="no column 'nope'; columns are id, age"):
        evaluate(assign(col("nope")), people)


def test_filter_keeps_matching_rows_and_drops_null_predicates(people: dict[str, SourceTable]) -> None:
    result = evaluate({"node": "filter", "input": src(), "predicate": fn("gt", col("age"), lit(30))}, people)
    assert result.table.column("id").to_pylist() == [1, 2, 5]
    assert result.lineage == people["t"].lineage  # the predicate adds nothing to the kept columns' lineage


def test_filter_with_a_literal_predicate_and_a_non_boolean_predicate(people: dict[str, SourceTable]) -> None:
    assert evaluate({"node": "filter", "input": src(), "predicate": lit(False)}, people).table.num_rows == 0
    with pytest.raises(VaultError, match=r"predicate .* is int64, not a boolean"):
        evaluate({"node": "filter", "input": src(), "predicate": col("age")}, people)


def test_assign_appends_replaces_and_sees_earlier_assignments(people: dict[str, SourceTable]) -> None:
    plan = {
        "node": "assign",
        "input": src(),
        "columns": [
            ["age", fn("add", col("age"), lit(1))],
            ["twice", fn("mul", col("age"), lit(2))],
            ["const", lit(7)],
        ],
    }
    result = evaluate(plan, people)
    assert result.table.column_names == ["id", "age", "score", "name", "vip", "seen", "born", "twice", "const"]
    assert result.table.column("age").to_pylist() == [35, 52, None, 20, 68]
    assert result.table.column("twice").to_pylist() == [70, 104, None, 40, 136]
    assert result.table.column("const").to_pylist() == [7] * 5
    assert result.lineage["twice"] == frozenset({("people", "age")})
    assert result.lineage["const"] == frozenset()


def test_lineage_unions_every_argument_including_conditions(people: dict[str, SourceTable]) -> None:
    expr = fn("where", fn("gt", col("id"), lit(2)), col("age"), fn("len", col("name")))
    result = evaluate(assign(expr), people)
    assert result.lineage["out"] == frozenset({("people", "id"), ("people", "age"), ("people", "name")})
    assert result.table.column("out").to_pylist() == [3, 3, None, 19, 67]


def test_evaluate_refuses_release_nodes_below_or_at_the_root(people: dict[str, SourceTable]) -> None:
    count = {"node": "count", "input": src()}
    with pytest.raises(VaultError, match="count node may only be the root of a release plan"):
        evaluate(count, people)
    with pytest.raises(VaultError, match="value_counts node may only be the root"):
        evaluate(
            {"node": "select", "input": {"node": "value_counts", "input": src(), "column": "a"}, "columns": []}, people
        )


def test_plan_datasets_without_evaluating(people: dict[str, SourceTable]) -> None:
    other = SourceTable.from_dataset("other", pa.table({"id": [1]}))
    sources = {**people, "o": other}
    plan = {"node": "count", "input": {"node": "join", "left": src(), "right": src("o"), "on": ["id"]}}
    assert plan_datasets(plan, sources) == frozenset({"people", "other"})
    with pytest.raises(VaultError):
        plan_datasets({"node": "bogus"}, sources)


# -- joins ----------------------------------------------------------------------------------------------------


@pytest.fixture
def two() -> dict[str, SourceTable]:
    left = pa.table({"k": [1, 2, 2, 3, None], "v": [10, 20, 21, 30, 40], "s": ["a", "b", "c", "d", "e"]})
    right = pa.table({"k": [2, 3, 4, None], "v": [200, 300, 400, 500], "w": [True, False, True, False]})
    return {"l": SourceTable.from_dataset("L", left), "r": SourceTable.from_dataset("R", right)}


@pytest.mark.parametrize("how", ["inner", "left", "right", "outer"])
def test_join_matches_pandas_merge_on_non_null_keys(two: dict[str, SourceTable], how: str) -> None:
    plan = {"node": "join", "left": src("l"), "right": src("r"), "on": ["k"], "how": how, "suffixes": ["_l", "_r"]}
    result = evaluate(plan, two)
    assert result.table.column_names == ["k", "v_l", "s", "v_r", "w"]
    got = result.table.to_pandas()
    left = two["l"].table.to_pandas()
    right = two["r"].table.to_pandas()
    # pandas matches NaN keys with each other, Arrow (like SQL) does not: compare on the rows with keys.
    expected = left.dropna(subset=["k"]).merge(right.dropna(subset=["k"]), on="k", how=how, suffixes=("_l", "_r"))
    got = got.dropna(subset=["k"])

    def rows(frame: pd.DataFrame) -> list[tuple[Any, ...]]:
        return sorted(
            tuple(None if pd.isna(x) else x for x in row)
            for row in frame[["k", "v_l", "s", "v_r", "w"]].itertuples(False)
        )

    assert rows(got) == rows(expected)


def test_join_lineage_and_datasets(two: dict[str, SourceTable]) -> None:
    result = evaluate({"node": "join", "left": src("l"), "right": src("r"), "on": ["k"]}, two)
    assert result.table.column_names == ["k", "v_x", "s", "v_y", "w"]  # pandas' default suffixes
    assert result.lineage["k"] == frozenset({("L", "k"), ("R", "k")})
    assert result.lineage["v_x"] == frozenset({("L", "v")})
    assert result.lineage["v_y"] == frozenset({("R", "v")})
    assert result.lineage["w"] == frozenset({("R", "w")})
    assert result.datasets == frozenset({"L", "R"})


def test_join_tracks_source_records_per_dataset(two: dict[str, SourceTable]) -> None:
    result = evaluate({"node": "join", "left": src("l"), "right": src("r"), "on": ["k"], "how": "left"}, two)
    assert result.record_ids is not None
    pairs = sorted(
        zip(
            result.table.column("s").to_pylist(),
            *(ids.to_pylist() for _, ids in result.record_ids),
            strict=True,
        )
    )
    assert [dataset for dataset, _ in result.record_ids] == ["L", "R"]
    assert pairs == [("a", 0, None), ("b", 1, 0), ("c", 2, 0), ("d", 3, 1), ("e", 4, None)]
    filtered = evaluate(
        {
            "node": "filter",
            "input": {**{"node": "join", "left": src("l"), "right": src("r"), "on": ["k"]}},
            "predicate": fn("eq", col("s"), lit("c")),
        },
        two,
    )
    assert filtered.record_ids is not None
    assert [ids.to_pylist() for _, ids in filtered.record_ids] == [[2], [0]]


def test_join_errors(two: dict[str, SourceTable]) -> None:
    base = {"node": "join", "left": src("l"), "right": src("r")}
    with pytest.raises(VaultError, match=r"join \(right side\): no column 's'"):
        evaluate({**base, "on": ["s"]}, two)
    with pytest.raises(VaultError, match="suffixes must differ"):
        evaluate({**base, "on": ["k"], "suffixes": ["", ""]}, two)
    with pytest.raises(VaultError, match="how must be one of inner, left, right, outer"):
        evaluate({**base, "on": ["k"], "how": "cross"}, two)
    renamed = {"node": "assign", "input": src("l"), "columns": [["v_x", lit(1)]]}
    with pytest.raises(VaultError, match="suffixes make two result columns share a name"):
        evaluate({**base, "left": renamed, "on": ["k"]}, two)


def test_join_key_type_mismatch_is_a_vault_error(two: dict[str, SourceTable]) -> None:
    strings = {"node": "assign", "input": src("r"), "columns": [["k", fn("cast", col("k"), type="string")]]}
    with pytest.raises(VaultError, match=r"^join"):
        evaluate({"node": "join", "left": src("l"), "right": strings, "on": ["k"]}, two)


def test_join_of_a_dataset_with_itself(two: dict[str, SourceTable]) -> None:
    result = evaluate({"node": "join", "left": src("l"), "right": src("l"), "on": ["k"]}, two)
    assert result.datasets == frozenset({"L"})
    assert result.record_ids is not None
    assert [dataset for dataset, _ in result.record_ids] == ["L", "L"]
    assert result.table.num_rows == 1 + 4 + 1  # key 2 appears twice on both sides


# -- expression functions -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "column", "value", "expected"),
    [
        ("eq", "age", 51, [False, True, None, False, False]),
        ("ne", "age", 51, [True, False, None, True, True]),
        ("lt", "age", 34, [False, False, None, True, False]),
        ("le", "age", 34, [True, False, None, True, False]),
        ("gt", "score", 1.5, [False, False, False, None, True]),
        ("ge", "score", 1.5, [True, False, False, None, True]),
        ("gt", "age", 33.5, [True, True, None, False, True]),
        ("eq", "name", "Ann", [True, False, False, None, False]),
        ("lt", "name", "C", [True, False, False, None, False]),
        ("ge", "seen", "2024-01-01", [True, True, None, False, True]),
        ("lt", "seen", "2024-02-29T23:00:00", [True, False, None, True, False]),
        ("lt", "born", "1980-01-01", [False, True, None, False, True]),
    ],
)
def test_comparisons_with_literals(
    people: dict[str, SourceTable], name: str, column: str, value: Any, expected: list[Any]
) -> None:
    assert out(assign(fn(name, col(column), lit(value))), people) == expected


def test_comparison_literal_on_the_left_and_between_columns(people: dict[str, SourceTable]) -> None:
    assert out(assign(fn("gt", lit(40), col("age"))), people) == [True, False, None, True, False]
    assert out(assign(fn("lt", col("age"), col("id"))), people) == [False, False, None, False, False]


def test_timestamp_with_zone_compares_with_local_and_offset_literals() -> None:
    zoned = pa.array(
        [datetime(2024, 1, 1, 11, 0, tzinfo=UTC), datetime(2024, 1, 1, 9, 0, tzinfo=UTC)], pa.timestamp("us", tz="UTC")
    )
    sources = {"t": SourceTable.from_dataset("z", pa.table({"at": zoned}))}
    assert out(assign(fn("gt", col("at"), lit("2024-01-01T10:00:00"))), sources) == [True, False]
    assert out(assign(fn("gt", col("at"), lit("2024-01-01T10:00:00+02:00"))), sources) == [True, True]


def test_string_vs_number_comparison_is_a_type_error(people: dict[str, SourceTable]) -> None:
    with pytest.raises(VaultError, match=r"^lt is not supported for column 'name' \(string\), a int64 literal$"):
        evaluate(assign(fn("lt", col("name"), lit(3))), people)


@pytest.fixture
def numbers() -> dict[str, SourceTable]:
    table = pa.table(
        {
            "a": pa.array([7, -7, 7, -7, 0, None], pa.int64()),
            "b": pa.array([3, 3, -3, -3, 5, 1], pa.int64()),
            "z": pa.array([0, 1, 2, 3, 4, 5], pa.int64()),
            "f": pa.array([7.5, -7.5, 0.0, 2.0, float("nan"), None]),
        }
    )
    return {"t": SourceTable.from_dataset("n", table)}


def test_arithmetic_matches_python(numbers: dict[str, SourceTable]) -> None:
    a = [7, -7, 7, -7, 0, None]
    b = [3, 3, -3, -3, 5, 1]

    def py(op: Any) -> list[Any]:
        return [None if x is None else op(x, y) for x, y in zip(a, b, strict=True)]

    assert out(assign(fn("add", col("a"), col("b"))), numbers) == py(lambda x, y: x + y)
    assert out(assign(fn("sub", col("a"), col("b"))), numbers) == py(lambda x, y: x - y)
    assert out(assign(fn("mul", col("a"), col("b"))), numbers) == py(lambda x, y: x * y)
    assert out(assign(fn("truediv", col("a"), col("b"))), numbers) == py(lambda x, y: x / y)
    assert out(assign(fn("floordiv", col("a"), col("b"))), numbers) == py(lambda x, y: x // y)
    assert out(assign(fn("mod", col("a"), col("b"))), numbers) == py(lambda x, y: x % y)
    assert out(assign(fn("pow", col("b"), lit(2))), numbers) == [9, 9, 9, 9, 25, 1]
    assert out(assign(fn("neg", col("a"))), numbers) == [-7, 7, -7, 7, 0, None]
    assert out(assign(fn("abs", col("a"))), numbers) == [7, 7, 7, 7, 0, None]
    assert evaluate(assign(fn("floordiv", col("a"), col("b"))), numbers).table.schema.field("out").type == pa.int64()


def test_division_by_zero_is_null_for_integers_and_follows_pandas_for_true_division(
    numbers: dict[str, SourceTable],
) -> None:
    """pandas turns a whole integer column into floats when one divisor is zero; here the type never depends on
    the values (int64 with null where the divisor is zero), so a result's type tells nothing about the data."""
    a = numbers["t"].table.column("a").to_pandas()
    z = numbers["t"].table.column("z").to_pandas()
    got = out(assign(fn("truediv", col("a"), col("z"))), numbers)
    for g, e in zip(got, a / z, strict=True):
        assert (g is None and math.isnan(e)) or (g is not None and math.isnan(g) and math.isnan(e)) or g == e
    for name, op in (("floordiv", operator.floordiv), ("mod", operator.mod)):
        result = evaluate(assign(fn(name, col("a"), col("z"))), numbers).table.column("out")
        assert result.type == pa.int64()
        expected = [None if x is None or y == 0 else op(x, y) for y, x in enumerate([7, -7, 7, -7, 0, None])]
        assert result.to_pylist() == expected, name


def test_float_floordiv_mod_and_math(numbers: dict[str, SourceTable]) -> None:
    assert out(assign(fn("floordiv", col("f"), lit(2))), numbers)[:4] == [3.0, -4.0, 0.0, 1.0]
    assert out(assign(fn("mod", col("f"), lit(2))), numbers)[:4] == [1.5, 0.5, 0.0, 0.0]
    assert out(assign(fn("sqrt", col("b"))), numbers)[4] == pytest.approx(math.sqrt(5))
    assert math.isnan(out(assign(fn("sqrt", col("a"))), numbers)[1])
    assert out(assign(fn("log", col("b"))), numbers)[0] == pytest.approx(math.log(3))
    assert out(assign(fn("exp", col("z"))), numbers)[2] == pytest.approx(math.exp(2))
    assert out(assign(fn("round", col("f"))), numbers)[:4] == [8.0, -8.0, 0.0, 2.0]  # half to even, like numpy
    assert out(assign(fn("round", fn("truediv", col("b"), lit(7)), ndigits=2)), numbers)[0] == 0.43


def test_arithmetic_on_strings_is_refused(people: dict[str, SourceTable]) -> None:
    with pytest.raises(VaultError, match="add needs numbers; column 'name' \\(string\\) is not numeric"):
        evaluate(assign(fn("add", col("name"), lit(1))), people)
    # A negative integer literal exponent makes a float power, as Python's 2 ** -1; the plan decides, not the data.
    assert out(assign(fn("pow", col("id"), lit(-1))), people) == [1.0, 0.5, 1 / 3, 0.25, 0.2]
    assert out(assign(fn("pow", col("age"), fn("sub", col("id"), lit(2)))), people) == [None, 1, None, 19**2, 67**3]


def test_logical_functions_use_kleene_logic(people: dict[str, SourceTable]) -> None:
    young = fn("lt", col("age"), lit(40))
    assert out(assign(fn("and", col("vip"), young)), people) == [True, False, None, True, False]
    assert out(assign(fn("or", col("vip"), young)), people) == [True, False, None, True, False]
    assert out(assign(fn("xor", col("vip"), lit(True))), people) == [False, True, None, False, True]
    assert out(assign(fn("not", col("vip"))), people) == [False, True, None, False, True]
    with pytest.raises(VaultError, match="and needs booleans; column 'age'"):
        evaluate(assign(fn("and", col("age"), col("vip"))), people)


def test_null_tests_treat_nan_as_missing(people: dict[str, SourceTable]) -> None:
    assert out(assign(fn("is_null", col("score"))), people) == [False, False, True, True, False]
    assert out(assign(fn("not_null", col("age"))), people) == [True, True, False, True, True]


def test_isin(people: dict[str, SourceTable]) -> None:
    assert out(assign(fn("isin", col("age"), values=[19, 67.0])), people) == [False, False, False, True, True]
    assert out(assign(fn("isin", col("name"), values=["Ann", None])), people) == [True, False, False, True, False]
    assert out(assign(fn("isin", col("name"), values=[])), people) == [False] * 5
    assert out(assign(fn("isin", col("seen"), values=["2024-06-03T12:15:00"])), people) == [False] * 4 + [True]
    with pytest.raises(VaultError, match="its values must be strings"):
        evaluate(assign(fn("isin", col("name"), values=[1])), people)


def test_between_where_fill_null(people: dict[str, SourceTable]) -> None:
    assert out(assign(fn("between", col("age"), lit(19), lit(51))), people) == [True, True, None, True, False]
    assert out(assign(fn("between", col("seen"), lit("2024-01-01"), lit("2024-03-01"))), people) == [
        True,
        True,
        None,
        False,
        False,
    ]
    assert out(assign(fn("where", col("vip"), col("age"), lit(0))), people) == [34, 0, None, 19, 0]
    assert out(assign(fn("where", col("vip"), col("age"), lit(0.5))), people) == [34.0, 0.5, None, 19.0, 0.5]
    assert out(assign(fn("fill_null", col("age"), lit(0))), people) == [34, 51, 0, 19, 67]
    assert out(assign(fn("fill_null", col("score"), lit(0))), people) == [1.5, -2.25, 0.0, 0.0, 10.0]
    assert out(assign(fn("fill_null", col("name"), lit("?"))), people) == ["Ann", "bob", "Cid", "?", "ann"]
    with pytest.raises(VaultError, match="where needs a boolean condition"):
        evaluate(assign(fn("where", col("age"), lit(1), lit(2))), people)


def test_temporal_parts(people: dict[str, SourceTable]) -> None:
    assert out(assign(fn("year", col("seen"))), people) == [2024, 2024, None, 2023, 2024]
    assert out(assign(fn("month", col("seen"))), people) == [1, 2, None, 12, 6]
    assert out(assign(fn("day", col("seen"))), people) == [1, 29, None, 31, 3]
    assert out(assign(fn("hour", col("seen"))), people) == [8, 23, None, 0, 12]
    expected = [None if pd.isna(t) else t.weekday() for t in people["t"].table.column("seen").to_pandas()]
    assert out(assign(fn("weekday", col("seen"))), people) == expected
    assert out(assign(fn("year", col("born"))), people) == [1990, 1973, None, 2005, 1957]
    with pytest.raises(VaultError, match="hour needs a timestamp; column 'born'"):
        evaluate(assign(fn("hour", col("born"))), people)
    with pytest.raises(VaultError, match="year needs a timestamp or date; column 'age'"):
        evaluate(assign(fn("year", col("age"))), people)


def test_string_functions(people: dict[str, SourceTable]) -> None:
    assert out(assign(fn("lower", col("name"))), people) == ["ann", "bob", "cid", None, "ann"]
    assert out(assign(fn("upper", col("name"))), people) == ["ANN", "BOB", "CID", None, "ANN"]
    assert out(assign(fn("len", col("name"))), people) == [3, 3, 3, None, 3]
    assert out(assign(fn("startswith", col("name"), prefix="A")), people) == [True, False, False, None, False]
    with pytest.raises(VaultError, match="lower needs a string; column 'age'"):
        evaluate(assign(fn("lower", col("age"))), people)


def test_cast(people: dict[str, SourceTable]) -> None:
    assert out(assign(fn("cast", col("age"), type="string")), people) == ["34", "51", None, "19", "67"]
    assert out(assign(fn("cast", col("age"), type="float64")), people) == [34.0, 51.0, None, 19.0, 67.0]
    assert out(assign(fn("cast", lit("12"), type="int64")), people) == [12] * 5
    assert out(assign(fn("cast", col("vip"), type="int64")), people) == [1, 0, None, 1, 0]
    truncated = assign(fn("cast", fn("fill_null", col("score"), lit(0.0)), type="int64"))
    assert out(truncated, people) == [1, -2, 0, 0, 10]  # truncates toward zero, as pandas' astype does
    # TRY_CAST: NaN (and infinities, out-of-range values, unparsable strings) become null rather than an error.
    assert out(assign(fn("cast", col("score"), type="int64")), people) == [1, -2, None, None, 10]
    assert out(assign(fn("cast", col("name"), type="int64")), people) == [None] * 5
    with pytest.raises(VaultError, match=r"^cast to bool is not supported for column 'name' \(string\)$"):
        evaluate(assign(fn("cast", col("name"), type="bool")), people)
    with pytest.raises(VaultError, match=r"^cast to bool is not supported for column 'born' \(date32\[day\]\)$"):
        evaluate(assign(fn("cast", col("born"), type="bool")), people)


# -- data values never reach an error message -----------------------------------------------------------------


@pytest.fixture
def canary() -> dict[str, SourceTable]:
    table = pa.table({"s": ["12", CANARY, "7"], "n": [1, 2, 3], "t": ["2024-01-01", CANARY, "2024-01-02"]})
    return {"t": SourceTable.from_dataset("c", table)}


@pytest.mark.parametrize(
    ("plan", "expected"),
    [
        (assign(fn("cast", col("s"), type="int64")), [12, None, 7]),
        (assign(fn("cast", col("s"), type="float64")), [12.0, None, 7.0]),
        (assign(fn("add", fn("cast", col("s"), type="int64"), col("n"))), [13, None, 10]),
    ],
)
def test_a_string_that_does_not_convert_is_null_not_an_error(
    canary: dict[str, SourceTable], plan: dict[str, Any], expected: list[Any]
) -> None:
    assert out(plan, canary) == expected
    kept = evaluate(
        {"node": "filter", "input": src(), "predicate": fn("gt", fn("cast", col("s"), type="int64"), lit(1))}, canary
    )
    assert kept.table.column("n").to_pylist() == [1, 3]


def test_a_refused_cast_names_the_column_and_types_never_a_value(canary: dict[str, SourceTable]) -> None:
    with pytest.raises(VaultError) as caught:
        evaluate(assign(fn("cast", col("s"), type="bool")), canary)
    message = str(caught.value)
    assert message == "cast to bool is not supported for column 's' (string)"
    assert CANARY not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_string_to_timestamp_join_key_failure_does_not_quote(canary: dict[str, SourceTable]) -> None:
    other = pa.table({"t": pa.array([naive(2024, 1, 1)], pa.timestamp("us")), "x": [1]})
    sources = {**canary, "o": SourceTable.from_dataset("o", other)}
    with pytest.raises(VaultError) as caught:
        evaluate({"node": "join", "left": src(), "right": src("o"), "on": ["t"]}, sources)
    assert CANARY not in str(caught.value)


# -- hostile plan JSON ----------------------------------------------------------------------------------------


BAD_PLANS: list[tuple[Any, str]] = [
    (None, "must be a JSON object"),
    ([], "must be a JSON object"),
    ({}, 'needs a "node" string'),
    ({"node": 3}, 'needs a "node" string'),
    ({"node": "drop_table"}, "unknown plan node 'drop_table'"),
    ({"node": "source"}, "missing key"),
    ({"node": "source", "handle": 1}, "handle must be a string"),
    ({"node": "source", "handle": "t", "extra": 1}, "unknown key"),
    ({"node": "select", "input": src(), "columns": "age"}, "must be a list of column names"),
    ({"node": "select", "input": src(), "columns": [1]}, "must be a string"),
    ({"node": "select", "input": src(), "columns": ["a", "a"]}, "names a column twice"),
    ({"node": "filter", "input": src(), "predicate": "age > 3"}, "an expression must be a JSON object"),
    ({"node": "filter", "input": src(), "predicate": {"fn": "eval", "args": []}}, "unknown function 'eval'"),
    ({"node": "filter", "input": src(), "predicate": {"fn": "eq", "args": [col("a")]}}, "args must be a list of 2"),
    ({"node": "filter", "input": src(), "predicate": {"fn": "eq", "args": {}}}, "args must be a list of 2"),
    ({"node": "filter", "input": src(), "predicate": {"fn": "eq", "args": [col("a"), lit(1)], "x": 1}}, "unknown key"),
    ({"node": "filter", "input": src(), "predicate": {"col": "a", "lit": 1}}, "unknown key"),
    ({"node": "filter", "input": src(), "predicate": {"lit": [1]}}, "a literal is a JSON scalar"),
    ({"node": "filter", "input": src(), "predicate": {"lit": {"a": 1}}}, "a literal is a JSON scalar"),
    ({"node": "filter", "input": src(), "predicate": {"lit": 2**64}}, "fit in 64 bits"),
    ({"node": "filter", "input": src(), "predicate": {"lit": float("nan")}}, "finite"),
    ({"node": "filter", "input": src(), "predicate": {"x": 1}}, "an expression is"),
    ({"node": "assign", "input": src(), "columns": {"a": lit(1)}}, "list of \\[name, expression\\] pairs"),
    ({"node": "assign", "input": src(), "columns": [["a"]]}, "must be a \\[name, expression\\] pair"),
    ({"node": "assign", "input": src(), "columns": [[1, lit(1)]]}, "must be a string"),
    ({"node": "assign", "input": src(), "columns": [["", lit(1)]]}, "1-1024 characters"),
    ({"node": "assign", "input": src(), "columns": [["x" * 2000, lit(1)]]}, "1-1024 characters"),
    (assign(fn("isin", col("a"), values="abc")), "values must be a list"),
    (assign(fn("isin", col("a"), values=[[1]])), "a literal is a JSON scalar"),
    (assign(fn("isin", col("a"))), "missing key"),
    (assign(fn("round", col("a"), ndigits=1.5)), "ndigits must be an integer"),
    (assign(fn("round", col("a"), ndigits=True)), "ndigits must be an integer"),
    (assign(fn("cast", col("a"), type="object")), "type must be one of"),
    (assign(fn("startswith", col("a"), prefix=3)), "prefix must be a string"),
    (assign(fn("lower", col("a"), prefix="x")), "unknown key"),
    ({"node": "join", "left": src(), "right": src(), "on": []}, "at least one column"),
    ({"node": "join", "left": src(), "right": src(), "on": ["k"], "how": ["inner"]}, "how must be one of"),
    (assign(fn("cast", col("a"), type=["int64"])), "type must be one of"),
    ({"node": "aggregate", "input": src(), "by": [], "aggs": [{"name": "n", "func": ["sum"]}]}, "func must be one of"),
    ({"node": "join", "left": src(), "right": src(), "on": ["k"], "suffixes": "_x"}, "two strings"),
    ({"node": "join", "left": src(), "right": src(), "on": ["k"], "suffixes": ["_x", 1]}, "must be a string"),
    ({"node": "aggregate", "input": src(), "by": [], "aggs": []}, "non-empty list"),
    ({"node": "aggregate", "input": src(), "by": "g", "aggs": [{"name": "n", "func": "count"}]}, "list of column"),
    ({"node": "aggregate", "input": src(), "by": [], "aggs": [{"name": "n", "func": "exec"}]}, "func must be one of"),
    ({"node": "aggregate", "input": src(), "by": [], "aggs": [{"name": "n", "func": "sum"}]}, "sum needs a column"),
    (
        {"node": "aggregate", "input": src(), "by": [], "aggs": [{"name": "n", "func": "quantile", "column": "a"}]},
        "q must be a number",
    ),
    (
        {
            "node": "aggregate",
            "input": src(),
            "by": [],
            "aggs": [{"name": "n", "func": "quantile", "column": "a", "q": 2}],
        },
        "q must be a number",
    ),
    (
        {
            "node": "aggregate",
            "input": src(),
            "by": [],
            "aggs": [{"name": "n", "func": "sum", "column": "a", "q": 0.5}],
        },
        "q is only for quantile",
    ),
    (
        {"node": "aggregate", "input": src(), "by": ["n"], "aggs": [{"name": "n", "func": "count"}]},
        "must be unique and differ from the group keys",
    ),
    ({"node": "aggregate", "input": src(), "by": [], "aggs": ["count"]}, "must be a JSON object"),
    ({"node": "value_counts", "input": src(), "column": "a", "dropna": "yes"}, "dropna must be true or false"),
    ({"node": "describe", "input": src(), "columns": []}, "at least one column"),
    ({"node": "count", "input": src(), "limit": 1}, "unknown key"),
]


@pytest.mark.parametrize(("plan", "expected"), BAD_PLANS)
def test_hostile_plans_are_refused_with_plain_messages(plan: Any, expected: str) -> None:
    with pytest.raises(VaultError, match=expected) as caught:
        parse_plan(plan)
    message = str(caught.value)
    assert "Traceback" not in message and 'File "' not in message
    assert len(message) < 600


def nested(depth: int) -> dict[str, Any]:
    plan: dict[str, Any] = src()
    for _ in range(depth - 1):
        plan = {"node": "select", "input": plan, "columns": []}
    return plan


def test_nesting_is_bounded(people: dict[str, SourceTable]) -> None:
    assert evaluate(nested(64), people).table.num_columns == 0
    with pytest.raises(VaultError, match="nests deeper than 64 levels"):
        parse_plan(nested(65))
    expr: dict[str, Any] = col("age")
    for _ in range(70):
        expr = fn("neg", expr)
    with pytest.raises(VaultError, match="nests deeper than 64 levels"):
        parse_plan(assign(expr))
    with pytest.raises(VaultError, match="nests deeper"):
        parse_plan(nested(100_000))  # far deeper than Python's recursion limit: refused, not a RecursionError


def test_plan_size_is_bounded() -> None:
    wide = {"node": "filter", "input": src(), "predicate": fn("isin", col("a"), values=[])}
    columns = [[f"c{i}", fn("add", col("a"), lit(i))] for i in range(4000)]
    parse_plan({"node": "assign", "input": src(), "columns": columns[:3000]})
    with pytest.raises(VaultError, match="more than 10000 nodes"):
        parse_plan({"node": "assign", "input": wide, "columns": columns})


FIELDS = ["node", "input", "handle", "columns", "col", "lit", "fn", "args", "by", "aggs", "on", "how", "suffixes"]
FIELDS += ["left", "right", "predicate", "name", "column", "func", "q", "dropna", "values", "ndigits", "prefix", "type"]
NAMES = ["source", "select", "filter", "assign", "join", "aggregate", "value_counts", "describe", "count", "cast"]
NAMES += ["t", "a", "isin", "round", "startswith", "quantile", "inner", "outer", "int64", "eq", "add", "where"]
json_scalars = st.none() | st.sampled_from(NAMES) | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(FIELDS) | st.text(max_size=4),
            inner,
            max_size=5,
        )
    ),
    max_leaves=30,
)


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_arbitrary_json_only_ever_raises_vault_errors(value: Any) -> None:
    try:
        parse_plan(value)
    except VaultError as exc:
        message = str(exc)
    else:
        message = ""
    assert "Traceback" not in message


def test_a_column_without_lineage_is_refused() -> None:
    """A table rebuilt from elsewhere (an unsealed file) must carry lineage for every column, or it fails closed."""
    table = pa.table({"a": [1, 2], "b": [3, 4]})
    partial = {"t": SourceTable(table, {"a": frozenset({("d", "a")})}, frozenset({"d"}))}
    assert evaluate(assign(fn("add", col("a"), lit(1))), partial).lineage["out"] == frozenset({("d", "a")})
    with pytest.raises(VaultError, match="column 'b' has no recorded lineage"):
        evaluate(assign(fn("add", col("b"), lit(1))), partial)
    with pytest.raises(VaultError, match="column 'b' has no recorded lineage"):
        evaluate({"node": "select", "input": src(), "columns": ["b"]}, partial)
    replaced = evaluate({"node": "assign", "input": src(), "columns": [["b", lit(0)]]}, partial)
    assert replaced.table.column_names == ["a", "b"]
    assert replaced.lineage["b"] == frozenset()


ALL_FUNCTIONS = {
    **dict.fromkeys(["eq", "ne", "lt", "le", "gt", "ge", "add", "sub", "mul", "truediv", "floordiv", "mod"], 2),
    **dict.fromkeys(["pow", "and", "or", "xor", "fill_null"], 2),
    **dict.fromkeys(["neg", "abs", "not", "is_null", "not_null", "log", "exp", "sqrt", "lower", "upper", "len"], 1),
    **dict.fromkeys(["year", "month", "day", "hour", "weekday"], 1),
    **dict.fromkeys(["between", "where"], 3),
}
OPTIONS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "isin": st.fixed_dictionaries(
        {"values": st.lists(st.none() | st.integers(-5, 5) | st.text(max_size=3), max_size=3)}
    ),
    "round": st.fixed_dictionaries({"ndigits": st.integers(-3, 3)}),
    "startswith": st.fixed_dictionaries({"prefix": st.text(max_size=2)}),
    "cast": st.fixed_dictionaries({"type": st.sampled_from(["int64", "float64", "string", "bool"])}),
}
leaves = st.sampled_from([col(c) for c in ("id", "age", "score", "name", "vip", "seen", "born")]) | st.builds(
    lit,
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=4)
    | st.just("2024-01-01"),
)


def calls(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    simple = st.sampled_from(sorted(ALL_FUNCTIONS)).flatmap(
        lambda name: st.lists(children, min_size=ALL_FUNCTIONS[name], max_size=ALL_FUNCTIONS[name]).map(
            lambda args: {"fn": name, "args": args}
        )
    )
    optioned = st.sampled_from(sorted(OPTIONS)).flatmap(
        lambda name: st.tuples(children, OPTIONS[name]).map(lambda pair: {"fn": name, "args": [pair[0]], **pair[1]})
    )
    return simple | optioned


expressions = st.recursive(leaves, calls, max_leaves=8)
PEOPLE = people_sources()


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(expression=expressions, as_filter=st.booleans())
def test_any_well_formed_expression_evaluates_or_raises_a_vault_error(
    expression: dict[str, Any], as_filter: bool
) -> None:
    """Every Arrow failure, whatever the types, surfaces as a VaultError naming no value."""
    plan = {"node": "filter", "input": src(), "predicate": expression} if as_filter else assign(expression)
    message = ""
    try:
        result = evaluate(plan, PEOPLE)
    except VaultError as exc:
        message = str(exc)
    else:
        assert result.table.num_rows <= 5
    for value in ("Ann", "bob", "Cid", "-2.25", "10.0", "2024-02-29"):
        assert value not in message


# -- window functions over groups -----------------------------------------------------------------------------


@pytest.fixture
def staff() -> dict[str, SourceTable]:
    table = pa.table(
        {
            "dept": pa.array(["a", "b", "a", "a", None, "b", "b"]),
            "pay": pa.array([30.0, 10.0, 30.0, 20.0, 5.0, float("nan"), 40.0]),
            "n": pa.array([1, 2, 3, 4, 5, 6, 7], pa.int64()),
        }
    )
    return {"t": SourceTable.from_dataset("staff", table)}


@pytest.mark.parametrize("func", ["rank", "sum", "mean", "count"])
def test_over_matches_pandas_groupby_rank_and_transform(staff: dict[str, SourceTable], func: str) -> None:
    frame = staff["t"].table.to_pandas()
    grouped = frame.groupby("dept")["pay"]
    expected = grouped.rank() if func == "rank" else grouped.transform(func)
    got = out(assign(fn("over", col("pay"), func=func, by=["dept"])), staff)
    for g, e in zip(got, expected, strict=True):
        assert (g is None and pd.isna(e)) or g == pytest.approx(e), (func, got, list(expected))


def test_over_lineage_includes_the_group_keys_and_refuses_extremes(staff: dict[str, SourceTable]) -> None:
    result = evaluate(assign(fn("over", col("n"), func="sum", by=["dept"])), staff)
    assert result.lineage["out"] == frozenset({("staff", "n"), ("staff", "dept")})
    with pytest.raises(VaultError, match="func must be one of rank, sum, mean, count"):
        parse_plan(assign(fn("over", col("n"), func="max", by=["dept"])))
    with pytest.raises(VaultError, match="over: no column 'nope'"):
        evaluate(assign(fn("over", col("n"), func="rank", by=["nope"])), staff)
    with pytest.raises(VaultError, match=r"over \(sum\) needs numbers"):
        evaluate(assign(fn("over", col("dept"), func="sum", by=["n"])), staff)


def test_a_join_on_keys_unique_on_one_side_marks_the_other_sides_records_unique(two: dict[str, SourceTable]) -> None:
    """Counting rows with an id is counting records only where no record can repeat: the flag must be exact."""
    many_to_one = evaluate({"node": "join", "left": src("l"), "right": src("r"), "on": ["k"]}, two)
    assert many_to_one.records is not None
    left_id, _ = (name for _, name in many_to_one.records)
    # R's keys are unique, so each L row meets at most one R row; L's key 2 repeats, so R's record 0 repeats.
    assert many_to_one.unique == frozenset({left_id})
    ids = dict(zip(["L", "R"], (ids.to_pylist() for _, ids in many_to_one.record_ids or ()), strict=True))
    assert len(ids["L"]) == len(set(ids["L"]))
    assert len(ids["R"]) > len(set(ids["R"]))
    self_join = evaluate({"node": "join", "left": src("l"), "right": src("l"), "on": ["k"]}, two)
    assert self_join.unique == frozenset()


def test_float_columns_without_nan_are_known_through_selects_assignments_and_joins() -> None:
    """Reading a column without the NaN-to-null pass is right only where no NaN can be: the flag must be exact."""
    left = pa.table({"k": [1, 2], "clean": [1.5, 2.5], "dirty": [float("nan"), 1.0], "v": [0.5, 0.25]})
    right = pa.table({"k": [1, 2], "v": [float("nan"), 3.0]})
    sources = {"l": SourceTable.from_dataset("L", left), "r": SourceTable.from_dataset("R", right)}
    assert sources["l"].nan_free == frozenset({"clean", "v"})
    assigned = evaluate(
        {"node": "assign", "input": src("l"), "columns": [["copy", col("clean")], ["clean", fn("log", col("v"))]]},
        sources,
    )
    assert assigned.nan_free == frozenset({"copy", "v"})
    joined = evaluate({"node": "join", "left": src("l"), "right": src("r"), "on": ["k"]}, sources)
    assert joined.nan_free == frozenset({"clean", "v_x"})


def test_a_window_is_found_wherever_the_plan_computes_one() -> None:
    """The policy check on window functions reads the plan, not the query: a window in a filter's predicate, an
    assigned column nested in other calls, or either side of a join is found; a plan without one is not."""
    window = fn("over", col("cost"), func="sum", by=["g"])
    nested = fn("gt", fn("sub", window, lit(1.0)), lit(0.0))
    joined = {"node": "join", "left": src("a"), "right": {"node": "filter", "input": src("b"), "predicate": nested}}
    joined |= {"on": ["id"]}
    counted = {"node": "aggregate", "by": ["g"], "aggs": [{"name": "n", "column": None, "func": "count"}]}
    plans = {
        "assigned": assign(fn("mul", window, lit(2.0))),
        "filtered": {"node": "filter", "input": src(), "predicate": nested},
        "joined": {**counted, "input": joined},
        "plain": {**counted, "input": {"node": "filter", "input": src(), "predicate": fn("gt", col("cost"), lit(0))}},
    }
    found = {name: uses_window(plan) for name, plan in plans.items()}
    assert found == {"assigned": True, "filtered": True, "joined": True, "plain": False}
