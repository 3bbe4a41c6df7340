"""``confnb dataset encrypt --format parquet`` and the rest of the owner's commands on a PME Parquet dataset."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from tests.confnb.cli.test_dataset_cli import confnb, owner  # noqa: F401 - owner is a fixture used by name


def test_parquet_encrypt_inspect_verify_decrypt_and_tamper(owner):  # noqa: F811 - the imported fixture
    encrypted = confnb(
        "dataset",
        "encrypt",
        str(owner / "claims.parquet"),
        "--broker-dir",
        str(owner / "owner"),
        "--id",
        "claims",
        "--policy",
        str(owner / "policy.toml"),
        "--out",
        str(owner / "claims"),
        "--format",
        "parquet",
        "--json",
    )
    assert encrypted.returncode == 0, encrypted.stderr
    manifest = json.loads(encrypted.stdout)
    assert manifest["format"] == "parquet-pme-aes-gcm-v1"
    assert [entry["name"] for entry in manifest["files"]] == ["part-0000.parquet"]
    part = owner / "claims" / "part-0000.parquet"
    assert part.read_bytes()[-4:] == b"PARE"  # encrypted footer

    inspected = confnb("dataset", "inspect", str(owner / "claims"))
    assert inspected.returncode == 0 and "(parquet-pme-aes-gcm-v1)" in inspected.stdout
    verified = confnb("dataset", "verify", str(owner / "claims"), "--owner-key", str(owner / "owner" / "owner.pub"))
    assert verified.returncode == 0, verified.stdout

    back = owner / "back.parquet"
    decrypted = confnb(
        "dataset", "decrypt", str(owner / "claims"), "--broker-dir", str(owner / "owner"), "--out", str(back)
    )
    assert decrypted.returncode == 0, decrypted.stderr
    assert pq.read_table(back).equals(pq.read_table(owner / "claims.parquet"))

    data = bytearray(part.read_bytes())
    data[len(data) // 3] ^= 0x10
    part.write_bytes(bytes(data))
    refused = confnb(
        "dataset", "decrypt", str(owner / "claims"), "--broker-dir", str(owner / "owner"), "--out", str(owner / "x.csv")
    )
    assert refused.returncode == 2 and "part-0000.parquet" in refused.stderr and "Traceback" not in refused.stderr
    assert not (owner / "x.csv").exists()


def test_unknown_format_is_a_usage_error(owner):  # noqa: F811 - the imported fixture
    pq.write_table(pa.table({"a": [1]}), owner / "a.parquet")
    result = confnb(
        "dataset",
        "encrypt",
        str(owner / "a.parquet"),
        "--broker-dir",
        str(owner / "owner"),
        "--id",
        "a",
        "--policy",
        str(owner / "policy.toml"),
        "--out",
        str(owner / "a"),
        "--format",
        "parquet-ctr",
    )
    assert result.returncode == 2 and "invalid choice" in result.stderr and not (owner / "a").exists()
