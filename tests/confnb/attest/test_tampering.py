"""Mutation tests: every kind of tampering is rejected, and by the check that names what was tampered with.

Positions are drawn from a seeded generator, so each run covers the same several thousand mutations and a
failure is reproducible.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from confnb.attest import Verifier
from confnb.attest.certs import Role, load_certificates
from confnb.attest.errors import CertificateError, ReportFormatError
from confnb.attest.report import SIGNED_SIZE
from tests.conftest import vector_by_id

FLIPS_PER_REGION = 24


@pytest.fixture(scope="module")
def verifier():
    return Verifier(kds=None)


def _flip(data: bytes, position: int, bit: int) -> bytes:
    mutated = bytearray(data)
    mutated[position] ^= 1 << bit
    return bytes(mutated)


def _positions(seed: str, start: int, stop: int, count: int = FLIPS_PER_REGION) -> list[tuple[int, int]]:
    generator = random.Random(seed)
    return [(generator.randrange(start, stop), generator.randrange(8)) for _ in range(count)]


def _failures(verifier, vector, report=None, vek=None, chain=None):
    result = verifier.verify(
        report or vector.report, vek or vector.vek, chain or vector.chain, at=vector.inside_validity
    )
    assert not result.ok
    return {check.name for check in result.failures}


def test_bit_flips_in_signed_bytes_break_the_signature(verifier, vector):
    for position, bit in _positions(f"signed-{vector.id}", 0, SIGNED_SIZE):
        mutated = _flip(vector.report, position, bit)
        try:
            failures = _failures(verifier, vector, report=mutated)
        except ReportFormatError:
            assert position < 4  # only the version word can make the bytes unparseable
            continue
        assert "report_signature" in failures, (position, bit, failures)


def test_bit_flips_in_the_signature_break_the_signature(verifier, vector):
    for position, bit in _positions(f"sig-{vector.id}", SIGNED_SIZE, len(vector.report)):
        failures = _failures(verifier, vector, report=_flip(vector.report, position, bit))
        assert "report_signature" in failures, (position, bit, failures)


def test_signature_of_w_characters_is_rejected(verifier):
    vector = vector_by_id("R16")  # routex's own negative test overwrites the signature with 'W'
    mutated = vector.report[:SIGNED_SIZE] + b"W" * 512
    assert "report_signature" in _failures(verifier, vector, report=mutated)


def _leaf_and_rest(vector):
    certs = load_certificates(vector.vek) + load_certificates(vector.chain)
    leaf = certs[0]
    return leaf, certs


def _pem(ders: list[bytes]) -> bytes:
    return b"".join(x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM) for der in ders)


def test_bit_flips_in_the_vek_are_caught(verifier, vector):
    leaf, _ = _leaf_and_rest(vector)
    for position, bit in _positions(f"vek-{vector.id}", 0, len(leaf.der)):
        mutated = _flip(leaf.der, position, bit)
        try:
            failures = _failures(verifier, vector, vek=mutated)
        except CertificateError:
            continue  # no longer a certificate at all: refused as unusable input, naming the VEK
        assert failures & {"vek_signed_by_ask", "vek_extensions", "certificates"}, (position, bit, failures)


@pytest.mark.parametrize("role", [Role.ASK, Role.ARK])
def test_bit_flips_in_the_chain_are_caught(verifier, vector, role):
    leaf, certs = _leaf_and_rest(vector)
    issuer_role = Role.ASVK if leaf.role is Role.VLEK else Role.ASK
    target = next(c for c in certs if c.role is (issuer_role if role is Role.ASK else Role.ARK))
    others = [c.der for c in certs[1:] if c.der != target.der]
    expected = {"ask_signed_by_ark", "certificates"} if role is Role.ASK else {"ark_pinned"}
    for position, bit in _positions(f"{role.value}-{vector.id}", 0, len(target.der)):
        try:
            chain = _pem([_flip(target.der, position, bit), *others])
        except ValueError:
            continue  # the flip broke the DER itself
        try:
            result = verifier.verify(vector.report, leaf.der, chain, at=vector.inside_validity)
        except CertificateError:
            continue
        if result.ok:
            # The flip made the certificate no longer the leaf's issuer or a root (its name changed), so the
            # verifier passed it over for AMD's own, which confnb ships: the tampered bytes decided nothing.
            mutated = load_certificates(_flip(target.der, position, bit))[0]
            assert "shipped with confnb" in result.check("certificates").detail, (role, position, bit)
            assert (mutated.subject, mutated.role) != (target.subject, target.role), (role, position, bit)
            continue
        assert {check.name for check in result.failures} & expected, (role, position, bit, result.failures)


def test_vek_from_another_chip_is_rejected(verifier):
    report_of, other = vector_by_id("R2"), vector_by_id("R3")  # both Milan, same TCB, different chips
    failures = _failures(verifier, report_of, vek=other.vek)
    assert {"chip_binding", "report_signature"} <= failures
    assert "tcb_binding" not in failures


def test_vek_at_another_tcb_is_rejected(verifier):
    report_of, other = vector_by_id("R18"), vector_by_id("R11")  # Milan v3 and v5 from different chips/TCBs
    failures = _failures(verifier, report_of, vek=load_certificates(other.vek)[0].der)
    assert {"tcb_binding", "report_signature"} <= failures


@pytest.mark.parametrize(("report_id", "chain_id"), [("R2", "R10"), ("R10", "R14"), ("R14", "R2")])
def test_chain_of_another_product_is_rejected(verifier, report_id, chain_id):
    vector, other = vector_by_id(report_id), vector_by_id(chain_id)
    leaf = load_certificates(vector.vek)[0].der
    failures = _failures(verifier, vector, vek=leaf, chain=other.chain)
    assert "vek_signed_by_ask" in failures


def test_vlek_offered_for_a_vcek_report_is_rejected(verifier):
    vector, vlek = vector_by_id("R2"), vector_by_id("R15")  # both Milan
    failures = _failures(verifier, vector, vek=vlek.vek, chain=vlek.chain)
    assert "signing_key_type" in failures


def test_signing_key_bits_flipped_to_vlek_are_rejected(verifier):
    vector = vector_by_id("R2")
    mutated = bytearray(vector.report)
    mutated[0x48] |= 0b100  # SIGNING_KEY = VLEK
    failures = _failures(verifier, vector, report=bytes(mutated))
    assert {"signing_key_type", "report_signature"} <= failures


# -- a self-made chain that copies AMD's names, extensions and TCB ---------------------------------------


def _amd_name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(x509.NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
            x509.NameAttribute(x509.NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(x509.NameOID.LOCALITY_NAME, "Santa Clara"),
            x509.NameAttribute(x509.NameOID.STATE_OR_PROVINCE_NAME, "CA"),
            x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "Advanced Micro Devices"),
            x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name),
        ]
    )


_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


def _issue(subject: str, issuer: str, key, signer, extensions=()) -> bytes:
    start = datetime(2024, 1, 1, tzinfo=UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_amd_name(subject))
        .issuer_name(_amd_name(issuer))
        .public_key(key)
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=3650))
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(signer, hashes.SHA384(), rsa_padding=_PSS).public_bytes(Encoding.DER)


@pytest.fixture(scope="module")
def forged_milan():
    """A report re-signed by a VCEK under a home-made ARK-Milan/SEV-Milan with AMD's exact names."""
    vector = vector_by_id("R2")
    genuine = x509.load_der_x509_certificate(load_certificates(vector.vek)[0].der)
    ark_key = rsa.generate_private_key(65537, 4096)
    ask_key = rsa.generate_private_key(65537, 4096)
    vcek_key = ec.generate_private_key(ec.SECP384R1())
    crl_point = x509.CRLDistributionPoints(
        [
            x509.DistributionPoint(
                [x509.UniformResourceIdentifier("https://kdsintf.amd.com/vcek/v1/Milan/crl")], None, None, None
            )
        ]
    )
    ark = _issue("ARK-Milan", "ARK-Milan", ark_key.public_key(), ark_key, [crl_point])
    ask = _issue("SEV-Milan", "ARK-Milan", ask_key.public_key(), ark_key, [crl_point])
    copied = [ext.value for ext in genuine.extensions if ext.oid.dotted_string.startswith("1.3.6.1.4.1.3704.")]
    vcek = _issue("SEV-VCEK", "SEV-Milan", vcek_key.public_key(), ask_key, copied)
    r, s = decode_dss_signature(vcek_key.sign(vector.report[:SIGNED_SIZE], ec.ECDSA(hashes.SHA384())))
    signature = r.to_bytes(72, "little") + s.to_bytes(72, "little") + bytes(368)
    return vector, vector.report[:SIGNED_SIZE] + signature, vcek, _pem([ask, ark])


def test_self_made_chain_with_amds_names_fails_only_the_pinned_root(verifier, forged_milan):
    vector, report, vcek, chain = forged_milan
    result = verifier.verify(report, vcek, chain, at=vector.inside_validity)
    assert [check.name for check in result.failures] == ["ark_pinned"]
    assert "not one of AMD's pinned roots" in result.check("ark_pinned").detail


def test_self_made_root_is_not_accepted_as_simulated_either(verifier, forged_milan):
    from confnb.attest import AttestationPolicy

    vector, report, vcek, chain = forged_milan
    permissive = AttestationPolicy(allow_simulated=True, max_vmpl=3)
    result = verifier.verify(report, vcek, chain, policy=permissive, at=vector.inside_validity)
    assert "ark_pinned" in {check.name for check in result.failures}
