"""Attestation inputs as other tools write them, made from the real reports and certificates in ../shared.

Each real report is converted into every form other projects hand reports over in, and must decode to the very
same 1184 bytes and then verify; the certificates likewise. The other half is strictness: bytes that only look
like one of these forms must be refused, so that no guess turns garbage into a report.
"""

from __future__ import annotations

import base64
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confnb.attest import Verifier
from confnb.attest.certs import Role, load_certificates
from confnb.attest.certtable import (
    ARK_GUID,
    ASK_GUID,
    EXTRA_PLATFORM_INFO_GUID,
    VCEK_GUID,
    VLEK_GUID,
    build_cert_table,
    der_to_pem,
)
from confnb.attest.errors import CertificateError, ReportFormatError
from confnb.attest.inputs import ReportInput, decode_report, load_certificate_input
from confnb.attest.report import REPORT_SIZE
from tests.conftest import Vector, vector_by_id

RUNTIME_HEADER = struct.Struct("<IIIII")  # data size, version, report type, hash type, variable data size


def _runtime_header(variable_size: int = 1200, version: int = 1, report_type: int = 2, hash_type: int = 1) -> bytes:
    return RUNTIME_HEADER.pack(RUNTIME_HEADER.size + variable_size, version, report_type, hash_type, variable_size)


def _wrapped(text: bytes, width: int) -> bytes:
    return b"\n".join(text[i : i + width] for i in range(0, len(text), width)) + b"\n"


def _certificates(vector: Vector) -> tuple[bytes, list[bytes]]:
    """The vector's VEK and its ASK/ASVK and ARK, as DER (some VEK files carry the chain too)."""
    certs = {cert.der: cert for cert in load_certificates(vector.vek) + load_certificates(vector.chain)}.values()
    leaf = next(cert for cert in certs if cert.role in (Role.VCEK, Role.VLEK))
    issuer = next(cert for cert in certs if cert.role in (Role.ASK, Role.ASVK) and cert.subject == leaf.issuer)
    ark = next(cert for cert in certs if cert.role is Role.ARK and cert.product is issuer.product)
    return leaf.der, [issuer.der, ark.der]


def _table(vector: Vector) -> bytes:
    """The vector's certificates as a host's /dev/sev-guest certificate table, zero-padded to a page."""
    leaf, (issuer, ark) = _certificates(vector)
    leaf_guid = VLEK_GUID if vector.signing_key == "VLEK" else VCEK_GUID
    table = build_cert_table({leaf_guid: leaf, ASK_GUID: issuer, ARK_GUID: ark})
    return table + bytes(-len(table) % 4096)


def _guest_response(report: bytes) -> bytes:
    response = struct.pack("<II", 0, REPORT_SIZE) + bytes(24) + report
    return response + bytes(4000 - len(response))


