"""Helpers for the kernel_enclave suites: checking reports the way a verifier would, with real cryptography."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

SIGNED_SIZE = 0x2A0  # written out, not imported: the tests must not share the code under test's constants


def report_signature_valid(report: bytes, vek_pem: str) -> bool:
    """ECDSA P-384/SHA-384 over bytes 0..0x29F, r and s little-endian in 72-byte slots at 0x2A0 and 0x2E8."""
    key = x509.load_pem_x509_certificate(vek_pem.encode()).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    r = int.from_bytes(report[0x2A0 : 0x2A0 + 72], "little")
    s = int.from_bytes(report[0x2E8 : 0x2E8 + 72], "little")
    try:
        key.verify(encode_dss_signature(r, s), report[:SIGNED_SIZE], ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        return False
    return True


@pytest.fixture
def signature_valid() -> Callable[[bytes, str], bool]:
    return report_signature_valid
