"""The differential-privacy benchmark runs end to end at a tiny size: the DP release agrees with the exact one
before it is timed, every figure the README quotes is in its result, and every budget charge reached the broker.

No ratio is asserted against its target: timings on a busy test machine say nothing about it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

RunBenchmark = Callable[..., dict[str, Any]]  # the fixture in conftest.py
TIMES = "\N{MULTIPLICATION SIGN}"


def test_dp_release_runs(run_benchmark: RunBenchmark, simulated_tee_dir: Path) -> None:
    result = run_benchmark(
        "dp_release.py", "--rows", "20000", "--rounds", "2", "--charges", "10", "--tee-dir", str(simulated_tee_dir)
    )
    assert set(result["median_s"]) == {"dp", "exact", "exact_checked"}
    assert all(len(times) == 2 for times in result["all_s"].values())
    assert result["ratio"] == result["median_s"]["dp"] / result["median_s"]["exact"]
    assert result["met"] == (result["ratio"] <= result["target"]) == result["summary"]["met"]
    assert result["summary"]["result"].startswith(f"{result['ratio']:.2f}{TIMES} (")
    # prepare and run are timed inside each DP call, the warm-up call left out
    assert len(result["dp_prepare_s"]["all"]) == len(result["dp_run_s"]["all"]) == 2
    assert result["dp_prepare_s"]["median"] > 0 and result["dp_run_s"]["median"] > 0
    assert {noise["column"] for noise in result["noise"]} == {"mean_x", "count_x"}
    charge = result["charge"]
    assert charge["charges"] == len(charge["all_s"]) == 10
    assert charge["budget_after"]["charges"] == 10 + charge["warmup_charges"]
    latency = charge["latency_ms"]
    assert 0 < latency["p50"] <= latency["p99"] <= latency["max"]
