"""Differencing attacks: two releases whose record sets differ by a few records, subtracted.

``sum(cost)`` over everyone, then over everyone but the target, gives the target's cost; each release alone is
computed from thousands of patients and passes ``min_group_size``. The vault remembers the record set behind every
released number for the kernel's lifetime and refuses a release whose record set differs from an earlier one's by
1 to k - 1 records (``release.difference``). Every attack checks the numbers that did come back against the target's
row: none of their differences may give the secret. Every attack has a legitimate twin that is released, with its
value checked against pandas on the plaintext.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import combinations
from typing import Any

import numpy as np
import pytest

import confnb as cn
from confnb.analyst.table import SealedTable

RULE = "release.difference"
K = 10  # the fixture's min_group_size

Recovered = Callable[[float | None, float], bool]


def released_or_refused(
    make: Callable[[], Any], numbers: list[float], datasets: tuple[str, ...] = ("admissions",)
) -> Any:
    """The released value (recorded in ``numbers`` for the recovery checks), or None after a difference refusal
    naming some of ``datasets`` (a release over a join is refused for the first dataset whose sets come near)."""
    try:
        value = make()
    except cn.PolicyViolation as violation:
        refusal = (violation.rule, violation.datasets)
    else:
        numbers.extend(np.asarray(value, dtype=np.float64).ravel().tolist())
        return value
    assert refusal[0] == RULE and refusal[1] and set(refusal[1]) <= set(datasets), refusal
    return None


def nothing_recovers(numbers: list[float], secret: float, recovered: Recovered) -> None:
    """No released number, nor the difference of any two, is the secret."""
    candidates = [
        *numbers,
        *(a - b for a, b in combinations(numbers, 2)),
        *(b - a for a, b in combinations(numbers, 2)),
    ]
    assert not any(recovered(candidate, secret) for candidate in candidates)


def refusals(hospital: Any) -> list[dict[str, Any]]:
    return [
        entry["fields"]
        for entry in hospital.vault.audit.entries()
        if entry["event"] == "refusal" and entry["fields"].get("rule") == RULE
    ]


# -- attacks -------------------------------------------------------------------------------------------------------


def test_everyone_minus_everyone_but_the_target_is_refused(hospital: Any, recovered: Recovered) -> None:
    t = hospital.open()
    frame, target = hospital.frame, hospital.target
    numbers: list[float] = []
    everyone = released_or_refused(lambda: t.agg(s=("cost", "sum")).release()["s"], numbers)
    assert everyone == pytest.approx(frame.cost.sum())
    but_one = released_or_refused(
        lambda: t[t["patient_id"] != hospital.target_id].agg(s=("cost", "sum")).release()["s"], numbers
    )
    assert but_one is None
    nothing_recovers(numbers, target.cost, recovered)
    assert len(refusals(hospital)) == 1


def test_the_order_of_the_two_releases_does_not_matter(hospital: Any, recovered: Recovered) -> None:
    t = hospital.open()
    numbers: list[float] = []
    but_one = released_or_refused(
        lambda: t[t["patient_id"] != hospital.target_id]["length_of_stay"].mean().release(), numbers
    )
    assert but_one == pytest.approx(
        hospital.frame.length_of_stay[hospital.frame.patient_id != hospital.target_id].mean()
    )
    assert released_or_refused(lambda: t["length_of_stay"].mean().release(), numbers) is None
    # A count is compared with counts only: the row count over everyone subtracts from no earlier count.
    assert released_or_refused(lambda: t.count().release(), numbers) == len(hospital.frame)
    but_one_count = t[t["patient_id"] != hospital.target_id].count()
    assert released_or_refused(but_one_count.release, numbers) is None  # one record from the count
    n = len(hospital.frame)
    # mean over n records and over n - 1 would give the target's stay as n * m_all - (n - 1) * m_but_one
    assert not any(recovered(n * a - (n - 1) * b, hospital.target.length_of_stay) for a in numbers for b in numbers)
    nothing_recovers(numbers, hospital.target.length_of_stay, recovered)


def test_everyone_but_three_is_refused(hospital: Any, recovered: Recovered) -> None:
    t = hospital.open()
    frame = hospital.frame
    others = frame.patient_id[frame.patient_id != hospital.target_id].iloc[:2].tolist()
    left_out = [hospital.target_id, *others]
    numbers: list[float] = []
    released_or_refused(lambda: t.agg(s=("cost", "sum"), m=("age", "mean")).release(), numbers)
    refused = released_or_refused(
        lambda: t[~t["patient_id"].isin(left_out)].agg(s=("cost", "sum"), m=("age", "mean")).release(), numbers
    )
    assert refused is None
    three = frame.loc[frame.patient_id.isin(left_out)]
    nothing_recovers(numbers, float(three.cost.sum()), recovered)  # not even the three together
    nothing_recovers(numbers, hospital.target.cost, recovered)


def test_a_group_differing_by_a_few_records_is_refused(hospital: Any, recovered: Recovered) -> None:
    """Inside one diagnosis: the group with and without the target (and one other patient)."""
    t = hospital.open()
    target = hospital.target
    same = t[t["diagnosis"] == target.diagnosis]
    numbers: list[float] = []
    by_diagnosis = released_or_refused(lambda: t.group_by("diagnosis").agg(s=("cost", "sum")).release(), numbers)
    expected = hospital.frame.groupby("diagnosis").cost.sum()
    np.testing.assert_allclose(by_diagnosis["s"].to_numpy(), expected.loc[by_diagnosis.index].to_numpy())
    other = int(
        hospital.frame.patient_id[
            (hospital.frame.diagnosis == target.diagnosis) & (hospital.frame.patient_id != hospital.target_id)
        ].iloc[0]
    )
    attempt = same[~same["patient_id"].isin([hospital.target_id, other])]
    assert released_or_refused(lambda: attempt["cost"].sum().release(), numbers) is None
    nothing_recovers(numbers, target.cost, recovered)


def test_masking_one_record_inside_one_release_is_refused(hospital: Any, recovered: Recovered) -> None:
    """Two numbers of one release whose contributing records differ by the target: the release is refused.

    The mask names the target by what the analyst knows of them (age and length of stay), not by ``patient_id``:
    a mask on a never_release column would make the masked column derive from it, which is refused on its own.
    """
    t = hospital.open()
    frame, target = hospital.frame, hospital.target
    others = (t["age"] != int(target.age)) | (t["length_of_stay"] != float(target.length_of_stay))
    masked_out = ((frame.age == target.age) & (frame.length_of_stay == target.length_of_stay)).sum()
    assert 1 <= masked_out < K
    masked = t.assign(x=cn.where(others, t["cost"], None))
    numbers: list[float] = []
    assert released_or_refused(lambda: masked.agg(a=("cost", "sum"), b=("x", "sum")).release(), numbers) is None
    assert numbers == []
    # Its legitimate twin: the masked sum alone is released (nothing remembered differs from it by a few records).
    alone = released_or_refused(lambda: masked.agg(b=("x", "sum")).release()["b"], numbers)
    assert alone == pytest.approx(
        frame.cost[(frame.age != target.age) | (frame.length_of_stay != target.length_of_stay)].sum()
    )
    assert released_or_refused(lambda: t.agg(a=("cost", "sum")).release()["a"], numbers) is None
    nothing_recovers(numbers, target.cost, recovered)


def test_the_groups_of_everyone_but_the_target_added_up_are_refused(hospital: Any, recovered: Recovered) -> None:
    """sum(cost) over everyone, then by sex over everyone but the target: the two groups add up to all but one."""
    t = hospital.open()
    numbers: list[float] = []
    everyone = released_or_refused(lambda: t["cost"].sum().release(), numbers)
    assert everyone == pytest.approx(hospital.frame.cost.sum())
    others = t[t["patient_id"] != hospital.target_id]
    assert released_or_refused(lambda: others.group_by("sex").agg(s=("cost", "sum")).release(), numbers) is None
    assert len(numbers) == 1
    nothing_recovers(numbers, hospital.target.cost, recovered)


def test_the_groups_first_then_everyone_but_the_target_is_refused(hospital: Any, recovered: Recovered) -> None:
    """The other order: the groups of everyone (their union is remembered), then everyone but the target."""
    t = hospital.open()
    frame = hospital.frame
    numbers: list[float] = []
    by_sex = released_or_refused(lambda: t.group_by("sex").agg(s=("cost", "sum")).release(), numbers)
    expected = frame.groupby("sex").cost.sum()
    np.testing.assert_allclose(by_sex["s"].to_numpy(), expected.loc[by_sex.index].to_numpy())
    but_one = t[t["patient_id"] != hospital.target_id]
    assert released_or_refused(lambda: but_one["cost"].sum().release(), numbers) is None
    nothing_recovers([*numbers, sum(numbers)], hospital.target.cost, recovered)
    # Its legitimate twin: the total of everyone, which the groups add up to anyway, is released.
    assert t["cost"].sum().release() == pytest.approx(frame.cost.sum())


# -- legitimate twins ----------------------------------------------------------------------------------------------


def test_describe_of_everyone_minus_everyone_but_the_target_is_refused(hospital: Any, recovered: Recovered) -> None:
    """describe's counts, means, spreads and extremes are remembered from sketches, its quartiles' blocks listed
    beside them: everyone's description, then everyone but the target's, is refused; its twin, k patients apart,
    is released."""
    t = hospital.open()
    frame, target = hospital.frame, hospital.target
    numbers: list[float] = []
    everyone = released_or_refused(lambda: t.describe(["cost"]).release()["cost"], numbers)
    assert everyone["count"] == len(frame) and everyone["mean"] == pytest.approx(frame.cost.mean())
    memory = hospital.vault._memory()
    assert 0 < memory.listed() < memory.remembered()  # the quartiles' blocks listed, the other numbers sketched
    but_one = released_or_refused(
        lambda: t[t["patient_id"] != hospital.target_id].describe(["cost"]).release()["cost"], numbers
    )
    assert but_one is None
    nothing_recovers(numbers, target.cost, recovered)
    assert len(refusals(hospital)) == 1
    left_out = frame.patient_id.iloc[:K].tolist()
    but_k = t[~t["patient_id"].isin(left_out)].describe(["cost"]).release()["cost"]
    kept = frame.cost[~frame.patient_id.isin(left_out)]
    assert but_k["count"] == len(kept) and but_k["mean"] == pytest.approx(kept.mean())
    assert but_k["std"] == pytest.approx(kept.std())


def test_over_a_join_with_another_table_everyone_minus_everyone_but_the_target_is_refused(
    hospital: Any, recovered: Recovered
) -> None:
    """The admissions joined to the owner's ``wards`` (one row per patient: the join meets each record once, and
    each dataset's record sets are sketched from its own records). Leaving the target out is refused for a column
    of either table, also for ``deposit``, whose most common value (none paid) most patients hold: a value k
    records share is left out of its sets, and the rest still differ by the target."""
    t = hospital.open()
    joined = t.join(cn.open("wards"), on="patient_id")
    frame, wards = hospital.frame, hospital.wards
    deposit = float(wards.deposit[wards.patient_id == hospital.target_id].iloc[0])
    assert deposit != 0.0 and (wards.deposit == 0.0).sum() > K
    numbers: list[float] = []
    everyone = released_or_refused(lambda: joined.agg(c=("cost", "sum"), d=("deposit", "sum")).release(), numbers)
    assert everyone["c"] == pytest.approx(frame.cost.sum())
    assert everyone["d"] == pytest.approx(wards.deposit.sum())
    but_one = joined[joined["patient_id"] != hospital.target_id]
    both = ("admissions", "wards")
    assert released_or_refused(lambda: but_one.agg(c=("cost", "sum")).release(), numbers, both) is None
    assert released_or_refused(lambda: but_one.agg(d=("deposit", "sum")).release(), numbers, both) is None
    by_ward = joined.group_by("ward").agg(d=("deposit", "mean")).release()  # grouped: the same rule per ward
    numbers += by_ward["d"].tolist()
    ward = wards.ward[wards.patient_id == hospital.target_id].iloc[0]
    in_ward = but_one[but_one["ward"] == ward]
    assert released_or_refused(lambda: in_ward.agg(d=("deposit", "mean")).release(), numbers, both) is None
    nothing_recovers(numbers, hospital.target.cost, recovered)
    nothing_recovers(numbers, deposit, recovered)
    n = int((wards.ward == ward).sum())  # the ward's mean with and without the target would give the deposit
    assert not any(recovered(n * a - (n - 1) * b, deposit) for a in numbers for b in numbers)


def test_over_a_join_with_another_table_differing_by_k_records_is_released(hospital: Any) -> None:
    t = hospital.open()
    joined = t.join(cn.open("wards"), on="patient_id")
    wards = hospital.wards
    left_out = wards.patient_id[wards.deposit != 0.0].iloc[:K].tolist()
    everyone = joined["deposit"].sum().release()
    but_k = joined[~joined["patient_id"].isin(left_out)]["deposit"].sum().release()
    assert everyone == pytest.approx(wards.deposit.sum())
    assert but_k == pytest.approx(wards.deposit[~wards.patient_id.isin(left_out)].sum())


def test_disjoint_halves_and_their_whole_are_released(hospital: Any) -> None:
    t = hospital.open()
    frame = hospital.frame
    young = t[t["age"] < 50].agg(s=("cost", "sum"), n=("cost", "count")).release()
    old = t[t["age"] >= 50].agg(s=("cost", "sum"), n=("cost", "count")).release()
    everyone = t.agg(s=("cost", "sum"), n=("cost", "count")).release()
    assert young["s"] == pytest.approx(frame.cost[frame.age < 50].sum())
    assert old["s"] == pytest.approx(frame.cost[frame.age >= 50].sum())
    assert everyone["s"] == pytest.approx(frame.cost.sum())
    assert int(young["n"]) + int(old["n"]) == int(everyone["n"]) == len(frame)
    assert refusals(hospital) == []


def test_differing_by_k_records_is_released(hospital: Any) -> None:
    t = hospital.open()
    frame = hospital.frame
    left_out = frame.patient_id.iloc[:K].tolist()
    everyone = t["cost"].sum().release()
    but_k = t[~t["patient_id"].isin(left_out)]["cost"].sum().release()
    assert everyone == pytest.approx(frame.cost.sum())
    assert but_k == pytest.approx(frame.cost[~frame.patient_id.isin(left_out)].sum())
    # Their difference is a sum over k patients, which the policy allows on its own.
    assert everyone - but_k == pytest.approx(frame.cost[frame.patient_id.isin(left_out)].sum())


def test_asking_the_same_question_again_is_released(hospital: Any) -> None:
    t = hospital.open()
    first = t.group_by("sex").agg(m=("length_of_stay", "mean")).release()
    again = t.group_by("sex").agg(m=("length_of_stay", "mean")).release()
    expected = hospital.frame.groupby("sex").length_of_stay.mean()
    np.testing.assert_allclose(first["m"].to_numpy(), expected.loc[first.index].to_numpy())
    np.testing.assert_allclose(again["m"].to_numpy(), first["m"].to_numpy())
    assert refusals(hospital) == []


def test_a_refused_release_is_not_remembered(hospital: Any) -> None:
    """After a refusal the analyst can still ask what differs from the refused set, not from the released ones."""
    t = hospital.open()
    frame = hospital.frame
    everyone = t["cost"].sum().release()
    with pytest.raises(cn.PolicyViolation):
        t[t["patient_id"] != hospital.target_id]["cost"].sum().release()
    # Everyone but 10 differs from the refused set by 9 records: fine, since that set was never released.
    left_out = [hospital.target_id, *frame.patient_id[frame.patient_id != hospital.target_id].iloc[:9].tolist()]
    but_ten = t[~t["patient_id"].isin(left_out)]["cost"].sum().release()
    assert everyone - but_ten == pytest.approx(frame.cost[frame.patient_id.isin(left_out)].sum())


def test_a_sealed_and_unsealed_copy_is_the_same_records(hospital: Any, recovered: Recovered, tmp_path: Any) -> None:
    """Sealing a filtered table and opening it again keeps each row's record id: no fresh set of records."""
    t = hospital.open()
    numbers: list[float] = []
    everyone = released_or_refused(lambda: t["cost"].sum().release(), numbers)
    assert everyone == pytest.approx(hospital.frame.cost.sum())
    path = t[t["patient_id"] != hospital.target_id].seal(tmp_path / "all-but-one.cnb")
    copy = cn.unseal(path)
    assert isinstance(copy, SealedTable)
    assert released_or_refused(lambda: copy["cost"].sum().release(), numbers) is None
    # Its legitimate twin: an aggregate of the copy over other records is released.
    young = copy[copy["age"] < 50]["cost"].sum().release()
    frame = hospital.frame
    assert young == pytest.approx(frame.cost[(frame.patient_id != hospital.target_id) & (frame.age < 50)].sum())
    nothing_recovers([*numbers, young], hospital.target.cost, recovered)


