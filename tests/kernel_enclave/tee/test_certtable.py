"""The GHCB certificate table comes from the untrusted host: exact layout, and no surprises on garbage."""

from __future__ import annotations

import struct
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from kernel_enclave.tee.certtable import (
    ARK_GUID,
    ASK_GUID,
    VCEK_GUID,
    VLEK_GUID,
    CertTableError,
    build_cert_table,
    der_to_pem,
    parse_cert_table,
)
from kernel_enclave.tee.simulated import SimulatedBackend


def test_guids_are_the_ghcb_ones_in_rfc4122_byte_order() -> None:
    # Byte order as written in the GHCB spec (and as go-sev-guest's uuid.Parse / libuuid's uuid_parse store it).
    assert uuid.UUID(VCEK_GUID).bytes == bytes.fromhex("63da758de6644564adc5f4b93be8accd")
    assert uuid.UUID(VLEK_GUID).bytes == bytes.fromhex("a8074bc2a25a483eaae639c045a0b8a1")
    assert uuid.UUID(ASK_GUID).bytes == bytes.fromhex("4ab7b379bbac4fe4a02f05aef327c782")
    assert uuid.UUID(ARK_GUID).bytes == bytes.fromhex("c0b406a4a803495297433fb6014cd0ae")


def test_layout_is_entries_terminator_then_payloads() -> None:
    table = build_cert_table({VCEK_GUID: b"abc", ARK_GUID: b"defg"})
    header = struct.Struct("<16sII")
    assert header.unpack_from(table, 0) == (uuid.UUID(VCEK_GUID).bytes, 72, 3)
    assert header.unpack_from(table, 24) == (uuid.UUID(ARK_GUID).bytes, 75, 4)
    assert table[48:72] == bytes(24)
    assert table[72:] == b"abcdefg"


def test_a_table_written_by_hand_parses() -> None:
    # Payload first, then the header pointing at it from further on: offsets count from the table start.
    entry = uuid.UUID(ASK_GUID).bytes + struct.pack("<II", 48 + 8, 3)
    buf = entry + bytes(24) + b"\xee" * 8 + b"xyz" + bytes(100)  # trailing zeros: Linux copies whole pages
    assert parse_cert_table(buf) == {ASK_GUID: b"xyz"}


@pytest.mark.parametrize("buf", [b"", bytes(24), bytes(4096)])
def test_no_certificates(buf: bytes) -> None:
    # Empty auxblob, or the zero-filled buffer Linux returns when the host supplied nothing.
    assert parse_cert_table(buf) == {}


@pytest.mark.parametrize(
    ("buf", "message"),
    [
        (uuid.UUID(VCEK_GUID).bytes + struct.pack("<II", 48, 0), "without its all-zero terminator"),
        (b"\x01" * 10, "without its all-zero terminator"),
        (bytes(16) + struct.pack("<II", 48, 1) + bytes(24) + b"x", "nil GUID"),
        (uuid.UUID(VCEK_GUID).bytes + struct.pack("<II", 10, 4) + bytes(24) + b"abcd", "points into the table header"),
        (uuid.UUID(VCEK_GUID).bytes + struct.pack("<II", 48, 5) + bytes(24) + b"abcd", "spans bytes 48..53 of a 52"),
        (
            (uuid.UUID(ARK_GUID).bytes + struct.pack("<II", 72, 1)) * 2 + bytes(24) + b"a",
            r"lists ARK \(c0b406a4-a803-4952-9743-3fb6014cd0ae\) twice",
        ),
    ],
)
def test_malformed_tables_are_named(buf: bytes, message: str) -> None:
    with pytest.raises(CertTableError, match=message):
        parse_cert_table(buf)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"not-a-guid": b"x"}, "is not a GUID"),
        ({str(uuid.UUID(int=0)): b"x"}, "reserved for the table terminator"),
        ({VCEK_GUID: b"a", VCEK_GUID.upper(): b"b"}, "appears twice"),
    ],
)
def test_build_refuses_what_cannot_be_a_table(entries: dict[str, bytes], message: str) -> None:
    with pytest.raises(CertTableError, match=message):
        build_cert_table(entries)


guids = st.uuids().filter(lambda u: u.int != 0).map(str)
tables = st.dictionaries(guids, st.binary(max_size=300), max_size=8)


@given(tables)
def test_build_then_parse_is_the_identity(entries: dict[str, bytes]) -> None:
    parsed = parse_cert_table(build_cert_table(entries))
    assert parsed == entries
    assert list(parsed) == list(entries)  # table order is kept


@given(tables, st.binary(max_size=64))
def test_trailing_bytes_do_not_change_the_table(entries: dict[str, bytes], tail: bytes) -> None:
    assert parse_cert_table(build_cert_table(entries) + tail) == entries


@given(st.binary(max_size=512))
def test_random_bytes_give_a_table_or_a_clean_error(buf: bytes) -> None:
    try:
        table = parse_cert_table(buf)
    except CertTableError as exc:  # a ValueError; anything else fails the test
        problem = str(exc)
    else:
        assert all(payload in buf for payload in table.values())
        return
    assert problem
    assert "\n" not in problem


@given(tables.filter(bool), st.data())
def test_damaged_tables_give_a_table_or_a_clean_error(entries: dict[str, bytes], data: st.DataObject) -> None:
    buf = bytearray(build_cert_table(entries))
    for _ in range(data.draw(st.integers(1, 4))):
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    try:
        parse_cert_table(bytes(buf))
    except CertTableError:
        pass


def test_der_to_pem_keeps_the_exact_der(simulated_backend: SimulatedBackend) -> None:
    der = x509.load_pem_x509_certificate(simulated_backend.vcek_pem.encode()).public_bytes(serialization.Encoding.DER)
    pem = der_to_pem(der)
    assert pem.startswith("-----BEGIN CERTIFICATE-----\n")
    assert pem.endswith("-----END CERTIFICATE-----\n")
    assert max(len(line) for line in pem.splitlines()) == 64
    assert x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER) == der
