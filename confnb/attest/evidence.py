"""Evidence bundles (``confnb-evidence/1``): a report, its certificates, and the claims its REPORT_DATA binds.

The kernel chooses its keys and a verifier's nonce, writes them as *claims*, and asks the firmware for a report
whose REPORT_DATA is SHA-512 of the canonical claims. Whoever checks the report's signature and recomputes that
hash knows the claims came from inside the attested VM. This module is shared by the kernel (which builds bundles)
and the verifiers (which read them), so it stays free of anything but the format itself.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confnb.attest.errors import EvidenceError

FORMAT = "confnb-evidence/1"
TEE_KINDS = ("sev-snp", "simulated")
CLAIM_NAMES = (
    "nonce",
    "hpke_public_key",
    "signing_public_key",
    "curve_public_key",
    "bundle_digest",
    "issued_at",
)
MAX_NONCE_BYTES = 64


def canonical_claims(claims: Mapping[str, str]) -> bytes:
    """UTF-8 JSON, keys sorted, no whitespace: the exact bytes REPORT_DATA commits to."""
    for key, value in claims.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise EvidenceError(f"claim {key!r} must map a string to a string")
    return json.dumps(dict(claims), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def report_data_for(claims: Mapping[str, str]) -> bytes:
    """REPORT_DATA (64 bytes) for a set of claims."""
    return hashlib.sha512(canonical_claims(claims)).digest()


def parse_nonce(text: str) -> bytes:
    """A verifier's nonce as given on a command line or in a request: hex, 1 to 64 bytes."""
    try:
        nonce = bytes.fromhex(text.strip())
    except ValueError:
        raise EvidenceError(f"nonce must be hex, got {text[:20]!r}") from None
    if not 1 <= len(nonce) <= MAX_NONCE_BYTES:
        raise EvidenceError(f"nonce must be 1 to {MAX_NONCE_BYTES} bytes, got {len(nonce)}")
    return nonce


def rfc3339(moment: datetime) -> str:
    """UTC timestamp with second precision and a Z suffix, the form used in claims."""
    return moment.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def parse_rfc3339(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise EvidenceError(f"not an RFC 3339 timestamp: {text!r}") from None
    if moment.tzinfo is None:
        raise EvidenceError(f"timestamp {text!r} has no time zone")
    return moment.astimezone(UTC)


@dataclass(frozen=True)
class Evidence:
    """One evidence bundle. ``vek`` and ``chain`` are PEM text; either may be absent (then cache or KDS)."""

    tee: str
    report: bytes
    claims: dict[str, str]
    vek: str | None = None
    chain: tuple[str, ...] = field(default_factory=tuple)

    @property
    def simulated(self) -> bool:
        return self.tee == "simulated"

    def report_data(self) -> bytes:
        return report_data_for(self.claims)

    def digest(self) -> str:
        """``sha256:<hex>`` of the canonical bundle, for receipts and audit entries."""
        return "sha256:" + hashlib.sha256(self.to_json(indent=None).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        certs: dict[str, Any] = {"chain": list(self.chain)}
        if self.vek is not None:
            certs = {"vek": self.vek, **certs}
        return {
            "format": FORMAT,
            "tee": self.tee,
            "report": base64.b64encode(self.report).decode("ascii"),
            "certs": certs,
            "claims": dict(self.claims),
        }

    def to_json(self, indent: int | None = 2) -> str:
        separators = (",", ":") if indent is None else None
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True, separators=separators)

    @classmethod
    def from_json(cls, data: str | bytes) -> Evidence:
        try:
            document = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EvidenceError(f"evidence is not JSON: {exc}") from None
        return cls.from_dict(document)

    @classmethod
    def from_dict(cls, document: Any) -> Evidence:
        if not isinstance(document, dict):
            raise EvidenceError("evidence must be a JSON object")
        if document.get("format") != FORMAT:
            raise EvidenceError(f"evidence format is {document.get('format')!r}, expected {FORMAT!r}")
        tee = document.get("tee")
        if tee not in TEE_KINDS:
            raise EvidenceError(f"evidence tee is {tee!r}, expected one of {', '.join(TEE_KINDS)}")
        encoded = document.get("report")
        if not isinstance(encoded, str):
            raise EvidenceError("evidence has no base64 'report'")
        try:
            report = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise EvidenceError("evidence 'report' is not valid base64") from None
        certs = document.get("certs", {})
        if not isinstance(certs, dict):
            raise EvidenceError("evidence 'certs' must be an object")
        vek = certs.get("vek")
        if vek is not None and not isinstance(vek, str):
            raise EvidenceError("evidence 'certs.vek' must be PEM text")
        chain = certs.get("chain", [])
        if not isinstance(chain, list) or not all(isinstance(pem, str) for pem in chain):
            raise EvidenceError("evidence 'certs.chain' must be a list of PEM texts")
        claims = document.get("claims")
        if not isinstance(claims, dict):
            raise EvidenceError("evidence has no 'claims' object")
        for key, value in claims.items():
            if not isinstance(value, str):
                raise EvidenceError(f"claim {key!r} must be a string")
        return cls(tee=tee, report=report, claims=dict(claims), vek=vek, chain=tuple(chain))
