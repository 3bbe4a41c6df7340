"""``confnb policy init|check|explain`` as a data owner uses them."""

from __future__ import annotations

import json
import subprocess
import sys


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
        "row_count, aggregate, model_metrics, model_parameters, predict_public"
    )


def test_check_of_a_file_with_neither_half(tmp_path):
    target = tmp_path / "empty.toml"
    target.write_text("[other]\nx = 1\n")
    run = confnb("policy", "check", str(target))
    assert run.returncode == 2 and "neither an [attestation] table nor an output policy" in run.stderr
