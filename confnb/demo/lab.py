"""JupyterLab for the demo: on loopback, in the analyst's work folder, on the confidential kernel, until Ctrl-C.

Lab runs in a session of its own so that Ctrl-C in the terminal reaches only the demo, which then stops Lab with
SIGTERM: Jupyter's clean shutdown, which shuts down every kernel it started (Jupyter's own Ctrl-C handler would
instead ask for a confirmation on the terminal). Only if Lab does not stop in time is its process group killed.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from confnb.demo.examples import DemoError
from confnb.demo.notebooks import KERNEL_NAME

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
LOG_FILE = "jupyterlab.log"


def has_display() -> bool:
    """Whether a browser could open here: always on macOS and Windows, with X11 or Wayland elsewhere."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def write_config(jupyter_config_dir: Path) -> None:
    """Lab's settings for the demo: the confidential kernel only, and no call to the internet."""
    config = {
        # Every notebook of the demo runs on the confidential kernel; no plain Python kernel is offered.
        "KernelSpecManager": {"allowed_kernelspecs": [KERNEL_NAME]},
        "MappingKernelManager": {"default_kernel_name": KERNEL_NAME},
        # The demo needs no network: no news feed, no update check.
        "LabApp": {"news_url": None, "check_for_updates_class": "jupyterlab.NeverCheckForUpdate"},
    }
    jupyter_config_dir.mkdir(parents=True, exist_ok=True)
    (jupyter_config_dir / "jupyter_server_config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_page_config(jupyter_config_dir)


def write_page_config(jupyter_config_dir: Path) -> None:
    """No "get notified about Jupyter news?" prompt: the demo calls nothing outside, and the toast covers the panel."""
    labconfig = jupyter_config_dir / "labconfig"
    labconfig.mkdir(parents=True, exist_ok=True)
    page_config = {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}
    (labconfig / "page_config.json").write_text(json.dumps(page_config, indent=2) + "\n")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _answers(port: int, token: str) -> bool:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/status", headers={"Authorization": f"token {token}"})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:  # noqa: S310 - loopback URL built here
            return int(response.status) == 200
    except urllib.error.HTTPError as error:  # an answer, not yet the awaited one
        error.close()
        return False
    except (urllib.error.URLError, OSError):
        return False


def run_lab(
    root_dir: Path,
    first_notebook: str | None,
    log_path: Path,
    open_browser: bool,
    on_ready: Callable[[str], None],
) -> int:
    """Serve Lab on ``root_dir`` until SIGINT or SIGTERM reaches this process (or Lab exits); returns Lab's status.

    ``on_ready`` gets the URL (with its token) once Lab answers. Raises :class:`DemoError` if Lab does not start.
    """
    port = _free_port()
    token = secrets.token_hex(24)
    default_url = f"/lab/tree/{first_notebook}" if first_notebook else "/lab"
    argv = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={root_dir}",
        f"--ServerApp.default_url={default_url}",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.open_browser={open_browser}",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        argv.append("--allow-root")  # Jupyter refuses root without it; the kernel's code still runs as nobody
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    with log_path.open("ab") as log:
        process = subprocess.Popen(  # noqa: S603 - this interpreter running JupyterLab, arguments built here
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=root_dir,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _answers(port, token):
            if process.poll() is not None:
                raise DemoError(
                    f"JupyterLab exited with status {process.returncode} before it was ready: {_tail(log_path)}"
                )
            if stop.is_set():
                return 0
            if time.monotonic() > deadline:
                raise DemoError(f"JupyterLab did not answer within {READY_TIMEOUT_S:g} s: {_tail(log_path)}")
            time.sleep(0.25)
        on_ready(f"http://127.0.0.1:{port}{default_url}?token={token}")
        while not stop.wait(0.5):
            if process.poll() is not None:
                break
        return process.returncode or 0
    finally:
        _stop(process)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM: Jupyter shuts its kernels down and exits; after STOP_TIMEOUT_S its whole group is killed."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _tail(log_path: Path) -> str:
    try:
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return f"see {log_path}"
    return (lines[-1].strip() if lines else "no output") + f" (log: {log_path})"
