"""The optional CRL check, against ARK-signed CRLs made with the simulated chip's own ARK key.

AMD publishes no CRL in the vectors (and its CRLs are empty in practice), so the simulated root, whose private key
the test can read, signs the CRLs here exactly as AMD's ARK signs its own: RSASSA-PSS with SHA-384. AMD's ARK signs
two CRLs per product, one for the VCEK path (revoked ASKs) and one for the VLEK path (revoked ASVKs); for the VLEK
path the test issues an ASVK and a VLEK under the simulated ARK, as AWS's chips have them under AMD's, and a report
signed by that VLEK.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from confnb.attest import AttestationPolicy, Verifier
from confnb.attest.certs import OID_CSP_ID, OID_HW_ID, Cert, load_certificates
from confnb.attest.kds import KdsClient
from confnb.attest.report import REPORT_SIZE, SIGNED_SIZE, Product
from kernel_enclave.attestation import issue_evidence
from kernel_enclave.tee import simulated

ALLOW_SIMULATED = AttestationPolicy(allow_simulated=True)
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
VCEK_CRL_URL = simulated.CRL_URL  # what the simulated ASK names as its CRL distribution point
VLEK_CRL_URL = VCEK_CRL_URL.replace("/vcek/", "/vlek/")


@pytest.fixture(scope="module")
def evidence(simulated_backend):
    return issue_evidence(
        simulated_backend,
        secrets.token_bytes(16),
        hpke_public_key=b"\x04" * 65,
        signing_public_key=b"k" * 32,
        curve_public_key="rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7",
    )


def _state_key(simulated_tee_dir: Path, name: str) -> rsa.RSAPrivateKey:
    state = json.loads((simulated_tee_dir / "state.json").read_text())
    key = serialization.load_pem_private_key(state[name].encode(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


@pytest.fixture(scope="module")
def ark_key(simulated_tee_dir) -> rsa.RSAPrivateKey:
    return _state_key(simulated_tee_dir, "ark_key")


@dataclass(frozen=True)
class VlekChip:
    """A simulated chip as a cloud provider's: ASVK under the simulated ARK, a VLEK under it, a VLEK-signed report."""

    report: bytes
    vlek_pem: bytes
    chain_pem: bytes  # ASVK, ARK
    asvk: Cert


@pytest.fixture(scope="module")
def vlek_chip(evidence, simulated_tee_dir) -> VlekChip:
    ark_key, asvk_key = _state_key(simulated_tee_dir, "ark_key"), _state_key(simulated_tee_dir, "ask_key")
    ark = x509.load_pem_x509_certificate(evidence.chain[-1].encode())
    start = datetime.now(UTC) - timedelta(days=1)
    asvk_name = simulated._name(f"SEV-VLEK-{simulated.PRODUCT.value}")
    point = x509.DistributionPoint([x509.UniformResourceIdentifier(VLEK_CRL_URL)], None, None, None)
    asvk = (
        x509.CertificateBuilder()
        .subject_name(asvk_name)
        .issuer_name(ark.subject)
        .public_key(asvk_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.CRLDistributionPoints([point]), critical=False)
        .sign(ark_key, hashes.SHA384(), rsa_padding=_PSS)
    )
    vlek_key = ec.generate_private_key(ec.SECP384R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(simulated._name("SEV-VLEK"))
        .issuer_name(asvk_name)
        .public_key(vlek_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=365))
    )
    csp_id = b"csp.confnb.test"
    for extension in simulated.vcek_extensions(simulated.TCB, bytes(64)):
        if extension.oid.dotted_string != OID_HW_ID:  # a VLEK names its cloud provider instead of a chip
            builder = builder.add_extension(extension, critical=False)
    cspid = x509.UnrecognizedExtension(x509.ObjectIdentifier(OID_CSP_ID), bytes([0x16, len(csp_id)]) + csp_id)
    builder = builder.add_extension(cspid, critical=False)
    vlek = builder.sign(asvk_key, hashes.SHA384(), rsa_padding=_PSS)
    report = bytearray(evidence.report)
    key_info = int.from_bytes(report[0x48:0x4C], "little") & ~(0b111 << 2) | (1 << 2)  # SIGNING_KEY = VLEK
    report[0x48:0x4C] = key_info.to_bytes(4, "little")
    body = bytes(report[:SIGNED_SIZE])
    r, s = decode_dss_signature(vlek_key.sign(body, ec.ECDSA(hashes.SHA384())))
    signed = body + r.to_bytes(72, "little") + s.to_bytes(72, "little")
    pem = serialization.Encoding.PEM
    return VlekChip(
        report=signed + bytes(REPORT_SIZE - len(signed)),
        vlek_pem=vlek.public_bytes(pem),
        chain_pem=asvk.public_bytes(pem) + ark.public_bytes(pem),
        asvk=load_certificates(asvk.public_bytes(pem))[0],
    )


