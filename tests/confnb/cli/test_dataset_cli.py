"""``confnb dataset encrypt|inspect|verify|decrypt`` as a data owner runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest


def confnb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "confnb", *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture
def owner(tmp_path):
    assert confnb("broker", "init", "--dir", str(tmp_path / "owner")).returncode == 0
    (tmp_path / "policy.toml").write_text(
        '[policy]\nid = "claims-v1"\n[release]\nallow = ["aggregate"]\n[attestation]\nallow_simulated = true\n'
    )
    pq.write_table(pa.table({"id": list(range(500)), "ward": ["a", "b"] * 250}), tmp_path / "claims.parquet")
    return tmp_path


def test_encrypt_inspect_verify_decrypt(owner):
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
        "--json",
    )
    assert encrypted.returncode == 0, encrypted.stderr
    manifest = json.loads(encrypted.stdout)
    assert manifest["dataset_id"] == "claims" and manifest["files"][0]["rows"] == 500

    inspected = confnb("dataset", "inspect", str(owner / "claims"))
    assert inspected.returncode == 0 and "ward: string" in inspected.stdout
    verified = confnb("dataset", "verify", str(owner / "claims"), "--owner-key", str(owner / "owner" / "owner.pub"))
    assert verified.returncode == 0 and verified.stdout.startswith("verified: claims v1")

    decrypted = confnb(
        "dataset",
        "decrypt",
        str(owner / "claims"),
        "--broker-dir",
        str(owner / "owner"),
        "--out",
        str(owner / "back.parquet"),
    )
    assert decrypted.returncode == 0, decrypted.stderr
    assert pq.read_table(owner / "back.parquet").equals(pq.read_table(owner / "claims.parquet"))


def test_tampering_and_bad_input_are_named_and_leave_nothing(owner):
    args = ["--broker-dir", str(owner / "owner"), "--policy", str(owner / "policy.toml")]
    assert (
        confnb(
            "dataset", "encrypt", str(owner / "claims.parquet"), *args, "--id", "claims", "--out", str(owner / "claims")
        ).returncode
        == 0
    )
    part = owner / "claims" / "part-0000.arrow"
    part.write_bytes(part.read_bytes()[:-100])
    verified = confnb("dataset", "verify", str(owner / "claims"), "--json")
    assert verified.returncode == 1
    assert any("part-0000.arrow" in problem for problem in json.loads(verified.stdout)["problems"])
    decrypted = confnb(
        "dataset",
        "decrypt",
        str(owner / "claims"),
        "--broker-dir",
        str(owner / "owner"),
        "--out",
        str(owner / "back.csv"),
    )
    assert decrypted.returncode == 2 and "part-0000.arrow" in decrypted.stderr
    assert not (owner / "back.csv").exists()

    (owner / "truncated.parquet").write_bytes((owner / "claims.parquet").read_bytes()[:200])
    failed = confnb(
        "dataset", "encrypt", str(owner / "truncated.parquet"), *args, "--id", "other", "--out", str(owner / "other")
    )
    assert failed.returncode == 2 and "Traceback" not in failed.stderr and "truncated.parquet" in failed.stderr
    assert not (owner / "other").exists()
    missing_policy = confnb(
        "dataset",
        "encrypt",
        str(owner / "claims.parquet"),
        "--broker-dir",
        str(owner / "owner"),
        "--id",
        "x",
        "--policy",
        str(owner / "nope.toml"),
        "--out",
        str(owner / "x"),
    )
    assert missing_policy.returncode == 2 and "cannot read policy" in missing_policy.stderr
