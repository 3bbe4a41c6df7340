"""Stable record ids and contribution masks: which records' values actually reach each row of an evaluated plan.

The release engine counts a record towards a released number only where its value contributes (present, not a
constant of the plan, not an unmatched side of an outer join). These tests build frames with the real evaluator
over real datasets and check, row by row, the mask :meth:`SourceTable.contributes` gives and the record ids that
travel with each row.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from typing import Any

import polars as pl
import pyarrow as pa  # type: ignore[import-untyped]  # pyarrow ships no type information
import pytest
from plan_json import col, fn, lit, src

from confnb.policy.output import RELEASE_KINDS, OutputPolicy
from kernel_enclave.vault import release
from kernel_enclave.vault.plan import (
    SourceTable,
    Value,
    empty_sources,
    evaluate,
    schema_of,
)

NAN = float("nan")


def assign(*columns: tuple[str, dict[str, Any]], input_: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"node": "assign", "input": input_ or src(), "columns": [list(pair) for pair in columns]}


def masks(frame: SourceTable, *names: str) -> dict[str, list[bool]]:
    """Each column's contribution mask, row by row, read in one query with the values."""
    found = frame.collect(frame.data.select(frame.contributes(name).alias(name) for name in names))
    return {name: found.get_column(name).to_list() for name in names}


def ids(frame: SourceTable) -> list[list[int | None]]:
    assert frame.record_ids is not None
    return [array.to_pylist() for _, array in frame.record_ids]


# x: present, null, NaN, present, present, present; who: true, false, true, null, false, true
WARD = pa.table(
    {
        "x": pa.array([1.5, None, NAN, 4.0, 5.0, 6.0], pa.float64()),
        "n": pa.array([10, 20, None, 40, 50, 60], pa.int64()),
        "who": pa.array([True, False, True, None, False, True], pa.bool_()),
        "g": pa.array(["a", "a", "a", "b", "b", None], pa.string()),
        "day": pa.array([date(2024, 1, 2), None, date(2024, 3, 4), date(2024, 5, 6), None, date(2024, 7, 8)]),
    }
)


@pytest.fixture
def ward() -> dict[str, SourceTable]:
    return {"t": SourceTable.from_dataset("ward", WARD)}


def one(plan: dict[str, Any], sources: dict[str, SourceTable], name: str = "out") -> list[bool]:
    return masks(evaluate(plan, sources), name)[name]


# -- stable record ids ---------------------------------------------------------------------------------------------


def test_a_dataset_carries_its_records_positions_as_hidden_unique_ids(ward: dict[str, SourceTable]) -> None:
    frame = ward["t"]
    assert frame.records is not None and [dataset for dataset, _ in frame.records] == ["ward"]
    assert frame.unique == frozenset(name for _, name in frame.records)
    assert ids(frame) == [[0, 1, 2, 3, 4, 5]]
    assert frame.columns == ["x", "n", "who", "g", "day"]
    assert frame.table.column_names == ["x", "n", "who", "g", "day"]


def test_ids_survive_filters_assignments_and_selects(ward: dict[str, SourceTable]) -> None:
    filtered = {"node": "filter", "input": src(), "predicate": fn("gt", col("n"), lit(25))}
    assigned = assign(("y", fn("mul", col("n"), lit(2))), input_=filtered)
    selected = {"node": "select", "input": assigned, "columns": ["y"]}
    frame = evaluate(selected, ward)
    assert frame.table.column("y").to_pylist() == [80, 100, 120]
    assert ids(frame) == [[3, 4, 5]]  # the records' positions in the dataset, not the filtered rows'
    assert frame.unique == frozenset(name for _, name in frame.records or ())
    # A second, different filter gives the same record the same id.
    other = evaluate({"node": "filter", "input": src(), "predicate": fn("eq", col("g"), lit("b"))}, ward)
    assert ids(other) == [[3, 4]]


