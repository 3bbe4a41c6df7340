"""The owner's differential-privacy budget kept by the broker: charges signed by attested kernels, spent atomically,
acknowledged by the owner's key and audited (a real uvicorn server on loopback, real HTTP, the simulated TEE)."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from confnb.attest import Verifier
from confnb.broker.audit import AuditKind, verify_log
from confnb.broker.budget import canonical_json, privacy_budget, to_units
from confnb.broker.local import serve_locally
from confnb.broker.store import OwnerStore
from confnb.cli import main
from confnb.policy.output import OutputPolicy
from kernel_enclave.attestation import issue_evidence
from kernel_enclave.measurement import simulated_measurement
from kernel_enclave.tee.base import TeeBackend

PLAN = "sha256:" + "ab" * 32


def _policy(ident: str, privacy: str = "") -> OutputPolicy:
    return OutputPolicy.from_toml(f'[policy]\nid = "{ident}"\n[release]\nallow = ["aggregate"]\n{privacy}')


DATASETS = {
    "dp": '[privacy]\nmode = "dp"\nepsilon = 1.0\n',
    "shared": '[privacy]\nmode = "dp"\nepsilon = 1.0\nepsilon_per_kernel = 0.3\n',
    "delta": '[privacy]\nmode = "dp"\nepsilon = 1.0\ndelta = 1e-6\n',
    "exact": "",
}


def post(url: str, body: object) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


@dataclass
class Kernel:
    """One attested kernel: its own signing key, which the broker learns from its evidence at key release."""

    url: str
    backend: TeeBackend
    signing_key: ed25519.Ed25519PrivateKey = field(default_factory=ed25519.Ed25519PrivateKey.generate)

    @property
    def public_key(self) -> str:
        return base64.b64encode(self.signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()

    def obtain(self, dataset: str) -> None:
        hpke_key = ec.generate_private_key(ec.SECP256R1())
        status, challenge = post(self.url + "/v1/challenge", {})
        assert status == 200, challenge
        evidence = issue_evidence(
            self.backend,
            bytes.fromhex(challenge["nonce"]),
            hpke_public_key=hpke_key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint),
            signing_public_key=base64.b64decode(self.public_key),
            curve_public_key="rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7",
        ).to_dict()
        status, grant = post(f"{self.url}/v1/datasets/{dataset}/key-release", {"evidence": evidence})
        assert status == 200, grant

    def request(self, dataset: str, epsilon: float, delta: float = 0.0, nonce: str | None = None) -> dict[str, Any]:
        return {
            "dataset_id": dataset,
            "epsilon": epsilon,
            "delta": delta,
            "plan_digest": PLAN,
            "kernel_key": self.public_key,
            "nonce": nonce or secrets.token_hex(16),
        }

    def sign(self, request: dict[str, Any]) -> dict[str, Any]:
        return {
            "request": request,
            "signature": base64.b64encode(self.signing_key.sign(canonical_json(request))).decode(),
        }

    def charge(self, dataset: str, epsilon: float, delta: float = 0.0) -> tuple[int, dict[str, Any]]:
        return post(
            f"{self.url}/v1/datasets/{dataset}/budget-charges", self.sign(self.request(dataset, epsilon, delta))
        )


@dataclass
class Broker:
    url: str
    store: OwnerStore
    backend: TeeBackend

    def kernel(self, *datasets: str) -> Kernel:
        kernel = Kernel(self.url, self.backend)
        for dataset in datasets:
            kernel.obtain(dataset)
        return kernel

    def budget(self, dataset: str) -> dict[str, Any]:
        status, state = get(f"{self.url}/v1/datasets/{dataset}/budget")
        assert status == 200, state
        return state

    def acknowledged(self, body: dict[str, Any]) -> dict[str, Any]:
        """The acknowledgement, once its owner signature is checked."""
        acknowledgement: dict[str, Any] = body["acknowledgement"]
        self.store.owner_public_key.verify(base64.b64decode(body["signature"]), canonical_json(acknowledgement))
        return acknowledgement


ATTESTATION = f'[attestation]\nallow_simulated = true\nmeasurements = ["{simulated_measurement().hex()}"]\n'


@pytest.fixture
def owner(tmp_path: Path) -> Path:
    store = OwnerStore.create(tmp_path / "owner")
    for name, privacy in DATASETS.items():
        store.register_dataset(name, _policy(f"{name}-v1", privacy), ATTESTATION)
    return tmp_path / "owner"


@pytest.fixture
def broker(owner: Path, simulated_backend: TeeBackend) -> Iterator[Broker]:
    store = OwnerStore.open(owner)
    with serve_locally(store, Verifier()) as url:
        yield Broker(url, store, simulated_backend)


def _refused(status: int, body: dict[str, Any], expected_status: int, prefix: str) -> None:
    assert status == expected_status, body
    assert body["reason"].startswith(prefix), body["reason"]
    assert "\n" not in body["reason"] and "acknowledgement" not in body


def test_ten_charges_of_a_tenth_spend_a_budget_of_one_exactly_and_the_eleventh_is_refused(broker: Broker) -> None:
    kernel = broker.kernel("dp")
    acknowledgements = []
    for _ in range(10):
        status, body = kernel.charge("dp", 0.1)
        assert status == 200, body
        acknowledgements.append(broker.acknowledged(body))
    assert [a["epsilon_spent"] for a in acknowledgements] == [k / 10 for k in range(1, 11)]
    assert acknowledgements[-1]["epsilon_remaining"] == 0.0
    assert all(a["dataset_id"] == "dp" and a["epsilon"] == 0.1 and a["plan_digest"] == PLAN for a in acknowledgements)
    assert len({a["charge_id"] for a in acknowledgements}) == 10

    status, body = kernel.charge("dp", 0.1)
    _refused(status, body, 403, "budget: charging epsilon 0.1 would exceed the dataset's epsilon budget of 1.0")
    assert "spent 1.0, remaining 0.0" in body["reason"]
    status, body = kernel.charge("dp", 1e-12)  # the smallest unit does not fit either
    _refused(status, body, 403, "budget: ")

    state = broker.budget("dp")
    assert state == {
        "dataset_id": "dp",
        "mode": "dp",
        "epsilon": 1.0,
        "delta": 0.0,
        "epsilon_spent": 1.0,
        "epsilon_remaining": 0.0,
        "delta_spent": 0.0,
        "delta_remaining": 0.0,
        "charges": 10,
    }


def test_a_charge_is_rounded_up_to_the_ledger_unit() -> None:
    assert to_units(0.1, up=True) == 10**11
    assert to_units(1e-13, up=True) == 1 and to_units(1e-13, up=False) == 0
    assert to_units(1 / 3, up=True) == 333_333_333_334  # 0.3333333333333333 → never less than the float
    assert privacy_budget({"privacy": {"mode": "dp", "epsilon": 1.0}}) is not None
    assert privacy_budget({"privacy": {"mode": "exact"}}) is None and privacy_budget({}) is None


def test_each_kernel_spends_at_most_epsilon_per_kernel(broker: Broker) -> None:
    first, second = broker.kernel("shared"), broker.kernel("shared")
    for _ in range(3):
        status, body = first.charge("shared", 0.1)
        assert status == 200, body
    status, body = first.charge("shared", 0.1)
    _refused(status, body, 403, "budget: charging epsilon 0.1 would exceed this kernel's epsilon budget")
    assert "epsilon_per_kernel" in body["reason"] and "(spent 0.3, remaining 0.0)" in body["reason"]
    # The twin: another kernel has its own share of the dataset's budget.
    status, body = second.charge("shared", 0.3)
    assert status == 200, body
    assert broker.acknowledged(body)["epsilon_spent"] == 0.6
    assert broker.budget("shared")["epsilon_remaining"] == 0.4


def test_delta_has_its_own_budget(broker: Broker) -> None:
    kernel = broker.kernel("delta", "dp")
    for spent in (4e-7, 8e-7):
        status, body = kernel.charge("delta", 0.01, 4e-7)
        assert status == 200, body
        assert broker.acknowledged(body)["delta_spent"] == spent
    status, body = kernel.charge("delta", 0.01, 4e-7)
    _refused(status, body, 403, "budget: charging delta 4e-07 would exceed the dataset's delta budget of 1e-06")
    status, body = kernel.charge("delta", 0.01, 2e-7)  # what is left still fits
    assert status == 200, body
    assert broker.acknowledged(body)["delta_remaining"] == 0.0
    # A dataset without delta (0) refuses any delta and accepts none.
    status, body = kernel.charge("dp", 0.01, 1e-9)
    _refused(status, body, 403, "budget: charging delta 1e-09 would exceed the dataset's delta budget of 0.0")
    status, body = kernel.charge("dp", 0.01, 0.0)
    assert status == 200, body


def test_concurrent_kernels_never_overspend(broker: Broker) -> None:
    """Two kernels, eight threads, 160 charges of 0.01 against 1.0: exactly 100 are acknowledged, serially."""
    kernels = [broker.kernel("dp"), broker.kernel("dp")]

    def charge(index: int) -> tuple[int, dict[str, Any]]:
        return kernels[index % 2].charge("dp", 0.01)

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(charge, range(160)))
    acknowledged = [broker.acknowledged(body) for status, body in outcomes if status == 200]
    refused = [body for status, body in outcomes if status != 200]
    assert len(acknowledged) == 100 and len(refused) == 60
    assert all(body["reason"].startswith("budget: charging epsilon 0.01 would exceed") for body in refused)
    assert math.fsum(a["epsilon"] for a in acknowledged) == pytest.approx(1.0, abs=1e-12)
    # Each acknowledgement saw the ledger after exactly its own predecessors: the spent totals are 0.01 .. 1.00.
    assert sorted(a["epsilon_spent"] for a in acknowledged) == [k / 100 for k in range(1, 101)]
    state = broker.budget("dp")
    assert state["epsilon_spent"] == 1.0 and state["epsilon_remaining"] == 0.0 and state["charges"] == 100


def test_the_spent_budget_survives_a_broker_restart(owner: Path, simulated_backend: TeeBackend) -> None:
    with serve_locally(OwnerStore.open(owner), Verifier()) as url:
        broker = Broker(url, OwnerStore.open(owner), simulated_backend)
        kernel = broker.kernel("dp")
        for _ in range(7):
            assert kernel.charge("dp", 0.1)[0] == 200
    # A new app on the same owner directory: the same kernel key is still authorised, the spent ε still spent.
    with serve_locally(OwnerStore.open(owner), Verifier()) as url:
        kernel.url = broker.url = url
        assert broker.budget("dp")["epsilon_spent"] == pytest.approx(0.7)
        for _ in range(3):
            assert kernel.charge("dp", 0.1)[0] == 200
        status, body = kernel.charge("dp", 0.1)
        _refused(status, body, 403, "budget: charging epsilon 0.1 would exceed")
        assert broker.budget("dp")["charges"] == 10


def test_a_key_that_never_received_the_dataset_key_is_refused(broker: Broker) -> None:
    stranger = broker.kernel()  # never asked for a key
    other = broker.kernel("delta")  # received another dataset's key
    for kernel in (stranger, other):
        status, body = kernel.charge("dp", 0.1)
        _refused(status, body, 403, "kernel_key: this key never received the dataset's key")
    granted = broker.kernel("dp")
    status, body = granted.charge("dp", 0.1)  # the twin
    assert status == 200, body
    assert broker.store.granted_kernel_keys("dp") == [granted.public_key]
    assert broker.store.granted_kernel_keys("delta") == [other.public_key]


def test_a_bad_signature_is_refused(broker: Broker) -> None:
    kernel, impostor = broker.kernel("dp"), Kernel(broker.url, broker.backend)
    url = f"{broker.url}/v1/datasets/dp/budget-charges"
    signed_by_another = impostor.sign(kernel.request("dp", 0.1))
    _refused(*post(url, signed_by_another), 403, "signature: the request is not signed by its kernel_key")
    tampered = kernel.sign(kernel.request("dp", 0.1))
    tampered["request"]["epsilon"] = 0.01  # signed for 0.1, asks to pay 0.01
    _refused(*post(url, tampered), 403, "signature: ")
    status, body = post(url, kernel.sign(kernel.request("dp", 0.1)))  # the twin
    assert status == 200, body
    assert broker.budget("dp")["epsilon_spent"] == 0.1


def test_a_replayed_nonce_is_refused(broker: Broker) -> None:
    kernel = broker.kernel("dp")
    url = f"{broker.url}/v1/datasets/dp/budget-charges"
    signed = kernel.sign(kernel.request("dp", 0.2))
    status, body = post(url, signed)
    assert status == 200, body
    _refused(*post(url, signed), 403, "nonce: already used by an earlier charge")
    assert broker.budget("dp")["epsilon_spent"] == 0.2


def test_an_exact_mode_dataset_has_no_budget_to_charge(broker: Broker) -> None:
    kernel = broker.kernel("exact", "dp")
    status, body = kernel.charge("exact", 0.1)
    _refused(status, body, 403, "budget: the dataset is not in differential-privacy mode")
    assert kernel.charge("dp", 0.1)[0] == 200  # the twin
    assert broker.budget("exact") == {"dataset_id": "exact", "mode": "exact", "charges": 0}


@pytest.mark.parametrize(
    ("change", "status", "prefix"),
    [
        ({"epsilon": 0.0}, 400, "epsilon: must be finite and greater than 0"),
        ({"epsilon": -0.5}, 400, "epsilon: must be finite and greater than 0"),
        ({"epsilon": math.inf}, 400, "epsilon: must be finite and greater than 0"),
        ({"delta": -1e-9}, 400, "delta: must be finite and at least 0"),
        ({"delta": math.nan}, 400, "delta: must be finite and at least 0"),
        ({"epsilon": "0.1"}, 400, "request: request.epsilon: must be a number"),
        ({"dataset_id": "delta"}, 400, "request: request.dataset_id: names another dataset than the path"),
        ({"kernel_key": "AAAA"}, 400, "request: request.kernel_key: must be base64 of a raw 32-byte Ed25519 key"),
        ({"nonce": "0" * 31}, 400, "request: request.nonce: "),
    ],
)
def test_malformed_amounts_and_fields_are_refused(
    broker: Broker, change: dict[str, Any], status: int, prefix: str
) -> None:
    kernel = broker.kernel("dp")
    request = {**kernel.request("dp", 0.1), **change}
    _refused(*post(f"{broker.url}/v1/datasets/dp/budget-charges", kernel.sign(request)), status, prefix)
    assert broker.budget("dp")["charges"] == 0
    assert kernel.charge("dp", 0.1)[0] == 200  # the twin


def test_an_unknown_dataset_is_404(broker: Broker) -> None:
    kernel = broker.kernel("dp")
    status, body = post(f"{broker.url}/v1/datasets/nowhere/budget-charges", kernel.sign(kernel.request("nowhere", 0.1)))
    _refused(status, body, 404, "dataset: no dataset 'nowhere'")
    status, body = get(f"{broker.url}/v1/datasets/nowhere/budget")
    assert status == 404 and body["reason"].startswith("dataset: ")


def test_the_audit_log_verifies_and_lists_every_charge_and_refusal(broker: Broker) -> None:
    kernel = broker.kernel("shared")
    acknowledged = []
    for _ in range(4):
        status, body = kernel.charge("shared", 0.1)
        if status == 200:
            acknowledged.append(broker.acknowledged(body))
    assert len(acknowledged) == 3
    verification = verify_log(broker.store.directory / "audit.sqlite", broker.store.owner_public_key)
    assert verification.ok, verification.problems
    charges = [e for e in verification.entries if e.detail.get("action") == "budget-charge"]
    assert all(e.kind is AuditKind.CHARGE and e.dataset_id == "shared" for e in charges)
    assert [e.detail["charge_id"] for e in charges] == [a["charge_id"] for a in acknowledged]
    assert [e.detail["nonce"] for e in charges] == [a["nonce"] for a in acknowledged]
    assert [e.detail["epsilon_spent"] for e in charges] == [0.1, 0.2, 0.3]
    fingerprint = "sha256:" + hashlib.sha256(base64.b64decode(kernel.public_key)).hexdigest()
    assert {e.detail["kernel_key"] for e in charges} == {fingerprint}
    refused = [e for e in verification.entries if e.kind is AuditKind.DENIAL and e.detail.get("refused")]
    assert len(refused) == 1 and refused[0].detail["status"] == 403
    assert refused[0].detail["reason"].startswith("budget: charging epsilon 0.1 would exceed this kernel's")


def test_the_owner_sees_spent_and_remaining_per_dataset(broker: Broker, capsys: pytest.CaptureFixture[str]) -> None:
    kernel = broker.kernel("dp", "delta")
    for dataset, epsilon, delta in (("dp", 0.25, 0.0), ("dp", 0.5, 0.0), ("delta", 0.1, 5e-7)):
        assert kernel.charge(dataset, epsilon, delta)[0] == 200
    assert main(["broker", "budget", "--dir", str(broker.store.directory), "--json"]) == 0
    states = {state["dataset_id"]: state for state in json.loads(capsys.readouterr().out)["datasets"]}
    assert states["dp"] == broker.budget("dp") and states["dp"]["epsilon_remaining"] == 0.25
    assert states["delta"]["delta_spent"] == 5e-7 and states["delta"]["charges"] == 1
    assert states["exact"] == {"dataset_id": "exact", "mode": "exact", "charges": 0}
    assert main(["broker", "budget", "--dir", str(broker.store.directory)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "epsilon 0.75 of 1 spent, 0.25 left" in lines["dp"] and "2 charges" in lines["dp"]
    assert "exact mode" in lines["exact"]
