"""Exceptions for input that cannot be verified at all.

A *rejected* attestation is not an exception: it is a :class:`~confnb.attest.result.VerificationResult` whose
failing checks say why. These exceptions are for input that is not an attestation to begin with (a truncated
file, a PEM that does not parse, a policy with a typo), which the CLI reports in one line with exit code 2.
"""

from __future__ import annotations


class AttestInputError(ValueError):
    """The input cannot be interpreted: not a report, not a certificate, not a policy."""


class ReportFormatError(AttestInputError):
    """The bytes are not a SEV-SNP ATTESTATION_REPORT (wrong length, unknown version)."""


class CertificateError(AttestInputError):
    """A certificate or certificate bundle does not parse, or its AMD extensions are malformed."""


class PolicyError(AttestInputError):
    """An attestation policy file is malformed; the message names the key and line."""


class EvidenceError(AttestInputError):
    """An evidence bundle does not follow the ``confnb-evidence/1`` format."""


class KdsError(Exception):
    """AMD's Key Distribution Service could not supply a certificate (offline, rate-limited, not found)."""
