"""Attestation inputs as other tools write them: reports and certificates in every form they are handed over in.

A report arrives as the 1184 raw bytes, with a trailing newline, as hex (``0x`` prefix or not, wrapped or not),
as base64 or base64url (AWS's guides, Constellation, Azure's JSON), inside a ``/dev/sev-guest`` response, inside an
Azure HCL report, followed by Azure's 20-byte runtime-data header, or followed by the GHCB certificate table the
host returned with it. Certificates arrive as PEM, as DER, several of either concatenated, or as that table.

Each form is recognised by its exact structure, never guessed: text is decoded only when every character belongs
to the encoding; a container is taken only when its header, lengths and tail are exactly what that container
holds. Every form is tried and exactly one must match: two readings of the same bytes are refused as ambiguous,
so a wrong guess can never turn garbage into a "report". What matched is named (``container``) so a person sees
how the input was read. Decoding is not verification: the verifier still checks everything in the report.

Client side only: the enclave writes reports, it never reads these forms.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

from confnb.attest.certs import Cert, Role, load_certificates, parse_certificate
from confnb.attest.certtable import (
    ARK_GUID,
    ASK_GUID,
    GUID_NAMES,
    VCEK_GUID,
    VLEK_GUID,
    CertTableError,
    cert_table_entries,
    parse_cert_table,
)
from confnb.attest.der import DerError, split_tlvs
from confnb.attest.errors import CertificateError, ReportFormatError
from confnb.attest.report import REPORT_SIZE, SUPPORTED_VERSIONS

GUEST_RESPONSE_SIZE = 4000  # struct snp_report_resp from /dev/sev-guest: status, size, 24 reserved, report, padding
_GUEST_RESPONSE_REPORT = 0x20
HCL_MAGIC = b"HCLA"  # Azure's vTPM HCL report: 32-byte header, the SNP report at 0x20, then the runtime data
_HCL_REPORT = 0x20
# Azure's runtime-data header after the report (IGVM_REQUEST_DATA): data size, version 1, report type 2 (SNP),
# hash type (1 SHA-256, 2 SHA-384, 3 SHA-512), variable data size; data size = 20 + variable data size.
_RUNTIME_HEADER = struct.Struct("<IIIII")
_RUNTIME_VERSION, _RUNTIME_REPORT_TYPE_SNP, _RUNTIME_HASH_TYPES = 1, 2, (1, 2, 3)
_NEWLINES = (b"\n", b"\r\n")

_TEXT_BYTES = frozenset(range(0x20, 0x7F)) | frozenset(b"\t\n\r\v\f")
_HEX = re.compile(rb"(?:0[xX])?([0-9a-fA-F]*)")
_BASE64 = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
_BASE64URL = re.compile(rb"[A-Za-z0-9_-]*={0,2}")

# Which certificate role each GUID of a certificate table may carry.
_TABLE_ROLES = {
    VCEK_GUID: (Role.VCEK,),
    VLEK_GUID: (Role.VLEK,),
    ASK_GUID: (Role.ASK, Role.ASVK),  # the ASK slot carries the ASVK when the leaf is a VLEK
    ARK_GUID: (Role.ARK,),
}
_LEAF_FIRST = (VCEK_GUID, VLEK_GUID, ASK_GUID, ARK_GUID)


@dataclass(frozen=True)
class ReportInput:
    """A report found in its container, with the certificates that travelled with it (VEK first), as DER."""

    report: bytes
    container: str  # e.g. "raw", "hex", "base64/azure-hcl", "report+cert-table"
    certificates: tuple[bytes, ...] = ()


def decode_report(data: bytes) -> ReportInput:
    """Find the one report in ``data``, or raise :class:`ReportFormatError` saying why there is none."""
    data = bytes(data)
    if data and all(byte in _TEXT_BYTES for byte in data):
        return _decode_text(data)
    found = _binary_forms(data)
    if found is None:
        raise ReportFormatError(
            f"not a SEV-SNP attestation report: {len(data)} bytes, expected {REPORT_SIZE} (or hex or base64 text "
            "of them, a /dev/sev-guest response, an Azure HCL report, or a report followed by its certificate "
            "table)"
        )
    return found


def extract_report(data: bytes) -> tuple[bytes, str]:
    """The report and the name of its container (see :func:`decode_report`)."""
    found = decode_report(data)
    return found.report, found.container


# -- binary containers ----------------------------------------------------------------------------------------


def _binary_forms(data: bytes) -> ReportInput | None:
    """The one binary container ``data`` is, or None. The forms exclude each other; the count makes sure."""
    readers: tuple[Callable[[bytes], ReportInput | None], ...] = (
        _raw,
        _raw_with_newline,
        _guest_response,
        _azure_hcl,
        _azure_runtime_header,
        _report_with_cert_table,
    )
    matches: list[ReportInput] = []
    problems: list[ReportFormatError] = []
    for reader in readers:
        try:
            found = reader(data)
        except ReportFormatError as exc:  # the container's shape, but broken: said only if nothing else fits
            problems.append(exc)
            continue
        if found is not None:
            matches.append(found)
    if len(matches) > 1:  # cannot happen with the readers above; refuse rather than pick one if it ever does
        names = ", ".join(found.container for found in matches)
        raise ReportFormatError(f"ambiguous attestation input: {len(data)} bytes read as {names}")
    if not matches and problems:
        raise problems[0]
    return matches[0] if matches else None


def _raw(data: bytes) -> ReportInput | None:
    return ReportInput(data, "raw") if len(data) == REPORT_SIZE else None


def _raw_with_newline(data: bytes) -> ReportInput | None:
    """``echo``/``cat >`` pipelines and some editors end a file with a newline: the report is what precedes it."""
    for newline in _NEWLINES:
        if len(data) == REPORT_SIZE + len(newline) and data.endswith(newline):
            return ReportInput(data[:REPORT_SIZE], "raw+newline")
    return None


def _guest_response(data: bytes) -> ReportInput | None:
    if len(data) != GUEST_RESPONSE_SIZE:
        return None
    status, size = struct.unpack_from("<II", data, 0)
    if status != 0:
        raise ReportFormatError(f"/dev/sev-guest response carries firmware error status {status:#x}")
    if size != REPORT_SIZE:
        return None
    return ReportInput(data[_GUEST_RESPONSE_REPORT : _GUEST_RESPONSE_REPORT + REPORT_SIZE], "sev-guest-response")


def _azure_hcl(data: bytes) -> ReportInput | None:
    if data[:4] != HCL_MAGIC or len(data) < _HCL_REPORT + REPORT_SIZE:
        return None
    return ReportInput(data[_HCL_REPORT : _HCL_REPORT + REPORT_SIZE], "azure-hcl")


def _azure_runtime_header(data: bytes) -> ReportInput | None:
    """The report cut from an HCL report together with the runtime-data header that follows it (1204 bytes)."""
    if len(data) != REPORT_SIZE + _RUNTIME_HEADER.size:
        return None
    size, version, report_type, hash_type, variable_size = _RUNTIME_HEADER.unpack_from(data, REPORT_SIZE)
    if (
        version != _RUNTIME_VERSION
        or report_type != _RUNTIME_REPORT_TYPE_SNP
        or hash_type not in _RUNTIME_HASH_TYPES
        or size != _RUNTIME_HEADER.size + variable_size
    ):
        return None
    return ReportInput(data[:REPORT_SIZE], "azure-report+runtime-header")


def _report_with_cert_table(data: bytes) -> ReportInput | None:
    """A report followed by the certificate table the host returned with it (SNP_GET_EXT_REPORT, ``auxblob``)."""
    if len(data) <= REPORT_SIZE or int.from_bytes(data[:4], "little") not in SUPPORTED_VERSIONS:
        return None
    try:
        table = _strict_table(data[REPORT_SIZE:])
    except CertTableError:
        return None  # not a table: some other form, or none
    try:
        certificates = _table_certificates(table)
    except CertificateError as exc:
        raise ReportFormatError(f"a report followed by a certificate table, but {exc}") from None
    return ReportInput(data[:REPORT_SIZE], "report+cert-table", tuple(cert.der for cert in certificates))


# -- text encodings -------------------------------------------------------------------------------------------


def _decode_text(data: bytes) -> ReportInput:
    """Hex or base64 text of one of the binary forms; exactly one reading may succeed."""
    text = b"".join(data.split())  # dumps come wrapped in lines
    readings: list[ReportInput] = []
    for encoding, decode in (("hex", _from_hex), ("base64", _from_base64), ("base64url", _from_base64url)):
        decoded = decode(text)
        if decoded is None:
            continue
        found = _binary_forms(decoded)
        if found is not None:
            container = encoding if found.container == "raw" else f"{encoding}/{found.container}"
            readings.append(ReportInput(found.report, container, found.certificates))
    if len({reading.report for reading in readings}) > 1:
        names = ", ".join(reading.container for reading in readings)
        raise ReportFormatError(f"ambiguous attestation input: {len(data)} bytes of text read as {names}")
    if readings:
        return readings[0]
    raise ReportFormatError(
        f"not a SEV-SNP attestation report: {len(data)} bytes of text that are neither hex nor base64 of a "
        f"{REPORT_SIZE}-byte report or of a container holding one"
    )


def _from_hex(text: bytes) -> bytes | None:
    match = _HEX.fullmatch(text)
    if match is None or len(match.group(1)) % 2:
        return None
    return binascii.unhexlify(match.group(1))


def _from_base64(text: bytes) -> bytes | None:
    """Padded standard base64, in its canonical form only (no stray bits in the last character)."""
    if _BASE64.fullmatch(text) is None or len(text) % 4:
        return None
    try:
        decoded = base64.b64decode(text, validate=True)
    except binascii.Error:
        return None
    return decoded if base64.b64encode(decoded) == text else None


def _from_base64url(text: bytes) -> bytes | None:
    """base64url as Azure's JSON carries it, padded or not. Text that plain base64 reads the same way (no ``-``
    or ``_``, padded) is left to that reading, so one text never counts as two."""
    if _BASE64URL.fullmatch(text) is None:
        return None
    unpadded = text.rstrip(b"=")
    if b"-" not in text and b"_" not in text and len(text) % 4 == 0:
        return None
    if len(unpadded) % 4 == 1 or (len(text) != len(unpadded) and len(text) % 4):
        return None
    try:
        decoded = base64.urlsafe_b64decode(unpadded + b"=" * (-len(unpadded) % 4))
    except binascii.Error:
        return None
    return decoded if base64.urlsafe_b64encode(decoded).rstrip(b"=") == unpadded else None


# -- certificates ---------------------------------------------------------------------------------------------


def load_certificate_input(data: bytes | str, what: str = "certificate") -> list[Cert]:
    """Certificates from PEM, DER, several of either concatenated, or a GHCB certificate table (VEK first).

    ``what`` names the input in errors (``--vek``, ``certificate chain``), which are one line each.
    """
    raw = data.encode("ascii", "replace") if isinstance(data, str) else bytes(data)
    if not raw:
        raise CertificateError(f"{what}: empty input")
    if b"-----BEGIN" in raw:
        return load_certificates(raw, what)
    readings: list[tuple[str, list[Cert]]] = []
    problems: list[str] = []
    for form, reader in (("DER", _der_sequence), ("certificate table", _certificates_of_table)):
        try:
            certificates = reader(raw)
        except CertificateError as exc:
            problems.append(f"not {form}: {exc}")
            continue
        if certificates:
            readings.append((form, certificates))
        else:
            problems.append(f"a {form} without certificates")
    if len(readings) > 1:
        raise CertificateError(f"{what}: ambiguous, reads both as DER and as a certificate table")
    if not readings:
        raise CertificateError(f"{what}: neither PEM, DER nor a certificate table ({'; '.join(problems)})")
    return readings[0][1]


def _der_sequence(raw: bytes) -> list[Cert]:
    """One DER certificate, or several back to back (``cat ask.der ark.der``), each a complete SEQUENCE."""
    if raw[0] != 0x30:
        raise CertificateError(f"first byte {raw[0]:#04x} does not start a SEQUENCE")
    try:
        items = split_tlvs(raw)
    except DerError as exc:
        raise CertificateError(str(exc)) from None
    if any(tag != 0x30 for tag, _ in items):
        raise CertificateError("something other than a certificate follows the first one")
    return [parse_certificate(der) for _, der in items]


def _strict_table(raw: bytes) -> dict[str, bytes]:
    """A certificate table as a reader of other tools' files must see it: well-formed (see
    :func:`~confnb.attest.certtable.parse_cert_table`), with every byte that no entry covers zero, as the host's
    zero-filled buffer leaves it. The extra rule keeps bytes that merely happen to parse from counting as a table."""
    entries, header_end = cert_table_entries(raw)
    uncovered = bytearray(raw)
    uncovered[:header_end] = bytes(header_end)
    for _guid, offset, length in entries:
        uncovered[offset : offset + length] = bytes(length)
    if any(uncovered):
        raise CertTableError("certificate table has non-zero bytes outside its entries")
    return parse_cert_table(raw)


def _certificates_of_table(raw: bytes) -> list[Cert]:
    try:
        table = _strict_table(raw)
    except CertTableError as exc:
        raise CertificateError(str(exc)) from None
    return _table_certificates(table)


def _table_certificates(table: dict[str, bytes]) -> list[Cert]:
    """The certificates of a GHCB certificate table, leaf first; each must hold the role its GUID names."""
    certificates = []
    for guid in _LEAF_FIRST:
        der = table.get(guid)
        if not der:  # absent, or an empty slot: the host had no such certificate
            continue
        try:
            cert = parse_certificate(der)
        except CertificateError as exc:
            raise CertificateError(f"certificate table entry {GUID_NAMES[guid]}: {exc}") from None
        if cert.role not in _TABLE_ROLES[guid]:
            raise CertificateError(f"certificate table entry {GUID_NAMES[guid]} holds {cert.common_name!r}")
        certificates.append(cert)
    return certificates
