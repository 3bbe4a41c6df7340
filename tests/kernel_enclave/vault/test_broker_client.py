"""The vault's side of a key release, against a real broker on loopback."""

from __future__ import annotations

import socket

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from confnb.attest import Verifier
from confnb.broker.local import serve_locally
from confnb.broker.store import OwnerStore
from confnb.policy.output import OutputPolicy
from kernel_enclave.measurement import simulated_measurement
from kernel_enclave.vault.broker_client import BROKER_URL_VARIABLE, BrokerClient, KeyReleaseError, broker_url

CURVE = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
POLICY = OutputPolicy.from_toml('[policy]\nid = "claims-v1"\n[release]\nallow = ["aggregate"]\n')


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    store = OwnerStore.create(tmp_path_factory.mktemp("broker") / "owner")
    store.register_dataset(
        "claims", POLICY, f'[attestation]\nallow_simulated = true\nmeasurements = ["{simulated_measurement().hex()}"]\n'
    )
    with serve_locally(store, Verifier()) as url:
        yield store, url


def _client(backend, url):
    signing = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    return BrokerClient(backend, ec.generate_private_key(ec.SECP256R1()), signing, CURVE, url=url)


def test_an_attested_vault_receives_the_key_and_the_signed_policy(broker, simulated_backend):
    store, url = broker
    released = _client(simulated_backend, url).release("claims", store.owner_public_key.public_bytes_raw())
    assert released.key == store.dataset_key("claims")
    assert released.output_policy == POLICY.to_dict()
    assert "<secret>" in repr(released) and released.key.hex() not in repr(released)


def test_a_policy_not_signed_by_the_pinned_owner_is_refused(broker, simulated_backend):
    _, url = broker
    stranger = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    with pytest.raises(KeyReleaseError, match="not signed by the dataset's owner"):
        _client(simulated_backend, url).release("claims", stranger)


def test_a_vault_running_other_code_is_refused_with_the_reason(broker, simulated_tee_dir):
    from kernel_enclave.tee.simulated import SimulatedBackend

    store, url = broker
    impostor = SimulatedBackend(state_dir=simulated_tee_dir, measurement=bytes(48))
    with pytest.raises(KeyReleaseError, match=r"refused \(403\): attestation rejected: measurement"):
        _client(impostor, url).release("claims", store.owner_public_key.public_bytes_raw())


def test_the_broker_address_comes_from_configuration(monkeypatch):
    monkeypatch.delenv(BROKER_URL_VARIABLE, raising=False)
    with pytest.raises(KeyReleaseError, match=BROKER_URL_VARIABLE):
        broker_url()
    monkeypatch.setenv(BROKER_URL_VARIABLE, "https://broker.example/")
    assert broker_url() == "https://broker.example"
    assert broker_url("http://127.0.0.1:9") == "http://127.0.0.1:9"
    with pytest.raises(KeyReleaseError, match="must be http"):
        broker_url("file:///etc/passwd")


def test_an_unreachable_broker_is_one_clear_error(simulated_backend):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(KeyReleaseError, match="unreachable"):
        _client(simulated_backend, f"http://127.0.0.1:{port}").release("claims", bytes(32))
