"""Sealed tables against a real vault: released results equal pandas on the plaintext, and nothing else leaves."""

from __future__ import annotations

import os
import pickle
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest

import confnb as cn
from confnb.analyst import SealedResult, SealedTable

DATA_VALUES = ("north", "south", "island", "gold", "basic")  # strings that occur only as data, never as names


@pytest.fixture
def claims(vault: Any) -> SealedTable:
    return cn.open("claims")


@pytest.fixture
def df(vault: Any) -> pd.DataFrame:
    return vault.owner.frames["claims"]


def _assert_no_data(text: str) -> None:
    for value in DATA_VALUES:
        assert value not in text


# -- opening and what a handle shows ----------------------------------------------------------------------


def test_open_shows_schema_and_policy_but_no_rows(claims: SealedTable) -> None:
    assert claims.datasets == ("claims",)
    assert claims.columns == ["patient_id", "age", "sex", "region", "cost", "visit", "readmitted"]
    assert claims.schema["age"] == "int64" and claims.schema["cost"] == "double"
    assert claims.policy["claims"]["release"]["never_release"] == ["patient_id"]
    for shown in (repr(claims), claims._repr_html_(), claims._repr_markdown_()):
        assert "claims" in shown and "claims-test-v1" in shown and "rows are sealed" in shown
        assert "age" in shown and "int64" in shown and "never releases patient" in shown.replace("\\_", "_")
        _assert_no_data(shown)
    assert "age" in claims and "nope" not in claims
    assert claims.age.to_json() == {"col": "age"}


