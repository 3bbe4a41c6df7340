"""``make test`` requires the real SEV-SNP vectors; a plain ``pytest`` without them skips, saying why.

Without ``../shared`` the attest and browser-crypto suites lose most of their tests to skips and the run stays
green, so the Makefile sets ``CONFNB_REQUIRE_VECTORS=1``, under which such a run fails at once. Checked on a copy
of the suite's conftest in a folder with no ``shared`` beside it (and, the twin, with the real one beside it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
REAL_SHARED = REPO.parent / "shared"
ONE_VECTOR_TEST = "def test_a_real_report(vector):\n    assert len(vector.report) >= 1184\n"


def _project(root: Path) -> Path:
    """A project folder holding the suite's conftest and one test that reads the vectors."""
    project = root / "project"
    (project / "tests").mkdir(parents=True)
    for name in ("conftest.py", "confidential_fixtures.py", "plan_json.py"):
        shutil.copy(TESTS / name, project / "tests" / name)
    shutil.copy(REPO / "pyproject.toml", project / "pyproject.toml")
    (project / "tests" / "test_one.py").write_text(ONE_VECTOR_TEST)
    return project


def _pytest(project: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {name: value for name, value in os.environ.items() if name != "CONFNB_REQUIRE_VECTORS"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_one.py"],
        cwd=project,
        env={**environment, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_without_the_vectors_a_plain_run_skips_saying_why(tmp_path: Path) -> None:
    done = _pytest(_project(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 skipped" in done.stdout
    assert "real SEV-SNP vectors not found at" in done.stdout and "../shared beside the project" in done.stdout


def test_without_the_vectors_a_run_that_requires_them_fails(tmp_path: Path) -> None:
    done = _pytest(_project(tmp_path), CONFNB_REQUIRE_VECTORS="1")
    assert done.returncode != 0
    assert "CONFNB_REQUIRE_VECTORS=1 requires the real SEV-SNP vectors" in done.stdout + done.stderr
    assert "passed" not in done.stdout and "skipped" not in done.stdout


def test_with_the_vectors_a_run_that_requires_them_runs_them(tmp_path: Path) -> None:
    if not (REAL_SHARED / "vectors" / "snp" / "vectors.json").is_file():
        pytest.skip(f"real SEV-SNP vectors not found at {REAL_SHARED}: they live in ../shared beside the project")
    project = _project(tmp_path)
    (tmp_path / "shared").symlink_to(REAL_SHARED)  # beside the copy, as ../shared is beside the project
    done = _pytest(project, CONFNB_REQUIRE_VECTORS="1")
    assert done.returncode == 0, done.stdout + done.stderr
    count = len(json.loads((REAL_SHARED / "vectors" / "snp" / "vectors.json").read_text()))
    assert f"{count} passed" in done.stdout
