"""What a verification returns: every check with its outcome and reason, and the decoded claims.

A verdict without reasons is useless to the person who has to fix the VM, and a boolean is easy to ignore, so the
result keeps each check by name. ``ok`` is true only when no check failed *and* every check that authenticity
requires actually ran: a code path that forgets a check fails closed instead of passing silently.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from confnb.attest.report import AttestationReport, Product

# Checks that must have run and passed before a report counts as authentic.
REQUIRED_CHECKS = (
    "report_format",
    "reserved_fields",
    "signature_algorithm",
    "certificates",
    "ark_pinned",
    "ark_self_signed",
    "ask_signed_by_ark",
    "vek_signed_by_ask",
    "cert_profile",
    "cert_validity",
    "vek_extensions",
    "product",
    "signing_key_type",
    "report_signature",
    "tcb_binding",
    "chip_binding",
    "tcb_order",
)


class Outcome(enum.Enum):
    PASS = "pass"  # noqa: S105 - an outcome, not a password
    FAIL = "fail"
    SKIP = "skip"  # not applicable here (e.g. chip binding for a VLEK) or not asked for (no CRL given)


class Check(NamedTuple):
    """One check's verdict. A NamedTuple: immutable, cheap to build, and safe to memoise and share."""

    name: str
    outcome: Outcome
    detail: str

    @property
    def ok(self) -> bool:
        return self.outcome is not Outcome.FAIL

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "outcome": self.outcome.value, "detail": self.detail}


class CheckedResult:
    """What every verdict made of named checks offers: its failures, and one check by name."""

    checks: list[Check]

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if check.outcome is Outcome.FAIL]

    def check(self, name: str) -> Check | None:
        return next((check for check in self.checks if check.name == name), None)


@dataclass
class VerificationResult(CheckedResult):
    """The verdict. ``checks`` are in the order they ran; ``report`` is None only if the bytes did not parse."""

    checks: list[Check] = field(default_factory=list)
    report: AttestationReport | None = None
    product: Product | None = None
    simulated: bool = False
    signing_key: str | None = None
    claims: dict[str, str] = field(default_factory=dict)
    vek: dict[str, Any] | None = None
    policy: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        ran = {check.name for check in self.checks if check.outcome is Outcome.PASS}
        skipped = {check.name for check in self.checks if check.outcome is Outcome.SKIP}
        return all(check.ok for check in self.checks) and all(
            name in ran or (name == "chip_binding" and name in skipped) for name in REQUIRED_CHECKS
        )

    def summary(self) -> str:
        """One line: the verdict, or the failing checks with their reasons."""
        if self.ok:
            what = "SIMULATED TEE (not a real confidential VM)" if self.simulated else "genuine AMD SEV-SNP"
            product = f" {self.product.value}" if self.product else ""
            return f"verified: {what}{product}, signed by {self.signing_key}"
        failures = self.failures or [
            Check(name, Outcome.FAIL, "check did not run") for name in REQUIRED_CHECKS if not self.check(name)
        ]
        return "rejected: " + "; ".join(f"{check.name}: {check.detail}" for check in failures)

    def to_dict(self) -> dict[str, Any]:
        return {
            "verified": self.ok,
            "simulated": self.simulated,
            "product": self.product.value if self.product else None,
            "signing_key": self.signing_key,
            "checks": [check.to_dict() for check in self.checks],
            "report": self.report.to_dict(self.product) if self.report else None,
            "claims": dict(self.claims),
            "vek": self.vek,
            "policy": self.policy,
        }
