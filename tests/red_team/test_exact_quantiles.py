"""Order statistics never release one record's value: interior quantiles of a packed float, and folded tails.

The vault releases a quantile as the mean of a block of at least k records (blocks of k ranks fixed by the count of
values, not by q), and at most ten order statistics of a column per release. Each attack checks what came back
against every record's secret; each has a legitimate twin checked against the block mean computed with pandas.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest

import confnb as cn

K = 10
Recovered = Callable[[float | None, float], bool]


def block_quantile(values: pd.Series, q: float, k: int = K) -> float:
    ordered = np.sort(values.dropna().to_numpy(dtype="float64"))
    blocks = max(len(ordered) // k, 1)
    block = min(round(q * (len(ordered) - 1)) // k, blocks - 1)
    end = len(ordered) if block == blocks - 1 else (block + 1) * k
    return float(ordered[block * k : end].mean())


def test_interior_quantiles_of_a_packed_float_are_block_means(hospital: Any) -> None:
    t = hospital.open()
    frame = hospital.frame
    packed = t.assign(p=t.age * 1000 + t.length_of_stay)
    secrets = frame.age * 1000 + frame.length_of_stay
    every_value = set(np.round(secrets.to_numpy(), 6))
    with pytest.raises(cn.PolicyViolation) as caught:  # more than ten order statistics of one column
        packed["p"].quantile([i / 12 for i in range(1, 12)]).release()
    assert "release.order_statistics" in str(caught.value)
    seen: list[float] = []
    rows = len(frame)
    for start in range(0, 400, 10):  # 400 interior ranks, ten per release
        qs = [(start + i) / (rows - 1) for i in range(10)]
        released = packed["p"].quantile(qs).release()
        for q, value in zip(qs, released.to_numpy(), strict=True):
            assert value == pytest.approx(block_quantile(secrets, q), rel=1e-12)
            assert round(float(value), 6) not in every_value  # not one record's exact value
            seen.append(float(value))
    assert len(set(seen)) == 40  # ten nearby quantiles give one number: the block's mean


def test_a_folded_tail_gives_a_block_mean_not_the_target(hospital: Any, recovered: Recovered) -> None:
    """Fold the data so the target is the smallest value, then ask for the lowest quantile or the minimum."""
    t = hospital.open()
    secret = float(hospital.target["length_of_stay"])
    known = float(hospital.target["cost"])  # one attribute the analyst knows of the target
    distance = (t.cost - known).abs()
    folded = t.assign(f=distance * 1000 + t.length_of_stay)
    low = folded["f"].quantile([0.0, 0.0001, 0.001]).release()
    frame = hospital.frame
    plain = (frame.cost - known).abs() * 1000 + frame.length_of_stay
    for value in low.to_numpy():
        assert value == pytest.approx(block_quantile(plain, 0.0))
        assert not recovered(float(value), secret)
    with pytest.raises(cn.PolicyViolation):  # the minimum is one record's: withheld
        folded["f"].min().release()


def test_legitimate_medians_and_quartiles_are_block_means(hospital: Any) -> None:
    t = hospital.open()
    frame = hospital.frame
    assert t["length_of_stay"].median().release() == pytest.approx(block_quantile(frame.length_of_stay, 0.5))
    grouped = t.group_by("diagnosis").agg(m=("cost", "median"), p90=("cost", "quantile", 0.9)).release()
    by = frame.groupby("diagnosis")["cost"]
    pd.testing.assert_series_equal(grouped["m"], by.agg(lambda c: block_quantile(c, 0.5)), check_names=False)
    pd.testing.assert_series_equal(grouped["p90"], by.agg(lambda c: block_quantile(c, 0.9)), check_names=False)
    described = t[["age", "cost"]].describe().release()
    for column in ("age", "cost"):
        for label, q in (("25%", 0.25), ("50%", 0.5), ("75%", 0.75)):
            assert described.loc[label, column] == pytest.approx(block_quantile(frame[column], q))
