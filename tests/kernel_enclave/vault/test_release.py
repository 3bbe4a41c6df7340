"""The output policy engine for tables: release kinds, min_group_size, never_release, max_rows, and exact results.

Aggregates are compared with pandas on the same data (hypothesis-generated frames), because the analyst's mental
model is pandas: the vault must return what ``groupby(...).agg(...)``, ``value_counts`` and ``describe`` would.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confnb.policy.output import RELEASE_KINDS, OutputPolicy
from kernel_enclave.vault.plan import SourceTable, evaluate
from kernel_enclave.vault.protocol import PolicyViolation, VaultError
from kernel_enclave.vault.release import (
    check_columns,
    check_count,
    preview,
    record_counts,
    release,
    require_kind,
    schema,
    schema_table,
)


def policy(
    pid: str,
    *,
    allow: tuple[str, ...] = RELEASE_KINDS,
    k: int = 1,
    never: tuple[str, ...] = (),
    max_rows: int | None = None,
) -> OutputPolicy:
    return OutputPolicy(
        id=pid,
        allow=frozenset(allow),
        min_group_size=k,
        never_release=frozenset(never),
        max_rows=max_rows,
        sources=(pid,),
    )


def src(handle: str = "t") -> dict[str, Any]:
    return {"node": "source", "handle": handle}


def agg(
    by: list[str], *aggs: tuple[str, str | None, str], input_: dict[str, Any] | None = None, **q: float
) -> dict[str, Any]:
    specs = []
    for name, column, func in aggs:
        spec: dict[str, Any] = {"name": name, "column": column, "func": func}
        if func == "quantile":
            spec["q"] = q["q"]
        specs.append(spec)
    return {"node": "aggregate", "input": input_ or src(), "by": by, "aggs": specs}


@pytest.fixture
def patients() -> dict[str, SourceTable]:
    """Ward A has 12 patients, ward B 6, ward C 1; one row has no ward."""
    wards = ["A"] * 12 + ["B"] * 6 + ["C"] + [None]
    table = pa.table(
        {
            "patient_id": pa.array(range(1000, 1020), pa.int64()),
            "ward": pa.array(wards, pa.string()),
            "age": pa.array([20 + i for i in range(20)], pa.int64()),
            "cost": pa.array([float(i) * 10.5 for i in range(20)]),
            "sex": pa.array(["f", "m"] * 10),
        }
    )
    return {"t": SourceTable.from_dataset("hospital", table)}


@pytest.fixture
def open_policy() -> dict[str, OutputPolicy]:
    return {"hospital": policy("hosp-v1", k=5, never=("patient_id",))}


# -- kinds ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "plan",
    [
        src(),
        {"node": "select", "input": src(), "columns": ["age"]},
        {"node": "filter", "input": src(), "predicate": {"lit": True}},
    ],
)
def test_raw_rows_are_never_released(
    patients: dict[str, SourceTable], open_policy: dict[str, OutputPolicy], plan: dict[str, Any]
) -> None:
    with pytest.raises(PolicyViolation) as caught:
        release(plan, patients, open_policy)
    assert caught.value.rule == "release.allow"
    assert caught.value.datasets == ("hospital",)
    assert "raw rows are never released; aggregate them (group_by/agg, value_counts, describe, count)" in str(
        caught.value
    )


def test_kind_must_be_allowed_by_every_dataset(patients: dict[str, SourceTable]) -> None:
    policies = {"hospital": policy("h", allow=("schema",))}
    with pytest.raises(PolicyViolation) as caught:
        release(agg(["ward"], ("n", None, "count")), patients, policies)
    assert (caught.value.rule, caught.value.datasets) == ("release.allow", ("hospital",))
    assert "does not allow releasing aggregate results" in str(caught.value)
    with pytest.raises(PolicyViolation, match="row_count"):
        release({"node": "count", "input": src()}, patients, policies)


def test_require_kind_names_only_the_refusing_datasets() -> None:
    policies = {"a": policy("pa"), "b": policy("pb", allow=("schema",)), "c": policy("pc", allow=())}
    with pytest.raises(PolicyViolation) as caught:
        require_kind("aggregate", ["a", "b", "c"], policies)
    assert caught.value.datasets == ("b", "c")
    assert require_kind("schema", ["a", "b"], policies) == "pa+pb"
    assert require_kind("aggregate", ["a"], policies) == "pa"
    with pytest.raises(PolicyViolation) as missing:
        require_kind("aggregate", ["a", "unknown"], policies)  # a dataset without a policy releases nothing
    assert missing.value.datasets == ("unknown",)
    with pytest.raises(PolicyViolation):
        require_kind("aggregate", [], policies)


# -- aggregate, suppression -----------------------------------------------------------------------------------


def test_aggregate_suppresses_small_groups(
    patients: dict[str, SourceTable], open_policy: dict[str, OutputPolicy]
) -> None:
    released = release(agg(["ward"], ("n", None, "count"), ("mean_age", "age", "mean")), patients, open_policy)
    assert released.kind == "aggregate"
    assert released.table is not None
    assert released.table.to_pydict() == {"ward": ["A", "B"], "n": [12, 6], "mean_age": [25.5, 34.5]}
    assert released.suppressed == 1  # ward C (1 patient); the null ward is no group at all, as in pandas
    assert released.index == ("ward",)
    assert released.series is False
    assert released.datasets == ("hospital",)
    assert released.policy_id == "hosp-v1"
    assert released.value is None


def test_group_size_is_counted_even_when_not_requested(patients: dict[str, SourceTable]) -> None:
    policies = {"hospital": policy("h", k=7)}
    released = release(agg(["ward"], ("total", "cost", "sum")), patients, policies)
    assert released.table is not None
    assert released.table.column("ward").to_pylist() == ["A"]
    assert released.table.column_names == ["ward", "total"]
    assert released.suppressed == 2
    assert released.series is True  # one aggregation: the client squeezes it to a Series


def test_all_groups_suppressed_gives_an_empty_table(patients: dict[str, SourceTable]) -> None:
    released = release(agg(["ward"], ("n", None, "count")), patients, {"hospital": policy("h", k=100)})
    assert released.table is not None
    assert released.table.num_rows == 0 and released.suppressed == 3


def test_ungrouped_aggregate_below_k_is_withheld(
    patients: dict[str, SourceTable], open_policy: dict[str, OutputPolicy]
) -> None:
    one = {"node": "filter", "input": src(), "predicate": {"fn": "eq", "args": [{"col": "age"}, {"lit": 33}]}}
    with pytest.raises(PolicyViolation) as caught:
        release(agg([], ("cost", "cost", "mean"), input_=one), patients, open_policy)
    assert caught.value.rule == "release.min_group_size"
    assert caught.value.datasets == ("hospital",)
    assert "fewer than 5 records" in str(caught.value)
    assert "472.5" not in str(caught.value) and "33" not in str(caught.value)
    whole = release(agg([], ("cost", "cost", "mean")), patients, open_policy)
    assert whole.table is not None and whole.table.column("cost").to_pylist() == [pytest.approx(99.75)]
    assert whole.index == ()


def test_filter_isolating_one_record_then_grouping_is_withheld(
    patients: dict[str, SourceTable], open_policy: dict[str, OutputPolicy]
) -> None:
    one = {"node": "filter", "input": src(), "predicate": {"fn": "eq", "args": [{"col": "patient_id"}, {"lit": 1003}]}}
    released = release(agg(["sex"], ("cost", "cost", "max"), input_=one), patients, open_policy)
    assert released.table is not None and released.table.num_rows == 0 and released.suppressed == 1


def test_strictest_of_several_datasets_names_the_right_one() -> None:
    hospital = pa.table({"pid": list(range(7)), "ward": ["A"] * 7, "cost": [1.0] * 7})
    insurer = pa.table({"pid": list(range(7)), "premium": [2.0] * 7})
    sources = {"h": SourceTable.from_dataset("hospital", hospital), "i": SourceTable.from_dataset("insurer", insurer)}
    policies = {"hospital": policy("hosp", k=10), "insurer": policy("ins", k=5)}
    joined = {"node": "join", "left": src("h"), "right": src("i"), "on": ["pid"]}
    with pytest.raises(PolicyViolation) as caught:
        release(agg([], ("p", "premium", "mean"), input_=joined), sources, policies)
    assert caught.value.rule == "release.min_group_size"
    assert caught.value.datasets == ("hospital",)
    grouped = release(agg(["ward"], ("p", "premium", "mean"), input_=joined), sources, policies)
    assert grouped.suppressed == 1 and grouped.datasets == ("hospital", "insurer")
    policies["hospital"] = policy("hosp", k=7)
    grouped = release(agg(["ward"], ("p", "premium", "mean"), input_=joined), sources, policies)
    assert grouped.table is not None and grouped.table.to_pydict() == {"ward": ["A"], "p": [2.0]}
    assert grouped.policy_id == "hosp+ins"


def test_join_fan_out_does_not_inflate_record_counts() -> None:
    """One patient joined to many lookup rows is still one patient: k counts records, not rows."""
    patient = pa.table({"key": [1, 2], "salary": [123456.0, 1.0]})
    lookup = pa.table({"key": [1] * 50, "n": list(range(50))})
    sources = {"p": SourceTable.from_dataset("hr", patient), "l": SourceTable.from_dataset("lookup", lookup)}
    policies = {"hr": policy("hr", k=10), "lookup": policy("lk", k=10)}
    joined = {"node": "join", "left": src("p"), "right": src("l"), "on": ["key"]}
    assert evaluate(joined, sources).table.num_rows == 50
    assert record_counts(evaluate(joined, sources)) == {"hr": 1, "lookup": 50}
    with pytest.raises(PolicyViolation) as caught:
        release(agg([], ("s", "salary", "mean"), input_=joined), sources, policies)
    assert caught.value.datasets == ("hr",)
    with pytest.raises(PolicyViolation) as counted:
        release({"node": "count", "input": joined}, sources, policies)
    assert counted.value.datasets == ("hr",)
    grouped = release(agg(["key"], ("s", "salary", "mean"), input_=joined), sources, policies)
    assert grouped.table is not None and grouped.table.num_rows == 0 and grouped.suppressed == 1
    counts = release({"node": "value_counts", "input": joined, "column": "salary"}, sources, policies)
    assert counts.table is not None and counts.table.num_rows == 0
    with pytest.raises(PolicyViolation):
        release({"node": "describe", "input": joined, "columns": ["salary"]}, sources, policies)


def test_self_join_counts_the_smallest_side() -> None:
    table = pa.table({"g": ["x"] * 10 + ["y"], "k": [0] * 10 + [1], "v": [float(i) for i in range(11)]})
    sources = {"t": SourceTable.from_dataset("d", table)}
    joined = {"node": "join", "left": src(), "right": src(), "on": ["k"]}
    released = release(agg(["g_x"], ("m", "v_y", "mean"), input_=joined), sources, {"d": policy("p", k=5)})
    assert released.table is not None
    assert released.table.column("g_x").to_pylist() == ["x"]  # 100 rows from 10 records; y is 1 record
    assert released.suppressed == 1


def test_outer_join_groups_without_records_of_a_dataset_are_suppressed() -> None:
    """A left-join group with no matching right records is not computed from k records of the right dataset."""
    left = pa.table({"k": list(range(10)), "g": ["a"] * 5 + ["b"] * 5})
    right = pa.table({"k": list(range(5)), "w": [1.0] * 5})
    sources = {"l": SourceTable.from_dataset("L", left), "r": SourceTable.from_dataset("R", right)}
    joined = {"node": "join", "left": src("l"), "right": src("r"), "on": ["k"], "how": "left"}
    policies = {"L": policy("l", k=5), "R": policy("r", k=5)}
    released = release(agg(["g"], ("n", None, "count"), input_=joined), sources, policies)
    assert released.table is not None and released.table.to_pydict() == {"g": ["a"], "n": [5]}
    assert released.suppressed == 1
    policies["R"] = policy("r", k=1)
    assert release(agg(["g"], ("n", None, "count"), input_=joined), sources, policies).suppressed == 1
    policies["R"] = policy("r", k=0 + 1)
    inner = {**joined, "how": "inner"}
    assert release(agg(["g"], ("n", None, "count"), input_=inner), sources, policies).suppressed == 0


def test_max_rows(patients: dict[str, SourceTable]) -> None:
    policies = {"hospital": policy("h", max_rows=1)}
    with pytest.raises(PolicyViolation) as caught:
        release(agg(["sex"], ("n", None, "count")), patients, policies)
    assert (caught.value.rule, caught.value.datasets) == ("release.max_rows", ("hospital",))
    assert "more than 1 rows" in str(caught.value)
    released = release(agg([], ("n", None, "count")), patients, policies)
    assert released.table is not None and released.table.to_pydict() == {"n": [20]}


def test_max_rows_names_the_datasets_whose_limit_failed() -> None:
    left = pa.table({"k": [1, 2, 3], "g": ["a", "b", "c"]})
    right = pa.table({"k": [1, 2, 3], "v": [1, 2, 3]})
    sources = {"l": SourceTable.from_dataset("L", left), "r": SourceTable.from_dataset("R", right)}
    policies = {"L": policy("l", max_rows=2), "R": policy("r", max_rows=10)}
    joined = {"node": "join", "left": src("l"), "right": src("r"), "on": ["k"]}
    with pytest.raises(PolicyViolation) as caught:
        release(agg(["g"], ("v", "v", "sum"), input_=joined), sources, policies)
    assert caught.value.datasets == ("L",)


# -- never_release --------------------------------------------------------------------------------------------


def test_never_release_blocks_inputs_keys_and_derivations(
    patients: dict[str, SourceTable], open_policy: dict[str, OutputPolicy]
) -> None:
    derived = {
        "node": "assign",
        "input": src(),
        "columns": [["pid2", {"fn": "mod", "args": [{"col": "patient_id"}, {"lit": 7}]}]],
    }
    conditioned = {
        "node": "assign",
        "input": src(),
        "columns": [
            [
                "flag",
                {
                    "fn": "where",
                    "args": [{"fn": "gt", "args": [{"col": "patient_id"}, {"lit": 1010}]}, {"lit": 1}, {"lit": 0}],
                },
            ]
        ],
    }
    plans = [
        agg([], ("m", "patient_id", "max")),
        agg([], ("m", "patient_id", "nunique")),
        agg(["patient_id"], ("n", None, "count")),
        agg(["pid2"], ("n", None, "count"), input_=derived),
        agg([], ("m", "pid2", "median"), input_=derived),
        agg([], ("m", "flag", "sum"), input_=conditioned),
        {"node": "value_counts", "input": src(), "column": "patient_id"},
        {"node": "describe", "input": src(), "columns": ["patient_id", "age"]},
    ]
    for plan in plans:
        with pytest.raises(PolicyViolation) as caught:
            release(plan, patients, open_policy)
        assert caught.value.rule == "release.never_release"
        assert caught.value.datasets == ("hospital",)
        assert "never_release column 'patient_id'" in str(caught.value)


def test_never_release_columns_may_filter_and_join(
    patients: dict[str, SourceTable], open_policy: dict[str, OutputPolicy]
) -> None:
    filtered = {
        "node": "filter",
        "input": src(),
        "predicate": {"fn": "lt", "args": [{"col": "patient_id"}, {"lit": 1010}]},
    }
    released = release(agg([], ("n", None, "count"), input_=filtered), patients, open_policy)
    assert released.table is not None and released.table.to_pydict() == {"n": [10]}
    visits = pa.table({"patient_id": list(range(1000, 1020)), "visits": list(range(20))})
    sources = {**patients, "v": SourceTable.from_dataset("clinic", visits)}
    policies = {**open_policy, "clinic": policy("clinic", never=("patient_id",))}
    joined = {"node": "join", "left": src(), "right": src("v"), "on": ["patient_id"]}
    released = release(agg(["ward"], ("visits", "visits", "sum"), input_=joined), sources, policies)
    assert released.table is not None and released.table.column("ward").to_pylist() == ["A", "B"]
    with pytest.raises(PolicyViolation) as caught:
        release(agg(["patient_id"], ("n", None, "count"), input_=joined), sources, policies)
    assert caught.value.datasets == ("clinic", "hospital")  # the joined key derives from both


def test_check_columns_directly() -> None:
    policies = {"a": policy("pa", never=("ssn",)), "b": policy("pb")}
    check_columns({"x": frozenset({("a", "age"), ("b", "ssn")})}, policies, "model")
    with pytest.raises(PolicyViolation) as caught:
        check_columns({"x": frozenset({("a", "ssn")}), "y": frozenset({("b", "z")})}, policies, "model features")
    assert caught.value.rule == "release.never_release"
    assert caught.value.datasets == ("a",)
    assert str(caught.value).startswith("model features: column 'x' derives from never_release column 'ssn'")
    with pytest.raises(PolicyViolation) as missing:
        check_columns({"x": frozenset({("nobody", "x")})}, policies, "model")
    assert missing.value.datasets == ("nobody",)


def test_check_count_directly() -> None:
    policies = {"hospital": policy("h", k=10), "insurer": policy("i", k=5)}
    check_count(10, ["hospital", "insurer"], policies, "the training set")
    with pytest.raises(PolicyViolation) as caught:
        check_count(7, ["hospital", "insurer"], policies, "the training set")
    assert (caught.value.rule, caught.value.datasets) == ("release.min_group_size", ("hospital",))
    assert str(caught.value).startswith("the training set is computed from fewer than 10 records")
    with pytest.raises(PolicyViolation) as both:
        check_count(3, ["hospital", "insurer"], policies, "x")
    assert both.value.datasets == ("hospital", "insurer")


# -- value_counts, describe, count ----------------------------------------------------------------------------


def test_value_counts(patients: dict[str, SourceTable]) -> None:
    released = release(
        {"node": "value_counts", "input": src(), "column": "ward"}, patients, {"hospital": policy("h", k=2)}
    )
    assert released.table is not None
    assert released.table.to_pydict() == {"ward": ["A", "B"], "count": [12, 6]}
    assert (released.suppressed, released.index, released.series) == (1, ("ward",), True)
    with_null = release(
        {"node": "value_counts", "input": src(), "column": "ward", "dropna": False}, patients, {"hospital": policy("h")}
    )
    assert with_null.table is not None
    assert with_null.table.to_pydict() == {"ward": ["A", "B", "C", None], "count": [12, 6, 1, 1]}


def test_value_counts_column_named_count_is_refused() -> None:
    sources = {"t": SourceTable.from_dataset("d", pa.table({"count": [1, 2]}))}
    with pytest.raises(VaultError, match="rename it"):
        release({"node": "value_counts", "input": src(), "column": "count"}, sources, {"d": policy("p")})


def test_describe_matches_pandas(patients: dict[str, SourceTable]) -> None:
    released = release({"node": "describe", "input": src()}, patients, {"hospital": policy("h", never=("patient_id",))})
    assert released.table is not None
    assert released.index == ("statistic",) and released.series is False and released.suppressed == 0
    got = released.table.to_pandas().set_index("statistic")
    plain = patients["t"].table.to_pandas()[["age", "cost"]]
    expected = plain.describe()
    for label, q in (("25%", 0.25), ("50%", 0.5), ("75%", 0.75)):  # k = 1: a quartile is the nearest rank's value
        expected.loc[label] = [block_quantile(plain[c], q, 1) for c in plain]
    assert list(got.columns) == ["age", "cost"]  # patient_id is never released, so describe leaves it out
    assert list(got.index) == list(expected.index)
    pd.testing.assert_frame_equal(got, expected, check_names=False)


def test_describe_withholds_columns_below_k() -> None:
    table = pa.table(
        {
            "full": [float(i) for i in range(10)],
            "sparse": [1.0, None, None, None, None, None, None, None, float("nan"), 2.0],
        }
    )
    sources = {"t": SourceTable.from_dataset("d", table)}
    released = release({"node": "describe", "input": src()}, sources, {"d": policy("p", k=5)})
    assert released.table is not None
    assert released.table.column_names == ["statistic", "full"]
    names, values = released.table.column("statistic").to_pylist(), released.table.column("full").to_pylist()
    statistics = dict(zip(names, values, strict=True))
    assert statistics["min"] is None and statistics["max"] is None  # 0.0 and 9.0: one record each
    # Blocks of 5 ranks: {0..4} and {5..9}. The median's rank round(4.5) = 4 and the 25% rank 2 are in the first
    # block (mean 2.0), the 75% rank 7 in the second (mean 7.0): each the mean of 5 records, none a record's value.
    assert (statistics["25%"], statistics["50%"], statistics["75%"]) == (2.0, 2.0, 7.0)
    assert released.suppressed == 3  # the sparse column and the full column's lone extremes
    assert released.withheld == {"groups": 1, "cells": {"full": [3, 7]}}
    with pytest.raises(PolicyViolation) as caught:
        release({"node": "describe", "input": src(), "columns": ["sparse"]}, sources, {"d": policy("p", k=5)})
    assert (caught.value.rule, caught.value.datasets) == ("release.min_group_size", ("d",))


def test_extremes_are_shown_only_when_k_records_share_them() -> None:
    """The oldest patient's exact age is a fact about one person; the youngest age held by 5 people is not."""
    ages = [18] * 5 + list(range(30, 44)) + [97]
    sources = {"t": SourceTable.from_dataset("d", pa.table({"age": ages, "g": ["a"] * len(ages)}))}
    released = release(agg(["g"], ("lo", "age", "min"), ("hi", "age", "max")), sources, {"d": policy("p", k=5)})
    assert released.table is not None
    assert released.table.to_pylist() == [{"g": "a", "lo": 18, "hi": None}]
    assert released.suppressed == 1
    with pytest.raises(PolicyViolation) as caught:  # a scalar withheld is refused, not released as null
        release(agg([], ("hi", "age", "max")), sources, {"d": policy("p", k=5)})
    assert caught.value.rule == "release.min_group_size" and "97" not in str(caught.value)
    both = release(agg([], ("lo", "age", "min"), ("hi", "age", "max")), sources, {"d": policy("p", k=5)})
    assert both.table is not None and both.table.to_pylist() == [{"lo": 18, "hi": None}]
    assert both.withheld == {"groups": 0, "cells": {"hi": [0]}}


