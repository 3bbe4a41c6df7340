"""The strict DER reader behind the VCEK extensions: canonical encodings only."""

from __future__ import annotations

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
