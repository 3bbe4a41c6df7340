"""The data owner's store: one directory holding the owner key, the wrapped dataset keys and the audit log.

Layout of ``OWNER_DIR`` (mode 0700)::

    broker.sqlite      datasets (wrapped keys, policies), challenges,     SQLite, WAL
                       kernel keys granted, privacy-budget charges
    audit.sqlite       the hash-chained, owner-signed audit log          (confnb.broker.audit)
    owner.key          the owner's Ed25519 key, wrapped by the master key (never in the clear on disk)
    owner.pub          the owner's public key (PEM), to hand to analysts and kernels
    master.json        how to obtain the master key (key file or Argon2id parameters) and its check value
    master.key         the master key, when the owner chose a key file kept here (the embedded default)
    attestation.toml   optional: the attestation policy for datasets registered without one

The master key never needs to live here: ``--master-key-file`` elsewhere or a passphrase keeps a stolen directory
useless. Keeping it here (the default) is the convenient choice for a single trusted machine.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import secrets
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

from confnb.attest.evidence import rfc3339
from confnb.attest.policy import AttestationPolicy
from confnb.broker.audit import AuditLog, AuditLogError
from confnb.broker.db import initialize, transaction
from confnb.broker.keys import KdfParameters, MasterKey, MasterKeyError, new_kdf_parameters
from confnb.broker.release import DatasetRecord
from confnb.fileio import write_atomically
from confnb.policy.output import OutputPolicy
from confnb.policy.toml import read_policy_text

DATASET_KEY_SIZE = 32
_ID = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    dataset_id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    wrapped_key BLOB NOT NULL,
    attestation_policy TEXT,
    output_policy TEXT NOT NULL,
    output_policy_signature TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS key_releases (
    dataset_id TEXT NOT NULL,
    day TEXT NOT NULL,
    released INTEGER NOT NULL,
    PRIMARY KEY (dataset_id, day)
);
CREATE TABLE IF NOT EXISTS kernel_keys (
    dataset_id TEXT NOT NULL,
    kernel_key TEXT NOT NULL,
    granted_at TEXT NOT NULL,
    evidence_digest TEXT NOT NULL,
    PRIMARY KEY (dataset_id, kernel_key)
);
CREATE TABLE IF NOT EXISTS budget_charges (
    charge_id TEXT PRIMARY KEY,
    dataset_id TEXT NOT NULL,
    kernel_key TEXT NOT NULL,
    epsilon INTEGER NOT NULL,
    delta INTEGER NOT NULL,
    plan_digest TEXT NOT NULL,
    nonce TEXT NOT NULL UNIQUE,
    time TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS budget_charges_by_kernel ON budget_charges (dataset_id, kernel_key);
"""


class StoreError(ValueError):
    """The owner directory is missing, incomplete, or does not belong to this master key."""


@dataclass(frozen=True)
class MasterKeySource:
    """Where the master key comes from: a key file, or a passphrase (with the store's Argon2id parameters)."""

    key_file: Path | None = None
    passphrase: str | None = None


