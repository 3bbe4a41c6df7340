"""The example use cases: deterministic data, owner scripts that run as documented, clean notebooks, and the
headless demo executing every notebook on ``confnb-snp`` with real brokers and real kernels."""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

import nbformat
import pandas as pd  # type: ignore[import-untyped]
import pytest

from confnb.demo.notebooks import KERNEL_NAME, REFUSED_TAG

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
OWNER_SCRIPTS = sorted(EXAMPLES.glob("*/*_owner.py"))
NOTEBOOKS = sorted(EXAMPLES.glob("*/*.ipynb"))


def _module(path: Path) -> ModuleType:
    name = f"test_examples_{path.parent.name}_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


# -- the data generators -----------------------------------------------------------------------------------------


def test_the_generators_are_deterministic_and_seeded() -> None:
    hospital = _module(EXAMPLES / "hospital" / "hospital_data.py")
    credit = _module(EXAMPLES / "credit" / "credit_data.py")
    insurer = _module(EXAMPLES / "two_owners" / "insurer_data.py")
    pd.testing.assert_frame_equal(hospital.admissions(), hospital.admissions())
    for first, second in zip(credit.loans_and_transactions(), credit.loans_and_transactions(), strict=True):
        pd.testing.assert_frame_equal(first, second)
    pd.testing.assert_frame_equal(insurer.claims(), insurer.claims())
    # The seed is what makes them so: another seed gives other data.
    assert not hospital.admissions(seed=1).equals(hospital.admissions())
    assert not credit.loans_and_transactions(seed=1)[0].equals(credit.loans_and_transactions()[0])


def test_the_data_has_the_groups_the_notebooks_explain() -> None:
    hospital = _module(EXAMPLES / "hospital" / "hospital_data.py")
    credit = _module(EXAMPLES / "credit" / "credit_data.py")
    insurer = _module(EXAMPLES / "two_owners" / "insurer_data.py")
    patients = hospital.admissions()
    assert patients["patient_id"].is_unique and len(patients) == hospital.PATIENTS
    assert (patients["diagnosis"] == hospital.RARE_DIAGNOSIS).sum() == 7  # below the hospital's 10
    private = set(patients.loc[patients["ward"] == "private", "patient_id"])
    claims = insurer.claims()
    platinum = set(claims.loc[claims["plan"] == "platinum", "patient_id"])
    assert len(private) == 15 and platinum == private  # enough for the hospital (10), not the insurer (25)
    assert set(claims["patient_id"]) <= set(patients["patient_id"])
    loans, transactions = credit.loans_and_transactions()
    assert (loans["income"] > credit.HIGH_INCOME).sum() == credit.HIGH_EARNERS < 20
    assert set(transactions["customer_id"]) <= set(loans["customer_id"])
    assert 0.1 < loans["defaulted"].mean() < 0.4 and 0.1 < patients["readmitted_30d"].mean() < 0.4


