"""The export bundle's format: the bytes the kernel signs and every verifier recomputes.

Shared by the vault, which makes bundles inside the VM (so this module imports nothing of the client side), and
:mod:`confnb.receipts`, which verifies them anywhere.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

EXPORT_FORMAT: Final = "confnb-export/1"
HPKE_INFO: Final = b"confnb-export/1"
RECEIPT_FIELDS: Final = (
    "result_digest",
    "payload_digest",
    "media_type",
    "file_name",
    "policy_id",
    "datasets",
    "operation_digest",
    "evidence_digest",
    "time",
    "sealed_to",
)
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")


def canonical_json(value: object) -> bytes:
    """UTF-8 JSON with sorted keys and no whitespace: the bytes that are hashed and signed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>``, the digest form used in receipts, manifests and audit entries."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def receipt_nonce(receipt: Mapping[str, Any]) -> bytes:
    """The evidence nonce that binds a receipt: SHA-256 of its canonical JSON without ``evidence_digest``."""
    return hashlib.sha256(canonical_json({k: v for k, v in receipt.items() if k != "evidence_digest"})).digest()


def recipient_fingerprint(public_key: bytes | ec.EllipticCurvePublicKey) -> str:
    """``sha256:<hex>`` of a recipient's uncompressed P-256 point, as ``sealed_to`` names it."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key = public_key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    return sha256_digest(public_key)


def check_file_name(name: object) -> str | None:
    """Why ``name`` is not a safe bare file name, or None: receipts name files that UIs may offer to save."""
    if not isinstance(name, str) or not name:
        return "file_name must be a non-empty string"
    if len(name.encode("utf-8", "surrogatepass")) > 255:
        return "file_name is longer than 255 bytes"
    if name in (".", "..") or any(char in name for char in "/\\\0") or not name.isprintable():
        return "file_name must be a bare file name (no path separators or control characters)"
    return None


def check_media_type(media_type: object) -> str | None:
    if not isinstance(media_type, str) or not _MEDIA_TYPE.fullmatch(media_type):
        return "media_type must be a MIME type such as text/csv"
    return None
