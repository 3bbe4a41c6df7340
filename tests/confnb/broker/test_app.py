"""The broker as kernels meet it: a real uvicorn server on loopback, real HTTP, the simulated TEE."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from confnb import hpke
from confnb.attest import Verifier
from confnb.broker.audit import verify_log
from confnb.broker.limits import BrokerLimits
from confnb.broker.local import serve_locally
from confnb.broker.store import OwnerStore
from confnb.policy.output import OutputPolicy
from kernel_enclave.attestation import issue_evidence
from kernel_enclave.measurement import simulated_measurement

OUTPUT_POLICY = OutputPolicy.from_toml(
    '[policy]\nid = "claims-v1"\n[release]\nallow = ["aggregate"]\nmin_group_size = 10\n'
)


@dataclass
class Broker:
    url: str
    store: OwnerStore

    def post(self, path: str, body: object) -> tuple[int, dict]:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            with error:  # it holds the connection's socket
                return error.code, json.loads(error.read())

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())


@pytest.fixture
def broker(tmp_path) -> Iterator[Broker]:
    store = OwnerStore.create(tmp_path / "owner")
    attestation = f'[attestation]\nallow_simulated = true\nmeasurements = ["{simulated_measurement().hex()}"]\n'
    store.register_dataset("claims", OUTPUT_POLICY, attestation)
    with serve_locally(store, Verifier()) as url:
        yield Broker(url, store)


def _evidence(backend, nonce: str, hpke_key: ec.EllipticCurvePrivateKey) -> dict:
    return issue_evidence(
        backend,
        bytes.fromhex(nonce),
        hpke_public_key=hpke_key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint),
        signing_public_key=ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw),
        curve_public_key="rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7",
    ).to_dict()


def test_challenge_then_release_over_http(broker, simulated_backend):
    hpke_key = ec.generate_private_key(ec.SECP256R1())
    status, challenge = broker.post("/v1/challenge", {})
    assert status == 200 and len(challenge["nonce"]) == 64
    status, grant = broker.post(
        "/v1/datasets/claims/key-release", {"evidence": _evidence(simulated_backend, challenge["nonce"], hpke_key)}
    )
    assert status == 200, grant
    key = hpke.open_sealed(hpke_key, base64.b64decode(grant["sealed_key"]), grant["hpke_info"].encode())
    assert key == broker.store.dataset_key("claims")
    owner = broker.store.owner_public_key
    owner.verify(
        base64.b64decode(grant["output_policy_signature"]),
        json.dumps(grant["output_policy"], sort_keys=True, separators=(",", ":")).encode(),
    )
    assert grant["output_policy"] == OUTPUT_POLICY.to_dict()


def test_denials_are_403_with_reasons_and_audited(broker, simulated_backend):
    hpke_key = ec.generate_private_key(ec.SECP256R1())
    _, challenge = broker.post("/v1/challenge", {})
    evidence = _evidence(simulated_backend, challenge["nonce"], hpke_key)
    assert broker.post("/v1/datasets/claims/key-release", {"evidence": evidence})[0] == 200
    status, denial = broker.post("/v1/datasets/claims/key-release", {"evidence": evidence})
    assert status == 403 and "already used" in denial["reason"] and denial["released"] is False
    status, missing = broker.post("/v1/datasets/nope/key-release", {"evidence": evidence})
    assert status == 404 and missing["reason"] == "no such dataset"
    status, malformed = broker.post("/v1/datasets/claims/key-release", {"evidence": {"format": "x"}})
    assert status == 400 and malformed["reason"].startswith("request: evidence.tee: Field required")
    assert malformed["dataset_id"] == "claims" and malformed["released"] is False
    verification = verify_log(broker.store.directory / "audit.sqlite", broker.store.owner_public_key)
    assert verification.ok, verification.problems
    kinds = [entry.kind for entry in verification.entries]
    assert kinds.count("release") == 1 and kinds.count("denial") == 3 and kinds.count("challenge") == 1


def test_openapi_document_is_published(broker):
    document = broker.get("/openapi.json")
    assert "/v1/challenge" in document["paths"]
    assert "/v1/datasets/{dataset_id}/key-release" in document["paths"]


def test_owner_info_lists_dataset_ids_only_when_the_owner_publishes_them(broker, tmp_path):
    owner = broker.get("/v1/owner")
    assert owner["datasets"] is None and "claims" not in json.dumps(owner)
    assert owner["public_key"].startswith("-----BEGIN PUBLIC KEY-----")
    with serve_locally(broker.store, Verifier(), BrokerLimits(publish_dataset_ids=True)) as url:
        assert Broker(url, broker.store).get("/v1/owner")["datasets"] == ["claims"]


def test_hostile_text_in_a_request_is_audited_not_a_500(broker):
    status, denial = broker.post(
        "/v1/datasets/claims/key-release", {"evidence": {"format": "\ud800", "tee": "simulated"}}
    )
    assert status == 400 and denial["reason"].startswith("request: ")
    assert verify_log(broker.store.directory / "audit.sqlite", broker.store.owner_public_key).ok


def test_an_attested_kernel_reads_an_encrypted_dataset(broker, simulated_backend, tmp_path):
    """The whole chain: owner encrypts, kernel attests over HTTP, opens the sealed key, reads the verified data."""
    import pyarrow as pa

    from confnb.datasets.manifest import verify_dataset
    from confnb.datasets.owner import encrypt_dataset
    from confnb.datasets.reader import read_verified

    table = pa.table({"ward": ["a", "b"] * 50, "cost": [float(i) for i in range(100)]})
    attestation = f'[attestation]\nallow_simulated = true\nmeasurements = ["{simulated_measurement().hex()}"]\n'
    encrypt_dataset(table, tmp_path / "wards", broker.store, "wards", OUTPUT_POLICY, attestation)

    hpke_key = ec.generate_private_key(ec.SECP256R1())
    _, challenge = broker.post("/v1/challenge", {})
    status, grant = broker.post(
        "/v1/datasets/wards/key-release", {"evidence": _evidence(simulated_backend, challenge["nonce"], hpke_key)}
    )
    assert status == 200, grant
    key = hpke.open_sealed(hpke_key, base64.b64decode(grant["sealed_key"]), grant["hpke_info"].encode())
    verified = verify_dataset(tmp_path / "wards", broker.store.owner_public_key, dataset_id="wards")
    assert verified.manifest.key_id == grant["key_id"]
    assert read_verified(verified, key).equals(table)


def test_an_unusable_default_policy_denies_instead_of_failing(broker, simulated_backend):
    from confnb.policy.output import OutputPolicy as Policy

    broker.store.register_dataset("nopolicy", Policy.from_toml('[policy]\nid = "x"\n'))
    (broker.store.directory / "attestation.toml").write_text("[attestation]\nmax_vmpl = 9\n")
    _, challenge = broker.post("/v1/challenge", {})
    evidence = _evidence(simulated_backend, challenge["nonce"], ec.generate_private_key(ec.SECP256R1()))
    status, denial = broker.post("/v1/datasets/nopolicy/key-release", {"evidence": evidence})
    assert status == 403 and "attestation policy is unusable" in denial["reason"] and "max_vmpl" in denial["reason"]
    (broker.store.directory / "attestation.toml").unlink()


def _post_from(url: str, source: str, path: str) -> tuple[int, dict, dict]:
    import http.client
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30, source_address=(source, 0))
    try:
        connection.request("POST", path, body=b"{}", headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read()), {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()


def test_one_address_cannot_hold_every_challenge(tmp_path, simulated_backend):
    """The probe held all 10,000 challenges from one client and locked every kernel out; now the cap is per address
    as well as global, and a kernel at another address still gets its challenge and its key."""
    store = OwnerStore.create(tmp_path / "owner")
    attestation = f'[attestation]\nallow_simulated = true\nmeasurements = ["{simulated_measurement().hex()}"]\n'
    store.register_dataset("claims", OUTPUT_POLICY, attestation)
    limits = BrokerLimits(max_challenges_per_client=5, max_challenges=8)
    with serve_locally(store, Verifier(), limits) as url:
        flood = [_post_from(url, "127.0.0.2", "/v1/challenge") for _ in range(12)]
        assert [status for status, _, _ in flood] == [200] * 5 + [429] * 7
        status, refusal, headers = flood[-1]
        assert "for 127.0.0.2, the most one client may hold" in refusal["reason"] and headers["retry-after"] == "30"
        kernel = Broker(url, store)
        hpke_key = ec.generate_private_key(ec.SECP256R1())
        status, challenge = kernel.post("/v1/challenge", {})
        assert status == 200
        status, grant = kernel.post(
            "/v1/datasets/claims/key-release", {"evidence": _evidence(simulated_backend, challenge["nonce"], hpke_key)}
        )
        assert status == 200, grant
        # The global cap still holds: three more addresses take the last three, the fourth is refused.
        assert [_post_from(url, f"127.0.0.{3 + i}", "/v1/challenge")[0] for i in range(4)] == [200, 200, 200, 429]
    verification = verify_log(store.directory / "audit.sqlite", store.owner_public_key)
    assert verification.ok, verification.problems
    tallies: Counter[str] = Counter()
    for entry in verification.entries:
        if entry.detail.get("refused") == "challenge":  # one entry per address per interval
            tallies[entry.actor] += entry.detail["count"]
    assert tallies == {"127.0.0.2": 7, "127.0.0.6": 1}


def _closed_by_peer(sock) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True  # closed while our half request sat unread: the kernel answers with a reset


def test_slow_and_surplus_connections_are_closed_and_a_prompt_client_is_served(broker_store_with_limits):
    import contextlib
    import socket
    import time

    url, port = broker_store_with_limits
    with contextlib.ExitStack() as stack:
        surplus = []
        for _ in range(4):  # the cap is 3 connections per address
            sock = stack.enter_context(
                socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0))
            )
            sock.sendall(b"POST /v1/challenge HTTP/1.1\r\nHost: b")
            surplus.append(sock)
        started = time.monotonic()
        assert _closed_by_peer(surplus[3])  # the fourth: closed at once
        assert time.monotonic() - started < 0.5
        assert [_post_from(url, "127.0.0.1", "/v1/challenge")[0] for _ in range(2)] == [200, 200]  # another address
        assert all(_closed_by_peer(sock) for sock in surplus[:3])  # the first three: at their 1 s deadline
        assert 0.8 < time.monotonic() - started < 5


@pytest.fixture
def broker_store_with_limits(tmp_path) -> Iterator[tuple[str, int]]:
    store = OwnerStore.create(tmp_path / "owner")
    with serve_locally(store, Verifier(), BrokerLimits(max_connections_per_client=3, request_timeout_s=1.0)) as url:
        yield url, int(url.rsplit(":", 1)[1])
