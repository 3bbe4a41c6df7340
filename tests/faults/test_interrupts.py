"""An interrupted cell stops its vault work, and the next cell gets the right answer, at once.

Each test runs analyst code in a real ``confnb-snp`` kernel on the clinic's encrypted patients, interrupts it while
the vault computes it (a fit: in its worker process, still running; a query: in Polars' threads, the vault busy),
and then checks, against pandas on the same plaintext outside the kernel:

* the interrupted cell ends promptly with ``KeyboardInterrupt``, and the vault's worker is gone or the vault idle;
* the following cells answer correctly, each its own question (the wrong answers this guards against were off by
  one: a count returning the previous cell's mean), within seconds rather than after the abandoned work;
* the kernel's audit log records the interrupted request as cancelled, and releases nothing for it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd
import pytest
from confidential_fixtures import ConfidentialWorld

pytestmark = pytest.mark.slow

# Seconds within which a cell ends after its interrupt, and the next cell answers. The interrupted computations run
# far longer than this uninterrupted (the fit: minutes), so a vault still busy with one cannot pass.
PROMPT_S = 8.0
LONG_FIT = (
    "model = cn.fit(RandomForestClassifier(n_estimators=20000, random_state=0), t, target='readmitted',"
    " features=['age', 'cost'])"
)
# Every patient paired with every patient (four million rows), grouped with many order statistics (the most a
# release may hold: 10 per column): seconds of Polars work, cancelled inside Polars between its operators.
_ORDER_STATISTICS = ", ".join(
    f"q{i}_{column.replace('_', '')}=('{column}', 'quantile', {i / 11:.3f})"
    for i in range(1, 11)
    for column in ("cost_y", "age_y")
)
LONG_JOIN = (
    "pairs = t.assign(k=t['sex'] == t['sex']).join("
    "t.select(['sex', 'cost', 'diagnosis', 'age']).assign(k=t['sex'] == t['sex']), on='k')\n"
    f"by_zip = pairs.group_by(['zip', 'diagnosis_y']).agg({_ORDER_STATISTICS}).release()"
)
# A fit on a join: the join (about two million rows) is evaluated by the vault first, then trained in its worker.
LONG_FIT_ON_JOIN = (
    "pairs = t.join(t.select(['sex', 'cost']).rename({'cost': 'cost_of_peer'}), on='sex')\n"
    "model = cn.fit(RandomForestClassifier(n_estimators=20000, random_state=0), pairs, target='readmitted',"
    " features=['age', 'cost_of_peer'])"
)
CHECKS = (
    "import json\n"
    "print(json.dumps({'mean_age': t['age'].mean().release(), 'count': int(t['age'].count().release()),"
    " 'mean_cost': t['cost'].mean().release(),"
    " 'by_sex': t.group_by('sex').agg(n=('age', 'count'), mean_cost=('cost', 'mean')).release().to_dict()}))"
)


def _expected(world: ConfidentialWorld) -> dict[str, Any]:
    patients: pd.DataFrame = world.frames["patients"]
    by_sex = patients.groupby("sex").agg(n=("age", "count"), mean_cost=("cost", "mean"))
    return {
        "mean_age": float(patients["age"].mean()),
        "count": len(patients),
        "mean_cost": float(patients["cost"].mean()),
        "by_sex": {column: {str(k): float(v) for k, v in by_sex[column].items()} for column in by_sex},
    }


def _assert_right_answers(kernel: Any, world: ConfidentialWorld) -> None:
    """The next cell answers each of its questions with that question's plaintext answer, within seconds."""
    cell = kernel.run(CHECKS)
    print(f"the next cell answered in {cell.seconds:.2f} s")  # shown with -rP: the figures behind the bound
    assert cell.status == "ok", cell.reply["content"]
    assert cell.seconds < PROMPT_S, f"the cell after the interrupt took {cell.seconds:.1f} s"
    got = json.loads(cell.stdout)
    expected = _expected(world)
    assert math.isclose(got["mean_age"], expected["mean_age"], rel_tol=1e-12), got
    assert got["count"] == expected["count"], got
    assert math.isclose(got["mean_cost"], expected["mean_cost"], rel_tol=1e-12), got
    for column, values in expected["by_sex"].items():
        for key, value in values.items():
            assert math.isclose(float(got["by_sex"][column][key]), value, rel_tol=1e-12), (column, key, got)


