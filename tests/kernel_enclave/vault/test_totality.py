"""Total evaluation: whether a plan fails, its error text and its result's type never depend on row values.

A plan is type-checked against the schema before a row is read; after that, every operation is defined on every
value (what SQL's ``TRY_CAST`` does: undefined results are null). Were it otherwise, a request could fail only when
one record's value lies in some range, and the failure (or its text, or the result's type) would tell the analyst
that value's bin. Each test runs the same plan over data that differ only in their values: ordinary values, the
awkward ones (NaN, infinities, zero divisors, negative exponents, extremes, unparsable strings) and no rows at all,
and requires the same outcome: the same error text, or success with the same result type.
"""

from __future__ import annotations

import itertools
import math
import operator
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped]  # pyarrow ships no type information
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plan_json import col, fn, lit, src

from kernel_enclave.vault import plan as plan_module
from kernel_enclave.vault.plan import _FUNCTIONS, SourceTable, evaluate
from kernel_enclave.vault.protocol import VaultError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
CANARY = "CANARY-51d0"


def naive(year: int, month: int, day: int, hour: int = 0) -> datetime:
    """A wall-clock time, as a timezone-less Arrow timestamp column holds it."""
    return datetime(year, month, day, hour, tzinfo=UTC).replace(tzinfo=None)


def assign(expr: dict[str, Any]) -> dict[str, Any]:
    return {"node": "assign", "input": src(), "columns": [["out", expr]]}


def sources(columns: dict[str, pa.Array]) -> dict[str, SourceTable]:
    return {"t": SourceTable.from_dataset("d", pa.table(columns))}


def outcome(plan: dict[str, Any], data: dict[str, SourceTable]) -> tuple[str, str]:
    """What the analyst could observe of a plan's evaluation, short of released values: its error or its type."""
    try:
        result = evaluate(plan, data)
    except VaultError as exc:
        return ("refused before reading rows", str(exc))
    try:
        table = result.table
    except VaultError as exc:
        return ("failed while reading rows", str(exc))
    return ("evaluated", str(table.schema.field("out").type))


def values(plan: dict[str, Any], data: dict[str, SourceTable]) -> list[Any]:
    return list(evaluate(plan, data).table.column("out").to_pylist())


# -- the checks that used to depend on values -----------------------------------------------------------------

# Each column once with ordinary values and once with the values that used to make a request fail.
ORDINARY = {
    "f": pa.array([1.5, -2.75, 3.0, 40.25], pa.float64()),
    "i": pa.array([7, -7, 3, 2], pa.int64()),
    "d": pa.array([2, 3, 4, 1], pa.int64()),
    "u": pa.array([1, 2, 3, 4], pa.uint64()),
    "s": pa.array(["12", "-3", "7", "0"]),
}
AWKWARD = {
    "f": pa.array([float("nan"), float("inf"), float("-inf"), 1e300], pa.float64()),
    "i": pa.array([7, INT64_MIN, 3, INT64_MAX], pa.int64()),
    "d": pa.array([0, -1, -4, 2**40], pa.int64()),
    "u": pa.array([2**64 - 1, 2, 2**63, 4], pa.uint64()),
    "s": pa.array([CANARY, "", "1e3", "9" * 30]),
}

# (plan, the rows of AWKWARD where the result is undefined and must be null)
FORMER_FAILURES = {
    "cast of NaN, infinities and huge floats to int64": (assign(fn("cast", col("f"), type="int64")), [0, 1, 2, 3]),
    "cast of unparsable strings to int64": (assign(fn("cast", col("s"), type="int64")), [0, 1, 2, 3]),
    "cast of unparsable strings to float64": (assign(fn("cast", col("s"), type="float64")), [0, 1]),
    "cast of uint64 beyond int64 to int64": (assign(fn("cast", col("u"), type="int64")), [0, 2]),
    "integer power with negative or huge exponents": (assign(fn("pow", col("i"), col("d"))), [1, 2, 3]),
    "integer floor division by zero": (assign(fn("floordiv", col("i"), col("d"))), [0]),
    "integer remainder by zero": (assign(fn("mod", col("i"), col("d"))), [0]),
    "floor division of uint64 beyond int64": (assign(fn("floordiv", col("u"), col("d"))), [0, 2]),
}


