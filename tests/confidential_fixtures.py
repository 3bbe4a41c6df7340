"""A confidential world for the red-team and end-to-end suites: two data owners, their brokers, a real kernel.

Two owners each encrypt a dataset with their own tooling (``encrypt_dataset``), sign an output policy and an
attestation policy that accepts the session's simulated TEE running this code, and serve the keys from their own
broker on loopback (``serve_locally``). A ``confnb-snp`` kernel is started as JupyterLab starts it, with the
clinic's broker as its default (``CONFNB_BROKER_URL``) and both dataset folders on its dataset path: its vault
obtains keys by attesting, exactly as in production.

The clinic's ``patients`` table hides one record full of canaries (an id, a zip code, a diagnosis and a cost that
appear nowhere else). Tests run hostile analyst code in the kernel and then search every message the client
received for those canaries, in every textual and binary form a value could take on the way out, and for the
dataset keys themselves. The plaintext frames stay here, in the test process, so released values can be checked
against pandas.

Registered as a plugin from ``tests/conftest.py``; test modules import its helpers as ``confidential_fixtures``.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import os
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import pandas as pd

# -- the canaries -------------------------------------------------------------------------------------------------

CANARY_PATIENT_ID = 987654321
CANARY_ZIP = "CANARY-ZIP-5F3A"
CANARY_DIAGNOSIS = "CANARY-DIAG-91"
CANARY_COST = 7777777.77
CANARY_ROW = 1234  # where the canary record sits in the patients table

# How analyst code names the canaries an attacker targeting a known person already has (the id and the zip code)
# without their literal text appearing in the cell, which the kernel echoes back in ``execute_input``: the search
# then proves that nothing *from the data* carried a canary out. The diagnosis and the cost stay secret: no cell
# ever holds them, so finding them anywhere (a message, the executor's memory) means they came out of the vault.
KNOWN_CANARIES_PRELUDE = "PID = 987654320 + 1\nZIP = '-'.join(['CANARY', 'ZIP', '5F' + '3A'])\n"

CLINIC_POLICY = """
[policy]
id = "clinic-patients-v1"
[release]
allow = ["schema", "row_count", "aggregate", "model_metrics", "model_parameters"]
min_group_size = 10
never_release = ["patient_id"]
max_rows = 1000
[display]
mime = ["text/plain", "text/html", "text/markdown", "image/png"]
max_output_bytes = 4000000
tracebacks = "full"
"""
# Tracebacks "full" on purpose: the gate then lets every error message and traceback through unchanged, so the
# suites test what the vault and the analyst API put in them, not the gate's redaction.

INSURER_POLICY = """
[policy]
id = "insurer-claims-v1"
[release]
allow = ["schema", "row_count", "aggregate", "model_metrics"]
min_group_size = 25
never_release = ["claim_id"]
max_rows = 20
[display]
mime = ["text/plain", "text/html", "text/markdown", "image/png"]
max_output_bytes = 4000000
tracebacks = "full"
"""

PATIENT_ROWS = 2000
COMMON_ZIPS = [f"Z-{10001 + i}" for i in range(20)]
RARE_ZIPS = [f"Z-{20001 + i}" for i in range(5)]  # 3 patients each: cells below min_group_size
RARE_DIAGNOSIS = "R99"  # exactly 6 patients, both outcomes: a training set below min_group_size
PROVIDERS = [f"P-{i:02d}" for i in range(30)]  # 30 groups of >= 25 claims: more than the insurer's max_rows 20
PLATINUM_PATIENTS = 15  # joined groups of 15: enough for the clinic (10), too few for the insurer (25)
CANARY_CLAIMS = 40  # one patient with 40 claims: a join repeats the canary record 40 times


def patients_frame() -> pd.DataFrame:
    """2,000 synthetic patients; row ``CANARY_ROW`` is the canary record, unique in every column."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(20260517)
    n = PATIENT_ROWS
    age = rng.integers(18, 91, n)
    zips = np.array([COMMON_ZIPS[i % len(COMMON_ZIPS)] for i in range(n)], dtype=object)
    rng.shuffle(zips)
    rare_rows = rng.choice(np.setdiff1d(np.arange(n), [CANARY_ROW]), 3 * len(RARE_ZIPS) + 6, replace=False)
    for i, zip_code in enumerate(RARE_ZIPS):
        zips[rare_rows[3 * i : 3 * i + 3]] = zip_code
    diagnosis = rng.choice(["J45", "E11", "I10", "M54", "F32"], n).astype(object)
    rare_diagnosis = rare_rows[3 * len(RARE_ZIPS) :]
    diagnosis[rare_diagnosis] = RARE_DIAGNOSIS
    cost = np.round(rng.gamma(2.0, 900.0, n) + age * 5.0, 2)
    logit = (age - 55) / 12 + (cost - 2500) / 3000 + rng.normal(0, 1, n)
    readmitted = (logit > 0).astype(np.int64)
    readmitted[rare_diagnosis] = [0, 1, 0, 1, 0, 1]
    frame = pd.DataFrame(
        {
            "patient_id": np.arange(100_000, 100_000 + n, dtype=np.int64),
            "age": age.astype(np.int64),
            "sex": rng.choice(["F", "M"], n),
            "zip": zips.astype(str),
            "diagnosis": diagnosis.astype(str),
            "cost": cost,
            "readmitted": readmitted,
        }
    )
    frame.loc[CANARY_ROW, ["patient_id", "zip", "diagnosis", "cost", "readmitted"]] = [
        CANARY_PATIENT_ID,
        CANARY_ZIP,
        CANARY_DIAGNOSIS,
        CANARY_COST,
        1,
    ]
    return frame


