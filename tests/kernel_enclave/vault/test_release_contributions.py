"""Contributing records, the order-statistic rule and record sets, on real Polars frames through the release engine."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from confnb.policy.output import RELEASE_KINDS, OutputPolicy
from kernel_enclave.vault.plan import SourceTable
from kernel_enclave.vault.protocol import PolicyViolation
from kernel_enclave.vault.release import release


def policy(k: int) -> dict[str, OutputPolicy]:
    return {
        "d": OutputPolicy(
            id="p",
            allow=frozenset(RELEASE_KINDS),
            min_group_size=k,
            never_release=frozenset(),
            max_rows=None,
            sources=("p",),
        )
    }


def sources() -> dict[str, SourceTable]:
    rng = np.random.default_rng(3)
    table = pa.table(
        {
            "g": ["a"] * 30 + ["b"] * 30,
            "x": rng.normal(size=60),
            "flag": [True] * 3 + [False] * 57,
            "cost": [float(i) for i in range(60)],
        }
    )
    return {"t": SourceTable.from_dataset("d", table)}


def masked(by: list[str], *aggs: tuple[str, str, str], then: Any, otherwise: Any) -> dict[str, Any]:
    pick = {"fn": "eq", "args": [{"col": "cost"}, {"lit": 7.0}]}
    assign = {
        "node": "assign",
        "input": {"node": "source", "handle": "t"},
        "columns": [["m", {"fn": "where", "args": [pick, then, otherwise]}]],
    }
    return {
        "node": "aggregate",
        "input": assign,
        "by": by,
        "aggs": [{"name": n, "column": c, "func": f} for n, c, f in aggs],
    }


def test_a_masked_value_is_withheld_and_its_group_keeps_its_other_numbers() -> None:
    plan = masked(
        ["g"],
        ("n", "m", "count"),
        ("v", "m", "mean"),
        ("rows", "x", "count"),
        then={"col": "x"},
        otherwise={"lit": None},
    )
    released = release(plan, sources(), policy(5))
    assert released.table is not None
    assert released.table.to_pydict()["n"] == [None, None] and released.table.to_pydict()["v"] == [None, None]
    assert released.table.to_pydict()["rows"] == [30, 30]
    assert released.withheld == {"groups": 0, "cells": {"n": [0, 1], "v": [0, 1]}}
    with pytest.raises(PolicyViolation) as caught:
        release(masked([], ("v", "m", "mean"), then={"col": "x"}, otherwise={"lit": None}), sources(), policy(5))
    assert caught.value.rule == "release.min_group_size"


def test_a_constant_fill_from_the_data_does_not_count_but_a_flag_with_k_holders_does() -> None:
    zero = {"fn": "mul", "args": [{"col": "cost"}, {"lit": 0}]}
    plan = masked(["g"], ("v", "m", "mean"), ("n", "m", "count"), then={"col": "x"}, otherwise=zero)
    released = release(plan, sources(), policy(5))
    assert released.table is not None and released.table.to_pydict()["v"] == [None, 1.0 * 0]  # b: all zeros
    assert released.table.to_pydict()["n"] == [30, 30]
    flags = {
        "node": "aggregate",
        "input": {"node": "source", "handle": "t"},
        "by": [],
        "aggs": [{"name": "r", "column": "flag", "func": "mean"}],
    }
    with pytest.raises(PolicyViolation):  # 3 records differ from the most common value
        release(flags, sources(), policy(5))
    assert release(flags, sources(), policy(3)).table.column("r").to_pylist() == [pytest.approx(0.05)]


def test_order_statistics_are_block_means_and_capped() -> None:
    cost = {
        "node": "aggregate",
        "input": {"node": "source", "handle": "t"},
        "by": [],
        "aggs": [{"name": f"q{i}", "column": "cost", "func": "quantile", "q": i / 10} for i in range(10)],
    }
    released = release(cost, sources(), policy(10))
    assert released.table is not None
    values = [released.table.column(f"q{i}")[0].as_py() for i in range(10)]
    # Blocks of ranks {0..9}, ..., {50..59}: means 4.5, 14.5, ..., 54.5; rank round(q * 59) picks the block.
    assert values == [float(np.arange(60)[(min(round(i / 10 * 59) // 10, 5)) * 10 :][:10].mean()) for i in range(10)]
    cost["aggs"].append({"name": "q10", "column": "cost", "func": "median"})
    with pytest.raises(PolicyViolation) as caught:
        release(cost, sources(), policy(10))
    assert caught.value.rule == "release.order_statistics"


def test_record_sets_name_each_released_number_once() -> None:
    plan = {
        "node": "aggregate",
        "input": {"node": "source", "handle": "t"},
        "by": ["g"],
        "aggs": [
            {"name": "mean", "column": "cost", "func": "mean"},
            {"name": "med", "column": "cost", "func": "median"},
        ],
    }
    released = release(plan, sources(), policy(10), record_sets=True)
    found = {(label, tuple(ids)) for _, label, ids, _keys in released.record_sets}
    assert ("group ('a',)", tuple(range(30))) in found and ("group ('b',)", tuple(range(30, 60))) in found
    assert ("group ('a',) column 'med'", tuple(range(10, 20))) in found  # rank round(14.5) = 14: block 10..19
    assert all(ids.dtype == np.int64 and np.all(np.diff(ids) > 0) for _, _, ids, _ in released.record_sets)
    assert release(plan, sources(), policy(10)).record_sets == ()