@pytest.mark.parametrize("case", sorted(FORMER_FAILURES))
def test_a_former_failure_has_the_same_outcome_whatever_the_values(case: str) -> None:
    plan, undefined = FORMER_FAILURES[case]
    ordinary, awkward, empty = sources(ORDINARY), sources(AWKWARD), sources({k: v[:0] for k, v in ORDINARY.items()})
    expected = outcome(plan, ordinary)
    assert expected[0] == "evaluated"
    assert outcome(plan, awkward) == expected
    assert outcome(plan, empty) == expected
    got = values(plan, awkward)
    assert [i for i, v in enumerate(got) if v is None] == undefined, got
    assert None not in values(plan, ordinary)


def test_integer_division_keeps_its_type_and_python_results_where_defined() -> None:
    """pandas makes the whole column float when one divisor is zero; the type here never depends on the data."""
    data = sources(AWKWARD)
    for name, op in (("floordiv", operator.floordiv), ("mod", operator.mod)):
        got = values(assign(fn(name, col("i"), col("d"))), data)
        assert got[0] is None
        assert got[2:] == [op(3, -4), op(INT64_MAX, 2**40)], name
        assert outcome(assign(fn(name, col("i"), col("d"))), data)[1] == "int64"


def test_a_power_takes_its_type_from_the_plan() -> None:
    data = sources(ORDINARY)
    assert outcome(assign(fn("pow", col("i"), lit(2))), data)[1] == "int64"
    assert outcome(assign(fn("pow", col("i"), col("d"))), data)[1] == "int64"
    assert outcome(assign(fn("pow", col("i"), lit(-1))), data)[1] == "double"  # as Python's 2 ** -1
    assert outcome(assign(fn("pow", col("i"), lit(0.5))), data)[1] == "double"
    assert values(assign(fn("pow", col("i"), lit(-1))), data) == [1 / 7, -1 / 7, 1 / 3, 0.5]
    assert values(assign(fn("pow", col("i"), col("d"))), data) == [49, -343, 81, 2]


def test_casts_follow_pandas_where_the_value_converts() -> None:
    data = sources(ORDINARY)
    assert values(assign(fn("cast", col("f"), type="int64")), data) == [1, -2, 3, 40]  # toward zero, as astype
    assert values(assign(fn("cast", col("s"), type="int64")), data) == [12, -3, 7, 0]
    assert values(assign(fn("cast", col("s"), type="float64")), data) == [12.0, -3.0, 7.0, 0.0]
    assert values(assign(fn("cast", col("i"), type="bool")), data) == [True, True, True, True]
    assert values(assign(fn("cast", col("f"), type="string")), data) == ["1.5", "-2.75", "3.0", "40.25"]


# -- which casts exist is a question of types ------------------------------------------------------------------

# Polars checks these casts only when a row reaches them; they are refused from the types, before any row is read.
TYPED_COLUMNS = {
    "s": pa.array(["x", None]),
    "day": pa.array([date(2024, 2, 29), None]),
    "seen": pa.array([datetime(2024, 2, 29, 12, tzinfo=UTC), None], pa.timestamp("us", tz="UTC")),
    "wait": pa.array([timedelta(days=2), None]),
    "clock": pa.array([time(8, 30), None]),
    "raw": pa.array([b"x", None]),
    "items": pa.array([[1, 2], None]),
    "pair": pa.array([{"a": 1}, None]),
}
REFUSED_CASTS = [
    ("s", "bool", "string"),
    ("day", "bool", "date32[day]"),
    ("seen", "bool", "timestamp[us, tz=UTC]"),
    ("wait", "string", "duration[us]"),
    ("wait", "int64", "duration[us]"),
    ("clock", "bool", "time64[us]"),
    ("raw", "int64", "binary"),
    ("items", "string", "list<item: int64>"),
    ("pair", "string", "struct<a: int64>"),
]