def claims_frame(patients: pd.DataFrame) -> pd.DataFrame:
    """The insurer's claims: one claim for 1,500 patients, 40 for the canary patient; 15 platinum members."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(77)
    members = [int(pid) for pid in patients["patient_id"].iloc[:1500] if pid != CANARY_PATIENT_ID][:1499]
    patient_ids = members + [CANARY_PATIENT_ID] * CANARY_CLAIMS
    n = len(patient_ids)
    tier = np.array(["gold", "silver", "bronze"] * (n // 3 + 1), dtype=object)[:n]
    tier[: len(members)][rng.permutation(len(members))[:PLATINUM_PATIENTS]] = "platinum"
    tier[len(members) :] = "gold"
    return pd.DataFrame(
        {
            "claim_id": np.arange(5_000_000, 5_000_000 + n, dtype=np.int64),
            "patient_id": np.array(patient_ids, dtype=np.int64),
            "provider": [PROVIDERS[i % len(PROVIDERS)] for i in range(n)],
            "tier": tier.astype(str),
            "amount": np.round(rng.gamma(2.0, 300.0, n), 2),
        }
    )


# -- owners, brokers, datasets --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    """One data owner: their store (keys, audit log), their broker's URL and the datasets they encrypted."""

    name: str
    store: Any  # confnb.broker.store.OwnerStore
    broker_url: str
    datasets: dict[str, Path]

    @property
    def audit_path(self) -> Path:
        return Path(self.store.directory) / "audit.sqlite"


@dataclass(frozen=True)
class ConfidentialWorld:
    """Everything a confidential kernel needs from outside the VM, plus the plaintext the tests compare with."""

    root: Path
    clinic: Owner
    insurer: Owner
    frames: dict[str, pd.DataFrame]
    dataset_keys: dict[str, bytes] = field(repr=False)

    @property
    def dataset_path(self) -> str:
        folders = {str(path.parent) for owner in (self.clinic, self.insurer) for path in owner.datasets.values()}
        return os.pathsep.join(sorted(folders))

    def kernel_env(self) -> dict[str, str]:
        """The environment a kernel starts with: the clinic's broker by default, both owners' dataset folders."""
        return {
            **os.environ,
            "CONFNB_BROKER_URL": self.clinic.broker_url,
            "CONFNB_DATASET_PATH": self.dataset_path,
        }

    def owner_of(self, dataset_id: str) -> Owner:
        return self.clinic if dataset_id in self.clinic.datasets else self.insurer


