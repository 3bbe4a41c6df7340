"""SEV-SNP attestation: parse reports, verify them against AMD's roots, appraise them against a policy.

>>> from confnb.attest import verify
>>> result = verify(report_bytes, vek=vcek_pem, chain=ask_ark_pem, policy="policy.toml")
>>> result.ok, [c.name for c in result.failures]
"""

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