# Every form a real report is written in by some tool, and the container name it must be read as.
FORMS = {
    "raw": (lambda v: v.report, "raw"),
    "raw with a trailing newline": (lambda v: v.report + b"\n", "raw+newline"),
    "raw with a trailing CRLF": (lambda v: v.report + b"\r\n", "raw+newline"),
    "hex": (lambda v: v.report.hex().encode(), "hex"),
    "hex with 0x, upper case, newline": (lambda v: b"0x" + v.report.hex().upper().encode() + b"\n", "hex"),
    "hex wrapped at 64 columns": (lambda v: _wrapped(v.report.hex().encode(), 64), "hex"),
    "base64 (one line, as AWS's guides and Constellation write it)": (lambda v: base64.b64encode(v.report), "base64"),
    "base64 wrapped at 76 columns": (lambda v: base64.encodebytes(v.report), "base64"),
    "base64url without padding (Azure JSON)": (
        lambda v: base64.urlsafe_b64encode(v.report).rstrip(b"="),
        "base64url",
    ),
    "Azure report with its runtime-data header": (
        lambda v: v.report + _runtime_header(),
        "azure-report+runtime-header",
    ),
    "/dev/sev-guest response": (lambda v: _guest_response(v.report), "sev-guest-response"),
    "hex of a /dev/sev-guest response": (lambda v: _guest_response(v.report).hex().encode(), "hex/sev-guest-response"),
    "report with its certificate table": (lambda v: v.report + _table(v), "report+cert-table"),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_every_form_of_every_real_report_decodes_to_it_and_verifies(vector, form):
    convert, container = FORMS[form]
    found = decode_report(convert(vector))
    assert found.report == vector.report and found.container == container
    leaf, chain = _certificates(vector)
    if form == "report with its certificate table":
        assert found.certificates == (leaf, *chain)
    result = Verifier(kds=None).verify(found.report, leaf, b"".join(chain), at=vector.inside_validity)
    assert result.ok, result.summary()


def test_real_azure_hcl_reports_cut_with_their_runtime_header(shared_vectors):
    """Tools that slice the HCL report at the end of the runtime-data header get 1204 bytes."""
    for name in ("genoa", "v0", "v1", "v2"):
        hcl = (shared_vectors / f"derived/trustee_az_evidence-{name}_hcl.bin").read_bytes()
        expected = (shared_vectors / f"derived/trustee_az_evidence-{name}_snp_report.bin").read_bytes()
        assert decode_report(hcl[0x20 : 0x20 + REPORT_SIZE + 20]) == ReportInput(
            expected, "azure-report+runtime-header"
        )
        assert decode_report(base64.urlsafe_b64encode(hcl).rstrip(b"=")).container == "base64url/azure-hcl"


def test_a_real_report_saved_with_a_trailing_newline(shared_vectors):
    """LIT Protocol's bad-signature vector is their report with one changed byte and a newline at the end."""
    found = decode_report((shared_vectors / "lit-sev-snp-utils/guest_report_bad_sig.bin").read_bytes())
    genuine = (shared_vectors / "lit-sev-snp-utils/guest_report.bin").read_bytes()
    assert found.container == "raw+newline"
    assert [i for i in range(REPORT_SIZE) if found.report[i] != genuine[i]] == [0x15B]


# -- certificates ----------------------------------------------------------------------------------------------


def test_certificate_table_as_vek_carries_the_whole_chain(vector):
    certificates = load_certificate_input(_table(vector), "--vek")
    assert [cert.der for cert in certificates] == [_certificates(vector)[0], *_certificates(vector)[1]]
    result = Verifier(kds=None).verify(vector.report, _table(vector), at=vector.inside_validity)
    assert result.ok, result.summary()


@pytest.mark.parametrize("encoding", ["DER", "PEM"])
def test_concatenated_chain_files(vector, encoding):
    leaf, chain = _certificates(vector)
    joined = b"".join(chain) if encoding == "DER" else "".join(der_to_pem(der) for der in chain).encode()
    assert [cert.der for cert in load_certificate_input(joined)] == chain
    result = Verifier(kds=None).verify(vector.report, leaf, joined, at=vector.inside_validity)
    assert result.ok, result.summary()


def test_table_entries_must_hold_the_certificate_their_guid_names():
    vector = vector_by_id("R14")
    leaf, (issuer, ark) = _certificates(vector)
    swapped = build_cert_table({VCEK_GUID: ark, ASK_GUID: issuer, ARK_GUID: leaf})
    with pytest.raises(CertificateError, match="entry VCEK holds 'ARK-Turin'"):
        load_certificate_input(swapped, "--vek")
    with pytest.raises(ReportFormatError, match="entry VCEK holds 'ARK-Turin'"):
        decode_report(vector.report + swapped)


def test_non_certificate_entries_are_passed_over_and_a_broken_certificate_is_named():
    vector = vector_by_id("R14")
    leaf, (_issuer, ark) = _certificates(vector)
    table = build_cert_table({EXTRA_PLATFORM_INFO_GUID: b"\x01\x00\x00\x00", VCEK_GUID: leaf, ARK_GUID: ark})
    assert [cert.der for cert in load_certificate_input(table)] == [leaf, ark]
    broken = build_cert_table({VCEK_GUID: leaf[:-10], ARK_GUID: ark})
    with pytest.raises(CertificateError, match="entry VCEK"):
        load_certificate_input(broken, "--vek")


# -- strictness: nothing else is taken for a report ------------------------------------------------------------

REFUSED = {
    "one stray byte after a report": lambda r: r + b"x",
    "two newlines after a report": lambda r: r + b"\n\n",
    "20 zero bytes after a report": lambda r: r + bytes(20),
    "a runtime header of version 2": lambda r: r + _runtime_header(version=2),
    "a runtime header of a TDX report": lambda r: r + _runtime_header(report_type=4),
    "a runtime header with an unknown hash": lambda r: r + _runtime_header(hash_type=9),
    "a runtime header whose sizes disagree": lambda r: r + _runtime_header()[:-4] + struct.pack("<I", 7),
    "a table with bytes outside its entries": lambda r: r + build_cert_table({}) + b"\x01",
    "a report one byte short, as hex": lambda r: r[:-1].hex().encode(),
    "hex with an odd digit": lambda r: r.hex().encode() + b"0",
    "hex with 0x twice": lambda r: b"0x0x" + r.hex().encode(),
    "base64 with stray bits in its last character": lambda r: base64.b64encode(r)[:-2] + b"B=",
    "base64 with its padding cut": lambda r: base64.b64encode(r)[:-1],
    "a report truncated by a byte": lambda r: r[:-1],
    "text that only mentions a report": lambda r: b"report: " + r.hex().encode(),
}


@pytest.mark.parametrize("mangle", list(REFUSED))
def test_lookalikes_are_refused_in_one_line(mangle):
    report = vector_by_id("R16").report
    data = REFUSED[mangle](report)
    with pytest.raises(ReportFormatError) as refused:
        decode_report(data)
    assert "\n" not in str(refused.value) and str(len(data)) in str(refused.value)


def test_a_report_with_an_empty_table_carries_no_certificates():
    """What Linux returns when the host supplied no certificates: a zero-filled buffer, an empty table."""
    report = vector_by_id("R16").report
    assert decode_report(report + bytes(4096)) == ReportInput(report, "report+cert-table", ())


def test_the_guard_against_stray_base64_bits_has_a_twin():
    report = vector_by_id("R16").report
    encoded = base64.b64encode(report)
    assert encoded.endswith(b"A=")  # 1184 bytes leave 2 spare bits in the last character, which must be zero
    assert decode_report(encoded).report == report


@settings(max_examples=200, deadline=None)
@given(tail=st.binary(min_size=1, max_size=300))
def test_no_tail_turns_into_a_certificate_table_by_chance(tail):
    report = vector_by_id("R16").report
    if tail in (b"\n", b"\r\n") or (len(tail) >= 24 and not any(tail)):
        return  # a newline, or an empty table in a zero-filled buffer: see the tests of those forms
    with pytest.raises(ReportFormatError):
        decode_report(report + tail)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=3000))
def test_arbitrary_certificate_input_loads_or_fails_in_one_line(data):
    try:
        certificates, message = load_certificate_input(data), ""
    except CertificateError as exc:
        certificates, message = [], str(exc)
    assert bool(certificates) != bool(message) and "\n" not in message
