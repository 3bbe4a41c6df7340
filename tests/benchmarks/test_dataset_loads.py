"""The dataset-load benchmarks still run end to end and report what benchmarks/README.md quotes.

Tiny tables and few rounds: these check that the scripts work (round trips equal, figures present and sane), not
how fast anything is; timings on a busy test machine say nothing, so no ratio is asserted against its target.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

RunBenchmark = Callable[..., dict[str, Any]]  # the fixture in conftest.py


def test_parquet_load_pairs_each_round_and_reports_cpu_time(run_benchmark: RunBenchmark) -> None:
    results = run_benchmark("dataset_parquet_load.py", "--rows", "30000", "--rounds", "5")
    assert len(results["speed_vs_plaintext_per_round"]) == 5
    assert results["speed_vs_plaintext"] == sorted(results["speed_vs_plaintext_per_round"])[2]
    assert set(results["cpu_median_seconds"]) == set(results["warm_median_seconds"])
    assert all(seconds > 0 for seconds in results["cpu_median_seconds"].values())
    assert results["kms_unwraps_per_load"] == 1
    assert results["met"] == {"speed": results["speed_vs_plaintext"] >= results["target"]["speed_vs_plaintext"]}


def test_ipc_load_reports_speed_and_peak_memory(run_benchmark: RunBenchmark) -> None:
    results = run_benchmark("dataset_ipc_load.py", "--rows", "200000", "--rounds", "3", "--children", "1")
    assert {"speed", "memory"} <= set(results["met"])
    assert results["table_nbytes"] > 0
