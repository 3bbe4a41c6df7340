"""Stopping things around a confidential kernel leaves no launcher, relay, executor, vault or worker behind.

Stock Jupyter is the reference: a kernel outlives the browser tab that used it, and a Jupyter server stopped with
SIGTERM shuts its kernels down. A ``confnb-snp`` kernel must behave exactly so, through a real ``jupyter_server``
and a real WebSocket client standing in for the browser. What stock Jupyter cannot clean up, confnb must: when
the Jupyter server is killed outright (SIGKILL), the launcher sees its stdin close and stops the kernel; when the
launcher itself is killed (the relay lives in it), the executor and the vault die with it (``PR_SET_PDEATHSIG``),
and the vault's worker with the vault. Processes are found through ``/proc`` by parentage and command line.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_process_left_behind")]

TOKEN = "confnb-shutdown-test-token"
GONE_S = 30.0


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def descendants(pid: int) -> set[int]:
    seen: set[int] = set()
    todo = [pid]
    while todo:
        for child in children(todo.pop()):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def alive(pid: int) -> bool:
    """Running; a zombie (dead, not yet reaped by its parent) is not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def _api(port: int, path: str, method: str = "GET", body: object = None) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"token {TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        text = response.read()
    return json.loads(text) if text else None


def _server_pid(port: int) -> int:
    mine = [pid for pid in children(os.getpid()) if f"--ServerApp.port={port}" in command_line(pid)]
    assert len(mine) == 1, mine
    return mine[0]


def _kernel_processes(server: int) -> dict[str, int]:
    """The kernel's launcher (the relay's process), executor and vault, by command line."""
    roles: dict[str, int] = {}

    def found() -> bool:
        for pid in descendants(server):
            line = command_line(pid)
            for role in ("launcher", "executor", "vault"):
                if f"kernel_enclave.{role}" in line and alive(pid):
                    roles[role] = pid
        return len(roles) == 3

    wait_until(found, 60, "the kernel's launcher, executor and vault")
    return roles


async def _browser_session(port: int, kernel_id: str) -> str:
    """What a notebook tab does: open the kernel's WebSocket, run a cell, read its output, then go away."""
    from tornado.websocket import websocket_connect

    url = f"ws://127.0.0.1:{port}/api/kernels/{kernel_id}/channels?token={TOKEN}"
    connection = await websocket_connect(url)
    msg_id = uuid.uuid4().hex
    header = {"msg_id": msg_id, "msg_type": "execute_request", "session": uuid.uuid4().hex, "username": "analyst"}
    content = {"code": "print(6 * 7)", "silent": False, "store_history": True, "user_expressions": {}}
    message = {"header": {**header, "version": "5.3"}, "parent_header": {}, "metadata": {}, "content": content}
    await connection.write_message(json.dumps({**message, "channel": "shell", "buffers": []}))
    text = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        raw = await asyncio.wait_for(connection.read_message(), 60)
        assert raw is not None, "the server closed the kernel's WebSocket"
        reply = json.loads(raw)
        if reply.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        if reply["msg_type"] == "stream":
            text += reply["content"]["text"]
        if reply["msg_type"] == "status" and reply["content"]["execution_state"] == "idle":
            break
    connection.close()  # the tab is closed
    # Until the server's close frame arrives: a loop ended earlier would leave the socket for the garbage collector.
    while await asyncio.wait_for(connection.read_message(), 10) is not None:
        pass
    return text


def _start(port: int) -> tuple[int, str, dict[str, int]]:
    server = _server_pid(port)
    kernel = _api(port, "/api/kernels", "POST", {"name": "confnb-snp"})
    return server, str(kernel["id"]), _kernel_processes(server)


def test_a_kernel_outlives_the_browser_and_ends_with_a_server_stopped_by_sigterm(
    confnb_kernel_env: Path, jupyter_server: Any, tmp_path: Path
) -> None:
    with jupyter_server(root=tmp_path, token=TOKEN, log=tmp_path / "server.log") as port:
        server, kernel_id, processes = _start(port)
        assert asyncio.run(_browser_session(port, kernel_id)) == "42\n"
        time.sleep(1.0)  # as stock Jupyter: the kernel stays after its last client went away
        assert _api(port, f"/api/kernels/{kernel_id}")["id"] == kernel_id
        assert all(alive(pid) for pid in processes.values()), processes
        everything = descendants(server)
        os.kill(server, signal.SIGTERM)
        wait_until(lambda: not alive(server), GONE_S, "the Jupyter server to stop")
        wait_until(lambda: not any(alive(pid) for pid in everything), GONE_S, "every process of the kernel to end")
    log = (tmp_path / "server.log").read_text()
    assert "Shutting down 1 kernel" in log or "Kernel shutdown" in log, log[-2000:]  # shut down, not orphaned


def test_a_server_killed_outright_leaves_no_kernel_process(
    confnb_kernel_env: Path, jupyter_server: Any, tmp_path: Path
) -> None:
    with jupyter_server(root=tmp_path, token=TOKEN, log=tmp_path / "server.log") as port:
        server, _, processes = _start(port)
        everything = descendants(server)
        assert set(processes.values()) <= everything
        os.kill(server, signal.SIGKILL)  # no cleanup of its own: the launcher notices its stdin close
        wait_until(lambda: not alive(server), GONE_S, "the Jupyter server to die")
        wait_until(lambda: not any(alive(pid) for pid in everything), GONE_S, "every process of the kernel to end")


def test_a_killed_relay_takes_the_executor_the_vault_and_its_worker_with_it(fresh_kernel: Any) -> None:
    """SIGKILL of the launcher (whose process is the relay) while the vault computes a long fit in a worker."""
    fresh_kernel.start(
        "model = cn.fit(RandomForestClassifier(n_estimators=20000, random_state=0), t, target='readmitted',"
        " features=['age', 'cost'])"
    )
    worker = fresh_kernel.worker()
    everything = {fresh_kernel.launcher, fresh_kernel.vault, fresh_kernel.executor, worker}
    everything |= descendants(fresh_kernel.launcher)
    os.kill(fresh_kernel.launcher, signal.SIGKILL)
    wait_until(lambda: not any(alive(pid) for pid in everything), 10, "the kernel's processes to die with the relay")
    wait_until(lambda: not fresh_kernel.kernel.manager.is_alive(), 10, "Jupyter to see the kernel dead")
