"""Two numbers of one release that agree on every row but the target's: their difference is the target's value.

``sum(cn.where(who, t.cost, t.age))`` and ``sum(t.age)`` each rest on all 4,000 admissions and pass every rule on a
released number (thousands of contributing records, no value held by most of them), yet the first less the second
is the target's cost less their age, and ``sum(cn.where(who, 2 * t.age, t.age))`` less ``sum(t.age)`` is their age:
the cost from one release of three numbers. A mask needs no ``where``: arithmetic that underflows to zero on every
other row (``t.cost * exp(-1e9 * (t.cost - c) ** 2)``) does the same. The vault withholds the numbers of a
combination that rests on fewer than k records, in every group. Each attack checks the numbers that came back
against the secret, and shows that with the rule removed the same release gives it; the twins (derived columns
that differ from the plain ones on many rows) are released and equal pandas.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

import confnb as cn

from .test_exact_masking import Recovered, _numbers


@pytest.fixture
def without_the_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """The vault (in this process) with the rule on combinations removed, to show that it is what protects."""
    from kernel_enclave.vault import release

    monkeypatch.setattr(release, "_combined", lambda *args, **kwargs: {})


def _who(t: Any, hospital: Any) -> Any:
    return t["cost"] == float(hospital.target["cost"])  # one attribute the analyst knows of the target picks it out


def _cost_from(release: Any) -> float:
    """The attack's arithmetic: (cost - age) + age, from the three sums."""
    return float(release["masked_cost"] - release["ages"] + (release["masked_age"] - release["ages"]))


def _three_sums(t: Any, who: Any) -> Any:
    cost, age = t["cost"], t["age"]
    crafted = t.assign(masked_cost=cn.where(who, cost, age), masked_age=cn.where(who, 2 * age, age))
    return crafted.agg(masked_cost=("masked_cost", "sum"), masked_age=("masked_age", "sum"), ages=("age", "sum"))


def test_two_sums_agreeing_on_all_rows_but_one_do_not_give_its_value(hospital: Any, recovered: Recovered) -> None:
    t = hospital.open()
    secret = float(hospital.target["cost"])
    with pytest.raises(cn.PolicyViolation) as caught:
        _three_sums(t, _who(t, hospital)).release()
    assert caught.value.rule == "release.difference" and str(secret) not in str(caught.value)
    # Grouped, the crafted numbers are withheld in every group (the target's group alone would say their sex);
    # the count beside them is released and equal to pandas.
    crafted = t.assign(masked_cost=cn.where(_who(t, hospital), t.cost, t.age))
    grouped = crafted.group_by("sex").agg(
        masked_cost=("masked_cost", "sum"), ages=("age", "sum"), patients=("age", "count")
    )
    released = grouped.release()
    assert released["masked_cost"].isna().all() and released["ages"].isna().all()
    assert released.attrs["confnb_suppressed"]["cells"] == {"masked_cost": ["F", "M"], "ages": ["F", "M"]}
    pd.testing.assert_series_equal(
        released["patients"], hospital.frame.groupby("sex")["age"].count(), check_names=False, check_dtype=False
    )
    for number in _numbers(released):
        assert not recovered(number, secret)


def test_without_the_rule_the_same_release_gives_the_cost(
    hospital: Any, recovered: Recovered, without_the_rule: None
) -> None:
    """The attack is real: what the rule withholds above is the target's cost, to the cent."""
    t = hospital.open()
    assert recovered(_cost_from(_three_sums(t, _who(t, hospital)).release()), float(hospital.target["cost"]))


