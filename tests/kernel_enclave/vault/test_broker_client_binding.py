"""A sealed key is taken only for the request it answers: the HPKE info names the dataset, key id and nonce.

Between the vault and a real broker on loopback sits a relay that passes everything through and remembers the
broker's grants; told to, it answers a key release with an earlier grant instead. Each grant is genuine (sealed to
this kernel's attested key, with the owner's signed policy), so only the vault's check of the HPKE info tells a
replayed grant (an old nonce: an old policy could be rolled back this way) or another dataset's grant from the
answer to this request.
"""

from __future__ import annotations

import http.server
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from confnb.attest import Verifier
from confnb.broker.local import serve_locally
from confnb.broker.store import OwnerStore
from confnb.policy.output import OutputPolicy
from kernel_enclave.measurement import simulated_measurement
from kernel_enclave.tee.simulated import SimulatedBackend
from kernel_enclave.vault.broker_client import BrokerClient, KeyReleaseError

CURVE = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
POLICIES = {
    "claims": OutputPolicy.from_toml('[policy]\nid = "claims-v1"\n[release]\nallow = ["aggregate"]\n'),
    "payroll": OutputPolicy.from_toml('[policy]\nid = "payroll-v1"\n[release]\nallow = ["row_count"]\n'),
}


@dataclass
class ReplayingRelay:
    """Loopback HTTP relay to the broker that keeps every grant and can answer with a kept one."""

    broker_url: str
    grants: dict[str, bytes] = field(default_factory=dict)  # dataset id -> the broker's last grant body
    substitute: str | None = None  # answer every key release with this dataset's kept grant
    url: str = ""

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        relay = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                dataset = self.path.split("/")[3] if self.path.endswith("/key-release") else None
                if dataset is not None and relay.substitute is not None:
                    status, answer = 200, relay.grants[relay.substitute]
                else:
                    request = urllib.request.Request(
                        relay.broker_url + self.path,
                        data=body,
                        method="POST",
                        headers={"Content-Type": "application/json"},
                    )
                    try:
                        with urllib.request.urlopen(request, timeout=30) as response:
                            status, answer = response.status, response.read()
                    except urllib.error.HTTPError as error:
                        with error:  # it holds the connection's socket
                            status, answer = error.code, error.read()
                    if dataset is not None and status == 200:
                        relay.grants[dataset] = answer
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                return

        return Handler


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OwnerStore, str]]:
    store = OwnerStore.create(tmp_path_factory.mktemp("broker") / "owner")
    attestation = f'[attestation]\nallow_simulated = true\nmeasurements = ["{simulated_measurement().hex()}"]\n'
    for dataset, policy in POLICIES.items():
        store.register_dataset(dataset, policy, attestation)
    with serve_locally(store, Verifier()) as url:
        yield store, url


@pytest.fixture
def relay(owner: tuple[OwnerStore, str]) -> Iterator[ReplayingRelay]:
    keeper = ReplayingRelay(owner[1])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), keeper.handler())
    keeper.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield keeper
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def client(relay: ReplayingRelay, simulated_backend: SimulatedBackend) -> BrokerClient:
    """One kernel: the same attested HPKE key for every release, so every kept grant opens with it."""
    signing = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    return BrokerClient(simulated_backend, ec.generate_private_key(ec.SECP256R1()), signing, CURVE, url=relay.url)


def test_a_replayed_grant_of_an_earlier_request_is_refused(
    owner: tuple[OwnerStore, str], relay: ReplayingRelay, client: BrokerClient
) -> None:
    store, _ = owner
    owner_key = store.owner_public_key.public_bytes_raw()
    first = client.release("claims", owner_key)  # the legitimate twin: through the relay, untouched
    assert first.key == store.dataset_key("claims")
    relay.substitute = "claims"
    with pytest.raises(KeyReleaseError, match="the sealed key was made for another dataset or request"):
        client.release("claims", owner_key)


def test_another_datasets_grant_is_refused(
    owner: tuple[OwnerStore, str], relay: ReplayingRelay, client: BrokerClient
) -> None:
    store, _ = owner
    owner_key = store.owner_public_key.public_bytes_raw()
    payroll = client.release("payroll", owner_key)
    assert payroll.key == store.dataset_key("payroll")
    assert payroll.key != store.dataset_key("claims")
    relay.substitute = "payroll"
    with pytest.raises(KeyReleaseError, match="the sealed key was made for another dataset or request"):
        client.release("claims", owner_key)
