"""Window functions: a group statistic on every row carries other records' values onto each row.

``t.cost.transform("sum").over("one")`` puts everyone's total cost on every row, and the same over everyone but the
target puts the others' total there: their difference is the target's cost, held alike by every row, so a mean of it
passes every rule on the released number (thousands of contributing records, all holding one value) and is the
target's cost. A filter on such a difference keeps a whole group or none of it, so a grouped count says one bit of
the target's value per group: the whole value from one release. Exact mode therefore lets windows near a dataset
only where its owner allows them (``window`` in ``[release] allow``), and says what that gives up. Each attack below
checks the numbers that came back against the target's cost; the twins are released and equal pandas.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pytest

import confnb as cn

from .conftest import ADMISSIONS_POLICY, Hospital, HospitalOwner, kernel, serve_admissions
from .test_exact_masking import Recovered, _numbers

BITS = 24  # the target's cost in cents fits in 24 bits
WINDOWING_POLICY = ADMISSIONS_POLICY.replace('"predict_public"]', '"predict_public", "window"]')


def _difference_of_sums(t: Any, who: Any) -> Any:
    """Everyone's total cost less everyone else's, on every row: the target's cost."""
    everyone = t.cost.transform("sum").over("one")
    others = cn.where(~who, t.cost, None).transform("sum").over("one")
    return t.assign(d=everyone - others)


def _isolating(t: Any, hospital: Hospital) -> tuple[Any, Any]:
    """The target picked out by what the analyst knows of them, and a column of one value to window over."""
    target = hospital.target
    frame = hospital.frame
    assert ((frame.length_of_stay == target["length_of_stay"]) & (frame.age == target["age"])).sum() == 1
    who = (t.length_of_stay == float(target["length_of_stay"])) & (t.age == int(target["age"]))
    return who, t.assign(one=t.age * 0)


def _bit_per_age(t: Any, who: Any) -> Any:
    """The rows whose age's bit of the target's cost (in cents) is set: bit i decides whether the rows of age
    18 + i pass, since the difference of the two group sums holds the target's cost on every row."""
    crafted = _difference_of_sums(t, who)
    cents = (crafted.d * 100).round().astype("int64")
    return crafted[(cents // 2 ** (crafted.age - 18)) % 2 == 1]


def _cost_from_bits(counts: pd.DataFrame) -> float:
    """Read the cost back from which age groups a bit-per-group count released."""
    cents = 0
    for age, n in counts["n"].items():
        if 18 <= int(age) < 18 + BITS and not pd.isna(n):
            cents |= 1 << (int(age) - 18)
    return cents / 100


def test_a_difference_of_two_group_sums_on_every_row_is_refused(hospital: Hospital, recovered: Recovered) -> None:
    t = hospital.open()
    secret = float(hospital.target["cost"])
    who, t = _isolating(t, hospital)
    crafted = _difference_of_sums(t, who)
    passing = _bit_per_age(t, who)
    attempts = {
        "mean": lambda: crafted["d"].mean().release(),
        "grouped mean": lambda: crafted.group_by("sex").agg(m=("d", "mean")).release(),
        "describe": lambda: crafted.describe(["d"]).release(),
        "bit per age group": lambda: passing.group_by("age").agg(n=("age", "count")).release(),
        "count": lambda: passing.count().release(),
        "preview": passing.preview,
    }
    for name, attempt in attempts.items():
        refused: cn.PolicyViolation | None = None
        came_back: Any = None
        try:
            came_back = attempt()
        except cn.PolicyViolation as caught:
            refused = caught
        numbers = [] if came_back is None or isinstance(came_back, dict) else _numbers(came_back)
        assert not any(recovered(number, secret) for number in numbers), name
        assert refused is not None, f"{name}: a plan computing a window was answered though no window is allowed"
        assert "release.allow" in str(refused) and "window functions" in str(refused), name
        assert str(secret) not in str(refused) and str(int(secret)) not in str(refused), name
    from sklearn.linear_model import LinearRegression

    with pytest.raises(cn.PolicyViolation, match=r"release\.allow"):
        cn.fit(LinearRegression(), crafted, target="d", features=["age"])


@contextlib.contextmanager
def _windowing_owner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HospitalOwner]:
    assert '"window"' in WINDOWING_POLICY
    with serve_admissions(tmp_path_factory.mktemp("windowing"), WINDOWING_POLICY) as owner:
        yield owner


def test_without_windows_the_same_questions_are_answered_and_an_owner_can_allow_them(
    hospital: Hospital,
    recovered: Recovered,
    tmp_path_factory: pytest.TempPathFactory,
    simulated_backend: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The twins: under the hospital's policy, the group statistics themselves are released by ``group_by`` (no
    window needed); an owner who allows windows gets the everyday window query (rank within a group, then a filter
    on the rank), and ``policy explain`` says what allowing them gives up."""
    frame = hospital.frame
    t = hospital.open()
    by_sex = t.group_by("sex").agg(total=("cost", "sum"), v=("cost", "mean")).release()
    pd.testing.assert_series_equal(by_sex["total"], frame.groupby("sex")["cost"].sum(), check_names=False)
    pd.testing.assert_series_equal(by_sex["v"], frame.groupby("sex")["cost"].mean(), check_names=False)
    with pytest.raises(cn.PolicyViolation, match=r"release\.allow"):  # the window query itself needs the owner
        t.assign(r=t.cost.rank().over("sex"))["cost"].mean().release()

    from confnb.policy.explain import explain_output
    from confnb.policy.output import OutputPolicy

    with _windowing_owner(tmp_path_factory) as owner:
        policy = OutputPolicy.from_toml(WINDOWING_POLICY)
        assert any("Window functions are allowed" in line for line in explain_output(policy))
        assert not any("Window functions" in line for line in explain_output(OutputPolicy.from_toml(ADMISSIONS_POLICY)))
        with kernel(owner, simulated_backend, monkeypatch) as allowed:
            w = allowed.open()
            # What allowing windows gives up, as the explanation says: the attacks above, answered, give the cost.
            secret = float(allowed.target["cost"])
            who, windowed = _isolating(w, allowed)
            assert recovered(float(_difference_of_sums(windowed, who)["d"].mean().release()), secret)
            bits = _bit_per_age(windowed, who).group_by("age").agg(n=("age", "count")).release()
            assert recovered(_cost_from_bits(bits), secret)
            ranked = w.assign(r=w.cost.rank().over("sex"))
            released = ranked[ranked.r > 100].group_by("sex").agg(v=("cost", "mean"), n=("cost", "count")).release()
            plain = allowed.frame.assign(r=allowed.frame.groupby("sex")["cost"].rank())
            expected = plain[plain.r > 100].groupby("sex")["cost"]
            pd.testing.assert_series_equal(released["v"], expected.mean(), check_names=False)
            assert released["n"].tolist() == expected.count().tolist()
            assert np.isfinite(released["v"]).all()
