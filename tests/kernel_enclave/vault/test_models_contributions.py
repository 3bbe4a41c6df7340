"""Models count the records that determine what they release: complete rows, and in each column the records that
differ from its most common value. Real scikit-learn on real vault tables; every refusal is checked against the
number it would have given away, and every rule has a legitimate twin that is still released with the right value."""

from __future__ import annotations

import io
import json
import math
import zipfile
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pytest
import skops.io as sio  # type: ignore[import-untyped]
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import Lasso, LinearRegression  # type: ignore[import-untyped]
from sklearn.pipeline import Pipeline  # type: ignore[import-untyped]

from confnb.policy.output import RELEASE_KINDS, OutputPolicy
from kernel_enclave.vault.models import (
    FITTED_ATTRIBUTES,
    TrainedModel,
    describe,
    export_refusal,
    fit,
    from_skops,
    load_estimator,
    metrics,
    params,
    predict,
    score,
    to_skops,
)
from kernel_enclave.vault.plan import SourceTable, evaluate
from kernel_enclave.vault.protocol import PolicyViolation, VaultError

K = 10
N = 400


def policy(k: int = K) -> OutputPolicy:
    return OutputPolicy(
        id="stays-v1", allow=frozenset(RELEASE_KINDS), min_group_size=k, never_release=frozenset({"pid"}), max_rows=100
    )


POLICIES = {"stays": policy()}


def stays(n: int = N, seed: int = 7) -> pa.Table:
    """Hospital stays: a cost that depends on age and stay, continuous enough that every value is one record's."""
    rng = np.random.default_rng(seed)
    age = rng.integers(18, 95, n).astype(np.float64)
    stay = np.round(rng.gamma(2.0, 2.5, n) + 0.5, 3)
    cost = 800.0 + 910.0 * stay + 12.0 * age + rng.normal(0, 300, n)
    return pa.table({"pid": np.arange(n, dtype=np.int64), "age": age, "stay": stay, "cost": cost})


def with_columns(table: pa.Table, **columns: Any) -> SourceTable:
    for name, values in columns.items():
        table = table.append_column(name, pa.array(values))
    return SourceTable.from_dataset("stays", table)


def spec(name: str, **parameters: Any) -> dict[str, Any]:
    return {"class": name, "params": parameters}


LINEAR = spec("sklearn.linear_model.LinearRegression")
HUGE_LASSO = spec("sklearn.linear_model.Lasso", alpha=1e12, fit_intercept=False)
SECRET_ROW = 17


def refused(release: Any, *args: Any) -> PolicyViolation:
    with pytest.raises(PolicyViolation) as caught:
        release(*args)
    assert caught.value.rule == "release.min_group_size" and caught.value.datasets == ("stays",)
    return caught.value


def every_release(model: TrainedModel) -> list[Any]:
    public = pa.table({name: [0.0, 1.0] for name in model.features})
    return [
        lambda: metrics(model, POLICIES),
        lambda: score(model, POLICIES),
        lambda: params(model, POLICIES),
        lambda: predict(model, public, POLICIES),
        lambda: export_refusal(model, POLICIES) or to_skops(model),
    ]


# -- the target ----------------------------------------------------------------------------------------------------


def test_a_target_filled_with_a_constant_but_in_one_row_releases_nothing_of_the_model() -> None:
    """``where(who, stay, 0)`` with a huge Lasso: the model predicts 0, so its MAE times n is the one stay."""
    table = stays()
    secret = table.column("stay")[SECRET_ROW].as_py()
    masked = np.zeros(N)
    masked[SECRET_ROW] = secret
    model = fit(with_columns(table, y=masked), HUGE_LASSO, "y", ["age"], None, None, POLICIES)
    for release in every_release(model):
        violation = refused(release)
        assert "target column 'y'" in str(violation) and "most common value" in str(violation)
        assert f"{secret}" not in str(violation)
    # What the refusal protects: the metric would have given the secret exactly.
    mae = float(np.mean(np.abs(masked - model.estimator.predict(model.X_eval))))
    assert mae * N == pytest.approx(secret, abs=1e-9)