def test_describe_refuses_non_numeric_and_empty_selections(patients: dict[str, SourceTable]) -> None:
    policies = {"hospital": policy("h")}
    with pytest.raises(VaultError, match="column 'ward' is string; describe covers numeric columns"):
        release({"node": "describe", "input": src(), "columns": ["ward"]}, patients, policies)
    only_text = {"node": "select", "input": src(), "columns": ["ward", "sex"]}
    with pytest.raises(VaultError, match="no numeric columns"):
        release({"node": "describe", "input": only_text}, patients, policies)


def test_count(patients: dict[str, SourceTable], open_policy: dict[str, OutputPolicy]) -> None:
    released = release({"node": "count", "input": src()}, patients, open_policy)
    assert (released.kind, released.value, released.table, released.index, released.series) == (
        "row_count",
        20,
        None,
        (),
        False,
    )
    few = {"node": "filter", "input": src(), "predicate": {"fn": "eq", "args": [{"col": "ward"}, {"lit": "C"}]}}
    with pytest.raises(PolicyViolation) as caught:
        release({"node": "count", "input": few}, patients, open_policy)
    assert caught.value.rule == "release.min_group_size"


# -- schema, preview ------------------------------------------------------------------------------------------


def test_schema(patients: dict[str, SourceTable]) -> None:
    plan = {
        "node": "assign",
        "input": src(),
        "columns": [["ratio", {"fn": "truediv", "args": [{"col": "age"}, {"lit": 2}]}]],
    }
    columns = schema(plan, patients, {"hospital": policy("h", allow=("schema",))})
    assert columns[-1] == {"name": "ratio", "type": "double"}
    assert columns[0] == {"name": "patient_id", "type": "int64"}
    with pytest.raises(PolicyViolation) as caught:
        schema(plan, patients, {"hospital": policy("h", allow=("aggregate",))})
    assert caught.value.rule == "release.allow"