def test_open_by_directory_and_reopen_by_id_share_the_dataset(vault: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(vault.owner.datasets)
    by_path = cn.open("./claims")
    assert by_path.datasets == ("claims",)
    assert by_path.plan == cn.open("claims").plan  # the vault keeps one handle per opened dataset


def test_the_broker_comes_from_the_argument_else_the_kernel_configuration(
    vault: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    unreachable = "http://127.0.0.1:9/broker"
    with pytest.raises(cn.VaultError, match="no key for 'members'"):
        cn.open("members", broker=unreachable)
    monkeypatch.setenv("CONFNB_BROKER_URL", unreachable)
    with pytest.raises(cn.VaultError, match="no key for 'members'"):
        cn.open("members")
    assert cn.open("members", broker=vault.owner.broker_url).datasets == ("members",)


def test_an_unknown_dataset_is_a_clear_error(vault: Any) -> None:
    with pytest.raises(cn.VaultError, match="no dataset 'nope'"):
        cn.open("nope")


def test_outside_a_kernel_the_api_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONFNB_VAULT_SOCKET", raising=False)
    with pytest.raises(cn.VaultError, match="not inside a confidential kernel: CONFNB_VAULT_SOCKET is not set"):
        cn.open("claims")


# -- released results equal pandas ------------------------------------------------------------------------


def shared_extreme(values: pd.Series, func: str, k: int = 10) -> float:
    """What the vault releases for a min or max: the value if at least k records hold it, else nothing."""
    extreme = getattr(values, func)()
    return float(extreme) if int((values == extreme).sum()) >= k else float("nan")


def block_quantile(values: pd.Series, q: float, k: int = 10) -> float:
    """What the vault releases for a quantile: the mean of the block of k ranks holding rank round(q * (n - 1))."""
    ordered = np.sort(values.dropna().to_numpy(dtype="float64"))
    blocks = max(len(ordered) // k, 1)
    block = min(round(q * (len(ordered) - 1)) // k, blocks - 1)
    end = len(ordered) if block == blocks - 1 else (block + 1) * k
    return float(ordered[block * k : end].mean())


def test_filter_group_by_agg_equals_pandas(claims: SealedTable, df: pd.DataFrame) -> None:
    aggs: dict[str, Any] = {
        "mean_age": ("age", "mean"),
        "n": ("age", "count"),
        "total": ("cost", "sum"),
        "sd": ("cost", "std"),
        "med": ("cost", "median"),
        "lo": ("cost", "min"),
        "hi": ("cost", "max"),
        "regions": ("region", "nunique"),
        "costs": pd.NamedAgg(column="cost", aggfunc="count"),
    }
    older = claims[claims["age"] > 40].group_by(["sex"])
    # Two counts of one group a few records apart: their difference counts the records with a missing cost, fewer
    # than k of them. Refused by the difference checks; each count alone is released.
    with pytest.raises(cn.PolicyViolation, match=r"release\.difference"):
        older.agg(**aggs).release()
    del aggs["costs"]
    released = older.agg(**aggs).release()
    expected = df[df["age"] > 40].groupby(["sex"]).agg(**aggs)
    # Each group's cheapest and dearest claim belong to one patient each: extremes fewer than k records share are
    # withheld: their cells are null, and the report names them by column and group.
    expected["lo"] = expected["hi"] = float("nan")
    expected["med"] = df[df["age"] > 40].groupby(["sex"])["cost"].agg(lambda c: block_quantile(c, 0.5))
    pd.testing.assert_frame_equal(released, expected, check_dtype=False)
    assert released.attrs["confnb_suppressed"] == {"groups": 0, "cells": {"lo": ["F", "M"], "hi": ["F", "M"]}}


def test_window_over_groups_equals_pandas_groupby_rank_and_transform(claims: SealedTable, df: pd.DataFrame) -> None:
    ranked = claims.assign(r=claims["cost"].rank().over("region"), share=claims["cost"].transform("mean").over("sex"))
    released = ranked[ranked["r"] > 20].group_by("sex").agg(mean_r=("r", "mean"), mean_share=("share", "mean"))
    frame = df.assign(r=df.groupby("region")["cost"].rank(), share=df.groupby("sex")["cost"].transform("mean"))
    expected = frame[frame["r"] > 20].groupby("sex").agg(mean_r=("r", "mean"), mean_share=("share", "mean"))
    pd.testing.assert_frame_equal(released.release(), expected, check_dtype=False)
    with pytest.raises(ValueError, match="transform takes one of sum, mean, count"):
        claims["cost"].transform("max")


def test_quantile_three_tuple_matches_pandas_quantile(claims: SealedTable, df: pd.DataFrame) -> None:
    released = claims.group_by("sex").agg(p90=("cost", "quantile", 0.9), p10=("age", "quantile", 0.1)).release()
    grouped = df.groupby("sex")
    expected = pd.DataFrame(
        {
            "p90": grouped["cost"].agg(lambda c: block_quantile(c, 0.9)),
            "p10": grouped["age"].agg(lambda c: block_quantile(c, 0.1)),
        }
    )
    pd.testing.assert_frame_equal(released, expected, check_dtype=False)


def test_small_groups_are_suppressed_and_counted(claims: SealedTable, df: pd.DataFrame) -> None:
    released = claims.group_by(["region", "sex"]).agg(n=("age", "count"), mean_cost=("cost", "mean")).release()
    sizes = df.groupby(["region", "sex"]).size()
    expected = df.groupby(["region", "sex"]).agg(n=("age", "count"), mean_cost=("cost", "mean"))[sizes >= 10]
    pd.testing.assert_frame_equal(released, expected, check_dtype=False)
    assert released.attrs["confnb_suppressed"] == {"groups": int((sizes < 10).sum()), "cells": {}}
    assert released.attrs["confnb_suppressed"]["groups"] > 0
    assert "island" not in released.index.get_level_values("region")


def test_value_counts_is_a_series_like_pandas_without_small_groups(
    claims: SealedTable, df: pd.DataFrame, start_vault: Callable[..., Any]
) -> None:
    released = claims["region"].value_counts().release()
    expected = df["region"].value_counts()
    pd.testing.assert_series_equal(released, expected[expected >= 10], check_dtype=False, check_index_type=False)
    assert released.attrs["confnb_suppressed"] == {"groups": 1, "cells": {}}
    # The region counts added up leave out the island's 6 people: any other count over everyone (here the counts by
    # sex, added up) would give their number. Refused; a new kernel, which remembers nothing, releases them.
    with pytest.raises(cn.PolicyViolation, match=r"release\.difference"):
        claims.value_counts("sex", dropna=True).release()
    start_vault()
    fresh = cn.open("claims")
    ascending = fresh.value_counts("sex", dropna=True).release()
    assert list(ascending.index) == list(df["sex"].value_counts().index)
    assert list(fresh["sex"].value_counts(ascending=True).release()) == sorted(df["sex"].value_counts())


def test_describe_matches_pandas(claims: SealedTable, df: pd.DataFrame) -> None:
    released = claims[["age", "cost"]].describe().release()
    expected = df[["age", "cost"]].describe()
    for column in expected:
        for stat in ("min", "max"):
            expected.loc[stat, column] = shared_extreme(df[column], stat)
        for stat, q in (("25%", 0.25), ("50%", 0.5), ("75%", 0.75)):  # block means, not interpolated quantiles
            expected.loc[stat, column] = block_quantile(df[column], q)
    pd.testing.assert_frame_equal(released, expected, check_dtype=False)
    one = claims["cost"].describe().release()
    pd.testing.assert_series_equal(one, expected["cost"], check_dtype=False)


def test_row_count_and_column_statistics_are_python_scalars(claims: SealedTable, df: pd.DataFrame) -> None:
    assert claims.count().release() == len(df)
    assert claims[claims["sex"] == "F"].count().release() == int((df["sex"] == "F").sum())
    age = claims["age"]
    checks = {
        "mean": df["age"].mean(),
        "sum": df["age"].sum(),
        "min": shared_extreme(df["age"], "min"),
        "max": shared_extreme(df["age"], "max"),
        "std": df["age"].std(),
        "var": df["age"].var(),
        "median": block_quantile(df["age"], 0.5),
        "nunique": df["age"].nunique(),
        "count": df["age"].count(),
    }
    for stat, expected in checks.items():
        if pd.isna(expected):  # an extreme fewer than k records share: a scalar withheld is refused
            with pytest.raises(cn.PolicyViolation, match=r"release\.min_group_size"):
                getattr(age, stat)().release()
            continue
        value = getattr(age, stat)().release()
        assert isinstance(value, int | float) and not isinstance(value, np.generic), stat
        assert value == pytest.approx(float(expected)), stat
    assert claims["cost"].count().release() == df["cost"].count()  # non-null values, as pandas
    assert claims["cost"].quantile(0.25).release() == pytest.approx(block_quantile(df["cost"], 0.25))
    quantiles = claims["age"].quantile([0.25, 0.75]).release()
    expected_quantiles = pd.Series([block_quantile(df["age"], 0.25), block_quantile(df["age"], 0.75)], [0.25, 0.75])
    pd.testing.assert_series_equal(quantiles, expected_quantiles, check_dtype=False, check_names=False)


def test_whole_table_agg_is_a_series_of_the_output_names(claims: SealedTable, df: pd.DataFrame) -> None:
    released = claims.agg(mean_age=("age", "mean"), n=("age", "count"), p50=("cost", "quantile", 0.5)).release()
    assert list(released.index) == ["mean_age", "n", "p50"]
    assert released["mean_age"] == pytest.approx(df["age"].mean())
    assert released["n"] == len(df)
    assert released["p50"] == pytest.approx(block_quantile(df["cost"], 0.5))
    with pytest.raises(cn.PolicyViolation):  # the oldest patients are fewer than 10: the one number is withheld
        claims.agg({"age": "max"}).release()
    assert pd.isna(shared_extreme(df["age"], "max"))


def test_group_by_column_conveniences(claims: SealedTable, df: pd.DataFrame) -> None:
    grouped = claims.group_by("sex")
    pd.testing.assert_series_equal(grouped["age"].mean().release(), df.groupby("sex")["age"].mean())
    oldest = df.groupby("sex")["age"].agg(lambda ages: shared_extreme(ages, "max"))
    pd.testing.assert_series_equal(grouped["age"].agg("max").release(), oldest, check_dtype=False)
    pd.testing.assert_series_equal(grouped.size().release(), df.groupby("sex").size(), check_dtype=False)
    medians = df.groupby("sex")[["age", "cost"]].agg(lambda values: block_quantile(values, 0.5))
    pd.testing.assert_frame_equal(grouped[["age", "cost"]].median().release(), medians, check_dtype=False)
    expected = df.groupby("sex")["age"].agg(["mean", "max"]).assign(max=oldest)
    pd.testing.assert_frame_equal(grouped["age"].agg(["mean", "max"]).release(), expected, check_dtype=False)
    p90 = df.groupby("sex")["age"].agg(lambda ages: block_quantile(ages, 0.9))
    pd.testing.assert_series_equal(grouped.age.quantile(0.9).release(), p90, check_dtype=False)


def test_derived_columns_equal_pandas(claims: SealedTable, df: pd.DataFrame) -> None:
    derived = claims.assign(
        month=claims["visit"].dt.month,
        band=cn.where(claims["age"] >= 60, "60+", "under 60"),
        per_year=(claims["cost"] / claims["age"]).round(2),
        high=lambda t: t["cost"].fillna(0) > 1000,
    )
    derived["north"] = derived["region"].isin(["north"]) & ~derived["sex"].str.lower().str.startswith("m")
    released = derived.group_by(["band", "high"]).agg(n=("age", "count"), avg=("per_year", "mean")).release()
    plain = df.assign(
        band=np.where(df["age"] >= 60, "60+", "under 60"),
        per_year=(df["cost"] / df["age"]).round(2),
        high=df["cost"].fillna(0) > 1000,
    )
    expected = plain.groupby(["band", "high"]).agg(n=("age", "count"), avg=("per_year", "mean"))
    expected = expected[plain.groupby(["band", "high"]).size() >= 10]
    pd.testing.assert_frame_equal(released, expected, check_dtype=False)
    months = derived["month"].value_counts().release()
    assert months.sum() <= len(df) and set(months.index) <= set(range(1, 13))
    north_women = derived[derived["north"]].count().release()
    assert north_women == int(((df["region"] == "north") & (df["sex"] == "F")).sum())
    assert (claims["age"] * 2 + 1).mean().release() == pytest.approx((df["age"] * 2 + 1).mean())


def test_join_combines_datasets_and_their_policies(vault: Any, claims: SealedTable, df: pd.DataFrame) -> None:
    members = cn.open("members")
    joined = claims.join(members, on="patient_id", how="inner")
    assert joined.datasets == ("claims", "members")
    assert set(joined.policy) == {"claims", "members"}
    released = joined.group_by("plan").agg(mean_age=("age", "mean"), n=("age", "count")).release()
    plain = df.merge(vault.owner.frames["members"], on="patient_id", how="inner")
    expected = plain.groupby("plan").agg(mean_age=("age", "mean"), n=("age", "count"))
    pd.testing.assert_frame_equal(released, expected, check_dtype=False)
    with pytest.raises(cn.PolicyViolation) as caught:
        joined.count().release()  # members does not release row counts; claims would
    assert caught.value.rule == "release.allow"
    assert caught.value.datasets == ("members",)


# -- what is withheld, and how it is said -----------------------------------------------------------------


def test_never_release_column_is_withheld_naming_rule_and_dataset(claims: SealedTable) -> None:
    with pytest.raises(cn.PolicyViolation) as caught:
        claims["patient_id"].max().release()
    violation = caught.value
    assert violation.rule == "release.never_release"
    assert violation.datasets == ("claims",)
    assert "patient_id" in str(violation) and "release.never_release" in str(violation) and "'claims'" in str(violation)
    assert "1239" not in str(violation)
    frames = traceback.extract_tb(violation.__traceback__)
    assert [os.path.basename(frame.filename) for frame in frames] == ["test_table.py", "errors.py"]
    assert violation.__cause__ is None and violation.__suppress_context__
    # a filter on it is fine: it does not put the column into the result
    assert claims[claims["patient_id"] < 1100].count().release() == 100


def test_an_ungrouped_result_below_the_minimum_is_withheld(claims: SealedTable) -> None:
    island = claims[claims["region"] == "island"]
    with pytest.raises(cn.PolicyViolation, match=r"fewer than 10 records") as caught:
        island["age"].mean().release()
    assert caught.value.rule == "release.min_group_size" and caught.value.datasets == ("claims",)
    with pytest.raises(cn.PolicyViolation):
        island.count().release()


def test_a_kind_the_policy_does_not_allow_is_withheld(vault: Any) -> None:
    locked = cn.open("locked")
    assert locked.columns == ["x"]  # schema is allowed
    with pytest.raises(cn.PolicyViolation) as caught:
        locked["x"].sum().release()
    assert caught.value.rule == "release.allow" and caught.value.datasets == ("locked",)


def test_preview_says_what_the_policy_allows(claims: SealedTable, df: pd.DataFrame) -> None:
    preview = claims[claims["age"] > 40].preview()
    assert preview["rows"] == int((df["age"] > 40).sum())
    assert [c["name"] for c in preview["columns"]] == list(df.columns)
    assert "values" in preview["withheld"]
    _assert_no_data(repr(preview))
    of_result = claims[claims["age"] > 40].group_by("sex").agg(n=("age", "count")).preview()
    assert of_result == preview  # the rows it is computed from; the result itself is what release() decides


# -- conversion paths are refused -------------------------------------------------------------------------


def test_a_sealed_table_refuses_every_way_to_its_rows(claims: SealedTable) -> None:
    with pytest.raises(TypeError, match=r"t\.count\(\)\.release\(\)"):
        len(claims)
    with pytest.raises(TypeError, match="cannot be iterated"):
        iter(claims)
    with pytest.raises(TypeError, match="cannot be iterated"):
        list(claims)
    with pytest.raises(TypeError, match="cannot become an array"):
        np.asarray(claims)
    with pytest.raises(TypeError):
        pd.DataFrame(claims)
    with pytest.raises(TypeError, match="no positional row access"):
        claims[0]
    with pytest.raises(TypeError, match="no positional row access"):
        claims[:5]
    with pytest.raises(TypeError, match=r"t\.seal"):
        pickle.dumps(claims)
    for name in ("to_pandas", "values", "to_numpy", "head", "iloc", "to_csv", "shape"):
        with pytest.raises(AttributeError, match="rows are sealed") as caught:
            getattr(claims, name)
        assert f"{name!r}" in str(caught.value)
    with pytest.raises(AttributeError, match="no attribute or column 'nope'"):
        claims.nope  # noqa: B018
    with pytest.raises(KeyError, match="no column 'nope'"):
        claims["nope"]
    assert bool(claims)


def test_an_unreleased_result_is_not_a_value(claims: SealedTable) -> None:
    result = claims["age"].mean()
    assert isinstance(result, SealedResult)
    for convert in (float, int, bool):
        with pytest.raises(TypeError, match=r"call \.release\(\)"):
            convert(result)
    assert "rows are sealed" in repr(result) and "claims" in repr(result)


def test_requests_from_several_threads_do_not_interleave(claims: SealedTable, df: pd.DataFrame) -> None:
    from concurrent.futures import ThreadPoolExecutor

    # Counts whose record sets differ by at least k = 10 records: nearer ones are refused by the difference checks.
    thresholds: list[int] = []
    for threshold in range(20, 80):
        above = int((df["age"] > threshold).sum())
        if above >= 10 and (not thresholds or int((df["age"] > thresholds[-1]).sum()) - above >= 10):
            thresholds.append(threshold)
    assert len(thresholds) >= 8

    def count(threshold: int) -> int:
        return int(claims[claims["age"] > threshold].count().release())

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(count, thresholds))
    assert results == [int((df["age"] > t).sum()) for t in thresholds]
