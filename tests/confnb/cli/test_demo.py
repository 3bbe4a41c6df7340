"""``confnb demo`` as a user runs it: JupyterLab on the confidential kernel until Ctrl-C, then nothing left running.

The demo runs as a real process with a marker in its environment, which every process it starts inherits (Lab, the
kernel's launcher, vault and executor): after Ctrl-C the test looks through /proc for any process still carrying it.
"""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

MARKER = "CONFNB_DEMO_TEST_RUN"


def confnb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "confnb", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_help_explains_the_modes():
    run = confnb("demo", "--help")
    assert run.returncode == 0
    for option in ("--headless", "--attestation-only", "--dir", "--no-browser", "--json", "Ctrl-C", "Exit codes"):
        assert option in run.stdout


def test_json_needs_a_mode_with_a_summary():
    run = confnb("demo", "--json")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip() == (
        "confnb: error: --json needs --headless or --attestation-only (the interactive demo has no summary)"
    )


def test_dir_must_be_new_or_empty(tmp_path: Path):
    (tmp_path / "something").write_text("kept")
    run = confnb("demo", "--headless", "--dir", str(tmp_path))
    assert run.returncode == 2 and "not an empty folder" in run.stderr
    assert (tmp_path / "something").read_text() == "kept"


def _marked(marker: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment carries the marker."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone, or not ours to read
        if f"{MARKER}={marker}".encode() in environ.split(b"\0") and cmdline:
            found[int(entry.name)] = cmdline
    return found


def _lines(stream: object, into: queue.Queue[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        into.put(line)
    into.put("")


def _request(url: str, method: str = "GET", body: object = None) -> tuple[int, object]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        raw = response.read()
        return response.status, json.loads(raw) if response.headers.get_content_type() == "application/json" else raw


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finding leftover processes needs /proc")
def test_interactive_demo_serves_lab_and_ctrl_c_leaves_nothing_running(tmp_path: Path, simulated_tee_dir: Path):
    marker = secrets.token_hex(8)
    env = {**os.environ, MARKER: marker}
    env.pop("DISPLAY", None)
    env.pop("WAYLAND_DISPLAY", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "confnb", "demo", "--no-browser", "--dir", str(tmp_path / "demo")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert process.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_lines, args=(process.stdout, lines), daemon=True).start()
    output: list[str] = []
    url = ""
    try:
        deadline = time.monotonic() + 300
        while not url:
            line = lines.get(timeout=max(1.0, deadline - time.monotonic()))
            output.append(line)
            assert line, "the demo ended before JupyterLab was ready:\n" + "".join(output)
            if line.startswith("    http://127.0.0.1:"):
                url = line.strip()
        parsed = urllib.parse.urlsplit(url)
        base = f"{parsed.scheme}://{parsed.netloc}"
        token = urllib.parse.parse_qs(parsed.query)["token"][0]
        status, page = _request(url)
        assert status == 200 and b"JupyterLab" in page  # type: ignore[operator]
        assert parsed.path == "/lab/tree/hospital.ipynb"  # Lab opens on the first example notebook
        _, specs = _request(f"{base}/api/kernelspecs?token={token}")
        assert specs["default"] == "confnb-snp" and set(specs["kernelspecs"]) == {"confnb-snp"}  # type: ignore[index]
        assert {"credit.ipynb", "hospital.ipynb", "two_owners.ipynb"} <= {
            item["name"]
            for item in _request(f"{base}/api/contents?token={token}")[1]["content"]  # type: ignore[index]
        }
        # A kernel as the notebook starts it: attested by the provisioner before Lab gets it.
        status, kernel = _request(f"{base}/api/kernels?token={token}", "POST", {"name": "confnb-snp"})
        assert status == 201 and kernel["name"] == "confnb-snp"  # type: ignore[index]
        running = _marked(marker)
        assert any("kernel_enclave.launcher" in cmd for cmd in running.values()), running
        assert any("jupyterlab" in cmd for cmd in running.values()), running
        brokers = re.findall(r"broker (http://127\.0\.0\.1:\d+)", "".join(output))
        assert len(brokers) == 3
        for broker in brokers:
            assert _request(f"{broker}/openapi.json")[0] == 200
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            process.wait(timeout=90)
        finally:
            if process.poll() is None:
                process.kill()
    while (line := lines.get(timeout=10)) != "":
        output.append(line)
    process.stdout.close()
    text = "".join(output)
    assert process.returncode == 0, text
    assert "stopped: nothing of the demo is running" in text
    deadline = time.monotonic() + 10
    while (left := _marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"still running after Ctrl-C: {left}"
    for broker in brokers:
        with pytest.raises(urllib.error.URLError):
            _request(f"{broker}/openapi.json")