def test_schema_touches_no_rows(patients: dict[str, SourceTable]) -> None:
    """A cast that does not convert still has a schema: it is computed over zero rows."""
    plan = {
        "node": "assign",
        "input": src(),
        "columns": [
            [
                "n",
                {
                    "fn": "cast",
                    "args": [
                        {"col": "ward"},
                    ],
                    "type": "int64",
                },
            ]
        ],
    }
    assert schema(plan, patients, {"hospital": policy("h")})[-1] == {"name": "n", "type": "int64"}
    assert evaluate(plan, patients).table.column("n").null_count == 20  # a cast that fails is null, as TRY_CAST


def test_the_schema_table_carries_types_and_nothing_of_the_data() -> None:
    """A zero-row slice keeps a dictionary column's categories and a schema keeps pandas' metadata: both stripped."""
    wards = pa.array(["SECRET-WARD-A", "SECRET-WARD-B"] * 10).dictionary_encode()
    nested = pa.array([{"code": "SECRET-CODE"}] * 20)
    table = pa.table({"ward": wards, "age": pa.array(range(20), pa.int64()), "extra": nested})
    field_with_metadata = table.schema.field("age").with_metadata({b"note": b"SECRET-FIELD"})
    table = table.cast(
        table.schema.set(1, field_with_metadata).with_metadata({b"pandas": b'{"index": "SECRET-INDEX"}'})
    )
    sources = {"t": SourceTable.from_dataset("hospital", table)}
    empty = schema_table(src(), sources, {"hospital": policy("h", allow=("schema",))})
    assert empty.num_rows == 0
    assert empty.schema.names == ["ward", "age", "extra"]
    assert empty.schema.field("ward").type == pa.dictionary(pa.int32(), pa.string())
    assert empty.schema.metadata is None and empty.schema.field("age").metadata is None
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, empty.schema) as writer:
        writer.write_table(empty)
    assert b"SECRET" not in sink.getvalue().to_pybytes()
    with pytest.raises(PolicyViolation) as caught:
        schema_table(src(), sources, {"hospital": policy("h", allow=("aggregate",))})
    assert caught.value.rule == "release.allow"


