"""Appraisal: every policy key, passing and failing, on real reports (appraisal reads fields, not signatures)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from confnb.attest import AttestationPolicy, AttestationReport
from confnb.attest.appraisal import appraise
from confnb.attest.report import Product
from confnb.attest.result import Outcome
from tests.conftest import vector_by_id

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
R2_MEASUREMENT = "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f"
R2_CHIP_ID = (
    "d49554ec717f4e5b0fe6b143bcf0405bd7ae304727edf46603f2a76aef6a3abc"
    "15d7af38db757039029f0efacfd08e244324884738c72b082e2f87a44d541eb6"
)


def _report(vector_id: str, **patch: tuple[int, bytes]) -> tuple[AttestationReport, Product | None]:
    vector = vector_by_id(vector_id)
    data = bytearray(vector.report)
    for offset, value in patch.values():
        data[offset : offset + len(value)] = value
    report = AttestationReport.parse(bytes(data))
    return report, Product.from_name(vector.product)


def _outcomes(vector_id: str, toml: str, claims=None, **patch) -> dict[str, Outcome]:
    report, product = _report(vector_id, **patch)
    policy = AttestationPolicy.from_toml("[attestation]\nmax_vmpl = 3\n" + toml)
    checks = appraise(report, policy, product, report.signing_key.name, claims, NOW)
    return {check.name: check.outcome for check in checks}


def _only_failure(vector_id: str, toml: str, **kwargs) -> str:
    failures = [name for name, outcome in _outcomes(vector_id, toml, **kwargs).items() if outcome is Outcome.FAIL]
    assert len(failures) <= 1, failures
    return failures[0] if failures else ""


def test_the_default_policy_passes_a_plain_report():
    assert _only_failure("R2", "") == ""
    assert _outcomes("R2", "")["measurement"] is Outcome.SKIP


@pytest.mark.parametrize(
    ("toml", "failing"),
    [
        (
            f'measurements = ["{R2_MEASUREMENT}"]',
            "",
        ),
        ('measurements = ["' + "00" * 48 + '"]', "measurement"),
        ("measurements = []", "measurement"),
        ('host_data = ["' + "00" * 32 + '"]', ""),
        ('host_data = ["' + "01" * 32 + '"]', "host_data"),
        (
            f'chip_ids = ["{R2_CHIP_ID}"]',
            "",
        ),
        ('chip_ids = ["' + "00" * 64 + '"]', "chip_id"),
        ('family_ids = ["' + "00" * 16 + '"]', ""),
        ('image_ids = ["' + "11" * 16 + '"]', "image_id"),
        ('id_key_digests = ["' + "00" * 48 + '"]', ""),
        ('author_key_digests = ["' + "22" * 48 + '"]', "author_key_digest"),
        ("require_author_key = true", "author_key"),
        ("min_tcb = { bootloader = 3, tee = 0, snp = 8, microcode = 115 }", ""),
        ("min_tcb = { snp = 9 }", "min_tcb"),
        ("min_launch_tcb = { microcode = 116 }", "min_launch_tcb"),
        ("guest_policy = { smt_allowed = true, single_socket = false }", ""),
        ("guest_policy = { smt_allowed = false }", "guest_policy"),
        ("platform_info = { smt_enabled = true, alias_check_complete = false }", ""),
        ("platform_info = { tsme_enabled = true }", "platform_info"),
        ('min_abi = "0.0"', ""),
        ('min_abi = "1.51"', "min_abi"),
        ('min_firmware = "1.52"', ""),
        ('min_firmware = "1.52.5"', "min_firmware"),
        ("min_guest_svn = 1", "guest_svn"),
        ('products = ["Milan"]', ""),
        ('products = ["Genoa", "Turin"]', "product_allowed"),
        ('signing_keys = ["VLEK"]', "signing_key_allowed"),
        ("required_current_mitigations = 1", "current_mitigations"),
    ],
)
def test_each_key_on_a_milan_v2_report(toml, failing):
    assert _only_failure("R2", toml) == failing


def test_turin_floors_use_the_fmc_layout_and_per_product_tables():
    assert _only_failure("R14", "[attestation.min_tcb.Turin]\nfmc = 1\nsnp = 5\n") == ""
    assert _only_failure("R14", "[attestation.min_tcb.Turin]\nfmc = 2\n") == "min_tcb"
    assert _only_failure("R14", "[attestation.min_tcb.Milan]\nsnp = 99\n") == ""  # another product's table


def test_mitigation_vectors_of_v5_reports():
    assert _only_failure("R14", "required_launch_mitigations = 0x3f") == ""
    assert _only_failure("R14", "required_launch_mitigations = 0x40") == "launch_mitigations"


def test_guest_abi_of_azure_reports():
    assert _only_failure("R3", 'min_abi = "0.31"') == ""
    assert _only_failure("R3", 'min_abi = "0.32"') == "min_abi"


def test_debug_and_migration_agent():
    assert _only_failure("R1", "") == "debug"
    assert _only_failure("R1", "reject_debug = false") == ""
    assert _only_failure("R2", "", policy=(0x08, (0x30000 | 1 << 18).to_bytes(8, "little"))) == "migration_agent"
    assert (
        _only_failure("R2", "reject_migration_agent = false", policy=(0x08, (0x30000 | 1 << 18).to_bytes(8, "little")))
        == ""
    )


def test_vmpl_limit():
    report, product = _report("R4")  # VMPL 1
    assert _only_failure("R4", "") == ""  # the helper's base policy allows VMPL 3
    strict = AttestationPolicy.from_toml("[attestation]\nmax_vmpl = 0\n")
    failing = [c.name for c in appraise(report, strict, product, "VLEK", None, NOW) if not c.ok]
    assert failing == ["vmpl"]


def test_provisional_firmware():
    running_newer = (0x1E8, bytes([5, 52, 1]))  # CURRENT 1.52.5 with 1.52.4 committed
    assert _only_failure("R2", "", current=running_newer) == "provisional_firmware"
    assert _only_failure("R2", "permit_provisional_firmware = true", current=running_newer) == ""
    assert _only_failure("R3", "") == ""  # CURRENT microcode 206 > committed 115: microcode is never committed


def test_evidence_age():
    fresh = {"issued_at": (NOW - timedelta(seconds=30)).isoformat()}
    stale = {"issued_at": (NOW - timedelta(seconds=900)).isoformat()}
    future = {"issued_at": (NOW + timedelta(seconds=600)).isoformat()}
    assert _only_failure("R2", "max_evidence_age_s = 300", claims=fresh) == ""
    assert _only_failure("R2", "max_evidence_age_s = 300", claims=stale) == "evidence_age"
    assert _only_failure("R2", "max_evidence_age_s = 300", claims=future) == "evidence_age"
    assert _only_failure("R2", "max_evidence_age_s = 300", claims={"issued_at": "soon"}) == "evidence_age"
    assert _only_failure("R2", "max_evidence_age_s = 300") == "evidence_age"  # a bare report proves no age
