"""Two releases whose numbers agree on every record but the target's: their difference is the target's value.

``sum(t.age)`` in one request and ``sum(cn.where(who, t.cost, t.age))`` in the next rest on the same 4,000
admissions: the difference checks, which compare record sets, pass both, and each release alone has nothing to
combine. Yet the second less the first is the target's cost less their age, and a third request,
``sum(cn.where(who, 2 * t.age, t.age))``, gives the age. The vault compares a release with each earlier one where
either reads a computed column (see ``kernel_enclave.vault.earlier_values``) and refuses the later one. Each attack
checks the numbers that came back against the secret and shows that, with the rule removed, the same requests give
it; the twins (derived columns that are exact functions of the earlier numbers' columns, or differ from them on
many rows) are released and equal pandas.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd
import pytest

import confnb as cn

from .test_exact_masking import Recovered, _numbers


@pytest.fixture
def without_the_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """The vault (in this process) with the rule across releases removed, to show that it is what protects."""
    from kernel_enclave.vault import earlier_values

    monkeypatch.setattr(earlier_values, "isolating_across", lambda *args, **kwargs: False)


def _who(t: Any, hospital: Any) -> Any:
    return t["cost"] == float(hospital.target["cost"])  # one attribute the analyst knows of the target picks it out


def _masked(t: Any, who: Any, name: str, value: Any) -> Any:
    """One number: the sum of a column that is ``value`` on the target's row and the age everywhere else."""
    return t.assign(**{name: cn.where(who, value, t["age"])}).agg(**{name: (name, "sum")})


def _three_releases(t: Any, who: Any) -> list[Any]:
    """The attack, one number per request: the ages, then the two masked sums (each alone over every record)."""
    return [
        t.agg(ages=("age", "sum")).release(),
        _masked(t, who, "masked_cost", t["cost"]).release(),
        _masked(t, who, "masked_age", 2 * t["age"]),
    ]


def test_a_number_agreeing_with_an_earlier_release_on_all_records_but_one_is_refused(
    hospital: Any, recovered: Recovered
) -> None:
    t = hospital.open()
    secret = float(hospital.target["cost"])
    who = _who(t, hospital)
    ages = t.agg(ages=("age", "sum")).release()
    assert int(ages["ages"]) == int(hospital.frame.age.sum())
    for name, value in (("masked_cost", t["cost"]), ("masked_age", 2 * t["age"])):
        with pytest.raises(cn.PolicyViolation) as caught:
            _masked(t, who, name, value).release()
        assert caught.value.rule == "release.difference"
        assert re.search(r"with an earlier release \(result r\w+\)", str(caught.value))
        assert str(secret) not in str(caught.value)
    for number in _numbers(ages):
        assert not recovered(number, secret)
    # The twins, in the same kernel after the same first release: a column that is an exact function of the age
    # everywhere (no record stands out), and one that differs from it on thousands of rows; equal to pandas.
    frame = hospital.frame
    linear = t.assign(x=2 * t["age"] + 1).agg(x=("x", "sum"), n=("x", "count")).release()
    assert int(linear["x"]) == int((2 * frame.age + 1).sum()) and int(linear["n"]) == len(frame)
    older = t.assign(y=cn.where(t["age"] > 50, t["cost"], t["age"])).agg(y=("y", "sum")).release()
    np.testing.assert_allclose(float(older["y"]), float(frame.cost.where(frame.age > 50, frame.age).sum()))


def test_without_the_rule_the_three_releases_give_the_cost(
    hospital: Any, recovered: Recovered, without_the_rule: None
) -> None:
    """The attack is real: what the rule refuses above gives the target's cost, to the cent."""
    t = hospital.open()
    ages, masked_cost, masked_age = _three_releases(t, _who(t, hospital))
    masked_age = masked_age.release()
    cost = float(masked_cost["masked_cost"] - ages["ages"] + (masked_age["masked_age"] - ages["ages"]))
    assert recovered(cost, float(hospital.target["cost"]))


