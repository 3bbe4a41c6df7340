"""Evidence issuance: bind the kernel's fresh keys and a verifier's nonce into a hardware report.

The kernel writes its public keys, the verifier's nonce, the digest of its own code and the time as *claims*;
REPORT_DATA is SHA-512 of their canonical JSON (``confnb.attest.evidence.report_data_for``). A verifier that checks
the report's signature and recomputes the hash knows these exact keys were produced inside the attested VM, so it
can encrypt to them (HPKE), trust what they sign (Ed25519), and connect to the kernel (CurveZMQ) without trusting
the host in between.
"""

from __future__ import annotations

import base64
import hmac
import string
from datetime import UTC, datetime

from confnb.attest.evidence import MAX_NONCE_BYTES, Evidence, report_data_for, rfc3339
from confnb.attest.report import REPORT_SIZE
from kernel_enclave.measurement import bundle_digest
from kernel_enclave.tee.base import MAX_VMPL, TeeBackend, TeeError

_Z85_ALPHABET = frozenset(string.digits + string.ascii_letters + ".-:+=^!/*?&<>()[]{}@%$#")
_REPORT_DATA = slice(0x50, 0x90)


def issue_evidence(
    backend: TeeBackend,
    nonce: bytes,
    *,
    hpke_public_key: bytes,
    signing_public_key: bytes,
    curve_public_key: str,
    issued_at: datetime | None = None,
    vmpl: int = 0,
) -> Evidence:
    """Ask ``backend`` for a report over the claims and return the ``confnb-evidence/1`` bundle.

    ``hpke_public_key`` is the raw (uncompressed point) P-256 key, ``signing_public_key`` the raw 32-byte Ed25519
    key, ``curve_public_key`` the CurveZMQ server key in Z85 text. ``issued_at`` defaults to now (UTC).
    """
    if not isinstance(nonce, bytes) or not 1 <= len(nonce) <= MAX_NONCE_BYTES:
        raise ValueError(f"nonce must be 1 to {MAX_NONCE_BYTES} bytes")
    for label, key in (("hpke_public_key", hpke_public_key), ("signing_public_key", signing_public_key)):
        if not isinstance(key, bytes) or not key:
            raise ValueError(f"{label} must be non-empty raw key bytes")
    if (
        not isinstance(curve_public_key, str)
        or not curve_public_key
        or len(curve_public_key) % 5
        or not set(curve_public_key) <= _Z85_ALPHABET
    ):
        raise ValueError("curve_public_key must be Z85 text (a multiple of 5 characters of the Z85 alphabet)")
    if isinstance(vmpl, bool) or not isinstance(vmpl, int) or not 0 <= vmpl <= MAX_VMPL:
        raise ValueError(f"vmpl must be 0 to {MAX_VMPL}")
    if issued_at is None:
        issued_at = datetime.now(UTC)
    elif issued_at.tzinfo is None:
        raise ValueError("issued_at must carry a time zone")

    claims = {
        "nonce": nonce.hex(),
        "hpke_public_key": base64.b64encode(hpke_public_key).decode("ascii"),
        "signing_public_key": base64.b64encode(signing_public_key).decode("ascii"),
        "curve_public_key": curve_public_key,
        "bundle_digest": bundle_digest(),
        "issued_at": rfc3339(issued_at),
    }
    report_data = report_data_for(claims)
    quote = backend.get_quote(report_data, vmpl)
    # A report for different REPORT_DATA (a confused or malicious host relaying another guest's report) would only
    # be rejected later by the verifier, with a less helpful message; catch it where the cause is known.
    if len(quote.report) != REPORT_SIZE or not hmac.compare_digest(quote.report[_REPORT_DATA], report_data):
        raise TeeError(f"the {backend.name} TEE returned a report that does not carry the requested REPORT_DATA")
    return Evidence(
        tee=backend.name,
        report=quote.report,
        claims=claims,
        vek=quote.vek_pem,
        chain=quote.chain_pem,
    )
