"""Export bundles: a released result plus a receipt, signed by the kernel's attested key, that anyone can verify.

The format is ``confnb-export/1`` (see :mod:`confnb.receipts`, which verifies it). The vault builds the receipt
(result digest, policy id, datasets, operation digest, time, recipient), asks the TEE for fresh evidence whose
nonce is the receipt's hash, records that evidence's digest in the receipt, and signs the whole receipt with the
kernel's Ed25519 key. A verifier then knows that an attested kernel released exactly these bytes under this policy,
and nobody on the way (the executor that writes the file, the host, a mail server) could change them.

When a recipient's P-256 key is given the payload is HPKE-sealed to it, so only the recipient can read the result;
the receipt still names it by digest.
"""

from __future__ import annotations

import base64
import hmac
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from confnb import hpke
from confnb.attest.errors import EvidenceError
from confnb.attest.evidence import Evidence, rfc3339
from confnb.receipt_format import (
    EXPORT_FORMAT,
    HPKE_INFO,
    canonical_json,
    check_file_name,
    check_media_type,
    receipt_nonce,
    recipient_fingerprint,
    sha256_digest,
)

__all__ = ["EXPORT_FORMAT", "ExportError", "make_export"]

MAX_ID_LENGTH: Final = 256


class ExportError(ValueError):
    """An export cannot be made (bad arguments, a bad recipient key, or evidence that does not bind the receipt)."""


def _text(name: str, value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH or not value.isprintable():
        raise ExportError(f"{name} must be a non-empty printable string of at most {MAX_ID_LENGTH} characters")
    return value


def make_export(
    *,
    signing_key: Ed25519PrivateKey,
    evidence_for: Callable[[bytes], dict[str, Any]],
    payload: bytes,
    media_type: str,
    file_name: str,
    policy_id: str,
    datasets: Sequence[str],
    operation_digest: str,
    recipient_public_key: bytes | None = None,
) -> bytes:
    """Build a ``confnb-export/1`` bundle (UTF-8 JSON bytes) for ``payload``, a result the output policy released.

    ``evidence_for(nonce)`` returns fresh evidence (``issue_evidence(...).to_dict()``) bound to ``nonce``; it must
    carry this ``signing_key``'s public half in its claims. ``recipient_public_key`` is an uncompressed P-256 point
    (65 bytes); when given, the payload is HPKE-sealed to it.
    """
    if not isinstance(signing_key, Ed25519PrivateKey):
        raise TypeError(f"signing_key must be an Ed25519PrivateKey, not {type(signing_key).__name__}")
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
    payload = bytes(payload)
    if problem := check_media_type(media_type):
        raise ExportError(problem)
    if problem := check_file_name(file_name):
        raise ExportError(problem)
    _text("policy_id", policy_id)
    _text("operation_digest", operation_digest)
    if isinstance(datasets, str | bytes) or not isinstance(datasets, Sequence):
        raise ExportError("datasets must be a list of dataset ids")
    dataset_ids = [_text("each dataset id", dataset) for dataset in datasets]

    if recipient_public_key is not None:
        if not isinstance(recipient_public_key, bytes):
            raise ExportError("the recipient key must be the bytes of an uncompressed P-256 point")
        try:
            stored = hpke.seal(recipient_public_key, payload, HPKE_INFO)
        except hpke.HpkeError as exc:
            raise ExportError(f"recipient key: {exc}") from None
        sealed_to: str | None = recipient_fingerprint(recipient_public_key)
    else:
        stored, sealed_to = payload, None

    receipt: dict[str, Any] = {
        "result_digest": sha256_digest(payload),
        "payload_digest": sha256_digest(stored),
        "media_type": media_type,
        "file_name": file_name,
        "policy_id": policy_id,
        "datasets": dataset_ids,
        "operation_digest": operation_digest,
        "time": rfc3339(datetime.now(UTC)),
        "sealed_to": sealed_to,
    }
    nonce = receipt_nonce(receipt)
    evidence_document = evidence_for(nonce)
    try:
        evidence = Evidence.from_dict(evidence_document)
    except EvidenceError as exc:
        raise ExportError(f"the TEE's evidence is unusable: {exc}") from None
    # Checked here, where the cause is known: a verifier would reject the bundle anyway, with a vaguer reason.
    if not hmac.compare_digest(evidence.claims.get("nonce", "").encode(), nonce.hex().encode()):
        raise ExportError("the evidence is not bound to this receipt (its nonce differs)")
    own_key = base64.b64encode(signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()
    if not hmac.compare_digest(evidence.claims.get("signing_public_key", "").encode(), own_key.encode()):
        raise ExportError("the evidence binds another signing key than the one signing this receipt")
    receipt["evidence_digest"] = evidence.digest()
    signature = signing_key.sign(canonical_json(receipt))
    bundle = {
        "format": EXPORT_FORMAT,
        "receipt": receipt,
        "signature": base64.b64encode(signature).decode("ascii"),
        "evidence": evidence.to_dict(),
        "payload": base64.b64encode(stored).decode("ascii"),
    }
    return json.dumps(bundle, sort_keys=True, indent=1, ensure_ascii=False).encode("utf-8") + b"\n"
