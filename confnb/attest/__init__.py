"""SEV-SNP attestation: parse reports, verify them against AMD's roots, appraise them against a policy.

>>> from confnb.attest import verify
>>> result = verify(report_bytes, vek=vcek_pem, chain=ask_ark_pem, policy="policy.toml")
>>> result.ok, [c.name for c in result.failures]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Names are imported on first use: code inside the confidential VM imports ``confnb.attest.report`` and
# ``confnb.attest.evidence`` for the formats, and should not load the verifier, its HTTP client or policies.
_EXPORTS = {
    "AttestInputError": "errors",
    "CertificateError": "errors",
    "EvidenceError": "errors",
    "KdsError": "errors",
    "PolicyError": "errors",
    "ReportFormatError": "errors",
    "Evidence": "evidence",
    "AttestationPolicy": "policy",
    "AttestationReport": "report",
    "Product": "report",
    "SigningKey": "report",
    "Check": "result",
    "Outcome": "result",
    "VerificationResult": "result",
    "Verifier": "verifier",
    "verify": "verifier",
    "verify_evidence": "verifier",
}
__all__ = [
    "AttestInputError",
    "AttestationPolicy",
    "AttestationReport",
    "CertificateError",
    "Check",
    "Evidence",
    "EvidenceError",
    "KdsError",
    "Outcome",
    "PolicyError",
    "Product",
    "ReportFormatError",
    "SigningKey",
    "VerificationResult",
    "Verifier",
    "verify",
    "verify_evidence",
]

if TYPE_CHECKING:
    from confnb.attest.errors import (
        AttestInputError,
        CertificateError,
        EvidenceError,
        KdsError,
        PolicyError,
        ReportFormatError,
    )
    from confnb.attest.evidence import Evidence
    from confnb.attest.policy import AttestationPolicy
    from confnb.attest.report import AttestationReport, Product, SigningKey
    from confnb.attest.result import Check, Outcome, VerificationResult
    from confnb.attest.verifier import Verifier, verify, verify_evidence


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'confnb.attest' has no attribute {name!r}")
    return getattr(importlib.import_module(f"confnb.attest.{module}"), name)