def test_a_target_that_differs_from_its_mode_in_k_records_is_released_with_scikit_learns_values() -> None:
    table = stays()
    masked = np.zeros(N)
    masked[:K] = table.column("stay").to_numpy()[:K]
    model = fit(with_columns(table, y=masked), HUGE_LASSO, "y", ["age"], None, None, POLICIES)
    values = metrics(model, POLICIES)
    assert values["mae"] == pytest.approx(float(np.mean(np.abs(masked))))
    assert params(model, POLICIES)["coef_"] == {"age": 0.0}


def test_rows_without_a_target_are_left_out_and_not_counted() -> None:
    table = stays()
    cost = table.column("cost").to_numpy().copy()
    cost[: N // 2] = np.nan  # NaN counts as missing, as a null does
    y = pa.array([None if i % 4 == 0 else v for i, v in enumerate(cost.tolist())], pa.float64())
    source = SourceTable.from_dataset("stays", table.append_column("y", y))
    model = fit(source, LINEAR, "y", ["age", "stay"], None, None, POLICIES)
    known = ~np.isnan(cost) & (np.arange(N) % 4 != 0)
    assert model.n_train == int(known.sum()) == dict(model.train_records)["stays"]
    expected = LinearRegression().fit(np.column_stack([table["age"], table["stay"]])[known], cost[known])
    released = params(model, POLICIES)
    assert released["coef_"]["stay"] == pytest.approx(expected.coef_[1])
    assert released["intercept_"] == pytest.approx(expected.intercept_)


def test_a_target_present_in_one_row_is_refused_before_training() -> None:
    """``where(who, stay, None)``: one complete row; the refusal comes before any value is touched."""
    table = stays()
    y = [None] * N
    y[SECRET_ROW] = table.column("stay")[SECRET_ROW].as_py()
    with pytest.raises(PolicyViolation, match="the training data") as caught:
        fit(with_columns(table, y=pa.array(y, pa.float64())), HUGE_LASSO, "y", ["age"], None, None, POLICIES)
    assert caught.value.rule == "release.min_group_size"


def test_only_records_whose_target_is_a_dataset_value_count() -> None:
    """Constants chosen by data predicates vary, so the mode rule alone passes them: they are no record's target.

    ``where(cost == c, stay, where(age < 40, 1, where(age < 70, 2, 3)))`` differs from its mode in hundreds of
    rows, but only one row holds a record's value; a zero model's MAE times n minus the constants (whose counts
    an aggregate gives) would be that stay.
    """
    table = stays()
    source = SourceTable.from_dataset("stays", table)

    def fn(name: str, *args: Any) -> dict[str, Any]:
        return {"fn": name, "args": list(args)}

    def col(name: str) -> dict[str, Any]:
        return {"col": name}

    def lit(value: Any) -> dict[str, Any]:
        return {"lit": value}

    who = fn("eq", col("cost"), lit(table.column("cost")[SECRET_ROW].as_py()))
    bands = fn("where", fn("lt", col("age"), lit(40)), lit(1.0), fn("where", fn("lt", col("age"), lit(70)), lit(2.0),
                                                                      lit(3.0)))  # fmt: skip
    banded = fn("where", who, col("stay"), bands)
    plan = {"node": "assign", "input": {"node": "source", "handle": "stays"}, "columns": [["y", banded]]}
    derived = evaluate(plan, {"stays": source})
    _, counts = np.unique(derived.table.column("y").to_numpy(), return_counts=True)
    assert N - counts.max() > 100  # the mode rule alone would count hundreds of records
    model = fit(derived, HUGE_LASSO, "y", ["age"], None, None, POLICIES)
    assert dict(model.target_records or {})["stays"] == 1
    secret = table.column("stay")[SECRET_ROW].as_py()
    y = derived.table.column("y").to_numpy()
    constants = np.delete(y, SECRET_ROW).sum()
    mae = float(np.mean(np.abs(y - model.estimator.predict(model.X_eval))))
    assert mae * N - constants == pytest.approx(secret)  # what a released MAE would have given
    for release in every_release(model):
        refused(release)
    plain = fit(evaluate({"node": "source", "handle": "stays"}, {"stays": source}), LINEAR, "stay", ["age"], None,
                None, POLICIES)  # fmt: skip
    assert dict(plain.target_records or {})["stays"] > N - 5  # a dataset column: every record but ties to the mode
    params(plain, POLICIES)


def test_metrics_need_k_differing_targets_in_the_held_out_rows() -> None:
    table = stays()
    masked = np.zeros(N)
    masked[:40] = table.column("stay").to_numpy()[:40]
    model = fit(with_columns(table, y=masked), HUGE_LASSO, "y", ["age"], 0.1, 3, POLICIES)
    held_out = dict(model.eval_target_records or {})["stays"]
    assert held_out < K <= dict(model.target_records or {})["stays"]
    violation = refused(metrics, model, POLICIES)
    assert "on the evaluation set" in str(violation)
    refused(score, model, POLICIES)
    assert params(model, POLICIES)["coef_"] == {"age": 0.0}  # the training rows are enough for parameters


# -- features ------------------------------------------------------------------------------------------------------


def indicator(rows: Any) -> np.ndarray[Any, Any]:
    values = np.zeros(N)
    values[rows] = 1.0
    return values


def test_an_indicator_of_one_record_has_its_coefficient_withheld_and_the_rest_released() -> None:
    """coef_ + intercept_ of an indicator that is 1 in one row is that row's target."""
    table = stays()
    secret = table.column("cost")[SECRET_ROW].as_py()
    source = with_columns(table, who=indicator([SECRET_ROW]))
    model = fit(source, LINEAR, "cost", ["age", "who"], None, None, POLICIES)
    released = params(model, POLICIES)
    assert released["coef_"]["who"] is None and released["confnb_suppressed"] == ["who"]
    fitted = model.estimator
    assert fitted.coef_[1] + fitted.intercept_ + fitted.coef_[0] * table["age"][SECRET_ROW].as_py() == pytest.approx(
        secret
    )  # what the withheld coefficient would have given
    others = np.arange(N) != SECRET_ROW
    x = np.column_stack([table["age"]])
    expected = LinearRegression().fit(x[others], table["cost"].to_numpy()[others])
    assert released["coef_"]["age"] == pytest.approx(expected.coef_[0])
    assert released["intercept_"] == pytest.approx(expected.intercept_)
    estimate = (released["coef_"]["who"] or 0.0) + released["intercept_"]
    assert abs(estimate + expected.coef_[0] * table["age"][SECRET_ROW].as_py() - secret) > 1e-6
    public = pa.table({"age": [50.0, 50.0], "who": [0.0, 1.0]})
    for attempt in (
        lambda: predict(model, public, POLICIES),  # two predictions differ by the coefficient
        lambda: metrics(model, POLICIES),  # R² against the total variance gives the row's squared deviation
        lambda: score(model, POLICIES),
        lambda: export_refusal(model, POLICIES),
    ):
        assert "feature 'who'" in str(refused(attempt))
    with pytest.raises(PolicyViolation, match="feature 'who'"):
        export_refusal(model)  # without the policies at hand: the thresholds the model was trained under


def test_an_indicator_of_k_records_is_released_with_scikit_learns_coefficient() -> None:
    table = stays()
    source = with_columns(table, who=indicator(slice(0, K)))
    model = fit(source, LINEAR, "cost", ["age", "who"], None, None, POLICIES)
    released = params(model, POLICIES)
    x = np.column_stack([table["age"].to_numpy(), indicator(slice(0, K))])
    expected = LinearRegression().fit(x, table["cost"].to_numpy())
    assert released["coef_"]["who"] == pytest.approx(expected.coef_[1])
    assert "confnb_suppressed" not in released
    assert metrics(model, POLICIES)["r2"] == pytest.approx(expected.score(x, table["cost"].to_numpy()))
    assert export_refusal(model, POLICIES) is None


def test_feature_importances_and_cluster_centres_hide_what_a_weak_column_decides() -> None:
    table = stays()
    source = with_columns(table, who=indicator([SECRET_ROW]))
    forest = spec("sklearn.ensemble.RandomForestRegressor", n_estimators=5, random_state=0)
    importances = params(fit(source, forest, "cost", ["age", "who"], None, None, POLICIES), POLICIES)
    assert importances["feature_importances_"] == {"age": None, "who": None}  # they sum to one: all or none
    kmeans = spec("sklearn.cluster.KMeans", n_clusters=2, random_state=0, n_init=2)
    centres = params(fit(source, kmeans, None, ["age", "who"], None, None, POLICIES), POLICIES)["cluster_centers_"]
    assert all(centre["who"] is None and centre["age"] is not None for centre in centres)


def joined(rows: int, patients: int, **columns: Any) -> SourceTable:
    base = stays(rows)
    for name, values in columns.items():
        base = base.append_column(name, pa.array(values))
    return SourceTable(
        base,
        {name: frozenset({("stays", name)}) for name in base.column_names},
        frozenset({"stays", "patients"}),
        (
            ("stays", pa.chunked_array([pa.array(np.arange(rows), pa.int64())])),
            ("patients", pa.chunked_array([pa.array(np.arange(rows) % patients, pa.int64())])),
        ),
    )


def test_columns_are_counted_per_dataset_by_distinct_record() -> None:
    """An indicator of 15 rows that are two patients' records: enough rows of stays, too few patients."""
    rows, patients = 300, 40
    who = (np.arange(rows) % patients < 2).astype(np.float64)
    source = joined(rows, patients, who=who)
    both = {"stays": policy(), "patients": policy()}
    model = fit(source, LINEAR, "cost", ["age", "who"], None, None, both)
    assert dict((model.feature_records or {})["who"]) == {"stays": int(who.sum()), "patients": 2}
    assert params(model, both)["coef_"]["who"] is None
    with pytest.raises(PolicyViolation) as caught:
        metrics(model, both)
    assert caught.value.datasets == ("patients",)


def test_missing_feature_values_make_a_row_incomplete() -> None:
    """A feature present in one row, imputed elsewhere: one complete row, so the model is refused before it trains."""
    table = stays()
    lone = np.full(N, np.nan)
    lone[SECRET_ROW] = table.column("stay")[SECRET_ROW].as_py()
    pipeline = spec(
        "sklearn.pipeline.Pipeline",
        steps=[["impute", spec("sklearn.impute.SimpleImputer")], ["fit", LINEAR]],
    )
    with pytest.raises(PolicyViolation, match="the training data"):
        fit(with_columns(table, lone=lone), pipeline, "cost", ["age", "lone"], None, None, POLICIES)
    half = table.column("stay").to_numpy().copy()
    half[::2] = np.nan
    model = fit(with_columns(table, half=half), pipeline, "cost", ["age", "half"], None, None, POLICIES)
    assert dict(model.train_records)["stays"] == N // 2 and model.n_train == N
    params(model, POLICIES)


# -- export --------------------------------------------------------------------------------------------------------


def exported_attributes(data: bytes) -> dict[str, set[str]]:
    estimator = load_estimator(data)
    parts = [step for _, step in estimator.steps] if isinstance(estimator, Pipeline) else [estimator]
    # Fitted state: what the file holds beyond what the constructor sets (its parameters, and constants it adds).
    return {type(part).__name__: set(vars(part)) - set(vars(type(part)(**part.get_params()))) for part in parts}


def test_an_export_carries_only_allowlisted_attributes_checked_on_the_vaults_copy() -> None:
    table = stays()
    pipeline = spec(
        "sklearn.pipeline.Pipeline",
        steps=[["scale", spec("sklearn.preprocessing.StandardScaler")], ["fit", LINEAR]],
    )
    model = fit(SourceTable.from_dataset("stays", table), pipeline, "cost", ["age", "stay"], None, None, POLICIES)
    assert export_refusal(model, POLICIES) is None
    data = to_skops(model)
    carried = exported_attributes(data)
    assert carried["LinearRegression"] == {"coef_", "intercept_", "n_features_in_"}  # no singular_, no rank_
    for name, attributes in carried.items():
        assert attributes <= FITTED_ATTRIBUTES[name]
    x = np.column_stack([table["age"].to_numpy(), table["stay"].to_numpy()])
    loaded = load_estimator(data)
    assert np.allclose(loaded.predict(x), model.estimator.predict(x))
    assert loaded[0].mean_ == pytest.approx(x.mean(axis=0))
    # An attribute nobody reviewed (a newer scikit-learn's, say) refuses the whole file: nothing partial is written.
    model.estimator[-1].residues_ = np.array([1.0])
    with pytest.raises(PolicyViolation, match="residues_"):
        to_skops(model)
    assert "residues_" in (export_refusal(model, POLICIES) or "")


def test_a_scaler_of_a_column_that_differs_in_one_record_is_not_exported() -> None:
    """StandardScaler.mean_ of ``where(who, stay, 0)`` is the stay over n."""
    table = stays()
    secret = table.column("stay")[SECRET_ROW].as_py()
    masked = np.zeros(N)
    masked[SECRET_ROW] = secret
    pipeline = spec(
        "sklearn.pipeline.Pipeline",
        steps=[["scale", spec("sklearn.preprocessing.StandardScaler")], ["fit", LINEAR]],
    )
    model = fit(with_columns(table, x=masked), pipeline, "cost", ["age", "x"], None, None, POLICIES)
    assert model.estimator[0].mean_[1] * N == pytest.approx(secret)  # what the file would have carried
    violation = refused(export_refusal, model, POLICIES)
    assert "feature 'x'" in str(violation) and f"{secret}" not in str(violation)


@pytest.mark.parametrize(
    ("step", "reason"),
    [
        (spec("sklearn.preprocessing.RobustScaler"), "single records' values"),
        (spec("sklearn.preprocessing.MinMaxScaler"), "single records' values"),
        (spec("sklearn.impute.SimpleImputer", strategy="median"), "median"),
        (spec("sklearn.impute.SimpleImputer", add_indicator=True), "missing indicator"),
    ],
)
def test_order_statistics_never_leave_in_a_file(step: dict[str, Any], reason: str) -> None:
    """A median is one record's value (two records' mean), however many records the column has."""
    pipeline = spec("sklearn.pipeline.Pipeline", steps=[["prep", step], ["fit", LINEAR]])
    model = fit(SourceTable.from_dataset("stays", stays()), pipeline, "cost", ["age", "stay"], None, None, POLICIES)
    params(model, POLICIES)  # the parameters are still released
    assert reason in (export_refusal(model, POLICIES) or "")
    with pytest.raises(PolicyViolation, match=reason):
        to_skops(model)


def test_a_sealed_model_keeps_its_column_counts_and_an_older_file_is_refused() -> None:
    source = with_columns(stays(), who=indicator([SECRET_ROW]))
    model = fit(source, LINEAR, "cost", ["age", "who"], None, None, POLICIES)
    data = to_skops(model, facts=True)
    header = json.loads(json.dumps(describe(model)))
    restored = from_skops(data, header)
    assert restored.feature_records == model.feature_records and restored.input_records == model.input_records
    assert restored.target_isolated == model.target_isolated
    assert params(restored, POLICIES) == params(model, POLICIES)
    with pytest.raises(PolicyViolation, match="feature 'who'"):
        export_refusal(restored)
    archive = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as older:
        for item in archive.namelist():
            content = archive.read(item)
            if item == "confnb-model.json":
                facts = json.loads(content)
                for key in ("target_records", "feature_records", "input_records", "min_group_size", "target_isolated"):
                    facts.pop(key)
                content = json.dumps(facts).encode()
            older.writestr(item, content)
    with pytest.raises(VaultError, match="sealed by an earlier vault"):
        from_skops(out.getvalue(), header)


def test_the_exported_file_of_a_legitimate_model_predicts_as_scikit_learn_does() -> None:
    table = stays()
    model = fit(SourceTable.from_dataset("stays", table), LINEAR, "cost", ["age", "stay"], None, None, POLICIES)
    data = to_skops(model)
    loaded = sio.loads(data, trusted=sio.get_untrusted_types(data=data))
    x = np.column_stack([table["age"].to_numpy(), table["stay"].to_numpy()])
    expected = LinearRegression().fit(x, table["cost"].to_numpy())
    assert loaded.coef_ == pytest.approx(expected.coef_) and loaded.intercept_ == pytest.approx(expected.intercept_)
    assert not hasattr(loaded, "singular_")
    lasso = fit(SourceTable.from_dataset("stays", table), spec("sklearn.linear_model.Lasso", alpha=0.1), "cost",
                ["age", "stay"], None, None, POLICIES)  # fmt: skip
    reloaded = load_estimator(to_skops(lasso))
    assert isinstance(reloaded, Lasso) and not hasattr(reloaded, "dual_gap_")


def test_sparse_columns_are_counted_as_their_dense_form_is() -> None:
    """One-hot output is read column by column from its stored entries; the counts must be the dense ones."""
    from scipy import sparse  # type: ignore[import-untyped]

    from kernel_enclave.vault.models import _off_mode, _off_mode_columns

    rng = np.random.default_rng(3)
    dense = np.zeros((200, 4))
    dense[rng.random(200) < 0.05, 0] = 1.0  # a rare category
    dense[:, 1] = 2.0  # a stored value more common than zero
    dense[:7, 1] = 0.0
    dense[rng.random(200) < 0.6, 2] = 1.5  # more 1.5 than zero: the stored value is the mode
    dense[:, 3] = rng.normal(size=200)  # every value once: any of them is "the" mode, and 199 rows differ from it
    for j, found in enumerate(_off_mode_columns(sparse.csr_matrix(dense))):
        expected = _off_mode(dense[:, j])
        assert int(found.sum()) == int(expected.sum())
        if j < 3:
            assert np.array_equal(expected, found)


def test_columns_whose_span_holds_an_indicator_do_not_give_the_target() -> None:
    """``age`` and ``age + indicator`` each differ from their mode in hundreds of records, yet their coefficients'
    difference is the indicator's: the fit passes through the one record (leverage 1) and is refused whole."""
    table = stays()
    age = table.column("age").to_numpy()
    secret = table.column("cost")[SECRET_ROW].as_py()
    source = with_columns(table, x2=age + indicator([SECRET_ROW]))
    model = fit(source, LINEAR, "cost", ["age", "stay", "x2"], None, None, POLICIES)
    fitted = model.estimator  # what was at stake
    row = np.array([age[SECRET_ROW], table["stay"][SECRET_ROW].as_py(), age[SECRET_ROW] + 1.0])
    assert fitted.intercept_ + fitted.coef_ @ row == pytest.approx(secret)
    assert model.leverage == pytest.approx(1.0)
    for attempt in (
        lambda: params(model, POLICIES),
        lambda: metrics(model, POLICIES),
        lambda: predict(model, pa.table({"age": [50.0], "stay": [3.0], "x2": [51.0]}), POLICIES),
        lambda: export_refusal(model, POLICIES),
    ):
        violation = refused(attempt)
        assert "leverage" in str(violation) and f"{secret}" not in str(violation)
    # A far-out value instead of an indicator: the fit nearly passes through the record; refused as well.
    far = with_columns(table, x=np.where(np.arange(N) == SECRET_ROW, 1e4, age))
    assert "leverage" in str(refused(params, fit(far, LINEAR, "cost", ["stay", "x"], None, None, POLICIES), POLICIES))


def test_an_ordinary_regression_has_low_leverage_and_is_released() -> None:
    table = stays()
    model = fit(SourceTable.from_dataset("stays", table), LINEAR, "cost", ["age", "stay"], None, None, POLICIES)
    x = np.column_stack([np.ones(N), table["age"].to_numpy(), table["stay"].to_numpy()])
    hat = x @ np.linalg.pinv(x.T @ x) @ x.T
    assert model.leverage == pytest.approx(float(np.max(np.diag(hat))), rel=1e-6)
    assert model.leverage is not None and model.leverage < 0.1
    params(model, POLICIES)
    forest = fit(SourceTable.from_dataset("stays", table), spec("sklearn.ensemble.RandomForestRegressor",
                 n_estimators=3, random_state=0), "cost", ["age", "stay"], None, None, POLICIES)  # fmt: skip
    assert forest.leverage is None  # not a linear model


def test_every_allowlisted_class_has_an_attribute_allowlist() -> None:
    from kernel_enclave.vault.models import ALLOWED

    assert {cls.__name__ for cls in ALLOWED.values()} == set(FITTED_ATTRIBUTES)


@pytest.mark.parametrize(
    ("name", "target", "parameters"),
    [
        ("sklearn.linear_model.LogisticRegression", "high", {}),
        ("sklearn.linear_model.Ridge", "cost", {}),
        ("sklearn.linear_model.ElasticNet", "cost", {}),
        ("sklearn.linear_model.SGDClassifier", "high", {"random_state": 0, "loss": "log_loss"}),
        ("sklearn.linear_model.SGDRegressor", "cost", {"random_state": 0, "average": True}),
        ("sklearn.naive_bayes.GaussianNB", "high", {}),
        ("sklearn.naive_bayes.MultinomialNB", "high", {}),
        ("sklearn.naive_bayes.BernoulliNB", "high", {}),
        ("sklearn.cluster.KMeans", None, {"n_clusters": 2, "random_state": 0, "n_init": 2}),
    ],
)
def test_exportable_models_leave_with_only_allowlisted_attributes_and_predict_the_same(
    name: str, target: str | None, parameters: dict[str, Any]
) -> None:
    table = stays()
    high = (table.column("cost").to_numpy() > np.median(table.column("cost").to_numpy())).astype(np.int64)
    source = with_columns(table, high=high)
    model = fit(source, spec(name, **parameters), target, ["age", "stay"], None, None, POLICIES)
    assert export_refusal(model, POLICIES) is None
    data = to_skops(model)
    (carried,) = exported_attributes(data).items()
    assert carried[1] <= FITTED_ATTRIBUTES[carried[0]]
    x = np.column_stack([table["age"].to_numpy(), table["stay"].to_numpy()])
    assert np.array_equal(load_estimator(data).predict(x), model.estimator.predict(x))


def test_a_column_transformer_pipeline_exports_with_its_encoder_and_imputer() -> None:
    table = stays()
    ward = np.array(["east", "west", "north"])[np.arange(N) % 3]
    stay = table.column("stay").to_numpy().copy()
    stay[::7] = np.nan
    source = with_columns(table.drop_columns(["stay"]), stay=stay, ward=ward)
    impute, scale = spec("sklearn.impute.SimpleImputer"), spec("sklearn.preprocessing.StandardScaler")
    numeric = spec("sklearn.pipeline.Pipeline", steps=[["impute", impute], ["scale", scale]])
    pipeline = spec(
        "sklearn.pipeline.Pipeline",
        steps=[
            ["prep", spec("sklearn.compose.ColumnTransformer", transformers=[
                ["num", numeric, ["age", "stay"]],
                ["cat", spec("sklearn.preprocessing.OneHotEncoder", handle_unknown="ignore"), ["ward"]],
            ])],
            ["fit", LINEAR],
        ],
    )  # fmt: skip
    model = fit(source, pipeline, "cost", ["age", "stay", "ward"], None, None, POLICIES)
    assert export_refusal(model, POLICIES) is None
    loaded = load_estimator(to_skops(model))
    frame = source.table.select(["age", "stay", "ward"]).to_pandas()
    assert np.allclose(loaded.predict(frame), model.estimator.predict(frame))
    dropping = spec("sklearn.preprocessing.OneHotEncoder", drop="first")
    first = spec("sklearn.pipeline.Pipeline", steps=[
        ["prep", spec("sklearn.compose.ColumnTransformer", transformers=[["cat", dropping, ["ward"]]],
                      remainder="passthrough")],
        ["fit", LINEAR]])  # fmt: skip
    dropped = fit(source, first, "cost", ["age", "ward"], None, None, POLICIES)
    assert "drop" in (export_refusal(dropped, POLICIES) or "")


@given(
    st.lists(
        st.one_of(
            st.sampled_from([0.0, -0.0, 1.5, math.nan, -2.0]),
            st.floats(allow_nan=True, allow_infinity=True, width=64),
        ),
        min_size=1,
        max_size=60,
    )
)
@settings(max_examples=300, deadline=None)
def test_the_rows_off_the_most_common_value_are_those_a_plain_count_finds(values: list[float]) -> None:
    """However the vault finds them (hashing when every value is distinct, sorting otherwise), the rows off the most
    common value: a missing value is never off it, equal values (0.0 and -0.0) are one value, and among values held
    equally often the smallest is the most common."""
    from kernel_enclave.vault.models import _off_mode

    array = np.array(values, dtype=np.float64)
    known = array[~np.isnan(array)]
    found = _off_mode(array)
    if known.size == 0:
        assert not found.any()
        return
    distinct = sorted(set((known + 0.0).tolist()))
    held = [int(np.count_nonzero(known == value)) for value in distinct]
    mode = distinct[held.index(max(held))]
    assert np.array_equal(found, ~np.isnan(array) & (array != mode))
