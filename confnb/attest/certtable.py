"""The GHCB certificate table: how a host hands the guest its VCEK/VLEK and chain next to a report.

Layout (GHCB spec #56421 §4.1.8.1, Linux ``SNP_GET_EXT_REPORT`` and configfs-tsm ``auxblob``): an array of
24-byte entries ``{GUID[16] in RFC 4122 byte order, offset u32 LE, length u32 LE}`` ended by an all-zero entry,
followed by the DER payloads; offsets count from the start of the table. The table comes from the untrusted
host, so parsing is strict about structure (every entry inside the buffer, after the header, no duplicates) and
raises :class:`CertTableError` for anything else; it does not judge the certificates themselves.

Both sides read it: the TEE backends inside the confidential VM (``kernel_enclave.tee``) and the verifier, which
accepts a table where other tools hand one over (``confnb attest verify --vek TABLE``, a report with its table
appended). It imports nothing from the project, so it stays a pure format module of the enclave's code.
"""

from __future__ import annotations

import base64
import struct
import uuid
from collections.abc import Mapping

VCEK_GUID = "63da758d-e664-4564-adc5-f4b93be8accd"
VLEK_GUID = "a8074bc2-a25a-483e-aae6-39c045a0b8a1"
ASK_GUID = "4ab7b379-bbac-4fe4-a02f-05aef327c782"  # also carries the ASVK when the leaf is a VLEK
ARK_GUID = "c0b406a4-a803-4952-9743-3fb6014cd0ae"
EXTRA_PLATFORM_INFO_GUID = "ecae0c0f-9502-43b1-afa2-0ae2e0d565b6"  # go-sev-guest's product hint, not a cert
GUID_NAMES = {
    VCEK_GUID: "VCEK",
    VLEK_GUID: "VLEK",
    ASK_GUID: "ASK",
    ARK_GUID: "ARK",
    EXTRA_PLATFORM_INFO_GUID: "ExtraPlatformInfo",
}

_ENTRY = struct.Struct("<16sII")
ENTRY_SIZE = _ENTRY.size
_TERMINATOR = bytes(ENTRY_SIZE)
_U32_MAX = 0xFFFF_FFFF
assert ENTRY_SIZE == 24


class CertTableError(ValueError):
    """The bytes are not a well-formed GHCB certificate table."""


def parse_cert_table(buf: bytes) -> dict[str, bytes]:
    """Decode a certificate table into ``{guid: payload}`` (lower-case canonical GUID strings, table order).

    An empty buffer, or one starting with the terminator (what Linux copies when the host supplied no
    certificates), is an empty table.
    """
    data = bytes(buf)
    entries, _header_end = cert_table_entries(data)
    return {guid: data[offset : offset + length] for guid, offset, length in entries}


def cert_table_entries(buf: bytes) -> tuple[list[tuple[str, int, int]], int]:
    """The table's entries as ``(guid, offset, length)`` and where its header ends, checked as in
    :func:`parse_cert_table`; for readers that also want to see what the entries do not cover."""
    data = bytes(buf)
    if not data:
        return [], 0
    headers: list[tuple[str, int, int]] = []
    position = 0
    while True:
        if position + ENTRY_SIZE > len(data):
            raise CertTableError(f"certificate table ends after {len(headers)} entries without its all-zero terminator")
        raw_guid, offset, length = _ENTRY.unpack_from(data, position)
        position += ENTRY_SIZE
        if raw_guid == bytes(16):
            if offset or length:
                raise CertTableError(f"certificate table entry {len(headers)} has a nil GUID but is not zero")
            break
        headers.append((str(uuid.UUID(bytes=raw_guid)), offset, length))
    header_end = position
    seen: set[str] = set()
    for index, (guid, offset, length) in enumerate(headers):
        if guid in seen:
            raise CertTableError(f"certificate table lists {_describe(guid)} twice")
        if offset < header_end:
            raise CertTableError(
                f"certificate table entry {index} ({_describe(guid)}) points into the table header "
                f"(offset {offset} < {header_end})"
            )
        if offset + length > len(data):
            raise CertTableError(
                f"certificate table entry {index} ({_describe(guid)}) spans bytes {offset}..{offset + length} "
                f"of a {len(data)}-byte buffer"
            )
        seen.add(guid)
    return headers, header_end


def build_cert_table(entries: Mapping[str, bytes]) -> bytes:
    """Encode ``{guid: payload}`` as a host would: header entries, terminator, then payloads in order."""
    canonical: list[tuple[uuid.UUID, bytes]] = []
    seen: set[uuid.UUID] = set()
    for key, payload in entries.items():
        try:
            guid = uuid.UUID(key)
        except (ValueError, AttributeError, TypeError):
            raise CertTableError(f"{key!r} is not a GUID") from None
        if guid.int == 0:
            raise CertTableError("the nil GUID is reserved for the table terminator")
        if guid in seen:
            raise CertTableError(f"{_describe(str(guid))} appears twice")
        seen.add(guid)
        canonical.append((guid, bytes(payload)))
    header = bytearray()
    body = bytearray()
    offset = ENTRY_SIZE * (len(canonical) + 1)
    for guid, payload in canonical:
        if offset + len(payload) > _U32_MAX:
            raise CertTableError("certificate table exceeds the 4 GiB that 32-bit offsets can address")
        header += _ENTRY.pack(guid.bytes, offset, len(payload))
        body += payload
        offset += len(payload)
    return bytes(header + _TERMINATOR + body)


def der_to_pem(der: bytes) -> str:
    """PEM-armour a DER certificate without re-encoding it, so the verifier sees the host's exact bytes."""
    encoded = base64.b64encode(der).decode("ascii")
    lines = [encoded[i : i + 64] for i in range(0, len(encoded), 64)]
    return "-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n"


def _describe(guid: str) -> str:
    name = GUID_NAMES.get(guid)
    return f"{name} ({guid})" if name else guid
