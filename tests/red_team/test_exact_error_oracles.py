"""Red team: errors as an oracle. A request that fails only when one record's value lies in some range tells that
value's bin, one request per threshold; so does a request that fails for one bin and is refused for the other.

The attacks follow the issue: a column that is NaN only where a predicate on the target's row holds, cast to int
and aggregated. Before evaluation was total, that cast failed and named the column exactly when the target's
length of stay exceeded the threshold. Now the cast is ``TRY_CAST`` (NaN becomes null), so each attack must give
the same outcome, the same released numbers or the same refusal with the same text, whatever the target's value.
The bin an attacker would read off the outcomes is checked against the secret. Legitimate casts are still
released with the right values.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd  # type: ignore[import-untyped]  # no stubs installed
import pytest

import confnb as cn

THRESHOLDS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)  # length-of-stay bins (days) an attacker would probe
DIAGNOSES_PROBED = ("asthma", "copd", "diabetes", "fracture", "pneumonia", "sepsis")


def attempt(release: Callable[[], Any]) -> tuple[Any, ...]:
    """What the analyst sees of one request: the released value, or the kind of failure and its whole text."""
    try:
        value = release()
    except cn.PolicyViolation as exc:
        return ("refused", exc.rule, str(exc))
    except cn.VaultError as exc:
        return ("error", str(exc))
    if isinstance(value, pd.Series):
        return ("released", tuple(sorted(value.to_dict().items())))
    return ("released", value)


def recovered_bin(outcomes: dict[float, tuple[Any, ...]]) -> tuple[float, float] | None:
    """The attacker's reading: the value lies between the last threshold with one outcome and the first with
    another (outcomes change where the predicate "value > threshold" stops holding)."""
    for low, high in itertools.pairwise(sorted(outcomes)):
        if outcomes[low] != outcomes[high]:
            return (low, high)
    return None


def secret_bin(value: float) -> tuple[float, float]:
    position = int(np.searchsorted(THRESHOLDS, value))
    return (THRESHOLDS[position - 1], THRESHOLDS[position])


def nan_where(table: Any, condition: Any) -> Any:
    """A float column that is NaN exactly where ``condition`` holds (0/0 computed in the vault; a plan's literals
    must be finite) and 0.0 elsewhere."""
    zero = table.age - table.age
    return cn.where(condition, zero / zero, 0.0)


@pytest.fixture
def stay(hospital: Any) -> float:
    """The target's length of stay, the secret; the probed thresholds straddle it."""
    value = float(hospital.target.length_of_stay)
    assert THRESHOLDS[0] < value < THRESHOLDS[-1]
    return value


def test_a_cast_that_would_fail_only_for_the_target_gives_the_same_release_for_every_threshold(
    hospital: Any, stay: float
) -> None:
    """The cast is evaluated (a filter reads it) and a clean aggregate is released: the same numbers every time."""
    t = hospital.open()
    outcomes = {}
    for threshold in THRESHOLDS:
        who = (t.patient_id == hospital.target_id) & (t.length_of_stay > threshold)
        marked = t.assign(x=nan_where(t, who))
        cast = marked.assign(xi=marked.x.astype(int))
        kept = cast.filter(cast.xi.isnull() | cast.xi.notnull())  # every row, once the cast has run
        outcomes[threshold] = attempt(kept.agg(n=("age", "count"), cost=("cost", "mean")).release)
    assert len(set(outcomes.values())) == 1, outcomes
    assert recovered_bin(outcomes) is None
    assert recovered_bin(outcomes) != secret_bin(stay)
    kind, released = outcomes[THRESHOLDS[0]]
    assert kind == "released"
    assert dict(released)["n"] == len(hospital.frame)
    assert dict(released)["cost"] == pytest.approx(hospital.frame.cost.mean())


