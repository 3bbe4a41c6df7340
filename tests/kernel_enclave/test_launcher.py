"""The launcher: what reaches the TEE backend and what reaches the analyst's executor from the kernelspec's env.

The kernelspec's ``env`` is how a test (or a demo) injects a simulated fault; it must reach the launcher's backend
in both transport modes (local: the launcher's own environment; SSH: the launch request) and never the executor.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.kernelspec import KernelSpecManager

from confnb.attest.evidence import Evidence
from confnb.attest.policy import AttestationPolicy
from confnb.attest.verifier import verify_evidence
from kernel_enclave.handshake import LaunchRequest
from kernel_enclave.launcher import executor_environment, simulated_fault
from kernel_enclave.tee.simulated import ENV_FAULT
from kernel_enclave.vault.keys import SOCKET_VARIABLE

from .relay.conftest import Kernel, start_kernel, stop_kernel

KEY = b"\x04" + bytes(64)


def test_the_fault_comes_from_the_request_or_the_environment_and_only_for_the_simulated_tee(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ENV_FAULT, raising=False)
    request = LaunchRequest(nonce=b"n", response_public_key=KEY, env={ENV_FAULT: "report-signature"}, tee="simulated")
    assert simulated_fault(request) == "report-signature"  # SSH mode: forwarded in the request
    assert simulated_fault(LaunchRequest(nonce=b"n", response_public_key=KEY, tee="simulated")) is None
    monkeypatch.setenv(ENV_FAULT, "report-signature")  # local mode: the launcher's own environment
    assert simulated_fault(LaunchRequest(nonce=b"n", response_public_key=KEY, tee="simulated")) == "report-signature"
    for tee in ("sev-snp", "auto"):
        assert simulated_fault(LaunchRequest(nonce=b"n", response_public_key=KEY, env=request.env, tee=tee)) is None


def test_the_executor_never_sees_the_fault(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENV_FAULT, "report-signature")
    environment = executor_environment({ENV_FAULT: "report-signature", "KEPT": "1"}, tmp_path, tmp_path / "v.sock")
    assert ENV_FAULT not in environment
    assert environment["KEPT"] == "1"
    assert environment[SOCKET_VARIABLE] == str(tmp_path / "v.sock")  # the name the analyst's API reads


@pytest.fixture(scope="module")
def faulty_kernel(install_variant: Callable[..., str]) -> Iterator[Kernel]:
    """A kernel from a kernelspec whose ``env`` asks for the report-signature fault."""
    name = install_variant("confnb-fault")
    spec_file = Path(KernelSpecManager().get_kernel_spec(name).resource_dir) / "kernel.json"
    spec = json.loads(spec_file.read_text())
    spec["env"] = {ENV_FAULT: "report-signature"}
    spec_file.write_text(json.dumps(spec))
    kernel = start_kernel(name)  # the provisioner verified its launch evidence: the fault spares it
    yield kernel
    stop_kernel(kernel)


@pytest.mark.slow
def test_an_injected_fault_spares_the_launch_and_breaks_later_evidence(faulty_kernel: Kernel) -> None:
    shown = faulty_kernel.stdout(f"import os\nprint(os.environ.get({ENV_FAULT!r}))\n")
    assert shown.strip() == "None"

    nonce = secrets.token_bytes(32)
    request = faulty_kernel.client.session.msg("confnb_attestation_request", {"nonce": nonce.hex()})
    faulty_kernel.client.control_channel.send(request)
    reply: dict[str, Any] = faulty_kernel.client.get_control_msg(timeout=15)
    assert reply["content"]["status"] == "ok", reply["content"]
    resource_dir = faulty_kernel.manager.kernel_spec.resource_dir  # type: ignore[union-attr]
    policy = AttestationPolicy.load(Path(resource_dir) / "attestation.toml")
    result = verify_evidence(Evidence.from_dict(reply["content"]["evidence"]), policy, nonce=nonce)
    assert not result.ok
    assert [check.name for check in result.failures] == ["report_signature"], result.summary()
