"""Strict decoding of the three DER values AMD puts in VCEK/VLEK extensions: INTEGER, IA5String, OCTET STRING.

``cryptography`` hands private extensions over as raw extnValue bytes. Decoding them is a few lines, but the
lines must refuse everything DER forbids (long-form lengths for short values, non-minimal integers, trailing
bytes), because a lenient decoder lets two different encodings mean the same TCB.
"""

from __future__ import annotations

TAG_INTEGER = 0x02
TAG_OCTET_STRING = 0x04
TAG_IA5_STRING = 0x16


class DerError(ValueError):
    pass


def read_tlv(data: bytes) -> tuple[int, bytes]:
    """Decode exactly one TLV spanning all of ``data``; return (tag, value)."""
    if len(data) < 2:
        raise DerError("DER value is shorter than a tag and a length")
    tag, first = data[0], data[1]
    if first < 0x80:
        length, offset = first, 2
    else:
        count = first & 0x7F
        if count == 0 or count > 4:
            raise DerError("DER length uses an indefinite or oversized form")
        if len(data) < 2 + count:
            raise DerError("DER length is truncated")
        length = int.from_bytes(data[2 : 2 + count], "big")
        if length < 0x80 or data[2] == 0:
            raise DerError("DER length is not minimally encoded")
        offset = 2 + count
    if len(data) != offset + length:
        raise DerError(f"DER value declares {length} bytes but {len(data) - offset} follow")
    return tag, data[offset:]


def read_integer(data: bytes) -> int:
    """A non-negative DER INTEGER (SPLs and structVersion are never negative)."""
    tag, value = read_tlv(data)
    if tag != TAG_INTEGER:
        raise DerError(f"expected INTEGER (tag 0x02), found tag {tag:#04x}")
    if not value:
        raise DerError("INTEGER has no content bytes")
    if len(value) > 1 and ((value[0] == 0 and value[1] < 0x80) or (value[0] == 0xFF and value[1] >= 0x80)):
        raise DerError("INTEGER is not minimally encoded")
    if value[0] & 0x80:
        raise DerError("INTEGER is negative")
    return int.from_bytes(value, "big")


def read_ia5_string(data: bytes) -> str:
    tag, value = read_tlv(data)
    if tag != TAG_IA5_STRING:
        raise DerError(f"expected IA5String (tag 0x16), found tag {tag:#04x}")
    if any(byte > 0x7F for byte in value):
        raise DerError("IA5String holds non-ASCII bytes")
    return value.decode("ascii")


def read_octet_string(data: bytes) -> bytes:
    tag, value = read_tlv(data)
    if tag != TAG_OCTET_STRING:
        raise DerError(f"expected OCTET STRING (tag 0x04), found tag {tag:#04x}")
    return value