@pytest.mark.parametrize("singled_out_by", ["patient_id", "quasi-identifiers"])
def test_the_cast_column_aggregated_gives_one_outcome_whatever_the_target_value(
    hospital: Any, stay: float, singled_out_by: str
) -> None:
    """The issue's attack as written: the NaN-marked column cast to int and summed over the whole table. The
    target is singled out by its id, or (keeping the id out of the released column's lineage) by the age, sex and
    diagnosis an attacker may know of them."""
    t = hospital.open()
    target = hospital.target
    if singled_out_by == "patient_id":
        singled_out = t.patient_id == hospital.target_id
    else:
        singled_out = (t.age == int(target.age)) & (t.sex == target.sex) & (t.diagnosis == target.diagnosis)
    outcomes = {}
    for threshold in THRESHOLDS:
        marked = t.assign(x=nan_where(t, singled_out & (t.length_of_stay > threshold)))
        cast = marked.assign(xi=marked.x.astype(int))
        outcomes[threshold] = attempt(cast.agg(s=("xi", "sum")).release)
    assert len(set(outcomes.values())) == 1, outcomes
    assert recovered_bin(outcomes) is None
    assert recovered_bin(outcomes) != secret_bin(stay)
    assert all(outcome[0] != "error" for outcome in outcomes.values())
    assert f"{stay}" not in str(outcomes)


def test_error_versus_refusal_tells_nothing(hospital: Any, stay: float) -> None:
    """The target alone is below min_group_size, so every variant is refused; a failing cast must not turn the
    refusal into an error for some thresholds (an error before the policy check answered the predicate)."""
    t = hospital.open()
    alone = t.filter(t.patient_id == hospital.target_id)
    outcomes = {}
    for threshold in THRESHOLDS:
        marked = alone.assign(x=nan_where(alone, alone.length_of_stay > threshold))
        cast = marked.assign(xi=marked.x.astype(int))
        outcomes[threshold] = attempt(cast.agg(s=("xi", "sum"), n=("xi", "count")).release)
    assert len(set(outcomes.values())) == 1, outcomes
    assert recovered_bin(outcomes) is None
    assert recovered_bin(outcomes) != secret_bin(stay)
    kind, rule, message = outcomes[THRESHOLDS[0]]
    assert (kind, rule) == ("refused", "release.min_group_size")
    assert f"{stay}" not in message


def test_a_refused_cast_names_only_what_the_analyst_wrote(hospital: Any) -> None:
    """A cast the types do not allow is refused before any row is read, with one text for every threshold."""
    t = hospital.open()
    outcomes = {}
    for threshold in THRESHOLDS:
        labelled = t.assign(label=cn.where(t.length_of_stay > threshold, "long", "short"))
        flagged = labelled.assign(flag=labelled.label.astype(bool))
        outcomes[threshold] = attempt(flagged.agg(n=("flag", "count")).release)
    assert len(set(outcomes.values())) == 1, outcomes
    assert outcomes[THRESHOLDS[0]] == ("error", "cast to bool is not supported for column 'label' (string)")


def test_a_legitimate_cast_is_released_with_the_right_value(hospital: Any) -> None:
    t = hospital.open()
    days = t.assign(days=t.length_of_stay.astype(int), cost_int=t.cost.astype("int64"))
    released = days.agg(mean_days=("days", "mean"), n=("days", "count"), total=("cost_int", "sum")).release()
    frame = hospital.frame
    assert released["n"] == len(frame)
    assert released["mean_days"] == pytest.approx(frame.length_of_stay.astype(int).mean())
    assert released["total"] == frame.cost.astype(int).sum()
    by_sex = days.group_by("sex").agg(mean_days=("days", "mean")).release()
    expected = frame.assign(days=frame.length_of_stay.astype(int)).groupby("sex")["days"].mean()
    pd.testing.assert_series_equal(by_sex["mean_days"], expected.rename("mean_days"), check_names=False)


