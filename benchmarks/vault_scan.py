"""Benchmark: the out-of-core group-by (an encrypted dataset scanned per query) against the in-memory one.

The ``people`` table of :mod:`vault_engine` (``--rows`` rows, default 5,000,000) is encrypted with the owner's
tooling and opened by two real vault processes in turn: one whose memory budget holds the dataset (decrypted once
at open, then queried in memory) and one whose budget is zero (the dataset is scanned: every query decrypts it
segment by segment into Polars' streaming engine). Each runs the same group-by through the analyst API (mean and
count of income per region, all its rows); the figure is the scan's throughput (rows per second) as a share of the
in-memory one, from the medians of ``--rounds`` timed calls each. Target: at least 0.5.

Exit status 0 when the target holds, 1 otherwise. Run with::

    python benchmarks/vault_scan.py [--rows 5000000] [--rounds 11] [--json] [--out result.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from vault_engine import build_tables, owner_broker
from vault_ops import vault_process

TARGET = 0.5


def timed_rounds(function: Callable[[], object], rounds: int) -> list[float]:
    function()  # warm
    times = []
    gc.disable()
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            function()
            times.append(time.perf_counter() - started)
            gc.collect()
    finally:
        gc.enable()
    return times


def run(rows: int, rounds: int, log: Callable[[str], None]) -> dict[str, Any]:
    import confnb as cn

    people, _ = build_tables(rows)
    log(f"people: {rows:,} rows, {people.nbytes / 1e6:.0f} MB")
    expected = pl.from_arrow(people)
    assert isinstance(expected, pl.DataFrame)
    truth = expected.group_by("region").agg(pl.col("income").count().alias("n")).sort("region")
    workdir = Path(tempfile.mkdtemp(prefix="confnb-bench-scan-"))
    times: dict[str, list[float]] = {}
    try:
        with owner_broker({"people": people}, workdir, log) as url:
            for mode, budget in (("in_memory", str(2**50)), ("scanned", "0")):
                os.environ["CONFNB_VAULT_MEMORY_BUDGET"] = budget
                try:
                    with vault_process(url, workdir):
                        table = cn.open("people")

                        def group_by(table: Any = table) -> Any:
                            return (
                                table.group_by("region").agg(mean=("income", "mean"), n=("income", "count")).release()
                            )

                        released = group_by()
                        if released["n"].to_numpy().tolist() != truth.get_column("n").to_list():
                            raise SystemExit(f"{mode}: the group-by differs from Polars' on the plaintext")
                        times[mode] = timed_rounds(group_by, rounds)
                        log(f"{mode}: {rounds} rounds done")
                finally:
                    del os.environ["CONFNB_VAULT_MEMORY_BUDGET"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    medians = {mode: statistics.median(values) for mode, values in times.items()}
    ratio = medians["in_memory"] / medians["scanned"]
    return {
        "versions": {"polars": pl.__version__, "numpy": np.__version__},
        "rows": rows,
        "bytes": people.nbytes,
        "rounds": rounds,
        "median_s": medians,
        "all_s": times,
        "rows_per_s": {mode: rows / seconds for mode, seconds in medians.items()},
        "throughput_ratio": ratio,
        "target": TARGET,
        "met": ratio >= TARGET,
    }


def main() -> int:
    from _provenance import TIMES, Provenance, add_output_argument, ratio

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=5_000_000, help="rows (default 5,000,000)")
    parser.add_argument("--rounds", type=int, default=11, help="timed group-bys per mode (default 11)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    add_output_argument(parser, "vault_scan")
    args = parser.parse_args()

    def log(message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    provenance = Provenance("vault_scan")
    figures = run(args.rows, args.rounds, log)
    summary = {
        "figure": "out-of-core (scanned) vs in-memory group-by throughput",
        "result": ratio(figures["throughput_ratio"]),
        "target": f"≥ {TARGET:g}{TIMES}",
        "met": figures["met"],
    }
    figures = provenance.record(figures, summary, args.out)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        medians, rates = figures["median_s"], figures["rows_per_s"]
        print(f"{figures['rows']:,} rows ({figures['bytes'] / 1e6:.0f} MB); medians of {figures['rounds']} group-bys")
        for mode in ("in_memory", "scanned"):
            print(f"  {mode:<10} {medians[mode] * 1e3:9.1f} ms  {rates[mode] / 1e6:7.1f} M rows/s")
        verdict = "MET" if figures["met"] else "MISSED"
        print(f"  out-of-core throughput {figures['throughput_ratio']:.2f}x in-memory (target >= {TARGET}x)  {verdict}")
    return 0 if figures["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
