"""Trust anchors: AMD's root keys (ARKs), pinned by the SHA-256 of their DER certificates.

The ARK that arrives with evidence is never trusted for what it says about itself: anyone can mint a self-signed
certificate named ``ARK-Milan``. It is trusted only if its bytes hash to one of these values, which were taken
from the certificates AMD's KDS serves (identical in go-sev-guest, virtee/sev and trustee).
"""

from __future__ import annotations

from confnb.attest.report import Product

PINNED_ARK_SHA256: dict[str, Product] = {
    "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd": Product.MILAN,
    "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1": Product.GENOA,
    "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a": Product.TURIN,
}


def pinned_product(ark_sha256: str) -> Product | None:
    """The product whose pinned ARK has this fingerprint, or None if it is not one of AMD's roots."""
    return PINNED_ARK_SHA256.get(ark_sha256.lower())
