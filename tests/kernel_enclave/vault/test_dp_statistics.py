"""The acceptance of dp mode: a differencing attack sees only the declared noise, and accuracy claims hold.

Each release is prepared and run afresh, as the vault does per request; OpenDP samples the noise, so these tests
check distributions over many releases against what OpenDP declared, with tolerances wide enough to hold with
overwhelming probability.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from kernel_enclave.vault import dp
from kernel_enclave.vault.plan import SourceTable

PEOPLE = 1_000
REPETITIONS = 200
EPSILON = 1.0
LOW, HIGH = 0.0, 10_000.0


@pytest.fixture(scope="module")
def claims() -> tuple[SourceTable, np.ndarray]:
    rng = np.random.default_rng(20260)  # the data only: OpenDP samples all noise
    cost = np.round(rng.gamma(2.0, 1_500.0, PEOPLE).clip(LOW, HIGH), 2)
    table = pa.table({"person": np.arange(PEOPLE, dtype=np.int64), "cost": cost})
    return SourceTable.from_dataset("claims", table), cost


PRIVACY = {"mode": "dp", "epsilon": 100.0, "delta": 0.0, "bounds": {"cost": [LOW, HIGH]}}


def release(source: SourceTable, plan: dict[str, Any]) -> dp.DpRelease:
    prepared = dp.prepare(plan, {"t": source}, {"claims": PRIVACY}, EPSILON, never_release={"claims": frozenset()})
    return prepared.run()


def sum_plan(excluded: int | None) -> dict[str, Any]:
    data: dict[str, Any] = {"node": "source", "handle": "t"}
    if excluded is not None:
        predicate = {"fn": "ne", "args": [{"col": "person"}, {"lit": excluded}]}
        data = {"node": "filter", "input": data, "predicate": predicate}
    return {"node": "aggregate", "input": data, "by": [], "aggs": [{"name": "total", "column": "cost", "func": "sum"}]}


def test_differencing_attack_sees_only_the_declared_noise(claims: tuple[SourceTable, np.ndarray]) -> None:
    source, cost = claims
    target = 17  # the person the attacker singles out
    differences: list[float] = []
    variances: list[float] = []
    for _ in range(REPETITIONS):
        everyone = release(source, sum_plan(None))
        all_but_one = release(source, sum_plan(target))
        differences.append(everyone.table.column("total")[0].as_py() - all_but_one.table.column("total")[0].as_py())
        (a,) = everyone.accuracy
        (b,) = all_but_one.accuracy
        assert a.distribution == b.distribution == "Float Laplace"
        variances.append(2 * a.scale**2 + 2 * b.scale**2)  # Laplace(b) has variance 2 b^2; the two are independent
    declared = math.sqrt(statistics.fmean(variances))
    observed = statistics.pstdev(differences)
    assert abs(observed - declared) <= 0.2 * declared, (observed, declared)
    assert declared > cost[target]  # the noise is larger than what the attack is after
    assert all(difference != cost[target] for difference in differences)


def test_mean_error_lies_inside_its_declared_interval(claims: tuple[SourceTable, np.ndarray]) -> None:
    source, cost = claims
    plan = {
        "node": "aggregate",
        "input": {"node": "source", "handle": "t"},
        "by": [],
        "aggs": [{"name": "mean_cost", "column": "cost", "func": "mean"}],
    }
    exact = float(cost.clip(LOW, HIGH).mean())
    inside = 0
    for _ in range(REPETITIONS):
        released = release(source, plan)
        (accuracy,) = released.accuracy
        (width,) = accuracy.half_width
        assert width is not None and 0 < width < math.inf
        if abs(released.table.column("mean_cost")[0].as_py() - exact) <= width:
            inside += 1
    assert inside >= 0.93 * REPETITIONS