def test_ids_survive_joins_per_side() -> None:
    left = pa.table({"k": [1, 2, 3, 4], "v": [10, 20, 30, 40]})
    right = pa.table({"k": [4, 2, 9], "w": ["d", "b", "z"]})
    sources = {"l": SourceTable.from_dataset("L", left), "r": SourceTable.from_dataset("R", right)}
    filtered = {"node": "filter", "input": src("l"), "predicate": fn("ge", col("k"), lit(2))}
    joined = {"node": "join", "left": filtered, "right": src("r"), "on": ["k"], "how": "left"}
    frame = evaluate(joined, sources)
    rows = sorted(zip(frame.table.column("k").to_pylist(), *ids(frame), strict=True))
    assert rows == [(2, 1, 1), (3, 2, None), (4, 3, 0)]
    assert [dataset for dataset, _ in frame.record_ids or ()] == ["L", "R"]


def test_a_scanned_dataset_carries_the_same_ids() -> None:
    lazy = pl.LazyFrame({"a": [5, 6, 7, 8]})
    frame = SourceTable.from_scan("big", lazy, pa.schema([("a", pa.int64())]))
    filtered = evaluate({"node": "filter", "input": src(), "predicate": fn("gt", col("a"), lit(6))}, {"t": frame})
    assert frame.columns == ["a"]
    assert ids(filtered) == [[2, 3]]
    assert filtered.unique == frozenset(name for _, name in frame.records or ())


def test_a_scan_read_in_batches_numbers_records_before_its_filters() -> None:
    """The reader may get a pushed-down predicate; ids must still be positions in the whole dataset."""
    whole = pl.DataFrame({"a": list(range(10_000))})

    def read(
        with_columns: list[str] | None, predicate: pl.Expr | None, n_rows: int | None, batch_size: int | None
    ) -> Iterator[pl.DataFrame]:
        for start in range(0, whole.height, 1_000):
            batch = whole.slice(start, 1_000)
            yield batch if predicate is None else batch.filter(predicate)

    scan = pl.io.plugins.register_io_source(io_source=read, schema=whole.schema)
    frame = SourceTable.from_scan("big", scan, pa.schema([("a", pa.int64())]))
    picked = fn("eq", fn("mod", col("a"), lit(1_000)), lit(7))
    filtered = evaluate({"node": "filter", "input": src(), "predicate": picked}, {"t": frame})
    assert filtered.streaming
    assert ids(filtered) == [filtered.table.column("a").to_pylist()] == [list(range(7, 10_000, 1_000))]


def test_a_table_from_arrow_without_ids_still_counts_rows() -> None:
    frame = SourceTable(pa.table({"a": [1, None, 3]}), {"a": frozenset({("d", "a")})}, frozenset({"d"}))
    assert frame.records is None and frame.record_ids is None
    out = evaluate(assign(("b", fn("where", fn("gt", col("a"), lit(1)), lit(1), lit(0)))), {"t": frame})
    assert out.records is None
    assert masks(out, "a", "b") == {"a": [True, False, True], "b": [False, False, False]}


# -- masks: columns and literals -----------------------------------------------------------------------------------


def test_a_dataset_column_contributes_where_present(ward: dict[str, SourceTable]) -> None:
    assert masks(ward["t"], "x", "n", "g", "day") == {
        "x": [True, False, False, True, True, True],  # null and NaN contribute nothing
        "n": [True, True, False, True, True, True],
        "g": [True, True, True, True, True, False],
        "day": [True, False, True, True, False, True],
    }


def test_a_literal_contributes_nothing(ward: dict[str, SourceTable]) -> None:
    frame = evaluate(assign(("one", lit(1)), ("text", lit("a")), ("none", lit(None))), ward)
    assert masks(frame, "one", "text", "none") == {"one": [False] * 6, "text": [False] * 6, "none": [False] * 6}


# -- where, fill_null ----------------------------------------------------------------------------------------------


