"""Column expressions build the vault spec's expression JSON, and refuse Python idioms that mean something else."""

from __future__ import annotations

import copy
import json
import math
import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import confnb.analyst as cn
from confnb.analyst.expr import Column, Expr

A = {"col": "a"}
B = {"col": "b"}


def fn(name: str, *args: Any, **options: Any) -> dict[str, Any]:
    return {"fn": name, "args": list(args), **options}


def lit(value: Any) -> dict[str, Any]:
    return {"lit": value}


# -- operators --------------------------------------------------------------------------------------------


BINARY: list[tuple[Callable[[Any, Any], Any], str]] = [
    (operator.eq, "eq"),
    (operator.ne, "ne"),
    (operator.lt, "lt"),
    (operator.le, "le"),
    (operator.gt, "gt"),
    (operator.ge, "ge"),
    (operator.add, "add"),
    (operator.sub, "sub"),
    (operator.mul, "mul"),
    (operator.truediv, "truediv"),
    (operator.floordiv, "floordiv"),
    (operator.mod, "mod"),
    (operator.pow, "pow"),
    (operator.and_, "and"),
    (operator.or_, "or"),
    (operator.xor, "xor"),
]


@pytest.mark.parametrize(("op", "name"), BINARY, ids=[name for _, name in BINARY])
def test_binary_operators_between_columns(op: Callable[[Any, Any], Any], name: str) -> None:
    assert op(cn.col("a"), cn.col("b")).to_json() == fn(name, A, B)


@pytest.mark.parametrize(("op", "name"), BINARY, ids=[name for _, name in BINARY])
def test_constant_on_the_left_keeps_operand_order(op: Callable[[Any, Any], Any], name: str) -> None:
    """``2 - t["a"]`` is sub(2, a), not sub(a, 2); comparisons reflect as Python defines (2 < a is a > 2)."""
    reflected = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le"}
    built = op(2, cn.col("a")).to_json() if name not in ("and", "or", "xor") else op(True, cn.col("a")).to_json()
    constant = lit(True) if name in ("and", "or", "xor") else lit(2)
    if name in reflected:
        assert built == fn(reflected[name], A, constant)
    elif name in ("eq", "ne"):
        assert built == fn(name, A, constant)
    else:
        assert built == fn(name, constant, A)


def test_unary_operators() -> None:
    a = cn.col("a")
    assert (-a).to_json() == fn("neg", A)
    assert (+a).to_json() == A
    assert abs(a).to_json() == fn("abs", A)
    assert (~a).to_json() == fn("not", A)
    assert round(a, 2).to_json() == fn("round", A, ndigits=2)
    assert round(a).to_json() == fn("round", A, ndigits=0)


def test_named_comparison_methods_match_operators() -> None:
    a = cn.col("a")
    for method in ("eq", "ne", "lt", "le", "gt", "ge"):
        assert getattr(a, method)(1).to_json() == fn(method, A, lit(1))


@pytest.mark.parametrize(
    "misuse",
    [
        lambda a, b: (a > 1) and (b < 2),
        lambda a, b: (a > 1) or (b < 2),
        lambda a, b: not (a > 1),
        lambda a, b: 1 < a < 3,
        lambda a, b: bool(a == b),
        lambda a, b: 1 if a else 0,
    ],
    ids=["and", "or", "not", "chained", "bool", "if"],
)
def test_truth_value_is_refused_with_the_fix(misuse: Callable[[Any, Any], Any]) -> None:
    with pytest.raises(TypeError, match=r"& \| ~ instead of and/or/not"):
        misuse(cn.col("a"), cn.col("b"))


def test_expressions_are_unhashable_and_not_iterable() -> None:
    with pytest.raises(TypeError):
        hash(cn.col("a"))
    with pytest.raises(TypeError, match="cannot be iterated"):
        list(cn.col("a"))


# -- methods ----------------------------------------------------------------------------------------------


