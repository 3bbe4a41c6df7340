"""``confnb receipt`` as users run it: a real process, real files, and the exit-code contract (0 / 1 / 2)."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from zmq.utils import z85

from kernel_enclave.attestation import issue_evidence
from kernel_enclave.vault.audit import KernelAuditLog
from kernel_enclave.vault.export import make_export

PAYLOAD = b"region,claims\nnorth,120\nsouth,98\n"


def confnb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "confnb", *args], capture_output=True, text=True, timeout=120, check=False
    )


def assert_one_line_error(run: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert run.returncode == 2, run.stdout + run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("confnb: error: ") and fragment in lines[0], lines[0]


def point(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


@pytest.fixture(scope="module")
def kernel_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def recipient() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def export(simulated_backend, kernel_key):
    def make(recipient_public_key: bytes | None = None) -> bytes:
        def evidence_for(nonce: bytes) -> dict[str, Any]:
            return issue_evidence(
                simulated_backend,
                nonce,
                hpke_public_key=point(ec.generate_private_key(ec.SECP256R1())),
                signing_public_key=kernel_key.public_key().public_bytes_raw(),
                curve_public_key=z85.encode(os.urandom(32)).decode(),
            ).to_dict()

        return make_export(
            signing_key=kernel_key,
            evidence_for=evidence_for,
            payload=PAYLOAD,
            media_type="text/csv",
            file_name="claims.csv",
            policy_id="claims-2026-v1",
            datasets=["claims"],
            operation_digest="sha256:" + "ef" * 32,
            recipient_public_key=recipient_public_key,
        )

    return make


@pytest.fixture(scope="module")
def files(tmp_path_factory, export, recipient):
    root = tmp_path_factory.mktemp("receipts")
    plain, sealed = root / "plain.export.json", root / "sealed.export.json"
    plain.write_bytes(export())
    sealed.write_bytes(export(point(recipient)))
    key = root / "recipient.pem"
    key.write_bytes(recipient.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    tampered = root / "tampered.export.json"
    document = json.loads(plain.read_bytes())
    document["payload"] = base64.b64encode(PAYLOAD.replace(b"120", b"121")).decode()
    tampered.write_text(json.dumps(document))
    return {"plain": plain, "sealed": sealed, "key": key, "tampered": tampered, "root": root}


# -- receipt verify -----------------------------------------------------------------------------------------


def test_verify_a_plain_export(files):
    run = confnb("receipt", "verify", str(files["plain"]), "--allow-simulated")
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("SIMULATED TEE")
    assert "verified: receipt signed by a SIMULATED TEE" in run.stdout
    assert "claims-2026-v1" in run.stdout and "claims.csv" in run.stdout


def test_verify_without_allowing_simulated_evidence_fails(files):
    run = confnb("receipt", "verify", str(files["plain"]))
    assert run.returncode == 1, run.stdout + run.stderr
    assert "REJECTED" in run.stdout
    assert "rejected by: evidence" in run.stderr


def test_verify_json_follows_the_contract(files):
    run = confnb("receipt", "verify", str(files["plain"]), "--allow-simulated", "--json")
    assert run.returncode == 0, run.stderr
    document = json.loads(run.stdout)
    assert document["verified"] is True and document["simulated"] is True
    assert document["receipt"]["policy_id"] == "claims-2026-v1"
    assert all({"name", "ok", "outcome", "detail"} <= set(check) for check in document["checks"])
    assert document["attestation"]["verified"] is True
    assert document["out"] is None


def test_a_tampered_payload_exits_1_naming_the_check(files, tmp_path):
    out = tmp_path / "result.csv"
    run = confnb("receipt", "verify", str(files["tampered"]), "--allow-simulated", "--json", "--out", str(out))
    assert run.returncode == 1
    document = json.loads(run.stdout)
    assert document["verified"] is False
    assert {check["name"] for check in document["checks"] if not check["ok"]} == {"payload_digest", "result_digest"}
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_out_writes_a_plain_result(files, tmp_path):
    out = tmp_path / "result.csv"
    run = confnb("receipt", "verify", str(files["plain"]), "--allow-simulated", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert out.read_bytes() == PAYLOAD
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_open_and_out_write_a_sealed_result(files, tmp_path):
    out = tmp_path / "result.csv"
    run = confnb(
        "receipt", "verify", str(files["sealed"]), "--allow-simulated", "--open", str(files["key"]), "--out", str(out)
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert out.read_bytes() == PAYLOAD


def test_a_sealed_result_needs_the_key_to_be_written(files, tmp_path):
    out = tmp_path / "result.csv"
    run = confnb("receipt", "verify", str(files["sealed"]), "--allow-simulated", "--out", str(out))
    assert_one_line_error(run, "give --open KEY.pem")
    assert list(tmp_path.iterdir()) == []


def test_the_wrong_recipient_key_exits_1_and_writes_nothing(files, tmp_path):
    other = tmp_path / "other.pem"
    other.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    )
    out = tmp_path / "result.csv"
    run = confnb(
        "receipt", "verify", str(files["sealed"]), "--allow-simulated", "--open", str(other), "--out", str(out)
    )
    assert run.returncode == 1
    assert "rejected by: recipient" in run.stderr
    assert not out.exists()


def test_a_measurement_policy_is_applied(files, simulated_backend, tmp_path):
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text(f'[attestation]\nmeasurements = ["{simulated_backend.measurement.hex()}"]\n')
    bad.write_text(f'[attestation]\nmeasurements = ["{"00" * 48}"]\n')
    assert confnb("receipt", "verify", str(files["plain"]), "--allow-simulated", "--policy", str(good)).returncode == 0
    run = confnb("receipt", "verify", str(files["plain"]), "--allow-simulated", "--policy", str(bad))
    assert run.returncode == 1 and "measurement" in run.stdout


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        (lambda root: ["receipt", "verify", str(root / "missing.json")], "no such file"),
        (lambda root: ["receipt", "verify", str(root)], "is a directory"),
        (lambda root: ["receipt", "verify", str(root / "recipient.pem")], "not JSON"),
        (
            lambda root: ["receipt", "verify", str(root / "plain.export.json"), "--policy", str(root / "nope.toml")],
            "cannot read policy",
        ),
        (
            lambda root: [
                "receipt",
                "verify",
                str(root / "sealed.export.json"),
                "--open",
                str(root / "plain.export.json"),
            ],
            "not a PEM private key",
        ),
    ],
)
def test_unreadable_input_exits_2_in_one_line(files, setup, fragment):
    assert_one_line_error(confnb(*setup(files["root"])), fragment)


def test_an_encrypted_or_wrong_type_key_is_refused(files, tmp_path):
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(b"pw")
        )
    )
    edwards = tmp_path / "ed.pem"
    edwards.write_bytes(Ed25519PrivateKey.generate().private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    sealed = str(files["sealed"])
    assert_one_line_error(confnb("receipt", "verify", sealed, "--open", str(encrypted)), "encrypted")
    assert_one_line_error(confnb("receipt", "verify", sealed, "--open", str(edwards)), "not a P-256")


def test_a_json_document_of_another_kind_fails_the_format_check(tmp_path):
    other = tmp_path / "other.json"
    other.write_text('{"format": "confnb-evidence/1"}')
    run = confnb("receipt", "verify", str(other), "--json")
    assert run.returncode == 1
    assert json.loads(run.stdout)["checks"][0]["name"] == "format"


# -- receipt audit ------------------------------------------------------------------------------------------


@pytest.fixture
def audit_log(tmp_path, kernel_key):
    path = tmp_path / "audit.jsonl"
    log = KernelAuditLog(kernel_key, path)
    log.append("request", op="release", operation_digest="sha256:" + "1" * 64)
    log.append("release", result="r1", result_digest="sha256:" + "2" * 64, datasets=["claims"])
    log.append("refusal", rule="release.min_group_size", datasets=["claims"])
    log.append("export", result="r1", format="csv")
    log.close()
    return path, log.head()


def test_audit_verifies_an_intact_log(audit_log, kernel_key):
    path, head = audit_log
    key = kernel_key.public_key().public_bytes_raw().hex()
    run = confnb("receipt", "audit", str(path), "--key", key)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "verified: 4 entries" in run.stdout and f"{head[0]}:{head[1]}" in run.stdout
    run = confnb("receipt", "audit", str(path), "--key", key, "--head", f"{head[0]}:{head[1]}", "--json")
    assert run.returncode == 0
    assert json.loads(run.stdout) == {
        "verified": True,
        "entries": 4,
        "problems": [],
        "head": [head[0], head[1]],
        "first_bad_seq": None,
    }


def test_audit_names_the_tampered_entry(audit_log, kernel_key):
    path, _ = audit_log
    lines = path.read_text().splitlines()
    entry = json.loads(lines[2])
    entry["fields"]["rule"] = "release.allow"
    lines[2] = json.dumps(entry)
    path.write_text("\n".join(lines) + "\n")
    key = kernel_key.public_key().public_bytes_raw().hex()
    run = confnb("receipt", "audit", str(path), "--key", key)
    assert run.returncode == 1
    assert "seq 3: entry_hash does not match" in run.stdout
    document = json.loads(confnb("receipt", "audit", str(path), "--key", key, "--json").stdout)
    assert document["verified"] is False and document["first_bad_seq"] == 3


def test_audit_detects_removed_newest_entries_with_a_head(audit_log, kernel_key):
    path, head = audit_log
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n")
    key = kernel_key.public_key().public_bytes_raw().hex()
    assert confnb("receipt", "audit", str(path), "--key", key).returncode == 0
    run = confnb("receipt", "audit", str(path), "--key", key, "--head", f"{head[0]}:{head[1]}")
    assert run.returncode == 1 and "newest entries removed" in run.stdout


def test_audit_with_another_key_fails(audit_log):
    path, _ = audit_log
    other = Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex()
    run = confnb("receipt", "audit", str(path), "--key", other)
    assert run.returncode == 1 and "seq 1: signature does not verify" in run.stdout


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        (["--key", "abcd"], "--key must be"),
        (["--key", "0" * 64, "--head", "five"], "--head must be"),
    ],
)
def test_audit_bad_usage_exits_2(audit_log, arguments, fragment):
    path, _ = audit_log
    assert_one_line_error(confnb("receipt", "audit", str(path), *arguments), fragment)


def test_audit_unreadable_input_exits_2(tmp_path):
    binary = tmp_path / "log.bin"
    binary.write_bytes(b"\xff\xfe\x00")
    assert_one_line_error(confnb("receipt", "audit", str(binary), "--key", "0" * 64), "not UTF-8")
    assert_one_line_error(confnb("receipt", "audit", str(tmp_path / "none"), "--key", "0" * 64), "no such file")


def test_receipt_is_listed_in_help():
    run = confnb("--help")
    assert run.returncode == 0 and "receipt" in run.stdout
