"""A join that carries one record's value onto other rows, read back through a grouped count.

Join every admission, on a key of one value, to a few chosen rows of the same table: the target and a cover of
patients whose costs are known to be high. Each joined row carries one of those patients' costs; a filter keeps the
rows whose carried cost exceeds a threshold that differs per age. The cover always passes, the target only in the
ages whose threshold its cost exceeds: each age's count is its patients times 14 or times 15, which brackets the
target's cost in one release (one threshold per group). Every group has thousands of contributing records, and its
records, both sides of the join together, differ from any other group's by thousands: only the records of the
chosen side, compared on their own, show two groups one record apart. The vault compares the records of each
occurrence of a dataset in a join separately, within a release and across releases (``release.difference``). The
same with two owners' datasets: a count of people reads no column of the accounts joined onto them, but the
accounts' balances chose its rows, so the accounts behind each number are compared too, as a count.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

import confnb as cn

from .test_exact_masking import Recovered, _numbers

COVER_ABOVE = 20000.0  # 14 admissions cost more: the cover, which passes every threshold
STEP = 100.0  # the thresholds, one per age: 1000 + 100 * (age - 18)


def _carried(t: Any, chosen: Any) -> Any:
    """Every admission joined to the chosen rows of the same table on a key of one value: each row carries one of
    their costs (``cost_y``)."""
    one = t.assign(one=t.age * 0)
    return one.join(one[chosen][["one", "cost"]], on="one")


def _bracket(counts: pd.Series, frame: pd.DataFrame, cover: int) -> tuple[float, float] | None:
    """Where the target's cost lies, read from which ages counted the cover and the target (``cover + 1`` per
    patient) rather than the cover alone."""
    ages = frame.age.value_counts()
    passed = [int(age) for age, n in counts.items() if not pd.isna(n) and int(n) == ages[int(age)] * (cover + 1)]
    if not passed:
        return None
    highest = max(passed)
    return 1000.0 + STEP * (highest - 18), 1000.0 + STEP * (highest - 17)


def test_a_cover_and_the_target_joined_onto_every_row_do_not_bracket_its_value(
    hospital: Any, recovered: Recovered
) -> None:
    t = hospital.open()
    frame = hospital.frame
    target = hospital.target
    secret = float(target["cost"])
    cover = int((frame.cost > COVER_ABOVE).sum())
    assert cover >= 10 and secret < COVER_ABOVE
    who = (t.length_of_stay == float(target["length_of_stay"])) & (t.age == int(target["age"]))
    joined = _carried(t, who | (t.cost > COVER_ABOVE))
    passing = joined[joined["cost_y"] > (joined["age"] - 18) * STEP + 1000.0]
    refused: cn.PolicyViolation | None = None
    try:
        counts = passing.group_by("age").agg(n=("age", "count")).release()
    except cn.PolicyViolation as caught:
        refused = caught
    else:  # had it come back, the counts must not bracket the cost (they would, without the per-side comparison)
        found = _bracket(counts["n"], frame, cover)
        assert found is None or not found[0] < secret <= found[1], found
    assert refused is not None and "release.difference" in str(refused)
    refused = None
    try:  # the same counts as value counts
        by_age = passing.value_counts("age").release()
    except cn.PolicyViolation as caught:
        refused = caught
    else:
        found = _bracket(by_age, frame, cover)
        assert found is None or not found[0] < secret <= found[1], found
    assert refused is not None and "release.difference" in str(refused)
    # A threshold for all ages at once, then another: the two sets of the chosen side are one record apart
    # exactly when the target's cost lies between the thresholds, so the second is refused or says nothing new.
    for counted in (lambda above: above["cost_x"].count(), lambda above: above.count()):
        brackets, rules = [], []
        for threshold in (secret - 50.0, secret + 50.0):
            try:
                released = counted(joined[joined["cost_y"] > threshold]).release()
            except cn.PolicyViolation as again:
                rules.append(again.rule)
                continue
            brackets.append(released)
            for number in _numbers(released):
                assert not recovered(number, secret)
        assert len(set(brackets)) <= 1  # never both counts: they would differ by the target's patients
        assert rules == ["release.difference"]


def test_a_self_join_whose_sides_differ_by_many_records_is_released(hospital: Any) -> None:
    """The twin: the same join onto the costliest admissions alone (no target among them), and a count per age of
    the rows above each threshold, is released and equals pandas."""
    t = hospital.open()
    frame = hospital.frame
    joined = _carried(t, t.cost > COVER_ABOVE)
    passing = joined[joined["cost_y"] > (joined["age"] - 18) * STEP + 1000.0]
    counts = passing.group_by("age").agg(n=("age", "count")).release()
    cover = frame[frame.cost > COVER_ABOVE].cost.to_numpy()
    expected = {
        int(age): int(n) * int((cover > (int(age) - 18) * STEP + 1000.0).sum())
        for age, n in frame.age.value_counts().items()
    }
    assert {int(age): int(n) for age, n in counts["n"].items()} == {a: n for a, n in expected.items() if n}
    assert counts.attrs["confnb_suppressed"] == {"groups": 0, "cells": {}}


def _two_owners(simulated_backend: Any) -> tuple[Any, dict[str, dict[str, Any]], pd.DataFrame, pd.DataFrame]:
    """A vault holding two owners' datasets: people (age) and accounts (balance), both under k = 10."""
    import numpy as np
    import pyarrow as pa

    from confnb.policy.output import OutputPolicy
    from kernel_enclave.vault.keys import VaultKeys
    from kernel_enclave.vault.vault import Vault

    rng = np.random.default_rng(20261207)
    people = pd.DataFrame({"pid": np.arange(3000), "age": rng.integers(18, 60, 3000), "one": 0})
    balance = rng.uniform(1000.0, 9000.0, 200).round(2)
    balance[:14] = 50000.0 + np.arange(14)  # the cover: the accounts above 40,000
    balance[77] = 5234.5  # the target's
    accounts = pd.DataFrame({"aid": np.arange(200), "balance": balance, "one": 0})
    vault = Vault(backend=simulated_backend, keys=VaultKeys.generate())
    kinds = frozenset({"schema", "aggregate", "row_count"})
    sources = {
        name: {
            "node": "source",
            "handle": vault.add_table(
                name, pa.Table.from_pandas(frame, preserve_index=False), OutputPolicy(id=name, allow=kinds)
            ),
        }
        for name, frame in (("people", people), ("accounts", accounts))
    }
    return vault, sources, people, accounts


