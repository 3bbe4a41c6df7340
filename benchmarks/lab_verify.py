"""Benchmark: time to a verified attestation panel in JupyterLab, against the notebook's own time to a ready kernel.

Each round opens a notebook on a fresh ``confnb-snp`` kernel in Debian's Chromium and records, in the page, when
the notebook's kernel first shows "idle" (what JupyterLab gives anyway: the baseline) and when the attestation panel
reaches ``data-status="verified"`` (server verification plus the browser's own WebCrypto verification). Figures:

1. **verification after ready**: panel verified minus kernel ready. Target: under 1 s on the simulated TEE. It can
   be slightly negative: the panel asks for evidence as soon as the kernel is connected, and JupyterLab's
   execution indicator may show "idle" a few tens of milliseconds after the answer came.
2. **open to verified / open to ready**: the ratio of the two medians, i.e. what the panel adds to opening a notebook.
3. **verify again**: the panel's own request-to-verdict time (``data-verify-ms``) for fresh evidence on a warm kernel.

A private Jupyter path holds the kernelspec, the simulated chip is made before any timing, and nothing leaves
loopback. Needs the built lab extension, Python Playwright and Debian's chromium. Exit status 1 if the target is
missed. Run with::

    python benchmarks/lab_verify.py [--rounds 5] [--again 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import nbformat

TARGET_AFTER_READY_MS = 1000.0
CHROMIUM = os.environ.get("CONFNB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]

# Records, relative to navigation start, when the kernel is first idle and when the panel is first verified.
RECORDER = """
window.__confnbTimes = {};
setInterval(() => {
  const times = window.__confnbTimes;
  const idle = document.querySelector('.jp-Notebook-ExecutionIndicator[data-status="idle"]');
  const panel = document.querySelector('#confnb-attestation-panel[data-status="verified"]');
  if (idle && times.ready === undefined) times.ready = performance.now();
  if (panel && times.verified === undefined) times.verified = performance.now();
}, 2);
"""


def _prepare(root: Path) -> None:
    from confnb.demo.lab import write_page_config
    from confnb.provisioner.kernelspec import install, private_jupyter_environment
    from kernel_enclave.tee.simulated import SimulatedBackend

    os.environ.update(private_jupyter_environment(root))
    os.environ.update({"CONFNB_SIMULATED_TEE_DIR": str(root / "simulated-tee"), "CONFNB_OFFLINE": "1"})
    SimulatedBackend()
    install(prefix=str(root))
    write_page_config(Path(os.environ["JUPYTER_CONFIG_DIR"]))
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "confnb-snp", "display_name": "confnb-snp", "language": "python"}
    (root / "notebooks").mkdir()
    nbformat.write(notebook, root / "notebooks" / "bench.ipynb")


def _start_lab(root: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token = secrets.token_hex(16)
    argv = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}"]
    argv += [f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root / 'notebooks'}", "--LabApp.news_url="]
    if os.geteuid() == 0:
        argv.append("--allow-root")
    log = (root / "lab.log").open("wb")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            _api(url, token, "/confnb/api/upload-policies")
            return process, url, token
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    process.kill()
    raise SystemExit(f"JupyterLab with the confnb extension did not start; see {root / 'lab.log'}")


def _api(url: str, token: str, path: str, method: str = "GET") -> Any:
    request = urllib.request.Request(f"{url}{path}", method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
    return json.loads(body) if body else None


def _stop_kernels(url: str, token: str) -> None:
    for session in _api(url, token, "/api/sessions"):
        _api(url, token, f"/api/sessions/{session['id']}", method="DELETE")


def _round(browser: Any, url: str, token: str, again: int) -> tuple[float, float, list[float]]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.add_init_script(RECORDER)
    page.goto(f"{url}/lab/tree/bench.ipynb?token={token}")
    page.click("#confnb-status-badge")
    page.wait_for_selector('#confnb-attestation-panel[data-status="verified"]', timeout=120_000)
    page.wait_for_function("window.__confnbTimes.ready !== undefined", timeout=60_000)
    times = page.evaluate("window.__confnbTimes")
    repeats = []
    for _ in range(again):
        nonce = page.get_attribute("#confnb-attestation-panel", "data-nonce")
        page.click("#confnb-verify-again")
        page.wait_for_function(
            "n => { const p = document.getElementById('confnb-attestation-panel');"
            " return p.dataset.status === 'verified' && p.dataset.nonce !== n; }",
            arg=nonce,
        )
        repeats.append(float(page.get_attribute("#confnb-attestation-panel", "data-verify-ms") or "nan"))
    context.close()
    _stop_kernels(url, token)
    return float(times["ready"]), float(times["verified"]), repeats


def main() -> int:
    from _provenance import TIMES, Provenance, add_output_argument

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="notebooks opened on fresh kernels (default 5)")
    parser.add_argument("--again", type=int, default=20, help="'Verify again' clicks per round (default 20)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    add_output_argument(parser, "lab_verify")
    args = parser.parse_args()
    provenance = Provenance("lab_verify")
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="confnb-bench-lab-") as workdir:
        root = Path(workdir)
        _prepare(root)
        lab, url, token = _start_lab(root)
        try:
            with sync_playwright() as driver:
                browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                _round(browser, url, token, 0)  # warm-up: first page load compiles the bundle's code
                rounds = [_round(browser, url, token, args.again) for _ in range(args.rounds)]
                browser.close()
        finally:
            lab.terminate()
            lab.wait(timeout=30)

    ready = statistics.median(r[0] for r in rounds)
    verified = statistics.median(r[1] for r in rounds)
    after_ready = statistics.median(r[1] - r[0] for r in rounds)
    repeats = sorted(x for r in rounds for x in r[2])
    figures = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "rounds": args.rounds,
        "open_to_kernel_ready_ms": round(ready, 1),
        "open_to_verified_ms": round(verified, 1),
        "verified_after_ready_ms": round(after_ready, 1),
        "open_to_verified_over_open_to_ready": round(verified / ready, 3),
        "verify_again_p50_ms": round(statistics.median(repeats), 1) if repeats else None,
        "verify_again_p90_ms": round(repeats[int(0.9 * (len(repeats) - 1))], 1) if repeats else None,
        "target_verified_after_ready_ms": TARGET_AFTER_READY_MS,
    }
    met = after_ready < TARGET_AFTER_READY_MS
    summary = {
        "figure": "open-to-verified vs open-to-kernel-ready; verified after ready",
        "result": f"{figures['open_to_verified_over_open_to_ready']:.3f}{TIMES}; {after_ready:.0f} ms",
        "target": f"< {TARGET_AFTER_READY_MS / 1000:g} s after ready",
        "met": met,
    }
    document = provenance.record({**figures, "target_met": met}, summary, args.out)
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        for name, value in figures.items():
            print(f"{name:40} {value}")
        print("target met" if met else "TARGET MISSED")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
