"""The key-release decision: appraise a kernel's evidence, then seal the dataset key to its attested key.

This is the one place where a dataset key leaves the owner's control, so it fails closed at every step: evidence
that does not parse, a nonce that was not issued here, already used or expired, a dataset without an attestation
policy, a failing check, or a kernel without an HPKE key: each is a denial that names its reason. Only a kernel
whose attestation satisfies the owner's policy receives the key, sealed (HPKE) to the key its report binds, so the
host relaying the response learns nothing.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from confnb import hpke
from confnb.attest.errors import AttestInputError
from confnb.attest.evidence import Evidence
from confnb.attest.policy import AttestationPolicy
from confnb.attest.verifier import Verifier
from confnb.broker.challenges import ChallengeStore
from confnb.broker.keys import MasterKey


@dataclass(frozen=True)
class DatasetRecord:
    """What the broker keeps per dataset: its wrapped key and both halves of the owner's policy."""

    dataset_id: str
    key_id: str
    wrapped_key: bytes
    attestation_policy: AttestationPolicy | None
    output_policy: dict[str, Any]  # canonical form, as signed by the owner
    output_policy_signature: str  # base64 Ed25519 by the owner key over the canonical JSON


@dataclass(frozen=True)
class Grant:
    dataset_id: str
    key_id: str
    sealed_key: bytes
    info: bytes
    output_policy: dict[str, Any]
    output_policy_signature: str
    evidence_digest: str
    simulated: bool
    # base64 of the kernel's raw Ed25519 signing key, bound by its evidence; None when the claim is not such a key.
    # The broker records it at release as the key that may charge the dataset's privacy budget.
    signing_public_key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset_id": self.dataset_id,
            "key_id": self.key_id,
            "sealed_key": base64.b64encode(self.sealed_key).decode(),
            "hpke_suite": hpke.SUITE_NAME,
            "hpke_info": self.info.decode(),
            "output_policy": self.output_policy,
            "output_policy_signature": self.output_policy_signature,
            "evidence_digest": self.evidence_digest,
        }


@dataclass(frozen=True)
class Denial:
    dataset_id: str
    reason: str
    status: int = 403  # 400: the request itself is malformed
    checks: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"dataset_id": self.dataset_id, "released": False, "reason": self.reason, "checks": self.checks}


def release_info(dataset_id: str, key_id: str, nonce: str) -> bytes:
    """The HPKE ``info``: binds a sealed key to its dataset, key and request, so it opens for nothing else."""
    return json.dumps(["confnb-key-release/1", dataset_id, key_id, nonce.lower()], separators=(",", ":")).encode()


def decide(
    evidence_document: Any,
    dataset: DatasetRecord,
    challenges: ChallengeStore,
    verifier: Verifier,
    master_key: MasterKey,
    now: datetime | None = None,
) -> Grant | Denial:
    moment = now or datetime.now(UTC)
    deny = _Denier(dataset.dataset_id)
    try:
        evidence = Evidence.from_dict(evidence_document)
    except AttestInputError as exc:
        return deny(f"evidence: {exc}", status=400)
    nonce = evidence.claims.get("nonce", "")
    try:
        nonce_bytes = bytes.fromhex(nonce)
    except ValueError:
        return deny("evidence: the nonce claim is not hex", status=400)
    problem = challenges.consume(nonce, moment)
    if problem is not None:
        return deny(f"nonce: {problem}")
    if dataset.attestation_policy is None:
        return deny("policy: the owner set no attestation policy for this dataset, so every release is denied")
    try:
        result = verifier.verify_evidence(evidence, dataset.attestation_policy, moment, nonce=nonce_bytes)
    except AttestInputError as exc:
        return deny(f"evidence: {exc}", status=400)
    checks = [check.to_dict() for check in result.checks]
    if not result.ok:
        failing = "; ".join(f"{check.name}: {check.detail}" for check in result.failures) or "required checks missing"
        return deny(f"attestation rejected: {failing}", checks=checks)
    try:
        recipient = hpke.public_key_from_bytes(
            base64.b64decode(evidence.claims.get("hpke_public_key", ""), validate=True)
        )
    except (binascii.Error, ValueError) as exc:
        return deny(f"evidence: hpke_public_key claim: {exc}", status=400)
    info = release_info(dataset.dataset_id, dataset.key_id, nonce)
    dataset_key = master_key.unwrap(dataset.wrapped_key, dataset.dataset_id, dataset.key_id)
    return Grant(
        dataset_id=dataset.dataset_id,
        key_id=dataset.key_id,
        sealed_key=hpke.seal(recipient, dataset_key, info),
        info=info,
        output_policy=dataset.output_policy,
        output_policy_signature=dataset.output_policy_signature,
        evidence_digest=evidence.digest(),
        simulated=result.simulated,
        signing_public_key=_signing_key(evidence.claims.get("signing_public_key", "")),
    )


def _signing_key(claim: str) -> str | None:
    """The claim in canonical base64 if it is a raw Ed25519 public key, so that a charge's key compares equal."""
    try:
        raw = base64.b64decode(claim, validate=True)
        ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError):
        return None
    return base64.b64encode(raw).decode()


@dataclass(frozen=True)
class _Denier:
    dataset_id: str

    def __call__(self, reason: str, status: int = 403, checks: list[dict[str, Any]] | None = None) -> Denial:
        return Denial(self.dataset_id, reason, status, checks or [])
