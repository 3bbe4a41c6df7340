"""``confnb audit show --kernel-log``: an owner reads what each release of a kernel asked, after the log verifies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa  # type: ignore[import-untyped]

from confnb.policy.output import OutputPolicy
from kernel_enclave.tee.simulated import SimulatedBackend
from kernel_enclave.vault.keys import VaultKeys
from kernel_enclave.vault.vault import Vault

POLICY = OutputPolicy(id="cli", allow=frozenset({"aggregate", "row_count"}), min_group_size=10, max_releases=2)


def confnb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "confnb", *args], capture_output=True, text=True, timeout=120, check=False
    )


def _kernel_log(simulated_backend: SimulatedBackend, tmp_path: Path) -> tuple[Path, str]:
    vault = Vault(backend=simulated_backend, keys=VaultKeys.generate())
    handle = vault.add_table("admissions", pa.table({"age": list(range(100)), "sex": ["F", "M"] * 50}), POLICY)
    source = {"node": "source", "handle": handle}
    old = {"node": "filter", "input": source, "predicate": {"fn": "gt", "args": [{"col": "age"}, {"lit": 60}]}}
    plan = {"node": "aggregate", "input": old, "by": ["sex"], "aggs": [{"name": "n", "func": "count", "column": None}]}
    assert vault.handle({"op": "release", "plan": plan}, [])[0]["ok"]
    hostile = {"node": "count", "input": {"node": "select", "input": source, "columns": ["age\x1b[31m"]}}
    vault.handle({"op": "release", "plan": hostile}, [])  # an error: no such column
    refused, _ = vault.handle({"op": "release", "plan": {"node": "count", "input": source}}, [])
    assert refused["error"]["rule"] == "release.max_releases"
    path = tmp_path / "kernel-audit.jsonl"
    path.write_text("".join(json.dumps(entry) + "\n" for entry in vault.audit.entries()))
    return path, vault._keys.signing_public_key.hex()


def test_the_kernel_log_shows_each_plan_readably(simulated_backend: SimulatedBackend, tmp_path: Path) -> None:
    path, key = _kernel_log(simulated_backend, tmp_path)
    shown = confnb("audit", "show", "--kernel-log", str(path), "--key", key)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert "        plan: admissions | filter(age > 60) | group_by(sex) | agg(n = count())" in lines
    assert "        plan: admissions | count()" in lines
    refusal = next(line for line in lines if " refusal " in line)
    assert "rule=release.max_releases" in refusal and "datasets=admissions" in refusal
    assert "\x1b" not in shown.stdout and 'select("age\\u001b[31m")' in shown.stdout  # escaped, inert
    as_json = json.loads(confnb("audit", "show", "--kernel-log", str(path), "--key", key, "--json").stdout)
    assert as_json["intact"] is True
    assert [e["fields"].get("plan") for e in as_json["entries"] if e["event"] == "release"] == [
        "admissions | filter(age > 60) | group_by(sex) | agg(n = count())"
    ]


def test_a_tampered_kernel_log_is_shown_as_not_intact(simulated_backend: SimulatedBackend, tmp_path: Path) -> None:
    path, key = _kernel_log(simulated_backend, tmp_path)
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    release = next(entry for entry in entries if entry["event"] == "release")
    release["fields"]["plan"] = "admissions | count()\x1b[2J"  # an edited plan, with a terminal escape
    path.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    shown = confnb("audit", "show", "--kernel-log", str(path), "--key", key)
    assert shown.returncode == 1 and "log NOT intact" in shown.stderr
    assert "entry_hash does not match" in shown.stderr and "\x1b" not in shown.stdout
    assert confnb("audit", "show", "--kernel-log", str(path)).returncode == 2  # no key: usage
    assert confnb("audit", "show", "--broker-dir", str(tmp_path), "--key", key).returncode == 2
