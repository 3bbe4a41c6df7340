"""The verifier on the 19 real reports: exactly the outcomes vectors.json promises, and nothing more."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from confnb.attest import AttestationPolicy, Outcome, Verifier, verify
from confnb.attest.kds import KdsClient
from confnb.attest.result import REQUIRED_CHECKS
from tests.conftest import vector_by_id

DEBUG_ONLY = AttestationPolicy.from_toml("[attestation]\nreject_debug = true\nmax_vmpl = 3\n")
EXPIRED_VLEKS = {"R4", "R15"}  # both VLEK-signed, both with certificates that expired in 2025


@pytest.fixture
def verifier():
    return Verifier(kds=None)


def test_every_real_report_is_authentic(verifier, vector):
    result = verifier.verify(vector.report, vector.vek, vector.chain, at=vector.inside_validity)
    assert result.ok, result.summary()
    assert not result.simulated
    assert result.product is not None and result.product.value in vector.product
    names = [check.name for check in result.checks]
    assert set(REQUIRED_CHECKS) <= set(names)
    expected = vector.expected
    assert result.check("report_signature").ok is expected["signature"]
    assert result.check("vek_signed_by_ask").ok is expected["chain"]
    assert result.check("tcb_binding").outcome is Outcome.PASS
    chip = result.check("chip_binding").outcome
    assert chip is (Outcome.PASS if expected["chip_matches_vek"] else Outcome.SKIP)


def test_today_only_the_expired_vleks_fail_and_only_on_validity(verifier, vector):
    today = datetime(2026, 11, 27, tzinfo=UTC)
    result = verifier.verify(vector.report, vector.vek, vector.chain, at=today)
    if vector.id in EXPIRED_VLEKS:
        assert [check.name for check in result.failures] == ["cert_validity"]
        assert "SEV-VLEK" in result.check("cert_validity").detail
    else:
        assert result.ok, result.summary()


@pytest.mark.parametrize("vector_id", sorted(EXPIRED_VLEKS))
def test_expired_vlek_is_accepted_inside_its_validity(verifier, vector_id):
    vector = vector_by_id(vector_id)
    assert verifier.verify(vector.report, vector.vek, vector.chain, at=vector.inside_validity).ok
    late = vector.vek_not_after.replace(year=vector.vek_not_after.year + 1)
    assert not verifier.verify(vector.report, vector.vek, vector.chain, at=late).ok


def test_r1_is_rejected_by_reject_debug_and_by_nothing_else(verifier, vector):
    result = verifier.verify(vector.report, vector.vek, vector.chain, policy=DEBUG_ONLY, at=vector.inside_validity)
    if vector.id == "R1":
        assert [check.name for check in result.failures] == ["debug"]
        lenient = AttestationPolicy.from_toml("[attestation]\nreject_debug = false\nmax_vmpl = 3\n")
        assert verifier.verify(vector.report, vector.vek, vector.chain, policy=lenient, at=vector.inside_validity).ok
    else:
        assert result.ok, result.summary()


def test_module_level_verify_matches_the_documented_signature(vector):
    result = verify(vector.report, vek=vector.vek, chain=vector.chain, policy=None, at=vector.inside_validity)
    assert result.ok
    document = result.to_dict()
    assert document["verified"] is True
    assert all(set(check) >= {"name", "ok", "detail"} for check in document["checks"])
    assert document["report"]["measurement"] == vector.meta["measurement"]


def test_missing_vcek_comes_from_the_cache_offline(tmp_path, vector):
    if vector.signing_key != "VCEK":
        pytest.skip("VLEKs cannot be fetched: they must come with the evidence")
    from confnb.attest.certs import load_certificates, vek_extensions
    from confnb.attest.report import AttestationReport

    kds = KdsClient(cache_dir=tmp_path, offline=True)
    report = AttestationReport.parse(vector.report)
    vek = load_certificates(vector.vek)[0]
    product = vek_extensions(vek.der).product
    cache_file = (
        tmp_path / "vcek" / product.value / (report.chip_id[:8] if product.value == "Turin" else report.chip_id).hex()
    )
    cache_file.mkdir(parents=True)
    (cache_file / f"{report.reported_tcb_raw.hex()}.der").write_bytes(vek.der)
    result = Verifier(kds).verify(vector.report, None, vector.chain, at=vector.inside_validity)
    assert result.ok, result.summary()


@pytest.mark.parametrize("vector_id", sorted(EXPIRED_VLEKS))
def test_vlek_report_without_vlek_says_so(verifier, vector_id):
    vector = vector_by_id(vector_id)
    result = verifier.verify(vector.report, None, vector.chain, at=vector.inside_validity)
    assert "VLEK" in result.check("certificates").detail and not result.ok


def test_raw_report_nonce_is_compared_with_report_data(verifier):
    vector = vector_by_id("R1")  # its REPORT_DATA is the nonce 0102030405, zero-padded
    good = verifier.verify(vector.report, vector.vek, vector.chain, nonce=bytes.fromhex("0102030405"))
    assert good.ok and good.check("nonce").ok
    bad = verifier.verify(vector.report, vector.vek, vector.chain, nonce=bytes.fromhex("0102030406"))
    assert [check.name for check in bad.failures] == ["nonce"]


def test_naive_time_is_refused(verifier):
    vector = vector_by_id("R2")
    from confnb.attest.errors import AttestInputError

    with pytest.raises(AttestInputError, match="time zone"):
        verifier.verify(vector.report, vector.vek, vector.chain, at=datetime(2026, 1, 1))  # noqa: DTZ001
