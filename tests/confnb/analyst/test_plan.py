"""Plans a SealedTable builds, checked without a vault: the JSON is the contract, and bad requests never leave."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest

import confnb.analyst as cn
from confnb.analyst import SealedTable
from confnb.analyst.session import VaultSession

SOURCE = {"node": "source", "handle": "d1"}
POLICY = {
    "policy": {"id": "p-1"},
    "release": {"allow": ["aggregate"], "min_group_size": 10, "never_release": ["ssn"]},
    "display": {"mime": ["text/plain"], "max_output_bytes": 1000, "tracebacks": "redacted"},
}


def table(columns: list[tuple[str, str]] | None = None, handle: str = "d1", dataset: str = "claims") -> SealedTable:
    """A table as the vault's open reply describes it, on a session that is never connected (nothing is sent)."""
    reply: dict[str, Any] = {
        "handle": handle,
        "dataset": dataset,
        "columns": None if columns is None else [{"name": n, "type": t} for n, t in columns],
        "policy": POLICY,
    }
    return SealedTable._from_reply(VaultSession("/nonexistent/vault.sock"), reply)


@pytest.fixture
def t() -> SealedTable:
    return table([("age", "int64"), ("sex", "string"), ("cost", "double"), ("ssn", "string")])


def test_row_level_plans(t: SealedTable) -> None:
    assert t.plan == SOURCE
    assert t[["age", "sex"]].plan == {"node": "select", "input": SOURCE, "columns": ["age", "sex"]}
    assert t.select("age").plan["columns"] == ["age"]
    assert t[t["age"] > 40].plan == {
        "node": "filter",
        "input": SOURCE,
        "predicate": {"fn": "gt", "args": [{"col": "age"}, {"lit": 40}]},
    }
    assigned = t.assign(old=t["age"] > 60, one=1)
    assert assigned.plan == {
        "node": "assign",
        "input": SOURCE,
        "columns": [["old", {"fn": "gt", "args": [{"col": "age"}, {"lit": 60}]}], ["one", {"lit": 1}]],
    }
    assert assigned.columns == ["age", "sex", "cost", "ssn", "old", "one"]
    assert t.assign(age=t["age"] + 1).columns == ["age", "sex", "cost", "ssn"]  # replaced in place


def test_assign_sees_earlier_keywords_and_setitem_rebinds(t: SealedTable) -> None:
    chained = t.assign(a=t["age"] * 2, b=lambda d: d["a"] + 1)
    assert [name for name, _ in chained.plan["columns"]] == ["a", "b"]
    before = t.plan
    t["bmi"] = t["cost"] / 2
    assert t.plan["node"] == "assign" and t.plan["input"] == before
    assert "bmi" in t.columns


def test_join_plan_and_checks(t: SealedTable) -> None:
    other = table([("age", "int64"), ("plan", "string")], handle="d2", dataset="members")
    joined = t.join(other, on="age", how="left", suffixes=("_l", "_r"))
    assert joined.plan == {
        "node": "join",
        "left": SOURCE,
        "right": {"node": "source", "handle": "d2"},
        "on": ["age"],
        "how": "left",
        "suffixes": ["_l", "_r"],
    }
    assert joined.datasets == ("claims", "members")
    assert t.merge(other, on=["age"]).plan["how"] == "inner"
    with pytest.raises(KeyError, match="'sex'"):
        t.join(other, on="sex")
    with pytest.raises(ValueError, match="how must be one of"):
        t.join(other, on="age", how="cross")
    with pytest.raises(ValueError, match="suffixes"):
        t.join(other, on="age", suffixes=("_x", "_x"))
    with pytest.raises(TypeError, match="merge needs on"):
        t.merge(other)
    with pytest.raises(TypeError, match="another SealedTable"):
        t.join(pd.DataFrame({"age": [1]}), on="age")  # type: ignore[arg-type]


