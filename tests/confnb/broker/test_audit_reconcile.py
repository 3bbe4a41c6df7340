"""Reconciling the broker's log with a kernel's: every way an attempt can end, as both real logs record it.

Each case writes what the broker and the kernel write at each step (the broker's ``challenge`` and ``release``
entries, the kernel's ``key-request``/``key-received``/``key-request-failed``) into a real signed broker log and a
real signed kernel log, and checks the verdict. The end-to-end versions (a broker killed or its answer lost while a
real kernel opens a dataset) are in ``tests/faults/test_broker_faults.py``.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from confnb.broker.audit import AuditLog, reconcile_releases
from kernel_enclave.vault.audit import KernelAuditLog

BROKER = "http://127.0.0.1:8723"


def _attempt(broker_log: AuditLog, kernel_log: KernelAuditLog, broker: list[str], kernel: list[str]) -> str:
    """One attempt with a fresh nonce: ``broker`` and ``kernel`` list the steps each side got to record."""
    nonce = secrets.token_hex(32)
    step = {"dataset": "claims", "broker": BROKER, "nonce": nonce, "attempt": 1}
    for kind in broker:
        detail = {"nonce": nonce} if kind == "challenge" else {"key_id": "k1", "evidence": "sha256:00", "nonce": nonce}
        broker_log.append(kind, "127.0.0.1:5000", None if kind == "challenge" else "claims", detail)
    for event in kernel:
        fields = {**step, "cause": "broker unreachable: connection reset by peer"} if event.endswith("failed") else step
        kernel_log.append(event, **fields)
    return nonce


CASES = [
    # broker steps, kernel steps, (broker, kernel, agree, finding starts with)
    (
        ["challenge", "release"],
        ["key-request", "key-received"],
        ("released", "received", True, "released and received"),
    ),
    (["challenge"], ["key-request", "key-request-failed"], ("not released", "failed", True, "not released: broker")),
    (["challenge"], ["key-request"], ("not released", "no outcome", True, "not released; the kernel stopped")),
    (
        ["challenge", "release"],
        ["key-request", "key-request-failed"],
        ("released", "failed", False, "released but not received (broker unreachable: connection reset by peer)"),
    ),
    (
        ["challenge", "release"],
        ["key-request"],
        ("released", "no outcome", False, "released; the kernel stopped before it recorded the answer"),
    ),
    ([], ["key-request", "key-received"], ("unknown", "received", False, "the broker's log does not know")),
    (["challenge"], ["key-request", "key-received"], ("not released", "received", False, "the kernel says it")),
]


@pytest.mark.parametrize(("broker", "kernel", "verdict"), CASES)
def test_each_way_an_attempt_ends_is_named(tmp_path: Path, broker, kernel, verdict) -> None:
    kernel_log = KernelAuditLog(Ed25519PrivateKey.generate())
    with AuditLog(tmp_path / "audit.sqlite", Ed25519PrivateKey.generate()) as broker_log:
        _attempt(broker_log, kernel_log, ["challenge", "release"], ["key-request", "key-received"])  # a clean one
        nonce = _attempt(broker_log, kernel_log, broker, kernel)
        findings = {f.nonce: f for f in reconcile_releases(broker_log.entries(), kernel_log.entries())}
    assert len(findings) == 2
    finding = findings[nonce]
    assert (finding.broker, finding.kernel, finding.agree) == verdict[:3]
    assert finding.finding.startswith(verdict[3]), finding.finding
    assert finding.dataset_id == "claims"


def test_other_kernels_releases_and_other_events_are_not_this_kernels_attempts(tmp_path: Path) -> None:
    kernel_log = KernelAuditLog(Ed25519PrivateKey.generate())
    with AuditLog(tmp_path / "audit.sqlite", Ed25519PrivateKey.generate()) as broker_log:
        _attempt(broker_log, KernelAuditLog(Ed25519PrivateKey.generate()), ["challenge", "release"], ["key-request"])
        kernel_log.append("open", dataset="claims", nonce="ab" * 32)  # not an attempt entry
        assert reconcile_releases(broker_log.entries(), kernel_log.entries()) == []
