"""Obtaining a dataset key from its owner's broker: challenge, fresh evidence, sealed key, signed policy.

The vault asks the broker for a nonce, has the TEE bind it (with the vault's HPKE public key) into a report, and
presents that evidence; the broker answers with the dataset key sealed to that HPKE key, so only this VM can open
it. The broker's address comes from confnb's configuration (an argument, else ``CONFNB_BROKER_URL``), never from
a dataset file: a file chosen by the host must not be able to send the kernel's evidence to a server of its choice.
The owner's signature over the output policy is checked against the owner key the dataset's manifest pins.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from confnb import hpke
from kernel_enclave.attestation import issue_evidence
from kernel_enclave.tee.base import TeeBackend

BROKER_URL_VARIABLE = "CONFNB_BROKER_URL"
_TIMEOUT_S = 30


class KeyReleaseError(RuntimeError):
    """The broker refused the key (the message carries its reason) or could not be reached."""


@dataclass(frozen=True)
class ReleasedKey:
    dataset_id: str
    key_id: str
    key: bytes
    output_policy: dict[str, Any]  # verified: signed by the dataset owner's key
    nonce: str = ""  # the broker's challenge, hex: the broker's audit log records it with the release
    evidence_digest: str = ""  # the evidence this kernel presented (``Evidence.digest``)

    def __repr__(self) -> str:  # the key never appears in logs or tracebacks
        return f"ReleasedKey(dataset_id={self.dataset_id!r}, key_id={self.key_id!r}, key=<secret>)"


def broker_url(explicit: str | None = None) -> str:
    url = explicit or os.environ.get(BROKER_URL_VARIABLE, "")
    if not url:
        raise KeyReleaseError(f"no broker configured: pass broker=... or set {BROKER_URL_VARIABLE}")
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise KeyReleaseError(f"broker URL must be http(s), not {scheme or 'schemeless'}: {url!r}")
    return url.rstrip("/")


class BrokerClient:
    """Key releases for one kernel: its TEE, its HPKE key pair and its public signing and CurveZMQ keys."""

    def __init__(
        self,
        backend: TeeBackend,
        hpke_private_key: ec.EllipticCurvePrivateKey,
        signing_public_key: bytes,
        curve_public_key: str,
        url: str | None = None,
    ) -> None:
        self.url = broker_url(url)
        self._backend = backend
        self._hpke_key = hpke_private_key
        self._hpke_public = hpke_private_key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        self._signing_public = signing_public_key
        self._curve_public = curve_public_key

    def release(self, dataset_id: str, owner_public_key: bytes) -> ReleasedKey:
        """The key of ``dataset_id``, if the owner's broker accepts this kernel's attestation."""
        challenge = self._post("/v1/challenge", {})
        try:
            nonce = bytes.fromhex(str(challenge["nonce"]))
        except (KeyError, ValueError):
            raise KeyReleaseError("the broker's challenge carries no hex nonce") from None
        evidence = issue_evidence(
            self._backend,
            nonce,
            hpke_public_key=self._hpke_public,
            signing_public_key=self._signing_public,
            curve_public_key=self._curve_public,
        )
        path = f"/v1/datasets/{urllib.parse.quote(dataset_id, safe='')}/key-release"
        grant = self._post(path, {"evidence": evidence.to_dict()})
        try:
            sealed = base64.b64decode(grant["sealed_key"], validate=True)
            info = str(grant["hpke_info"]).encode()
            policy = grant["output_policy"]
            signature = base64.b64decode(grant["output_policy_signature"], validate=True)
            key_id = str(grant["key_id"])
        except (KeyError, TypeError, binascii.Error):
            raise KeyReleaseError("the broker's answer is not a key release") from None
        expected_info = json.dumps(["confnb-key-release/1", dataset_id, key_id, nonce.hex()], separators=(",", ":"))
        if info != expected_info.encode():
            raise KeyReleaseError("the sealed key was made for another dataset or request")
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(owner_public_key).verify(
                signature, json.dumps(policy, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
            )
        except (InvalidSignature, ValueError):
            raise KeyReleaseError(f"the output policy of {dataset_id!r} is not signed by the dataset's owner") from None
        try:
            key = hpke.open_sealed(self._hpke_key, sealed, info)
        except hpke.HpkeError:
            raise KeyReleaseError("the sealed key does not open with this kernel's attested key") from None
        return ReleasedKey(dataset_id, key_id, key, policy, nonce.hex(), evidence.digest())

    def _post(self, path: str, body: object) -> dict[str, Any]:
        request = urllib.request.Request(  # noqa: S310 - scheme checked in broker_url
            self.url + path,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:  # noqa: S310
                document = json.loads(response.read())
        except urllib.error.HTTPError as error:
            try:
                reason = json.loads(error.read()).get("reason", error.reason)
            except (ValueError, AttributeError):
                reason = error.reason
            raise KeyReleaseError(f"broker refused ({error.code}): {reason}") from None
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise KeyReleaseError(f"broker at {self.url} unreachable: {error}") from None
        if not isinstance(document, dict):
            raise KeyReleaseError("the broker's answer is not a JSON object")
        return document
