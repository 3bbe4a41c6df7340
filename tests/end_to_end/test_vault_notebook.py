"""Acceptance: a notebook on encrypted data, end to end, on the simulated TEE with the owners' real brokers.

The notebook is built with nbformat and executed by nbclient on the ``confnb-snp`` kernel, as Jupyter would run it:
it opens two owners' encrypted datasets (the kernel's vault attests to each owner's broker for the key), describes
and aggregates them, trains a ``LogisticRegression`` in the vault, releases its metrics and parameters, has one
release refused with the rule named in the cell's output, and exports a result with a receipt signed by the kernel.

Then, from outside the kernel, the test checks that

* released values are what pandas and scikit-learn compute on the plaintext;
* ``confnb receipt verify --allow-simulated`` accepts the export (exit 0), and the receipt covers exactly the
  exported bytes and names the kernel that was attested at launch;
* the kernel's audit log (``cn.audit()``) verifies against the signing key from the kernel's verified evidence
  (never from the log), and records every release, the refusal with its rule, and the export;
* each owner's broker log verifies, and the two sides agree on the keys: every kernel ``open`` entry's
  (dataset, key id, nonce, evidence) is a broker ``release`` entry, and every broker release is in the kernel log.

The owners and brokers are this module's own, so every release in their logs belongs to this notebook's kernel.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import subprocess
import sys
from ast import literal_eval
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import numpy as np
import pandas as pd
import pytest
from confidential_fixtures import ConfidentialWorld, build_world
from nbclient import NotebookClient

from confnb.broker.audit import verify_log
from kernel_enclave.vault.audit import verify_kernel_log

pytestmark = pytest.mark.slow  # one scenario: the notebook, two brokers and a kernel take about 20 s together

CELLS = [
    # 0: open two owners' datasets; the handles show schema and policy, never rows
    "import os\n"
    "import confnb as cn\n"
    "from sklearn.linear_model import LogisticRegression\n"
    't = cn.open("patients")\n'
    'claims = cn.open("claims", broker=os.environ["INSURER_BROKER"])\n'
    "t",
    # 1: describe
    'description = t.describe(["age"]).release()\ndescription',
    # 2: a group-by aggregate
    'by_sex = t.group_by("sex").agg(patients=("age", "count"), mean_cost=("cost", "mean"),'
    ' readmission=("readmitted", "mean")).release()\n'
    "by_sex",
    # 3: a join across the two owners, aggregated
    'by_tier = t.join(claims, on="patient_id").group_by("tier").agg(claims=("amount", "count"),'
    ' mean_age=("age", "mean")).release()\n'
    "by_tier",
    # 4: train in the vault
    'model = cn.fit(LogisticRegression(max_iter=500), t, target="readmitted", features=["age", "cost"],'
    " test_size=0.25, random_state=0)\n"
    "model",
    # 5: metrics and parameters
    "metrics = model.metrics()\nparams = model.params()\nprint(metrics)\nprint(params)",
    # 6: a release the clinic's policy refuses (three patients share this zip code)
    't[t["zip"] == "Z-20001"]["cost"].mean().release()',
    # 7: export with a receipt, and the kernel's audit log
    'bundle = cn.export(by_sex, os.path.expanduser("~/by_sex.csv"))\n'
    'log = os.path.expanduser("~/kernel-audit.jsonl")\n'
    "entries = cn.audit(log)\n"
    'print(f"BUNDLE {bundle}")\n'
    'print(f"AUDIT {log} {len(entries)}")',
]
REFUSED_CELL = 6


@dataclass
class Run:
    """The executed notebook and what the test copied out of the kernel before it stopped."""

    world: ConfidentialWorld
    notebook: Any
    evidence_claims: dict[str, str]
    bundle: bytes
    bundle_path: Path
    audit_entries: list[dict[str, Any]]
    receipt_cli: subprocess.CompletedProcess[str]


def _stdout(cell: Any) -> str:
    return "".join(output.get("text", "") for output in cell.outputs if output.output_type == "stream")


def _plain(cell: Any) -> str:
    for output in cell.outputs:
        if output.output_type == "execute_result":
            return str(output.data.get("text/plain", ""))
    return ""


@pytest.fixture(scope="module")
def run(confnb_kernel_env: Path, tmp_path_factory: pytest.TempPathFactory, simulated_tee_dir: Path) -> Iterator[Run]:
    with build_world(tmp_path_factory.mktemp("e2e-world")) as world:
        notebook = nbformat.v4.new_notebook()
        notebook.cells = [nbformat.v4.new_code_cell(source) for source in CELLS]
        notebook.cells[REFUSED_CELL].metadata["tags"] = ["raises-exception"]
        client = NotebookClient(notebook, kernel_name="confnb-snp", timeout=180, allow_errors=False)
        env = {**world.kernel_env(), "INSURER_BROKER": world.insurer.broker_url}
        with client.setup_kernel(env=env):
            for index, cell in enumerate(notebook.cells):
                client.execute_cell(cell, index)
            provisioner = client.km.provisioner
            claims = dict(provisioner.evidence.claims)  # type: ignore[union-attr]
            exported = _stdout(notebook.cells[-1])
            bundle_path = Path(exported.split("BUNDLE ", 1)[1].split()[0])
            audit_path = Path(exported.split("AUDIT ", 1)[1].split()[0])
            # The files live in the executor's private directory, which goes with the kernel: copy them now.
            bundle = bundle_path.read_bytes()
            audit_entries = [json.loads(line) for line in audit_path.read_text().splitlines() if line.strip()]
            copy = tmp_path_factory.mktemp("export") / "by_sex.csv"
            copy.write_bytes(bundle)
            receipt = subprocess.run(
                [sys.executable, "-m", "confnb", "receipt", "verify", str(copy), "--allow-simulated", "--json"],
                capture_output=True,
                text=True,
                check=False,
                timeout=120,
            )
        nbformat.write(notebook, tmp_path_factory.mktemp("notebook") / "executed.ipynb")
        yield Run(world, notebook, claims, bundle, copy, audit_entries, receipt)


def _train_test(frame: pd.DataFrame) -> tuple[Any, Any, Any, Any]:
    from sklearn.model_selection import train_test_split

    x = frame[["age", "cost"]].to_numpy(dtype=np.float64)
    y = frame["readmitted"].to_numpy()
    train, test = train_test_split(np.arange(len(frame)), test_size=0.25, random_state=0)
    return x[train], y[train], x[test], y[test]


# -- the notebook's results --------------------------------------------------------------------------------------


def test_every_cell_ran_and_the_handle_shows_no_rows(run: Run) -> None:
    cells = run.notebook.cells
    assert all(cell.execution_count is not None for cell in cells)
    shown = _plain(cells[0])
    assert "SealedTable over 'patients'" in shown and "min_group_size 10" in shown
    assert "Z-100" not in shown and "CANARY" not in shown


def test_released_aggregates_match_pandas_on_the_plaintext(run: Run) -> None:
    patients = run.world.frames["patients"]
    expected = patients.groupby("sex").agg(
        patients=("age", "count"), mean_cost=("cost", "mean"), readmission=("readmitted", "mean")
    )
    shown = _plain(run.notebook.cells[2])
    for sex, row in expected.iterrows():
        line = next(line for line in shown.splitlines() if line.startswith(str(sex)))
        values = [float(value) for value in line.split()[1:]]
        assert values == pytest.approx([row["patients"], row["mean_cost"], row["readmission"]], rel=1e-5)
    described = _plain(run.notebook.cells[1])
    assert f"{patients['age'].mean():.6f}" in described


def test_the_cross_owner_join_suppresses_the_second_owners_small_group(run: Run) -> None:
    shown = _plain(run.notebook.cells[3])
    assert {"bronze", "gold", "silver"} <= set(shown.split())
    assert "platinum" not in shown  # 15 members: fewer than the insurer's 25


def test_metrics_and_parameters_match_scikit_learn_on_the_same_split(run: Run) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score

    x_train, y_train, x_test, y_test = _train_test(run.world.frames["patients"])
    reference = LogisticRegression(max_iter=500).fit(x_train, y_train)
    printed = _stdout(run.notebook.cells[5]).splitlines()
    metrics, params = (literal_eval(line) for line in printed[:2])
    assert (metrics["n_train"], metrics["n_test"]) == (1500, 500)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y_test, reference.predict(x_test)))
    assert params["coef_"]["age"] == pytest.approx(reference.coef_[0][0], rel=1e-4)
    assert params["coef_"]["cost"] == pytest.approx(reference.coef_[0][1], rel=1e-4)
    assert params["intercept_"] == pytest.approx(reference.intercept_[0], rel=1e-4)


def test_the_refused_release_names_its_rule_and_dataset(run: Run) -> None:
    errors = [output for output in run.notebook.cells[REFUSED_CELL].outputs if output.output_type == "error"]
    assert len(errors) == 1
    assert errors[0].ename == "PolicyViolation"
    assert "release.min_group_size" in errors[0].evalue and "'patients'" in errors[0].evalue


# -- the export and its receipt ------------------------------------------------------------------------------------


def test_the_receipt_verifies_with_the_cli(run: Run) -> None:
    assert run.receipt_cli.returncode == 0, run.receipt_cli.stdout + run.receipt_cli.stderr
    report = json.loads(run.receipt_cli.stdout)
    assert report["verified"] is True and report["simulated"] is True


def test_the_receipt_covers_the_released_bytes_and_names_the_attested_kernel(run: Run) -> None:
    bundle = json.loads(run.bundle)
    payload = base64.b64decode(bundle["payload"])
    receipt = bundle["receipt"]
    assert receipt["result_digest"] == "sha256:" + hashlib.sha256(payload).hexdigest()
    assert receipt["datasets"] == ["patients"] and receipt["policy_id"] == "clinic-patients-v1"
    exported = pd.read_csv(io.BytesIO(payload)).set_index("sex")
    expected = run.world.frames["patients"].groupby("sex")["age"].count()
    assert exported["patients"].to_dict() == expected.to_dict()
    # The receipt's evidence carries the same signing key the kernel proved at launch.
    assert bundle["evidence"]["claims"]["signing_public_key"] == run.evidence_claims["signing_public_key"]


def test_a_changed_export_fails_the_cli(run: Run, tmp_path: Path) -> None:
    bundle = json.loads(run.bundle)
    payload = bytearray(base64.b64decode(bundle["payload"]))
    payload[-3] ^= 0x01  # one digit of one released mean
    bundle["payload"] = base64.b64encode(bytes(payload)).decode()
    changed = tmp_path / "changed.csv"
    changed.write_text(json.dumps(bundle))
    result = subprocess.run(
        [sys.executable, "-m", "confnb", "receipt", "verify", str(changed), "--allow-simulated"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr


# -- the audit logs ------------------------------------------------------------------------------------------------


def _kernel_key(run: Run) -> bytes:
    return base64.b64decode(run.evidence_claims["signing_public_key"])


def test_the_kernel_audit_log_verifies_with_the_attested_key(run: Run) -> None:
    verification = verify_kernel_log(run.audit_entries, _kernel_key(run))
    assert verification.ok, verification.problems
    assert verification.entries == len(run.audit_entries)
    tampered = json.loads(json.dumps(run.audit_entries))
    tampered[1]["fields"]["dataset"] = "someone-else"
    assert not verify_kernel_log(tampered, _kernel_key(run)).ok  # the check can fail


def test_the_kernel_log_records_releases_the_refusal_and_the_export(run: Run) -> None:
    events = [(entry["event"], entry["fields"]) for entry in run.audit_entries]
    kinds = [fields.get("kind") for event, fields in events if event == "release"]
    assert {"aggregate", "model_metrics", "model_parameters"} <= set(kinds)
    refusals = [fields for event, fields in events if event == "refusal"]
    assert [(r["rule"], r["datasets"]) for r in refusals] == [("release.min_group_size", ["patients"])]
    exports = [fields for event, fields in events if event == "export"]
    receipt = json.loads(run.bundle)["receipt"]
    assert [e["digest"] for e in exports] == [receipt["result_digest"]]
    fits = [fields for event, fields in events if event == "fit"]
    assert [(f["estimator"], f["n_train"], f["n_test"]) for f in fits] == [("LogisticRegression", 1500, 500)]


def test_each_brokers_log_verifies(run: Run) -> None:
    for owner in (run.world.clinic, run.world.insurer):
        verification = verify_log(owner.audit_path, owner.store.owner_public_key)
        assert verification.ok, (owner.name, verification.problems)


def test_broker_and_kernel_logs_agree_on_every_key_release(run: Run) -> None:
    opened = {
        (fields["dataset"], fields["key_id"], fields["nonce"], fields["evidence"])
        for event, fields in ((entry["event"], entry["fields"]) for entry in run.audit_entries)
        if event == "open"
    }
    released = set()
    for owner in (run.world.clinic, run.world.insurer):
        for entry in verify_log(owner.audit_path, owner.store.owner_public_key).entries:
            if str(entry.kind) == "release":
                detail = entry.detail
                released.add((entry.dataset_id, detail["key_id"], detail["nonce"], detail["evidence"]))
    assert {dataset for dataset, *_ in opened} == {"patients", "claims"}
    assert opened == released
