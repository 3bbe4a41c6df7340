"""AMD certificates: loading, roles, the X.509 profile, and both hwID encodings in VCEK extensions."""

from __future__ import annotations

import pytest

from confnb.attest.certs import (
    AMD_ORGANIZATION,
    Role,
    load_certificates,
    profile_problems,
    vek_extensions,
)
from confnb.attest.errors import CertificateError
from confnb.attest.report import Product


def test_every_real_vek_decodes_and_matches_its_report_tcb(vector):
    vek = load_certificates(vector.vek)[0]
    ext = vek_extensions(vek.der)
    assert ext.problems == ()
    assert vek.role is Role[vector.signing_key]
    assert ext.product_name == vector.product
    tcb = vector.meta["reported_tcb"]
    expected = {"bootloader": tcb["bl"], "tee": tcb["tee"], "snp": tcb["snp"], "microcode": tcb["ucode"]}
    if "fmc" in tcb:
        expected = {"fmc": tcb["fmc"], **expected}
    assert ext.tcb_components() == expected
    if vector.signing_key == "VCEK":
        assert ext.hw_id is not None and ext.csp_id is None
        assert len(ext.hw_id) == (8 if ext.product is Product.TURIN else 64)
        assert vector.meta["chip_id"].startswith(ext.hw_id.hex())
    else:
        assert ext.hw_id is None and ext.csp_id == "CN=cc-us-east-2.amazonaws.com"
    assert profile_problems(vek, vek.role, AMD_ORGANIZATION) == []


def test_chain_files_hold_amd_roles(vector):
    certs = load_certificates(vector.chain)
    roles = {cert.role for cert in certs}
    assert Role.ARK in roles and (Role.ASK in roles or Role.ASVK in roles)
    for cert in certs:
        assert profile_problems(cert, cert.role, AMD_ORGANIZATION) == []


@pytest.mark.parametrize(("name", "encoding"), [("legacy", "raw"), ("new", "octet-string")])
def test_both_hwid_encodings_seen_in_the_wild(shared_vectors, name, encoding):
    der = (shared_vectors / f"trustee/test_data_snp_test-vcek-invalid-{name}.der").read_bytes()
    ext = vek_extensions(load_certificates(der)[0].der)
    assert ext.hw_id == bytes(range(64))
    assert ext.hw_id_encoding == encoding


def test_structversion_1_turin_vcek_has_fmc_and_8_byte_hwid(shared_vectors):
    ext = vek_extensions(load_certificates((shared_vectors / "virtee-sev/vcek_turin.der").read_bytes())[0].der)
    assert ext.struct_version == 1 and "fmc" in ext.tcb_components()
    assert ext.hw_id == bytes.fromhex("1e550a8ee5cf9f4d")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"hello", "neither PEM nor DER"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "bad PEM"),
        (b"\x30\x03\x02\x01\x00", "not a valid X.509"),
    ],
)
def test_unloadable_input_is_a_clean_error(data, message):
    with pytest.raises(CertificateError, match=message):
        load_certificates(data, "VEK certificate")


def test_truncated_der_is_a_clean_error(vector):
    with pytest.raises(CertificateError):
        load_certificates(vector.vek[:-40] if vector.vek[:1] == b"\x30" else b"\x30" + vector.vek[1:100])


def test_an_unknown_x509_version_is_a_certificate_error(vector):
    der = bytearray(load_certificates(vector.vek)[0].der)
    assert der[8:12] == b"\xa0\x03\x02\x01"  # [0] EXPLICIT INTEGER: the version sits at byte 12
    der[12] = 0x01  # "v2" (found by the fuzzer: cryptography raises InvalidVersion, not ValueError)
    with pytest.raises(CertificateError, match=r"not a valid X\.509"):
        load_certificates(bytes(der))
