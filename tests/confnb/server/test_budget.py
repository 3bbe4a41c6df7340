"""The lab's budget proxy against a real broker on loopback (uvicorn, real HTTP, charges by a simulated kernel).

Every way the budget can be unavailable must say so for that dataset and never raise: the policy view shows it
and goes on. Each refusal has a twin that shows the real numbers.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jupyter_client.kernelspec import KernelSpec

from confnb.attest import Verifier
from confnb.broker.budget import canonical_json
from confnb.broker.local import serve_locally
from confnb.broker.store import OwnerStore
from confnb.policy.output import OutputPolicy
from confnb.server.budget import (
    BROKER_URL_VARIABLE,
    budget_url,
    configured_broker,
    dp_datasets,
    fetch_budget,
)
from kernel_enclave.attestation import issue_evidence
from kernel_enclave.measurement import simulated_measurement
from kernel_enclave.tee.base import TeeBackend

DP_TABLE = '[privacy]\nmode = "dp"\nepsilon = 1.0\ndelta = 1e-6\nepsilon_per_kernel = 0.5\n'
POLICIES = {"admissions": DP_TABLE, "visits": ""}
ATTESTATION = f'[attestation]\nallow_simulated = true\nmeasurements = ["{simulated_measurement().hex()}"]\n'
PRIVACY = OutputPolicy.from_toml(f'[policy]\nid = "p"\n[release]\nallow = ["aggregate"]\n{DP_TABLE}').to_dict()[
    "privacy"
]


def _post(url: str, body: object) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def _charge(url: str, backend: TeeBackend, dataset: str, epsilon: float) -> None:
    """What a vault does: obtain the dataset's key with attested evidence, then charge with the attested key."""
    signing_key = ed25519.Ed25519PrivateKey.generate()
    public = signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    challenge = _post(url + "/v1/challenge", {})
    evidence = issue_evidence(
        backend,
        bytes.fromhex(challenge["nonce"]),
        hpke_public_key=ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(Encoding.X962, PublicFormat.UncompressedPoint),
        signing_public_key=public,
        curve_public_key="rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7",
    ).to_dict()
    _post(f"{url}/v1/datasets/{dataset}/key-release", {"evidence": evidence})
    request = {
        "dataset_id": dataset,
        "epsilon": epsilon,
        "delta": 0.0,
        "plan_digest": "sha256:" + "ab" * 32,
        "kernel_key": base64.b64encode(public).decode(),
        "nonce": secrets.token_hex(16),
    }
    signature = base64.b64encode(signing_key.sign(canonical_json(request))).decode()
    _post(f"{url}/v1/datasets/{dataset}/budget-charges", {"request": request, "signature": signature})


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    store = OwnerStore.create(tmp_path_factory.mktemp("owner") / "store")
    for name, table in POLICIES.items():
        policy = OutputPolicy.from_toml(f'[policy]\nid = "{name}-v1"\n[release]\nallow = ["aggregate"]\n{table}')
        store.register_dataset(name, policy, ATTESTATION)
    with serve_locally(store, Verifier()) as url:
        yield url


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A listener that accepts connections and never answers: a broker that hangs."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join()
        for connection in held:
            connection.close()
        listener.close()


def _fetch(broker: str, dataset: str, privacy: dict[str, Any] = PRIVACY, timeout: float = 3.0) -> dict[str, Any]:
    return asyncio.run(fetch_budget(broker, dataset, privacy, timeout=timeout))


def test_the_budget_is_what_the_owners_broker_reports(broker: str, simulated_backend: TeeBackend) -> None:
    fresh = _fetch(broker, "admissions")
    assert fresh == {
        "dataset_id": "admissions",
        "status": "ok",
        "broker": broker,
        "epsilon": 1.0,
        "delta": 1e-6,
        "epsilon_spent": 0.0,
        "epsilon_remaining": 1.0,
        "delta_spent": 0.0,
        "delta_remaining": 1e-6,
        "charges": 0,
    }
    _charge(broker, simulated_backend, "admissions", 0.25)
    spent = _fetch(broker + "/", "admissions")  # a trailing slash in the configured URL changes nothing
    assert spent["status"] == "ok"
    assert spent["epsilon_spent"] == pytest.approx(0.25) and spent["epsilon_remaining"] == pytest.approx(0.75)
    assert spent["charges"] == 1


