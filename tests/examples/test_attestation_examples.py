"""The attestation examples run as documented and the production policy is valid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from confnb.attest import AttestationPolicy
from confnb.attest.report import Product

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "attestation"


def test_verify_evidence_example_runs():
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "verify_evidence.py")], capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("verified (SIMULATED)")
    assert "replay: rejected: nonce:" in run.stdout


def test_production_policy_is_valid_and_strict():
    policy = AttestationPolicy.load(EXAMPLES / "production-policy.toml")
    assert not policy.allow_simulated and policy.reject_debug and policy.max_vmpl == 0
    assert policy.minimum_tcb(Product.TURIN)["fmc"] == 0
    assert policy.measurements is not None and len(policy.measurements) == 1
