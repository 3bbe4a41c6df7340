"""Offline verification of export bundles: each kind of tampering is caught by the check named for it."""

from __future__ import annotations

import base64
import json
import os
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zmq.utils import z85

from confnb.attest.policy import AttestationPolicy
from confnb.attest.result import Outcome
from confnb.receipts import REQUIRED_CHECKS, verify_export
from kernel_enclave.attestation import issue_evidence
from kernel_enclave.tee.simulated import SimulatedBackend
from kernel_enclave.vault.export import make_export

PAYLOAD = b'{"region": ["north", "south"], "claims": [120, 98]}'


def point(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


class Kernel:
    """A kernel's signing key and evidence source on a simulated TEE, exporting like the vault does."""

    def __init__(self, backend: SimulatedBackend) -> None:
        self.backend = backend
        self.signing_key = Ed25519PrivateKey.generate()
        self.hpke = point(ec.generate_private_key(ec.SECP256R1()))
        self.curve = z85.encode(os.urandom(32)).decode()

    def evidence_for(self, nonce: bytes) -> dict[str, Any]:
        own = self.signing_key.public_key().public_bytes_raw()
        return issue_evidence(
            self.backend, nonce, hpke_public_key=self.hpke, signing_public_key=own, curve_public_key=self.curve
        ).to_dict()

    def export(self, payload: bytes = PAYLOAD, **options: Any) -> bytes:
        return make_export(
            signing_key=self.signing_key,
            evidence_for=self.evidence_for,
            payload=payload,
            media_type="application/json",
            file_name="claims.json",
            policy_id="claims-2026-v1",
            datasets=["claims", "members"],
            operation_digest="sha256:" + "cd" * 32,
            **options,
        )


@pytest.fixture(scope="module")
def kernel(simulated_backend) -> Kernel:
    return Kernel(simulated_backend)


@pytest.fixture(scope="module")
def bundle(kernel) -> bytes:
    return kernel.export()


@pytest.fixture(scope="module")
def recipient() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def sealed_bundle(kernel, recipient) -> bytes:
    return kernel.export(recipient_public_key=point(recipient))


def outcomes(result) -> dict[str, Outcome]:
    return {check.name: check.outcome for check in result.checks}


def failed(result) -> set[str]:
    return {check.name for check in result.failures}


def edit(bundle: bytes, change) -> bytes:
    document = json.loads(bundle)
    change(document)
    return json.dumps(document).encode()


# -- verified -----------------------------------------------------------------------------------------------


def test_a_plain_export_verifies(bundle):
    result = verify_export(bundle, allow_simulated=True)
    assert result.ok, result.summary()
    assert result.payload == PAYLOAD
    assert result.simulated is True
    assert set(REQUIRED_CHECKS) | {"result_digest"} == {
        name for name, outcome in outcomes(result).items() if outcome is Outcome.PASS
    }
    assert "SIMULATED" in result.check("evidence").detail
    assert "SIMULATED" in result.summary()
    assert result.receipt["datasets"] == ["claims", "members"]
    json.dumps(result.to_dict())


def test_a_sealed_export_opens_for_its_recipient(sealed_bundle, recipient):
    result = verify_export(sealed_bundle, allow_simulated=True, recipient_private_key=recipient)
    assert result.ok, result.summary()
    assert result.payload == PAYLOAD
    assert outcomes(result)["recipient"] is Outcome.PASS
    assert outcomes(result)["result_digest"] is Outcome.PASS


def test_a_sealed_export_verifies_without_the_key_but_yields_nothing(sealed_bundle):
    result = verify_export(sealed_bundle, allow_simulated=True)
    assert result.ok, result.summary()
    assert result.payload is None
    assert outcomes(result)["result_digest"] is Outcome.SKIP
    assert "give the recipient's private key" in result.check("result_digest").detail


def test_another_recipient_cannot_open_it(sealed_bundle):
    result = verify_export(
        sealed_bundle, allow_simulated=True, recipient_private_key=ec.generate_private_key(ec.SECP256R1())
    )
    assert not result.ok and result.payload is None
    assert failed(result) == {"recipient"}
    assert "not to this key" in result.check("recipient").detail


def test_an_empty_payload_exports_and_verifies(kernel):
    result = verify_export(kernel.export(b""), allow_simulated=True)
    assert result.ok and result.payload == b""


# -- simulated evidence and policies ------------------------------------------------------------------------


def test_simulated_evidence_is_refused_unless_allowed(bundle):
    result = verify_export(bundle)
    assert not result.ok and result.payload is None
    assert result.simulated is True
    assert failed(result) == {"evidence"}
    detail = result.check("evidence").detail
    assert "SIMULATED TEE" in detail and "--allow-simulated" in detail


def test_the_flag_not_the_policy_file_decides_about_simulated_evidence(bundle, simulated_backend, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text("[attestation]\nallow_simulated = true\n")
    assert failed(verify_export(bundle, attestation_policy=policy)) == {"evidence"}
    assert verify_export(bundle, attestation_policy=policy, allow_simulated=True).ok


def test_a_measurement_pin_is_applied(bundle, simulated_backend):
    pinned = AttestationPolicy(measurements=(simulated_backend.measurement.hex(),))
    assert verify_export(bundle, attestation_policy=pinned, allow_simulated=True).ok
    other = AttestationPolicy(measurements=("00" * 48,))
    result = verify_export(bundle, attestation_policy=other, allow_simulated=True)
    assert failed(result) == {"evidence"}
    assert "measurement" in result.check("evidence").detail


def test_an_export_by_another_kernel_image_fails_a_pinned_policy(simulated_tee_dir, simulated_backend):
    impostor = Kernel(SimulatedBackend(state_dir=simulated_tee_dir, measurement=bytes(range(48))))
    pinned = AttestationPolicy(measurements=(simulated_backend.measurement.hex(),))
    result = verify_export(impostor.export(), attestation_policy=pinned, allow_simulated=True)
    assert failed(result) == {"evidence"}


def test_verification_defaults_to_the_receipt_time(bundle):
    later = datetime.now(UTC) + timedelta(days=40 * 365)
    result = verify_export(bundle, allow_simulated=True, at=later)
    assert failed(result) == {"evidence"}
    assert "cert_validity" in result.check("evidence").detail


# -- tampering ----------------------------------------------------------------------------------------------


def test_a_tampered_payload_is_caught_by_payload_digest(bundle):
    def change(document):
        raw = bytearray(base64.b64decode(document["payload"]))
        raw[5] ^= 1
        document["payload"] = base64.b64encode(bytes(raw)).decode()

    result = verify_export(edit(bundle, change), allow_simulated=True)
    assert failed(result) == {"payload_digest", "result_digest"}
    assert result.payload is None


def test_a_tampered_sealed_payload_is_caught_by_payload_digest(sealed_bundle, recipient):
    def change(document):
        raw = bytearray(base64.b64decode(document["payload"]))
        raw[-1] ^= 1
        document["payload"] = base64.b64encode(bytes(raw)).decode()

    result = verify_export(edit(sealed_bundle, change), allow_simulated=True, recipient_private_key=recipient)
    assert failed(result) == {"payload_digest", "recipient"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("policy_id", "anything-goes"),
        ("datasets", ["claims"]),
        ("file_name", "other.json"),
        ("time", "2020-01-01T00:00:00Z"),
        ("operation_digest", "sha256:" + "00" * 32),
    ],
)
def test_a_tampered_receipt_is_caught_by_binding_and_signature(bundle, field, value):
    result = verify_export(edit(bundle, lambda d: d["receipt"].__setitem__(field, value)), allow_simulated=True)
    assert {"receipt_binding", "signature"} <= failed(result)
    assert failed(result) <= {"receipt_binding", "signature", "evidence"}  # an old time also predates the chain


def test_a_consistent_new_payload_and_digests_is_still_caught(bundle):
    """Replacing the payload and fixing both digests in the receipt breaks the receipt's binding and signature."""
    import hashlib

    forged_payload = b'{"claims": "everything"}'
    digest = "sha256:" + hashlib.sha256(forged_payload).hexdigest()

    def change(document):
        document["payload"] = base64.b64encode(forged_payload).decode()
        document["receipt"]["payload_digest"] = digest
        document["receipt"]["result_digest"] = digest

    result = verify_export(edit(bundle, change), allow_simulated=True)
    assert failed(result) == {"receipt_binding", "signature"}


def test_a_tampered_signature_is_caught_by_signature(bundle):
    def change(document):
        raw = bytearray(base64.b64decode(document["signature"]))
        raw[0] ^= 1
        document["signature"] = base64.b64encode(bytes(raw)).decode()

    assert failed(verify_export(edit(bundle, change), allow_simulated=True)) == {"signature"}


def test_a_receipt_resigned_by_another_key_is_caught_by_signature(bundle):
    from confnb.receipts import canonical_json

    stranger = Ed25519PrivateKey.generate()

    def change(document):
        document["signature"] = base64.b64encode(stranger.sign(canonical_json(document["receipt"]))).decode()

    assert failed(verify_export(edit(bundle, change), allow_simulated=True)) == {"signature"}


def test_tampered_evidence_claims_are_caught_by_evidence(bundle):
    stranger = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    result = verify_export(
        edit(
            bundle,
            lambda d: d["evidence"]["claims"].__setitem__("signing_public_key", base64.b64encode(stranger).decode()),
        ),
        allow_simulated=True,
    )
    assert failed(result) == {"evidence", "evidence_digest", "signature"}
    assert "report_data_binding" in result.check("evidence").detail


def test_a_tampered_report_is_caught_by_evidence(bundle):
    def change(document):
        report = bytearray(base64.b64decode(document["evidence"]["report"]))
        report[0x90] ^= 1  # MEASUREMENT
        document["evidence"]["report"] = base64.b64encode(bytes(report)).decode()

    result = verify_export(edit(bundle, change), allow_simulated=True)
    assert failed(result) == {"evidence", "evidence_digest"}
    assert "report_signature" in result.check("evidence").detail


def test_evidence_from_another_export_is_caught_by_binding(bundle, kernel):
    other = json.loads(kernel.export(b"other result"))
    result = verify_export(edit(bundle, lambda d: d.__setitem__("evidence", other["evidence"])), allow_simulated=True)
    assert failed(result) == {"evidence_digest", "receipt_binding"}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x89PNG", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"format": "confnb-evidence/1"}', "format is 'confnb-evidence/1'"),
    ],
)
def test_unreadable_bundles_fail_the_format_check(data, reason):
    result = verify_export(data, allow_simulated=True)
    assert not result.ok and result.receipt is None
    assert [check.name for check in result.checks] == ["format"]
    assert reason in result.checks[0].detail


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda d: d.pop("signature"), "bundle lacks signature"),
        (lambda d: d.__setitem__("extra", 1), "unexpected field extra"),
        (lambda d: d.__setitem__("signature", "!!"), "signature is not the base64"),
        (lambda d: d.__setitem__("payload", 5), "payload is not base64"),
        (lambda d: d["receipt"].pop("policy_id"), "receipt lacks policy_id"),
        (lambda d: d["receipt"].__setitem__("result_digest", "md5:00"), "result_digest is not sha256"),
        (lambda d: d["receipt"].__setitem__("file_name", "../x"), "bare file name"),
        (lambda d: d["receipt"].__setitem__("time", "noon"), "time is not an RFC 3339"),
        (lambda d: d["receipt"].__setitem__("datasets", "claims"), "datasets is not a list"),
        (lambda d: d["evidence"].__setitem__("tee", "tdx"), "evidence: evidence tee"),
    ],
)
def test_malformed_bundles_name_the_problem(bundle, change, reason):
    result = verify_export(edit(bundle, change), allow_simulated=True)
    assert [check.name for check in result.failures] == ["format"]
    assert reason in result.checks[0].detail
    assert not result.ok and result.payload is None


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_whatever_verifies_says_what_the_kernel_said(bundle, data):
    position = data.draw(st.integers(0, len(bundle) - 1))
    damaged = bytearray(bundle)
    damaged[position] ^= data.draw(st.integers(1, 255))
    result = verify_export(bytes(damaged), allow_simulated=True)
    if result.ok:
        assert result.receipt == json.loads(bundle)["receipt"]
        assert result.payload == PAYLOAD
    else:
        assert result.payload is None
        assert result.failures or result.summary().startswith("rejected")
