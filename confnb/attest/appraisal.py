"""Appraisal: does an authentic report describe the VM the policy's author meant?

Authenticity (``verifier``) establishes that AMD's firmware signed the report; appraisal compares what it says with
an :class:`~confnb.attest.policy.AttestationPolicy`. Each policy key that is set yields one named check, so a
rejected kernel's operator reads exactly which launch parameter to change.
"""

from __future__ import annotations

import hmac
from datetime import datetime

from confnb.attest.errors import AttestInputError
from confnb.attest.evidence import parse_rfc3339
from confnb.attest.policy import GUEST_POLICY_BITS, PLATFORM_INFO_BITS, AttestationPolicy
from confnb.attest.report import AttestationReport, Product
from confnb.attest.result import Check, Outcome

CLOCK_SKEW_S = 60  # evidence "issued" this far in the future is still accepted

# (policy attribute, check name, report field): identity pins, each an allowlist of hex values.
_ALLOWLISTS = (
    ("host_data", "host_data", "host_data"),
    ("family_ids", "family_id", "family_id"),
    ("image_ids", "image_id", "image_id"),
    ("chip_ids", "chip_id", "chip_id"),
    ("id_key_digests", "id_key_digest", "id_key_digest"),
    ("author_key_digests", "author_key_digest", "author_key_digest"),
)


def appraise(
    report: AttestationReport,
    policy: AttestationPolicy,
    product: Product | None,
    signing_key: str | None,
    claims: dict[str, str] | None,
    moment: datetime,
) -> list[Check]:
    checks = [_measurement(report, policy)]
    for attribute, name, field in _ALLOWLISTS:
        allowed: tuple[str, ...] | None = getattr(policy, attribute)
        if allowed is not None:
            value: bytes = getattr(report, field)
            checks.append(_allowlisted(name, field.upper(), value.hex(), allowed))
    if policy.require_author_key and not report.key_info.author_key_en:
        checks.append(Check("author_key", Outcome.FAIL, "the policy requires an ID block signed by an author key"))
    for name, floor, tcb in (
        ("min_tcb", policy.minimum_tcb(product), report.reported_tcb(product)),
        ("min_launch_tcb", policy.minimum_launch_tcb(product), report.launch_tcb(product)),
    ):
        if floor:
            short = tcb.shortfalls(floor)
            label = "REPORTED_TCB" if name == "min_tcb" else "LAUNCH_TCB"
            checks.append(
                Check(name, Outcome.FAIL, f"{label} {tcb} is below the policy floor: {', '.join(short)}")
                if short
                else Check(name, Outcome.PASS, f"{label} {tcb} meets the policy floor")
            )
    if policy.reject_debug:
        checks.append(
            Check("debug", Outcome.FAIL, "guest POLICY allows debugging: the host can read and change guest memory")
            if report.policy.debug
            else Check("debug", Outcome.PASS, "guest POLICY forbids debugging")
        )
    if policy.reject_migration_agent:
        checks.append(
            Check("migration_agent", Outcome.FAIL, "guest POLICY allows a migration agent")
            if report.policy.migrate_ma
            else Check("migration_agent", Outcome.PASS, "no migration agent allowed")
        )
    checks.extend(_flag_checks(report, policy))
    checks.append(_compare("vmpl", report.vmpl <= policy.max_vmpl, f"VMPL {report.vmpl}", f"at most {policy.max_vmpl}"))
    key = signing_key or "?"
    checks.append(_member("signing_key_allowed", key, policy.signing_keys))
    if policy.products is not None:
        checks.append(_member("product_allowed", product.value if product else "unknown", policy.products))
    if policy.min_guest_svn:
        checks.append(
            _compare(
                "guest_svn",
                report.guest_svn >= policy.min_guest_svn,
                f"GUEST_SVN {report.guest_svn}",
                f"at least {policy.min_guest_svn}",
            )
        )
    if policy.min_firmware is not None:
        firmware = report.committed_firmware
        wanted = ".".join(map(str, policy.min_firmware))
        checks.append(
            _compare(
                "min_firmware",
                firmware.as_tuple() >= policy.min_firmware,
                f"committed firmware {firmware}",
                f"at least {wanted}",
            )
        )
    if not policy.permit_provisional_firmware:
        checks.append(_provisional(report, product))
    checks.extend(_mitigations(report, policy))
    if policy.max_evidence_age_s is not None:
        checks.append(_evidence_age(claims, policy.max_evidence_age_s, moment))
    return checks


def _measurement(report: AttestationReport, policy: AttestationPolicy) -> Check:
    measurement = report.measurement.hex()
    if policy.measurements is None:
        return Check("measurement", Outcome.SKIP, f"the policy pins no measurement (this one is {measurement})")
    if not policy.measurements:
        return Check("measurement", Outcome.FAIL, f"MEASUREMENT {measurement} rejected: the allowlist is empty")
    return _allowlisted("measurement", "MEASUREMENT", measurement, policy.measurements)


