"""The verification benchmark's verdict: a target counts as met only when it was measured.

``sev-attest-tool`` is an optional install; without it the benchmark cannot compare confnb with the Rust verifier,
and must say the target is missed rather than pass it by default.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "attest_verify.py"


@pytest.fixture(scope="module")
def benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("attest_verify_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("row", "met"),
    [
        ({"ratio_vs_floor": 1.0, "ratio_vs_rust": 0.5}, True),  # both measured and within target
        ({"ratio_vs_floor": 1.0}, False),  # sev-attest-tool absent: not measured, not met
        ({"ratio_vs_floor": 1.0, "ratio_vs_rust": 0.9}, False),
        ({"ratio_vs_floor": 1.5, "ratio_vs_rust": 0.5}, False),
    ],
)
def test_a_target_is_met_only_when_measured_and_within_bounds(
    benchmark: ModuleType, row: dict[str, float], met: bool
) -> None:
    assert benchmark.targets_met([{"vector": "R10", **row}]) is met
    assert benchmark.targets_met([{"vector": "R10", "ratio_vs_floor": 1.0, "ratio_vs_rust": 0.5}, row]) is met