@pytest.mark.parametrize(("column", "target", "shown"), REFUSED_CASTS)
def test_a_cast_is_allowed_or_refused_by_the_types_alone(column: str, target: str, shown: str) -> None:
    plan = assign(fn("cast", col(column), type=target))
    expected = ("refused before reading rows", f"cast to {target} is not supported for column {column!r} ({shown})")
    assert outcome(plan, sources(TYPED_COLUMNS)) == expected
    assert outcome(plan, sources({k: v[:0] for k, v in TYPED_COLUMNS.items()})) == expected
    assert outcome(plan, sources({k: v[1:] for k, v in TYPED_COLUMNS.items()})) == expected  # nulls only


# -- every function, every type, every awkward value ------------------------------------------------------------

# One column of each type the vault reads, each with the values most likely to break an operation.
EDGES: dict[str, pa.Array] = {
    "i64": pa.array([INT64_MIN, -1, 0, 1, INT64_MAX, None], pa.int64()),
    "i8": pa.array([-128, -1, 0, 1, 127, None], pa.int8()),
    "u64": pa.array([0, 1, 2, 3, 2**64 - 1, None], pa.uint64()),
    "f32": pa.array([float("nan"), float("inf"), -0.0, 1.5, 3e38, None], pa.float32()),
    "f64": pa.array([float("nan"), float("-inf"), 0.0, -1.5, 1e308, None], pa.float64()),
    "dec": pa.array(
        [Decimal("-1.5"), Decimal(0), Decimal("9" * 37 + ".9"), Decimal(1), Decimal(2), None], pa.decimal128(38, 1)
    ),
    "str": pa.array([CANARY, "1", "", "2024-01-01", "9" * 30, None]),
    "cat": pa.array(["a", "b", "a", "c", CANARY, None]).dictionary_encode(),
    "bool": pa.array([True, False, True, False, True, None]),
    "date": pa.array([date(1, 1, 1), date(9999, 12, 31), date(1970, 1, 1), date(2024, 2, 29), date(2000, 1, 1), None]),
    "ts": pa.array(
        [naive(1, 1, 1), naive(9999, 12, 31, 23), naive(1970, 1, 1), naive(2024, 2, 29), None, None],
        pa.timestamp("us"),
    ),
    "tstz": pa.array([0, 2**62, -(2**62), 1, 2, None], pa.timestamp("ns", tz="Europe/Paris")),
    "dur": pa.array([timedelta(0), timedelta(days=10**6), timedelta(-1), timedelta(1), timedelta(2), None]),
    "time": pa.array([time(0), time(23), time(1), time(2), time(3), None]),
    "bin": pa.array([b"x", b"1", b"", b"a", b"b", None]),
    "list": pa.array([[1], [2, 3], [], [None], [4], None]),
    "struct": pa.array([{"a": 1}, {"a": 2}, {"a": 3}, {"a": None}, {"a": 4}, None]),
    "null": pa.nulls(6),
}
# The same types with plain values and no nulls: an operation may behave differently once no value is missing.
PLAIN: dict[str, pa.Array] = {
    "i64": pa.array([5, 6, 7, 8, 9, 10], pa.int64()),
    "i8": pa.array([5, 6, 7, 8, 9, 10], pa.int8()),
    "u64": pa.array([5, 6, 7, 8, 9, 10], pa.uint64()),
    "f32": pa.array([0.5, 1.5, 2.5, 3.5, 4.5, 5.5], pa.float32()),
    "f64": pa.array([0.5, 1.5, 2.5, 3.5, 4.5, 5.5], pa.float64()),
    "dec": pa.array([Decimal("0.5")] * 6, pa.decimal128(38, 1)),
    "str": pa.array(["5", "6", "7", "8", "9", "10"]),
    "cat": pa.array(["a", "b", "a", "b", "a", "b"]).dictionary_encode(),
    "bool": pa.array([True, False] * 3),
    "date": pa.array([date(2024, 1, day) for day in range(1, 7)]),
    "ts": pa.array([naive(2024, 1, day) for day in range(1, 7)], pa.timestamp("us")),
    "tstz": pa.array(list(range(6)), pa.timestamp("ns", tz="Europe/Paris")),
    "dur": pa.array([timedelta(days=day) for day in range(6)]),
    "time": pa.array([time(hour) for hour in range(6)]),
    "bin": pa.array([b"a"] * 6),
    "list": pa.array([[1]] * 6),
    "struct": pa.array([{"a": 1}] * 6),
    "null": pa.nulls(6),
}
LITERALS = [0, -1, 2**40, 1.5, "x", "2024-01-01", True, None]
LEAVES = [col(name) for name in EDGES] + [lit(value) for value in LITERALS]
OPTIONS: dict[str, list[dict[str, Any]]] = {
    "isin": [{"values": [1, "x", None]}, {"values": [1.5]}, {"values": ["2024-01-01"]}],
    "round": [{"ndigits": 2}, {"ndigits": -2}],
    "startswith": [{"prefix": "x"}],
    "cast": [{"type": name} for name in ("int64", "float64", "string", "bool")],
    "over": [{"func": f, "by": [b]} for f in ("rank", "sum", "mean", "count") for b in ("cat", "f64", "list", "date")],
}


