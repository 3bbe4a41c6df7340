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


def split_tlvs(data: bytes) -> list[tuple[int, bytes]]:
    """The TLVs that exactly fill ``data`` (a SEQUENCE's content), each as (tag, whole encoding)."""
    items = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < 2:
            raise DerError("DER value is shorter than a tag and a length")
        first = data[offset + 1]
        count = first & 0x7F if first >= 0x80 else 0
        header = 2 + count
        length = first if first < 0x80 else int.from_bytes(data[offset + 2 : offset + header], "big")
        end = offset + header + length
        if end > len(data):
            raise DerError("DER value runs past its container")
        whole = data[offset:end]
        read_tlv(whole)  # the same strictness for every item
        items.append((data[offset], whole))
        offset = end
    return items


def check_certificate_envelope(der: bytes) -> None:
    """What RFC 5280 fixes around the signed part, which a signature check cannot see.

    The outer signatureAlgorithm and signatureValue are not covered by the signature, so two certificates that
    differ there verify alike: the outer algorithm must equal the one inside tbsCertificate, and the signature
    BIT STRING must have no unused bits.
    """
    tag, content = read_tlv(der)
    items = split_tlvs(content)
    if tag != 0x30 or [item_tag for item_tag, _ in items] != [0x30, 0x30, 0x03]:
        raise DerError("a certificate is SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }")
    tbs_items = split_tlvs(read_tlv(items[0][1])[1])
    inner = tbs_items[2 if tbs_items and tbs_items[0][0] == 0xA0 else 1][1] if len(tbs_items) > 2 else b""
    if inner != items[1][1]:
        raise DerError("the outer signatureAlgorithm differs from the one in tbsCertificate")
    signature = read_tlv(items[2][1])[1]
    if not signature or signature[0] != 0:
        raise DerError("the signature BIT STRING has unused bits")


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