def test_aggregate_plans_follow_pandas_named_aggregation(t: SealedTable) -> None:
    result = t.group_by(["sex"]).agg(
        mean_age=("age", "mean"),
        n=pd.NamedAgg(column="age", aggfunc="count"),
        p90=("cost", "quantile", 0.9),
        rows=(None, "size"),
        q1=pd.NamedAgg(column="cost", aggfunc="quantile", q=0.25),
        q3=pd.NamedAgg("cost", "quantile", 0.75),
    )
    assert result.plan == {
        "node": "aggregate",
        "input": SOURCE,
        "by": ["sex"],
        "aggs": [
            {"name": "mean_age", "column": "age", "func": "mean"},
            {"name": "n", "column": "age", "func": "count"},
            {"name": "p90", "column": "cost", "func": "quantile", "q": 0.9},
            {"name": "rows", "column": None, "func": "count"},
            {"name": "q1", "column": "cost", "func": "quantile", "q": 0.25},
            {"name": "q3", "column": "cost", "func": "quantile", "q": 0.75},
        ],
    }
    assert t.agg({"age": "max"}).plan["aggs"] == [{"name": "age", "column": "age", "func": "max"}]
    assert t.group_by("sex").size().plan["aggs"] == [{"name": "size", "column": None, "func": "count"}]
    assert t.group_by("sex")["age"].median().plan["aggs"] == [{"name": "age", "column": "age", "func": "median"}]


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        (("age", "mode"), ValueError, "'mode' is not one of"),
        (("age", sum), TypeError, "callables do not run in the vault"),
        (("age", "quantile"), ValueError, "quantile needs q between 0 and 1"),
        (("age", "quantile", 1.5), ValueError, "quantile needs q between 0 and 1"),
        (("age", "mean", 3), TypeError, "only quantile takes a third element"),
        (("age",), TypeError, "named form"),
        ("age", TypeError, "named form"),
        ((None, "mean"), ValueError, "mean needs a column"),
        (("nope", "mean"), KeyError, "no column 'nope'"),
    ],
)
def test_bad_aggregations_are_refused_here(t: SealedTable, spec: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        t.group_by("sex").agg(out=spec)


def test_output_names_must_not_clash(t: SealedTable) -> None:
    with pytest.raises(ValueError, match="must be unique and differ from the keys"):
        t.group_by("sex").agg(sex=("age", "mean"))
    with pytest.raises(TypeError, match="at least one aggregation"):
        t.agg()
    with pytest.raises(ValueError, match="is a group key"):
        t.group_by("sex")["sex"]


def test_other_release_plans(t: SealedTable) -> None:
    assert t.count().plan == {"node": "count", "input": SOURCE}
    assert t.describe().plan == {"node": "describe", "input": SOURCE, "columns": None}
    assert t.describe(["age"]).plan["columns"] == ["age"]
    assert t["sex"].value_counts(dropna=False).plan == {
        "node": "value_counts",
        "input": SOURCE,
        "column": "sex",
        "dropna": False,
    }
    stat = t["age"].quantile(0.5).plan
    assert stat["aggs"] == [{"name": "age", "column": "age", "func": "quantile", "q": 0.5}]
    computed = (t["age"] * 2).mean().plan
    assert computed["input"]["node"] == "assign" and computed["aggs"][0]["column"] == "value"


def test_column_helpers(t: SealedTable) -> None:
    assert t.drop("ssn").plan == {"node": "select", "input": SOURCE, "columns": ["age", "sex", "cost"]}
    renamed = t.rename(columns={"age": "years"})
    assert renamed.plan["node"] == "select" and renamed.plan["columns"] == ["years", "sex", "cost", "ssn"]
    dropped = t.dropna(subset=["age", "cost"]).plan
    assert dropped["predicate"] == {
        "fn": "and",
        "args": [{"fn": "not_null", "args": [{"col": "age"}]}, {"fn": "not_null", "args": [{"col": "cost"}]}],
    }


def test_unknown_columns_are_caught_before_sending(t: SealedTable) -> None:
    for attempt in (
        lambda: t["nope"],
        lambda: t[["age", "nope"]],
        lambda: t.filter(cn.col("nope") > 1),
        lambda: t.assign(x=cn.col("nope")),
        lambda: t.group_by("nope"),
        lambda: t.describe("nope"),
    ):
        with pytest.raises(KeyError, match="no column 'nope'; the table has 'age', 'sex', 'cost', 'ssn'"):
            attempt()
    with pytest.raises(TypeError, match="column expression"):
        t.filter("age > 40")  # type: ignore[arg-type]


def test_a_table_whose_columns_are_not_known_defers_to_the_vault() -> None:
    blind = table(None)
    assert blind["anything"].to_json() == {"col": "anything"}
    assert "not known yet" in repr(blind)
    with pytest.raises(cn.VaultError, match="cannot reach the vault"):
        blind.columns  # noqa: B018 - asks the vault, which is not there


def test_reprs_escape_names_from_the_owner() -> None:
    hostile = table([("<script>alert(1)</script>", "string"), ("a|b*_c", "int64")])
    html = hostile._repr_html_()
    assert "<script>" not in html and "&lt;script&gt;" in html
    markdown = hostile._repr_markdown_()
    assert "<script>" not in markdown and "a\\|b\\*\\_c" in markdown
    assert "p-1 (claims): releases aggregate; min_group_size 10; never releases ssn" in repr(hostile)