def test_a_constant_chosen_by_a_predicate_contributes_nothing(ward: dict[str, SourceTable]) -> None:
    plan = assign(("out", fn("where", col("who"), lit(1), lit(0))))
    frame = evaluate(plan, ward)
    assert frame.table.column("out").to_pylist() == [1, 0, 1, None, 0, 1]  # the values themselves are unchanged
    assert masks(frame, "out")["out"] == [False] * 6


def test_a_masked_value_contributes_only_where_chosen(ward: dict[str, SourceTable]) -> None:
    # who: T F T null F T; x: 1.5 null NaN 4 5 6. Chosen and present: rows 0 and 5 only.
    assert one(assign(("out", fn("where", col("who"), col("x"), lit(None)))), ward) == [
        True,
        False,
        False,
        False,
        False,
        True,
    ]
    # The other branch: false rows take n (20, 50 present); a null condition contributes nothing.
    assert one(assign(("out", fn("where", col("who"), lit(0), col("n")))), ward) == [
        False,
        True,
        False,
        False,
        True,
        False,
    ]
    # Both branches data: each row what its branch does.
    assert one(assign(("out", fn("where", col("who"), col("x"), col("n")))), ward) == [
        True,
        True,
        False,
        False,
        True,
        True,
    ]


def test_fill_null_contributes_where_the_value_or_a_data_filler_does(ward: dict[str, SourceTable]) -> None:
    # x is null at row 1 and NaN at row 2: filled with a constant there, which contributes nothing.
    assert one(assign(("out", fn("fill_null", col("x"), lit(0.0)))), ward) == [True, False, False, True, True, True]
    # Filled from n: row 1 takes n = 20 (present), row 2 n = null.
    assert one(assign(("out", fn("fill_null", col("x"), col("n")))), ward) == [True, True, False, True, True, True]


# -- every other function ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        # comparisons: present where x is; NaN compares false/true but is no record's value
        (fn("gt", col("x"), lit(3)), [True, False, False, True, True, True]),
        (fn("ne", col("x"), lit(3)), [True, False, False, True, True, True]),
        (fn("eq", col("n"), lit(20)), [True, True, False, True, True, True]),
        # arithmetic
        (fn("add", col("x"), lit(1)), [True, False, False, True, True, True]),
        (fn("mul", col("x"), col("n")), [True, False, False, True, True, True]),
        (fn("truediv", col("n"), lit(0)), [True, True, False, True, True, True]),
        (fn("pow", col("x"), lit(0)), [True, False, False, True, True, True]),  # NaN ** 0 is 1.0
        # is_null is never null, but says something of x only where x is there
        (fn("is_null", col("x")), [True, False, False, True, True, True]),
        (fn("not_null", col("n")), [True, True, False, True, True, True]),
        (fn("isin", col("g"), values=["a"]), [True, True, True, True, True, False]),
        (fn("between", col("n"), lit(15), lit(45)), [True, True, False, True, True, True]),
        (fn("round", col("x")), [True, False, False, True, True, True]),
        (fn("log", col("n")), [True, True, False, True, True, True]),
        (fn("year", col("day")), [True, False, True, True, False, True]),
        (fn("upper", col("g")), [True, True, True, True, True, False]),
        (fn("cast", col("x"), type="string"), [True, False, False, True, True, True]),  # NaN reads "NaN"
        (fn("cast", col("n"), type="float64"), [True, True, False, True, True, True]),
        # logical: a literal deciding alone ("or true") is not a record's value
        (fn("or", col("who"), lit(True)), [True, True, True, False, True, True]),
        (fn("and", col("who"), lit(False)), [True, True, True, False, True, True]),
        (fn("not", col("who")), [True, True, True, False, True, True]),
        # a function of constants only
        (fn("add", lit(1), lit(2)), [False] * 6),
    ],
)
def test_a_function_contributes_where_present_and_an_argument_contributes(
    ward: dict[str, SourceTable], expr: dict[str, Any], expected: list[bool]
) -> None:
    assert one(assign(("out", expr)), ward) == expected