def _allowlisted(name: str, label: str, value: str, allowed: tuple[str, ...]) -> Check:
    # Constant-time, and every entry is compared, so timing reveals neither which entry matched nor where.
    found = False
    for candidate in allowed:
        found |= hmac.compare_digest(value, candidate)
    if found:
        return Check(name, Outcome.PASS, f"{label} {value} is in the policy's allowlist")
    return Check(name, Outcome.FAIL, f"{label} {value} is not in the policy's allowlist")


def _compare(name: str, passed: bool, actual: str, requirement: str) -> Check:
    return Check(name, Outcome.PASS if passed else Outcome.FAIL, f"{actual}, policy requires {requirement}")


def _member(name: str, value: str, allowed: tuple[str, ...]) -> Check:
    listed = ", ".join(allowed)
    if value in allowed:
        return Check(name, Outcome.PASS, f"{value} is among {listed}")
    return Check(name, Outcome.FAIL, f"{value} is not among {listed}")


def _flag_checks(report: AttestationReport, policy: AttestationPolicy) -> list[Check]:
    """Guest POLICY and PLATFORM_INFO bits the policy pins to a value, and the minimum ABI the guest demands."""
    checks = []
    for name, source, wanted, bits in (
        ("guest_policy", report.policy, policy.guest_policy, GUEST_POLICY_BITS),
        ("platform_info", report.platform_info, policy.platform_info, PLATFORM_INFO_BITS),
    ):
        if not wanted:
            continue
        wrong = [
            f"{bit} is {getattr(source, bits[bit])}, policy requires {value}"
            for bit, value in wanted.items()
            if getattr(source, bits[bit]) is not value
        ]
        pinned = ", ".join(f"{bit}={value}" for bit, value in wanted.items())
        checks.append(
            Check(name, Outcome.FAIL, "; ".join(wrong)) if wrong else Check(name, Outcome.PASS, f"{pinned} as required")
        )
    if policy.min_abi is not None:
        abi = (report.policy.abi_major, report.policy.abi_minor)
        checks.append(
            _compare(
                "min_abi",
                abi >= policy.min_abi,
                f"guest POLICY demands firmware ABI {abi[0]}.{abi[1]}",
                f"at least {policy.min_abi[0]}.{policy.min_abi[1]}",
            )
        )
    return checks


def _provisional(report: AttestationReport, product: Product | None) -> Check:
    """Running firmware must be committed (microcode is loaded by the host at boot and never "committed")."""
    committed, current = report.committed_tcb(product).components(), report.current_tcb(product).components()
    differs = [
        f"{name} {current[name]} running, {value} committed"
        for name, value in committed.items()
        if name != "microcode" and current[name] != value
    ]
    if report.committed_firmware != report.current_firmware:
        differs.append(f"firmware {report.current_firmware} running, {report.committed_firmware} committed")
    if differs:
        return Check("provisional_firmware", Outcome.FAIL, "provisional (uncommitted) firmware: " + ", ".join(differs))
    return Check("provisional_firmware", Outcome.PASS, "running firmware is committed")


def _mitigations(report: AttestationReport, policy: AttestationPolicy) -> list[Check]:
    checks = []
    for name, vector, required in (
        ("launch_mitigations", report.launch_mit_vector, policy.required_launch_mitigations),
        ("current_mitigations", report.current_mit_vector, policy.required_current_mitigations),
    ):
        if not required:
            continue
        if vector is None:
            checks.append(Check(name, Outcome.FAIL, f"a v{report.version} report carries no mitigation vector"))
        elif vector & required != required:
            checks.append(Check(name, Outcome.FAIL, f"vector {vector:#x} lacks required bits {required & ~vector:#x}"))
        else:
            checks.append(Check(name, Outcome.PASS, f"vector {vector:#x} has every required bit ({required:#x})"))
    return checks


def _evidence_age(claims: dict[str, str] | None, limit: int, moment: datetime) -> Check:
    issued = (claims or {}).get("issued_at")
    if not issued:
        return Check("evidence_age", Outcome.FAIL, "the policy limits evidence age but there is no issued_at claim")
    try:
        when = parse_rfc3339(issued)
    except AttestInputError as exc:
        return Check("evidence_age", Outcome.FAIL, str(exc))
    age = (moment - when).total_seconds()
    if age < -CLOCK_SKEW_S:
        return Check("evidence_age", Outcome.FAIL, f"issued {-age:.0f} s in the future")
    if age > limit:
        return Check("evidence_age", Outcome.FAIL, f"issued {age:.0f} s ago, older than the limit of {limit} s")
    return Check("evidence_age", Outcome.PASS, f"issued {max(age, 0):.0f} s ago, limit {limit} s")