def test_preview(patients: dict[str, SourceTable]) -> None:
    plan = {"node": "select", "input": src(), "columns": ["ward", "age"]}
    shown = preview(plan, patients, {"hospital": policy("h", k=5)})
    assert shown["columns"] == [{"name": "ward", "type": "string"}, {"name": "age", "type": "int64"}]
    assert shown["rows"] == 20
    assert set(shown["withheld"]) == {"values"}
    nothing = preview(plan, patients, {"hospital": policy("h", allow=())})
    assert "columns" not in nothing and "rows" not in nothing
    assert nothing["withheld"]["columns"].endswith("[rule release.allow of 'hospital']")
    assert "row_count" in nothing["withheld"]["rows"]
    few = {"node": "filter", "input": plan, "predicate": {"fn": "eq", "args": [{"col": "ward"}, {"lit": "C"}]}}
    small = preview(few, patients, {"hospital": policy("h", k=5)})
    assert "rows" not in small and "release.min_group_size" in small["withheld"]["rows"]


# -- equality with pandas -------------------------------------------------------------------------------------


FUNCS = ["count", "sum", "mean", "min", "max", "std", "var", "median", "nunique"]

frames = st.integers(min_value=0, max_value=40).flatmap(
    lambda n: st.fixed_dictionaries(
        {
            "g1": st.lists(st.sampled_from(["a", "b", "c", None]), min_size=n, max_size=n),
            "g2": st.lists(st.sampled_from([0, 1, 2, None]), min_size=n, max_size=n),
            "gf": st.lists(st.sampled_from([0.0, -0.0, 1.5, float("nan"), None]), min_size=n, max_size=n),
            "x": st.lists(
                st.none() | st.just(float("nan")) | st.floats(-1e6, 1e6, allow_nan=False), min_size=n, max_size=n
            ),
            "i": st.lists(st.none() | st.integers(-1000, 1000), min_size=n, max_size=n),
            "b": st.lists(st.booleans(), min_size=n, max_size=n),
        }
    )
)


