"""confnb-snp behind a real Jupyter server, spoken to over its websocket the way JupyterLab does.

The provisioner's connection info (remote ports, CurveZMQ keys, a key the host never saw) must work for
jupyter_server's own ZMQ streams, and a restart (a fresh launch with new ports and keys) must work for a client
that reconnects its websocket afterwards, as JupyterLab's ``KernelConnection.restart()`` does.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from confnb.provisioner.kernelspec import KERNEL_NAME

pytestmark = pytest.mark.slow
TOKEN = uuid.uuid4().hex


class Server:
    def __init__(self, port: int) -> None:
        self.port = port

    def rest(self, method: str, path: str, body: object = None) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {TOKEN}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=90) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    async def channels(self, kernel_id: str, session: str) -> WebSocketClientConnection:
        url = f"ws://127.0.0.1:{self.port}/api/kernels/{kernel_id}/channels?session_id={session}&token={TOKEN}"
        return await websocket_connect(url)


@pytest.fixture(scope="module")
def server(
    confnb_kernel_env: Path,
    tmp_path_factory: pytest.TempPathFactory,
    jupyter_server: Callable[..., AbstractContextManager[int]],
) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("jupyter-server") / "server.log"
    with jupyter_server(root=log.parent, token=TOKEN, log=log) as port:
        yield Server(port)


async def _request(ws: WebSocketClientConnection, msg_type: str, content: dict[str, Any]) -> list[dict[str, Any]]:
    """Send on shell; return every message of that request until its idle status (the reply included)."""
    msg_id = uuid.uuid4().hex
    header = {"msg_id": msg_id, "msg_type": msg_type, "username": "", "session": "lab", "version": "5.3", "date": ""}
    await ws.write_message(
        json.dumps(
            {
                "header": header,
                "parent_header": {},
                "metadata": {},
                "content": content,
                "channel": "shell",
                "buffers": [],
            }
        )
    )
    received: list[dict[str, Any]] = []
    unrelated: list[dict[str, Any]] = []
    # The reply (shell) and the idle status (iopub) arrive over one websocket in either order.
    while not (
        any(m["msg_type"].endswith("_reply") for m in received)
        and any(m["msg_type"] == "status" and m["content"]["execution_state"] == "idle" for m in received)
    ):
        try:
            text = await asyncio.wait_for(ws.read_message(), 30)
        except TimeoutError:
            got = [(m["channel"], m["msg_type"], m["content"].get("execution_state")) for m in received]
            others = [(m["channel"], m["msg_type"], m["parent_header"].get("msg_type")) for m in unrelated]
            raise AssertionError(f"{msg_type}: got {got}; unrelated {others}") from None
        assert isinstance(text, str)
        message = json.loads(text)
        if message["parent_header"].get("msg_id") == msg_id:
            received.append(message)
        else:
            unrelated.append(message)
    return received


async def _print(ws: WebSocketClientConnection, code: str) -> str:
    content = {"code": code, "silent": False, "store_history": True, "user_expressions": {}, "allow_stdin": False}
    messages = await _request(ws, "execute_request", content)
    return "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream")


def test_a_confidential_kernel_through_jupyter_server_survives_a_restart(server: Server) -> None:
    kernel = server.rest("POST", "/api/kernels", {"name": KERNEL_NAME})
    kernel_id = kernel["id"]

    async def scenario() -> None:
        ws = await server.channels(kernel_id, "lab-session")
        try:
            replies = await _request(ws, "kernel_info_request", {})
            info = [m for m in replies if m["msg_type"] == "kernel_info_reply"]
            assert "confnb-attestation" in info[0]["content"]["supported_features"]
            assert await _print(ws, "print(6 * 7)") == "42\n"
            server.rest("POST", f"/api/kernels/{kernel_id}/restart")  # a fresh launch: new ports, keys, evidence
        finally:
            ws.close()
        ws = await server.channels(kernel_id, "lab-session")  # what JupyterLab does after a restart
        try:
            assert await _print(ws, "print('after restart')") == "after restart\n"
        finally:
            ws.close()

    try:
        asyncio.run(scenario())
    finally:
        server.rest("DELETE", f"/api/kernels/{kernel_id}")
