"""Release limits the owner sets, and an audit log that says what was asked.

Pairwise difference checks stop two releases that differ by a few records; they cannot stop reconstruction from
many overlapping releases, each differing from every other by many records (Dinur and Nissim). What bounds that is
the number of releases: ``[release] max_releases`` per kernel in the vault, ``max_kernels_per_day`` at the broker.
These tests run a reconstruction of the target's cost from random subset sums and check, on the numbers that came
back, that the target's value is not determined by them; each has a legitimate twin whose released values are
checked against pandas on the plaintext. The kernel's audit log must show each plan readably, whatever the analyst
named things.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import confnb as cn
from confnb.policy.output import OutputPolicy

LIMIT = 20
KERNELS_PER_DAY = 2
# The hospital's policy, with the two limits.
LIMITED_POLICY = f"""
[policy]
id = "admissions-limited-v1"
[release]
allow = ["schema", "row_count", "aggregate", "model_metrics", "model_parameters", "predict_public"]
min_group_size = 10
never_release = ["patient_id"]
max_rows = 1000
max_releases = {LIMIT}
max_kernels_per_day = {KERNELS_PER_DAY}
"""
POOL = 30  # unknowns of the reconstruction, the target among them
SUBSET = 15
ATTEMPTS = 2 * POOL

Recovered = Callable[[float | None, float], bool]


@dataclass(frozen=True)
class Owner:
    datasets: Path
    broker_url: str
    store: Any


@pytest.fixture
def limited_owner(hospital_owner: Any, tmp_path: Path, simulated_tee_dir: Path) -> Iterator[Owner]:
    """The hospital's admissions encrypted under the limited policy, with a broker of their own (a fresh daily
    count for each test)."""
    from confnb.broker.local import serve_locally
    from confnb.broker.store import OwnerStore
    from confnb.datasets.owner import encrypt_dataset
    from kernel_enclave.measurement import simulated_measurement

    store = OwnerStore.create(tmp_path / "store")
    attestation = f'[attestation]\nallow_simulated = true\nmeasurements = ["{simulated_measurement().hex()}"]\n'
    policy = OutputPolicy.from_toml(LIMITED_POLICY)
    encrypt_dataset(
        hospital_owner.frame, tmp_path / "datasets" / "admissions", store, "admissions", policy, attestation
    )
    with serve_locally(store) as url:
        yield Owner(tmp_path / "datasets", url, store)


def _vault(owner: Owner, backend: Any) -> Any:
    from kernel_enclave.vault.keys import VaultKeys
    from kernel_enclave.vault.vault import Vault

    return Vault(
        backend=backend, keys=VaultKeys.generate(), broker_url=owner.broker_url, dataset_path=str(owner.datasets)
    )


@pytest.fixture
def limited_kernel(
    hospital: Any, limited_owner: Owner, simulated_backend: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    """A fresh kernel over the limited admissions, the analyst API connected to it (as the ``hospital`` fixture,
    which is set up first: ``cn.open`` reaches this kernel, and the hospital's secret stays at hand)."""
    from confnb.analyst.session import current_session
    from kernel_enclave.vault.service import VaultServer

    directory = Path(tempfile.mkdtemp(prefix="cnb-"))
    vault = _vault(limited_owner, simulated_backend)
    server = VaultServer(vault, directory / "vault.sock")
    server.start()
    monkeypatch.delenv("CONFNB_BROKER_URL", raising=False)
    monkeypatch.setenv("CONFNB_VAULT_SOCKET", str(directory / "vault.sock"))
    try:
        yield vault
    finally:
        current_session().close()
        server.close()
        shutil.rmtree(directory, ignore_errors=True)


def _pool(frame: pd.DataFrame, target_id: int) -> pd.DataFrame:
    """The target and 29 others, each the only patient with their length of stay (so a filter on it picks them)."""
    unique = frame[~frame.length_of_stay.duplicated(keep=False)]
    others = unique[unique.patient_id != target_id].sample(POOL - 1, random_state=7)
    pool = pd.concat([frame[frame.patient_id == target_id], others])
    assert pool.length_of_stay.is_unique and len(pool) == POOL
    return pool.reset_index(drop=True)


def _reconstruct(t: Any, pool: pd.DataFrame) -> tuple[list[np.ndarray], list[float], list[str]]:
    """Sums of cost over random halves of the pool, as many as will come back: rows of a linear system."""
    rng = np.random.default_rng(17)
    rows: list[np.ndarray] = []
    sums: list[float] = []
    rules: list[str] = []
    for _ in range(ATTEMPTS):
        chosen = np.zeros(POOL)
        chosen[rng.choice(POOL, SUBSET, replace=False)] = 1.0
        stays = pool.length_of_stay[chosen == 1.0].tolist()
        try:
            value = t[t.length_of_stay.isin(stays)].cost.sum().release()
        except cn.PolicyViolation as violation:
            rules.append(violation.rule if violation.datasets == ("admissions",) else "another dataset?")
            continue
        rows.append(chosen)
        sums.append(float(value))
    return rows, sums, rules


def _determined(rows: list[np.ndarray], index: int) -> bool:
    """Whether some linear combination of the released sums isolates unknown ``index`` (rank test)."""
    if not rows:
        return False
    matrix = np.array(rows)
    unit = np.zeros(matrix.shape[1])
    unit[index] = 1.0
    return int(np.linalg.matrix_rank(np.vstack([matrix, unit]))) == int(np.linalg.matrix_rank(matrix))


def test_reconstruction_from_many_releases_stops_at_the_limit(
    limited_kernel: Any, hospital: Any, recovered: Recovered
) -> None:
    frame = hospital.frame
    pool = _pool(frame, hospital.target_id)
    secret = float(pool.cost[0])
    # Released without limits, these sums would isolate the target: the attack is real.
    every = np.random.default_rng(17)
    planned = []
    for _ in range(ATTEMPTS):
        chosen = np.zeros(POOL)
        chosen[every.choice(POOL, SUBSET, replace=False)] = 1.0
        planned.append(chosen)
    assert _determined(planned, 0)

    rows, sums, rules = _reconstruct(cn.open("admissions"), pool)
    assert len(rows) <= LIMIT and rules.count("release.max_releases") == ATTEMPTS - LIMIT
    assert set(rules) <= {"release.max_releases", "release.difference"}
    for row, value in zip(rows, sums, strict=True):  # what came back is right ...
        assert value == pytest.approx(float(pool.cost[row == 1.0].sum()))
    # ... and leaves the target's cost undetermined: no combination of it isolates the target.
    assert not _determined(rows, 0)
    estimate = np.linalg.lstsq(np.array(rows), np.array(sums), rcond=None)[0][0]
    assert not recovered(float(estimate), secret)
    assert not any(recovered(value, secret) for value in sums)

    refusals = [e["fields"] for e in limited_kernel.audit.entries() if e["event"] == "refusal"]
    limited = [fields for fields in refusals if fields["rule"] == "release.max_releases"]
    assert len(limited) == ATTEMPTS - LIMIT and all(fields["datasets"] == ["admissions"] for fields in limited)
    assert all(fields["plan"].startswith("admissions | filter(isin(length_of_stay, ") for fields in limited)


def test_the_twin_every_kind_is_released_within_the_limit_then_refused(limited_kernel: Any, hospital: Any) -> None:
    frame = hospital.frame
    t = cn.open("admissions")
    by_diagnosis = t.group_by("diagnosis").cost.mean().release()
    expected = frame.groupby("diagnosis").cost.mean()
    assert np.allclose(by_diagnosis.sort_index().to_numpy(), expected.sort_index().to_numpy())
    assert t.count().release() == len(frame)
    older = t[t.age > 60]
    assert older.cost.mean().release() == pytest.approx(frame[frame.age > 60].cost.mean())
    assert t.preview()["rows"] == len(frame)
    for _ in range(LIMIT - 4):
        assert t.length_of_stay.sum().release() == pytest.approx(frame.length_of_stay.sum())
    with pytest.raises(cn.PolicyViolation) as refused:
        t.length_of_stay.sum().release()
    assert refused.value.rule == "release.max_releases" and refused.value.datasets == ("admissions",)
    assert str(round(frame.length_of_stay.sum(), 1)) not in str(refused.value)
    with pytest.raises(cn.PolicyViolation, match=r"release\.max_releases"):
        t.group_by("sex").cost.mean().release()
    with pytest.raises(cn.PolicyViolation, match=r"release\.max_releases"):
        t.preview()
    assert "cost" in list(t[["cost", "age"]].columns)  # the schema is no release: still answered


def test_the_broker_gives_the_key_to_at_most_the_daily_number_of_kernels(
    limited_owner: Owner, simulated_backend: Any
) -> None:
    from confnb.broker.audit import verify_log

    opened = []
    for _ in range(KERNELS_PER_DAY):
        vault = _vault(limited_owner, simulated_backend)
        reply, _ = vault.handle({"op": "open", "source": "admissions"}, [])
        assert reply["ok"], reply
        count, _ = vault.handle(
            {"op": "release", "plan": {"node": "count", "input": {"node": "source", "handle": reply["handle"]}}}, []
        )
        opened.append(count["value"])
    assert opened == [4000] * KERNELS_PER_DAY  # the twins: each kernel of the day reads the data
    late = _vault(limited_owner, simulated_backend)
    reply, _ = late.handle({"op": "open", "source": "admissions"}, [])
    assert reply["ok"] is False and "release.max_kernels_per_day" in reply["error"]["message"]
    assert not late.has_dataset("admissions")
    log = verify_log(limited_owner.store.directory / "audit.sqlite", limited_owner.store.owner_public_key)
    assert log.ok, log.problems
    releases = [e for e in log.entries if e.kind == "release" and e.dataset_id == "admissions"]
    denials = [e for e in log.entries if e.kind == "denial" and e.dataset_id == "admissions"]
    assert [e.detail["released_today"] for e in releases] == list(range(1, KERNELS_PER_DAY + 1))
    assert len(denials) == 1 and denials[0].detail["reason"].startswith("release.max_kernels_per_day: ")


def test_the_audit_log_shows_each_plan_readably(hospital: Any) -> None:
    frame = hospital.frame
    t = hospital.open()
    older = t[t.age > 60]
    mean_cost = older.group_by("sex").cost.mean().release()
    expected = frame[frame.age > 60].groupby("sex").cost.mean()
    assert np.allclose(mean_cost.sort_index().to_numpy(), expected.sort_index().to_numpy())
    # A name chosen to forge the log: a newline, a fake step, a right-to-left override.
    forged = "x\n| agg(nothing) \u202e"
    masked = t.assign(**{forged: t.cost}).agg(s=(forged, "sum")).release()
    assert float(np.asarray(masked).ravel()[0]) == pytest.approx(frame.cost.sum())

    plans = [
        e["fields"]["plan"] for e in hospital.vault.audit.entries() if e["event"] == "release" and "plan" in e["fields"]
    ]
    assert "admissions | filter(age > 60) | group_by(sex) | agg(cost = mean(cost))" in plans, plans
    quoted = '"x\\n| agg(nothing) \\u202e"'
    forged_plans = [plan for plan in plans if quoted in plan]
    assert forged_plans and all("\n" not in plan and "\u202e" not in plan for plan in plans)
    assert forged_plans[0] == f"admissions | assign({quoted} = cost) | agg(s = sum({quoted}))", forged_plans