def _crl(
    ark_key, evidence, revoked=(), next_update_days=30, signer=None, published_at=VCEK_CRL_URL, **idp_flags
) -> bytes:
    """An ARK-signed CRL; ``published_at`` (None: no issuingDistributionPoint) says which path it is for."""
    ark = load_certificates(evidence.chain[-1])[0]
    now = datetime.now(UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ark.subject)
        .last_update(now - timedelta(days=1))
        .next_update(now + timedelta(days=next_update_days))
    )
    if published_at is not None:
        flags = {"only_contains_user_certs": False, "indirect_crl": False, **idp_flags}
        idp = x509.IssuingDistributionPoint(
            full_name=[x509.UniformResourceIdentifier(published_at)],
            relative_name=None,
            only_contains_ca_certs=False,
            only_some_reasons=None,
            only_contains_attribute_certs=False,
            **flags,
        )
        builder = builder.add_extension(idp, critical=True)
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - timedelta(hours=1)).build()
        )
    crl = builder.sign(signer or ark_key, hashes.SHA384(), rsa_padding=_PSS)
    return crl.public_bytes(serialization.Encoding.DER)


def _verify_vlek(chip: VlekChip, **options):
    return Verifier(kds=None).verify(chip.report, chip.vlek_pem, chip.chain_pem, ALLOW_SIMULATED, **options)


# -- the VCEK path ---------------------------------------------------------------------------------------------


def test_empty_crl_passes(ark_key, evidence):
    result = Verifier().verify_evidence(evidence, ALLOW_SIMULATED, crl=_crl(ark_key, evidence))
    assert result.ok, result.summary()
    assert result.check("revocation").ok and result.check("crl_scope").ok


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


# -- scope: a CRL speaks only for the path it is published for -------------------------------------------------


def test_vlek_path_crl_is_refused_for_a_vcek_chain(ark_key, evidence):
    result = Verifier().verify_evidence(
        evidence, ALLOW_SIMULATED, crl=_crl(ark_key, evidence, published_at=VLEK_CRL_URL)
    )
    assert [check.name for check in result.failures] == ["crl_scope", "revocation"]
    assert "VLEK-path CRL for a VCEK-path chain" in result.check("crl_scope").detail


def test_vcek_path_crl_is_refused_for_a_vlek_chain_that_it_would_clear(ark_key, evidence, vlek_chip):
    revoked = [vlek_chip.asvk.certificate.serial_number]
    # The VLEK path's own CRL revokes the ASVK: the twin that shows this chain's revocation is detectable at all.
    own = _verify_vlek(vlek_chip, crl=_crl(ark_key, evidence, revoked=revoked, published_at=VLEK_CRL_URL))
    assert [check.name for check in own.failures] == ["revocation"]
    assert own.check("crl_scope").ok and "revoked: SEV-VLEK-Genoa" in own.check("revocation").detail
    # The VCEK path's CRL, equally ARK-signed, does not list the ASVK: taken for this chain it would say "not
    # revoked"; it is refused instead, by its scope.
    other = _verify_vlek(vlek_chip, crl=_crl(ark_key, evidence, published_at=VCEK_CRL_URL))
    assert not other.ok and [check.name for check in other.failures] == ["crl_scope", "revocation"]
    assert "VCEK-path CRL for a VLEK-path chain" in other.check("crl_scope").detail
    assert "not revoked" not in other.check("revocation").detail


def test_vlek_chain_with_its_own_empty_crl_passes(ark_key, evidence, vlek_chip):
    without_crl = _verify_vlek(vlek_chip)
    assert without_crl.ok, without_crl.summary()  # the VLEK chip verifies at all
    result = _verify_vlek(vlek_chip, crl=_crl(ark_key, evidence, published_at=VLEK_CRL_URL))
    assert result.ok, result.summary()
    assert result.signing_key == "VLEK" and result.check("crl_scope").ok


def test_crl_without_a_distribution_point_needs_its_download_url(ark_key, evidence, vlek_chip):
    crl = _crl(ark_key, evidence, published_at=None)
    unknown = _verify_vlek(vlek_chip, crl=crl)
    assert [check.name for check in unknown.failures] == ["crl_scope", "revocation"]
    assert "--crl-url" in unknown.check("crl_scope").detail
    wrong = _verify_vlek(vlek_chip, crl=crl, crl_url="https://kdsintf.amd.com/vcek/v1/Genoa/crl")
    assert [check.name for check in wrong.failures] == ["crl_scope", "revocation"]
    right = _verify_vlek(vlek_chip, crl=crl, crl_url="https://kdsintf.amd.com/vlek/v1/Genoa/crl")
    assert right.ok, right.summary()


def test_partial_crl_cannot_clear_a_ca_certificate(ark_key, evidence):
    crl = _crl(ark_key, evidence, only_contains_user_certs=True)
    result = Verifier().verify_evidence(evidence, ALLOW_SIMULATED, crl=crl)
    assert "partial" in result.check("crl_scope").detail and not result.ok


def test_crl_from_the_kds_cache_is_scoped_by_where_it_was_fetched(ark_key, evidence, vlek_chip, tmp_path):
    kds = KdsClient(cache_dir=tmp_path, offline=True)
    policy = AttestationPolicy(allow_simulated=True, check_revocation=True)
    path = kds.crl_path(Product.GENOA, "vlek")
    path.parent.mkdir(parents=True)
    path.write_bytes(_crl(ark_key, evidence, published_at=None))  # no IDP: only its URL says what it covers
    result = Verifier(kds).verify(vlek_chip.report, vlek_chip.vlek_pem, vlek_chip.chain_pem, policy)
    assert result.ok, result.summary()
    assert "/vlek/v1/Genoa/crl" in result.check("crl_scope").detail