def test_the_join_size_limit_answers_nothing_about_the_rows_a_request_reaches(
    hospital: Any, stay: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A limit on a join's pairs, counted on the rows a request reaches, is an oracle: with the limit just above the
    pairs the other sex makes, the target's row (kept only when its stay exceeds the threshold) tips the count over
    it. The limit is decided from the datasets' sizes and load-time facts, so every threshold gets one answer."""
    from kernel_enclave.vault import plan

    frame, target = hospital.frame, hospital.target
    other = "M" if target.sex == "F" else "F"
    n_other, n_same = int((frame.sex == other).sum()), int((frame.sex == target.sex).sum())
    limit = n_other**2 + len(frame) + n_other + n_same // 2  # old count: over it exactly when the target is kept
    monkeypatch.setattr(plan, "MAX_JOIN_ROWS", limit)
    t = hospital.open()
    outcomes = {}
    for threshold in THRESHOLDS:
        kept = t.filter((t.sex == other) | ((t.patient_id == hospital.target_id) & (t.length_of_stay > threshold)))
        outcomes[threshold] = attempt(t.join(kept.select(["sex"]), on="sex").agg(n=("age", "count")).release)
    assert len(set(outcomes.values())) == 1, outcomes
    assert recovered_bin(outcomes) is None
    assert recovered_bin(outcomes) != secret_bin(stay)
    assert (
        outcomes[THRESHOLDS[0]][0] == "error" and "join: the result could have more than" in outcomes[THRESHOLDS[0]][1]
    )
    # The legitimate twin: a join on the id, unique in the dataset as loaded, is bounded by one side and released.
    own = t.join(t.select(["patient_id", "cost"]).rename({"cost": "cost_again"}), on="patient_id")
    released = own.agg(n=("age", "count"), total=("cost_again", "sum")).release()
    assert released["n"] == len(frame)
    assert released["total"] == pytest.approx(frame.cost.sum())


def test_how_a_string_column_is_held_is_no_oracle(hospital: Any) -> None:
    """The vault holds a string column that repeats its values as codes (``diagnosis`` and ``sex`` here); the same
    values computed (``fillna`` of them) are plain strings in the vault. Every request must come out the same over
    both: the same numbers, the same refusal rule, an error for the same requests. Otherwise an outcome would tell
    whether a column has few distinct values, and the comparisons made on codes would be a second engine whose
    answers nobody checked. The legitimate twin: the counts and means equal pandas'."""
    t = hospital.open()
    frame = hospital.frame
    plain = t.assign(d=t.diagnosis.fillna("none"), s=t.sex.fillna("none"))
    many = [*DIAGNOSES_PROBED, *(f"other-{i}" for i in range(20))]  # past the codes' comparisons: read as strings

    def requests(table: Any, diagnosis: str, sex: str) -> list[Callable[[], Any]]:
        column = table[diagnosis]
        return [
            lambda: table.value_counts(diagnosis).release(),
            lambda: table.group_by([diagnosis, sex]).agg(n=("cost", "count"), m=("cost", "mean")).release(),
            lambda: table[column == "copd"]["cost"].mean().release(),
            lambda: table[column != "copd"]["length_of_stay"].sum().release(),
            lambda: table[column.isin(["asthma", "sepsis"])]["age"].mean().release(),
            lambda: table[column.isin(many)]["age"].count().release(),
            lambda: table[column == "nowhere"]["cost"].mean().release(),  # no record: refused
            lambda: table[column.str.startswith("s")]["cost"].sum().release(),
            lambda: table[table[sex] == "F"].group_by(diagnosis).agg(m=("cost", "median")).release(),
            lambda: table[column < "d"]["cost"].count().release(),
        ]

    def shape(outcome: tuple[Any, ...]) -> tuple[Any, ...]:
        if outcome[0] != "released":
            return outcome[:2]  # an error's or refusal's text names the column as written: the rule must agree
        value = outcome[1]
        if isinstance(value, pd.DataFrame):
            return ("released", value.reset_index(drop=True).round(9).to_dict("list"))
        if isinstance(value, tuple):
            return ("released", tuple((k, round(float(v), 9)) for k, v in value))
        return ("released", round(float(value), 9))

    coded = [shape(attempt(request)) for request in requests(t, "diagnosis", "sex")]
    computed = [shape(attempt(request)) for request in requests(plain, "d", "s")]
    assert coded == computed
    assert sum(outcome[0] == "released" for outcome in coded) >= 8
    assert ("refused", "release.min_group_size") in coded
    counts = t.value_counts("diagnosis").release()
    assert counts.to_dict() == frame["diagnosis"].value_counts().to_dict()
    means = t[t.diagnosis == "copd"]["cost"].mean().release()
    assert means == pytest.approx(frame.loc[frame.diagnosis == "copd", "cost"].mean(), rel=1e-12)
