"""The output policies in force in this kernel, as the relay reports them in ``confnb_gate_reply``.

The vault tells the launcher about every dataset whose policy comes into force (the same pipe message that tightens
the gate); the relay answers from this record, so a client can show the people involved what binds the kernel
without asking the executor, which the analyst controls. The relay reports facts (the parsed policy); putting them
into words is the client's business, which keeps the policy explainer out of the VM.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from confnb.policy.output import OutputPolicy

SOURCES = ("broker", "upload", "sealed")


class DatasetPolicies:
    """Thread-safe: written by the launcher's event loop, read by the relay's thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] = {}

    def record(self, dataset_id: str, source: str, policy: OutputPolicy, broker: str | None = None) -> None:
        """A dataset keeps the source (and broker) it first came from; its policy is the latest in force (only ever
        stricter)."""
        if source not in SOURCES:
            raise ValueError(f"unknown dataset source {source!r}")
        with self._lock:
            known = self._entries.get(dataset_id)
            self._entries[dataset_id] = {
                "id": dataset_id,
                "policy_id": policy.id,
                "source": known["source"] if known is not None else source,
                "policy": policy.to_dict(),
                "broker": known.get("broker") if known is not None else broker,
            }

    def to_list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(entry) for entry in self._entries.values()]
