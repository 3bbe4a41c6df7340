"""Real confidential kernels for the relay suites: started by kernelspec name through confnb-provisioner."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager

from confnb.provisioner.kernelspec import KERNEL_NAME

TIMEOUT = 30


@dataclass
class Kernel:
    manager: KernelManager
    client: BlockingKernelClient
    seen: list[dict[str, Any]] = field(default_factory=list)  # every message the client received, all channels

    def execute(self, code: str, timeout: float = TIMEOUT) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Run ``code``; return the execute_reply and the iopub messages of that cell (until idle)."""
        msg_id = self.client.execute(code, allow_stdin=False)
        reply = self.client.get_shell_msg(timeout=timeout)
        while reply["parent_header"].get("msg_id") != msg_id:
            self.seen.append(reply)
            reply = self.client.get_shell_msg(timeout=timeout)
        self.seen.append(reply)
        outputs = []
        while True:
            message = self.client.get_iopub_msg(timeout=timeout)
            self.seen.append(message)
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            if message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
                return reply, outputs
            outputs.append(message)

    def stdout(self, code: str) -> str:
        reply, outputs = self.execute(code)
        assert reply["content"]["status"] == "ok", reply["content"]
        return "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream")

    def everything_received(self) -> str:
        """All message content the client has seen, as one string, for canary searches."""
        return json.dumps(self.seen, default=str)


def start_kernel(kernel_name: str = KERNEL_NAME, **kwargs: Any) -> Kernel:
    manager = KernelManager(kernel_name=kernel_name)
    manager.start_kernel(**kwargs)
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
    except RuntimeError:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
        raise
    return Kernel(manager, client)


def stop_kernel(kernel: Kernel) -> None:
    kernel.client.stop_channels()
    kernel.manager.shutdown_kernel(now=False)


@pytest.fixture(scope="module")
def kernel(confnb_kernel_env: Path) -> Iterator[Kernel]:
    """One confnb-snp kernel (default display policy) shared by a module's tests."""
    started = start_kernel()
    yield started
    stop_kernel(started)
