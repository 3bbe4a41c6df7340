"""The kernel's keys as the vault receives them, and where the vault finds its socket and datasets.

Kept free of the vault's heavy imports (Arrow, scikit-learn): the launcher, which is also the relay, needs only this.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

SOCKET_VARIABLE = "CONFNB_VAULT_SOCKET"  # set in the executor: where the analyst API connects
DATASET_PATH_VARIABLE = "CONFNB_DATASET_PATH"  # folders in which ``cn.open(ID)`` looks for dataset directories


@dataclass(frozen=True)
class VaultKeys:
    """The kernel's HPKE and signing keys (the ones its evidence binds) and its CurveZMQ public key."""

    hpke_private_key: ec.EllipticCurvePrivateKey
    signing_key: ed25519.Ed25519PrivateKey
    curve_public_key: str

    @classmethod
    def generate(cls) -> VaultKeys:
        import zmq

        return cls(
            ec.generate_private_key(ec.SECP256R1()),
            ed25519.Ed25519PrivateKey.generate(),
            zmq.curve_keypair()[0].decode("ascii"),
        )

    @property
    def hpke_public_key(self) -> bytes:
        return self.hpke_private_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )

    @property
    def signing_public_key(self) -> bytes:
        return self.signing_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def to_dict(self) -> dict[str, str]:
        """For the launcher → vault pipe only (process memory to process memory, never a file)."""
        der = serialization.Encoding.DER
        pkcs8 = serialization.PrivateFormat.PKCS8
        none = serialization.NoEncryption()
        return {
            "hpke": base64.b64encode(self.hpke_private_key.private_bytes(der, pkcs8, none)).decode(),
            "signing": base64.b64encode(self.signing_key.private_bytes(der, pkcs8, none)).decode(),
            "curve": self.curve_public_key,
        }

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> VaultKeys:
        hpke_key = serialization.load_der_private_key(base64.b64decode(value["hpke"]), None)
        signing_key = serialization.load_der_private_key(base64.b64decode(value["signing"]), None)
        if not isinstance(hpke_key, ec.EllipticCurvePrivateKey) or not isinstance(
            signing_key, ed25519.Ed25519PrivateKey
        ):
            raise ValueError("the vault's keys are not a P-256 and an Ed25519 private key")
        return cls(hpke_key, signing_key, str(value["curve"]))