# -- the owner scripts ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", OWNER_SCRIPTS, ids=[path.name for path in OWNER_SCRIPTS])
def test_owner_script_help(script: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage:")
    for option in ("--dir", "--data", "--port", "--no-serve"):
        assert option in run.stdout


def test_three_owner_scripts_exist() -> None:
    assert [path.name for path in OWNER_SCRIPTS] == ["bank_owner.py", "hospital_owner.py", "insurer_owner.py"]


@pytest.mark.slow
def test_an_owner_script_encrypts_and_serves(tmp_path: Path, simulated_tee_dir: Path) -> None:
    """Standalone, as the script's docstring says: a signed dataset, then the broker until Ctrl-C."""
    from confnb.broker.store import load_owner_public_key
    from confnb.datasets.manifest import verify_dataset

    script = EXAMPLES / "hospital" / "hospital_owner.py"
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, str(script), "--dir", "owner", "--data", "datasets", "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not _answers(f"http://127.0.0.1:{port}/openapi.json"):
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "the broker did not answer"
            time.sleep(0.2)
        for dataset_id in ("admissions", "admissions_dp"):
            verified = verify_dataset(
                tmp_path / "datasets" / dataset_id,
                load_owner_public_key(tmp_path / "owner" / "owner.pub"),
                dataset_id=dataset_id,
            )
            assert verified.manifest.files[0].rows == 4000
        assert "allow_simulated = true" in (tmp_path / "owner" / "attestation.toml").read_text()
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output
    assert not _answers(f"http://127.0.0.1:{port}/openapi.json")


def test_the_hospital_registers_the_same_admissions_exact_and_under_differential_privacy(
    tmp_path: Path, simulated_tee_dir: Path
) -> None:
    from confnb.datasets.manifest import verify_dataset
    from confnb.policy.output import OutputPolicy

    owner = _module(EXAMPLES / "hospital" / "hospital_owner.py")
    store = owner.prepare(tmp_path / "owner", tmp_path / "datasets")
    assert store.dataset_ids() == ["admissions", "admissions_dp"]
    exact, private = store.dataset("admissions"), store.dataset("admissions_dp")
    assert "privacy" not in exact.output_policy  # the exact policy signed as before the [privacy] table existed
    assert private.output_policy["privacy"] == {
        "mode": "dp",
        "epsilon": 3.0,
        "delta": 1e-07,
        "max_contributions": 1,
        "unit": "patient_id",
        "public": ["row_count"],
        "bounds": {"age": [0.0, 120.0], "length_of_stay": [0.0, 45.0], "readmitted_30d": [0.0, 1.0]},
        "keys": {"diagnosis": ["E11", "I50", "J44", "N18", "S72"], "sex": ["F", "M"]},
    }
    # Each dataset's signed manifest names its own policy; the rows are the same.
    for dataset_id, policy in (("admissions", owner.POLICY), ("admissions_dp", owner.DP_POLICY)):
        verified = verify_dataset(tmp_path / "datasets" / dataset_id, store.owner_public_key, dataset_id=dataset_id)
        assert verified.manifest.output_policy_digest == OutputPolicy.load(policy).digest()
        assert verified.manifest.files[0].rows == 4000
    # The bounds and keys are facts about the synthetic data's domain: every value lies inside the public bounds,
    # and the public diagnoses are the common ones (the 7 cystic fibrosis patients are in no public group).
    frame = _module(EXAMPLES / "hospital" / "hospital_data.py").admissions()
    for column, (low, high) in private.output_policy["privacy"]["bounds"].items():
        assert low <= frame[column].min() and frame[column].max() <= high, column
    keys = private.output_policy["privacy"]["keys"]
    assert set(frame["diagnosis"]) - set(keys["diagnosis"]) == {"E84"} and set(frame["sex"]) == set(keys["sex"])


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except urllib.error.HTTPError as answer:  # an answer, but not yet the one awaited: its connection is closed here
        answer.close()
        return False
    except OSError:
        return False


# -- the notebooks ----------------------------------------------------------------------------------------------


def test_four_notebooks_exist() -> None:
    assert [path.name for path in NOTEBOOKS] == [
        "credit.ipynb",
        "hospital.ipynb",
        "hospital_dp.ipynb",
        "two_owners.ipynb",
    ]


def test_the_dp_notebook_spends_less_than_half_the_budget_and_attacks_a_real_patient() -> None:
    """Its releases and its model fit the owner's budget with room to spare (a reader can run it twice), the budget
    cell expects exactly what the attack's releases spent, and the patient of the differencing attack has the stay
    it states."""
    from confnb.policy.output import OutputPolicy

    notebook = nbformat.read(EXAMPLES / "hospital" / "hospital_dp.ipynb", as_version=4)  # type: ignore[no-untyped-call]
    source = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    released = sum(float(value) for value in re.findall(r"\.release\(epsilon=([0-9.]+)\)", source))
    fitted = sum(float(value) for value in re.findall(r"cn\.fit\(\w+\(epsilon=([0-9.]+)\)", source))
    refused = [float(value) for value in re.findall(r"epsilon=([0-9.]+)\)", _refusing_cells(notebook))]
    released -= sum(refused)  # a refused release spends nothing
    spent = released + fitted
    privacy = OutputPolicy.load(EXAMPLES / "hospital" / "policy_dp.toml").privacy
    assert privacy is not None and privacy.epsilon == 3.0
    assert released == pytest.approx(1.0) and fitted == pytest.approx(0.3) and 2 * spent <= privacy.epsilon
    assert refused == [2.5] and privacy.epsilon - spent < 2.5 < privacy.epsilon  # refused by the broker, not the vault
    after = [
        cell for cell in notebook.cells if "'epsilon_spent': 1.0" in cell.metadata.get("confnb", {}).get("expect", [])
    ]
    assert len(after) == 1
    target = re.search(r"TARGET, TARGET_STAY = (\d+), (\d+)", source)
    assert target is not None
    patients = _module(EXAMPLES / "hospital" / "hospital_data.py").admissions().set_index("patient_id")
    assert patients.loc[int(target.group(1)), "length_of_stay"] == int(target.group(2))


def _refusing_cells(notebook: nbformat.NotebookNode) -> str:
    return "\n".join(cell.source for cell in notebook.cells if REFUSED_TAG in cell.metadata.get("tags", []))


def test_the_demo_counts_a_privacy_refusal_as_a_refused_leak() -> None:
    """A refusal under differential privacy names a privacy rule; a cell that shows no rule still fails."""
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

    from confnb.demo.notebooks import check

    def executed(text: str) -> Any:
        output = new_output("stream", name="stdout", text=text)  # type: ignore[no-untyped-call]
        cell = new_code_cell("...", outputs=[output])  # type: ignore[no-untyped-call]
        cell.metadata["tags"] = [REFUSED_TAG]
        return new_notebook(cells=[new_markdown_cell("# title"), cell])  # type: ignore[no-untyped-call]

    refusal = "PolicyViolation: release: only with differential privacy [rule privacy.mode of 'admissions_dp']\n"
    outcome = check(executed(refusal), "dp.ipynb")
    assert outcome.ok and outcome.refused_leaks == 1, outcome.problems
    outcome = check(executed("PolicyViolation: release: only with differential privacy\n"), "dp.ipynb")
    assert not outcome.ok and "should show a refused leak" in outcome.problems[0]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebooks_are_committed_clean_and_on_the_confidential_kernel(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)  # type: ignore[no-untyped-call]
    nbformat.validate(notebook)
    assert notebook.metadata["kernelspec"]["name"] == KERNEL_NAME
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code), "commit notebooks without outputs"
    refused = [cell for cell in code if REFUSED_TAG in cell.metadata.get("tags", [])]
    assert refused, "each notebook shows at least one refused leak"
    for cell in refused:
        if "raises-exception" in cell.metadata.get("tags", []):
            assert cell is code[-1], "only the last code cell may stop 'Run All' with its refusal"
        else:
            assert "except cn.PolicyViolation" in cell.source  # the notebook runs on past the refusal
    assert notebook.cells[0].cell_type == "markdown" and notebook.cells[0].source.startswith("# ")


