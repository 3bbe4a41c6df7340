"""The optional CRL check, against an ARK-signed CRL made with the simulated chip's own ARK key.

AMD publishes no CRL in the vectors (and its CRLs are empty in practice), so the simulated root, whose private key
the test can read, signs the CRLs here exactly as AMD's ARK signs its own: RSASSA-PSS with SHA-384.
"""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from confnb.attest import AttestationPolicy, Verifier
from confnb.attest.certs import load_certificates
from kernel_enclave.attestation import issue_evidence

ALLOW_SIMULATED = AttestationPolicy(allow_simulated=True)
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


@pytest.fixture(scope="module")
def evidence(simulated_backend):
    return issue_evidence(
        simulated_backend,
        secrets.token_bytes(16),
        hpke_public_key=b"\x04" * 65,
        signing_public_key=b"k" * 32,
        curve_public_key="rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7",
    )


@pytest.fixture(scope="module")
def ark_key(simulated_tee_dir) -> rsa.RSAPrivateKey:
    state = json.loads((simulated_tee_dir / "state.json").read_text())
    key = serialization.load_pem_private_key(state["ark_key"].encode(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def _crl(ark_key, evidence, revoked=(), next_update_days=30, signer=None) -> bytes:
    ark = load_certificates(evidence.chain[-1])[0]
    now = datetime.now(UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ark.subject)
        .last_update(now - timedelta(days=1))
        .next_update(now + timedelta(days=next_update_days))
    )
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - timedelta(hours=1)).build()
        )
    crl = builder.sign(signer or ark_key, hashes.SHA384(), rsa_padding=_PSS)
    return crl.public_bytes(serialization.Encoding.DER)


def test_empty_crl_passes(ark_key, evidence):
    result = Verifier().verify_evidence(evidence, ALLOW_SIMULATED, crl=_crl(ark_key, evidence))
    assert result.ok, result.summary()
    assert result.check("revocation").ok


def test_revoked_ask_is_rejected(ark_key, evidence):
    ask = load_certificates(evidence.chain[0])[0]
    result = Verifier().verify_evidence(
        evidence, ALLOW_SIMULATED, crl=_crl(ark_key, evidence, revoked=[ask.certificate.serial_number])
    )
    assert [check.name for check in result.failures] == ["revocation"]
    assert "SEV-Genoa" in result.check("revocation").detail


def test_stale_crl_is_rejected(ark_key, evidence):
    result = Verifier().verify_evidence(evidence, ALLOW_SIMULATED, crl=_crl(ark_key, evidence, next_update_days=-1))
    assert "expired" in result.check("revocation").detail and not result.ok


def test_crl_signed_by_another_key_is_rejected(evidence):
    impostor = rsa.generate_private_key(65537, 2048)
    result = Verifier().verify_evidence(evidence, ALLOW_SIMULATED, crl=_crl(None, evidence, signer=impostor))
    assert "not signed by ARK-Genoa" in result.check("revocation").detail


def test_required_revocation_without_a_crl_fails_closed(evidence):
    policy = AttestationPolicy(allow_simulated=True, check_revocation=True)
    result = Verifier(kds=None).verify_evidence(evidence, policy)
    assert [check.name for check in result.failures] == ["revocation"]


def test_unparseable_crl_is_unusable_input(evidence):
    from confnb.attest.errors import AttestInputError

    with pytest.raises(AttestInputError, match="CRL"):
        Verifier().verify_evidence(evidence, ALLOW_SIMULATED, crl=b"not a crl")
