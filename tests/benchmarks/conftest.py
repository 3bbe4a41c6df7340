"""Running the benchmark scripts as their users do, at tiny sizes, with their results written to a test directory."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
RunBenchmark = Callable[..., dict[str, Any]]


@pytest.fixture
def run_benchmark(tmp_path: Path) -> RunBenchmark:
    """``run_benchmark(script, *arguments)``: the result it printed with ``--json``, checked against the file it wrote.

    Exit status 1 (a target missed) is accepted: timings on a busy test machine say nothing about the targets.
    """

    def run(script: str, *arguments: str, timeout: float = 600) -> dict[str, Any]:
        out = tmp_path / f"{Path(script).stem}.json"
        finished = subprocess.run(
            [sys.executable, str(BENCHMARKS / script), "--json", "--out", str(out), *arguments],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert finished.returncode in (0, 1), finished.stderr[-3000:]
        assert finished.stdout.strip(), finished.stderr[-3000:]  # an uncaught exception also exits with 1
        printed: dict[str, Any] = json.loads(finished.stdout)
        assert json.loads(out.read_text()) == printed  # the file holds what was printed
        _check_provenance(printed, Path(script).stem)
        return printed

    return run


def _check_provenance(document: dict[str, Any], script: str) -> None:
    provenance = document["provenance"]
    assert provenance["benchmark"] == script
    commit = provenance["commit"]
    assert commit == "unknown" or len(commit.removesuffix("-dirty")) == 40
    machine = provenance["machine"]
    assert machine["cores"] >= 1 and machine["memory_bytes"] > 0 and machine["cpu_model"]
    summary = document["summary"]
    assert {"figure", "result", "target", "met"} <= set(summary)
    assert summary["met"] in (True, False, None)