def test_isin_takes_constants_only() -> None:
    a = cn.col("a")
    assert a.isin(["x", "y"]).to_json() == fn("isin", A, values=["x", "y"])
    assert a.isin((1, np.int64(2))).to_json() == fn("isin", A, values=[1, 2])
    assert a.isin(np.array([1.5, 2.5])).to_json() == fn("isin", A, values=[1.5, 2.5])
    assert a.isin([]).to_json() == fn("isin", A, values=[])
    with pytest.raises(TypeError, match="list of constants"):
        a.isin("xy")
    with pytest.raises(TypeError, match="list of constants"):
        a.isin(cn.col("b"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="constants"):
        a.isin([cn.col("b")])


def test_null_tests_and_fill() -> None:
    a = cn.col("a")
    assert a.isnull().to_json() == a.isna().to_json() == fn("is_null", A)
    assert a.notnull().to_json() == a.notna().to_json() == fn("not_null", A)
    assert a.fillna(0).to_json() == fn("fill_null", A, lit(0))
    assert a.fillna(cn.col("b")).to_json() == fn("fill_null", A, B)


def test_between_follows_pandas_inclusive() -> None:
    a = cn.col("a")
    assert a.between(1, 5).to_json() == fn("between", A, lit(1), lit(5))
    assert a.between(1, 5, inclusive="neither").to_json() == fn("and", fn("gt", A, lit(1)), fn("lt", A, lit(5)))
    assert a.between(1, 5, inclusive="left").to_json() == fn("and", fn("ge", A, lit(1)), fn("lt", A, lit(5)))
    assert a.between(1, 5, inclusive="right").to_json() == fn("and", fn("gt", A, lit(1)), fn("le", A, lit(5)))
    with pytest.raises(ValueError, match="inclusive"):
        a.between(1, 5, inclusive="sometimes")


def test_math_functions() -> None:
    a = cn.col("a")
    assert a.abs().to_json() == fn("abs", A)
    assert a.log().to_json() == fn("log", A)
    assert a.exp().to_json() == fn("exp", A)
    assert a.sqrt().to_json() == fn("sqrt", A)
    assert a.round(1).to_json() == fn("round", A, ndigits=1)
    with pytest.raises(TypeError, match="integer"):
        a.round(1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("dtype", "name"),
    [
        (int, "int64"),
        (float, "float64"),
        (str, "string"),
        (bool, "bool"),
        ("int64", "int64"),
        ("Int64", "int64"),
        ("float", "float64"),
        ("string", "string"),
        ("boolean", "bool"),
        (np.int64, "int64"),
        (np.float64, "float64"),
        (np.dtype("float64"), "float64"),
        (np.bool_, "bool"),
    ],
)
def test_astype_names(dtype: object, name: str) -> None:
    assert cn.col("a").astype(dtype).to_json() == fn("cast", A, type=name)


@pytest.mark.parametrize("dtype", ["float32", np.int8, "category", object, "datetime64[ns]"])
def test_astype_refuses_types_the_vault_does_not_cast_to(dtype: object) -> None:
    with pytest.raises(TypeError, match="astype supports int64, float64, string, bool"):
        cn.col("a").astype(dtype)


def test_datetime_parts() -> None:
    when = {"col": "when"}
    w = cn.col("when")
    assert w.dt.year.to_json() == fn("year", when)
    assert w.dt.month.to_json() == fn("month", when)
    assert w.dt.day.to_json() == fn("day", when)
    assert w.dt.hour.to_json() == fn("hour", when)
    assert w.dt.weekday.to_json() == w.dt.dayofweek.to_json() == w.dt.day_of_week.to_json() == fn("weekday", when)


def test_string_methods() -> None:
    s = cn.col("s")
    node = {"col": "s"}
    assert s.str.lower().to_json() == fn("lower", node)
    assert s.str.upper().to_json() == fn("upper", node)
    assert s.str.len().to_json() == fn("len", node)
    assert s.str.startswith("ab").to_json() == fn("startswith", node, prefix="ab")
    assert s.str.startswith(("a", "b")).to_json() == fn(
        "or", fn("startswith", node, prefix="a"), fn("startswith", node, prefix="b")
    )
    with pytest.raises(TypeError, match="startswith"):
        s.str.startswith(1)  # type: ignore[arg-type]


def test_where_and_lit() -> None:
    built = cn.where(cn.col("a") > 40, "old", cn.col("b"))
    assert built.to_json() == fn("where", fn("gt", A, lit(40)), lit("old"), B)
    assert cn.lit("x").to_json() == lit("x")
    with pytest.raises(TypeError, match="condition must be a column expression"):
        cn.where(True, 1, 2)


# -- literals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, 1),
        (-2.5, -2.5),
        ("x", "x"),
        (True, True),
        (None, None),
        (np.int32(7), 7),
        (np.float64(0.5), 0.5),
        (np.bool_(False), False),
        (np.str_("y"), "y"),
        (pd.NA, None),
    ],
)
def test_literals_become_json_scalars(value: object, expected: object) -> None:
    node = (cn.col("a") == value).to_json()
    assert node == fn("eq", A, lit(expected))
    assert type(node["args"][1]["lit"]) is type(expected)
    json.dumps(node, allow_nan=False)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, np.float64("nan")])
