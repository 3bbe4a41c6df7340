"""The broker's master key and the wrapping of dataset keys at rest.

Dataset keys never sit on the owner's disk in the clear: each is wrapped with AES-256-GCM under the broker master
key, with the dataset id and key id as associated data so a wrapped key cannot be moved to another dataset. The
master key comes from a file of 32 random bytes or from a passphrase stretched with Argon2id (memory-hard, so a
stolen store cannot be brute-forced cheaply). Rotating the master key re-wraps every dataset key without touching
any encrypted data.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from confnb.fileio import write_atomically

KEY_SIZE = 32
_NONCE_SIZE = 12
_CHECK_CONTEXT = b"confnb-broker-master-key-check/1"


class MasterKeyError(ValueError):
    """The master key is missing, malformed, or not the one the store was created with."""


@dataclass(frozen=True)
class KdfParameters:
    """Argon2id parameters, stored beside the store so the same passphrase yields the same key later."""

    salt: bytes
    iterations: int = 3
    lanes: int = 4
    memory_cost_kib: int = 64 * 1024

    def to_dict(self) -> dict[str, Any]:
        return {
            "kdf": "argon2id",
            "salt": self.salt.hex(),
            "iterations": self.iterations,
            "lanes": self.lanes,
            "memory_cost_kib": self.memory_cost_kib,
        }

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> KdfParameters:
        try:
            if document["kdf"] != "argon2id":
                raise MasterKeyError(f"unknown key derivation {document['kdf']!r}")
            return cls(
                bytes.fromhex(document["salt"]),
                int(document["iterations"]),
                int(document["lanes"]),
                int(document["memory_cost_kib"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, MasterKeyError):
                raise
            raise MasterKeyError(f"malformed key-derivation parameters: {exc}") from None


def new_kdf_parameters() -> KdfParameters:
    """Fresh Argon2id parameters for a new passphrase: a random salt and RFC 9106's second recommended option."""
    return KdfParameters(salt=secrets.token_bytes(16))


class MasterKey:
    """32 secret bytes. Never logged, never repr'd, compared in constant time."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise MasterKeyError(f"a master key is {KEY_SIZE} bytes, not {len(key)}")
        self._key = bytes(key)

    def __repr__(self) -> str:
        return "MasterKey(<secret>)"

    @classmethod
    def generate(cls) -> MasterKey:
        return cls(secrets.token_bytes(KEY_SIZE))

    @classmethod
    def from_passphrase(cls, passphrase: str, parameters: KdfParameters) -> MasterKey:
        if not passphrase:
            raise MasterKeyError("the passphrase is empty")
        kdf = Argon2id(
            salt=parameters.salt,
            length=KEY_SIZE,
            iterations=parameters.iterations,
            lanes=parameters.lanes,
            memory_cost=parameters.memory_cost_kib,
        )
        return cls(kdf.derive(passphrase.encode("utf-8")))

    @classmethod
    def from_file(cls, path: str | Path) -> MasterKey:
        path = Path(path)
        try:
            mode = path.stat().st_mode
            data = path.read_bytes()
        except OSError as exc:
            raise MasterKeyError(f"{path}: cannot read the master key: {exc.strerror or exc}") from None
        if mode & 0o077:
            raise MasterKeyError(f"{path}: the master key file is readable by others (chmod 600 it)")
        return cls(data)

    def write(self, path: str | Path) -> None:
        write_atomically(path, self._key, mode=0o600)

    def check_value(self) -> str:
        """A public fingerprint (HMAC of a constant) that tells whether a given key is the store's key."""
        return hmac.new(self._key, _CHECK_CONTEXT, "sha256").hexdigest()

    def matches(self, check_value: str) -> bool:
        return hmac.compare_digest(self.check_value(), check_value)

    def wrap(self, dataset_key: bytes, dataset_id: str, key_id: str) -> bytes:
        nonce = os.urandom(_NONCE_SIZE)
        return nonce + AESGCM(self._key).encrypt(nonce, dataset_key, _context(dataset_id, key_id))

    def unwrap(self, wrapped: bytes, dataset_id: str, key_id: str) -> bytes:
        if len(wrapped) < _NONCE_SIZE + 16:
            raise MasterKeyError(f"wrapped key of {dataset_id!r} is truncated")
        try:
            return AESGCM(self._key).decrypt(wrapped[:_NONCE_SIZE], wrapped[_NONCE_SIZE:], _context(dataset_id, key_id))
        except InvalidTag:
            raise MasterKeyError(
                f"the key of dataset {dataset_id!r} does not unwrap: wrong master key, or the stored key was altered"
            ) from None


def _context(dataset_id: str, key_id: str) -> bytes:
    return json.dumps(["confnb-dataset-key/1", dataset_id, key_id], separators=(",", ":")).encode()
