"""The confnb REST API on a real Jupyter server, with real confnb-snp and python3 kernels started over REST."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from confnb.attest.evidence import parse_rfc3339
from confnb.policy.explain import explain_output
from confnb.policy.output import OutputPolicy
from confnb.provisioner.kernelspec import KERNEL_NAME

pytestmark = pytest.mark.slow
API = "/confnb/api"
TCB_KEYS = {"bootloader", "tee", "snp", "microcode", "raw"}


@pytest.fixture(scope="module")
def confnb_kernel(server: Any) -> str:
    return str(server.start_kernel(KERNEL_NAME))


@pytest.fixture(scope="module")
def python_kernel(server: Any) -> str:
    return str(server.start_kernel("python3"))


def _attest(server: Any, kernel_id: str, nonce: str) -> dict[str, Any]:
    verdict: dict[str, Any] = server.get(f"{API}/kernels/{kernel_id}/attestation?nonce={nonce}")
    return verdict


def test_a_confidential_kernel_verifies_with_the_browsers_nonce(server: Any, confnb_kernel: str) -> None:
    nonce = secrets.token_hex(32)
    verdict = _attest(server, confnb_kernel, nonce)
    assert verdict["status"] == "verified", verdict["summary"]
    assert verdict["kernel_id"] == confnb_kernel
    assert verdict["confidential"] is True and verdict["simulated"] is True
    assert verdict["summary"].startswith("verified: SIMULATED TEE")
    assert verdict["nonce"] == nonce
    assert verdict["evidence"]["format"] == "confnb-evidence/1"
    assert verdict["evidence"]["claims"]["nonce"] == nonce
    checks = {check["name"]: check for check in verdict["checks"]}
    assert all(check["ok"] and check["outcome"] in ("pass", "skip") for check in checks.values()), checks
    assert checks["report_signature"]["outcome"] == "pass"
    assert checks["channel_binding"]["outcome"] == "pass"
    claims = verdict["claims"]
    assert re.fullmatch(r"[0-9a-f]{96}", claims["measurement"])
    assert claims["measurement"] in verdict["attestation_policy"]["measurements"]
    assert claims["product"] == "Genoa" and claims["signing_key"] == "VCEK" and claims["tee"] == "simulated"
    for name in ("tcb_current", "tcb_reported", "tcb_committed"):
        assert set(claims[name]) >= TCB_KEYS, claims[name]
    assert claims["policy_bits"]["debug"] is False and claims["policy_bits"]["migrate_ma"] is False
    assert isinstance(claims["policy_bits"]["smt"], bool)
    assert claims["vmpl"] == 0 and claims["report_version"] >= 2 and re.fullmatch(r"[0-9a-f]{128}", claims["chip_id"])
    assert claims["report_time"] == verdict["evidence"]["claims"]["issued_at"]
    policy = verdict["attestation_policy"]
    assert policy["allow_simulated"] is True and len(policy["simulated_roots"]) == 1
    assert policy["source"].endswith("attestation.toml") and policy["digest"].startswith("sha256:")
    assert abs(parse_rfc3339(verdict["verified_at"]) - datetime.now(UTC)) < timedelta(minutes=1)


def test_concurrent_requests_for_one_kernel_each_get_their_own_evidence(server: Any, confnb_kernel: str) -> None:
    nonces = [secrets.token_hex(32) for _ in range(4)]
    with ThreadPoolExecutor(len(nonces)) as pool:
        verdicts = list(pool.map(lambda nonce: _attest(server, confnb_kernel, nonce), nonces))
    for nonce, verdict in zip(nonces, verdicts, strict=True):
        assert verdict["status"] == "verified", verdict["summary"]
        assert verdict["nonce"] == nonce and verdict["evidence"]["claims"]["nonce"] == nonce


def test_an_ordinary_kernel_is_not_confidential(server: Any, python_kernel: str) -> None:
    verdict = _attest(server, python_kernel, secrets.token_hex(32))
    assert verdict == {
        "kernel_id": python_kernel,
        "confidential": False,
        "status": "failed",
        "summary": "not a confidential kernel",
    }
    view = server.get(f"{API}/kernels/{python_kernel}/policies")
    assert view["confidential"] is False and view["datasets"] == []
    budgets = server.get(f"{API}/kernels/{python_kernel}/budgets")
    assert budgets == {"kernel_id": python_kernel, "confidential": False, "budgets": {}}


@pytest.mark.parametrize(
    "query",
    ["", "?nonce=", "?nonce=abc", f"?nonce={'0' * 63}", f"?nonce={'0' * 65}", f"?nonce={'g' * 64}", "?nonce=%00"],
)
def test_a_bad_nonce_is_refused(server: Any, confnb_kernel: str, query: str) -> None:
    status, body = server.request("GET", f"{API}/kernels/{confnb_kernel}/attestation{query}")
    assert status == 400
    assert set(body) == {"message"} and "nonce" in body["message"] and "\n" not in body["message"]


def test_an_unknown_kernel_is_404(server: Any) -> None:
    for endpoint in ("attestation?nonce=" + "a" * 64, "policies", "budgets"):
        status, body = server.request("GET", f"{API}/kernels/00000000-0000-0000-0000-000000000000/{endpoint}")
        assert status == 404 and set(body) == {"message"}, body


@pytest.mark.parametrize("token", [None, "not-the-token"])
def test_every_endpoint_needs_authentication(server: Any, confnb_kernel: str, token: str | None) -> None:
    for path in (
        f"{API}/kernels/{confnb_kernel}/attestation?nonce={'a' * 64}",
        f"{API}/kernels/{confnb_kernel}/policies",
        f"{API}/kernels/{confnb_kernel}/budgets",
        f"{API}/upload-policies",
    ):
        status, _ = server.request("GET", path, token=token)
        assert status == 403, path


def test_the_policies_in_force_come_from_the_kernels_gate(server: Any, confnb_kernel: str) -> None:
    view = server.get(f"{API}/kernels/{confnb_kernel}/policies")
    assert view["kernel_id"] == confnb_kernel and view["confidential"] is True
    display = view["display"]
    assert "text/plain" in display["mime"] and display["tracebacks"] in ("full", "redacted")
    assert isinstance(view["withheld"], dict)
    assert view["datasets"] == []  # nothing opened yet in this kernel
    budgets = server.get(f"{API}/kernels/{confnb_kernel}/budgets")
    assert budgets == {"kernel_id": confnb_kernel, "confidential": True, "budgets": {}}  # no DP dataset to ask about


def test_upload_presets_are_policies_the_vault_accepts(server: Any) -> None:
    presets = server.get(f"{API}/upload-policies")
    assert {"aggregates-10", "model-metrics", "schema-counts"} <= {preset["id"] for preset in presets}
    for preset in presets:
        policy = OutputPolicy.from_toml(preset["toml"])
        assert preset["title"] and preset["explanation"] == explain_output(policy)
        assert all(f"[{table}]" in preset["toml"] for table in ("policy", "release", "display"))


def test_a_tampered_report_fails_with_the_failing_check_named(
    server: Any, confnb_kernel_env: Path, install_variant: Callable[..., str]
) -> None:
    name = install_variant("confnb-snp-fault-signature")
    spec_file = confnb_kernel_env.parent / name / "kernel.json"
    spec = json.loads(spec_file.read_text())
    spec["env"] = {"CONFNB_SIMULATED_FAULT": "report-signature"}
    spec_file.write_text(json.dumps(spec))
    kernel_id = server.start_kernel(name)  # the launch evidence is intact: the kernel starts
    try:
        nonce = secrets.token_hex(32)
        verdict = _attest(server, kernel_id, nonce)
        assert verdict["status"] == "failed" and verdict["confidential"] is True
        failing = {check["name"] for check in verdict["checks"] if not check["ok"]}
        assert failing == {"report_signature"}, verdict["checks"]
        assert "report_signature" in verdict["summary"]
        assert verdict["evidence"]["claims"]["nonce"] == nonce  # the evidence came back; it just does not verify
    finally:
        server.stop_kernel(kernel_id)
