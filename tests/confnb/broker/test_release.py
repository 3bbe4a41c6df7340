"""Key release end to end on the simulated TEE: grant, and every reason to deny, each named."""

from __future__ import annotations

import base64
import os
import threading
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from confnb import hpke
from confnb.attest import AttestationPolicy, Verifier
from confnb.broker.challenges import ChallengeStore
from confnb.broker.keys import MasterKey
from confnb.broker.release import DatasetRecord, Denial, Grant, decide, release_info
from kernel_enclave.attestation import issue_evidence
from kernel_enclave.measurement import simulated_measurement

CURVE_KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"


class Kernel:
    """The kernel's side: its own HPKE key pair, and evidence for whatever nonce the broker hands out."""

    def __init__(self, backend):
        self.backend = backend
        self.hpke_key = ec.generate_private_key(ec.SECP256R1())

    def evidence(self, nonce_hex: str) -> dict:
        evidence = issue_evidence(
            self.backend,
            bytes.fromhex(nonce_hex),
            hpke_public_key=self.hpke_key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint),
            signing_public_key=ed25519.Ed25519PrivateKey.generate()
            .public_key()
            .public_bytes(Encoding.Raw, PublicFormat.Raw),
            curve_public_key=CURVE_KEY,
        )
        return evidence.to_dict()


@pytest.fixture
def broker(tmp_path):
    master = MasterKey.generate()
    dataset_key = os.urandom(32)
    policy = AttestationPolicy(allow_simulated=True, measurements=(simulated_measurement().hex(),))
    record = DatasetRecord(
        "claims",
        "k1",
        master.wrap(dataset_key, "claims", "k1"),
        policy,
        {"policy": {"id": "claims-v1"}},
        "c2lnbmF0dXJl",
    )
    return master, dataset_key, record, ChallengeStore(tmp_path / "broker.sqlite")


@pytest.fixture
def kernel(simulated_backend):
    return Kernel(simulated_backend)


def test_an_attested_kernel_receives_the_key_sealed_to_itself(broker, kernel):
    master, dataset_key, record, challenges = broker
    nonce = challenges.issue().nonce
    outcome = decide(kernel.evidence(nonce), record, challenges, Verifier(), master)
    assert isinstance(outcome, Grant), outcome
    assert outcome.simulated and outcome.output_policy == {"policy": {"id": "claims-v1"}}
    assert hpke.open_sealed(kernel.hpke_key, outcome.sealed_key, release_info("claims", "k1", nonce)) == dataset_key
    assert dataset_key not in outcome.sealed_key
    document = outcome.to_dict()
    assert base64.b64decode(document["sealed_key"]) == outcome.sealed_key
    with pytest.raises(hpke.HpkeError):  # another kernel, or the host in between, cannot open it
        hpke.open_sealed(ec.generate_private_key(ec.SECP256R1()), outcome.sealed_key, outcome.info)


def test_replayed_evidence_is_denied(broker, kernel):
    master, _, record, challenges = broker
    evidence = kernel.evidence(challenges.issue().nonce)
    assert isinstance(decide(evidence, record, challenges, Verifier(), master), Grant)
    again = decide(evidence, record, challenges, Verifier(), master)
    assert isinstance(again, Denial) and again.status == 403 and "already used" in again.reason


def test_nonce_not_issued_here_or_expired(broker, kernel):
    master, _, record, challenges = broker
    stranger = decide(kernel.evidence("ab" * 32), record, challenges, Verifier(), master)
    assert isinstance(stranger, Denial) and "not issued by this broker" in stranger.reason
    nonce = challenges.issue(now=datetime.now(UTC) - timedelta(minutes=10)).nonce
    late = decide(kernel.evidence(nonce), record, challenges, Verifier(), master)
    assert isinstance(late, Denial) and "expired" in late.reason


def test_a_kernel_with_another_measurement_is_denied_with_the_checks(broker, simulated_tee_dir):
    from kernel_enclave.tee.simulated import SimulatedBackend

    master, _, record, challenges = broker
    other = Kernel(SimulatedBackend(state_dir=simulated_tee_dir, measurement=bytes(48)))
    outcome = decide(other.evidence(challenges.issue().nonce), record, challenges, Verifier(), master)
    assert isinstance(outcome, Denial) and outcome.status == 403
    assert outcome.reason.startswith("attestation rejected: measurement:")
    assert [c["name"] for c in outcome.checks if not c["ok"]] == ["measurement"]


def test_without_an_attestation_policy_every_release_is_denied(broker, kernel):
    master, _, record, challenges = broker
    bare = DatasetRecord(record.dataset_id, record.key_id, record.wrapped_key, None, {}, "")
    outcome = decide(kernel.evidence(challenges.issue().nonce), bare, challenges, Verifier(), master)
    assert isinstance(outcome, Denial) and "no attestation policy" in outcome.reason


def test_a_policy_without_allow_simulated_denies_the_simulated_tee(broker, kernel):
    master, _, record, challenges = broker
    strict = DatasetRecord(
        record.dataset_id,
        record.key_id,
        record.wrapped_key,
        AttestationPolicy(measurements=(simulated_measurement().hex(),)),
        {},
        "",
    )
    outcome = decide(kernel.evidence(challenges.issue().nonce), strict, challenges, Verifier(), master)
    assert isinstance(outcome, Denial) and "ark_pinned" in outcome.reason


def test_tampered_and_malformed_evidence(broker, kernel):
    master, _, record, challenges = broker
    evidence = kernel.evidence(challenges.issue().nonce)
    evidence["claims"]["hpke_public_key"] = base64.b64encode(
        ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    ).decode()  # a host swapping in its own key
    swapped = decide(evidence, record, challenges, Verifier(), master)
    assert isinstance(swapped, Denial) and "report_data_binding" in swapped.reason
    for document, fragment in (
        ({"format": "x"}, "evidence:"),
        ("not even a dict", "evidence:"),
        ({**evidence, "claims": {**evidence["claims"], "nonce": "zz"}}, "not hex"),
    ):
        outcome = decide(document, record, challenges, Verifier(), master)
        assert isinstance(outcome, Denial) and outcome.status == 400 and fragment in outcome.reason


def test_one_nonce_releases_once_under_concurrency(broker, kernel):
    master, _, record, challenges = broker
    evidence = kernel.evidence(challenges.issue().nonce)
    outcomes: list[object] = []
    threads = [
        threading.Thread(target=lambda: outcomes.append(decide(evidence, record, challenges, Verifier(), master)))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(isinstance(outcome, Grant) for outcome in outcomes) == 1
    assert sum(isinstance(outcome, Denial) for outcome in outcomes) == 7


def test_outstanding_challenges_are_capped_and_freed_by_use_or_expiry(tmp_path):
    from datetime import UTC, datetime, timedelta

    from confnb.broker.challenges import ChallengeLimitError

    store = ChallengeStore(tmp_path / "cap.sqlite", max_outstanding=3)
    issued = [store.issue().nonce for _ in range(3)]
    with pytest.raises(ChallengeLimitError, match="3 challenges are outstanding"):
        store.issue()
    assert store.consume(issued[0]) is None  # a used challenge no longer counts
    store.issue()
    later = datetime.now(UTC) + timedelta(minutes=6)  # past the 300 s lifetime: all expired
    assert len({store.issue(now=later).nonce for _ in range(3)}) == 3