def _attestation_policy() -> str:
    from kernel_enclave.measurement import simulated_measurement

    measurement = simulated_measurement().hex()
    from kernel_enclave.tee.simulated import SimulatedBackend

    root = SimulatedBackend().ark_sha256()  # this session's chip only: a chip made by the analyst's code is refused
    return (
        f'[attestation]\nallow_simulated = true\nsimulated_roots = ["{root}"]\n'
        f'measurements = ["{measurement}"]\nmax_evidence_age_s = 300\n'
    )


@contextlib.contextmanager
def build_world(root: Path) -> Iterator[ConfidentialWorld]:
    """Two owners encrypt their datasets and serve the keys from their own brokers for as long as the block runs.

    The owners' stores (their keys and audit logs) stay under ``root``, readable by the test's user only. The
    encrypted datasets go to a world-readable folder, as on a real VM where anyone may read ciphertext: an attack
    that obtains a dataset key then also gets the plaintext, so it shows up as leaked canaries, not as a
    permission error that hides it.
    """
    from confnb.broker.local import serve_locally
    from confnb.broker.store import OwnerStore
    from confnb.datasets.owner import encrypt_dataset
    from confnb.policy.output import OutputPolicy

    attestation = _attestation_policy()
    patients = patients_frame()
    claims = claims_frame(patients)
    clinic_store = OwnerStore.create(root / "clinic-owner")
    insurer_store = OwnerStore.create(root / "insurer-owner")
    data = Path(tempfile.mkdtemp(prefix="confnb-ciphertext-"))
    try:
        data.chmod(0o755)
        clinic_dir = data / "clinic" / "patients"
        insurer_dir = data / "insurer" / "claims"
        encrypt_dataset(
            patients, clinic_dir, clinic_store, "patients", OutputPolicy.from_toml(CLINIC_POLICY), attestation
        )
        encrypt_dataset(
            claims, insurer_dir, insurer_store, "claims", OutputPolicy.from_toml(INSURER_POLICY), attestation
        )
        keys = {"patients": clinic_store.dataset_key("patients"), "claims": insurer_store.dataset_key("claims")}
        with serve_locally(clinic_store) as clinic_url, serve_locally(insurer_store) as insurer_url:
            yield ConfidentialWorld(
                root=root,
                clinic=Owner("clinic", clinic_store, clinic_url, {"patients": clinic_dir}),
                insurer=Owner("insurer", insurer_store, insurer_url, {"claims": insurer_dir}),
                frames={"patients": patients, "claims": claims},
                dataset_keys=keys,
            )
    finally:
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="session")
def confidential_world(
    tmp_path_factory: pytest.TempPathFactory, simulated_tee_dir: Path
) -> Iterator[ConfidentialWorld]:
    """The session's two owners and their brokers (shared: tests only read from them)."""
    with build_world(tmp_path_factory.mktemp("confidential-world")) as world:
        yield world


# -- kernels ----------------------------------------------------------------------------------------------------


def _relay_helpers() -> Any:
    """The relay suites' ``Kernel`` helper (start by kernelspec name, record every message the client receives)."""
    name = "confnb_tests_relay_kernel"
    if name not in sys.modules:
        path = Path(__file__).parent / "kernel_enclave" / "relay" / "conftest.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def start_confidential_kernel(world: ConfidentialWorld) -> Any:
    """A ``confnb-snp`` kernel whose vault reaches the world's brokers and datasets."""
    return _relay_helpers().start_kernel(env=world.kernel_env())


def stop_confidential_kernel(kernel: Any) -> None:
    _relay_helpers().stop_kernel(kernel)


@pytest.fixture(scope="module")
def confidential_kernel(confnb_kernel_env: Path, confidential_world: ConfidentialWorld) -> Iterator[Any]:
    """One kernel per module, with the known canaries defined (as computed values) in its namespace."""
    kernel = start_confidential_kernel(confidential_world)
    try:
        reply, _ = kernel.execute(KNOWN_CANARIES_PRELUDE)
        assert reply["content"]["status"] == "ok", reply["content"]
        yield kernel
    finally:
        stop_confidential_kernel(kernel)


