"""Export receipts (``confnb-export/1``): the format, and offline verification anyone can run.

A kernel exports a released result as a bundle::

    {"format": "confnb-export/1",
     "receipt":   {result_digest, payload_digest, media_type, file_name, policy_id, datasets, operation_digest,
                   evidence_digest, time, sealed_to},
     "signature": base64 Ed25519 signature over the canonical receipt JSON, by the kernel's signing key,
     "evidence":  a confnb-evidence/1 bundle whose nonce claim is SHA-256 of the canonical receipt without
                  evidence_digest,
     "payload":   base64 of the payload: the result itself, or HPKE-sealed to the recipient's P-256 key}

Why this shape. The evidence binds the kernel's signing key (its ``signing_public_key`` claim is under REPORT_DATA)
*and* this receipt (its nonce is the receipt's hash), so a receipt cannot be moved under another kernel's evidence,
nor evidence lifted from another export. The evidence cannot cover its own digest, so the signature covers the
whole receipt including ``evidence_digest``, which pins the exact evidence bundle. ``payload_digest`` is over the
stored bytes (possibly sealed), so anyone can check the bundle is intact; ``result_digest`` is over the result
itself, which only the recipient can check when the payload is sealed.

The verification is offline: the evidence carries its certificates (a real platform's VCEK may come from the KDS
cache). It is done as of the receipt's time by default, because a receipt states what an attested kernel released
*then*; a verifier that wants today's view passes ``at``. Canonical JSON everywhere is UTF-8, keys sorted, no
whitespace.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from confnb.attest.result import Check, CheckedResult, Outcome
from confnb.receipt_format import (
    EXPORT_FORMAT,
    HPKE_INFO,
    RECEIPT_FIELDS,
    canonical_json,
    check_file_name,
    check_media_type,
    receipt_nonce,
    recipient_fingerprint,
    sha256_digest,
)

if TYPE_CHECKING:
    from confnb.attest.policy import AttestationPolicy
    from confnb.attest.result import VerificationResult
    from confnb.attest.verifier import Verifier

__all__ = [
    "EXPORT_FORMAT",
    "HPKE_INFO",
    "RECEIPT_FIELDS",
    "ReceiptVerification",
    "canonical_json",
    "receipt_nonce",
    "recipient_fingerprint",
    "sha256_digest",
    "verify_export",
]

BUNDLE_FIELDS: Final = ("format", "receipt", "signature", "evidence", "payload")
# Checks that must have run and passed for a receipt to count as verified ("result_digest" may be skipped when the
# payload is sealed and no recipient key was given).
REQUIRED_CHECKS: Final = (
    "format",
    "evidence",
    "evidence_digest",
    "signing_key",
    "receipt_binding",
    "signature",
    "payload_digest",
)
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
SIMULATED_WARNING: Final = "SIMULATED TEE - not a confidential VM: this receipt proves nothing about hardware"


# -- verification -------------------------------------------------------------------------------------------


@dataclass
class ReceiptVerification(CheckedResult):
    """Every check with its outcome and reason; ``payload`` is the verified result, only when ``ok``."""

    ok: bool
    checks: list[Check]
    receipt: dict[str, Any] | None
    payload: bytes | None = field(default=None, repr=False)
    simulated: bool = False
    attestation: VerificationResult | None = field(default=None, repr=False)

    def summary(self) -> str:
        """One line: the verdict, or the failing checks with their reasons."""
        if self.ok:
            source = "a SIMULATED TEE (not a confidential VM)" if self.simulated else "an attested SEV-SNP kernel"
            return f"verified: receipt signed by {source}"
        failures = self.failures or [
            Check(name, Outcome.FAIL, "check did not run") for name in REQUIRED_CHECKS if not self.check(name)
        ]
        return "rejected: " + "; ".join(f"{check.name}: {check.detail}" for check in failures)

    def to_dict(self) -> dict[str, Any]:
        return {
            "verified": self.ok,
            "simulated": self.simulated,
            "checks": [check.to_dict() for check in self.checks],
            "receipt": self.receipt,
            "attestation": self.attestation.to_dict() if self.attestation is not None else None,
        }


def _check(name: str, passed: bool, detail: str) -> Check:
    return Check(name, Outcome.PASS if passed else Outcome.FAIL, detail)


def _b64(text: object) -> bytes | None:
    if not isinstance(text, str):
        return None
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        return None


def _receipt_problems(receipt: object) -> list[str]:
    if not isinstance(receipt, dict):
        return ["receipt is not a JSON object"]
    problems = []
    keys = set(receipt)
    missing = [name for name in RECEIPT_FIELDS if name not in keys]
    extra = sorted(str(name)[:40] for name in keys - set(RECEIPT_FIELDS))
    if missing:
        problems.append(f"receipt lacks {', '.join(missing)}")
    if extra:
        problems.append(f"receipt has unexpected fields {', '.join(extra)}")
    for name in ("result_digest", "payload_digest", "evidence_digest"):
        if name in receipt and not (isinstance(receipt[name], str) and _DIGEST.fullmatch(receipt[name])):
            problems.append(f"receipt {name} is not sha256:<64 hex>")
    for name in ("policy_id", "operation_digest", "time"):
        if name in receipt and not (isinstance(receipt[name], str) and receipt[name]):
            problems.append(f"receipt {name} is not a non-empty string")
    if "media_type" in receipt and (problem := check_media_type(receipt["media_type"])):
        problems.append(f"receipt {problem}")
    if "file_name" in receipt and (problem := check_file_name(receipt["file_name"])):
        problems.append(f"receipt {problem}")
    datasets = receipt.get("datasets")
    if "datasets" in receipt and not (
        isinstance(datasets, list) and all(isinstance(item, str) and item for item in datasets)
    ):
        problems.append("receipt datasets is not a list of dataset ids")
    sealed_to = receipt.get("sealed_to")
    if sealed_to is not None and not (isinstance(sealed_to, str) and _DIGEST.fullmatch(sealed_to)):
        problems.append("receipt sealed_to is neither null nor sha256:<64 hex>")
    if isinstance(receipt.get("time"), str):
        from confnb.attest.errors import EvidenceError
        from confnb.attest.evidence import parse_rfc3339

        try:
            parse_rfc3339(receipt["time"])
        except EvidenceError:
            problems.append("receipt time is not an RFC 3339 timestamp")
    return problems


def verify_export(
    bundle: bytes,
    *,
    attestation_policy: AttestationPolicy | str | Path | None = None,
    allow_simulated: bool = False,
    recipient_private_key: ec.EllipticCurvePrivateKey | None = None,
    at: datetime | None = None,
    verifier: Verifier | None = None,
) -> ReceiptVerification:
    """Verify an export bundle; every failed check says which and why.

    Checks: ``format``; ``evidence`` (authentic SEV-SNP evidence, appraised against ``attestation_policy`` or,
    without one, the strict default policy, which pins no measurement); ``evidence_digest`` (the receipt names
    this evidence); ``signing_key`` (the evidence's claims carry the kernel's Ed25519 key); ``receipt_binding``
    (the evidence's nonce is this receipt's hash); ``signature``; ``payload_digest``; and, when the payload can
    be read (not sealed, or sealed and ``recipient_private_key`` given), ``recipient`` and ``result_digest``.

    ``allow_simulated`` decides alone whether the simulated TEE's roots are accepted (it overrides the policy's
    ``allow_simulated``); a receipt from the simulated TEE is reported with ``simulated=True`` either way.
    ``at`` is the verification time (default: the receipt's own time).
    """
    from confnb.attest.errors import AttestInputError
    from confnb.attest.evidence import Evidence, parse_rfc3339
    from confnb.attest.policy import AttestationPolicy

    checks: list[Check] = []
    simulated = False

    def done(receipt: dict[str, Any] | None, attestation: VerificationResult | None = None) -> ReceiptVerification:
        return ReceiptVerification(False, checks, receipt, None, simulated, attestation)

    # Loaded before anything else: a policy that does not load is the caller's input error, not the bundle's.
    if attestation_policy is None:
        policy = AttestationPolicy(source="<strict defaults>")
    elif isinstance(attestation_policy, AttestationPolicy):
        policy = attestation_policy
    else:
        policy = AttestationPolicy.load(attestation_policy)
    policy = dataclasses.replace(policy, allow_simulated=bool(allow_simulated))

    # -- format
    try:
        document = json.loads(bundle)
    except (ValueError, RecursionError):
        checks.append(_check("format", False, "the bundle is not JSON"))
        return done(None)
    if not isinstance(document, dict):
        checks.append(_check("format", False, "the bundle is not a JSON object"))
        return done(None)
    if document.get("format") != EXPORT_FORMAT:
        checks.append(_check("format", False, f"format is {str(document.get('format'))[:40]!r}, not {EXPORT_FORMAT!r}"))
        return done(None)
    problems = [f"bundle lacks {name}" for name in BUNDLE_FIELDS if name not in document]
    problems += [f"bundle has unexpected field {str(name)[:40]}" for name in set(document) - set(BUNDLE_FIELDS)]
    receipt_value = document.get("receipt")
    problems += _receipt_problems(receipt_value)
    signature = _b64(document.get("signature"))
    if signature is None or len(signature) != 64:
        problems.append("signature is not the base64 of a 64-byte Ed25519 signature")
    stored_payload = _b64(document.get("payload"))
    if stored_payload is None:
        problems.append("payload is not base64")
    evidence: Evidence | None = None
    try:
        evidence = Evidence.from_dict(document.get("evidence"))
    except AttestInputError as exc:
        problems.append(f"evidence: {exc}")
    receipt = receipt_value if isinstance(receipt_value, dict) else None
    if problems:
        checks.append(_check("format", False, "; ".join(problems)))
        return done(receipt)
    assert receipt is not None
    assert evidence is not None
    assert signature is not None
    assert stored_payload is not None
    checks.append(_check("format", True, f"{EXPORT_FORMAT} bundle with receipt, signature, evidence and payload"))
    simulated = evidence.simulated

    # -- evidence
    moment = at if at is not None else parse_rfc3339(receipt["time"])
    active = verifier
    if active is None:
        from confnb.attest.verifier import default_verifier

        active = default_verifier()
    try:
        attestation: VerificationResult | None = active.verify_evidence(evidence, policy, moment)
    except AttestInputError as exc:
        attestation = None
        checks.append(_check("evidence", False, f"the evidence cannot be verified: {exc}"))
    if attestation is not None:
        simulated = simulated or attestation.simulated
        if attestation.ok:
            if simulated:
                detail = (
                    f"{SIMULATED_WARNING}; accepted only because simulated evidence was allowed "
                    f"({attestation.summary()})"
                )
            else:
                detail = attestation.summary()
            checks.append(_check("evidence", True, detail))
        else:
            detail = attestation.summary()
            if simulated and not allow_simulated:
                detail = (
                    "the evidence comes from the SIMULATED TEE, not a confidential VM; allow simulated evidence "
                    f"(--allow-simulated) to accept it for testing ({detail})"
                )
            checks.append(_check("evidence", False, detail))

    digest = evidence.digest()
    checks.append(
        _check(
            "evidence_digest",
            hmac.compare_digest(digest, receipt["evidence_digest"]),
            "the receipt names this evidence bundle"
            if hmac.compare_digest(digest, receipt["evidence_digest"])
            else f"the receipt names evidence {receipt['evidence_digest'][:23]}…, the bundle carries {digest[:23]}…",
        )
    )

    # -- the kernel's key, bound by the evidence's claims
    public_key: Ed25519PublicKey | None = None
    raw_key = _b64(evidence.claims.get("signing_public_key"))
    if raw_key is None or len(raw_key) != 32:
        checks.append(_check("signing_key", False, "the evidence's claims carry no 32-byte Ed25519 signing key"))
    else:
        public_key = Ed25519PublicKey.from_public_bytes(raw_key)
        checks.append(
            _check(
                "signing_key",
                True,
                f"kernel signing key {sha256_digest(raw_key)[:23]}… is bound by the evidence's claims",
            )
        )

    expected_nonce = receipt_nonce(receipt).hex()
    bound = hmac.compare_digest(evidence.claims.get("nonce", "").lower().encode(), expected_nonce.encode())
    checks.append(
        _check(
            "receipt_binding",
            bound,
            "the evidence's nonce is SHA-256 of this receipt"
            if bound
            else "the evidence's nonce is not SHA-256 of this receipt (receipt altered, or evidence from another "
            "export)",
        )
    )

    if public_key is None:
        checks.append(_check("signature", False, "no kernel key to verify the signature with"))
    else:
        try:
            public_key.verify(signature, canonical_json(receipt))
            checks.append(_check("signature", True, "Ed25519 signature over the receipt by the attested kernel key"))
        except InvalidSignature:
            checks.append(
                _check("signature", False, "the signature over the receipt does not verify with the kernel's key")
            )

    payload_ok = hmac.compare_digest(sha256_digest(stored_payload), receipt["payload_digest"])
    checks.append(
        _check(
            "payload_digest",
            payload_ok,
            f"payload ({len(stored_payload)} bytes) matches payload_digest"
            if payload_ok
            else "the payload's SHA-256 differs from the receipt's payload_digest (payload altered)",
        )
    )

    # -- the result itself
    result: bytes | None = None
    sealed_to = receipt["sealed_to"]
    if sealed_to is None:
        result = stored_payload
        if recipient_private_key is not None:
            checks.append(Check("recipient", Outcome.SKIP, "the payload is not sealed; the key was not needed"))
    elif recipient_private_key is None:
        checks.append(
            Check(
                "result_digest",
                Outcome.SKIP,
                f"the payload is sealed to {sealed_to[:23]}…; give the recipient's private key to open it",
            )
        )
    else:
        from confnb.hpke import HpkeError, open_sealed

        mine = recipient_fingerprint(recipient_private_key.public_key())
        if not hmac.compare_digest(mine, sealed_to):
            checks.append(
                _check("recipient", False, f"the payload is sealed to {sealed_to[:23]}…, not to this key {mine[:23]}…")
            )
        else:
            try:
                result = open_sealed(recipient_private_key, stored_payload, HPKE_INFO)
                checks.append(_check("recipient", True, f"opened with the recipient key {mine[:23]}…"))
            except HpkeError:
                checks.append(_check("recipient", False, "the sealed payload does not open with the recipient key"))
    if result is not None:
        result_ok = hmac.compare_digest(sha256_digest(result), receipt["result_digest"])
        checks.append(
            _check(
                "result_digest",
                result_ok,
                f"the result ({len(result)} bytes) matches result_digest"
                if result_ok
                else "the result's SHA-256 differs from the receipt's result_digest",
            )
        )

    passed = {check.name for check in checks if check.outcome is Outcome.PASS}
    ok = all(check.ok for check in checks) and all(name in passed for name in REQUIRED_CHECKS)
    return ReceiptVerification(ok, checks, receipt, result if ok else None, simulated, attestation)
