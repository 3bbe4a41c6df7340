"""Differentially private models in the vault: decided and priced before any row is read, trained on rows each
person contributes at most ``max_contributions`` of, clipped to the owner's bounds, and total (no data makes a fit
fail or succeed). The broker's charge is tested end to end in ``tests/red_team/test_dp_mode.py``; here the fit
itself, on real tables, its numbers checked against the data."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pytest

from kernel_enclave.vault import dp_models
from kernel_enclave.vault.plan import SourceTable
from kernel_enclave.vault.protocol import PolicyViolation, VaultError

DATASET = "visits"


def privacy(**changes: Any) -> dict[str, Any]:
    rules: dict[str, Any] = {
        "mode": "dp",
        "epsilon": 100.0,
        "delta": 1e-6,
        "unit": "person",
        "max_contributions": 1,
        "bounds": {"x": [0.0, 100.0], "y": [0.0, 1000.0]},
        "keys": {"kind": ["a", "b"]},
    }
    return {**rules, **changes}


def estimator(name: str, **params: Any) -> dict[str, Any]:
    return {"class": f"diffprivlib.models.{name}", "params": params}


@pytest.fixture
def sources() -> dict[str, SourceTable]:
    """100 people with x = 0 and one person with 1,000 rows of x = 100; y = 10 x; kind by parity."""
    people = np.concatenate([np.arange(100), np.full(1000, 999)])
    x = np.where(people == 999, 100.0, 0.0)
    table = pa.table(
        {
            "person": people,
            "x": x,
            "y": 10 * x,
            "kind": np.where(people % 2 == 0, "a", "b"),
            "wide": x * 1e9,
        }
    )
    return {"d1": SourceTable.from_dataset(DATASET, table)}


SOURCE = {"node": "source", "handle": "d1"}


def fit(
    sources: dict[str, SourceTable],
    spec: dict[str, Any],
    target: str | None,
    features: list[str],
    tree: dict[str, Any] = SOURCE,
    **policy: Any,
) -> dp_models.PreparedDpFit:
    return dp_models.prepare(tree, sources, spec, target, features, privacy(**policy), DATASET)


def test_the_price_is_epsilon_times_the_contributions_and_is_known_before_any_row_is_read(
    sources: dict[str, SourceTable],
) -> None:
    prepared = fit(sources, estimator("StandardScaler", epsilon=2.0), None, ["x"], max_contributions=3)
    assert prepared.epsilon == pytest.approx(6.0) and prepared.datasets == (DATASET,)
    assert prepared.plan_digest.startswith("sha256:")
    assert (
        fit(sources, estimator("StandardScaler", epsilon=2.0), None, ["x"]).plan_digest
        == fit(sources, estimator("StandardScaler", epsilon=2.0), None, ["x"]).plan_digest
    )
    with pytest.raises(PolicyViolation, match=r"privacy\.budget"):  # more than one request may spend, before running
        fit(sources, estimator("StandardScaler", epsilon=60.0), None, ["x"], max_contributions=2)


def test_each_person_contributes_at_most_max_contributions_rows(sources: dict[str, SourceTable]) -> None:
    """One person holds 1,000 of the 1,100 rows: truncated to one row, the mean of x is about 100/102 (their row,
    the others' zeros and the public centre row), not the 91 the rows give."""
    scaled = fit(sources, estimator("StandardScaler", epsilon=50.0), None, ["x"]).run()
    mean = dp_models.params(scaled)["mean_"]["x"]
    assert mean == pytest.approx(150 / 102, abs=1.0)  # (100 + 50) / 102 rows, give or take the noise
    assert set(dp_models.params(scaled)) == {"estimator", "features", "epsilon", "mean_", "var_", "scale_"}


def test_the_analysts_bounds_narrow_the_owners_and_are_enforced_by_clipping(sources: dict[str, SourceTable]) -> None:
    """Bounds of [0, 10] on x: the one person's 100 counts as 10, the public row sits at 5: mean (10 + 5) / 102.
    Bounds wider than the owner's change nothing: the owner's [0, 100] still clip."""
    narrow = fit(sources, estimator("StandardScaler", epsilon=50.0, bounds=[[0.0], [10.0]]), None, ["x"]).run()
    assert dp_models.params(narrow)["mean_"]["x"] == pytest.approx(15 / 102, abs=0.1)
    wide = fit(sources, estimator("StandardScaler", epsilon=50.0, bounds=[-1e9, 1e9]), None, ["x"]).run()
    assert dp_models.params(wide)["mean_"]["x"] == pytest.approx(150 / 102, abs=1.0)


def test_values_are_clipped_to_the_owners_bounds(sources: dict[str, SourceTable]) -> None:
    renamed = {"node": "assign", "input": SOURCE, "columns": [["x", {"col": "wide"}]]}  # 1e11, clipped to 100
    scaled = fit(sources, estimator("StandardScaler", epsilon=50.0), None, ["x"], tree=renamed).run()
    assert dp_models.params(scaled)["mean_"]["x"] == pytest.approx(150 / 102, abs=1.0)


@pytest.mark.parametrize("predicate", [{"fn": "gt", "args": [{"col": "x"}, {"lit": 1e6}]}, None])
def test_a_fit_is_total_whatever_rows_the_plan_keeps(sources: dict[str, SourceTable], predicate: Any) -> None:
    """No rows at all (the filter matches none), or a class absent: the fit still returns a model, its classes the
    public keys, so success and failure say nothing about the data. The twin keeps every row."""
    tree = SOURCE if predicate is None else {"node": "filter", "input": SOURCE, "predicate": predicate}
    for spec, target in (
        (estimator("LinearRegression", epsilon=5.0), "y"),
        (estimator("LogisticRegression", epsilon=5.0), "kind"),
        (estimator("KMeans", epsilon=5.0, n_clusters=2), None),
        (estimator("PCA", epsilon=5.0, n_components=1), None),
    ):
        features = ["x", "y"] if spec["class"].endswith("PCA") else ["x"]
        model = fit(sources, spec, target, features, tree=tree).run()
        released = dp_models.params(model)
        if target == "kind":
            assert released["classes_"] == ["a", "b"]
        assert all(value is not None for value in released.values())


@pytest.mark.parametrize(
    ("tree", "rule"),
    [
        (
            {"node": "join", "left": SOURCE, "right": SOURCE, "on": ["person"], "how": "inner"},
            "privacy.mode",
        ),
        (
            {
                "node": "assign",
                "input": SOURCE,
                "columns": [["x", {"fn": "over", "args": [{"col": "x"}], "func": "mean", "by": ["kind"]}]],
            },
            "privacy.mode",
        ),
    ],
)
def test_plans_whose_rows_hold_other_records_are_refused(
    sources: dict[str, SourceTable], tree: dict[str, Any], rule: str
) -> None:
    with pytest.raises(PolicyViolation) as refused:
        fit(sources, estimator("StandardScaler", epsilon=1.0), None, ["x"], tree=tree)
    assert refused.value.rule == rule


@pytest.mark.parametrize(
    ("spec", "target", "features", "message"),
    [
        (estimator("LinearRegression", epsilon=1.0, random_state=3), "y", ["x"], "random_state unset"),
        (estimator("LinearRegression", epsilon=1.0, bounds_X=[[200], [300]]), "y", ["x"], "leave no range"),
        (estimator("LinearRegression", epsilon=1.0, bounds_X=[[0, 1], [1, 2]]), "y", ["x"], "1 finite number"),
        (estimator("KMeans", epsilon=1.0, n_clusters=2, bounds=[0]), None, ["x"], "must be \\(low, high\\)"),
        (estimator("LogisticRegression", epsilon=1.0, data_norm=-1.0), "kind", ["x"], "data_norm must be"),
        (estimator("LogisticRegression", epsilon=1.0, verbose=2), "kind", ["x"], "cannot be changed"),
        (estimator("LogisticRegression", epsilon=-1.0), "kind", ["x"], "positive number"),
        (estimator("KMeans", epsilon=1.0, n_clusters=0), None, ["x"], "1..256"),
        (estimator("KMeans", epsilon=1.0, n_clusters=2), "y", ["x"], "does not use a target"),
        (estimator("LinearRegression", epsilon=1.0), None, ["x"], "name its target"),
        (estimator("LinearRegression", epsilon=1.0), "y", ["kind"], "not numeric"),
        (estimator("LinearRegression", epsilon=1.0), "y", ["nowhere"], "no column"),
        (estimator("PCA", epsilon=1.0, n_components=3), None, ["x", "y"], "at most the number of features"),
    ],
)
def test_parameters_are_checked_before_anything_is_charged(
    sources: dict[str, SourceTable], spec: dict[str, Any], target: str | None, features: list[str], message: str
) -> None:
    with pytest.raises(VaultError, match=message):
        fit(sources, spec, target, features)


def test_only_the_offered_estimators_are_built(sources: dict[str, SourceTable]) -> None:
    for name in ("GaussianNB", "RandomForestClassifier"):
        with pytest.raises(PolicyViolation, match="not a differentially private estimator the vault offers"):
            fit(sources, estimator(name, epsilon=1.0), "kind", ["x"])
    with pytest.raises(PolicyViolation, match="not a differentially private"):
        fit(sources, {"class": "sklearn.linear_model.LinearRegression", "params": {}}, "y", ["x"])
    assert set(dp_models.FITTED) == {path.rsplit(".", 1)[1] for path in dp_models.DP_ESTIMATORS}
