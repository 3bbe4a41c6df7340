"""The confnb-evidence/1 format: canonical claims, round trips, and clean errors for malformed bundles."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from confnb.attest.errors import EvidenceError
from confnb.attest.evidence import Evidence, canonical_claims, parse_nonce, parse_rfc3339, report_data_for


def test_canonical_claims_are_sorted_compact_utf8():
    claims = {"nonce": "00ff", "b": "é", "a": "1"}
    assert canonical_claims(claims) == '{"a":"1","b":"é","nonce":"00ff"}'.encode()
    assert report_data_for(claims) == hashlib.sha512(canonical_claims(claims)).digest()


@given(st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=6), st.binary(max_size=1200))
def test_bundles_round_trip(claims, report):
    evidence = Evidence("simulated", report, claims, vek="PEM", chain=("A", "B"))
    again = Evidence.from_json(evidence.to_json())
    assert again == evidence
    assert again.report_data() == report_data_for(claims)


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ("[]", "must be a JSON object"),
        ('{"format": "other"}', "format"),
        ('{"format": "confnb-evidence/1", "tee": "sgx"}', "tee"),
        ('{"format": "confnb-evidence/1", "tee": "simulated", "report": "!!"}', "base64"),
        (
            '{"format": "confnb-evidence/1", "tee": "simulated", "report": "AA==", "claims": {"a": 1}}',
            "string",
        ),
        ('{"format": "confnb-evidence/1", "tee": "simulated", "report": "AA=="}', "claims"),
        (
            '{"format": "confnb-evidence/1", "tee": "simulated", "report": "AA==", "certs": {"chain": "x"}, '
            '"claims": {}}',
            "chain",
        ),
        ("{not json", "not JSON"),
    ],
)
def test_malformed_bundles_are_clean_errors(document, fragment):
    with pytest.raises(EvidenceError, match=fragment):
        Evidence.from_json(document)


@given(st.binary(max_size=400))
def test_any_bytes_give_evidence_or_an_evidence_error(data):
    try:
        Evidence.from_json(data)
    except EvidenceError:
        pass


def test_nonce_and_time_parsing():
    assert parse_nonce("00ff") == b"\x00\xff"
    for bad in ("", "xyz", "00" * 65):
        with pytest.raises(EvidenceError):
            parse_nonce(bad)
    assert parse_rfc3339("2026-01-02T03:04:05Z").year == 2026
    with pytest.raises(EvidenceError, match="time zone"):
        parse_rfc3339("2026-01-02T03:04:05")


def test_digest_names_the_canonical_bundle():
    evidence = Evidence("sev-snp", b"\x01", {"nonce": "01"})
    document = json.loads(evidence.to_json())
    assert base64.b64decode(document["report"]) == b"\x01"
    assert evidence.digest().startswith("sha256:")
