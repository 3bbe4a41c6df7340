"""Appraising AMD's certificate chain (ARK -> ASK/ASVK -> VEK) on its own, once per chain.

Nothing here depends on a report or on the clock, so each distinct chain is appraised once and the verdict is
memoised: a busy verifier sees the same handful of AMD chains over and over, and re-checking three RSA-4096
signatures and the certificate profiles for every report would cost more than the report's own signature.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec

from confnb.attest.certs import (
    AMD_ORGANIZATION,
    SIMULATED_ORGANIZATION,
    Cert,
    Role,
    VekExtensions,
    parse_certificate,
    profile_problems,
    vek_extensions,
)
from confnb.attest.report import Product
from confnb.attest.result import Check, Outcome
from confnb.attest.roots import pinned_product


@dataclass(frozen=True, eq=False)  # identity semantics: verdicts are memoised, one per chain
class ChainVerdict:
    """The report-independent checks of one chain, and what the report checks need from it."""

    checks: tuple[Check, ...]  # ark_pinned, ark_self_signed, ask_signed_by_ark, vek_signed_by_ask, cert_profile,
    # vek_extensions
    simulated: bool
    product: Product | None
    vek: Cert
    ask: Cert
    ark: Cert
    extensions: VekExtensions
    public_key: ec.EllipticCurvePublicKey | None
    validity: tuple[tuple[str, datetime, datetime], ...]
    valid_from: datetime  # the window in which every certificate of the chain is valid
    valid_until: datetime
    validity_check: Check  # the passing cert_validity check for any moment inside that window
    summary: tuple[tuple[str, Any], ...]  # the VEK, described for results (immutable; copied into each result)

    def validity_problems(self, moment: datetime) -> list[str]:
        return [
            f"{name} is valid {start:%Y-%m-%d} to {end:%Y-%m-%d}, not at {moment:%Y-%m-%dT%H:%M:%SZ}"
            for name, start, end in self.validity
            if not start <= moment <= end
        ]


def appraise_chain(vek: Cert, ask: Cert, ark: Cert, allow_simulated: bool) -> ChainVerdict:
    """Appraise a chain (memoised by the certificates' bytes)."""
    return _appraise(vek.der, ask.der, ark.der, allow_simulated)


@functools.lru_cache(maxsize=128)
def _appraise(vek_der: bytes, ask_der: bytes, ark_der: bytes, allow_simulated: bool) -> ChainVerdict:
    vek, ask, ark = parse_certificate(vek_der), parse_certificate(ask_der), parse_certificate(ark_der)
    pinned = pinned_product(ark.sha256)
    simulated = pinned is None and ark.organization == SIMULATED_ORGANIZATION
    product = pinned or ark.product
    extensions = vek_extensions(vek.der)
    key = vek.certificate.public_key()
    checks = (
        _trust_anchor(ark, pinned, simulated, allow_simulated),
        _signed("ark_self_signed", ark, ark),
        _signed("ask_signed_by_ark", ask, ark),
        _signed("vek_signed_by_ask", vek, ask),
        _profile(vek, ask, ark, product, SIMULATED_ORGANIZATION if simulated else AMD_ORGANIZATION),
        _extension_check(extensions, vek, product),
    )
    validity = tuple(
        (cert.common_name, cert.certificate.not_valid_before_utc, cert.certificate.not_valid_after_utc)
        for cert in (ark, ask, vek)
    )
    valid_from, valid_until = max(start for _, start, _ in validity), min(end for _, _, end in validity)
    summary = {
        "role": vek.role.value if vek.role else None,
        "subject": vek.common_name,
        "sha256": vek.sha256,
        **extensions.to_dict(),
    }
    return ChainVerdict(
        checks=checks,
        simulated=simulated,
        product=product,
        vek=vek,
        ask=ask,
        ark=ark,
        extensions=extensions,
        public_key=key if isinstance(key, ec.EllipticCurvePublicKey) else None,
        validity=validity,
        valid_from=valid_from,
        valid_until=valid_until,
        validity_check=Check(
            "cert_validity",
            Outcome.PASS,
            f"every certificate valid at the chosen time (chain valid {valid_from:%Y-%m-%d} to {valid_until:%Y-%m-%d})",
        ),
        summary=tuple(summary.items()),
    )


def _trust_anchor(ark: Cert, pinned: Product | None, simulated: bool, allow_simulated: bool) -> Check:
    """AMD's pinned roots, or (only when the policy says so) the simulated TEE's root."""
    if pinned is not None:
        return Check("ark_pinned", Outcome.PASS, f"ARK-{pinned.value} matches AMD's pinned root sha256 {ark.sha256}")
    if simulated and allow_simulated:
        return Check(
            "ark_pinned",
            Outcome.PASS,
            f"SIMULATED root {ark.sha256[:16]}… accepted because the policy sets allow_simulated = true: "
            "this is not a confidential VM",
        )
    if simulated:
        return Check(
            "ark_pinned",
            Outcome.FAIL,
            f"ARK {ark.sha256[:16]}… is the confnb SIMULATED root, not AMD's; accepted only by a policy with "
            "allow_simulated = true",
        )
    return Check(
        "ark_pinned",
        Outcome.FAIL,
        f"ARK '{ark.common_name}' sha256 {ark.sha256} is not one of AMD's pinned roots (Milan, Genoa, Turin)",
    )


def _signed(name: str, subject: Cert, issuer: Cert) -> Check:
    try:
        subject.certificate.verify_directly_issued_by(issuer.certificate)
    except ValueError as exc:
        return Check(name, Outcome.FAIL, f"{subject.common_name} was not issued by {issuer.common_name}: {exc}")
    except (InvalidSignature, TypeError, UnsupportedAlgorithm):
        return Check(name, Outcome.FAIL, f"{issuer.common_name}'s key did not sign {subject.common_name}")
    return Check(name, Outcome.PASS, f"{subject.common_name} signed by {issuer.common_name} (RSASSA-PSS)")


def _profile(vek: Cert, ask: Cert, ark: Cert, product: Product | None, organization: str) -> Check:
    problems = []
    for cert, role in ((ark, Role.ARK), (ask, ask.role or Role.ASK), (vek, vek.role or Role.VCEK)):
        problems += [f"{cert.common_name}: {p}" for p in profile_problems(cert, role, organization)]
    if ark.role is not Role.ARK:
        problems.append(f"root CN {ark.common_name!r} is not ARK-<product>")
    if ask.role not in (Role.ASK, Role.ASVK):
        problems.append(f"intermediate CN {ask.common_name!r} is neither SEV-<product> nor SEV-VLEK-<product>")
    if ask.product != product or ark.product != product:
        problems.append(f"{ask.common_name} and {ark.common_name} are not of one product")
    if problems:
        return Check("cert_profile", Outcome.FAIL, "; ".join(problems))
    return Check("cert_profile", Outcome.PASS, "names, algorithms and key types are AMD's")


def _extension_check(ext: VekExtensions, vek: Cert, product: Product | None) -> Check:
    problems = list(ext.problems)
    expected_struct = 1 if product is Product.TURIN else 0
    if ext.struct_version != expected_struct:
        problems.append(
            f"structVersion {ext.struct_version}, expected {expected_struct} for "
            f"{product.value if product else 'this product'}"
        )
    if vek.role is Role.VCEK and ext.hw_id is None:
        problems.append("VCEK without hwID")
    if vek.role is Role.VLEK and ext.csp_id is None:
        problems.append("VLEK without cspID")
    if vek.role is Role.VLEK and ext.hw_id is not None:
        problems.append("VLEK with a hwID")
    if vek.role not in (Role.VCEK, Role.VLEK):
        problems.append(f"leaf CN {vek.common_name!r} is neither SEV-VCEK nor SEV-VLEK")
    if problems:
        return Check("vek_extensions", Outcome.FAIL, "; ".join(problems))
    role = vek.role.value if vek.role else "?"
    return Check("vek_extensions", Outcome.PASS, f"{role} {ext.product_name}, TCB {ext.tcb_components()}")
