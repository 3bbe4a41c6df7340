"""Benchmark: the confidential kernel (confnb-snp) against the stock ipykernel (python3), in one run.

Two figures, each a ratio of medians measured alternately on the same machine in the same run:

1. **start-to-ready**: ``KernelManager.start_kernel()`` plus ``client.wait_for_ready()`` — for confnb-snp that is
   the whole launch: launcher, executor, simulated evidence, the provisioner's verification against the installed
   attestation policy, and the CurveZMQ connection. Target: at most 2x stock.
2. **per-cell round trip**: ``execute_request`` of a small cell (``x = 1``) until its ``execute_reply`` *and* the
   ``idle`` status have arrived — what a notebook waits for per cell. Each kernel runs the same number of cells,
   in blocks that alternate between the two kernels, so drift of the machine's speed hits both. Target: at most
   1.3x stock. The cells are timed once the vault has loaded its query engine (Polars and Arrow), which it
   does in the background after the start.
3. **start-to-warm** (reported, no target): from ``start_kernel()`` until the vault has loaded those libraries,
   i.e. until a ``cn.open`` would no longer wait for them.

A private Jupyter path (temporary directory) holds the confnb-snp kernelspec, the simulated chip is generated
before any timing, and nothing leaves loopback. Exit status 0 when both targets hold, 1 otherwise. Run with::

    python benchmarks/kernel_roundtrip.py [--starts 5] [--cells 500] [--json] [--out results/kernel_roundtrip.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TARGET_START = 2.0
TARGET_CELL = 1.3
STOCK = "python3"
CONFIDENTIAL = "confnb-snp"
BLOCK = 50
WARMUP_CELLS = 20
VAULT_WARM = (
    "from confnb.analyst.api import wait_until_loaded\n"
    "from confnb.analyst.session import current_session\n"
    "wait_until_loaded(current_session())\n"
)


def _prepare(root: Path) -> None:
    from confnb.provisioner.kernelspec import install, private_jupyter_environment
    from kernel_enclave.tee.simulated import SimulatedBackend

    os.environ.update(private_jupyter_environment(root))
    os.environ.update({"CONFNB_SIMULATED_TEE_DIR": str(root / "simulated-tee"), "CONFNB_OFFLINE": "1"})

    SimulatedBackend()  # the simulated chip (RSA-4096 keys) is made here, not inside a timed start
    install(prefix=str(root))


def _start(kernel_name: str) -> tuple[Any, Any, float]:
    from jupyter_client.manager import KernelManager

    started = time.perf_counter()
    manager = KernelManager(kernel_name=kernel_name)
    manager.start_kernel()
    client = manager.client()
    client.start_channels()
    client.wait_for_ready(timeout=120)
    return manager, client, time.perf_counter() - started


def _stop(manager: Any, client: Any) -> None:
    client.stop_channels()
    manager.shutdown_kernel(now=False)


def _cell(client: Any, code: str = "x = 1", timeout: float = 30) -> float:
    started = time.perf_counter()
    msg_id = client.execute(code, store_history=False)
    got_reply = got_idle = False
    while not (got_reply and got_idle):
        if not got_reply:
            reply = client.get_shell_msg(timeout=timeout)
            got_reply = reply["parent_header"].get("msg_id") == msg_id
        if not got_idle:
            message = client.get_iopub_msg(timeout=timeout)
            got_idle = (
                message["parent_header"].get("msg_id") == msg_id
                and message["msg_type"] == "status"
                and message["content"]["execution_state"] == "idle"
            )
    return time.perf_counter() - started


def bench_starts(rounds: int, log: Callable[[str], None]) -> tuple[dict[str, list[float]], list[float]]:
    """Start-to-ready of each kernel, alternating; and for confnb-snp also start-to-warm (the vault's libraries)."""
    times: dict[str, list[float]] = {STOCK: [], CONFIDENTIAL: []}
    warm: list[float] = []
    for round_number in range(rounds):
        for name in (STOCK, CONFIDENTIAL) if round_number % 2 == 0 else (CONFIDENTIAL, STOCK):
            manager, client, elapsed = _start(name)
            if name == CONFIDENTIAL:
                warm.append(elapsed + _cell(client, VAULT_WARM, timeout=120))
            _stop(manager, client)
            times[name].append(elapsed)
        log(f"start round {round_number + 1}/{rounds}")
    return times, warm


def bench_cells(cells: int, log: Callable[[str], None]) -> dict[str, list[float]]:
    kernels = {name: _start(name)[:2] for name in (STOCK, CONFIDENTIAL)}
    try:
        _cell(kernels[CONFIDENTIAL][1], VAULT_WARM, timeout=120)  # steady state: the vault's start-up work is done
        for _, client in kernels.values():
            for _ in range(WARMUP_CELLS):
                _cell(client)
        times: dict[str, list[float]] = {STOCK: [], CONFIDENTIAL: []}
        done = 0
        while done < cells:
            block = min(BLOCK, cells - done)
            order = (STOCK, CONFIDENTIAL) if (done // BLOCK) % 2 == 0 else (CONFIDENTIAL, STOCK)
            for name in order:
                client = kernels[name][1]
                times[name].extend(_cell(client) for _ in range(block))
            done += block
            log(f"cells {done}/{cells}")
        return times
    finally:
        for manager, client in kernels.values():
            _stop(manager, client)


def run(starts: int, cells: int, log: Callable[[str], None]) -> dict[str, Any]:
    start_times, warm_times = bench_starts(starts, log)
    cell_times = bench_cells(cells, log)
    start_ratio = statistics.median(start_times[CONFIDENTIAL]) / statistics.median(start_times[STOCK])
    cell_ratio = statistics.median(cell_times[CONFIDENTIAL]) / statistics.median(cell_times[STOCK])
    return {
        "start_to_ready_s": {
            name: {"median": statistics.median(values), "min": min(values), "runs": len(values)}
            for name, values in start_times.items()
        },
        "start_to_vault_warm_s": {"median": statistics.median(warm_times), "max": max(warm_times)},
        "cell_round_trip_ms": {
            name: {
                "median": 1000 * statistics.median(values),
                "p90": 1000 * statistics.quantiles(values, n=10)[-1],
                "cells": len(values),
            }
            for name, values in cell_times.items()
        },
        "ratios": {"start": start_ratio, "cell": cell_ratio},
        "targets": {"start": TARGET_START, "cell": TARGET_CELL},
        "met": {"start": start_ratio <= TARGET_START, "cell": cell_ratio <= TARGET_CELL},
    }


def main() -> int:
    from _provenance import TIMES, Provenance, add_output_argument, ratio

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=5, help="kernel starts per kernel (default 5)")
    parser.add_argument("--cells", type=int, default=500, help="cells per kernel (default 500)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    add_output_argument(parser, "kernel_roundtrip")
    args = parser.parse_args()
    provenance = Provenance("kernel_roundtrip")

    def log(message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="confnb-bench-kernel-") as root:
        _prepare(Path(root))
        figures = run(args.starts, args.cells, log)
    summary = {
        "figure": "confnb-snp vs python3: start-to-ready / per-cell round trip",
        "result": f"{ratio(figures['ratios']['start'])} / {ratio(figures['ratios']['cell'])}",
        "target": f"≤ {TARGET_START:g}{TIMES} / ≤ {TARGET_CELL:g}{TIMES}",
        "met": all(figures["met"].values()),
    }
    figures = provenance.record(figures, summary, args.out)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        starts, cells, ratios = figures["start_to_ready_s"], figures["cell_round_trip_ms"], figures["ratios"]
        met = {name: "MET" if figures["met"][name] else "MISSED" for name in ("start", "cell")}
        print(f"Kernel start-to-ready (median of {starts[STOCK]['runs']}):")
        for name in (STOCK, CONFIDENTIAL):
            print(f"  {name:<12} {starts[name]['median']:.3f} s")
        print(f"  ratio {ratios['start']:.2f}x (target <= {TARGET_START}x)  {met['start']}")
        print(f"Per-cell round trip, execute_request -> reply + idle (median of {cells[STOCK]['cells']}):")
        for name in (STOCK, CONFIDENTIAL):
            print(f"  {name:<12} {cells[name]['median']:.3f} ms (p90 {cells[name]['p90']:.3f} ms)")
        print(f"  ratio {ratios['cell']:.2f}x (target <= {TARGET_CELL}x)  {met['cell']}")
        warm = figures["start_to_vault_warm_s"]
        print(f"confnb-snp start-to-warm (vault libraries loaded): median {warm['median']:.3f} s")
        print(f"Written to {args.out} (commit {figures['provenance']['commit']})")
    return 0 if all(figures["met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
