"""Every benchmark script runs (tiny sizes, reduced modes), writes its result with its commit and machine, and
benchmarks/README.md shows, for every script, only figures taken from such a result.

These check that the scripts work and that their figures can be traced to the code that produced them, not how
fast anything is: a busy test machine says nothing about the targets.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

RunBenchmark = Callable[..., dict[str, Any]]  # the fixture in conftest.py
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
VECTORS = BENCHMARKS.parent.parent / "shared" / "vectors" / "snp"
TIMES = "\N{MULTIPLICATION SIGN}"
CHROMIUM = os.environ.get("CONFNB_CHROMIUM", "/usr/bin/chromium")
# Every script and how this file exercises it: a new script without an entry here fails the first test.
EXERCISED = {
    "attest_verify",
    "broker_release",
    "combination_rule",
    "dataset_ipc_load",  # test_dataset_loads.py
    "dataset_parquet_load",  # test_dataset_loads.py
    "difference_checks",
    "dp_release",  # test_dp_release.py
    "kernel_roundtrip",
    "lab_verify",
    "soak",
    "vault_engine",
    "vault_ops",
    "vault_scan",
}
VAULT_ENGINE_OPERATIONS = {
    "filter_group_by",
    "join_group_by",
    "value_counts",
    "group_by_quantile",
    "describe",
    "window",
}


@pytest.fixture(scope="module")
def provenance() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmarks_provenance", BENCHMARKS / "_provenance.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_script_is_exercised_here(provenance: ModuleType) -> None:
    assert set(provenance.scripts()) == EXERCISED


def test_the_readme_shows_one_row_per_script_from_its_result(provenance: ModuleType) -> None:
    readme = (BENCHMARKS / "README.md").read_text()
    assert provenance.readme_with_table(readme) == readme, "run `python benchmarks/_provenance.py` after a benchmark"
    table = readme[readme.index(provenance.TABLE_START) : readme.index(provenance.TABLE_END)]
    for script in provenance.scripts():
        rows = [line for line in table.splitlines() if f"`{script}.py`" in line]
        assert len(rows) == 1, script
        result = BENCHMARKS / "results" / f"{script}.json"
        if result.is_file():
            commit = json.loads(result.read_text())["provenance"]["commit"]
            assert f"(results/{script}.json)" in rows[0]
            assert f"`{commit[:12]}" in rows[0]
        else:
            assert "not yet measured" in rows[0]


def test_the_readme_quotes_no_figure_outside_the_generated_table(provenance: ModuleType) -> None:
    """Figures elsewhere in the README would name no commit: milliseconds, seconds and ratios live in the table."""
    readme = (BENCHMARKS / "README.md").read_text()
    outside = readme[: readme.index(provenance.TABLE_START)] + readme[readme.index(provenance.TABLE_END) :]
    outside = re.sub(r"[≤≥<>]\s?\d+(?:\.\d+)?", "", outside)  # targets are no measurements
    measured = re.findall(
        r"\d+(?:\.\d+)?\s?(?:ms|µs|GB/s|MB/s)\b|\d+\.\d+\s?(?:\N{MULTIPLICATION SIGN}|x\b|s\b)", outside
    )
    assert measured == []


def test_the_table_is_rebuilt_from_result_files(provenance: ModuleType, tmp_path: Path) -> None:
    document = {
        "summary": {"figure": "a vs b", "result": f"1.00{TIMES}", "target": f"≤ 2{TIMES}", "met": True},
        "provenance": {
            "commit": "0123456789abcdef0123456789abcdef01234567-dirty",
            "machine": {"cores": 2, "memory_bytes": 2**34, "cpu_model": "Some CPU"},
        },
    }
    (tmp_path / "kernel_roundtrip.json").write_text(json.dumps(document))
    table = provenance.table(tmp_path)
    row = next(line for line in table.splitlines() if "`kernel_roundtrip.py`" in line)
    assert row == (
        f"| [`kernel_roundtrip.py`](results/kernel_roundtrip.json) | a vs b | 1.00{TIMES} | ≤ 2{TIMES} | yes | "
        "`0123456789ab-dirty` | 2 cores, 16 GiB, Some CPU |"
    )
    assert "not yet measured" in next(line for line in table.splitlines() if "`vault_ops.py`" in line)

    document["provenance"]["command"] = ["kernel_roundtrip.py", "--json", "--starts", "1", "--out", "x.json"]
    (tmp_path / "kernel_roundtrip.json").write_text(json.dumps(document))
    row = next(line for line in provenance.table(tmp_path).splitlines() if "`kernel_roundtrip.py`" in line)
    assert "| a vs b (run with `--starts 1`) |" in row  # a run at other sizes says so


def test_the_commit_is_head_and_says_when_the_tree_differs(provenance: ModuleType) -> None:
    head = subprocess.run(
        ["git", "-C", str(BENCHMARKS), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    )
    if head.returncode != 0:
        pytest.skip("not a git checkout: the commit is recorded as 'unknown'")
    changed = subprocess.run(
        ["git", "-C", str(BENCHMARKS), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    assert provenance.commit() == head.stdout.strip() + ("-dirty" if changed else "")


def test_attest_verify_runs(run_benchmark: RunBenchmark) -> None:
    if not (VECTORS / "vectors.json").is_file():
        pytest.skip(f"the real SEV-SNP vectors are not at {VECTORS}")
    result = run_benchmark("attest_verify.py", "--rounds", "20")
    assert {row["vector"] for row in result["vectors"]} == {"R10", "R16"}
    assert all(row["ratio_vs_floor"] > 0 for row in result["vectors"])


def test_broker_release_runs(run_benchmark: RunBenchmark) -> None:
    result = run_benchmark("broker_release.py", "--clients", "1", "--requests", "4", "--floor-rounds", "4")
    assert result["ok"] is True
    assert result["summary"]["met"] is None  # reported, no target


def test_kernel_roundtrip_runs(run_benchmark: RunBenchmark) -> None:
    result = run_benchmark("kernel_roundtrip.py", "--starts", "1", "--cells", "4")
    assert set(result["ratios"]) == {"start", "cell"}
    assert result["start_to_vault_warm_s"]["median"] >= result["start_to_ready_s"]["confnb-snp"]["median"]


def test_vault_ops_runs(run_benchmark: RunBenchmark) -> None:
    result = run_benchmark("vault_ops.py", "--rows", "5000", "--aggregate-rounds", "1", "--fit-rounds", "1")
    assert set(result["ratios"]) == {"aggregate", "fit", "memory"}


def test_difference_checks_runs(run_benchmark: RunBenchmark) -> None:
    result = run_benchmark("difference_checks.py", "--rows", "20000", "--remembered", "20", "--rounds", "1")
    assert set(result["median_s"]) == {"without", "with", "record_sets_only"}
    assert result["ratio"] == result["median_s"]["with"] / result["median_s"]["without"]
    assert result["met"] == (result["ratio"] <= result["target"]) == result["summary"]["met"]
    assert result["earlier_releases"] == 20
    assert result["remembered_sets"] > 20  # the earlier releases, and the timed releases' own sets
    assert result["memory_bytes"]["remembered_sets"] > 0


def test_combination_rule_runs(run_benchmark: RunBenchmark) -> None:
    """Both groupings are timed after the releases with and without the rule (and after an earlier release) were
    found equal."""
    result = run_benchmark("combination_rule.py", "--rows", "20000", "--rounds", "1")
    assert set(result["groupings"]) == {"4", "1000"}
    for figures in result["groupings"].values():
        medians = figures["median_s"]
        assert set(medians) == {"with", "without", "after_an_earlier_release"}
        assert figures["ratio"] == medians["with"] / medians["without"]
        assert figures["after_an_earlier_release_ratio"] == medians["after_an_earlier_release"] / medians["without"]
    assert result["summary"]["met"] is None and result["summary"]["target"] == "reported"


def test_vault_engine_runs(run_benchmark: RunBenchmark) -> None:
    """Every operation's vault result equals Polars' (the script exits without output otherwise), then is timed."""
    result = run_benchmark("vault_engine.py", "--rows", "20000", "--rounds", "1")
    assert set(result["operations"]) == VAULT_ENGINE_OPERATIONS
    for figures in result["operations"].values():
        assert set(figures["median_s"]) == {"vault", "polars", "pandas"}
        assert all(seconds > 0 for seconds in figures["median_s"].values())
        assert figures["vs_polars"] > 0 and figures["vs_pandas"] > 0
    memory = result["memory_bytes"]
    assert memory["vault_peak"] > 0 and memory["plaintext_polars_peak"] > 0
    assert result["memory_ratio"] == memory["vault_peak"] / memory["plaintext_polars_peak"]
    assert set(result["met"]) == {
        f"{name}_{baseline}" for name in VAULT_ENGINE_OPERATIONS for baseline in ("vs_polars", "vs_pandas")
    } | {"memory"}
    assert result["met"]["memory"] == (result["memory_ratio"] <= result["targets"]["memory"])
    assert result["summary"]["met"] == all(result["met"].values())
    assert result["summary"]["result"].count(TIMES) == 3  # slowest vs Polars, slowest vs pandas, memory


def test_vault_scan_runs(run_benchmark: RunBenchmark) -> None:
    result = run_benchmark("vault_scan.py", "--rows", "20000", "--rounds", "1")
    assert set(result["median_s"]) == {"in_memory", "scanned"}
    assert result["throughput_ratio"] == result["median_s"]["in_memory"] / result["median_s"]["scanned"]
    assert result["met"] == (result["throughput_ratio"] >= result["target"])
    assert result["summary"]["met"] == result["met"]
    assert result["summary"]["result"] == f"{result['throughput_ratio']:.2f}{TIMES}"


def test_lab_verify_runs(run_benchmark: RunBenchmark) -> None:
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"lab_verify drives Debian's Chromium, which is not at {CHROMIUM}")
    pytest.importorskip("playwright.sync_api", reason="lab_verify drives Chromium through Python Playwright")
    if not (BENCHMARKS.parent / "confnb" / "server" / "labextension" / "package.json").is_file():
        pytest.skip("lab_verify needs the built JupyterLab extension (jlpm build)")
    result = run_benchmark("lab_verify.py", "--rounds", "1", "--again", "1")
    # Both moments were seen, in the page, after the notebook opened (verification may precede JupyterLab's idle
    # indicator by a few tens of milliseconds, see the benchmark); the figures are consistent with them.
    assert result["open_to_kernel_ready_ms"] > 0 and result["open_to_verified_ms"] > 0
    after_ready = result["open_to_verified_ms"] - result["open_to_kernel_ready_ms"]
    assert result["verified_after_ready_ms"] == pytest.approx(after_ready, abs=0.11)
    assert result["target_met"] == (result["verified_after_ready_ms"] < result["target_verified_after_ready_ms"])
    assert result["verify_again_p50_ms"] > 0


def test_soak_runs_and_every_answer_is_right(run_benchmark: RunBenchmark) -> None:
    result = run_benchmark("soak.py", "--releases", "20", "--rows", "5000")
    assert result["wrong_answers"] == 0, result["wrong"]
    assert result["unreported_failures"] == 0  # every cell answered, interrupted or not
    failed = result["failed_correctly_reported"]
    other = failed["hit_by_the_previous_cells_interrupt"]
    assert result["answered"] + failed["interrupted"] + failed["errors"] + other == 20
    assert sum(row["answered"] for row in result["by_kind"].values()) == result["answered"]
    assert set(result["met"]) == {"wrong_answers", "unreported_failures", "memory"}
    memory = result["vault_rss_bytes"]
    assert memory["start"] > 0 and memory["end"] > 0
    assert result["latency_ms"]["p50"] is not None and result["latency_ms"]["p99"] >= result["latency_ms"]["p50"]


def test_soak_detects_a_wrong_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The soak's comparison flags another cell's value, a withheld one and a missing key, and passes the right one."""
    import sys

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("benchmarks_soak", BENCHMARKS / "soak.py")
    assert spec is not None and spec.loader is not None
    soak = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "benchmarks_soak", soak)  # its dataclasses look their module up there
    spec.loader.exec_module(soak)
    expected = {"0": 56.54, "1": 2000.0}
    tolerance = (soak.RTOL, soak.ATOL)
    assert soak.same({"0": 56.54, "1": 2000.0 * (1 + 1e-12)}, expected, tolerance)
    assert not soak.same({"0": 2000.0, "1": 56.54}, expected, tolerance)  # answers swapped between cells
    assert not soak.same({"0": float("nan"), "1": 2000.0}, expected, tolerance)  # withheld
    assert not soak.same({"0": 56.54}, expected, tolerance)
    assert not soak.same(56.54, [56.54], tolerance)
