"""Writers that run in child processes (multiprocessing "spawn"), so they live in an importable module, not a test."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from confnb.broker.audit import AuditLog


def append_many(path: str, key: bytes, worker: int, count: int) -> None:
    with AuditLog(path, Ed25519PrivateKey.from_private_bytes(key)) as log:
        for index in range(count):
            log.append("release", f"worker-{worker}", "claims", {"worker": worker, "index": index})


def append_forever(path: str, key: bytes) -> None:
    """Appends until killed: the crash test SIGKILLs it somewhere inside a transaction or between two."""
    with AuditLog(path, Ed25519PrivateKey.from_private_bytes(key)) as log:
        index = 0
        while True:
            log.append("challenge", "doomed-writer", None, {"index": index, "padding": "x" * 2000})
            index += 1
