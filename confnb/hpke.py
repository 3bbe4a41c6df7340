"""The one HPKE suite confnb uses everywhere (RFC 9180, base mode, single shot).

DHKEM(P-256, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM, chosen so that browsers can seal to a kernel with WebCrypto
alone. The broker seals dataset keys to a kernel's attested key, the kernel seals exports to recipients, and the
browser seals uploads to the kernel: all through these two functions, with an ``info`` string naming the purpose so
that a ciphertext made for one purpose never opens as another.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ec

SUITE = hpke.Suite(hpke.KEM.P256, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
SUITE_NAME = "DHKEM(P-256, HKDF-SHA256)/HKDF-SHA256/AES-256-GCM"


class HpkeError(ValueError):
    """A public key that is not an uncompressed P-256 point, or a ciphertext that does not open."""


def public_key_from_bytes(raw: bytes) -> ec.EllipticCurvePublicKey:
    """An uncompressed P-256 point (65 bytes, 0x04 || x || y), as WebCrypto exports it and claims carry it."""
    if len(raw) != 65 or raw[0] != 0x04:
        raise HpkeError("an HPKE public key is an uncompressed P-256 point of 65 bytes")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
    except ValueError:
        raise HpkeError("the HPKE public key is not a point on P-256") from None


def seal(recipient: ec.EllipticCurvePublicKey | bytes, plaintext: bytes, info: bytes) -> bytes:
    """enc || ciphertext, openable only by the recipient's private key and only for the same ``info``."""
    key = public_key_from_bytes(recipient) if isinstance(recipient, bytes) else recipient
    return SUITE.encrypt(plaintext, key, info=info)


def open_sealed(private_key: ec.EllipticCurvePrivateKey, sealed: bytes, info: bytes) -> bytes:
    try:
        return SUITE.decrypt(sealed, private_key, info=info)
    except (InvalidTag, ValueError) as exc:
        raise HpkeError("HPKE ciphertext does not open with this key and purpose") from exc