EDGES = pa.table(
    {
        "f": pa.array([NAN, None, 0.0, -1.0, 1.0, float("inf"), 2.5, NAN, 0.0], pa.float64()),
        "h": pa.array([1.0, NAN, NAN, None, 0.0, 2.0, -0.5, None, float("-inf")], pa.float64()),
        "i": pa.array([0, 3, None, -2, 1, 0, None, 5, 1], pa.int64()),
        "b": pa.array([True, None, False, True, None, False, True, False, None], pa.bool_()),
        "s": pa.array(["x", None, "NaN", "1", "y", None, "2.5", "", "z"], pa.string()),
    }
)
EDGE_SHAPES = [
    fn(name, *args)
    for name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "eq", "ne", "lt", "ge")
    for args in ((col("f"), col("h")), (col("f"), lit(0)), (col("i"), lit(0)), (col("i"), col("f")), (lit(1), col("h")))
] + [
    *(fn(name, col(c)) for name in ("log", "exp", "sqrt", "neg", "abs", "round") for c in ("f", "i")),
    *(fn("cast", col(c), type=t) for c in ("f", "i", "b", "s") for t in ("int64", "float64", "string")),
    *(fn(name, col("b"), other) for name in ("and", "or", "xor") for other in (col("b"), lit(True), lit(False))),
    fn("not", col("b")),
    fn("between", col("f"), lit(0), col("h")),
    fn("between", lit(1), col("f"), col("h")),
    fn("between", col("i"), lit(-1), lit(2)),
    fn("isin", col("i"), values=[0, None]),
    fn("is_null", col("f")),
    fn("upper", col("s")),
    fn("startswith", col("s"), prefix="x"),
]


def _present_value(value: Any) -> bool:
    return value is not None and value == value  # NaN is the one value unequal to itself


@pytest.mark.parametrize(
    "expr", EDGE_SHAPES, ids=lambda expr: "-".join([expr["fn"], *(str(next(iter(a.values()))) for a in expr["args"])])
)
def test_the_shortcut_for_plain_results_agrees_with_the_rule(expr: dict[str, Any]) -> None:
    """For functions of dataset columns: present result and some column argument present, on NaN, infinities,
    zeros and nulls alike, whether or not the evaluator kept a mask for it."""
    sources = {"t": SourceTable.from_dataset("edges", EDGES)}
    frame = evaluate(assign(("out", expr)), sources)
    result = frame.table.column("out").to_pylist()
    columns = [arg["col"] for arg in expr["args"] if "col" in arg]
    expected = [
        _present_value(result[row]) and any(_present_value(EDGES.column(c)[row].as_py()) for c in columns)
        for row in range(EDGES.num_rows)
    ]
    assert masks(frame, "out")["out"] == expected


def test_a_masked_input_keeps_its_mask_through_functions(ward: dict[str, SourceTable]) -> None:
    masked = ("m", fn("where", col("who"), col("n"), lit(0)))  # n where who, else a constant 0
    frame = evaluate(
        assign(
            masked,
            ("plus_one", fn("add", col("m"), lit(1))),
            ("plus_x", fn("add", col("m"), col("x"))),
            ("copy", col("m")),
        ),
        ward,
    )
    assert masks(frame, "m", "plus_one", "copy") == {
        "m": [True, False, False, False, False, True],
        "plus_one": [True, False, False, False, False, True],
        "copy": [True, False, False, False, False, True],
    }
    # m + x: present where both are, and then x (a record's value) contributes even where m does not.
    assert masks(frame, "plus_x")["plus_x"] == [True, False, False, False, True, True]


