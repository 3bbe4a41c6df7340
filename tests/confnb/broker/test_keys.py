"""The broker master key: generation, files, passphrases (Argon2id), and wrapping dataset keys."""

from __future__ import annotations

import os

import pytest

from confnb.broker.keys import KdfParameters, MasterKey, MasterKeyError

FAST_KDF = KdfParameters(salt=b"s" * 16, iterations=1, lanes=1, memory_cost_kib=8)


def test_wrap_round_trip_and_binding_to_dataset_and_key_id():
    master = MasterKey.generate()
    key = os.urandom(32)
    wrapped = master.wrap(key, "claims", "k1")
    assert master.unwrap(wrapped, "claims", "k1") == key
    for dataset, key_id in (("other", "k1"), ("claims", "k2")):
        with pytest.raises(MasterKeyError, match="does not unwrap"):
            master.unwrap(wrapped, dataset, key_id)
    with pytest.raises(MasterKeyError, match="does not unwrap"):
        MasterKey.generate().unwrap(wrapped, "claims", "k1")
    tampered = bytearray(wrapped)
    tampered[-1] ^= 1
    with pytest.raises(MasterKeyError):
        master.unwrap(bytes(tampered), "claims", "k1")
    with pytest.raises(MasterKeyError, match="truncated"):
        master.unwrap(wrapped[:10], "claims", "k1")


def test_passphrase_derivation_is_stable_and_salted():
    one = MasterKey.from_passphrase("correct horse", FAST_KDF)
    assert one.check_value() == MasterKey.from_passphrase("correct horse", FAST_KDF).check_value()
    assert not one.matches(MasterKey.from_passphrase("wrong horse", FAST_KDF).check_value())
    other_salt = KdfParameters(salt=b"t" * 16, iterations=1, lanes=1, memory_cost_kib=8)
    assert not one.matches(MasterKey.from_passphrase("correct horse", other_salt).check_value())
    assert KdfParameters.from_dict(FAST_KDF.to_dict()) == FAST_KDF
    with pytest.raises(MasterKeyError, match="empty"):
        MasterKey.from_passphrase("", FAST_KDF)
    with pytest.raises(MasterKeyError, match="malformed"):
        KdfParameters.from_dict({"kdf": "argon2id", "salt": "zz"})


def test_key_files_must_be_private(tmp_path):
    master = MasterKey.generate()
    path = tmp_path / "master.key"
    master.write(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert MasterKey.from_file(path).matches(master.check_value())
    path.chmod(0o644)
    with pytest.raises(MasterKeyError, match="readable by others"):
        MasterKey.from_file(path)
    with pytest.raises(MasterKeyError, match="cannot read"):
        MasterKey.from_file(tmp_path / "missing.key")
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 5)
    short.chmod(0o600)
    with pytest.raises(MasterKeyError, match="32 bytes"):
        MasterKey.from_file(short)


def test_the_secret_never_shows_in_repr():
    assert repr(MasterKey.generate()) == "MasterKey(<secret>)"
