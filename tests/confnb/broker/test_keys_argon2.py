"""A passphrase is stretched with Argon2id at RFC 9106's second recommended option (t=3, p=4, m=64 MiB) or more.

The other broker suites swap in 8 KiB/1 iteration/1 lane to stay fast, so only this module sees the defaults an
owner gets: weakening them would make a stolen store directory cheap to brute-force, and must fail here.
"""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from confnb.broker.keys import MasterKey, new_kdf_parameters
from confnb.broker.store import MasterKeySource, OwnerStore

# RFC 9106 section 4, second recommended option (memory-constrained): written out, not imported from the code.
ITERATIONS = 3
LANES = 4
MEMORY_KIB = 64 * 1024


def test_new_parameters_are_at_least_rfc_9106s_second_option_with_a_fresh_salt() -> None:
    one, two = new_kdf_parameters(), new_kdf_parameters()
    assert one.iterations >= ITERATIONS
    assert one.lanes >= LANES
    assert one.memory_cost_kib >= MEMORY_KIB
    assert len(one.salt) >= 16
    assert one.salt != two.salt


def test_a_passphrase_store_is_keyed_by_argon2id_at_those_parameters(tmp_path: Path) -> None:
    """The master key of a new store is what Argon2id at the RFC's parameters makes of the passphrase."""
    passphrase = "correct horse battery staple"
    store = OwnerStore.create(tmp_path / "owner", MasterKeySource(passphrase=passphrase))
    description = json.loads((tmp_path / "owner" / "master.json").read_text())
    assert description["kdf"] == "argon2id"
    assert description["iterations"] >= ITERATIONS
    assert description["lanes"] >= LANES
    assert description["memory_cost_kib"] >= MEMORY_KIB
    independent = Argon2id(
        salt=bytes.fromhex(description["salt"]),
        length=32,
        iterations=description["iterations"],
        lanes=description["lanes"],
        memory_cost=description["memory_cost_kib"],
    ).derive(passphrase.encode())
    assert MasterKey(independent).check_value() == description["check"]
    # The legitimate twin: the same passphrase opens the store again, with the same owner key.
    reopened = OwnerStore.open(tmp_path / "owner", MasterKeySource(passphrase=passphrase))
    assert reopened.owner_public_key.public_bytes_raw() == store.owner_public_key.public_bytes_raw()