def test_nan_is_not_a_literal(value: float) -> None:
    with pytest.raises(ValueError, match=r"\.isnull\(\)"):
        cn.col("a") == value  # noqa: B015


@pytest.mark.parametrize("value", [pd.Timestamp("1987-06-05"), b"bytes", [1, 2], {"k": 1}, object()])
def test_other_objects_are_refused_naming_the_type_only(value: object) -> None:
    with pytest.raises(TypeError) as caught:
        cn.col("a") < value  # noqa: B015
    assert type(value).__name__ in str(caught.value)
    assert "1987" not in str(caught.value)


# -- structure --------------------------------------------------------------------------------------------


def test_to_json_is_a_copy_and_columns_lists_inputs() -> None:
    expr = (cn.col("a") + cn.col("b") * 2 > cn.col("c")) & cn.col("d").isin([1])
    assert expr.columns() == {"a", "b", "c", "d"}
    node = expr.to_json()
    node["args"].clear()
    assert expr.to_json()["args"]
    assert copy.deepcopy(expr).to_json() == expr.to_json()


def test_column_names_and_reprs() -> None:
    assert repr(cn.col("age")) == "<Column 'age'>"
    assert repr(cn.col("a") > 1) == "<Expr gt([a], 1)>"
    assert isinstance(cn.col("a"), Column)
    assert not isinstance(cn.col("a") + 1, Column)
    with pytest.raises(TypeError, match="non-empty string"):
        Column("")


@pytest.mark.parametrize("stat", ["mean", "sum", "count", "min", "max", "std", "var", "median", "nunique"])
def test_statistics_need_a_column_taken_from_a_table(stat: str) -> None:
    with pytest.raises(TypeError, match=rf"t\['age'\]\.{stat}\(\)"):
        getattr(cn.col("a"), stat)()


def test_value_counts_options_that_would_mislead_are_refused() -> None:
    with pytest.raises(ValueError, match="suppressed"):
        cn.col("a").value_counts(normalize=True)


# -- semantics: an interpreter of the JSON agrees with pandas on the same Python expression ---------------

_PANDAS_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "eq": operator.eq,
    "ne": operator.ne,
    "lt": operator.lt,
    "le": operator.le,
    "gt": operator.gt,
    "ge": operator.ge,
    "and": operator.and_,
    "or": operator.or_,
    "xor": operator.xor,
}


def _interpret(node: dict[str, Any], frame: pd.DataFrame) -> Any:
    """A reference evaluator for the subset of the spec the property below generates (test-only)."""
    if "col" in node:
        return frame[node["col"]]
    if "lit" in node:
        return node["lit"]
    args = [_interpret(arg, frame) for arg in node["args"]]
    name = node["fn"]
    if name in _PANDAS_BINARY:
        return _PANDAS_BINARY[name](*args)
    if name == "neg":
        return -args[0]
    if name == "not":
        return ~args[0]
    if name == "abs":
        return abs(args[0])
    if name == "isin":
        return args[0].isin(node["values"])
    if name == "between":
        return args[0].between(args[1], args[2])
    if name == "where":
        return (
            args[1].where(args[0], args[2])
            if isinstance(args[1], pd.Series)
            else pd.Series(np.where(args[0], args[1], args[2]), index=frame.index)
        )
    raise AssertionError(f"unexpected fn {name}")


_numeric_ops = st.sampled_from(["+", "-", "*", "r-", "neg", "abs"])
_compare_ops = st.sampled_from(["<", "<=", ">", ">=", "==", "!=", "between", "isin"])
_logic_ops = st.sampled_from(["&", "|", "^", "~"])


