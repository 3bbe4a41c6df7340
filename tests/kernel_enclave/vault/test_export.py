"""Export bundles as the kernel builds them, checked with plain cryptography (not with the receipt verifier)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from typing import Any

import pytest
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from zmq.utils import z85

from confnb.attest.evidence import Evidence, parse_rfc3339, report_data_for
from kernel_enclave.attestation import issue_evidence
from kernel_enclave.vault.export import ExportError, make_export

PAYLOAD = b"region,claims\nnorth,120\nsouth,98\n"
SUITE = hpke.Suite(hpke.KEM.P256, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def point(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


class Kernel:
    """A kernel's keys and its evidence source, on the simulated TEE."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.signing_key = Ed25519PrivateKey.generate()
        self.hpke_key = ec.generate_private_key(ec.SECP256R1())
        self.curve = z85.encode(os.urandom(32)).decode()
        self.nonces: list[bytes] = []

    def evidence_for(self, nonce: bytes, signing_public_key: bytes | None = None) -> dict[str, Any]:
        self.nonces.append(nonce)
        own = self.signing_key.public_key().public_bytes_raw()
        return issue_evidence(
            self.backend,
            nonce,
            hpke_public_key=point(self.hpke_key),
            signing_public_key=signing_public_key or own,
            curve_public_key=self.curve,
        ).to_dict()

    def export(self, **overrides: Any) -> bytes:
        arguments: dict[str, Any] = {
            "signing_key": self.signing_key,
            "evidence_for": self.evidence_for,
            "payload": PAYLOAD,
            "media_type": "text/csv",
            "file_name": "claims-by-region.csv",
            "policy_id": "claims-2026-v1",
            "datasets": ["claims"],
            "operation_digest": "sha256:" + "ab" * 32,
        }
        return make_export(**{**arguments, **overrides})


@pytest.fixture
def kernel(simulated_backend) -> Kernel:
    return Kernel(simulated_backend)


def test_bundle_layout_and_receipt(kernel):
    bundle = json.loads(kernel.export())
    assert set(bundle) == {"format", "receipt", "signature", "evidence", "payload"}
    assert bundle["format"] == "confnb-export/1"
    receipt = bundle["receipt"]
    digest = "sha256:" + hashlib.sha256(PAYLOAD).hexdigest()
    assert receipt == {
        "result_digest": digest,
        "payload_digest": digest,
        "media_type": "text/csv",
        "file_name": "claims-by-region.csv",
        "policy_id": "claims-2026-v1",
        "datasets": ["claims"],
        "operation_digest": "sha256:" + "ab" * 32,
        "evidence_digest": receipt["evidence_digest"],
        "time": receipt["time"],
        "sealed_to": None,
    }
    parse_rfc3339(receipt["time"])
    assert base64.b64decode(bundle["payload"]) == PAYLOAD


def test_evidence_binds_the_receipt_and_the_signing_key(kernel):
    bundle = json.loads(kernel.export())
    receipt = bundle["receipt"]
    evidence = Evidence.from_dict(bundle["evidence"])
    without_digest = {k: v for k, v in receipt.items() if k != "evidence_digest"}
    assert kernel.nonces == [hashlib.sha256(canonical(without_digest)).digest()]
    assert evidence.claims["nonce"] == kernel.nonces[0].hex()
    assert evidence.report[0x50:0x90] == report_data_for(evidence.claims)
    raw = base64.b64decode(evidence.claims["signing_public_key"])
    assert raw == kernel.signing_key.public_key().public_bytes_raw()
    assert receipt["evidence_digest"] == "sha256:" + hashlib.sha256(canonical(bundle["evidence"])).hexdigest()
    Ed25519PublicKey.from_public_bytes(raw).verify(base64.b64decode(bundle["signature"]), canonical(receipt))


def test_a_recipient_gets_a_sealed_payload(kernel):
    recipient = ec.generate_private_key(ec.SECP256R1())
    bundle = json.loads(kernel.export(recipient_public_key=point(recipient)))
    receipt, stored = bundle["receipt"], base64.b64decode(bundle["payload"])
    assert PAYLOAD not in stored
    assert receipt["sealed_to"] == "sha256:" + hashlib.sha256(point(recipient)).hexdigest()
    assert receipt["payload_digest"] == "sha256:" + hashlib.sha256(stored).hexdigest()
    assert receipt["result_digest"] == "sha256:" + hashlib.sha256(PAYLOAD).hexdigest()
    assert SUITE.decrypt(stored, recipient, info=b"confnb-export/1") == PAYLOAD


def test_evidence_for_another_nonce_is_refused(kernel):
    with pytest.raises(ExportError, match="not bound to this receipt"):
        kernel.export(evidence_for=lambda nonce: kernel.evidence_for(bytes(32)))


def test_evidence_for_another_signing_key_is_refused(kernel):
    other = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    with pytest.raises(ExportError, match="another signing key"):
        kernel.export(evidence_for=lambda nonce: kernel.evidence_for(nonce, other))


def test_unusable_evidence_is_refused(kernel):
    with pytest.raises(ExportError, match="evidence is unusable"):
        kernel.export(evidence_for=lambda nonce: {"format": "something else"})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"file_name": "../etc/passwd"}, "bare file name"),
        ({"file_name": ""}, "non-empty"),
        ({"media_type": "csv"}, "MIME type"),
        ({"policy_id": ""}, "policy_id"),
        ({"datasets": "claims"}, "list of dataset ids"),
        ({"datasets": ["claims", ""]}, "dataset id"),
        ({"operation_digest": "x\n"}, "operation_digest"),
        ({"recipient_public_key": b"\x04" + bytes(64)}, "recipient key"),
        ({"recipient_public_key": bytes(33)}, "recipient key"),
    ],
)
def test_bad_arguments_are_refused_before_any_evidence_is_requested(kernel, overrides, message):
    with pytest.raises(ExportError, match=message):
        kernel.export(**overrides)
    assert kernel.nonces == []
