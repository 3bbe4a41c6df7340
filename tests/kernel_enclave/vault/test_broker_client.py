"""The vault's side of a key release, against a real broker on loopback."""

from __future__ import annotations

import re
import socket
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from confnb.attest import Verifier
from confnb.broker.local import serve_locally
from confnb.broker.store import OwnerStore
from confnb.policy.output import OutputPolicy
from kernel_enclave.measurement import simulated_measurement
from kernel_enclave.vault.audit import KernelAuditError
from kernel_enclave.vault.broker_client import (
    BROKER_URL_VARIABLE,
    BrokerClient,
    KeyReleaseError,
    RetryPolicy,
    broker_url,
)

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


FAST = RetryPolicy(attempts=3, first_pause_s=0.05, max_pause_s=0.1, timeout_s=0.5, total_s=10)


def _kinds(store, since):
    return [entry.kind.value for entry in store.audit.entries() if entry.seq > since]


def test_a_broker_that_never_answers_is_given_up_on_in_bounded_time(simulated_backend):
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections (the backlog), never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(KeyReleaseError) as failed:
            BrokerClient(
                simulated_backend, ec.generate_private_key(ec.SECP256R1()), bytes(32), CURVE, url=url, retry=FAST
            ).release("claims", bytes(32))
        elapsed = time.monotonic() - started
    assert re.fullmatch(
        rf"broker {re.escape(url)} unreachable: no answer in time \(timed out\) \(gave up after 3 attempts in "
        r"\d+\.\d s\)",
        str(failed.value),
    ), failed.value
    assert 1.5 <= elapsed < 4, elapsed  # three timeouts of 0.5 s and two short pauses, no more


def test_a_down_broker_is_retried_then_named_with_the_cause(simulated_backend):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"  # closed again: nothing listens there
    with pytest.raises(KeyReleaseError, match=r"unreachable: connection refused \(gave up after 3 attempts in "):
        BrokerClient(
            simulated_backend, ec.generate_private_key(ec.SECP256R1()), bytes(32), CURVE, url=url, retry=FAST
        ).release("claims", bytes(32))


def test_a_refusal_is_an_answer_and_is_not_retried(broker, simulated_tee_dir):
    from kernel_enclave.tee.simulated import SimulatedBackend

    store, url = broker
    since = store.audit.head()[0]
    impostor = SimulatedBackend(state_dir=simulated_tee_dir, measurement=bytes(48))
    client = BrokerClient(impostor, ec.generate_private_key(ec.SECP256R1()), bytes(32), CURVE, url=url, retry=FAST)
    with pytest.raises(KeyReleaseError, match=rf"^broker {re.escape(url)} refused \(403\): attestation rejected"):
        client.release("claims", store.owner_public_key.public_bytes_raw())
    assert _kinds(store, since) == ["challenge", "denial"]  # one attempt, not three


def test_each_attempt_is_journaled_before_the_evidence_leaves_and_after_the_answer(broker, simulated_backend):
    store, url = broker
    since = store.audit.head()[0]
    journal: list[tuple[str, dict]] = []
    released = _client(simulated_backend, url).release(
        "claims", store.owner_public_key.public_bytes_raw(), lambda event, fields: journal.append((event, dict(fields)))
    )
    assert [event for event, _ in journal] == ["key-request", "key-received"]
    assert {fields["nonce"] for _, fields in journal} == {released.nonce}
    assert journal[0][1] == {"dataset": "claims", "broker": url, "nonce": released.nonce, "attempt": 1}
    release = [entry for entry in store.audit.entries() if entry.seq > since and entry.kind.value == "release"]
    assert [entry.detail["nonce"] for entry in release] == [released.nonce]


def test_a_journal_that_cannot_record_stops_the_release_before_the_evidence_leaves(broker, simulated_backend):
    store, url = broker
    since = store.audit.head()[0]

    def full_disk(event: str, fields: object) -> None:
        raise KernelAuditError("the audit log no longer accepts entries: writing failed (No space left on device)")

    with pytest.raises(KernelAuditError):
        _client(simulated_backend, url).release("claims", store.owner_public_key.public_bytes_raw(), full_disk)
    assert _kinds(store, since) == ["challenge"]  # the broker never saw evidence, so released nothing
