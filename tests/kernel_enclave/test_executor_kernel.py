"""The executor's kernel answers every cell, however an interrupt falls: a real executor process, real ZMQ.

An interrupt that reached ipykernel's own handling around a cell (after the analyst's code, before the reply) used
to end the handler without an ``execute_reply``, and the notebook waited for ever. Interrupts here are raced against
the ends of many short cells, the moment that loses replies; each cell must still be answered, and an interrupt
that falls inside the analyst's code must still stop it.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from jupyter_client.manager import KernelManager

pytestmark = pytest.mark.slow

REPLY_S = 20.0


@pytest.fixture(scope="module")
def executor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelManager]:
    """The executor as a kernel of its own (no relay, no vault): ``python -m kernel_enclave.executor``."""
    spec_dir = tmp_path_factory.mktemp("kernels") / "confnb-executor"
    spec_dir.mkdir()
    spec = {
        "argv": [sys.executable, "-m", "kernel_enclave.executor", "-f", "{connection_file}"],
        "display_name": "confnb executor",
        "language": "python",
        "interrupt_mode": "message",  # as the relay forwards interrupts
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    manager = KernelManager(kernel_name="confnb-executor")
    manager.kernel_spec_manager.kernel_dirs.insert(0, str(spec_dir.parent))
    manager.start_kernel()
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        yield manager
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def _reply(client: Any, msg_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + REPLY_S
    while time.monotonic() < deadline:
        reply: dict[str, Any] = client.get_shell_msg(timeout=REPLY_S)
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply
    raise AssertionError(f"no execute_reply within {REPLY_S:g} s")


def test_an_interrupt_stops_the_analysts_code(executor: KernelManager) -> None:
    client = executor.client()
    client.start_channels()
    try:
        msg_id = client.execute("import time\ntime.sleep(60)")
        time.sleep(1.0)
        started = time.monotonic()
        executor.interrupt_kernel()
        reply = _reply(client, msg_id)
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        assert time.monotonic() - started < 10
    finally:
        client.stop_channels()


def test_every_cell_is_answered_when_interrupts_race_its_end(executor: KernelManager) -> None:
    client = executor.client()
    client.start_channels()
    chance = random.Random(20261206)
    statuses: dict[str, int] = {}
    previous = "ok"
    try:
        for _ in range(150):
            msg_id = client.execute("x = sum(range(20_000))")
            time.sleep(chance.uniform(0.0, 0.004))  # around the end of the cell, where replies were lost
            executor.interrupt_kernel()
            status = _reply(client, msg_id)["content"]["status"]
            statuses[status] = statuses.get(status, 0) + 1
            # A cell sent while the kernel still aborts the queue after an interrupted one is answered "aborted"
            # (Jupyter's stop-on-error, as every ipykernel does); nothing else may keep a cell from running.
            assert status != "aborted" or previous == "error", (previous, status)
            previous = status
        time.sleep(0.2)
        final = client.execute("print(x)")
        assert _reply(client, final)["content"]["status"] == "ok"  # no interrupt left over for the next cell
    finally:
        client.stop_channels()
    assert set(statuses) <= {"ok", "error", "aborted"}, statuses
    assert sum(statuses.values()) == 150