def test_the_order_of_the_releases_does_not_matter(hospital: Any, recovered: Recovered) -> None:
    """The crafted number first (alone, it is released: nothing to combine it with yet), then the plain one: the
    plain release is the later one, and it is refused."""
    t = hospital.open()
    secret = float(hospital.target["cost"])
    masked_cost = _masked(t, _who(t, hospital), "masked_cost", t["cost"]).release()
    with pytest.raises(cn.PolicyViolation) as caught:
        t.agg(ages=("age", "sum")).release()
    assert caught.value.rule == "release.difference"
    for number in _numbers(masked_cost):
        assert not recovered(number, secret)
    # Counts and other columns' sums are still released beside it (they combine with it on no few records).
    frame = hospital.frame
    released = t.agg(stays=("length_of_stay", "sum"), patients=("age", "count")).release()
    assert int(released["stays"]) == int(frame.length_of_stay.sum()) and int(released["patients"]) == len(frame)


@pytest.mark.parametrize("grouping", ["earlier by sex", "later by sex", "both by sex", "by sex, then by diagnosis"])
def test_groups_on_either_side_do_not_hide_the_difference(hospital: Any, recovered: Recovered, grouping: str) -> None:
    """The groups of a release add up (``sum`` by sex less ``sum`` over everyone), and each group's number may
    take its own coefficient: the rule searches each part of the records that the two releases' groups link."""
    t = hospital.open()
    secret = float(hospital.target["cost"])
    masked = t.assign(masked_cost=cn.where(_who(t, hospital), t["cost"], t["age"]))
    earlier_by = {"earlier by sex": "sex", "both by sex": "sex", "by sex, then by diagnosis": "sex"}.get(grouping)
    later_by = {"later by sex": "sex", "both by sex": "sex", "by sex, then by diagnosis": "diagnosis"}.get(grouping)
    first = (t.group_by(earlier_by) if earlier_by else t).agg(ages=("age", "sum")).release()
    with pytest.raises(cn.PolicyViolation) as caught:
        (masked.group_by(later_by) if later_by else masked).agg(masked_cost=("masked_cost", "sum")).release()
    assert caught.value.rule == "release.difference"
    for number in _numbers(first):
        assert not recovered(number, secret)


def test_records_set_apart_by_zeros_and_nulls_do_not_hide_the_difference(
    hospital: Any, recovered: Recovered, without_the_rule: None
) -> None:
    """The record sets made to differ by more than k - 1 records (zeros on some rows in one release, nulls on the
    same rows in the other): the difference checks pass, the values still differ on the target's row alone. With
    the rule removed the two give the cost less the age; with it (below), the second is refused."""
    frame = hospital.frame
    some = (frame.age < 21) & (frame.sex == "F")
    assert 20 <= some.sum() < 200 and not some[frame.patient_id == hospital.target_id].any()
    t = hospital.open()
    chosen = (t["age"] < 21) & (t["sex"] == "F")
    zeroed = t.assign(u=cn.where(chosen, t["age"] * 0, t["age"])).agg(u=("u", "sum")).release()
    nulled = cn.where(chosen, None, t["age"])
    crafted = t.assign(v=cn.where(_who(t, hospital), t["cost"], nulled)).agg(v=("v", "sum")).release()
    target = hospital.target
    assert recovered(float(crafted["v"] - zeroed["u"]) + float(target["age"]), float(target["cost"]))


def test_with_the_rule_records_set_apart_by_zeros_and_nulls_are_refused(hospital: Any, recovered: Recovered) -> None:
    t = hospital.open()
    secret = float(hospital.target["cost"])
    chosen = (t["age"] < 21) & (t["sex"] == "F")
    zeroed = t.assign(u=cn.where(chosen, t["age"] * 0, t["age"])).agg(u=("u", "sum")).release()
    nulled = cn.where(chosen, None, t["age"])
    with pytest.raises(cn.PolicyViolation) as caught:
        t.assign(v=cn.where(_who(t, hospital), t["cost"], nulled)).agg(v=("v", "sum")).release()
    assert caught.value.rule == "release.difference"
    assert not any(recovered(number, secret) for number in _numbers(zeroed))