def test_previews_count_rows_under_the_same_checks(hospital: Any) -> None:
    """Row counts in previews, with and without the target, would say whether the target passes the filter."""
    t = hospital.open()
    target = hospital.target
    older = t[t["age"] >= int(target.age)]
    shown = older.preview()
    assert shown["rows"] == int((hospital.frame.age >= target.age).sum())  # the twin: a count of many
    without = older[older["patient_id"] != hospital.target_id].preview()
    assert "rows" not in without and "release.difference" in without["withheld"]["rows"]
    younger = t[t["age"] < 40].preview()  # far from every earlier count: shown
    assert younger["rows"] == int((hospital.frame.age < 40).sum())


# -- the same attacks on a dataset scanned from disk (its record sets sketched in the streaming query) ----------------


@pytest.fixture
def scanned_hospital(hospital: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The hospital's dataset opened over the vault's memory budget: read segment by segment per query."""
    monkeypatch.setenv("CONFNB_VAULT_MEMORY_BUDGET", "0")
    return hospital


def opened_scanned(hospital: Any) -> Any:
    t = hospital.open()
    assert all(source.streaming for source in hospital.vault._sources.values())
    return t


def test_over_a_scanned_dataset_everyone_minus_everyone_but_the_target_is_refused(
    scanned_hospital: Any, recovered: Recovered
) -> None:
    hospital = scanned_hospital
    t = opened_scanned(hospital)
    frame, target = hospital.frame, hospital.target
    numbers: list[float] = []
    everyone = released_or_refused(lambda: t.agg(s=("cost", "sum")).release()["s"], numbers)
    assert everyone == pytest.approx(frame.cost.sum())
    assert hospital.vault._memory().listed() == 0  # remembered from its sketch: no record id listed
    but_one = released_or_refused(
        lambda: t[t["patient_id"] != hospital.target_id].agg(s=("cost", "sum")).release()["s"], numbers
    )
    assert but_one is None
    by_sex = released_or_refused(  # the groups of everyone but the target, added up
        lambda: t[t["patient_id"] != hospital.target_id].group_by("sex").agg(s=("cost", "sum")).release()["s"],
        numbers,
    )
    assert by_sex is None
    nothing_recovers(numbers, target.cost, recovered)
    assert len(refusals(hospital)) == 2


def test_over_a_scanned_dataset_differing_by_k_records_and_asking_again_are_released(scanned_hospital: Any) -> None:
    hospital = scanned_hospital
    t = opened_scanned(hospital)
    frame = hospital.frame
    left_out = frame.patient_id.iloc[:K].tolist()
    everyone = t["cost"].sum().release()
    but_k = t[~t["patient_id"].isin(left_out)]["cost"].sum().release()
    again = t[~t["patient_id"].isin(left_out)]["cost"].sum().release()
    assert everyone == pytest.approx(frame.cost.sum())
    assert but_k == again == pytest.approx(frame.cost[~frame.patient_id.isin(left_out)].sum())
    by_sex = t.group_by("sex").agg(m=("length_of_stay", "mean")).release()
    expected = frame.groupby("sex").length_of_stay.mean()
    assert by_sex["m"].to_numpy() == pytest.approx(expected.to_numpy())
    assert refusals(hospital) == []


# -- record ids and sketches: one id per record whatever the filter; k above what the sketches screen ---------------


def test_leaving_out_one_patient_then_another_is_refused(hospital: Any, recovered: Recovered) -> None:
    """Everyone but patient Z, then everyone but the target: two sets of the same size two records apart, whose
    difference is the target's cost less Z's (which the analyst may know). Record ids are numbered before any filter:
    were they numbered after it, both sets would be the same ids, the second a repeat of the first, and released."""
    t = hospital.open()
    frame, target = hospital.frame, hospital.target
    same_sex = frame.sex == target.sex
    other = int(frame.patient_id[same_sex & (frame.patient_id != hospital.target_id)].iloc[0])
    secret = float(target.cost) - float(frame.cost[frame.patient_id == other].iloc[0])
    numbers: list[float] = []
    for rows, kept in ((t[t["sex"] == target.sex], same_sex), (t, frame.sex == frame.sex)):  # after a filter, too
        but_other = released_or_refused(
            lambda rows=rows: rows[rows["patient_id"] != other]["cost"].sum().release(), numbers
        )
        assert but_other == pytest.approx(frame.cost[kept & (frame.patient_id != other)].sum())
        but_target = rows[rows["patient_id"] != hospital.target_id]["cost"].sum()
        assert released_or_refused(but_target.release, numbers) is None
    assert len(refusals(hospital)) == 2
    nothing_recovers(numbers, secret, recovered)
    nothing_recovers(numbers, float(target.cost), recovered)
    # The twin: two sets that each leave out k patients of their own, 2k apart, are both released.
    ids = frame.patient_id[frame.patient_id != hospital.target_id].tolist()
    first, second = ids[100 : 100 + K], ids[200 : 200 + K]
    a = t[~t["patient_id"].isin(first)]["age"].sum().release()
    b = t[~t["patient_id"].isin(second)]["age"].sum().release()
    assert a == frame.age[~frame.patient_id.isin(first)].sum() and b == frame.age[~frame.patient_id.isin(second)].sum()


STRICT_K = 200  # above what two sketches can screen (128 records): sets of close sizes are compared record by record


@pytest.fixture(scope="module")
def strict_owner(tmp_path_factory: pytest.TempPathFactory, simulated_tee_dir: Any) -> Any:
    from tests.red_team.conftest import ADMISSIONS_POLICY, serve_admissions

    policy = ADMISSIONS_POLICY.replace("min_group_size = 10", f"min_group_size = {STRICT_K}")
    policy = policy.replace('id = "admissions-red-team-v1"', 'id = "admissions-red-team-strict-v1"')
    assert f"min_group_size = {STRICT_K}" in policy
    with serve_admissions(tmp_path_factory.mktemp("strict"), policy) as owner:
        yield owner


@pytest.fixture
def strict_hospital(strict_owner: Any, simulated_backend: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    from tests.red_team.conftest import kernel

    with kernel(strict_owner, simulated_backend, monkeypatch) as fresh:
        yield fresh


def test_with_min_group_size_above_what_sketches_screen_one_record_apart_is_refused(
    strict_hospital: Any, recovered: Recovered
) -> None:
    """k = 200: two sketches are not read for differences that large, so sets within 199 records of each other by
    size are compared exactly. Everyone then everyone but the target is refused, and so is everyone but 150; a set
    k records away is released."""
    t = strict_hospital.open()
    frame = strict_hospital.frame
    numbers: list[float] = []
    everyone = released_or_refused(lambda: t["cost"].sum().release(), numbers)
    assert everyone == pytest.approx(frame.cost.sum())
    target_id = strict_hospital.target_id
    assert released_or_refused(lambda: t[t["patient_id"] != target_id]["cost"].sum().release(), numbers) is None
    others = frame.patient_id[frame.patient_id != target_id].tolist()
    few = [target_id, *others[:149]]
    assert released_or_refused(lambda: t[~t["patient_id"].isin(few)]["cost"].sum().release(), numbers) is None
    nothing_recovers(numbers, float(strict_hospital.target.cost), recovered)
    nothing_recovers(numbers, float(frame.cost[frame.patient_id.isin(few)].sum()), recovered)
    # The twin: everyone but k patients, whose difference is a sum over k records, is released.
    many = others[:STRICT_K]
    but_k = t[~t["patient_id"].isin(many)]["cost"].sum().release()
    assert but_k == pytest.approx(frame.cost[~frame.patient_id.isin(many)].sum())