@pytest.mark.parametrize(
    "crafted",
    [
        # a mean: the difference times the row count
        lambda t, who, c: (cn.where(who, t.cost, t.length_of_stay), "mean", "length_of_stay"),
        # a column plus a mask of itself
        lambda t, who, c: (t.cost + cn.where(who, t.cost, t.cost * 0), "sum", "cost"),
        # no where at all: exp underflows to 0.0 on every other row, and is 1.0 on the target's
        lambda t, who, c: (t.age + t.cost * ((t.cost - c) ** 2 * -1e9).exp(), "sum", "age"),
    ],
    ids=["mean-of-a-where", "column-plus-its-mask", "underflowing-arithmetic"],
)
def test_any_expression_that_agrees_with_a_column_on_all_rows_but_one_is_withheld_beside_it(
    hospital: Any, recovered: Recovered, crafted: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = hospital.open()
    secret = float(hospital.target["cost"])
    expression, func, column = crafted(t, _who(t, hospital), secret)
    query = t.assign(x=expression).agg(crafted=("x", func), plain=(column, func))
    with pytest.raises(cn.PolicyViolation) as caught:
        query.release()
    assert str(secret) not in str(caught.value)
    # The twin of the attack: without the rule the difference is the cost.
    from kernel_enclave.vault import release

    monkeypatch.setattr(release, "_combined", lambda *args, **kwargs: {})
    given = query.release()
    difference = float(given["crafted"] - given["plain"]) * (len(hospital.frame) if func == "mean" else 1)
    target = hospital.target
    expected = {"length_of_stay": secret - target["length_of_stay"], "cost": secret, "age": secret}[column]
    assert abs(difference - expected) < 1e-3


def test_the_same_attack_after_a_join_and_over_a_scanned_dataset(
    hospital: Any, recovered: Recovered, routed: Any
) -> None:
    """The other release routes: a join (a record's rows added up per record) and a dataset scanned from disk."""
    t = routed
    secret = float(hospital.target["cost"])
    with pytest.raises(cn.PolicyViolation) as caught:
        _three_sums(t, _who(t, hospital)).release()
    assert caught.value.rule == "release.difference"
    crafted = t.assign(masked_cost=cn.where(_who(t, hospital), t["cost"], t["age"]))
    released = crafted.group_by("sex").agg(masked_cost=("masked_cost", "sum"), ages=("age", "sum")).release()
    assert released["masked_cost"].isna().all() and released["ages"].isna().all()
    for number in _numbers(released):
        assert not recovered(number, secret)
    # The twin: the same numbers over a column that differs on half the rows, equal to pandas.
    frame = hospital.frame
    older = t.assign(older_cost=cn.where(t["age"] > 50, t["cost"], t["age"]))
    twin = older.group_by("sex").agg(older_cost=("older_cost", "sum"), ages=("age", "sum")).release()
    expected = frame.cost.where(frame.age > 50, frame.age).groupby(frame.sex).sum()
    np.testing.assert_allclose(twin["older_cost"].to_numpy(), expected.to_numpy())
    np.testing.assert_array_equal(twin["ages"].to_numpy(), frame.groupby("sex")["age"].sum().to_numpy())


def test_derived_columns_that_differ_on_many_rows_are_released_with_pandas_values(hospital: Any) -> None:
    t = hospital.open()
    frame = hospital.frame
    derived = t.assign(per_day=t.cost / t.length_of_stay, older_cost=cn.where(t.age > 50, t.cost, t.age))
    released = (
        derived.group_by("diagnosis")
        .agg(
            per_day=("per_day", "mean"),
            spread=("per_day", "std"),
            older_cost=("older_cost", "sum"),
            ages=("age", "sum"),
            patients=("age", "count"),
        )
        .release()
    )
    assert released.attrs["confnb_suppressed"] == {"groups": 0, "cells": {}}
    plain = frame.assign(
        per_day=frame.cost / frame.length_of_stay, older_cost=frame.cost.where(frame.age > 50, frame.age)
    ).groupby("diagnosis")
    np.testing.assert_allclose(released["per_day"].to_numpy(), plain["per_day"].mean().to_numpy())
    np.testing.assert_allclose(released["spread"].to_numpy(), plain["per_day"].std().to_numpy())
    np.testing.assert_allclose(released["older_cost"].to_numpy(), plain["older_cost"].sum().to_numpy())
    np.testing.assert_array_equal(released["ages"].to_numpy(), plain["age"].sum().to_numpy())
    whole = derived.agg(per_day=("per_day", "mean"), ages=("age", "sum"), patients=("age", "count")).release()
    assert whole["per_day"] == pytest.approx((frame.cost / frame.length_of_stay).mean())
    assert whole["ages"] == frame.age.sum() and whole["patients"] == len(frame)


# -- a model whose target agrees with its features on all records but one ---------------------------------------


def _crafted_fit(hospital: Any) -> Any:
    from sklearn.linear_model import LinearRegression  # type: ignore[import-untyped]

    t = hospital.open()
    crafted = t.assign(y=cn.where(_who(t, hospital), t["cost"], t["age"]))
    return cn.fit(LinearRegression(), crafted, target="y", features=["age"])


def _cost_from_the_fit(hospital: Any, params: dict[str, Any]) -> float:
    """The analyst's algebra: the fit moved from (intercept 0, slope 1) by (XᵀX)⁻¹ x_t (cost - age); XᵀX is the
    row count and the sums of ages and their squares, which aggregates release."""
    frame, target = hospital.frame, hospital.target
    ages = frame.age.to_numpy(dtype=np.float64)
    gram = np.array([[len(ages), ages.sum()], [ages.sum(), (ages**2).sum()]])
    moved = np.array([params["intercept_"], params["coef_"]["age"] - 1.0])
    direction = np.linalg.solve(gram, np.array([1.0, float(target.age)]))
    return float(moved[1] / direction[1] + target.age)


def test_a_model_whose_target_agrees_with_a_feature_on_all_records_but_one_releases_nothing(
    hospital: Any, recovered: Recovered
) -> None:
    model = _crafted_fit(hospital)
    secret = float(hospital.target["cost"])
    for release in (model.params, model.metrics, model.score):
        with pytest.raises(cn.PolicyViolation) as caught:
            release()
        assert caught.value.rule == "release.difference" and str(secret) not in str(caught.value)
    with pytest.raises(cn.PolicyViolation):
        model.predict(pd.DataFrame({"age": [int(hospital.target["age"])]}))


def test_without_the_rule_the_fit_gives_the_cost(
    hospital: Any, recovered: Recovered, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kernel_enclave.vault import models

    monkeypatch.setattr(models, "_target_isolated", lambda *args, **kwargs: False)
    params = _crafted_fit(hospital).params()
    assert recovered(round(_cost_from_the_fit(hospital, params), 2), float(hospital.target["cost"]))


def test_a_regression_on_plain_columns_is_released_equal_to_scikit_learn(hospital: Any) -> None:
    from sklearn.linear_model import LinearRegression  # type: ignore[import-untyped]

    frame = hospital.frame
    t = hospital.open()
    derived = t.assign(per_day=t["cost"] / t["length_of_stay"])
    model = cn.fit(LinearRegression(), derived, target="per_day", features=["age", "length_of_stay"])
    x = frame[["age", "length_of_stay"]].to_numpy(np.float64)
    expected = LinearRegression().fit(x, frame.cost / frame.length_of_stay)
    released = model.params()
    assert released["coef_"]["age"] == pytest.approx(expected.coef_[0], rel=1e-6)
    assert released["intercept_"] == pytest.approx(expected.intercept_, rel=1e-6)
    assert model.metrics()["n_train"] == len(frame)
