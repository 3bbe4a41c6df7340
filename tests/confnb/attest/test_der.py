"""The strict DER reader behind the VCEK extensions: canonical encodings only."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from confnb.attest.der import DerError, read_ia5_string, read_integer, read_octet_string


def _encode_integer(value: int) -> bytes:
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return bytes([0x02, len(body)]) + body


@given(st.integers(min_value=0, max_value=2**64))
def test_integers_round_trip(value):
    assert read_integer(_encode_integer(value)) == value


@pytest.mark.parametrize(
    "encoded",
    [
        b"\x02\x02\x00\x05",  # non-minimal
        b"\x02\x01\x80",  # negative
        b"\x02\x00",  # empty
        b"\x02\x81\x01\x05",  # long-form length for a short value
        b"\x02\x01\x05\x00",  # trailing byte
        b"\x04\x01\x05",  # wrong tag
        b"\x02",
    ],
)
def test_non_canonical_integers_are_refused(encoded):
    with pytest.raises(DerError):
        read_integer(encoded)


def test_real_encodings():
    assert read_integer(bytes.fromhex("020200d9")) == 217
    assert read_ia5_string(bytes.fromhex("16084d696c616e2d4230")) == "Milan-B0"
    assert read_octet_string(b"\x04\x02ab") == b"ab"
    with pytest.raises(DerError):
        read_ia5_string(b"\x16\x01\xff")


@given(st.binary(max_size=300))
def test_random_bytes_never_escape_as_other_errors(data):
    for reader in (read_integer, read_ia5_string, read_octet_string):
        try:
            reader(data)
        except DerError:
            pass


def test_the_unsigned_envelope_of_a_certificate_is_strict(shared_vectors: Path) -> None:
    """Bytes outside tbsCertificate are not signed: a changed unused-bits octet must not pass as the same VCEK."""
    from confnb.attest.certs import CertificateError, load_certificates, parse_certificate
    from confnb.attest.der import check_certificate_envelope

    der = load_certificates((shared_vectors / "openanolis-trustee" / "turin-vcek.der").read_bytes())[0].der
    check_certificate_envelope(der)
    unused = der.rindex(bytes.fromhex("0382020100")) + 4  # the signature BIT STRING's unused-bits octet
    mutated = der[:unused] + b"\x01" + der[unused + 1 :]
    with pytest.raises(DerError, match="unused bits"):
        check_certificate_envelope(mutated)
    with pytest.raises(CertificateError, match="unused bits"):
        parse_certificate(mutated)
    outer_algorithm = der.rindex(bytes.fromhex("06092a864886f70d01010a"))  # rsassaPss, as the outer copy
    swapped = der[:outer_algorithm] + bytes.fromhex("06092a864886f70d01010b") + der[outer_algorithm + 11 :]
    with pytest.raises(DerError, match="differs from the one in tbsCertificate"):
        check_certificate_envelope(swapped)