def _counts_by_age(sources: dict[str, dict[str, Any]], chosen: dict[str, Any]) -> dict[str, Any]:
    """People joined on a key of one value to the chosen accounts; a count of people per age of the rows whose
    carried balance exceeds the age's threshold."""
    right = {"node": "select", "input": {"node": "filter", "input": sources["accounts"], "predicate": chosen}}
    right["columns"] = ["one", "balance"]
    joined = {"node": "join", "left": sources["people"], "right": right, "on": ["one"]}
    threshold = {
        "fn": "add",
        "args": [
            {"fn": "mul", "args": [{"fn": "sub", "args": [{"col": "age"}, {"lit": 18}]}, {"lit": 200.0}]},
            {"lit": 1000.0},
        ],
    }
    passing = {"node": "filter", "input": joined, "predicate": {"fn": "gt", "args": [{"col": "balance"}, threshold]}}
    return {
        "node": "aggregate",
        "input": passing,
        "by": ["age"],
        "aggs": [{"name": "n", "column": "age", "func": "count"}],
    }


def test_another_owner_s_chosen_records_joined_onto_every_row_do_not_bracket_a_value(simulated_backend: Any) -> None:
    """The same across two owners: a count of people reads no column of the accounts, but the accounts' balances
    chose its rows, so the accounts behind each group are compared too (as a count)."""
    vault, sources, people, accounts = _two_owners(simulated_backend)
    secret = 5234.5
    cover = {"fn": "gt", "args": [{"col": "balance"}, {"lit": 40000.0}]}
    chosen = {"fn": "or", "args": [{"fn": "eq", "args": [{"col": "aid"}, {"lit": 77}]}, cover]}
    reply, _ = vault.handle({"op": "release", "plan": _counts_by_age(sources, chosen)}, [])
    if reply["ok"]:  # had it come back: the ages that counted 15 accounts a person bracket the balance
        counted = vault._results[reply["result"]].table.to_pandas().set_index("age")["n"]
        per_person = counted / people.groupby("age").size().loc[counted.index]
        highest = max((int(age) for age, ratio in per_person.items() if ratio == 15), default=None)
        assert highest is None or not 1000.0 + 200.0 * (highest - 18) < secret <= 1000.0 + 200.0 * (highest - 17)
    assert reply["ok"] is False and reply["error"]["rule"] == "release.difference", reply
    assert reply["error"]["datasets"] == ["accounts"] and "result" not in reply and str(secret) not in str(reply)
    # The twin: onto the cover alone, every count is released, 14 per person of the age, as pandas counts it.
    reply, _ = vault.handle({"op": "release", "plan": _counts_by_age(sources, cover)}, [])
    assert reply["ok"] is True, reply
    released = vault._results[reply["result"]].table.to_pandas().set_index("age")["n"]
    expected = people.groupby("age").size() * int((accounts.balance > 40000.0).sum())
    pd.testing.assert_series_equal(released.sort_index(), expected, check_names=False, check_dtype=False)


def test_a_record_joined_onto_every_row_is_not_placed_by_how_many_groups_were_withheld(
    hospital: Any, recovered: Recovered
) -> None:
    """The target alone joined onto every row: every group then rests on one record of the chosen side and is
    withheld, but their number would say in how many ages the target's cost passed the threshold. Withheld groups
    that share a record are withheld whole instead; the twin, a breakdown of one table whose small groups are
    withheld, still says how many, as pandas counts them."""
    t = hospital.open()
    frame = hospital.frame
    target = hospital.target
    secret = float(target["cost"])
    who = (t.length_of_stay == float(target["length_of_stay"])) & (t.age == int(target["age"]))
    passing = (joined := _carried(t, who))[joined["cost_y"] > (joined["age"] - 18) * STEP + 1000.0]
    for attempt in (
        lambda: passing.group_by("age").agg(n=("age", "count")).release(),
        lambda: passing.value_counts("age").release(),
    ):
        refused: cn.PolicyViolation | None = None
        try:
            released = attempt()
        except cn.PolicyViolation as caught:
            refused = caught
        else:  # had it come back, the ages withheld would run from 18 to the last threshold the cost passed
            highest = 18 + int(released.attrs["confnb_suppressed"]["groups"]) - 1
            assert not 1000.0 + STEP * (highest - 18) < secret <= 1000.0 + STEP * (highest - 17), highest
        assert refused is not None and refused.rule == "release.min_group_size", refused
        assert str(secret) not in str(refused)

    old = t[t.age > 90]
    breakdown = old.group_by(["diagnosis", "sex", "readmitted"]).agg(n=("cost", "count")).release()
    sizes = frame[frame.age > 90].groupby(["diagnosis", "sex", "readmitted"]).size()
    assert breakdown.attrs["confnb_suppressed"]["groups"] == int((sizes < 10).sum()) > 0
    assert breakdown["n"].tolist() == sizes[sizes >= 10].tolist()
