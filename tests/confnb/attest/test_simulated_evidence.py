"""The verifier on the simulated TEE's evidence: its root is refused unless the policy allows it, and the claims
count only when REPORT_DATA binds them.

The broker and the provisioner rely on both (a kernel of someone else's simulated chip, or claims swapped after the
report was signed, must not pass), so the attest suite checks them on its own, with the verifier's public API and
real evidence from a simulated chip. Each refusal has its legitimate twin that passes.
"""

from __future__ import annotations

import dataclasses
import secrets

import pytest

from confnb.attest import AttestationPolicy, Evidence, Outcome, Verifier
from kernel_enclave.attestation import issue_evidence
from kernel_enclave.tee.simulated import SimulatedBackend

NONCE = secrets.token_bytes(16)
CURVE = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"


@pytest.fixture(scope="module")
def evidence(simulated_backend: SimulatedBackend) -> Evidence:
    return issue_evidence(
        simulated_backend, NONCE, hpke_public_key=b"\x04" * 65, signing_public_key=b"k" * 32, curve_public_key=CURVE
    )


def test_a_policy_that_allows_simulated_evidence_accepts_it(evidence: Evidence) -> None:
    """The twin of every refusal below: nothing else is wrong with this evidence."""
    result = Verifier(kds=None).verify_evidence(evidence, AttestationPolicy(allow_simulated=True), nonce=NONCE)
    assert result.ok, [(check.name, check.detail) for check in result.failures]
    ark = result.check("ark_pinned")
    assert ark is not None and ark.outcome is Outcome.PASS and "SIMULATED" in ark.detail
    binding = result.check("report_data_binding")
    assert binding is not None and binding.outcome is Outcome.PASS


@pytest.mark.parametrize(
    "policy",
    [
        pytest.param(None, id="no-policy"),
        pytest.param(AttestationPolicy(), id="default-policy"),
        pytest.param(AttestationPolicy.from_toml("[attestation]\nallow_simulated = false\n"), id="explicit-false"),
    ],
)
def test_the_simulated_root_is_refused_unless_the_policy_allows_it(
    evidence: Evidence, policy: AttestationPolicy | None
) -> None:
    result = Verifier(kds=None).verify_evidence(evidence, policy, nonce=NONCE)
    assert not result.ok
    ark = result.check("ark_pinned")
    assert ark is not None and ark.outcome is Outcome.FAIL
    assert "SIMULATED" in ark.detail and "allow_simulated = true" in ark.detail
    assert [check.name for check in result.failures] == ["ark_pinned"]  # the root alone: everything else holds


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        ("hpke_public_key", "BBBB"),  # a key the attacker holds: datasets would be sealed to it
        ("signing_public_key", "a2V5"),
        ("curve_public_key", CURVE[::-1]),
        ("bundle_digest", "sha256:" + "00" * 32),
        ("nonce", secrets.token_bytes(16).hex()),
        ("issued_at", "2020-01-01T00:00:00Z"),
        ("extra", "a claim the report never bound"),
    ],
)
def test_claims_changed_after_the_report_was_made_are_refused(evidence: Evidence, claim: str, value: str) -> None:
    claims = {**evidence.claims, claim: value}
    tampered = dataclasses.replace(evidence, claims=claims)
    result = Verifier(kds=None).verify_evidence(tampered, AttestationPolicy(allow_simulated=True))
    assert not result.ok
    binding = result.check("report_data_binding")
    assert binding is not None and binding.outcome is Outcome.FAIL
    assert "not SHA-512 of the claims" in binding.detail


def test_a_dropped_claim_is_refused(evidence: Evidence) -> None:
    claims = {name: value for name, value in evidence.claims.items() if name != "bundle_digest"}
    result = Verifier(kds=None).verify_evidence(
        dataclasses.replace(evidence, claims=claims), AttestationPolicy(allow_simulated=True)
    )
    binding = result.check("report_data_binding")
    assert not result.ok and binding is not None and binding.outcome is Outcome.FAIL
