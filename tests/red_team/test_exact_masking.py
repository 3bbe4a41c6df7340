"""Masking instead of filtering: a column non-null (or not constant) in one record's row only.

``where(who, x, None)`` keeps every row, so a group-size check over rows would pass; the vault counts the records
that contribute a value to each number. Each attack checks the numbers that came back against the target's secret
value and membership; each has a legitimate twin whose value is checked against pandas on the plaintext.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest

import confnb as cn

Recovered = Callable[[float | None, float], bool]


def _numbers(value: Any) -> list[float]:
    """Every number in a released value, to compare with the secret."""
    if isinstance(value, pd.DataFrame | pd.Series):
        return [float(v) for v in np.ravel(value.to_numpy(dtype="float64", na_value=np.nan)) if np.isfinite(v)]
    return [float(value)]


def test_a_masked_column_reveals_neither_the_value_nor_membership(hospital: Any, recovered: Recovered) -> None:
    t = hospital.open()
    secret = float(hospital.target["length_of_stay"])
    who = t.cost == float(hospital.target["cost"])  # one attribute the analyst knows of the target picks it out
    masked = t.assign(x=cn.where(who, t.length_of_stay, None))
    with pytest.raises(cn.PolicyViolation) as caught:  # the attack: count and mean of one record
        masked.agg(n=("x", "count"), v=("x", "mean")).release()
    assert "release.min_group_size" in str(caught.value)
    assert str(secret) not in str(caught.value)
    # Grouped, the group's other numbers stay; the masked ones are null in every group, the target's or not.
    grouped = masked.group_by("sex").agg(rows=("age", "count"), n=("x", "count"), v=("x", "mean")).release()
    assert grouped["n"].isna().all() and grouped["v"].isna().all()
    assert grouped.attrs["confnb_suppressed"] == {"groups": 0, "cells": {"n": ["F", "M"], "v": ["F", "M"]}}
    frame = hospital.frame
    pd.testing.assert_series_equal(grouped["rows"], frame.groupby("sex")["age"].count(), check_names=False)
    for number in _numbers(grouped[["n", "v"]]):
        assert not recovered(number, secret)


def test_a_constant_fill_derived_from_the_data_does_not_count(hospital: Any, recovered: Recovered) -> None:
    """``where(who, x, t.age * 0)``: every row has a value, all but one of them the same constant."""
    t = hospital.open()
    secret = float(hospital.target["length_of_stay"])
    rows = len(hospital.frame)
    masked = t.assign(x=cn.where(t.cost == float(hospital.target["cost"]), t.length_of_stay, t.age * 0))
    for func in ("mean", "sum", "std", "median"):
        with pytest.raises(cn.PolicyViolation):
            getattr(masked["x"], func)().release()
    released = masked.agg(n=("x", "count"), total=("x", "sum"), v=("x", "mean")).release()
    assert released["n"] == rows  # every row has a value: the count says nothing of the target
    assert pd.isna(released["total"]) and pd.isna(released["v"])
    for number in _numbers(released):
        assert not recovered(number, secret) and not recovered(number / rows, secret / rows)


def test_legitimate_masks_are_released_with_pandas_values(hospital: Any) -> None:
    t = hospital.open()
    frame = hospital.frame
    older = t.assign(x=cn.where(t.age > 50, t.length_of_stay, None))
    released = older.agg(n=("x", "count"), v=("x", "mean")).release()
    expected = frame.length_of_stay.where(frame.age > 50)
    assert released["n"] == expected.count()
    assert released["v"] == pytest.approx(expected.mean())
    grouped = older.group_by("diagnosis").agg(v=("x", "mean"), s=("x", "sum")).release()
    by = expected.groupby(frame.diagnosis)
    pd.testing.assert_series_equal(grouped["v"], by.mean(), check_names=False)
    pd.testing.assert_series_equal(grouped["s"], by.sum(), check_names=False)
    assert grouped.attrs["confnb_suppressed"] == {"groups": 0, "cells": {}}
    readmitted = t.group_by("sex").agg(rate=("readmitted", "mean")).release()  # a flag: its most common value
    pd.testing.assert_series_equal(
        readmitted["rate"] if isinstance(readmitted, pd.DataFrame) else readmitted,
        frame.groupby("sex")["readmitted"].mean(),
        check_names=False,
    )


def test_a_masked_column_after_a_join_reveals_neither_the_value_nor_membership(
    hospital: Any, recovered: Recovered
) -> None:
    """The same mask on the join route (each side's records counted through the join): ``count`` and ``mean`` of a
    column non-null in the target's row only are withheld in every group, and refused ungrouped."""
    t = hospital.open()
    secret = float(hospital.target["length_of_stay"])
    joined = t.join(t.select(["patient_id", "cost"]).rename({"cost": "cost_again"}), on="patient_id")
    who = joined["cost_again"] == float(hospital.target["cost"])
    masked = joined.assign(x=cn.where(who, joined["length_of_stay"], None))
    with pytest.raises(cn.PolicyViolation) as caught:
        masked.agg(n=("x", "count"), v=("x", "mean")).release()
    assert "release.min_group_size" in str(caught.value) and str(secret) not in str(caught.value)
    grouped = masked.group_by("sex").agg(rows=("age", "count"), n=("x", "count"), v=("x", "mean")).release()
    assert grouped["n"].isna().all() and grouped["v"].isna().all()
    for number in _numbers(grouped[["n", "v"]]):
        assert not recovered(number, secret)
    # The twin: the unmasked column's count and mean over the same join are released, equal to pandas'.
    frame = hospital.frame
    plain = joined.group_by("sex").agg(
        rows=("age", "count"), n=("length_of_stay", "count"), v=("length_of_stay", "mean")
    )
    released = plain.release()
    expected = frame.groupby("sex")
    pd.testing.assert_series_equal(released["rows"], expected["age"].count(), check_names=False, check_dtype=False)
    pd.testing.assert_series_equal(
        released["n"], expected["length_of_stay"].count(), check_names=False, check_dtype=False
    )
    np.testing.assert_allclose(
        released["v"].to_numpy(), expected["length_of_stay"].mean().loc[released.index].to_numpy()
    )


def test_over_a_scanned_dataset_one_record_among_many_of_one_value_does_not_count(
    hospital: Any, recovered: Recovered, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The target beside every patient of one age: a sum or mean of ages is the target's age plus a known multiple.

    Scanned from disk, the most-common-value rule is screened as the query streams, from the rows holding the ages
    k patients of the dataset share, counted per group in bins of those ages; the bins must never pass a group in
    which all but the target hold one value. The twin (two common ages) is released."""
    monkeypatch.setenv("CONFNB_VAULT_MEMORY_BUDGET", "0")
    t = hospital.open()
    assert all(source.streaming for source in hospital.vault._sources.values())
    frame, target = hospital.frame, hospital.target
    secret = float(target.age)
    ages = frame.age[frame.age != target.age].value_counts()
    common, other = int(ages.index[0]), int(ages.index[1])
    picked = t[(t.age == common) | (t.patient_id == hospital.target_id)]
    rows = int(((frame.age == common) | (frame.patient_id == hospital.target_id)).sum())
    refusals: list[str] = []
    for func in ("sum", "mean", "std"):
        try:
            value = float(getattr(picked["age"], func)().release())
        except cn.PolicyViolation as refused:
            refusals.append(str(refused))
            continue
        total = value if func == "sum" else value * rows  # the target's age: the total less the others'
        assert not recovered(total - common * (rows - 1), secret), func
        pytest.fail(f"the {func} of the target and {rows - 1} patients of one age was released")
    assert len(refusals) == 3 and all("release.min_group_size" in text for text in refusals)
    # Grouped, beside a count per group: refused whole (the difference rule), or the sums and means withheld.
    try:
        grouped = picked.group_by("sex").agg(n=("age", "count"), s=("age", "sum"), v=("age", "mean")).release()
    except cn.PolicyViolation:
        grouped = None
    if grouped is not None:
        assert grouped["s"].isna().all() and grouped["v"].isna().all()
        for sex, row in grouped.iterrows():  # what a sum would give: the target's age as s - common * (n - 1)
            assert not recovered(row["n"], secret)
            assert pd.isna(row["s"]) or not recovered(row["s"] - common * (row["n"] - 1), secret), sex
    twin = t[t.age.isin([common, other])].group_by("sex").agg(v=("age", "mean")).release()
    expected = frame[frame.age.isin([common, other])].groupby("sex")["age"].mean()
    np.testing.assert_allclose(twin["v"].to_numpy(), expected.to_numpy())


def test_over_a_scanned_dataset_one_flag_among_many_of_the_other_does_not_count(
    hospital: Any, recovered: Recovered, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The target beside every patient whose readmission flag is the other one: the sum or mean of the flags is the
    target's flag plus a known multiple. Scanned from disk, a column holding few values that k patients share (two,
    here) is binned by comparing each row with them as the query streams (more are looked up); either way a group in
    which all but the target hold one value never passes. The twin, the readmission rate per sex, is released."""
    from kernel_enclave.vault import release as engine

    monkeypatch.setenv("CONFNB_VAULT_MEMORY_BUDGET", "0")
    binned: list[int] = []
    often_binned = engine._often_binned

    def noted(value: Any, often: Any) -> Any:
        binned.append(often.len())
        return often_binned(value, often)

    monkeypatch.setattr(engine, "_often_binned", noted)  # the vault runs in this process: see how it bins
    t = hospital.open()
    assert all(source.streaming for source in hospital.vault._sources.values())
    frame, target = hospital.frame, hospital.target
    secret = float(bool(target.readmitted))
    others = frame.readmitted != target.readmitted
    picked = t[(t.readmitted != bool(target.readmitted)) | (t.patient_id == hospital.target_id)]
    rows = int(others.sum()) + 1
    other_flag = 1.0 - secret
    refusals: list[str] = []
    for func in ("sum", "mean"):
        try:
            value = float(getattr(picked["readmitted"], func)().release())
        except cn.PolicyViolation as refused:
            refusals.append(str(refused))
            continue
        total = value if func == "sum" else value * rows
        assert not recovered(total - other_flag * (rows - 1), secret), func
        pytest.fail(f"the {func} of the target's flag beside {rows - 1} patients of the other flag was released")
    assert len(refusals) == 2 and all("release.min_group_size" in text for text in refusals)
    assert binned and all(count <= engine._COMPARED_OFTEN for count in binned)  # the flags' two values, compared
    twin = t.group_by("sex").agg(rate=("readmitted", "mean")).release()
    expected = frame.groupby("sex")["readmitted"].mean()
    np.testing.assert_allclose(twin["rate"].to_numpy(), expected.loc[twin.index].to_numpy())


def test_a_fill_under_a_unique_column_s_name_is_not_taken_for_that_column(
    hospital: Any, recovered: Recovered, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Costs are unique in the admissions, so the vault knows at load that each group's most common cost is held
    by one record and counts nothing for the most-common-value rule. The attack writes a column with one value in
    every row but the target's *under the name* ``cost`` (a data-derived constant fill, ``fillna`` of a mask, a
    rounding), hoping the fact still holds for it: a group's sum would then be the target's cost plus zeros. Each
    is withheld, and no number that came back is the target's cost; the twin, the sums and means of the real costs
    per sex, is released through the fact and equals pandas."""
    from kernel_enclave.vault import release as engine

    t = hospital.open()
    target = hospital.target
    secret = float(target["cost"])
    frame = hospital.frame
    known = (frame.length_of_stay == target["length_of_stay"]) & (frame.age == target["age"])
    assert known.sum() == 1  # what the analyst knows of the target picks out one admission
    who = (t.length_of_stay == float(target["length_of_stay"])) & (t.age == int(target["age"]))
    decided: list[bool] = []
    held_once = engine._held_once

    def noted(*args: Any) -> bool:
        held = held_once(*args)
        gathering = engine._GATHERED.get()
        if gathering is None or not gathering.asked:  # not an earlier release run again (see .earlier_values)
            decided.append(held)
        return held

    monkeypatch.setattr(engine, "_held_once", noted)  # the vault runs in this process: see which way it decides
    attacks = {
        "constant fill": t.assign(cost=cn.where(who, t.cost, t.age * 0)),
        "mask filled": t.assign(cost=cn.where(who, t.cost, None).fillna(0.0)),
        "rounded": t.assign(cost=cn.where(who, t.cost, t.cost.round(-6))),
    }
    for name, crafted in attacks.items():
        decided.clear()
        released = crafted.group_by("sex").agg(total=("cost", "sum"), v=("cost", "mean")).release()
        assert not any(decided), name  # the fact was not taken for the crafted column
        target_sex = str(target["sex"])
        assert pd.isna(released.loc[target_sex, "total"]) and pd.isna(released.loc[target_sex, "v"]), name
        rows = int((frame.sex == target_sex).sum())
        for number in _numbers(released):
            assert not recovered(number, secret) and not recovered(number * rows, secret), name
        with pytest.raises(cn.PolicyViolation):
            crafted["cost"].sum().release()

    decided.clear()
    twin = t.group_by("sex").agg(total=("cost", "sum"), v=("cost", "mean")).release()
    assert decided and all(decided)  # released through the fact: nothing screened or counted for the rule
    by = frame.groupby("sex")["cost"]
    pd.testing.assert_series_equal(twin["total"], by.sum(), check_names=False)
    pd.testing.assert_series_equal(twin["v"], by.mean(), check_names=False)
    assert twin.attrs["confnb_suppressed"] == {"groups": 0, "cells": {}}
