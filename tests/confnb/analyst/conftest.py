"""A real vault for the analyst API: encrypted datasets, the owner's broker on loopback, the vault's Unix socket.

The datasets are encrypted with the data owner's own tooling and registered with a real broker; the vault obtains
their keys by attesting the session's simulated TEE, exactly as in a kernel. Each test gets a fresh vault (its own
socket, audit log and handles) and ``CONFNB_VAULT_SOCKET`` pointing at it, so ``import confnb as cn`` behaves as
inside a confidential kernel. The plaintext stays available to the tests so released values can be checked
against pandas on the same data.
"""

from __future__ import annotations

import os
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

CLAIMS_POLICY = """
[policy]
id = "claims-test-v1"
[release]
allow = ["schema", "row_count", "aggregate", "model_metrics", "model_parameters", "predict_public", "window"]
min_group_size = 10
never_release = ["patient_id"]
max_rows = 1000
"""
MEMBERS_POLICY = """
[policy]
id = "members-test-v1"
[release]
allow = ["schema", "aggregate"]
min_group_size = 5
"""
LOCKED_POLICY = """
[policy]
id = "locked-test-v1"
[release]
allow = ["schema"]
"""


def claims_frame() -> pd.DataFrame:
    """Synthetic claims: two large regions and one of 6 people (below min_group_size 10), some missing costs."""
    rng = np.random.default_rng(20260101)
    n = 240
    age = rng.integers(18, 90, n)
    region = np.array(["north"] * 117 + ["south"] * 117 + ["island"] * 6, dtype=object)
    rng.shuffle(region)
    cost = np.round(rng.gamma(2.0, 400.0, n) + age * 3.0, 2)
    cost[rng.choice(n, 12, replace=False)] = np.nan
    logit = (age - 55) / 10 + rng.normal(0, 1, n)
    return pd.DataFrame(
        {
            "patient_id": np.arange(1000, 1000 + n),
            "age": age,
            "sex": rng.choice(["F", "M"], n),
            "region": region.astype(str),
            "cost": cost,
            "visit": pd.Timestamp("2025-01-01") + pd.to_timedelta(rng.integers(0, 365 * 24, n), unit="h"),
            "readmitted": (logit > 0).astype(np.int64),
        }
    )


def members_frame() -> pd.DataFrame:
    rng = np.random.default_rng(7)
    ids = np.arange(1000, 1150)
    return pd.DataFrame({"patient_id": ids, "plan": rng.choice(["gold", "basic"], len(ids))})


def locked_frame() -> pd.DataFrame:
    return pd.DataFrame({"x": np.arange(50)})


@dataclass(frozen=True)
class Owner:
    """The data owner's side: encrypted dataset directories, the broker serving their keys, the plaintext."""

    datasets: Path
    broker_url: str
    frames: dict[str, pd.DataFrame]


@pytest.fixture(scope="session")
def owner(tmp_path_factory: pytest.TempPathFactory, simulated_tee_dir: Path) -> Iterator[Owner]:
    from confnb.broker.local import serve_locally
    from confnb.broker.store import OwnerStore
    from confnb.datasets.owner import encrypt_dataset
    from kernel_enclave.measurement import simulated_measurement

    root = tmp_path_factory.mktemp("owner")
    store = OwnerStore.create(root / "store")
    attestation = f'[attestation]\nallow_simulated = true\nmeasurements = ["{simulated_measurement().hex()}"]\n'
    frames = {"claims": claims_frame(), "members": members_frame(), "locked": locked_frame()}
    policies = {"claims": CLAIMS_POLICY, "members": MEMBERS_POLICY, "locked": LOCKED_POLICY}
    for name, frame in frames.items():
        policy = OutputPolicy.from_toml(policies[name])
        encrypt_dataset(frame, root / "datasets" / name, store, name, policy, attestation)
    with serve_locally(store) as url:
        yield Owner(root / "datasets", url, frames)


@dataclass(frozen=True)
class RunningVault:
    vault: Any
    socket_path: Path
    owner: Owner


@pytest.fixture
def start_vault(
    owner: Owner, simulated_backend: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., RunningVault]]:
    """Start a vault (a kernel's data plane) and point ``CONFNB_VAULT_SOCKET`` at it; a later call is a later kernel."""
    from confnb.analyst.session import current_session
    from kernel_enclave.vault.service import VaultServer
    from kernel_enclave.vault.vault import Vault, VaultKeys

    started: list[tuple[Any, Path]] = []

    def start(backend: Any = None) -> RunningVault:
        directory = Path(tempfile.mkdtemp(prefix="cnb-"))  # Unix socket paths are limited to about 100 bytes
        socket_path = directory / "vault.sock"
        vault = Vault(
            backend=backend or simulated_backend,
            keys=VaultKeys.generate(),
            broker_url=owner.broker_url,
            dataset_path=str(owner.datasets),
        )
        server = VaultServer(vault, socket_path)
        server.start()
        started.append((server, directory))
        monkeypatch.setenv("CONFNB_VAULT_SOCKET", str(socket_path))
        return RunningVault(vault, socket_path, owner)

    monkeypatch.delenv("CONFNB_BROKER_URL", raising=False)
    try:
        yield start
    finally:
        if "CONFNB_VAULT_SOCKET" in os.environ:
            current_session().close()
        for server, directory in started:
            server.close()
            shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def vault(start_vault: Callable[..., RunningVault]) -> RunningVault:
    """A fresh vault serving on a short socket path, with ``CONFNB_VAULT_SOCKET`` set as in a kernel's executor."""
    return start_vault()