def _assert_interrupted(kernel: Any, cell: Any, worker: int | None = None) -> None:
    print(f"the interrupted cell ended {cell.seconds:.2f} s after the interrupt")
    assert cell.status == "error"
    assert cell.error[0] == "KeyboardInterrupt", cell.error
    assert cell.seconds < PROMPT_S, f"the interrupted cell took {cell.seconds:.1f} s to end"
    if worker is not None:
        kernel.wait_gone(worker, PROMPT_S)  # the vault killed the computation, it did not let it run on
    else:  # Polars stopped the query: the vault is idle again, not still computing the abandoned release
        kernel.wait_idle(PROMPT_S)


def test_an_interrupted_fit_stops_and_the_next_cell_is_right(shared_kernel: Any, confidential_world: Any) -> None:
    before = shared_kernel.audit_events()
    cell, worker = shared_kernel.interrupt_during(LONG_FIT)
    _assert_interrupted(shared_kernel, cell, worker)
    _assert_right_answers(shared_kernel, confidential_world)
    new = shared_kernel.audit_events()[len(before) :]
    assert ("cancelled", "fit") in new
    assert not [event for event in new if event[0] == "fit"], new  # no model was made
    assert not shared_kernel.workers()


def test_an_interrupted_join_and_group_by_stops_and_the_next_cell_is_right(
    shared_kernel: Any, confidential_world: Any
) -> None:
    before = shared_kernel.audit_events()
    cell = shared_kernel.interrupt_while_busy(LONG_JOIN, settle=0.3)
    _assert_interrupted(shared_kernel, cell)
    _assert_right_answers(shared_kernel, confidential_world)
    new = shared_kernel.audit_events()[len(before) :]
    assert ("cancelled", "release") in new
    assert not shared_kernel.workers()


def test_an_interrupted_fit_on_a_join_stops_while_joining(shared_kernel: Any, confidential_world: Any) -> None:
    before = shared_kernel.audit_events()
    cell, worker = shared_kernel.interrupt_during(LONG_FIT_ON_JOIN, settle=0.2)
    _assert_interrupted(shared_kernel, cell, worker)
    _assert_right_answers(shared_kernel, confidential_world)
    assert ("cancelled", "fit") in shared_kernel.audit_events()[len(before) :]


def test_three_interrupts_in_a_row_then_the_right_answers(shared_kernel: Any, confidential_world: Any) -> None:
    for code in (LONG_FIT, LONG_JOIN, LONG_FIT):
        if code == LONG_JOIN:
            _assert_interrupted(shared_kernel, shared_kernel.interrupt_while_busy(code, settle=0.3))
        else:
            cell, worker = shared_kernel.interrupt_during(code, settle=0.3)
            _assert_interrupted(shared_kernel, cell, worker)
    _assert_right_answers(shared_kernel, confidential_world)
    _assert_right_answers(shared_kernel, confidential_world)  # and the one after: nothing left in the stream
    assert not shared_kernel.workers()


def test_the_same_work_uninterrupted_completes(shared_kernel: Any, confidential_world: Any) -> None:
    """The legitimate twin: a fit and a join that nobody interrupts give their results (the worker's way back)."""
    cell = shared_kernel.run(
        "m = cn.fit(RandomForestClassifier(n_estimators=20, random_state=0), t, target='readmitted',"
        " features=['age', 'cost'], test_size=0.25, random_state=0)\n"
        "print(json.dumps({'metrics': m.metrics(), 'n': int(t.join(t.select(['sex', 'age']), on='sex')"
        "['age_y'].count().release())}))"
    )
    assert cell.status == "ok", cell.reply["content"]
    got = json.loads(cell.stdout)
    patients = confidential_world.frames["patients"]
    assert got["n"] == int((patients["sex"].value_counts() ** 2).sum())
    assert 0.5 < got["metrics"]["accuracy"] <= 1.0
    # A model trained on a join comes back from the worker whole: its parameters match scikit-learn's on the
    # plaintext (the one-to-one join on the id repeats each patient's own cost).
    cell = shared_kernel.run(
        "from sklearn.linear_model import LogisticRegression\n"
        "own = t.join(t.select(['patient_id', 'cost']).rename({'cost': 'cost_again'}), on='patient_id')\n"
        "m = cn.fit(LogisticRegression(max_iter=1000), own, target='readmitted', features=['age', 'cost_again'])\n"
        "print(json.dumps(m.params()))"
    )
    assert cell.status == "ok", cell.reply["content"]
    from sklearn.linear_model import LogisticRegression

    plain = LogisticRegression(max_iter=1000).fit(patients[["age", "cost"]].to_numpy(), patients["readmitted"])
    params = json.loads(cell.stdout)
    assert math.isclose(params["intercept_"], float(plain.intercept_[0]), rel_tol=1e-6), params
    assert not shared_kernel.workers()