def close(got: Any, expected: Any, func: str, values: Any) -> bool:
    """Equal within float tolerance, scaled to the data: NaN and null are the same missing value."""
    if got is None or (isinstance(got, float) and math.isnan(got)):
        return bool(pd.isna(expected))
    if pd.isna(expected):
        return False
    finite = [abs(float(v)) for v in values if v is not None and not pd.isna(v)]
    magnitude = (max(finite) if finite else 0.0) + 1.0
    tolerance = 1e-9 * magnitude * (len(finite) + 1)
    if func == "var":
        tolerance *= magnitude
    elif func == "std":
        tolerance = math.sqrt(tolerance * magnitude)
    return math.isclose(float(got), float(expected), rel_tol=1e-7, abs_tol=tolerance)


def to_arrow(data: dict[str, list[Any]]) -> pa.Table:
    return pa.table(
        {
            "g1": pa.array(data["g1"], pa.string()),
            "g2": pa.array(data["g2"], pa.int64()),
            "gf": pa.array(data["gf"], pa.float64(), from_pandas=False),
            "x": pa.array(data["x"], pa.float64()),
            "i": pa.array(data["i"], pa.int64()),
            "b": pa.array(data["b"], pa.bool_()),
        }
    )


WITHHELD = object()
MODE_RULE = ("sum", "mean", "std", "var", "nunique", "median", "quantile")


