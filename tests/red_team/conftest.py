"""A hospital's admissions behind a real vault, for the exact-mode attacks of a determined analyst.

The data owner encrypts the table (and ``wards``, a second table of theirs with one row per patient, for attacks over
a join of two datasets) with their own tooling and registers it with a real broker on loopback; each test gets a
fresh vault (a fresh kernel: no release remembered, no release counted) that obtains the keys by attesting the
session's simulated TEE, and ``CONFNB_VAULT_SOCKET`` pointing at it, so ``import confnb as cn`` behaves as in a
confidential kernel's executor. The plaintext stays with the test, so that what came back can be checked against
the secret it must not reveal.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from confnb.policy.output import OutputPolicy

ADMISSIONS_POLICY = """
[policy]
id = "admissions-red-team-v1"
[release]
allow = ["schema", "row_count", "aggregate", "model_metrics", "model_parameters", "predict_public"]
min_group_size = 10
never_release = ["patient_id"]
max_rows = 1000
difference_checks = true
"""

ROWS = 4000
TARGET_ID = 101_234
DIAGNOSES = ("asthma", "copd", "diabetes", "fracture", "pneumonia", "sepsis")


def admissions_frame() -> pd.DataFrame:
    """4,000 admissions; every patient has a distinct id and a distinct cost (a column no two records share)."""
    rng = np.random.default_rng(20261206)
    age = rng.integers(18, 95, ROWS)
    stay = np.round(rng.gamma(2.0, 2.5, ROWS) + 0.5, 3)
    cost = np.round(800.0 + stay * 910.0 + age * 12.0 + rng.normal(0, 300, ROWS), 2)
    while (repeated := pd.Series(cost).duplicated().to_numpy()).any():  # no two bills to the cent: a cent more
        cost[repeated] = np.round(cost[repeated] + 0.01, 2)
    return pd.DataFrame(
        {
            "patient_id": np.arange(100_000, 100_000 + ROWS, dtype=np.int64),
            "age": age.astype(np.int64),
            "sex": rng.choice(["F", "M"], ROWS),
            "diagnosis": rng.choice(list(DIAGNOSES), ROWS),
            "length_of_stay": stay,
            "cost": cost,
            "readmitted": rng.random(ROWS) < 0.2,
        }
    )


def wards_frame(admissions: pd.DataFrame) -> pd.DataFrame:
    """The ward of each admitted patient and the deposit they paid: none (0.0) for most, distinct amounts for the
    rest, the target among them. One row per patient, so a join on ``patient_id`` meets each record once."""
    rng = np.random.default_rng(20261208)
    paid = rng.random(len(admissions)) < 0.3
    paid[admissions.patient_id.to_numpy() == TARGET_ID] = True
    amounts = np.round(100.0 + rng.permutation(len(admissions)) * 0.73, 2)  # no two deposits alike
    return pd.DataFrame(
        {
            "patient_id": admissions.patient_id.to_numpy(),
            "ward": rng.choice(["east", "north", "south", "west"], len(admissions)),
            "deposit": np.where(paid, amounts, 0.0),
        }
    )


@dataclass(frozen=True)
class HospitalOwner:
    datasets: Path
    broker_url: str
    frame: pd.DataFrame
    wards: pd.DataFrame  # a second table of the same owner, ``wards``: see wards_frame


@contextlib.contextmanager
def serve_admissions(root: Path, policy_text: str) -> Iterator[HospitalOwner]:
    """The owner's admissions encrypted under ``policy_text`` and served by their broker on loopback."""
    from confnb.broker.local import serve_locally
    from confnb.broker.store import OwnerStore
    from confnb.datasets.owner import encrypt_dataset
    from kernel_enclave.measurement import simulated_measurement

    store = OwnerStore.create(root / "store")
    attestation = f'[attestation]\nallow_simulated = true\nmeasurements = ["{simulated_measurement().hex()}"]\n'
    frame = admissions_frame()
    wards = wards_frame(frame)
    policy = OutputPolicy.from_toml(policy_text)
    encrypt_dataset(frame, root / "datasets" / "admissions", store, "admissions", policy, attestation)
    encrypt_dataset(wards, root / "datasets" / "wards", store, "wards", policy, attestation)
    with serve_locally(store) as url:
        yield HospitalOwner(root / "datasets", url, frame, wards)


@pytest.fixture(scope="session")
def hospital_owner(tmp_path_factory: pytest.TempPathFactory, simulated_tee_dir: Path) -> Iterator[HospitalOwner]:
    with serve_admissions(tmp_path_factory.mktemp("hospital"), ADMISSIONS_POLICY) as owner:
        yield owner


@dataclass(frozen=True)
class Hospital:
    """One fresh kernel's view: the analyst API against a new vault, and the secret the attacks must not reach."""

    frame: pd.DataFrame
    vault: Any
    wards: pd.DataFrame
    policy: str = ADMISSIONS_POLICY
    target_id: int = TARGET_ID

    @property
    def target(self) -> pd.Series:
        return self.frame.loc[self.frame.patient_id == self.target_id].iloc[0]

    def open(self) -> Any:
        import confnb as cn

        return cn.open("admissions")


@pytest.fixture
def hospital(
    hospital_owner: HospitalOwner, simulated_backend: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Hospital]:
    with kernel(hospital_owner, simulated_backend, monkeypatch) as fresh:
        yield fresh


@contextlib.contextmanager
def kernel(owner: HospitalOwner, simulated_backend: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hospital]:
    """A fresh vault serving ``owner``'s admissions, with the analyst API of this process pointed at it."""
    from confnb.analyst.session import current_session
    from kernel_enclave.vault.service import VaultServer
    from kernel_enclave.vault.vault import Vault, VaultKeys

    directory = Path(tempfile.mkdtemp(prefix="cnb-"))  # Unix socket paths are limited to about 100 bytes
    socket_path = directory / "vault.sock"
    vault = Vault(
        backend=simulated_backend,
        keys=VaultKeys.generate(),
        broker_url=owner.broker_url,
        dataset_path=str(owner.datasets),
    )
    server = VaultServer(vault, socket_path)
    server.start()
    monkeypatch.delenv("CONFNB_BROKER_URL", raising=False)
    monkeypatch.setenv("CONFNB_VAULT_SOCKET", str(socket_path))
    try:
        yield Hospital(owner.frame, vault, owner.wards)
    finally:
        current_session().close()
        server.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def recovered() -> Callable[[float | None, float], bool]:
    """Whether an attacker's estimate equals the secret (to the precision the data is stored with)."""

    def same(estimate: float | None, secret: float) -> bool:
        return estimate is not None and bool(np.isfinite(estimate)) and abs(float(estimate) - float(secret)) < 1e-6

    return same


@pytest.fixture(params=["joined", "scanned"])
def routed(request: pytest.FixtureRequest, hospital: Hospital, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The admissions on the other release routes: joined to themselves on the id (a record's rows are added up
    per record), and scanned from disk (the vault given no memory for the dataset)."""
    import confnb as cn

    if request.param == "scanned":
        monkeypatch.setenv("CONFNB_VAULT_MEMORY_BUDGET", "0")
    t = cn.open("admissions")
    if request.param == "scanned":
        assert all(source.streaming for source in hospital.vault._sources.values())
        return t
    return t.join(t.select(["patient_id", "sex"]).rename({"sex": "sex_again"}), on="patient_id")