def _expressions(name: str) -> list[dict[str, Any]]:
    arity = _FUNCTIONS[name][0]
    if arity == 3:  # a column first, then a sample of the rest: the full product is large and adds nothing
        columns = [col(c) for c in EDGES]
        combos: Any = itertools.product(columns, LEAVES[::3], LEAVES[1::4])
    else:
        combos = itertools.product(LEAVES, repeat=arity)
    return [
        fn(name, *args, **options)
        for args in combos
        if any("col" in arg for arg in args)
        for options in OPTIONS.get(name, [{}])
    ]


@pytest.mark.parametrize("name", sorted(_FUNCTIONS))
def test_no_function_fails_or_changes_type_because_of_the_values(name: str) -> None:
    """Over edge values, plain values and no rows, every expression has one outcome, decided by the plan."""
    datasets = [sources(EDGES), sources(PLAIN), sources({k: v[:0] for k, v in EDGES.items()})]
    differing = []
    for expression in _expressions(name):
        plan = assign(expression)
        seen = [outcome(plan, data) for data in datasets]
        if seen[0][0] == "failed while reading rows" or len(set(seen)) != 1:
            differing.append((expression, seen))
        assert not any(CANARY in text for _, text in seen)
    assert not differing, f"{len(differing)} expressions depend on the values, e.g. {differing[:3]}"


# -- random values never make an arithmetic or a cast fail -----------------------------------------------------

floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0, 1e308, -1e308, 2.0**63])
ints = st.integers(INT64_MIN, INT64_MAX) | st.sampled_from([0, -1, 1, 2**32, INT64_MIN, INT64_MAX])
texts = st.text(max_size=6) | st.sampled_from(["1", "-2", "1e3", "nan", "inf", " 3", "9" * 25])
operations = st.sampled_from(["add", "sub", "mul", "pow", "truediv", "floordiv", "mod"])
operands = st.sampled_from([col("x"), col("y"), col("n"), col("m")]) | st.builds(
    lit, st.integers(-(2**40), 2**40) | st.floats(allow_nan=False, allow_infinity=False, width=32)
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    x=st.lists(st.none() | floats, min_size=1, max_size=6),
    n=st.lists(st.none() | ints, min_size=1, max_size=6),
    s=st.lists(st.none() | texts, min_size=1, max_size=6),
    operation=operations,
    left=operands,
    right=operands,
    target=st.sampled_from(["int64", "float64", "string"]),
)
def test_random_values_never_make_a_cast_or_an_arithmetic_fail(
    x: list[float | None],
    n: list[int | None],
    s: list[str | None],
    operation: str,
    left: dict[str, Any],
    right: dict[str, Any],
    target: str,
) -> None:
    rows = min(len(x), len(n), len(s))
    columns = {
        "x": pa.array(x[:rows], pa.float64()),
        "y": pa.array(list(reversed(x[:rows])), pa.float64()),
        "n": pa.array(n[:rows], pa.int64()),
        "m": pa.array(list(reversed(n[:rows])), pa.int64()),
        "s": pa.array(s[:rows], pa.string()),
    }
    data, empty = sources(columns), sources({k: v[:0] for k, v in columns.items()})
    for expression in (
        fn(operation, left, right),
        fn("cast", fn(operation, left, right), type=target),
        fn("cast", col("x"), type=target),
        fn("cast", col("s"), type=target),
    ):
        plan = assign(expression)
        seen = outcome(plan, data)
        assert seen[0] == "evaluated", (expression, seen)
        assert outcome(plan, empty) == seen
    floor = values(assign(fn("floordiv", col("n"), col("m"))), data)
    remainder = values(assign(fn("mod", col("n"), col("m"))), data)
    for a, b, q, r in zip(columns["n"].to_pylist(), columns["m"].to_pylist(), floor, remainder, strict=True):
        if a is None or b is None or b == 0:
            assert q is None and r is None
        elif not (a == INT64_MIN and b == -1):  # the one quotient beyond int64 wraps, as in NumPy
            assert (q, r) == (a // b, a % b)
    as_int = values(assign(fn("cast", col("x"), type="int64")), data)
    for value, converted in zip(columns["x"].to_pylist(), as_int, strict=True):
        if value is None or not math.isfinite(value) or not INT64_MIN <= math.trunc(value) <= INT64_MAX:
            assert converted is None
        elif abs(value) < 2.0**63:
            assert converted == math.trunc(value)
    powers = values(assign(fn("pow", col("n"), col("m"))), data)
    for base, exponent, power in zip(columns["n"].to_pylist(), columns["m"].to_pylist(), powers, strict=True):
        if base is None or exponent is None or not 0 <= exponent < 2**32:
            assert power is None
        elif abs(base) <= 1 or exponent <= 8:
            wrapped = (base**exponent + 2**63) % 2**64 - 2**63  # int64 overflow wraps, as in NumPy
            assert power == wrapped


# -- fills and joins decide from the types and the datasets' load-time facts --------------------------------------


def test_a_fill_with_a_column_of_another_kind_is_refused_whether_or_not_a_row_has_a_null() -> None:
    with_nulls = {k: EDGES[k] for k in ("i64", "u64", "f64", "date", "tstz", "ts", "struct", "dur", "list")}
    without_nulls = {k: PLAIN[k] for k in with_nulls}
    for data, fill in (("struct", "i64"), ("u64", "date"), ("date", "tstz"), ("dur", "dur"), ("list", "f64")):
        plan = assign(fn("fill_null", col(data), col(fill)))
        seen = {outcome(plan, sources(columns)) for columns in (with_nulls, without_nulls)}
        assert seen == {("refused before reading rows", outcome(plan, sources(with_nulls))[1])}, (data, fill)
        assert "fill_null: the types of" in seen.pop()[1]
    # The legitimate twin: numbers fill numbers, whatever their widths, and the values come back.
    numbers = {
        "n": pa.array([1, None, 3], pa.int64()),
        "x": pa.array([0.5, 2.5, None]),
        "u": pa.array([9, 8, 7], pa.uint8()),
    }
    assert values(assign(fn("fill_null", col("n"), col("x"))), sources(numbers)) == [1.0, 2.5, 3.0]
    assert values(assign(fn("fill_null", col("n"), col("u"))), sources(numbers)) == [1, 8, 3]
    assert values(assign(fn("fill_null", col("x"), lit(0))), sources(numbers)) == [0.5, 2.5, 0.0]


def join(left: str, right: str, on: str, how: str = "inner") -> dict[str, Any]:
    return {
        "node": "join",
        "left": {"node": "source", "handle": left},
        "right": {"node": "source", "handle": right},
        "on": [on],
        "how": how,
    }


def two(left: dict[str, pa.Array], right: dict[str, pa.Array]) -> dict[str, SourceTable]:
    return {"l": SourceTable.from_dataset("dl", pa.table(left)), "r": SourceTable.from_dataset("dr", pa.table(right))}


def test_a_join_of_uint64_and_int64_keys_has_one_outcome_whatever_the_key_values() -> None:
    right = {"k": pa.array([1, 2, 3], pa.int64()), "v": pa.array([10, 20, 30], pa.int64())}
    small = {"k": pa.array([1, 2, 5], pa.uint64())}
    huge = {"k": pa.array([1, 2**63, 2**64 - 1], pa.uint64())}
    for how in ("inner", "left", "outer"):
        plan = {"node": "assign", "input": join("l", "r", "k", how), "columns": [["out", col("v")]]}
        seen = [outcome(plan, two(keys, right)) for keys in (small, huge)]
        assert seen[0][0] == "evaluated" and seen[0] == seen[1], (how, seen)
    # A key beyond int64 matches nothing; the others meet their partners.
    got = evaluate(join("l", "r", "k"), two(huge, right)).table
    assert got.column("v").to_pylist() == [10]
    assert evaluate(join("l", "r", "k"), two(small, right)).table.column("v").to_pylist() == [10, 20]


def test_the_join_size_limit_is_decided_by_the_datasets_never_by_the_rows_a_request_reaches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refusal that counted the pairs the keys make would tell whether keys repeat among the rows a filter keeps."""
    monkeypatch.setattr(plan_module, "MAX_JOIN_ROWS", 110)  # 10 x 10 rows: 100 pairs and 20 rows exceed it
    repeated = {"k": pa.array([1, 1, 2, 3, 4, 5, 6, 7, 8, 9]), "a": pa.array(range(10))}
    other = {"k": pa.array([1, 1, 2, 3, 4, 5, 6, 7, 8, 9]), "b": pa.array(range(10))}
    distinct_kept = {
        "node": "filter",
        "input": {"node": "source", "handle": "l"},
        "predicate": fn("ge", col("a"), lit(1)),
    }
    plans = [
        join("l", "r", "k"),
        {**join("l", "r", "k"), "left": distinct_kept},  # the rows kept hold each key once
        {**join("l", "r", "k"), "left": {**distinct_kept, "predicate": fn("ge", col("a"), lit(100))}},  # no rows
    ]
    for data in (two(repeated, other), two({**repeated, "k": pa.array([5] * 10)}, other)):
        seen = {outcome({"node": "assign", "input": p, "columns": [["out", col("a")]]}, data) for p in plans}
        assert len(seen) == 1
        kind, message = seen.pop()
        assert kind == "refused before reading rows" and "join: the result could have more than 110 rows" in message
    # The legitimate twin: a key found unique when its dataset was loaded bounds the result by the other side.
    unique = {"k": pa.array(range(10)), "b": pa.array(range(10))}
    for p in plans:
        got = evaluate({"node": "select", "input": p, "columns": ["a", "b"]}, two(repeated, unique)).table
        assert got.num_rows == {0: 10, 1: 9, 2: 0}[plans.index(p)]
    filtered_right = {
        **join("l", "r", "k"),
        "right": {
            "node": "filter",
            "input": {"node": "source", "handle": "r"},
            "predicate": fn("ge", col("b"), lit(5)),
        },
    }
    assert sorted(evaluate(filtered_right, two(repeated, unique)).table.column("a").to_pylist()) == [5, 6, 7, 8, 9]


# -- what an error says ---------------------------------------------------------------------------------------


def test_errors_name_what_the_analyst_wrote_and_never_a_value() -> None:
    data = sources(EDGES)
    for plan, expected in (
        (assign(fn("cast", col("str"), type="bool")), "cast to bool is not supported for column 'str' (string)"),
        (assign(fn("add", col("str"), lit(1))), "add needs numbers; column 'str' (string) is not numeric"),
        (
            assign(fn("over", col("str"), func="sum", by=["cat"])),
            "over (sum) needs numbers; column 'str' (string) is not numeric",
        ),
    ):
        kind, message = outcome(plan, data)
        assert (kind, message) == ("refused before reading rows", expected)
        assert CANARY not in message