def block_quantile(values: Any, q: float, k: int) -> float | None:
    """The documented order-statistic rule: the mean of the block of k ranks holding rank round(q * (n - 1))."""
    ordered = np.sort(np.asarray(values, dtype="float64"))
    n = len(ordered)
    if n == 0:
        return None
    blocks = max(n // k, 1)
    block = min(round(q * (n - 1)) // k, blocks - 1)
    end = n if block == blocks - 1 else (block + 1) * k
    return float(ordered[block * k : end].mean())


def expected_cell(values: pd.Series, func: str, k: int, q: float = 0.5) -> Any:
    """What the vault releases for one group's number (pandas on the same values), or WITHHELD.

    Contributing records are the non-null values; the most common value's holders do not count towards sums, means,
    spreads, distinct counts and order statistics (unless every record holds it); an extreme needs k holders.
    """
    valid = values.dropna()
    if valid.dtype == bool or func in _NUMBER_FUNCS:
        valid = valid.astype("float64") if func in _NUMBER_FUNCS else valid
    if len(valid) < k:
        return WITHHELD
    if func in MODE_RULE:
        normal = valid + 0.0 if valid.dtype.kind == "f" else valid
        others = len(valid) - int(normal.value_counts().max())
        if 0 < others < k:
            return WITHHELD
    if func in ("min", "max"):
        extreme = getattr(valid, func)()
        if int((valid == extreme).sum()) < k:
            return WITHHELD
        return extreme
    if func in ("median", "quantile"):
        return block_quantile(valid, 0.5 if func == "median" else q, k)
    if func == "count":
        return len(valid)
    return getattr(valid, func)()


_NUMBER_FUNCS = ("sum", "mean", "std", "var", "median", "quantile")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=frames,
    by=st.sampled_from([["g1"], ["g2"], ["g1", "g2"], ["gf"], ["b"], ["g2", "b"]]),
    column=st.sampled_from(["x", "i", "b"]),
    q=st.floats(0, 1),
    k=st.integers(1, 4),
)
def test_aggregates_equal_pandas_named_aggregation(
    data: dict[str, list[Any]], by: list[str], column: str, q: float, k: int
) -> None:
    """Every number pandas computes is released when k contributing records stand behind it, else its cell is null."""
    table = to_arrow(data)
    sources = {"t": SourceTable.from_dataset("d", table)}
    aggs = [(f"{f}_", column, f) for f in FUNCS] + [("size", None, "count"), ("q", column, "quantile")]
    if column == "b":
        aggs = [a for a in aggs if a[2] not in ("min", "max")]  # pandas' bool min/max are objects
    released = release(agg(by, *aggs, q=q), sources, {"d": policy("p", k=k)})
    assert released.table is not None

    frame = table.to_pandas()
    frame["x"] = frame["x"].astype("float64")
    keyed = frame.assign(gf=frame["gf"] + 0.0)  # pandas groups -0.0 with 0.0 too
    groups = [(key, rows) for key, rows in keyed.groupby(by, dropna=True, sort=True)]
    kept = [(key, rows) for key, rows in groups if len(rows) >= k]
    got = released.table.to_pandas()
    assert len(got) == len(kept)
    nulled: dict[str, list[int]] = {}
    for position, (key, rows) in enumerate(kept):
        for name, col, func in aggs:
            expected = len(rows) if col is None else expected_cell(rows[col], func, k, q)
            value = got[name].iloc[position]
            if expected is WITHHELD:
                assert pd.isna(value), (name, value)
                nulled.setdefault(name, []).append(position)
            else:
                assert close(value, expected, func, data[column]), (name, value, expected)
        keys = key if isinstance(key, tuple) else (key,)
        for name, part in zip(by, keys, strict=True):
            assert got[name].iloc[position] == part
    assert released.withheld == {"groups": len(groups) - len(kept), "cells": nulled}
    assert released.suppressed == len(groups) - len(kept) + sum(map(len, nulled.values()))


@settings(max_examples=100, deadline=None)
@given(data=frames, column=st.sampled_from(["x", "i"]))
def test_ungrouped_aggregates_equal_pandas(data: dict[str, list[Any]], column: str) -> None:
    table = to_arrow(data)
    sources = {"t": SourceTable.from_dataset("d", table)}
    series = table.column(column).to_pandas().astype("float64")
    aggs = [(f, column, f) for f in FUNCS]
    if series.count() == 0:  # no value behind any of the numbers: the whole result is withheld
        with pytest.raises(PolicyViolation) as caught:
            release(agg([], *aggs), sources, {"d": policy("p")})
        assert caught.value.rule == "release.min_group_size"
        return
    released = release(agg([], *aggs), sources, {"d": policy("p")})
    assert released.table is not None and released.table.num_rows == 1
    for name, _, func in aggs:
        expected = expected_cell(series, func, 1)
        assert close(released.table.column(name)[0].as_py(), expected, func, data[column]), name


@settings(max_examples=100, deadline=None)
@given(data=frames, column=st.sampled_from(["g1", "g2", "gf", "b"]), dropna=st.booleans(), k=st.integers(1, 3))
def test_value_counts_equal_pandas(data: dict[str, list[Any]], column: str, dropna: bool, k: int) -> None:
    table = to_arrow(data)
    sources = {"t": SourceTable.from_dataset("d", table)}
    plan = {"node": "value_counts", "input": src(), "column": column, "dropna": dropna}
    released = release(plan, sources, {"d": policy("p", k=k)})
    assert released.table is not None
    counts = released.table.column("count").to_pylist()
    assert counts == sorted(counts, reverse=True)
    series = table.column(column).to_pandas()
    if column == "gf":
        series = series + 0.0  # pandas groups -0.0 with 0.0 too
    expected = series.value_counts(dropna=dropna)
    expected = expected[expected >= k]

    def key(v: Any) -> Any:
        if pd.isna(v):
            return None
        return float(v) if isinstance(v, int | float | np.number | np.bool_) else v

    got = sorted(
        ((key(v), c) for v, c in zip(released.table.column(column).to_pylist(), counts, strict=True)), key=repr
    )
    assert got == sorted(((key(v), int(c)) for v, c in expected.items()), key=repr)
    assert released.suppressed == int((series.value_counts(dropna=dropna) < k).sum())


@settings(max_examples=100, deadline=None)
@given(data=frames)
def test_describe_equals_pandas(data: dict[str, list[Any]]) -> None:
    table = to_arrow(data).select(["x", "i"])
    sources = {"t": SourceTable.from_dataset("d", table)}
    frame = table.to_pandas().astype("float64")
    counts = frame.count()
    if (counts < 1).all():
        with pytest.raises(PolicyViolation):
            release({"node": "describe", "input": src()}, sources, {"d": policy("p")})
        return
    released = release({"node": "describe", "input": src()}, sources, {"d": policy("p")})
    assert released.table is not None
    got = released.table.to_pandas().set_index("statistic")
    expected = frame[[c for c in frame if counts[c] >= 1]].describe()
    for c in expected:  # quartiles follow the order-statistic rule (with k = 1: the nearest rank)
        for label, q in (("25%", 0.25), ("50%", 0.5), ("75%", 0.75)):
            expected.loc[label, c] = block_quantile(frame[c].dropna(), q, 1)
    assert list(got.columns) == list(expected.columns)
    assert released.suppressed == int((counts < 1).sum())
    for c in expected:
        for stat in expected.index:
            func = {"std": "std"}.get(stat, "mean")
            assert close(got.loc[stat, c], expected.loc[stat, c], func, data[c]), (c, stat)


# -- performance ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_group_by_mean_is_not_slower_than_pandas() -> None:
    rng = np.random.default_rng(7)
    rows = 1_000_000
    table = pa.table(
        {
            "g": pa.array([f"group{i}" for i in range(50)]).take(pa.array(rng.integers(0, 50, rows))),
            "x": rng.normal(size=rows),
        }
    )
    sources = {"t": SourceTable.from_dataset("d", table)}
    policies = {"d": policy("p", k=10)}
    plan = agg(["g"], ("m", "x", "mean"))
    frame = table.to_pandas()

    def best(run: Any) -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times)

    ours = best(lambda: release(plan, sources, policies))
    theirs = best(lambda: frame.groupby("g").agg(m=("x", "mean")))
    assert ours <= 1.3 * theirs + 0.005, (ours, theirs)
    released = release(plan, sources, policies)
    assert released.table is not None
    expected = frame.groupby("g").agg(m=("x", "mean"))
    assert np.allclose(released.table.column("m").to_numpy(), expected["m"].to_numpy())


