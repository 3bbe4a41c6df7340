"""``confnb policy init|check|explain`` as a data owner uses them."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest


def confnb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "confnb", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_init_writes_a_valid_strict_policy_and_never_overwrites(tmp_path):
    target = tmp_path / "policy.toml"
    assert confnb("policy", "init", "--out", str(target)).returncode == 0
    checked = confnb("policy", "check", str(target), "--json")
    assert checked.returncode == 0
    document = json.loads(checked.stdout)
    assert document["attestation"]["allow_simulated"] is False
    assert document["output"]["release"]["min_group_size"] == 10
    assert document["output"]["digest"].startswith("sha256:")
    again = confnb("policy", "init", "--out", str(target))
    assert again.returncode == 2 and "never overwrites" in again.stderr


def test_init_writes_every_output_rule_out():
    import tomllib

    from confnb.policy.schema import OUTPUT

    written = confnb("policy", "init", "--kind", "output")
    assert written.returncode == 0
    document = tomllib.loads(written.stdout)
    # Exact mode is written as a choice; the DP keys, refused under it, are there as comments to uncomment.
    assert document.pop("privacy") == {"mode": "exact"}
    assert {table: set(keys) for table, keys in document.items()} == {
        table: set(schema.children) for table, schema in OUTPUT.items() if table != "privacy"
    }
    assert document["release"]["min_group_size"] == 10
    commented = {
        line[2:].split(" = ")[0] for line in written.stdout.splitlines() if line.startswith("# ") and " = " in line
    }
    assert set(OUTPUT["privacy"].children) - {"bounds", "keys"} <= commented


def test_explain_of_a_policy_silent_on_min_group_size_promises_10_records(tmp_path):
    target = tmp_path / "policy.toml"
    target.write_text('[policy]\nid = "p"\n[release]\nallow = ["aggregate"]\n')
    run = confnb("policy", "explain", str(target))
    assert run.returncode == 0
    assert "- Every released aggregate row must be computed from at least 10 records;" in run.stdout
    assert "single records" not in run.stdout


def test_explain_speaks_plainly(tmp_path):
    target = tmp_path / "policy.toml"
    target.write_text(
        '[policy]\nid = "p"\n[release]\nallow = ["aggregate"]\nmin_group_size = 10\n'
        "[attestation]\nallow_simulated = true\n"
    )
    run = confnb("policy", "explain", str(target))
    assert run.returncode == 0
    assert "at least 10 records" in run.stdout
    assert "Simulated TEEs are ACCEPTED" in run.stdout
    assert "ANY software" in run.stdout


def test_check_reports_one_line_with_the_line_number(tmp_path):
    target = tmp_path / "bad.toml"
    target.write_text('[policy]\nid = "p"\n[release]\nallow = ["everything"]\n')
    run = confnb("policy", "check", str(target))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip() == (
        f"confnb: error: {target}:4: release.allow: 'everything' is not one of schema, "
        "row_count, aggregate, model_metrics, model_parameters, predict_public, window"
    )


def test_check_of_a_file_with_neither_half(tmp_path):
    target = tmp_path / "empty.toml"
    target.write_text("# [policy]\n")
    run = confnb("policy", "check", str(target))
    assert run.returncode == 2 and "neither an [attestation] table nor an output policy" in run.stderr


VALID = '[policy]\nid = "p"\n[release]\nallow = ["aggregate"]\nmin_group_size = 10\n[attestation]\nmax_vmpl = 0\n'


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ('[privacy]\nmod = "dp"\n', "9: privacy.mod: unknown key (did you mean 'mode'?)"),
        ("[relese]\nmax_rows = 10\n", "8: [relese]: unknown table (did you mean [release]?)"),
        ("[attestation.guest_policy]\ndebug = false\n", "9: attestation.guest_policy.debug: unknown flag"),
        ("[attestation.min_tcb.Turn]\nsnp = 1\n", "8: attestation.min_tcb.Turn: unknown TCB component or product"),
        ("[attestation.min_tcb.Turin]\nspn = 1\n", "9: attestation.min_tcb.Turin.spn: unknown TCB component"),
        ("[display]\ntraceback = 'full'\n", "9: display.traceback: unknown key (did you mean 'tracebacks'?)"),
    ],
)
def test_check_and_explain_refuse_an_unknown_name_in_one_line(tmp_path, extra, error):
    target = tmp_path / "policy.toml"
    target.write_text(VALID + extra)
    for action in ("check", "explain"):
        run = confnb("policy", action, str(target))
        assert run.returncode == 2 and run.stdout == "", run
        assert len(run.stderr.splitlines()) == 1 and "Traceback" not in run.stderr
        assert run.stderr.startswith(f"confnb: error: {target}:{error}"), run.stderr
    target.write_text(VALID)  # the legitimate twin
    assert confnb("policy", "check", str(target)).stdout == f"{target}: valid (attestation and output policy)\n"


def test_dataset_encrypt_refuses_a_policy_it_cannot_fully_enforce_and_leaves_nothing(tmp_path):
    from confnb.broker.store import OwnerStore

    assert confnb("broker", "init", "--dir", str(tmp_path / "owner")).returncode == 0
    pq.write_table(pa.table({"id": list(range(50))}), tmp_path / "claims.parquet")
    policy = tmp_path / "policy.toml"

    def encrypt(dataset_id: str) -> subprocess.CompletedProcess[str]:
        return confnb(
            "dataset",
            "encrypt",
            str(tmp_path / "claims.parquet"),
            "--broker-dir",
            str(tmp_path / "owner"),
            "--id",
            dataset_id,
            "--policy",
            str(policy),
            "--out",
            str(tmp_path / dataset_id),
        )

    policy.write_text(VALID + '[privacy]\nmode = "dp"\n')
    refused = encrypt("claims")
    assert refused.returncode == 2 and refused.stdout == "" and len(refused.stderr.splitlines()) == 1
    assert f'{policy}:8: [privacy]: mode = "dp" needs epsilon' in refused.stderr
    assert not (tmp_path / "claims").exists()
    assert OwnerStore.open(tmp_path / "owner").dataset_ids() == []

    policy.write_text(VALID + '[privacy]\nmode = "dp"\nepsilon = 1.0\n')  # the twin: the budget written
    assert encrypt("claims").returncode == 0
    store = OwnerStore.open(tmp_path / "owner")
    assert store.dataset_ids() == ["claims"]
    record = store.dataset("claims")
    assert record is not None and record.output_policy["privacy"]["epsilon"] == 1.0  # signed as the vault will read it
