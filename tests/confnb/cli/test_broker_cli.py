"""``confnb broker init``, ``confnb keys rotate`` and ``confnb audit show|verify`` as an owner runs them."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys


def confnb(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "confnb", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_init_rotate_and_audit(tmp_path):
    owner = tmp_path / "owner"
    created = confnb("broker", "init", "--dir", str(owner))
    assert created.returncode == 0, created.stderr
    assert (owner / "owner.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    again = confnb("broker", "init", "--dir", str(owner))
    assert again.returncode == 2 and "already holds a broker store" in again.stderr

    rotated = confnb("keys", "rotate", "--broker-dir", str(owner))
    assert rotated.returncode == 0 and "re-wrapped 0 dataset keys" in rotated.stdout

    verified = confnb("audit", "verify", "--broker-dir", str(owner), "--json")
    assert verified.returncode == 0
    assert json.loads(verified.stdout) == {"intact": True, "entries": 2, "problems": []}
    shown = json.loads(confnb("audit", "show", "--broker-dir", str(owner), "--json").stdout)
    assert [entry["detail"]["action"] for entry in shown["entries"]] == ["init", "rotate-master-key"]

    with sqlite3.connect(owner / "audit.sqlite") as db:
        table = next(
            name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'") if "entr" in name
        )
        db.execute(f"UPDATE {table} SET actor = 'mallory' WHERE seq = 1")
    tampered = confnb("audit", "verify", "--broker-dir", str(owner))
    assert tampered.returncode == 1 and "TAMPERED" in tampered.stdout


def test_passphrase_store_from_the_environment(tmp_path):
    owner = tmp_path / "owner"
    assert (
        confnb(
            "broker",
            "init",
            "--dir",
            str(owner),
            "--passphrase-env",
            "OWNER_PASS",
            env={"OWNER_PASS": "a long passphrase"},
        ).returncode
        == 0
    )
    missing = confnb("keys", "rotate", "--broker-dir", str(owner))
    assert missing.returncode == 2 and "passphrase" in missing.stderr
    unset = confnb("keys", "rotate", "--broker-dir", str(owner), "--passphrase-env", "NOT_SET_ANYWHERE")
    assert unset.returncode == 2 and "NOT_SET_ANYWHERE" in unset.stderr
    wrong = confnb(
        "keys", "rotate", "--broker-dir", str(owner), "--passphrase-env", "OWNER_PASS", env={"OWNER_PASS": "wrong"}
    )
    assert wrong.returncode == 2 and "not the master key" in wrong.stderr


def test_audit_of_a_directory_without_a_store(tmp_path):
    run = confnb("audit", "verify", "--broker-dir", str(tmp_path))
    assert run.returncode == 2 and "no audit log" in run.stderr


def test_serve_on_a_busy_port_is_a_usage_error(tmp_path):
    """uvicorn exits 3 when it cannot bind; the CLI's contract is 2 (bad usage), with uvicorn's reason above."""
    import socket

    owner = tmp_path / "owner"
    assert confnb("broker", "init", "--dir", str(owner)).returncode == 0
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        served = confnb("broker", "serve", "--dir", str(owner), "--port", str(port), env={"CONFNB_OFFLINE": "1"})
    assert served.returncode == 2, served.stderr
    assert "address already in use" in served.stderr
    last = served.stderr.splitlines()[-1]
    assert last == f"confnb: error: the broker could not start on 127.0.0.1:{port} (see above)"