def test_a_table_of_several_datasets_obeys_each_policy() -> None:
    """An unsealed table built from two datasets: every row is a record of both, and both policies apply."""
    table = pa.table({"g": ["a"] * 6 + ["b"] * 3, "v": list(range(9))})
    lineage = {"g": frozenset({("h", "g")}), "v": frozenset({("i", "v")})}
    sources = {"t": SourceTable(table, lineage, frozenset({"h", "i"}))}
    policies = {"h": policy("h", k=2), "i": policy("i", k=4)}
    released = release(agg(["g"], ("s", "v", "sum")), sources, policies)
    assert released.table is not None and released.table.to_pydict() == {"g": ["a"], "s": [15]}
    assert (released.suppressed, released.policy_id, released.datasets) == (1, "h+i", ("h", "i"))
    policies["i"] = policy("i", never=("v",))
    with pytest.raises(PolicyViolation) as caught:
        release(agg(["g"], ("s", "v", "sum")), sources, policies)
    assert caught.value.datasets == ("i",)
    with pytest.raises(PolicyViolation) as missing:
        release(agg(["g"], ("n", None, "count")), sources, {"h": policy("h")})
    assert (missing.value.rule, missing.value.datasets) == ("release.allow", ("i",))


def test_aggregate_type_errors_name_the_column_and_type(patients: dict[str, SourceTable]) -> None:
    policies = {"hospital": policy("h")}
    with pytest.raises(VaultError, match="mean needs a numeric column; 'ward' is string"):
        release(agg(["sex"], ("m", "ward", "mean")), patients, policies)
    with pytest.raises(VaultError, match="aggregate: no column 'nope'; columns are patient_id, ward"):
        release(agg(["nope"], ("n", None, "count")), patients, policies)
    texts = release(
        agg(["sex"], ("lo", "ward", "min"), ("hi", "ward", "max"), ("u", "ward", "nunique")), patients, policies
    )
    assert texts.table is not None
    assert texts.table.to_pydict() == {"sex": ["f", "m"], "lo": ["A", "A"], "hi": ["C", "B"], "u": [3, 2]}


