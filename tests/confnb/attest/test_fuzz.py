"""Fuzzing the verifier's inputs: whatever bytes arrive, the answer is a verdict or a clean input error."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confnb.attest import Verifier
from confnb.attest.certs import load_certificates
from confnb.attest.errors import AttestInputError, CertificateError
from confnb.attest.report import REPORT_SIZE
from tests.conftest import VECTORS, vector_by_id

pytestmark = pytest.mark.skipif(not VECTORS, reason="real SEV-SNP vectors (../shared) not found")
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(body=st.binary(min_size=REPORT_SIZE - 4, max_size=REPORT_SIZE - 4), version=st.sampled_from([2, 3, 5]))
def test_any_report_with_real_certificates_gets_a_verdict(body, version):
    vector = vector_by_id("R16")
    report = version.to_bytes(4, "little") + body
    result = Verifier(kds=None).verify(report, vector.vek, vector.chain, at=vector.inside_validity)
    assert not result.ok
    assert "report_signature" in {check.name for check in result.failures}


@FUZZ
@given(data=st.binary(max_size=3000))
def test_any_bytes_as_certificates_load_or_fail_cleanly(data):
    try:
        load_certificates(data)
    except CertificateError:
        pass


@FUZZ
@given(st.data())
def test_mutated_vek_gets_a_verdict_or_a_certificate_error(data):
    vector = vector_by_id("R14")
    der = bytearray(load_certificates(vector.vek)[0].der)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(der) - 1))
        der[position] = data.draw(st.integers(0, 255))
    try:
        result = Verifier(kds=None).verify(vector.report, bytes(der), vector.chain, at=vector.inside_validity)
    except AttestInputError:
        return
    if bytes(der) != load_certificates(vector.vek)[0].der:
        assert not result.ok


@FUZZ
@given(text=st.text(max_size=600))
def test_any_text_as_evidence_gets_a_verdict_or_an_input_error(text):
    try:
        Verifier(kds=None).verify_evidence(text)
    except AttestInputError:
        pass
