"""ATTESTATION_REPORT parsing: every field of the real reports, byte-exact round trips, and fuzzing."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confnb.attest.errors import ReportFormatError
from confnb.attest.inputs import extract_report
from confnb.attest.report import REPORT_SIZE, AttestationReport, Product, SigningKey
from confnb.attest.tcb import TcbLayout, TcbVersion


def test_real_reports_decode_as_the_manifest_says(vector):
    report = AttestationReport.parse(vector.report)
    meta = vector.meta
    assert report.version == meta["version"]
    assert report.policy.raw == meta["policy"]
    assert report.platform_info.raw == meta["platform_info"]
    assert report.vmpl == meta["vmpl"]
    assert report.chip_id.hex() == meta["chip_id"]
    assert report.report_data.hex() == meta["report_data"]
    assert report.measurement.hex() == meta["measurement"]
    assert report.signing_key is SigningKey[meta["signing_key"]]
    assert report.reported_tcb_raw.hex() == meta["reported_tcb"]["raw"]
    if meta["cpuid"] is None:
        assert report.cpuid_fam_id is None
    else:
        assert [report.cpuid_fam_id, report.cpuid_mod_id, report.cpuid_step] == meta["cpuid"]
    assert report.reserved_problems() == ()
    assert report.signature_padding_problems() == []


def test_real_reports_round_trip_byte_exact(vector):
    assert AttestationReport.parse(vector.report).to_bytes() == vector.report


def test_turin_tcb_uses_the_fmc_layout(vector):
    product = Product.from_name(vector.product)
    tcb = AttestationReport.parse(vector.report).reported_tcb(product)
    expected = vector.meta["reported_tcb"]
    assert (tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode) == (
        expected["bl"],
        expected["tee"],
        expected["snp"],
        expected["ucode"],
    )
    assert (tcb.fmc is not None) == (product is Product.TURIN)
    if product is Product.TURIN:
        assert tcb.fmc == expected["fmc"]


def test_legacy_layout_would_misread_turin():
    raw = bytes.fromhex("0103020500000061")  # the real R14 TCB: fmc1 bl3 tee2 snp5 ucode97
    turin = TcbVersion.decode(raw, TcbLayout.TURIN)
    legacy = TcbVersion.decode(raw, TcbLayout.LEGACY)
    assert turin.components() == {"fmc": 1, "bootloader": 3, "tee": 2, "snp": 5, "microcode": 97}
    assert legacy.components() != turin.components()
    assert turin.encode() == raw and legacy.encode() == raw


@pytest.mark.parametrize(
    ("family", "model", "product"),
    [
        (0x19, 0x01, Product.MILAN),
        (0x19, 0x11, Product.GENOA),
        (0x19, 0xA0, Product.GENOA),
        (0x1A, 0x02, Product.TURIN),
        (0x1A, 0x90, None),
        (0x17, 0x31, None),
    ],
)
def test_product_from_cpuid(family, model, product):
    assert Product.from_cpuid(family, model) is product


def test_version_2_keeps_cpuid_bytes_reserved(vector):
    report = AttestationReport.parse(vector.report)
    assert len(report.reserved_0x18b) == (24 if report.version == 2 else 21)
    assert (report.launch_mit_vector is None) == (report.version < 5)


@pytest.mark.parametrize("size", [0, 1, 793, REPORT_SIZE - 1, REPORT_SIZE + 1, 4096])
def test_wrong_lengths_are_refused_with_the_length(size):
    with pytest.raises(ReportFormatError, match=str(size)):
        AttestationReport.parse(bytes(size))


@pytest.mark.parametrize("version", [0, 1, 6, 0xFFFFFFFF])
def test_unknown_versions_are_refused(version):
    data = struct.pack("<I", version) + bytes(REPORT_SIZE - 4)
    with pytest.raises(ReportFormatError, match="version"):
        AttestationReport.parse(data)


def test_reserved_fields_are_reported_not_hidden(vector):
    for offset, expected in [(0x04C, "0x04C"), (0x1EB, "0x1EB"), (0x290, "reserved bytes"), (0x19F, "0x19F")]:
        data = bytearray(vector.report)
        data[offset] ^= 0x01
        problems = AttestationReport.parse(bytes(data)).reserved_problems()
        assert any(expected in problem for problem in problems), (offset, problems)
        assert AttestationReport.parse(bytes(data)).to_bytes() == bytes(data)


def test_containers_are_unwrapped(shared_vectors):
    response = (shared_vectors / "lit-sev-snp-utils/snp_report_msg_resp.bin").read_bytes()
    report, container = extract_report(response)
    assert container == "sev-guest-response" and AttestationReport.parse(report).version == 2
    hcl = (shared_vectors / "derived/trustee_az_evidence-genoa_hcl.bin").read_bytes()
    report, container = extract_report(hcl)
    assert container == "azure-hcl"
    assert report == (shared_vectors / "derived/trustee_az_evidence-genoa_snp_report.bin").read_bytes()
    text = (shared_vectors / "teekit/sev-gcp.hex").read_bytes()
    report, container = extract_report(text)
    assert container == "hex" and report == (shared_vectors / "teekit/sev-gcp.bin").read_bytes()


def test_truncated_real_file_is_refused(shared_vectors):
    with pytest.raises(ReportFormatError, match="793 bytes"):
        extract_report((shared_vectors / "lit-sev-snp-utils/guest_report_corrupt.bin").read_bytes())


_VERSION = st.sampled_from([2, 3, 4, 5]).map(lambda v: struct.pack("<I", v))


@settings(max_examples=300, deadline=None)
@given(body=st.binary(min_size=REPORT_SIZE - 4, max_size=REPORT_SIZE - 4), version=_VERSION)
def test_any_report_sized_input_round_trips(body, version):
    data = version + body
    report = AttestationReport.parse(data)
    assert report.to_bytes() == data
    report.to_dict()  # every field decodes without raising
    report.reserved_problems()


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=5000))
def test_arbitrary_bytes_parse_or_fail_cleanly(data):
    try:
        extract_report(data)
        AttestationReport.parse(data)
    except ReportFormatError:
        pass
