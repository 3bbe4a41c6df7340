"""The owner store: creation, reopening with the right and the wrong master key, registration, rotation."""

from __future__ import annotations

import os
import sqlite3

import pytest

from confnb.broker.audit import verify_log
from confnb.broker.keys import KdfParameters
from confnb.broker.store import MasterKeySource, OwnerStore, StoreError
from confnb.policy.output import OutputPolicy

POLICY = OutputPolicy.from_toml('[policy]\nid = "p1"\n[release]\nallow = ["aggregate"]\n')


@pytest.fixture(autouse=True)
def _fast_argon2(monkeypatch):
    """Argon2id at 64 MiB is right for owners and slow for a test suite: tests use a small memory cost."""
    import confnb.broker.store as store_module

    monkeypatch.setattr(
        store_module,
        "new_kdf_parameters",
        lambda: KdfParameters(salt=os.urandom(16), iterations=1, lanes=1, memory_cost_kib=8),
    )


def test_create_register_reopen(tmp_path):
    store = OwnerStore.create(tmp_path / "owner")
    assert (tmp_path / "owner").stat().st_mode & 0o777 == 0o700
    key_id, key = store.register_dataset("claims", POLICY)
    again = OwnerStore.open(tmp_path / "owner")
    record = again.dataset("claims")
    assert record is not None and record.key_id == key_id and record.attestation_policy is None
    assert again.dataset_key("claims") == key
    assert again.dataset("missing") is None
    assert b"claims" not in (tmp_path / "owner" / "owner.key").read_bytes()
    with pytest.raises(StoreError, match="already registered"):
        again.register_dataset("claims", POLICY)
    with pytest.raises(StoreError, match="already holds a broker store"):
        OwnerStore.create(tmp_path / "owner")
    with pytest.raises(StoreError, match="dataset id"):
        again.register_dataset("../etc", POLICY)


def test_default_attestation_policy_file_applies(tmp_path):
    store = OwnerStore.create(tmp_path / "owner")
    store.register_dataset("claims", POLICY)
    (tmp_path / "owner" / "attestation.toml").write_text("[attestation]\nmax_vmpl = 2\n")
    record = store.dataset("claims")
    assert record is not None and record.attestation_policy is not None
    assert record.attestation_policy.max_vmpl == 2


def test_passphrase_store_needs_the_passphrase(tmp_path):
    OwnerStore.create(tmp_path / "owner", MasterKeySource(passphrase="tr0ub4dor"))
    assert not (tmp_path / "owner" / "master.key").exists()
    with pytest.raises(StoreError, match="provide it"):
        OwnerStore.open(tmp_path / "owner")
    with pytest.raises(StoreError, match="not the master key"):
        OwnerStore.open(tmp_path / "owner", MasterKeySource(passphrase="wrong"))
    OwnerStore.open(tmp_path / "owner", MasterKeySource(passphrase="tr0ub4dor"))


def test_rotation_rewraps_without_changing_dataset_keys(tmp_path):
    store = OwnerStore.create(tmp_path / "owner")
    keys = {name: store.register_dataset(name, POLICY)[1] for name in ("a", "b", "c")}
    old_wrapped = _wrapped(tmp_path / "owner")
    assert store.rotate_master_key(MasterKeySource(passphrase="new passphrase")) == 3
    assert _wrapped(tmp_path / "owner") != old_wrapped
    reopened = OwnerStore.open(tmp_path / "owner", MasterKeySource(passphrase="new passphrase"))
    assert {name: reopened.dataset_key(name) for name in keys} == keys
    assert reopened.rotate_master_key(MasterKeySource()) == 3  # back to a key file inside the store
    assert {name: OwnerStore.open(tmp_path / "owner").dataset_key(name) for name in keys} == keys
    verification = verify_log(tmp_path / "owner" / "audit.sqlite", store.owner_public_key)
    assert verification.ok
    actions = [entry.detail.get("action") for entry in verification.entries]
    assert actions.count("rotate-master-key") == 2 and actions[0] == "init"


def test_missing_store(tmp_path):
    with pytest.raises(StoreError, match="confnb broker init"):
        OwnerStore.open(tmp_path / "nothing")


def _wrapped(directory) -> list[bytes]:
    with sqlite3.connect(directory / "broker.sqlite") as db:
        return [bytes(row[0]) for row in db.execute("SELECT wrapped_key FROM datasets ORDER BY dataset_id")]