# -- the headless demo -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_headless_demo_runs_every_notebook(tmp_path: Path, simulated_tee_dir: Path) -> None:
    """``confnb demo --headless``: real brokers, real kernels, every notebook executed and checked."""
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "confnb", "demo", "--headless", "--json", "--dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert run.returncode == 0, run.stdout + run.stderr[-6000:]
    report = json.loads(run.stdout)  # stdout is the summary alone
    assert report["ok"] is True
    assert len(report["attestation"]) == 10 and all(check["ok"] for check in report["attestation"])
    assert [entry["notebook"] for entry in report["notebooks"]] == [
        "hospital.ipynb",
        "hospital_dp.ipynb",
        "credit.ipynb",
        "two_owners.ipynb",
    ]
    for entry in report["notebooks"]:
        assert entry["ok"] and entry["problems"] == [], entry
        assert entry["refused_leaks"] >= 1
    # The walkthrough's checks stay in the headless run's human output, and each notebook has its line.
    assert run.stderr.count("  ok  ") == 10 and "UNEXPECTED" not in run.stderr
    passed = re.findall(r"^  pass  (\S+\.ipynb): ", run.stderr, re.MULTILINE)
    assert sorted(passed) == [path.name for path in NOTEBOOKS] and "4 of 4 notebooks passed" in run.stderr
    executed = nbformat.read(tmp_path / "demo" / "executed" / "two_owners.ipynb", as_version=4)  # type: ignore[no-untyped-call]
    shown = "".join(
        output.get("text", "") for cell in executed.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert "[rule release.min_group_size of 'claims']" in shown
    # The hospital's last cell leaves its refusal uncaught: under redacted tracebacks the real kernel's error keeps
    # the cell line and the rule, and nothing else of the vault's message.
    hospital = nbformat.read(tmp_path / "demo" / "executed" / "hospital.ipynb", as_version=4)  # type: ignore[no-untyped-call]
    (error,) = [output for output in hospital.cells[-1].outputs if output.output_type == "error"]
    assert (error.ename, error.evalue) == ("PolicyViolation", "[rule release.min_group_size of 'admissions']")
    assert error.traceback == [
        "PolicyViolation at line 1 of the cell: withheld by the data owner's output policy "
        "[rule release.min_group_size of 'admissions'] (details withheld by the display policy)"
    ]
    _check_the_dp_notebook(nbformat.read(tmp_path / "demo" / "executed" / "hospital_dp.ipynb", as_version=4))  # type: ignore[no-untyped-call]
    assert elapsed < 240, f"the headless demo took {elapsed:.0f} s"


def _check_the_dp_notebook(executed: nbformat.NotebookNode) -> None:
    """The noisy numbers the DP notebook showed, against the secret: near it where they are statistics, far from
    it where they are an attack on one patient."""
    from confnb.demo.notebooks import cell_text

    shown = {cell.id: cell_text(cell) for cell in executed.cells if cell.cell_type == "code"}
    frame = _module(EXAMPLES / "hospital" / "hospital_data.py").admissions()
    truth = frame.groupby("diagnosis")[["length_of_stay", "readmitted_30d"]].mean()
    (intervals,) = [text for text in shown.values() if "mean_stay ±95%" in text]
    rows = re.findall(r"^(E11|I50|J44|N18|S72)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$", intervals, re.MULTILINE)
    assert [row[0] for row in rows] == ["E11", "I50", "J44", "N18", "S72"], intervals
    for code, stay, stay_width, readmitted, readmitted_width in rows:
        # 95% intervals: three of them wide makes a miss a one-in-many-thousands event, not a flaky test.
        assert abs(float(stay) - truth.loc[code, "length_of_stay"]) <= 3 * float(stay_width), (code, intervals)
        assert abs(float(readmitted) - truth.loc[code, "readmitted_30d"]) <= 3 * float(readmitted_width), code
        assert float(stay_width) > 0 and float(readmitted_width) > 0
    (attack,) = [text for text in shown.values() if "sum(all) - sum(all but one) = " in text]
    found = re.search(r"= ([+-]\d+) days \(the patient's stay: (\d+) days\)", attack)
    width = re.search(r"within ±(\d+) days", attack)
    assert found is not None and width is not None, attack
    stay = int(frame.loc[frame["patient_id"] == 100042, "length_of_stay"].iloc[0])
    assert int(found.group(2)) == stay
    assert int(found.group(1)) != stay  # the noisy difference is not the patient's value
    assert int(width.group(1)) > 20 * stay  # and its noise is far larger than any stay within the public bounds