@st.composite
def _numeric(draw: st.DrawFn, depth: int = 2) -> tuple[Any, Callable[[pd.DataFrame], Any]]:
    """A numeric expression and the same computation as a pandas function of the frame."""
    if depth == 0 or draw(st.booleans()):
        name = draw(st.sampled_from(["a", "b"]))
        return cn.col(name), lambda f: f[name]
    left, left_pd = draw(_numeric(depth - 1))
    op = draw(_numeric_ops)
    k = draw(st.integers(-5, 5))
    if op == "neg":
        return -left, lambda f: -left_pd(f)
    if op == "abs":
        return abs(left), lambda f: abs(left_pd(f))
    if op == "r-":
        return k - left, lambda f: k - left_pd(f)
    right, right_pd = draw(_numeric(depth - 1))
    python_op = {"+": operator.add, "-": operator.sub, "*": operator.mul}[op]
    return python_op(left, right), lambda f: python_op(left_pd(f), right_pd(f))


@st.composite
def _predicate(draw: st.DrawFn, depth: int = 2) -> tuple[Any, Callable[[pd.DataFrame], Any]]:
    if depth == 0 or draw(st.booleans()):
        value, value_pd = draw(_numeric())
        op = draw(_compare_ops)
        k = draw(st.integers(-20, 20))
        if op == "between":
            return value.between(k, k + 5), lambda f: value_pd(f).between(k, k + 5)
        if op == "isin":
            ks = [k, k + 1, -k]
            return value.isin(ks), lambda f: value_pd(f).isin(ks)
        python_op = {
            "<": operator.lt,
            "<=": operator.le,
            ">": operator.gt,
            ">=": operator.ge,
            "==": operator.eq,
            "!=": operator.ne,
        }[op]
        return python_op(value, k), lambda f: python_op(value_pd(f), k)
    left, left_pd = draw(_predicate(depth - 1))
    op = draw(_logic_ops)
    if op == "~":
        return ~left, lambda f: ~left_pd(f)
    right, right_pd = draw(_predicate(depth - 1))
    python_op = {"&": operator.and_, "|": operator.or_, "^": operator.xor}[op]
    return python_op(left, right), lambda f: python_op(left_pd(f), right_pd(f))


@settings(max_examples=200, deadline=None)
@given(
    built=_predicate(),
    a=st.lists(st.integers(-10, 10), min_size=5, max_size=5),
    b=st.lists(st.integers(-10, 10), min_size=5, max_size=5),
)
def test_expression_json_means_what_the_python_expression_means(
    built: tuple[Expr, Callable[[pd.DataFrame], Any]], a: list[int], b: list[int]
) -> None:
    expr, as_pandas = built
    frame = pd.DataFrame({"a": a, "b": b})
    node = json.loads(json.dumps(expr.to_json(), allow_nan=False))  # what crosses the wire
    pd.testing.assert_series_equal(_interpret(node, frame), as_pandas(frame), check_names=False)


@settings(max_examples=100, deadline=None)
@given(
    cond=_predicate(1),
    a=st.lists(st.integers(-10, 10), min_size=4, max_size=4),
    b=st.lists(st.integers(-10, 10), min_size=4, max_size=4),
)
def test_where_selects_like_numpy(cond: tuple[Expr, Callable[[pd.DataFrame], Any]], a: list[int], b: list[int]) -> None:
    frame = pd.DataFrame({"a": a, "b": b})
    expr = cn.where(cond[0], cn.col("a"), cn.col("b"))
    expected = pd.Series(np.where(cond[1](frame), frame["a"], frame["b"]), index=frame.index)
    pd.testing.assert_series_equal(_interpret(expr.to_json(), frame), expected, check_names=False)


@given(st.one_of(st.integers(), st.text(), st.booleans(), st.none(), st.floats(allow_nan=False, allow_infinity=False)))
def test_any_json_scalar_round_trips_as_a_literal(value: object) -> None:
    node = (cn.col("a") == value).to_json()
    assert json.loads(json.dumps(node, allow_nan=False)) == fn("eq", A, lit(value))


def test_window_functions_build_over_nodes_that_name_their_group_columns() -> None:
    ranked = Column("a").rank().over("g", ["h"])
    assert ranked.to_json() == fn("over", A, func="rank", by=["g", "h"])
    assert ranked.columns() == {"a", "g", "h"}
    assert Column("a").transform("sum").over("g").to_json() == fn("over", A, func="sum", by=["g"])
    with pytest.raises(ValueError, match="transform takes one of sum, mean, count"):
        Column("a").transform("min")
    with pytest.raises(TypeError, match="over takes the names of the group columns"):
        Column("a").rank().over()