def mixed_sources() -> dict[str, SourceTable]:
    table = pa.table(
        {
            "s": pa.array(["a", None, "b", "a", "c", "b"]),
            "i": pa.array([1, 2, None, 4, 5, 6], pa.int64()),
            "u": pa.array([1, 2, 3, 4, 5, 6], pa.uint8()),
            "f": pa.array([0.5, float("nan"), None, -1.0, 2.0, 2.0]),
            "b": pa.array([True, False, None, True, True, False]),
            "t": pa.array([0, 10**12, None, 5, 5, 7], pa.timestamp("us")),
            "d": pa.array(["x", "y", "x", None, "y", "x"]).dictionary_encode(),
            "l": pa.array([[1], [2], None, [], [1, 2], [3]], pa.list_(pa.int64())),
        }
    )
    return {"t": SourceTable.from_dataset("mixed", table)}


MIXED = mixed_sources()
MIXED_COLUMNS = ["s", "i", "u", "f", "b", "t", "d", "l"]


@settings(max_examples=400, deadline=None)
@given(
    by=st.lists(st.sampled_from(MIXED_COLUMNS), max_size=2, unique=True),
    specs=st.lists(
        st.tuples(st.sampled_from([*MIXED_COLUMNS, None]), st.sampled_from([*FUNCS, "quantile"])),
        min_size=1,
        max_size=3,
    ),
    root=st.sampled_from(["aggregate", "value_counts", "describe"]),
)
def test_any_aggregation_releases_or_raises_a_vault_error(
    by: list[str], specs: list[tuple[str | None, str]], root: str
) -> None:
    """Whatever column types meet whatever aggregation, the outcome is a result or a VaultError, never a crash."""
    policies = {"mixed": policy("m", k=2)}
    if root == "aggregate":
        aggs = [(f"a{i}", column if column or func == "count" else "i", func) for i, (column, func) in enumerate(specs)]
        plan = agg(by, *aggs, q=0.3)
    elif root == "value_counts":
        plan = {"node": "value_counts", "input": src(), "column": (by or ["s"])[0]}
    else:
        plan = {"node": "describe", "input": src(), "columns": by or None}
    message = ""
    try:
        released = release(plan, MIXED, policies)
    except VaultError as exc:
        message = str(exc)
    else:
        assert released.table is not None
        assert released.table.num_rows <= 8
    assert "Traceback" not in message


def test_window_functions_need_every_dataset_s_owner_to_allow_them() -> None:
    """A plan computing a window reads rows only where every dataset's policy allows ``window``; the refusal names
    the datasets whose owners do not, and a plan without a window is not asked about it."""
    from kernel_enclave.vault.release import require_windows_allowed

    kinds = frozenset({"schema", "aggregate"})
    policies = {
        "claims": OutputPolicy(id="claims", allow=kinds | {"window"}),
        "members": OutputPolicy(id="members", allow=kinds),
    }
    ranked = {"node": "assign", "input": {"node": "source", "handle": "t"}}
    ranked["columns"] = [["r", {"fn": "over", "args": [{"col": "cost"}], "func": "rank", "by": ["g"]}]]
    require_windows_allowed(ranked, ["claims"], policies, "release")
    with pytest.raises(PolicyViolation) as refused:
        require_windows_allowed(ranked, ["claims", "members"], policies, "release")
    assert refused.value.rule == "release.allow" and list(refused.value.datasets) == ["members"]
    with pytest.raises(PolicyViolation):
        require_windows_allowed(ranked, ["unknown"], policies, "release")  # no policy: no window
    require_windows_allowed({"node": "source", "handle": "t"}, ["members"], policies, "release")
