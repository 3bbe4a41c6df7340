"""Fetching and appraising evidence, on real kernels held by jupyter_client's own async kernel manager.

The paths the REST tests cannot reach cheaply: a kernel that never answers (python3's ipykernel ignores the
request), a kernel that answers with an error, the server's override policy, and a policy file edited after the
kernel was admitted under it.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from jupyter_client.manager import AsyncKernelManager

from confnb.server.attestation import (
    ATTESTATION_REQUEST,
    KernelRequestError,
    attest_kernel,
    control_request,
    policy_for,
)

pytestmark = pytest.mark.slow
T = TypeVar("T")


class Kernels:
    """One event loop for the module: kernels, their provisioners and our requests all live on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.managers: list[AsyncKernelManager] = []

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def start(self, name: str) -> AsyncKernelManager:
        manager = AsyncKernelManager(kernel_name=name)
        self.run(manager.start_kernel())
        self.managers.append(manager)
        return manager

    def close(self) -> None:
        for manager in self.managers:
            self.run(manager.shutdown_kernel(now=True))
        self.loop.close()


@pytest.fixture(scope="module")
def kernels(confnb_kernel_env: Path) -> Iterator[Kernels]:
    running = Kernels()
    try:
        yield running
    finally:
        running.close()


@pytest.fixture(scope="module")
def policy_kernel(kernels: Kernels, install_variant: Callable[..., str]) -> AsyncKernelManager:
    """A confnb-snp kernel of its own kernelspec, whose policy file a test may edit without disturbing others."""
    return kernels.start(install_variant("confnb-snp-server-policy"))


@pytest.fixture(scope="module")
def python_kernel(kernels: Kernels) -> AsyncKernelManager:
    return kernels.start("python3")


def _policy_file(manager: AsyncKernelManager) -> Path:
    return Path(manager.kernel_spec.resource_dir) / "attestation.toml"


def test_a_kernel_that_never_answers_times_out(kernels: Kernels, python_kernel: AsyncKernelManager) -> None:
    request = control_request(python_kernel, ATTESTATION_REQUEST, {"nonce": "00" * 32}, timeout=0.5)
    with pytest.raises(KernelRequestError, match=r"did not answer confnb_attestation_request within 0\.5 s"):
        kernels.run(request)


def test_an_ordinary_kernel_is_not_asked(kernels: Kernels, python_kernel: AsyncKernelManager) -> None:
    verdict = kernels.run(attest_kernel(python_kernel, "k", "00" * 32, override_policy="", timeout=0.5))
    assert verdict["confidential"] is False and verdict["summary"] == "not a confidential kernel"


def test_an_error_answer_is_reported_with_the_kernels_reason(
    kernels: Kernels, policy_kernel: AsyncKernelManager
) -> None:
    request = control_request(policy_kernel, ATTESTATION_REQUEST, {"nonce": "not hex"}, timeout=10)
    with pytest.raises(KernelRequestError, match="answered confnb_attestation_request with an error: bad request"):
        kernels.run(request)


def test_the_launch_policy_applies_by_default(kernels: Kernels, policy_kernel: AsyncKernelManager) -> None:
    choice = policy_for(policy_kernel, "")
    assert choice.policy is not None and Path(choice.policy.source) == _policy_file(policy_kernel)
    nonce = secrets.token_hex(32)
    verdict = kernels.run(attest_kernel(policy_kernel, "k", nonce, override_policy="", timeout=10))
    assert verdict["status"] == "verified" and verdict["evidence"]["claims"]["nonce"] == nonce


def test_the_servers_policy_overrides_the_launch_policy(
    kernels: Kernels, policy_kernel: AsyncKernelManager, tmp_path: Path
) -> None:
    elsewhere = re.sub(
        r"measurements = \[.*\]", f'measurements = ["{"00" * 48}"]', _policy_file(policy_kernel).read_text()
    )
    override = tmp_path / "analyst.toml"
    override.write_text(elsewhere)
    verdict = kernels.run(attest_kernel(policy_kernel, "k", "11" * 32, override_policy=str(override), timeout=10))
    assert verdict["status"] == "failed" and verdict["attestation_policy"]["source"] == str(override)
    assert {check["name"] for check in verdict["checks"] if not check["ok"]} == {"measurement"}

    override.write_text("[attestation]\nallow_simulatd = true\n")
    verdict = kernels.run(attest_kernel(policy_kernel, "k", "11" * 32, override_policy=str(override), timeout=10))
    assert verdict["status"] == "failed" and verdict["checks"][0]["name"] == "attestation_policy"
    assert "ConfnbServerApp.attestation_policy" in verdict["summary"] and "allow_simulatd" in verdict["summary"]


def test_a_policy_edited_after_the_launch_is_not_used(kernels: Kernels, policy_kernel: AsyncKernelManager) -> None:
    path = _policy_file(policy_kernel)
    original = path.read_text()
    path.write_text(original.replace("max_evidence_age_s = 300", "max_evidence_age_s = 3000"))
    try:
        verdict = kernels.run(attest_kernel(policy_kernel, "k", "22" * 32, override_policy="", timeout=10))
    finally:
        path.write_text(original)
    assert verdict["status"] == "failed" and verdict["evidence"] is None
    assert verdict["checks"] == [
        {"name": "attestation_policy", "ok": False, "outcome": "fail", "detail": verdict["checks"][0]["detail"]}
    ]
    assert "changed since the kernel started" in verdict["summary"]
    assert policy_for(policy_kernel, "").policy is not None  # restored: the launch policy applies again