class OwnerStore:
    """An opened owner directory. Construct with :meth:`create` or :meth:`open`."""

    def __init__(self, directory: Path, master_key: MasterKey, owner_key: ed25519.Ed25519PrivateKey) -> None:
        self.directory = directory
        self._master = master_key
        self.owner_key = owner_key
        self.audit = AuditLog(directory / "audit.sqlite", owner_key)
        initialize(self.database, _SCHEMA)

    # -- life cycle -----------------------------------------------------------------------------------------

    @classmethod
    def create(cls, directory: str | Path, source: MasterKeySource | None = None) -> OwnerStore:
        """Make a new owner directory. Refuses to touch a directory that already holds a store."""
        root = Path(directory)
        if (root / "master.json").exists():
            raise StoreError(f"{root} already holds a broker store")
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        source = source or MasterKeySource()
        description: dict[str, Any]
        if source.passphrase is not None:
            parameters = new_kdf_parameters()
            master = MasterKey.from_passphrase(source.passphrase, parameters)
            description = {"source": "passphrase", **parameters.to_dict()}
        elif source.key_file is not None:
            master = MasterKey.generate()
            if source.key_file.exists():
                master = MasterKey.from_file(source.key_file)
            else:
                master.write(source.key_file)
            description = {"source": "key-file", "path": str(source.key_file)}
        else:
            master = MasterKey.generate()
            master.write(root / "master.key")
            description = {"source": "key-file", "path": "master.key"}
        owner_key = ed25519.Ed25519PrivateKey.generate()
        raw = owner_key.private_bytes_raw()
        write_atomically(root / "owner.key", master.wrap(raw, "owner", "ed25519"), mode=0o600)
        write_atomically(
            root / "owner.pub",
            owner_key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo),
            mode=0o644,
        )
        write_atomically(
            root / "master.json",
            json.dumps({**description, "check": master.check_value()}, indent=2).encode(),
            mode=0o600,
        )
        store = cls(root, master, owner_key)
        store.audit.append("admin", "owner", None, {"action": "init", "master_key": description["source"]})
        return store

    @classmethod
    def open(cls, directory: str | Path, source: MasterKeySource | None = None) -> OwnerStore:
        root = Path(directory)
        try:
            description = json.loads((root / "master.json").read_text())
        except FileNotFoundError:
            raise StoreError(f"{root} holds no broker store (run 'confnb broker init --dir {root}')") from None
        except (OSError, ValueError) as exc:
            raise StoreError(f"{root / 'master.json'}: unreadable: {exc}") from None
        master = _master_key(root, description, source or MasterKeySource())
        if not master.matches(str(description.get("check", ""))):
            raise StoreError("this is not the master key of the store (wrong passphrase or key file)")
        try:
            wrapped = (root / "owner.key").read_bytes()
        except OSError as exc:
            raise StoreError(f"{root / 'owner.key'}: {exc.strerror or exc}") from None
        owner_key = ed25519.Ed25519PrivateKey.from_private_bytes(master.unwrap(wrapped, "owner", "ed25519"))
        return cls(root, master, owner_key)

    @property
    def database(self) -> Path:
        return self.directory / "broker.sqlite"

    @property
    def master_key(self) -> MasterKey:
        return self._master

    @property
    def owner_public_key(self) -> ed25519.Ed25519PublicKey:
        return self.owner_key.public_key()

    # -- datasets -------------------------------------------------------------------------------------------

    def register_dataset(
        self,
        dataset_id: str,
        output_policy: OutputPolicy,
        attestation_policy_toml: str | None = None,
        *,
        key_id: str | None = None,
        dataset_key: bytes | None = None,
    ) -> tuple[str, bytes]:
        """Store the key of ``dataset_id`` (fresh unless given) with its policies; returns (key id, key).

        The encryptor may generate the key itself and register it only once the encrypted dataset is complete, so
        that a failed encryption leaves no key behind.
        """
        if not dataset_id or len(dataset_id) > 128 or any(ch not in _ID for ch in dataset_id):
            raise StoreError(f"dataset id {dataset_id!r}: use 1-128 letters, digits, '.', '_' or '-'")
        if attestation_policy_toml is not None:
            AttestationPolicy.from_toml(attestation_policy_toml, source=f"attestation policy of {dataset_id}")
        key_id = key_id or secrets.token_hex(8)
        dataset_key = dataset_key if dataset_key is not None else os.urandom(DATASET_KEY_SIZE)
        if len(dataset_key) != DATASET_KEY_SIZE:
            raise StoreError(f"a dataset key is {DATASET_KEY_SIZE} bytes")
        signed_policy = output_policy.canonical_json()
        signature = base64.b64encode(self.owner_key.sign(signed_policy)).decode()
        # The row commits only after its audit entry is durable: a full disk or a failing database leaves neither
        # a key nor an entry (the insert rolls back). Only a failure of the final commit itself, after the entry,
        # can part them; it is then recorded as such, as far as the disk allows.
        audited = False
        try:
            with transaction(self.database) as db:
                db.execute(
                    "INSERT INTO datasets VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        dataset_id,
                        key_id,
                        self._master.wrap(dataset_key, dataset_id, key_id),
                        attestation_policy_toml,
                        signed_policy.decode(),
                        signature,
                        rfc3339(datetime.now(UTC)),
                    ),
                )
                self.audit.append(
                    "admin",
                    "owner",
                    dataset_id,
                    {"action": "register", "key_id": key_id, "output_policy": output_policy.digest()},
                )
                audited = True
        except sqlite3.IntegrityError:
            raise StoreError(f"dataset {dataset_id!r} is already registered") from None
        except (sqlite3.Error, AuditLogError) as exc:
            if audited:
                with contextlib.suppress(AuditLogError, ValueError):
                    self.audit.append("admin", "owner", dataset_id, {"action": "register-failed", "key_id": key_id})
            raise StoreError(f"cannot register dataset {dataset_id!r}: {exc}; nothing was registered") from None
        return key_id, dataset_key

    def dataset(self, dataset_id: str) -> DatasetRecord | None:
        with transaction(self.database, write=False) as db:
            row = db.execute(
                "SELECT key_id, wrapped_key, attestation_policy, output_policy, output_policy_signature "
                "FROM datasets WHERE dataset_id = ?",
                (dataset_id,),
            ).fetchone()
        if row is None:
            return None
        key_id, wrapped, attestation_text, output_policy, signature = row
        return DatasetRecord(
            dataset_id=dataset_id,
            key_id=key_id,
            wrapped_key=bytes(wrapped),
            attestation_policy=self._attestation_policy(dataset_id, attestation_text),
            output_policy=json.loads(output_policy),
            output_policy_signature=signature,
        )

    def dataset_ids(self) -> list[str]:
        with transaction(self.database, write=False) as db:
            return [row[0] for row in db.execute("SELECT dataset_id FROM datasets ORDER BY dataset_id")]

    def dataset_key(self, dataset_id: str) -> bytes:
        """The owner's own access to a dataset key (``confnb dataset decrypt``); audited."""
        record = self.dataset(dataset_id)
        if record is None:
            raise StoreError(f"no dataset {dataset_id!r} in this store")
        self.audit.append("admin", "owner", dataset_id, {"action": "owner-decrypt", "key_id": record.key_id})
        return self._master.unwrap(record.wrapped_key, dataset_id, record.key_id)

    def count_release(
        self,
        dataset_id: str,
        cap: int | None,
        moment: datetime,
        detail: dict[str, Any],
        actor: str,
        *,
        kernel_key: str | None = None,
        evidence_digest: str = "",
    ) -> int | None:
        """Count one key release of ``dataset_id`` on the UTC day of ``moment`` and audit it, as one transaction.

        Returns how many releases the day now holds, or None when ``cap`` are already counted (then nothing is
        counted or audited: the caller denies). The count commits only after the ``release`` entry is durable, and
        ``BEGIN IMMEDIATE`` serialises concurrent releases, so two kernels can never both take the last place and
        a release the log does not show is never counted (nor one it shows left uncounted, short of the final
        commit itself failing).

        ``kernel_key`` (base64 of the kernel's raw Ed25519 signing key, from its verified evidence) is recorded in
        the same transaction as authorised to charge the dataset's privacy budget (:mod:`confnb.broker.budget`):
        only a kernel that holds the key may spend the budget, and only once it holds it.
        """
        day = moment.astimezone(UTC).date().isoformat()
        with transaction(self.database) as db:
            row = db.execute(
                "SELECT released FROM key_releases WHERE dataset_id = ? AND day = ?", (dataset_id, day)
            ).fetchone()
            released = int(row[0]) if row else 0
            if cap is not None and released >= cap:
                return None
            db.execute(
                "INSERT INTO key_releases VALUES (?, ?, 1) "
                "ON CONFLICT (dataset_id, day) DO UPDATE SET released = released + 1",
                (dataset_id, day),
            )
            if kernel_key is not None:
                db.execute(
                    "INSERT OR IGNORE INTO kernel_keys VALUES (?, ?, ?, ?)",
                    (dataset_id, kernel_key, rfc3339(moment), evidence_digest),
                )
            limit = {} if cap is None else {"max_kernels_per_day": cap}
            self.audit.append("release", actor, dataset_id, {**detail, "released_today": released + 1, **limit})
        return released + 1

    def releases_on(self, dataset_id: str, moment: datetime) -> int:
        """Key releases of ``dataset_id`` counted on the UTC day of ``moment``."""
        day = moment.astimezone(UTC).date().isoformat()
        with transaction(self.database, write=False) as db:
            row = db.execute(
                "SELECT released FROM key_releases WHERE dataset_id = ? AND day = ?", (dataset_id, day)
            ).fetchone()
        return int(row[0]) if row else 0

    def granted_kernel_keys(self, dataset_id: str) -> list[str]:
        """The signing keys (base64, raw Ed25519) of the kernels that received the key of ``dataset_id``."""
        with transaction(self.database, write=False) as db:
            rows = db.execute(
                "SELECT kernel_key FROM kernel_keys WHERE dataset_id = ? ORDER BY granted_at, kernel_key", (dataset_id,)
            ).fetchall()
        return [str(row[0]) for row in rows]

    def _attestation_policy(self, dataset_id: str, text: str | None) -> AttestationPolicy | None:
        if text is not None:
            return _parse_policy(text, f"attestation policy of {dataset_id}")
        default = self.directory / "attestation.toml"
        if not default.exists():
            return None
        return _parse_policy(read_policy_text(default), str(default))

    # -- keys -----------------------------------------------------------------------------------------------

    def rotate_master_key(self, source: MasterKeySource) -> int:
        """Re-wrap every dataset key and the owner key under a new master key; no data is re-encrypted."""
        if source.passphrase is not None:
            parameters = new_kdf_parameters()
            new = MasterKey.from_passphrase(source.passphrase, parameters)
            description: dict[str, Any] = {"source": "passphrase", **parameters.to_dict()}
        else:
            new = MasterKey.generate()
            target = source.key_file or self.directory / "master.key"
            description = {"source": "key-file", "path": str(source.key_file) if source.key_file else "master.key"}
            staged = target.with_name(target.name + ".new")
            new.write(staged)
        with transaction(self.database) as db:
            rows = db.execute("SELECT dataset_id, key_id, wrapped_key FROM datasets").fetchall()
            for dataset_id, key_id, wrapped in rows:
                key = self._master.unwrap(bytes(wrapped), dataset_id, key_id)
                db.execute(
                    "UPDATE datasets SET wrapped_key = ? WHERE dataset_id = ?",
                    (new.wrap(key, dataset_id, key_id), dataset_id),
                )
        write_atomically(
            self.directory / "owner.key", new.wrap(self.owner_key.private_bytes_raw(), "owner", "ed25519"), mode=0o600
        )
        if source.passphrase is None:
            os.replace(staged, target)
        write_atomically(
            self.directory / "master.json",
            json.dumps({**description, "check": new.check_value()}, indent=2).encode(),
            mode=0o600,
        )
        self._master = new
        self.audit.append("admin", "owner", None, {"action": "rotate-master-key", "datasets": len(rows)})
        return len(rows)


@functools.lru_cache(maxsize=64)
def _parse_policy(text: str, source: str) -> AttestationPolicy:
    # Every release looks its dataset's policy up; policies are immutable, so each text is parsed once.
    return AttestationPolicy.from_toml(text, source=source)


def load_owner_public_key(path: str | Path) -> ed25519.Ed25519PublicKey:
    key = load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise StoreError(f"{path} is not an Ed25519 public key")
    return key


def _master_key(root: Path, description: dict[str, Any], source: MasterKeySource) -> MasterKey:
    kind = description.get("source")
    if kind == "passphrase":
        if source.passphrase is None:
            raise StoreError("this store's master key comes from a passphrase; provide it (--passphrase-env VAR)")
        return MasterKey.from_passphrase(source.passphrase, KdfParameters.from_dict(description))
    if kind == "key-file":
        path = source.key_file or root / str(description.get("path", "master.key"))
        try:
            return MasterKey.from_file(path)
        except MasterKeyError as exc:
            raise StoreError(str(exc)) from None
    raise StoreError(f"master.json names an unknown master key source {kind!r}")
