"""A broker as its own process (``confnb broker serve`` on loopback), for tests that load it, kill it or measure it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


class BrokerProcess:
    def __init__(self, owner: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> None:
        self.owner = owner
        self.env = {**os.environ, "CONFNB_OFFLINE": "1", **(env or {})}
        self.args = args
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self._log()
        command = [sys.executable, "-m", "confnb", "broker", "serve", "--dir", str(self.owner)]
        try:
            self.process = subprocess.Popen(
                [*command, "--port", str(self.port), *self.args],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=self.env,
            )
        finally:
            os.close(log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1):
                    return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"broker exited: {(self.owner / 'broker.log').read_text()}") from None
                time.sleep(0.05)
        raise RuntimeError("broker did not start")

    def _log(self) -> int:
        # A file, not a pipe: nobody reads a pipe during the load, and a full pipe would stall the broker.
        return os.open(self.owner / "broker.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM: uvicorn's graceful shutdown, which runs the app's own shutdown (it audits pending counts)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def post(self, path: str, body: object) -> tuple[int, dict]:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            with error:  # it holds the connection's socket
                return error.code, json.loads(error.read())