def drain(kernel: Any, seconds: float = 0.5) -> None:
    """Take every message still queued on the client's channels into ``kernel.seen``."""
    import queue

    for get in (kernel.client.get_iopub_msg, kernel.client.get_shell_msg, kernel.client.get_control_msg):
        while True:
            try:
                kernel.seen.append(get(timeout=seconds))
            except queue.Empty:
                break


def received(kernel: Any) -> str:
    """Every message the client received, as text, with binary buffers included (Latin-1 and hex)."""
    parts = [kernel.everything_received()]
    for message in kernel.seen:
        for buffer in message.get("buffers") or ():
            data = bytes(buffer)
            parts += [data.decode("latin-1"), data.hex()]
    return "\n".join(parts)


# -- canary search ----------------------------------------------------------------------------------------------


def _b64_forms(data: bytes) -> list[str]:
    """The base64 text of ``data`` at each of the three alignments it can have inside a longer encoding."""
    forms = []
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + data).decode()
        # The first group mixes in whatever preceded; the last may be padded or mix in what follows.
        inner = encoded[4 if offset else 0 : len(encoded) - 4]
        if len(inner) >= 8:
            forms.append(inner)
    return forms


def _text_forms(value: str) -> list[str]:
    data = value.encode()
    return [value, value.lower(), data.hex(), data.hex().upper(), *_b64_forms(data)]


def canary_patterns(world: ConfidentialWorld | None = None) -> dict[str, re.Pattern[str]]:
    """Name → regular expression for every form a canary value (or a dataset key) could take in a message.

    Numbers are matched only as whole numbers (no digit on either side), so a released mean of 4.7777777 does not
    count as the cost canary while ``7777777.77``, ``7777778``, ``7.77777777e+06`` and ``987654321.0`` do.
    """
    pid = CANARY_PATIENT_ID
    cost_bytes = struct.pack("<d", CANARY_COST)
    patterns: dict[str, str] = {
        "patient_id": rf"(?<![\d.])(?:{pid}|987,654,321|9\.87654321e\+?0?8)(?!\d)",
        "patient_id hex": rf"(?i)(?:0x)?{pid:x}(?![0-9a-f])|{struct.pack('<q', pid).hex()}|"
        + "|".join(re.escape(form) for form in _b64_forms(struct.pack("<q", pid))),
        "cost": r"(?<![\d.])(?:7777777(?:\.\d*)?|7777778(?:\.0*)?|7,777,777(?:\.\d*)?|7\.7777\d*e\+?0?6)(?![\d])",
        "cost bytes": re.escape(cost_bytes.hex())
        + "|"
        + re.escape(float.hex(CANARY_COST))
        + "|"
        + "|".join(re.escape(form) for form in _b64_forms(cost_bytes)),
        "zip": "|".join(re.escape(form) for form in [*_text_forms(CANARY_ZIP), "ZIP-5F3A", "CANARY-ZIP"]),
        "diagnosis": "|".join(re.escape(form) for form in [*_text_forms(CANARY_DIAGNOSIS), "DIAG-91", "CANARY-DIAG"]),
    }
    if world is not None:
        for dataset, key in world.dataset_keys.items():
            forms = [key.hex(), key.hex().upper(), base64.b64encode(key).decode()[:40], *_b64_forms(key)]
            patterns[f"{dataset} dataset key"] = "|".join(re.escape(form) for form in forms)
    return {name: re.compile(pattern) for name, pattern in patterns.items()}


def find_canaries(text: str, world: ConfidentialWorld | None = None) -> dict[str, str]:
    """The canaries found in ``text``: name → up to 80 characters around the first hit."""
    found = {}
    for name, pattern in canary_patterns(world).items():
        match = pattern.search(text)
        if match:
            found[name] = text[max(0, match.start() - 40) : match.end() + 40]
    return found


def assert_no_canary(kernel: Any, world: ConfidentialWorld | None = None) -> None:
    """No canary and no dataset key in anything the client has received from this kernel so far."""
    drain(kernel, 0.05)
    found = find_canaries(received(kernel), world)
    assert not found, f"canaries reached the client: {json.dumps(found)}"