def test_the_same_attack_after_a_join_and_over_a_scanned_dataset(
    hospital: Any, recovered: Recovered, routed: Any
) -> None:
    """The other release routes: a join (a record's rows added up per record) and a dataset scanned from disk."""
    t = routed
    secret = float(hospital.target["cost"])
    ages = t.group_by("sex").agg(ages=("age", "sum")).release()
    with pytest.raises(cn.PolicyViolation) as caught:
        _masked(t, _who(t, hospital), "masked_cost", t["cost"]).release()
    assert caught.value.rule == "release.difference"
    assert not any(recovered(number, secret) for number in _numbers(ages))
    # The twin: a column that differs from the age on half the rows, equal to pandas.
    frame = hospital.frame
    older = t.assign(y=cn.where(t["age"] > 50, t["cost"], t["age"])).group_by("sex").agg(y=("y", "sum")).release()
    expected = frame.cost.where(frame.age > 50, frame.age).groupby(frame.sex).sum()
    pd.testing.assert_series_equal(older["y"], expected, check_names=False, check_dtype=False)


# -- a regression fitted to such an expression, beside sums released on their own ----------------------------------


def _crafted_fit(t: Any, hospital: Any) -> Any:
    """A target that is the age on every row but the target's, fitted on the length of stay (no feature it agrees
    with, so the fit alone passes): its intercept and slope give the target's sum."""
    from sklearn.linear_model import LinearRegression  # type: ignore[import-untyped]

    crafted = t.assign(y=cn.where(_who(t, hospital), t["cost"], t["age"]))
    return cn.fit(LinearRegression(), crafted, target="y", features=["length_of_stay"])


def test_a_regression_whose_target_agrees_with_an_earlier_sum_but_on_one_record_is_refused(
    hospital: Any, recovered: Recovered
) -> None:
    t = hospital.open()
    secret = float(hospital.target["cost"])
    ages = t.agg(ages=("age", "sum"), n=("age", "count"), stays=("length_of_stay", "sum")).release()
    with pytest.raises(cn.PolicyViolation) as caught:
        _crafted_fit(t, hospital)
    assert caught.value.rule == "release.difference" and str(secret) not in str(caught.value)
    assert re.search(r"with an earlier release \(result r\w+\)", str(caught.value))
    assert not any(recovered(number, secret) for number in _numbers(ages))
    # The twin: a regression on a derived target that differs from the age everywhere, equal to scikit-learn.
    from sklearn.linear_model import LinearRegression  # type: ignore[import-untyped]

    frame = hospital.frame
    derived = t.assign(per_day=t["cost"] / t["length_of_stay"])
    model = cn.fit(LinearRegression(), derived, target="per_day", features=["length_of_stay"])
    expected = LinearRegression().fit(frame[["length_of_stay"]].to_numpy(np.float64), frame.cost / frame.length_of_stay)
    assert model.params()["intercept_"] == pytest.approx(expected.intercept_, rel=1e-6)


def test_a_sum_after_such_a_regression_is_refused(hospital: Any, recovered: Recovered) -> None:
    """The fit first (nothing to combine it with yet: its parameters are released), then the sums: refused."""
    t = hospital.open()
    secret = float(hospital.target["cost"])
    params = _crafted_fit(t, hospital).params()
    with pytest.raises(cn.PolicyViolation) as caught:
        t.agg(ages=("age", "sum")).release()
    assert caught.value.rule == "release.difference"
    assert re.search(r"with an earlier release \(model m\w+\)", str(caught.value))
    assert not recovered(float(params["intercept_"]), secret)
    frame = hospital.frame
    stays = t.agg(stays=("length_of_stay", "sum")).release()  # a column the target does not agree with: released
    assert int(stays["stays"]) == int(frame.length_of_stay.sum())


def test_without_the_rule_the_regression_and_the_sums_give_the_cost(
    hospital: Any, recovered: Recovered, without_the_rule: None
) -> None:
    t = hospital.open()
    released = t.agg(ages=("age", "sum"), n=("age", "count"), stays=("length_of_stay", "sum")).release()
    params = _crafted_fit(t, hospital).params()
    n, stays = float(released["n"]), float(released["stays"])
    target_sum = n * float(params["intercept_"]) + float(params["coef_"]["length_of_stay"]) * stays
    cost = target_sum - float(released["ages"]) + float(hospital.target["age"])
    assert recovered(round(cost, 2), float(hospital.target["cost"]))
