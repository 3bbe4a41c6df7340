"""A real JupyterLab with confnb's extension, real confnb-snp kernels, and Debian's Chromium driven by Playwright.

The test command installs Chromium when it is missing (``make test`` sets ``CONFNB_REQUIRE_BROWSER=1``, so a
missing browser or an unbuilt extension fails there instead of skipping); elsewhere these tests skip, saying why.
Screenshots and timings go to ``test-artifacts/`` (or ``$CONFNB_ARTIFACTS_DIR``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/lib/chromium/chromium", "/usr/bin/chromium-browser")
# Without the background-networking flags Chromium keeps dialling Google's hosts, which this network refuses.
CHROMIUM_ARGS = [
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TAMPERED_KERNEL = "confnb-snp-tampered"
LAB_START_TIMEOUT_S = 60.0


def _unavailable(reason: str) -> None:
    if os.environ.get("CONFNB_REQUIRE_BROWSER") == "1":
        pytest.fail(f"browser tests are required here, but {reason}")
    pytest.skip(reason)


def chromium_path() -> str:
    for candidate in (os.environ.get("CONFNB_CHROMIUM", ""), *CHROMIUM_CANDIDATES):
        if candidate and Path(candidate).is_file():
            return candidate
    _unavailable("Debian's chromium is not installed (apt-get install chromium; `make test` does it)")
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    path = Path(os.environ.get("CONFNB_ARTIFACTS_DIR", REPO / "test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class Lab:
    url: str
    token: str
    root: Path
    process: subprocess.Popen[bytes]
    log: Path

    def page_url(self, path: str) -> str:
        return f"{self.url}{path}?token={self.token}"

    def api(self, path: str) -> Any:
        request = urllib.request.Request(f"{self.url}{path}", headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def put_setting(self, plugin: str, values: dict[str, Any]) -> None:
        """Save a user setting of a Lab plugin, as Lab's settings editor does (pages loaded afterwards see it)."""
        request = urllib.request.Request(
            f"{self.url}/lab/api/settings/{plugin}",
            method="PUT",
            data=json.dumps({"raw": json.dumps(values)}).encode(),
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10):
            pass


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _write_notebook(path: Path, kernel: str) -> None:
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": kernel, "display_name": kernel, "language": "python"}
    notebook.cells.append(nbformat.v4.new_code_cell(""))
    nbformat.write(notebook, path)


@pytest.fixture(scope="module")
def lab(
    confnb_kernel_env: Path, install_variant: Callable[..., str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Lab]:
    """JupyterLab on loopback with confnb-snp and a kernel whose later evidence the (simulated) host tampers with."""
    import confnb.server

    if not (Path(confnb.server.__file__).parent / "labextension" / "package.json").is_file():
        _unavailable("the lab extension is not built (pip install -e . builds it with node and jlpm)")
    chromium_path()
    tampered = confnb_kernel_env.parent / install_variant(TAMPERED_KERNEL)
    spec_file = tampered / "kernel.json"
    spec = json.loads(spec_file.read_text())
    spec["env"] = {**spec.get("env", {}), "CONFNB_SIMULATED_FAULT": "report-signature"}
    spec["display_name"] = "confnb-snp (tampered evidence)"
    spec_file.write_text(json.dumps(spec, indent=2))

    root = tmp_path_factory.mktemp("lab-root")
    _write_notebook(root / "attested.ipynb", "confnb-snp")
    _write_notebook(root / "upload.ipynb", "confnb-snp")
    _write_notebook(root / "restarted.ipynb", "confnb-snp")
    _write_notebook(root / "tampered.ipynb", TAMPERED_KERNEL)
    _write_notebook(root / "compromised.ipynb", "confnb-snp")
    _write_notebook(root / "plain.ipynb", "python3")
    with launch_lab(root, tmp_path_factory) as server:
        yield server


@contextlib.contextmanager
def launch_lab(
    root: Path, tmp_path_factory: pytest.TempPathFactory, env: dict[str, str] | None = None
) -> Iterator[Lab]:
    """JupyterLab on loopback serving ``root``; ``env`` adds variables to its environment (its kernels inherit it)."""
    from confnb.demo.lab import write_page_config

    config = tmp_path_factory.mktemp("lab-config") / "jupyter_lab_config.json"
    # No news prompt and no update check: nothing may call out, and a toast would cover the panel.
    config.write_text(
        json.dumps({"LabApp": {"news_url": None, "check_for_updates_class": "jupyterlab.NeverCheckForUpdate"}})
    )
    write_page_config(Path(os.environ["JUPYTER_CONFIG_DIR"]))
    token = secrets.token_hex(16)
    port = _free_port()
    log = tmp_path_factory.mktemp("lab-log") / "lab.log"
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--allow-root",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        f"--config={config}",
    ]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, cwd=root, env={**os.environ, **(env or {})}
        )
    server = Lab(url=f"http://127.0.0.1:{port}", token=token, root=root, process=process, log=log)
    try:
        _wait_until_up(server)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_up(server: Lab) -> None:
    deadline = time.monotonic() + LAB_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"jupyter lab exited ({server.process.returncode}):\n{server.log.read_text()[-3000:]}")
        try:
            server.api("/api/status")
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.3)
            continue
        try:
            presets = server.api("/confnb/api/upload-policies")
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"the confnb server extension is not enabled in this JupyterLab ({exc})") from None
        assert presets, "the confnb server extension offers no upload policies"
        return
    raise RuntimeError(
        f"jupyter lab did not answer within {LAB_START_TIMEOUT_S:g} s:\n{server.log.read_text()[-3000:]}"
    )


@pytest.fixture(scope="module")
def browser(lab: Lab) -> Iterator[Any]:
    playwright_sync = pytest.importorskip("playwright.sync_api", reason="Python Playwright is a test dependency")
    with playwright_sync.sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any, lab: Lab, artifacts_dir: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh browser context per test (no shared workspace state); its screenshot is kept when the test fails."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=lab.url)
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        yield page
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            page.screenshot(path=str(artifacts_dir / f"failed-{request.node.name}.png"), full_page=True)
        context.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