def test_an_answer_about_another_budget_is_not_shown(broker: str) -> None:
    other = {**PRIVACY, "epsilon": 2.0}  # the policy the kernel enforces names another total than the broker keeps
    refused = _fetch(broker, "admissions", other)
    assert (
        refused["status"] == "unavailable" and "epsilon" in refused["reason"] and "another budget" in refused["reason"]
    )
    assert "epsilon_spent" not in refused
    assert _fetch(broker, "admissions")["status"] == "ok"  # the twin: the same broker, the policy's own total


def test_a_broker_that_keeps_no_budget_for_it_is_said_so(broker: str) -> None:
    exact = _fetch(broker, "visits")
    assert exact["status"] == "unavailable" and "keeps no privacy budget" in exact["reason"]
    unknown = _fetch(broker, "nowhere")
    assert unknown["status"] == "unavailable" and unknown["reason"].startswith("the broker answered HTTP 404")
    assert "nowhere" in unknown["reason"]  # the broker's own reason is passed on


def test_a_hanging_broker_costs_the_timeout_and_no_more(broker: str, silent_port: int) -> None:
    started = time.monotonic()
    hung = _fetch(f"http://127.0.0.1:{silent_port}", "admissions", timeout=0.5)
    assert time.monotonic() - started < 3.0
    assert hung == {
        "dataset_id": "admissions",
        "status": "unavailable",
        "broker": f"http://127.0.0.1:{silent_port}",
        "reason": "the broker did not answer within 0.5 s",
    }
    assert _fetch(broker, "admissions", timeout=0.5)["status"] == "ok"


def test_an_unreachable_or_unset_broker_is_said_so() -> None:
    with socket.socket() as probe:  # a port nobody listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    gone = _fetch(f"http://127.0.0.1:{port}", "admissions", timeout=2.0)
    assert gone["status"] == "unavailable" and gone["reason"].startswith("the broker cannot be reached")
    unset = _fetch("", "admissions")
    assert unset["status"] == "unavailable" and BROKER_URL_VARIABLE in unset["reason"] and unset["broker"] is None
    odd = _fetch("file:///etc/passwd", "admissions")
    assert odd["status"] == "unavailable" and "http(s)" in odd["reason"]


def test_the_dataset_id_is_one_path_segment() -> None:
    assert (
        budget_url("https://broker.example/", "a/../b c") == "https://broker.example/v1/datasets/a%2F..%2Fb%20c/budget"
    )
    with pytest.raises(ValueError, match=r"http\(s\)"):
        budget_url("broker.example", "a")


def test_only_dp_datasets_are_asked_about() -> None:
    entries = [
        {"id": "admissions", "policy": {"privacy": PRIVACY}},
        {"id": "exact", "policy": {"privacy": {"mode": "exact"}}},
        {"id": "old", "policy": {}},
        {"policy": {"privacy": PRIVACY}},
        "junk",
    ]
    assert [entry["id"] for entry in dp_datasets(entries)] == ["admissions"]
    assert dp_datasets(None) == []


def test_the_broker_is_the_one_the_kernel_was_started_with(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(BROKER_URL_VARIABLE, "http://server-env:8800")
    monkeypatch.setenv("BROKER_HOST", "spec-host")
    plain = SimpleNamespace(kernel_spec=KernelSpec(resource_dir=str(tmp_path), env={}))
    assert configured_broker(plain) == "http://server-env:8800"  # type: ignore[arg-type]
    spec_env = {BROKER_URL_VARIABLE: "http://${BROKER_HOST}:9000"}
    pinned = SimpleNamespace(kernel_spec=KernelSpec(resource_dir=str(tmp_path), env=spec_env))
    assert configured_broker(pinned) == "http://spec-host:9000"  # type: ignore[arg-type]
    monkeypatch.delenv(BROKER_URL_VARIABLE)
    assert configured_broker(plain) == ""  # type: ignore[arg-type]