def test_a_group_statistic_contributes_only_through_the_rows_own_input(ward: dict[str, SourceTable]) -> None:
    plan = assign(("out", fn("over", col("x"), func="sum", by=["g"])))
    frame = evaluate(plan, ward)
    # Group a: x = 1.5, null, NaN; every row gets 1.5, but only row 0 holds its own value. No group for g null.
    assert frame.table.column("out").to_pylist() == [1.5, 1.5, 1.5, 9.0, 9.0, None]
    assert masks(frame, "out")["out"] == [True, False, False, True, True, False]
    counted = evaluate(assign(("out", fn("over", col("n"), func="count", by=["g"]))), ward)
    assert masks(counted, "out")["out"] == [True, True, False, True, True, False]


# -- joins ---------------------------------------------------------------------------------------------------------


def test_an_unmatched_side_of_an_outer_join_contributes_nothing() -> None:
    left = pa.table({"k": [1, 2, 3], "v": [10.0, None, 30.0]})
    right = pa.table({"k": [2, 3, 4], "w": [200, 300, 400], "flag": [True, False, True]})
    sources = {"l": SourceTable.from_dataset("L", left), "r": SourceTable.from_dataset("R", right)}
    masked_right = assign(("c", fn("where", col("flag"), col("w"), lit(-1))), input_=src("r"))
    plan = {"node": "join", "left": src("l"), "right": masked_right, "on": ["k"], "how": "outer"}
    frame = evaluate(plan, sources)
    order = frame.table.column("k").to_pylist()
    found = masks(frame, "k", "v", "w", "c")
    by_key = {key: {name: found[name][i] for name in found} for i, key in enumerate(order)}
    assert by_key == {
        1: {"k": True, "v": True, "w": False, "c": False},  # no right match: its columns are no record's
        2: {"k": True, "v": False, "w": True, "c": True},
        3: {"k": True, "v": True, "w": True, "c": False},  # c is the constant -1 there
        4: {"k": True, "v": False, "w": True, "c": True},
    }
    assert frame.columns == ["k", "v", "w", "flag", "c"]


def test_a_masked_join_key_contributes_where_either_side_does() -> None:
    left = pa.table({"k": [1, 2, 3], "use": [True, False, True]})
    right = pa.table({"k": [1, 2, 5], "w": [7, 8, 9]})
    sources = {"l": SourceTable.from_dataset("L", left), "r": SourceTable.from_dataset("R", right)}
    keyed = assign(("k", fn("where", col("use"), col("k"), lit(2))), input_=src("l"))  # k or a constant 2
    plan = {"node": "join", "left": keyed, "right": src("r"), "on": ["k"], "how": "left"}
    frame = evaluate(plan, sources)
    rows = dict(zip(frame.table.column("use").to_pylist(), masks(frame, "k")["k"], strict=True))
    # use=True rows keep their own k (1 matches, 3 does not: still the left record's value); the use=False row's
    # constant 2 matched the right record 2, whose key is that record's value.
    assert rows == {True: True, False: True}
    unmatched = evaluate(
        {**plan, "right": {"node": "filter", "input": src("r"), "predicate": fn("gt", col("w"), lit(8))}}, sources
    )
    found = dict(zip(unmatched.table.column("use").to_pylist(), masks(unmatched, "k")["k"], strict=True))
    assert found == {True: True, False: False}


# -- hidden columns ------------------------------------------------------------------------------------------------


def test_the_common_case_keeps_no_mask(ward: dict[str, SourceTable]) -> None:
    plain = assign(
        ("a", fn("add", col("x"), lit(1))),
        ("b", fn("where", col("who"), col("x"), lit(None))),
        ("c", fn("fill_null", col("x"), col("n"))),
        ("d", fn("upper", col("g"))),
        ("e", fn("gt", col("n"), lit(3))),
    )
    assert evaluate(plain, ward).masks == {}
    masked = evaluate(assign(("a", fn("where", col("who"), lit(1), lit(0)))), ward)
    assert list(masked.masks) == ["a"]


