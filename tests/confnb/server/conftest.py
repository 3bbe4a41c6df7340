"""A real Jupyter server with the confnb extension, on loopback, in the session's private Jupyter environment.

The server is a subprocess started as an analyst starts it (``jupyter server`` with a token); the extension is
enabled by the very config file the wheel installs (``confnb/server/jupyter_server_config.json``), dropped into a
config folder of the server's own, so nothing depends on how the package was installed. Kernels are started over
REST, so they are owned by the server's kernel manager exactly as JupyterLab's are.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import confnb.server

SERVER_CONFIG = Path(confnb.server.__file__).with_name("jupyter_server_config.json")
API = "/confnb/api"


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
def server(
    confnb_kernel_env: Path,
    tmp_path_factory: pytest.TempPathFactory,
    jupyter_server: Callable[..., AbstractContextManager[int]],
) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("confnb-server")
    config = home / "config"
    (config / "jupyter_server_config.d").mkdir(parents=True)
    shutil.copy(SERVER_CONFIG, config / "jupyter_server_config.d" / "confnb.json")
    token, log = uuid.uuid4().hex, home / "server.log"
    with jupyter_server(root=home, token=token, log=log, env={"JUPYTER_CONFIG_DIR": str(config)}) as port:
        running = Server(port, token, log)
        yield running
        for kernel_id in list(running.kernels):
            running.stop_kernel(kernel_id)
