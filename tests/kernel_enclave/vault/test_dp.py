"""Differentially private releases through OpenDP: the shapes that release, and every refusal with its twin."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import polars as pl
import pyarrow as pa
import pytest
from plan_json import col, fn, lit, src

from kernel_enclave.vault import dp
from kernel_enclave.vault.plan import SourceTable
from kernel_enclave.vault.protocol import VaultError

N = 600
DIAGNOSES = ("cardiac", "respiratory", "orthopaedic")


def dataset() -> SourceTable:
    return SourceTable.from_dataset(
        "claims",
        pa.table(
            {
                "patient_id": [i // 2 for i in range(N)],  # two claims per patient
                "cost": [float((i * 37) % 1000) for i in range(N)],
                "age": [i % 90 for i in range(N)],
                "diagnosis": [DIAGNOSES[i % 3] for i in range(N)],
                "ward": [f"w{i % 2}" for i in range(N)],
            }
        ),
    )


def privacy(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "mode": "dp",
        "epsilon": 10.0,
        "delta": 1e-7,
        "epsilon_per_kernel": 5.0,
        "bounds": {"cost": [0.0, 1000.0], "age": [0.0, 90.0]},
        "keys": {"diagnosis": ["cardiac", "respiratory", "unknown"]},
    }
    base.update(changes)
    return {key: value for key, value in base.items() if value is not None}


def prepare(plan: dict[str, Any], epsilon: float = 1.0, **changes: Any) -> dp.PreparedDpRelease:
    never = changes.pop("never", frozenset({"patient_id"}))
    return dp.prepare(plan, {"t": dataset()}, {"claims": privacy(**changes)}, epsilon, never_release={"claims": never})


def aggregate(by: list[str], *aggs: dict[str, Any], input: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"node": "aggregate", "input": input or src(), "by": by, "aggs": list(aggs)}


def agg(name: str, func: str, column: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"name": name, "func": func, "column": column, **extra}


def refused(plan: dict[str, Any], message: str, epsilon: float = 1.0, **changes: Any) -> None:
    with pytest.raises(VaultError) as caught:
        prepare(plan, epsilon, **changes)
    assert str(caught.value).startswith("differential privacy: ")
    assert message in str(caught.value)


# ---------------------------------------------------------------------------------------------------------------
# Shapes that release


def test_count_releases_one_noisy_number_with_its_accuracy() -> None:
    prepared = prepare({"node": "count", "input": src()})
    assert (prepared.datasets, prepared.epsilon, prepared.delta) == (("claims",), 1.0, 0.0)
    assert prepared.plan_digest.startswith("sha256:") and len(prepared.plan_digest) == 71
    released = prepared.run()
    assert released.table.column_names == ["count"]
    assert abs(released.table.column("count")[0].as_py() - N) < 60
    (accuracy,) = released.accuracy
    assert (accuracy.column, accuracy.statistic, accuracy.distribution) == ("count", "count", "Integer Laplace")
    assert accuracy.scale > 0 and accuracy.half_width[0] is not None and accuracy.half_width[0] > 0


def test_public_keys_release_exactly_those_groups_without_delta() -> None:
    prepared = prepare(aggregate(["diagnosis"], agg("n", "count"), agg("total", "sum", "cost")))
    assert prepared.delta == 0.0
    released = prepared.run()
    assert released.table.column_names == ["diagnosis", "n", "total"]
    assert released.table.column("diagnosis").to_pylist() == ["cardiac", "respiratory", "unknown"]
    counts = released.table.column("n").to_pylist()
    assert abs(counts[0] - N / 3) < 60 and abs(counts[2]) < 60  # "unknown" has no rows: noise only
    assert {a.column for a in released.accuracy} == {"n", "total"}
    assert all(w is not None and w > 0 for a in released.accuracy for w in a.half_width)
    assert released.threshold is None


def test_private_keys_are_selected_by_threshold_with_delta() -> None:
    prepared = prepare(aggregate(["ward"], agg("n", "count")), epsilon=2.0)
    assert prepared.delta == pytest.approx(1e-7 * 2.0 / 10.0)
    assert prepared.threshold is not None and prepared.threshold > 0
    released = prepared.run()
    assert released.table.column("ward").to_pylist() == ["w0", "w1"]  # 300 rows each, far above the threshold
    assert released.threshold == prepared.threshold


def test_threshold_keeps_no_group_below_it() -> None:
    plan = aggregate(["age"], agg("total", "sum", "cost"))  # 90 groups of 6-7 rows, far below any threshold
    released = prepare(plan).run()
    assert released.table.column_names == ["age", "total"]
    assert released.table.num_rows == 0


def test_mean_median_quantile_and_column_count() -> None:
    plan = aggregate(
        [],
        agg("mean_cost", "mean", "cost"),
        agg("median_age", "median", "age"),
        agg("q90", "quantile", "age", q=0.9),
        agg("with_cost", "count", "cost"),
    )
    released = prepare(plan, epsilon=5.0).run()
    row = released.table.to_pylist()[0]
    assert abs(row["mean_cost"] - 499.5) < 60
    assert 30 <= float(row["median_age"]) <= 60 and 60 <= float(row["q90"]) <= 90
    assert abs(row["with_cost"] - N) < 30
    by_name = {a.column: a for a in released.accuracy}
    width = by_name["mean_cost"].half_width[0]
    assert by_name["mean_cost"].statistic == "mean" and width is not None and 0 < width < math.inf
    assert by_name["median_age"].distribution == "ExponentialMin" and by_name["median_age"].half_width == (None,)


def test_filter_select_assign_compile_with_exact_semantics() -> None:
    rows = fn("and", fn("isin", col("diagnosis"), values=["cardiac", "respiratory"]), fn("ge", col("age"), lit(45)))
    plan = aggregate(
        ["diagnosis"],
        agg("n", "count"),
        agg("aged", "count", "age"),
        input={
            "node": "assign",
            "input": {
                "node": "select",
                "input": {"node": "filter", "input": src(), "predicate": rows},
                "columns": ["diagnosis", "cost", "age"],
            },
            "columns": [["age", fn("add", col("age"), lit(1))]],
        },
    )
    released = prepare(plan, epsilon=5.0).run()
    assert released.table.column_names == ["diagnosis", "n", "aged"]
    table = released.table.to_pydict()
    counts = dict(zip(table["diagnosis"], table["n"], strict=True))
    exact = sum(1 for i in range(N) if DIAGNOSES[i % 3] == "cardiac" and i % 90 >= 45)
    assert abs(counts["cardiac"] - exact) < 20 and abs(counts["unknown"]) < 20
    assert list(counts) == ["cardiac", "respiratory", "unknown"]  # the public keys, whatever the filter kept


def test_identifier_unit_truncates_each_persons_rows() -> None:
    prepared = prepare({"node": "count", "input": src()}, epsilon=5.0, unit="patient_id", max_contributions=1)
    released = prepared.run()
    assert abs(released.table.column("count")[0].as_py() - N / 2) < 20  # one claim of each patient's two


def test_only_the_named_columns_reach_opendp_never_hidden_ones() -> None:
    source = dataset()
    assert source.hidden  # the dataset carries a hidden record-id column
    counted = prepare({"node": "count", "input": src()})
    assert counted.columns == ("patient_id",)  # a plain count needs one column to count rows: the first number
    grouped = prepare(aggregate(["diagnosis"], agg("m", "mean", "cost")))
    assert grouped.columns == ("cost", "diagnosis")  # in dataset order
    per_person = prepare(aggregate(["diagnosis"], agg("n", "count")), unit="patient_id", epsilon=2.0)
    assert per_person.columns == ("patient_id", "diagnosis")  # the privacy unit's column always
    for prepared in (counted, grouped, per_person):
        assert not set(prepared.columns) & set(source.hidden)
        assert prepared.run().table.num_rows >= 1


def test_a_release_runs_once() -> None:
    prepared = prepare({"node": "count", "input": src()})
    prepared.run()
    with pytest.raises(VaultError, match="has run already"):
        prepared.run()


# ---------------------------------------------------------------------------------------------------------------
# Refusals, each with a legitimate twin above or beside it


def test_a_self_join_is_refused() -> None:
    joined = {"node": "join", "left": src(), "right": src(), "on": ["patient_id"]}
    refused({"node": "count", "input": joined}, "a dataset joined with itself is not supported")


def test_unbounded_column_is_refused_naming_the_key() -> None:
    refused(
        aggregate([], agg("s", "sum", "cost")),
        "sum of column 'cost' needs public bounds: the owner must add privacy.bounds.cost",
        bounds={"age": [0.0, 90.0]},
    )
    prepare(aggregate([], agg("s", "sum", "cost")))  # the twin: with bounds


def test_never_release_column_is_refused_as_key_and_aggregate() -> None:
    refused(aggregate(["patient_id"], agg("n", "count")), "derives from never_release column 'patient_id'")
    refused(
        aggregate([], agg("s", "sum", "cost")), "derives from never_release column 'cost'", never=frozenset({"cost"})
    )
    derived = {"node": "assign", "input": src(), "columns": [["c2", fn("add", col("cost"), lit(1.0))]]}
    refused(
        aggregate([], agg("n", "count", "c2"), input=derived),
        "derives from never_release column 'cost'",
        never=frozenset({"cost"}),
    )
    prepare(aggregate(["ward"], agg("n", "count")))  # the twin: an ordinary key


def test_private_keys_without_delta_are_refused() -> None:
    refused(aggregate(["ward"], agg("n", "count")), "needs partition selection, which needs delta > 0", delta=0.0)
    prepare(aggregate(["diagnosis"], agg("n", "count")), delta=0.0)  # the twin: public keys need no delta


def test_epsilon_outside_its_range_is_refused() -> None:
    refused({"node": "count", "input": src()}, "epsilon must be a number greater than 0", epsilon=0.0)
    refused({"node": "count", "input": src()}, "epsilon must be a number greater than 0", epsilon=-1.0)
    refused({"node": "count", "input": src()}, "exceeds the owner's limit of 5 per release", epsilon=6.0)
    assert prepare({"node": "count", "input": src()}, epsilon=5.0).epsilon == 5.0


def test_unsupported_expressions_and_aggregations_are_refused() -> None:
    logged = {"node": "assign", "input": src(), "columns": [["l", fn("log", col("cost"))]]}
    refused(aggregate([], agg("n", "count"), input=logged), "assign: function 'log' is not supported yet")
    where = {"node": "filter", "input": src(), "predicate": fn("where", lit(True), lit(True), lit(False))}
    refused({"node": "count", "input": where}, "filter: function 'where' is not supported yet")
    refused(aggregate([], agg("s", "std", "cost")), "aggregation 'std' is not supported yet")
    refused({"node": "describe", "input": src(), "columns": ["age", "ward"]}, "no bounds for 'ward'")
    refused(src(), "raw rows are never released")
    added = {"node": "assign", "input": src(), "columns": [["c2", fn("add", col("cost"), lit(1.0))]]}
    prepare(aggregate([], agg("n", "count", "c2"), input=added))  # the twin: a supported function


def test_grouped_statistics_after_a_filter_need_public_keys() -> None:
    adults = {"node": "filter", "input": src(), "predicate": fn("ge", col("age"), lit(18))}
    refused(aggregate(["ward"], agg("s", "sum", "cost"), input=adults), "sum of column 'cost' by groups")
    prepare(aggregate([], agg("s", "sum", "cost"), input=adults))  # the twins: no groups,
    prepare(aggregate(["ward"], agg("s", "sum", "cost")))  # groups without the filter,
    # and after the filter, groups whose keys the owner made public: the sizes OpenDP needs survive the filter.
    keyed = prepare(
        aggregate(["diagnosis"], agg("m", "mean", "cost"), agg("q", "median", "cost"), input=adults), epsilon=5.0
    ).run()
    frame = dataset().data.collect().filter(pl.col("age") >= 18)
    truth = frame.group_by("diagnosis").agg(pl.col("cost").mean().alias("m")).sort("diagnosis")
    released = pl.from_arrow(keyed.table)
    assert isinstance(released, pl.DataFrame)
    assert released.get_column("diagnosis").to_list() == ["cardiac", "respiratory", "unknown"]
    mean = dict(zip(released.get_column("diagnosis").to_list(), released.get_column("m").to_list(), strict=True))
    for diagnosis, exact in zip(truth.get_column("diagnosis"), truth.get_column("m"), strict=True):
        if diagnosis in mean:  # a public key (orthopaedic is not one: its rows are in no group)
            assert abs(mean[diagnosis] - exact) < 50, (diagnosis, mean[diagnosis], exact)  # of 0..1000, at ε = 5


def test_exact_mode_policy_is_refused() -> None:
    with pytest.raises(VaultError, match="is not in dp mode"):
        dp.prepare(
            {"node": "count", "input": src()},
            {"t": dataset()},
            {"claims": {"mode": "exact"}},
            1.0,
            never_release={},
        )


def test_type_errors_are_the_exact_engines() -> None:
    bad = {"node": "filter", "input": src(), "predicate": fn("add", col("cost"), lit(1.0))}
    with pytest.raises(VaultError, match="not a boolean"):
        prepare({"node": "count", "input": bad})


# ---------------------------------------------------------------------------------------------------------------
# One copy of a dataset inside OpenDP, many releases


def test_releases_in_a_row_on_one_dataset_each_calibrate_to_their_own_epsilon() -> None:
    source = dataset()
    plan = aggregate(["diagnosis"], agg("n", "count"), agg("total", "sum", "cost"))

    def release(epsilon: float) -> dp.DpRelease:
        return dp.prepare(
            plan, {"t": source}, {"claims": privacy()}, epsilon, never_release={"claims": frozenset()}
        ).run()

    first, second, third = release(1.0), release(2.0), release(1.0)
    for one, two, again in zip(first.accuracy, second.accuracy, third.accuracy, strict=True):
        assert one.column == two.column == again.column
        assert two.scale == pytest.approx(one.scale / 2, rel=1e-6)  # twice the epsilon, half the noise
        assert again.scale == pytest.approx(one.scale, rel=1e-12)  # the first release left no trace on the third
    assert (first.epsilon, second.epsilon, third.epsilon) == (1.0, 2.0, 1.0)
    counts = [r.table.column("n").to_pylist()[0] for r in (first, second, third)]
    assert all(abs(c - N / 3) < 60 for c in counts)
    assert len({tuple(r.table.column("total").to_pylist()) for r in (first, second, third)}) == 3  # fresh noise


def test_concurrent_releases_on_one_dataset_all_release() -> None:
    source = dataset()
    plan = aggregate(["diagnosis"], agg("m", "mean", "cost"))

    def release(epsilon: float) -> dp.DpRelease:
        return dp.prepare(
            plan, {"t": source}, {"claims": privacy()}, epsilon, never_release={"claims": frozenset()}
        ).run()

    with ThreadPoolExecutor(max_workers=4) as pool:
        released = list(pool.map(release, [0.5, 1.0, 2.0, 4.0] * 3))
    assert all(r.table.column("diagnosis").to_pylist() == ["cardiac", "respiratory", "unknown"] for r in released)
    scales = [r.accuracy[0].scale for r in released]
    assert scales[:4] == pytest.approx(scales[4:8]) and scales[:4] == pytest.approx(scales[8:])
    assert scales[0] == pytest.approx(2 * scales[1]) and scales[1] == pytest.approx(2 * scales[2])


def test_a_new_dataset_object_gets_its_own_copy_inside_opendp() -> None:
    plan = {"node": "count", "input": src()}
    small = SourceTable.from_dataset("claims", pa.table({"age": list(range(10))}))
    large = SourceTable.from_dataset("claims", pa.table({"age": list(range(5_000))}))
    for table, rows in ((small, 10), (large, 5_000), (small, 10)):
        found = dp.prepare(plan, {"t": table}, {"claims": privacy()}, 5.0, never_release={}).run()
        assert abs(found.table.column("count")[0].as_py() - rows) < 20


def test_value_counts_over_public_keys_are_noisy_counts_largest_first() -> None:
    released = prepare({"node": "value_counts", "input": src(), "column": "diagnosis"}).run()
    assert released.table.column_names == ["diagnosis", "count"]
    names, values = released.table.column("diagnosis").to_pylist(), released.table.column("count").to_pylist()
    counts = dict(zip(names, values, strict=True))
    assert set(counts) == {"cardiac", "respiratory", "unknown"}  # exactly the public keys, an empty one too
    assert abs(counts["cardiac"] - N / 3) < 60 and abs(counts["unknown"]) < 60
    assert released.table.column("count").to_pylist() == sorted(counts.values(), reverse=True)
    (accuracy,) = released.accuracy
    assert accuracy.scale > 0
    # Without public keys the values are chosen by OpenDP's threshold, which needs the owner's delta.
    refused({"node": "value_counts", "input": src(), "column": "ward"}, "partition selection", delta=0.0)
    wards = prepare({"node": "value_counts", "input": src(), "column": "ward"}).run()
    assert set(wards.table.column("ward").to_pylist()) <= {"w0", "w1"}


@pytest.mark.parametrize("source", ["dataset", "assigned"])
def test_nan_is_missing_whether_the_dataset_holds_it_or_the_plan_makes_it(source: str) -> None:
    """A column the vault found free of NaN is read without a NaN pass; one that holds NaN, or that the plan
    recomputes (0/0 is NaN), still has its NaN counted as missing, as the exact engine counts it."""
    values = [float(i % 100) for i in range(N)]
    stays = [math.nan if i % 4 == 0 else v for i, v in enumerate(values)] if source == "dataset" else values
    table = pa.table({"patient_id": list(range(N)), "cost": stays, "age": [i % 90 for i in range(N)]})
    loaded = SourceTable.from_dataset("claims", table)
    assert ("cost" in loaded.nan_free) is (source == "assigned")
    plan_input: dict[str, Any] = src()
    if source == "assigned":  # cost / age: NaN where both are 0 (the first row), an infinity where only age is
        ratio = fn("truediv", col("cost"), fn("cast", col("age"), type="float64"))
        plan_input = {"node": "assign", "input": src(), "columns": [["cost", ratio]]}
    plan = aggregate([], agg("n", "count", "cost"), agg("m", "mean", "cost"), input=plan_input)
    released = dp.prepare(
        plan,
        {"t": loaded},
        {"claims": privacy(epsilon=50.0, epsilon_per_kernel=50.0)},
        40.0,
        never_release={"claims": frozenset()},
    ).run()
    frame = pl.from_arrow(released.table)
    assert isinstance(frame, pl.DataFrame)
    present = N - N // 4 if source == "dataset" else N - 1
    assert abs(frame.get_column("n")[0] - present) < 20  # NaN rows are not counted
    assert frame.get_column("m")[0] is not None and math.isfinite(frame.get_column("m")[0])


# ---------------------------------------------------------------------------------------------------------------
# Two owners' datasets joined


def patients() -> SourceTable:
    ids = list(range(N // 2))
    return SourceTable.from_dataset(
        "patients", pa.table({"patient_id": ids, "region": ["north" if i % 3 else "south" for i in ids]})
    )


def joined(by: list[str], *aggs: dict[str, Any], how: str = "inner") -> dict[str, Any]:
    join = {"node": "join", "left": src(), "right": src("p"), "on": ["patient_id"], "how": how}
    return {"node": "aggregate", "input": join, "by": by, "aggs": list(aggs)}


def prepare_joined(plan: dict[str, Any], epsilon: float = 1.0) -> dp.PreparedDpRelease:
    owners = {
        "claims": privacy(),
        "patients": {"mode": "dp", "epsilon": 4.0, "delta": 1e-7, "keys": {"region": ["north", "south"]}},
    }
    never = {"claims": frozenset({"patient_id"}), "patients": frozenset()}
    return dp.prepare(plan, {"t": dataset(), "p": patients()}, owners, epsilon, never_release=never)


def test_a_join_of_two_owners_datasets_is_one_noisy_release_charged_to_both() -> None:
    """Each patient keeps one claim (the first): the means by region are those of the first claims, with noise."""
    prepared = prepare_joined(joined(["region"], agg("m", "mean", "cost"), agg("n", "count")), epsilon=4.0)
    assert prepared.datasets == ("claims", "patients")  # both owners are charged
    released = pl.from_arrow(prepared.run().table)
    assert isinstance(released, pl.DataFrame)
    assert released.get_column("region").to_list() == ["north", "south"]
    claims = dataset().data.collect().group_by("patient_id", maintain_order=True).first()
    first = claims.join(patients().data.collect(), on="patient_id")
    truth = first.group_by("region").agg(pl.col("cost").mean().alias("m"), pl.len().alias("n")).sort("region")
    for row, exact in zip(released.iter_rows(named=True), truth.iter_rows(named=True), strict=True):
        assert abs(row["m"] - exact["m"]) < 200, (row, exact)  # cost in 0..1000 at ε = 4 over ~100 patients
        assert abs(row["n"] - exact["n"]) < 30


def test_a_joined_release_is_calibrated_to_twice_the_contributions() -> None:
    """Truncating each join key to its first row is stable with factor two (removing a row lets the next one in):
    a count over the join carries twice the noise of the same count over one dataset, at the same ε."""
    alone = prepare(aggregate([], agg("n", "count")), epsilon=1.0).run().accuracy[0].scale
    both = prepare_joined(joined([], agg("n", "count")), epsilon=1.0).run().accuracy[0].scale
    assert both == pytest.approx(2 * alone, rel=1e-6)


def test_joins_keep_every_owners_rules() -> None:
    with pytest.raises(VaultError, match="only as an inner join"):
        prepare_joined(joined(["region"], agg("n", "count"), how="left"))
    with pytest.raises(VaultError, match="never_release column 'patient_id'"):
        prepare_joined(joined(["patient_id"], agg("n", "count")))
    with pytest.raises(VaultError, match="exceeds the owner's limit of 4"):  # the stricter owner's cap binds
        prepare_joined(joined(["region"], agg("n", "count")), epsilon=4.5)