def test_hidden_columns_never_show(ward: dict[str, SourceTable]) -> None:
    plan = assign(("a", fn("where", col("who"), lit(1), lit(0))), ("b", fn("is_null", col("x"))))
    frame = evaluate(plan, ward)
    visible = ["x", "n", "who", "g", "day", "a", "b"]
    assert len(frame.schema.names()) == len(visible) + 4  # one record id, two masks, the records' weights
    assert frame.columns == visible
    assert [c["name"] for c in schema_of(frame)] == visible
    assert frame.table.column_names == visible
    assert frame.visible().columns == visible
    assert evaluate(plan, empty_sources(ward)).columns == visible
    policies = {"ward": open_policy()}
    assert release.schema_table(plan, ward, policies).column_names == visible
    assert [c["name"] for c in release.preview(plan, ward, policies)["columns"]] == visible
    # A plan cannot name a hidden column.
    for hidden in (frame.masks["a"], *frame.weight_columns):
        with pytest.raises(Exception, match="no column"):
            evaluate(assign(("z", col(hidden)), input_=plan), ward)


def test_a_mask_goes_with_its_column(ward: dict[str, SourceTable]) -> None:
    masked = assign(("a", fn("where", col("who"), lit(1), lit(0))), ("b", fn("is_null", col("x"))))
    frame = evaluate(masked, ward)
    dropped = evaluate({"node": "select", "input": masked, "columns": ["b", "x"]}, ward)
    assert set(dropped.masks) == {"b"}
    assert frame.masks["a"] not in dropped.schema.names()
    overwritten = evaluate(assign(("a", col("n")), input_=masked), ward)
    assert set(overwritten.masks) == {"b"} and frame.masks["a"] not in overwritten.schema.names()
    assert masks(overwritten, "a")["a"] == [True, True, False, True, True, True]
    remasked = evaluate(assign(("b", lit(3)), input_=masked), ward)
    assert masks(remasked, "b")["b"] == [False] * 6
    assert len(remasked.schema.names()) == len(remasked.columns) + 4  # the record id, two masks, the weights


def test_a_plan_name_equal_to_a_hidden_one_moves_the_hidden_column(ward: dict[str, SourceTable]) -> None:
    masked = assign(("a", fn("where", col("who"), lit(1), lit(0))))
    frame = evaluate(masked, ward)
    mask_name = frame.masks["a"]
    record_name = next(name for _, name in frame.records or ())
    clash = evaluate(assign((mask_name, col("n")), (record_name, col("x")), input_=masked), ward)
    assert clash.columns[-2:] == [mask_name, record_name]
    assert masks(clash, "a", mask_name) == {"a": [False] * 6, mask_name: [True, True, False, True, True, True]}
    assert ids(clash) == [[0, 1, 2, 3, 4, 5]]
    assert str(clash.table.column(record_name)) == str(WARD.column("x"))  # NaN included


def test_records_and_masks_survive_sealing(ward: dict[str, SourceTable]) -> None:
    plan = {
        "node": "filter",
        "input": assign(("a", fn("where", col("who"), lit(1), col("n")))),
        "predicate": fn("ne", col("g"), lit("b")),
    }
    frame = evaluate(plan, ward)
    table, records, mask_columns = frame.sealed_form()
    assert [column for _, column in mask_columns] == ["a"]
    back = SourceTable.from_arrow(table, frame.lineage, frame.datasets, records, mask_columns)
    assert back.columns == frame.columns
    assert back.table.to_pandas().equals(frame.table.to_pandas())  # NaN equal to NaN
    assert ids(back) == ids(frame) == [[0, 1, 2]]
    assert masks(back, *frame.columns) == masks(frame, *frame.columns)
    assert masks(back, "a")["a"] == [False, True, False]  # who: T F T, n: 10 20 null


def test_a_value_built_without_a_mask_is_plain() -> None:
    value = Value(pl.col("x"), pl.Int64, frozenset(), "column 'x' (int64)")
    assert value.contributes is None


def open_policy() -> OutputPolicy:
    return OutputPolicy(
        id="ward",
        allow=frozenset(RELEASE_KINDS),
        min_group_size=1,
        never_release=frozenset(),
        max_rows=None,
        sources=("ward",),
    )
