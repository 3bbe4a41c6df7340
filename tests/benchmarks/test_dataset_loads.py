"""The dataset-load benchmarks still run end to end and report what benchmarks/README.md quotes.

Tiny tables and few rounds: these check that the scripts work (round trips equal, figures present and sane), not
how fast anything is; timings on a busy test machine say nothing, so no ratio is asserted against its target.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run(script: str, *arguments: str) -> dict[str, Any]:
    finished = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--json", *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert finished.returncode in (0, 1), finished.stderr[-3000:]  # 1: a target missed, which timing noise allows
    results: dict[str, Any] = json.loads(finished.stdout)
    return results


def test_parquet_load_pairs_each_round_and_reports_cpu_time() -> None:
    results = run("dataset_parquet_load.py", "--rows", "30000", "--rounds", "5")
    assert len(results["speed_vs_plaintext_per_round"]) == 5
    assert results["speed_vs_plaintext"] == sorted(results["speed_vs_plaintext_per_round"])[2]
    assert set(results["cpu_median_seconds"]) == set(results["warm_median_seconds"])
    assert all(seconds > 0 for seconds in results["cpu_median_seconds"].values())
    assert results["kms_unwraps_per_load"] == 1
    assert results["met"] == {"speed": results["speed_vs_plaintext"] >= results["target"]["speed_vs_plaintext"]}


def test_ipc_load_reports_speed_and_peak_memory() -> None:
    results = run("dataset_ipc_load.py", "--rows", "200000", "--rounds", "3", "--children", "1")
    assert {"speed", "memory"} <= set(results["met"])
    assert results["table_nbytes"] > 0
