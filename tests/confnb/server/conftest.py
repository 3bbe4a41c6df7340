"""A real Jupyter server with the confnb extension, on loopback, in the session's private Jupyter environment.

The server is a subprocess started as an analyst starts it (``jupyter server`` with a token); the extension is
enabled by the very config file the wheel installs (``confnb/server/jupyter_server_config.json``), dropped into a
config folder of the server's own, so nothing depends on how the package was installed. Kernels are started over
REST, so they are owned by the server's kernel manager exactly as JupyterLab's are.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import confnb.server

SERVER_CONFIG = Path(confnb.server.__file__).with_name("jupyter_server_config.json")
API = "/confnb/api"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Server:
    port: int
    token: str
    log: Path
    kernels: list[str] = field(default_factory=list)

    def request(self, method: str, path: str, body: object = None, *, token: str | None = "") -> tuple[int, Any]:
        """(status, parsed JSON body); ``token=None`` sends no credentials at all."""
        headers = {"Content-Type": "application/json"}
        chosen = self.token if token == "" else token
        if chosen is not None:
            headers["Authorization"] = f"token {chosen}"
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers=headers,
        )
        try:
            with urllib.request.urlopen(request, timeout=90) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        return status, (json.loads(raw) if raw else None)

    def get(self, path: str, **options: Any) -> Any:
        status, body = self.request("GET", path, **options)
        assert status == 200, (status, body)
        return body

    def start_kernel(self, name: str) -> str:
        status, model = self.request("POST", "/api/kernels", {"name": name})
        assert status == 201, (status, model, self.log.read_text()[-3000:])
        self.kernels.append(model["id"])
        return str(model["id"])

    def stop_kernel(self, kernel_id: str) -> None:
        self.request("DELETE", f"/api/kernels/{kernel_id}")
        self.kernels.remove(kernel_id)


@pytest.fixture(scope="module")
def server(confnb_kernel_env: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("confnb-server")
    config = home / "config"
    (config / "jupyter_server_config.d").mkdir(parents=True)
    shutil.copy(SERVER_CONFIG, config / "jupyter_server_config.d" / "confnb.json")
    running = Server(_free_port(), uuid.uuid4().hex, home / "server.log")
    with running.log.open("w") as stderr:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyter_server",
                "--no-browser",
                "--allow-root",
                "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={running.port}",
                f"--IdentityProvider.token={running.token}",
                f"--ServerApp.root_dir={home}",
            ],
            env={**os.environ, "JUPYTER_CONFIG_DIR": str(config)},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                running.request("GET", "/api")
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    pytest.fail(f"jupyter server did not start: {running.log.read_text()[-3000:]}")
                time.sleep(0.2)
        yield running
    finally:
        for kernel_id in list(running.kernels):
            running.stop_kernel(kernel_id)
        process.terminate()
        process.wait(timeout=30)
