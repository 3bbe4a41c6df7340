"""Scikit-learn in the vault: specs rebuilt from the allowlist only, training behind never_release, and every released
fact (metrics, parameters, predictions, sealed files) behind the output policy, with errors that carry no data."""

from __future__ import annotations

import io
import json
import re
import zipfile
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import skops.io as sio
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.ensemble import RandomForestClassifier
from sklearn.neighbors import KNeighborsClassifier

from confnb.analyst.estimators import encode_estimator
from confnb.policy.output import RELEASE_KINDS, OutputPolicy
from kernel_enclave.vault import models
from kernel_enclave.vault.models import (
    ALLOWED,
    MAX_SPEC_DEPTH,
    build_estimator,
    describe,
    fit,
    from_skops,
    load_estimator,
    metrics,
    params,
    predict,
    score,
    to_skops,
)
from kernel_enclave.vault.plan import SourceTable
from kernel_enclave.vault.protocol import PolicyViolation, VaultError

K = 10
REGIONS = ("north", "south", "east")


def policy(allow: tuple[str, ...] = RELEASE_KINDS, *, k: int = K, max_rows: int | None = 100) -> OutputPolicy:
    return OutputPolicy(
        id="claims-v1",
        allow=frozenset(allow),
        min_group_size=k,
        never_release=frozenset({"patient_id"}),
        max_rows=max_rows,
    )


def claims(n: int = 300, seed: int = 0) -> pa.Table:
    """Synthetic claims: a binary label and a cost that depend on the features, so models learn something."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(20, 80, n)
    bmi = rng.normal(27, 4, n)
    smoker = rng.random(n) < 0.3
    region = np.array(REGIONS)[rng.integers(0, 3, n)]
    logit = 0.08 * (age - 50) + 0.2 * (bmi - 27) + 1.5 * smoker
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    cost = 100 * age + 50 * bmi + 2000 * smoker + rng.normal(0, 200, n)
    return pa.table(
        {
            "patient_id": pa.array(np.arange(n, dtype=np.int64)),
            "age": age,
            "bmi": bmi,
            "smoker": smoker,
            "region": region,
            "label": label,
            "cost": cost,
        }
    )


@pytest.fixture
def source() -> SourceTable:
    return SourceTable.from_dataset("claims", claims())


POLICIES = {"claims": policy()}
NUMERIC = ["age", "bmi", "smoker"]


def spec(name: str, **params: Any) -> dict[str, Any]:
    return {"class": name, "params": params}


LOGISTIC = spec("sklearn.linear_model.LogisticRegression")


def public_rows(n: int = 20) -> pa.Table:
    return claims(n, seed=1).drop_columns(["patient_id", "label", "cost"])


# -- building from specs ------------------------------------------------------------------------------------------


def test_allowlist_is_the_documented_set_and_every_class_builds_with_defaults() -> None:
    assert len(ALLOWED) == 28
    for name, cls in ALLOWED.items():
        assert name.startswith("sklearn.") and name.rsplit(".", 1)[1] == cls.__name__
        if cls.__name__ in ("Pipeline", "ColumnTransformer"):
            continue
        assert type(build_estimator(spec(name))) is cls


@pytest.mark.parametrize(
    "name",
    ["os.system", "builtins.__import__", "builtins.eval", "sklearn.neighbors.KNeighborsClassifier",
     "sklearn.linear_model._logistic.LogisticRegression", "LogisticRegression",
     "sklearn.linear_model.LogisticRegression "],
)  # fmt: skip
def test_unknown_classes_are_refused_by_name(name: str) -> None:
    with pytest.raises(VaultError, match="not on the vault's allowlist") as caught:
        build_estimator(spec(name))
    assert "LogisticRegression" in str(caught.value)  # the message lists what is allowed


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("LogisticRegression", "an estimator spec is an object"),
        ({"params": {}}, '"class" must be a dotted class name'),
        ({"class": "sklearn.linear_model.Ridge", "params": {}, "code": "x"}, "unknown spec keys"),
        ({"class": "sklearn.linear_model.Ridge", "params": [1]}, "must be an object"),
        (spec("sklearn.linear_model.Ridge", __class__="x"), "unknown parameter '__class__'"),
        (spec("sklearn.linear_model.Ridge", alpha=print), "builtin_function_or_method is not a JSON value"),
        (spec("sklearn.linear_model.Ridge", alpha=lambda: 1), "function is not a JSON value"),
        (spec("sklearn.linear_model.Ridge", alpha=float("nan")), "non-finite number"),
        (spec("sklearn.linear_model.Ridge", alpha={"float": "1e308"}), '"float" is one of'),
        (spec("sklearn.preprocessing.OneHotEncoder", dtype={"dtype": "object"}), "dtype is one of"),
        (spec("sklearn.linear_model.Ridge", alpha={"__reduce__": "os.system"}), "an object is an estimator spec"),
        (spec("sklearn.linear_model.Ridge", alpha=-1.0), "'alpha' parameter of Ridge"),
        (spec("sklearn.linear_model.Ridge", random_state="x" * 20000), "longer than"),
        (spec("sklearn.pipeline.Pipeline"), "missing parameter steps"),
        (spec("sklearn.pipeline.Pipeline", steps=[]), "a list of 1-64"),
        (spec("sklearn.pipeline.Pipeline", steps=[["s", "os.system"]]), "an estimator spec is an object"),
        (spec("sklearn.pipeline.Pipeline", steps=[["m", LOGISTIC]], memory="/tmp/cache"), "memory must be null"),
        (spec("sklearn.compose.ColumnTransformer", transformers=[["a", "drop"]]), "triple"),
        (spec("sklearn.compose.ColumnTransformer", transformers=[["a", "drop", {"x": 1}]]), "a column name"),
        (spec("sklearn.ensemble.GradientBoostingRegressor", init=spec("sklearn.neighbors.KNeighborsRegressor")),
         "not on the vault's allowlist"),
    ],
)  # fmt: skip
def test_hostile_or_malformed_specs_are_refused_with_a_reason(bad: object, message: str) -> None:
    with pytest.raises(VaultError, match=re.escape(message)):
        build_estimator(bad)


def test_nesting_and_size_are_bounded() -> None:
    nested: dict[str, Any] = LOGISTIC
    for _ in range(MAX_SPEC_DEPTH + 2):
        nested = spec("sklearn.pipeline.Pipeline", steps=[["p", nested]])
    with pytest.raises(VaultError, match="nested more than"):
        build_estimator(nested)
    deep: Any = 1.0
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(VaultError, match="nested more than"):
        build_estimator(spec("sklearn.linear_model.Ridge", alpha=deep))
    with pytest.raises(VaultError, match="more than 100000 values"):
        build_estimator(spec("sklearn.preprocessing.OneHotEncoder", categories=[list(range(100_001))]))


def test_parallelism_and_logging_are_forced_and_tagged_values_decode() -> None:
    forest = build_estimator(spec("sklearn.ensemble.RandomForestClassifier", n_jobs=-1, verbose=3))
    assert forest.n_jobs is None and forest.verbose == 0
    imputer = build_estimator(spec("sklearn.impute.SimpleImputer", missing_values={"float": "nan"}))
    assert np.isnan(imputer.missing_values)
    encoder = build_estimator(spec("sklearn.preprocessing.OneHotEncoder", dtype={"dtype": "float32"}))
    assert encoder.dtype is np.float32
    scaler = build_estimator(spec("sklearn.preprocessing.MinMaxScaler", feature_range=[-1, 1]))
    assert scaler.feature_range == (-1, 1)  # a tuple again: MinMaxScaler accepts nothing else
    weighted = build_estimator(spec("sklearn.linear_model.LogisticRegression", class_weight={"dict": [[0, 1], [1, 3]]}))
    assert weighted.class_weight == {0: 1, 1: 3}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["class", "params", "float", "dtype",
                                                                                "dict", "x"]), inner, max_size=3),
    max_leaves=25,
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(sorted(ALLOWED)),
    values=st.dictionaries(st.sampled_from(["alpha", "C", "steps", "transformers", "init", "categories", "max_depth",
                                            "n_jobs", "memory", "missing_values", "dtype", "bogus"]), json_values,
                           max_size=3),
)  # fmt: skip
def test_arbitrary_json_params_build_an_allowlisted_estimator_or_raise_vault_error(
    name: str, values: dict[str, Any]
) -> None:
    try:
        estimator = build_estimator({"class": name, "params": values})
    except VaultError:
        return
    assert type(estimator) in ALLOWED.values()


# -- training and releases -----------------------------------------------------------------------------------------


def test_classification_fit_metrics_score_params(source: SourceTable) -> None:
    model = fit(source, LOGISTIC, "label", NUMERIC, 0.25, 0, POLICIES)
    assert (model.task, model.features, model.target) == ("classification", tuple(NUMERIC), "label")
    assert (model.n_train, model.n_test) == (225, 75)
    assert model.datasets == frozenset({"claims"})
    assert model.lineage["age"] == frozenset({("claims", "age")})
    values = metrics(model, POLICIES)
    assert set(values) == {"accuracy", "balanced_accuracy", "f1", "precision", "recall", "roc_auc", "log_loss",
                           "n_train", "n_test"}  # fmt: skip
    assert 0.6 < values["accuracy"] <= 1 and 0.6 < values["roc_auc"] <= 1
    assert (values["n_train"], values["n_test"]) == (225, 75)
    assert score(model, POLICIES) == pytest.approx(values["accuracy"])
    released = params(model, POLICIES)
    assert released["classes_"] == [0, 1]
    assert set(released["coef_"]) == set(NUMERIC)
    assert released["coef_"]["age"] > 0 and released["coef_"]["smoker"] > 0
    assert isinstance(released["intercept_"], float)
    assert isinstance(released["n_iter_"], list)
    json.dumps(released, allow_nan=False)
    assert "225" not in repr(model) and "age=" not in repr(model)


def test_features_default_to_every_column_but_the_target_so_an_identifier_is_refused(source: SourceTable) -> None:
    with pytest.raises(PolicyViolation) as caught:
        fit(source, LOGISTIC, "label", None, None, None, POLICIES)
    assert caught.value.rule == "release.never_release"
    assert caught.value.datasets == ("claims",)
    assert "patient_id" in str(caught.value)


def test_never_release_columns_are_refused_as_target_or_derived_feature_before_training(source: SourceTable) -> None:
    with pytest.raises(PolicyViolation, match="never_release"):
        fit(source, spec("sklearn.linear_model.LinearRegression"), "patient_id", ["age"], None, None, POLICIES)
    derived = SourceTable(
        source.table.append_column("pid_bucket", source.table.column("patient_id")),
        {**source.lineage, "pid_bucket": frozenset({("claims", "patient_id")})},
        source.datasets,
    )
    with pytest.raises(PolicyViolation, match="pid_bucket"):
        fit(derived, LOGISTIC, "label", ["age", "pid_bucket"], None, None, POLICIES)


def test_a_held_out_set_smaller_than_k_withholds_metrics(source: SourceTable) -> None:
    model = fit(source, LOGISTIC, "label", NUMERIC, 0.02, 0, POLICIES)
    assert model.n_test == 6
    for release in (metrics, score):
        with pytest.raises(PolicyViolation) as caught:
            release(model, POLICIES)
        assert caught.value.rule == "release.min_group_size"
    params(model, POLICIES)  # the training set is large enough


def test_kinds_the_policy_does_not_allow_are_refused(source: SourceTable) -> None:
    model = fit(source, LOGISTIC, "label", NUMERIC, 0.25, 0, POLICIES)
    nothing = {"claims": policy(("schema", "aggregate"))}
    for release in (metrics, score, params):
        with pytest.raises(PolicyViolation) as caught:
            release(model, nothing)
        assert caught.value.rule == "release.allow"
    with pytest.raises(PolicyViolation, match=r"release\.allow"):
        predict(model, public_rows(), nothing)
    with pytest.raises(PolicyViolation, match=r"release\.allow"):
        metrics(model, {})  # no policy known for the dataset: nothing is released


def test_regression_metrics_and_feature_importances(source: SourceTable) -> None:
    forest = spec("sklearn.ensemble.RandomForestRegressor", n_estimators=20, random_state=0, n_jobs=-1)
    model = fit(source, forest, "cost", NUMERIC, 0.3, 1, POLICIES)
    assert model.task == "regression"
    values = metrics(model, POLICIES)
    assert {"r2", "rmse", "mae"} <= set(values)
    assert values["r2"] > 0.5 and values["rmse"] >= values["mae"] > 0
    importances = params(model, POLICIES)["feature_importances_"]
    assert max(importances, key=importances.get) == "age"


def test_pipeline_with_column_transformer_names_coefficients_after_encoding(source: SourceTable) -> None:
    pipeline = spec(
        "sklearn.pipeline.Pipeline",
        steps=[
            ["prep", spec("sklearn.compose.ColumnTransformer", transformers=[
                ["num", spec("sklearn.preprocessing.StandardScaler"), ["age", "bmi"]],
                ["cat", spec("sklearn.preprocessing.OneHotEncoder", handle_unknown="ignore"), ["region"]],
            ])],
            ["model", LOGISTIC],
        ],
    )  # fmt: skip
    model = fit(source, pipeline, "label", ["age", "bmi", "region"], 0.25, 0, POLICIES)
    assert model.frame and model.estimator_name == "Pipeline"
    released = params(model, POLICIES)
    assert set(released["coef_"]) == {"num__age", "num__bmi", "cat__region_east", "cat__region_north",
                                      "cat__region_south"}  # fmt: skip
    assert "roc_auc" in metrics(model, POLICIES)
    out = predict(model, public_rows(), POLICIES)
    assert out.column_names == ["prediction", "proba_0", "proba_1"]


def test_a_rare_one_hot_category_withholds_coefficients_that_would_name_it() -> None:
    table = claims()
    region = table.column("region").to_pylist()
    region[:3] = ["island"] * 3  # three records: fewer than k
    source = SourceTable.from_dataset("claims", table.set_column(4, "region", pa.array(region)))
    pipeline = spec(
        "sklearn.pipeline.Pipeline",
        steps=[["prep", spec("sklearn.compose.ColumnTransformer", transformers=[
            ["cat", spec("sklearn.preprocessing.OneHotEncoder"), ["region"]]], remainder="passthrough")],
               ["model", LOGISTIC]],
    )  # fmt: skip
    model = fit(source, pipeline, "label", ["age", "region"], None, None, POLICIES)
    with pytest.raises(PolicyViolation, match="one-hot category") as caught:
        params(model, POLICIES)
    assert caught.value.rule == "release.min_group_size"
    assert "island" not in str(caught.value)
    # Metrics name no category, but the category's coefficient fits its three records' targets, and the error sums
    # then tell their mean: the column is counted like any other, by position (its name would quote the category).
    with pytest.raises(PolicyViolation, match="input column") as caught:
        metrics(model, POLICIES)
    assert caught.value.rule == "release.min_group_size" and "island" not in str(caught.value)


def test_a_rare_class_withholds_parameters_and_predictions_that_name_it(source: SourceTable) -> None:
    labels = source.table.column("label").to_numpy().copy()
    labels[:4] = 2
    table = source.table.set_column(5, "label", pa.array(labels))
    model = fit(SourceTable.from_dataset("claims", table), LOGISTIC, "label", NUMERIC, None, None, POLICIES)
    for release in (params, lambda m, p: predict(m, public_rows(), p)):
        with pytest.raises(PolicyViolation, match="smallest class"):
            release(model, POLICIES)


def test_clustering_centres_need_every_cluster_to_reach_k(source: SourceTable) -> None:
    kmeans = spec("sklearn.cluster.KMeans", n_clusters=3, random_state=0, n_init=2)
    model = fit(source, kmeans, None, ["age", "bmi"], None, None, POLICIES)
    assert model.task == "clustering"
    values = metrics(model, POLICIES)
    assert values["inertia"] > 0 and -1 <= values["silhouette"] <= 1
    centres = params(model, POLICIES)["cluster_centers_"]
    assert len(centres) == 3 and set(centres[0]) == {"age", "bmi"}
    many = fit(source, {**kmeans, "params": {**kmeans["params"], "n_clusters": 80}}, None, ["age", "bmi"], None, 0,
               POLICIES)  # fmt: skip
    with pytest.raises(PolicyViolation, match="smallest cluster"):
        params(many, POLICIES)
    with pytest.raises(VaultError, match="does not use a target"):
        fit(source, kmeans, "label", ["age"], None, None, POLICIES)


def test_predictions_on_public_data_respect_max_rows_and_need_the_features(source: SourceTable) -> None:
    model = fit(source, LOGISTIC, "label", NUMERIC, None, None, POLICIES)
    out = predict(model, public_rows(20), POLICIES)
    assert out.num_rows == 20 and out.column_names == ["prediction", "proba_0", "proba_1"]
    assert set(out.column("prediction").to_pylist()) <= {0, 1}
    with pytest.raises(PolicyViolation) as caught:
        predict(model, public_rows(101), POLICIES)
    assert caught.value.rule == "release.max_rows"
    with pytest.raises(VaultError, match="lacks the feature column 'bmi'"):
        predict(model, public_rows().drop_columns(["bmi"]), POLICIES)
    regression = fit(source, spec("sklearn.linear_model.Ridge"), "cost", NUMERIC, None, None, POLICIES)
    assert predict(regression, public_rows(), POLICIES).column_names == ["prediction"]


def joined(rows: int, patients: int) -> SourceTable:
    """Claims joined to patients: ``rows`` rows that repeat ``patients`` patient records."""
    base = claims(rows)
    return SourceTable(
        base,
        {name: frozenset({("claims", name)}) for name in base.column_names},
        frozenset({"claims", "patients"}),
        (
            ("claims", pa.chunked_array([pa.array(np.arange(rows), pa.int64())])),
            ("patients", pa.chunked_array([pa.array(np.arange(rows) % patients, pa.int64())])),
        ),
    )


JOINED_POLICIES = {"claims": policy(), "patients": policy()}


def test_training_data_of_fewer_than_k_records_is_refused_before_training(source: SourceTable) -> None:
    """Fifty rows that repeat three patients are three records of the patients dataset, as the release engine
    counts after a join; a model of them could release nothing, so it is not trained."""
    ridge = spec("sklearn.linear_model.Ridge")
    with pytest.raises(PolicyViolation) as caught:
        fit(joined(50, 3), ridge, "cost", NUMERIC, None, None, JOINED_POLICIES)
    assert (caught.value.rule, caught.value.datasets) == ("release.min_group_size", ("patients",))
    assert "the training data" in str(caught.value)
    few = SourceTable.from_dataset("claims", source.table.slice(0, K - 1))
    with pytest.raises(PolicyViolation, match=r"release\.min_group_size"):
        fit(few, LOGISTIC, "label", NUMERIC, None, None, POLICIES)
    with pytest.raises(PolicyViolation, match="the training split"):
        fit(SourceTable.from_dataset("claims", source.table.slice(0, 15)), LOGISTIC, "label", NUMERIC, 0.5, 0,
            POLICIES)  # fmt: skip


def test_groups_behind_a_join_are_counted_by_distinct_record() -> None:
    model = fit(joined(300, 40), LOGISTIC, "label", NUMERIC, 0.5, 0, JOINED_POLICIES)
    assert dict(model.train_records) == {"claims": 150, "patients": 40}
    assert dict(model.eval_records)["patients"] <= 40
    assert model.class_records is not None and model.class_records["patients"] <= 40
    params(model, JOINED_POLICIES)
    strict = {"claims": policy(), "patients": policy(k=41)}
    with pytest.raises(PolicyViolation) as caught:
        params(model, strict)
    assert caught.value.datasets == ("patients",)


def test_failures_are_reported_without_data_values(source: SourceTable) -> None:
    with pytest.raises(VaultError, match="not numeric") as caught:
        fit(source, LOGISTIC, "label", ["age", "region"], None, None, POLICIES)
    assert not any(region in str(caught.value) for region in REGIONS)
    age = source.table.column("age").to_pylist()
    age[7] = None
    with_null = SourceTable.from_dataset("claims", source.table.set_column(1, "age", pa.array(age)))
    # An estimator that rejects NaN trains on the complete rows, one that accepts NaN on every row: never an error
    # that a missing value alone would cause (the decision is the estimator's class, not the data).
    assert fit(with_null, LOGISTIC, "label", NUMERIC, None, None, POLICIES).n_train == source.table.num_rows - 1
    boosted = fit(with_null, spec("sklearn.ensemble.HistGradientBoostingClassifier", max_iter=5), "label", NUMERIC,
                  None, 0, POLICIES)  # fmt: skip
    assert boosted.n_train == source.table.num_rows
    encoder = spec("sklearn.pipeline.Pipeline", steps=[
        ["prep", spec("sklearn.compose.ColumnTransformer", transformers=[
            ["cat", spec("sklearn.preprocessing.OneHotEncoder"), ["region"]]])],
        ["model", LOGISTIC]])  # fmt: skip
    model = fit(source, encoder, "label", ["region"], None, None, POLICIES)
    unseen = pa.table({"region": ["atlantis"] * 3})
    with pytest.raises(VaultError, match="did not occur in training") as caught:
        predict(model, unseen, POLICIES)
    assert "atlantis" not in str(caught.value)


def test_training_warnings_are_recorded_by_category_not_raised(source: SourceTable) -> None:
    model = fit(source, spec("sklearn.linear_model.LogisticRegression", max_iter=1), "label", NUMERIC, None, None,
                POLICIES)  # fmt: skip
    assert model.warnings == ("ConvergenceWarning",)


def test_fit_validates_its_arguments(source: SourceTable) -> None:
    cases: list[tuple[Any, ...]] = [
        ("label", ["nope"], None, "no column 'nope'"),
        ("nope", ["age"], None, "no column 'nope'"),
        ("label", ["age", "age"], None, "named twice"),
        ("label", ["age", "label"], None, "also a feature"),
        ("label", ["age"], 1.5, "test_size"),
        ("label", ["age"], 0.0, "test_size"),
        (None, ["age"], None, "name its target"),
    ]
    cases.append(("label", ["age"], 0.999, "too few records"))
    for target, features, test_size, message in cases:
        with pytest.raises(VaultError, match=message):
            fit(source, LOGISTIC, target, features, test_size, None, POLICIES)


# -- sealing and export --------------------------------------------------------------------------------------------


def test_skops_round_trip_keeps_parameters_predictions_and_record_counts(source: SourceTable) -> None:
    forest = spec("sklearn.ensemble.GradientBoostingClassifier", n_estimators=10, random_state=0)
    model = fit(source, forest, "label", NUMERIC, 0.25, 0, POLICIES)
    data = to_skops(model, facts=True)
    header = json.loads(json.dumps(describe(model)))
    assert "225" not in json.dumps(header)  # counts travel in the (encrypted) payload, not the readable header
    restored = from_skops(data, header)
    assert restored.features == model.features and restored.train_records == model.train_records
    assert params(restored, POLICIES) == params(model, POLICIES)
    expected = predict(model, public_rows(), POLICIES)
    assert predict(restored, public_rows(), POLICIES).equals(expected)
    with pytest.raises(VaultError, match="without its evaluation set"):
        metrics(restored, POLICIES)
    with pytest.raises(PolicyViolation, match="single records' values"):
        to_skops(model)  # a boosted model's trees never leave as a file, whatever the caller checked
    linear = fit(source, LOGISTIC, "label", NUMERIC, 0.25, 0, POLICIES)
    plain = to_skops(linear)  # what an export gives the analyst
    assert type(sio.loads(plain, trusted=sio.get_untrusted_types(data=plain))) is type(linear.estimator)
    assert type(load_estimator(plain)) is type(linear.estimator)
    with pytest.raises(VaultError, match="no record counts"):
        from_skops(plain, json.loads(json.dumps(describe(linear))))
    with pytest.raises(VaultError, match="malformed"):
        from_skops(data, {**header, "task": "regression"})
    with pytest.raises(VaultError, match="malformed"):
        from_skops(data, {**header, "datasets": ["other"]})


@pytest.mark.parametrize(
    "name",
    ["sklearn.ensemble.HistGradientBoostingClassifier", "sklearn.tree.DecisionTreeClassifier",
     "sklearn.linear_model.SGDClassifier", "sklearn.naive_bayes.GaussianNB", "sklearn.linear_model.ElasticNet",
     "sklearn.ensemble.ExtraTreesRegressor", "sklearn.ensemble.GradientBoostingRegressor", "sklearn.cluster.KMeans"],
)  # fmt: skip
def test_fitted_allowlisted_models_load_under_the_type_check(source: SourceTable, name: str) -> None:
    cls = ALLOWED[name]
    task = models._task(cls())
    target = {"classification": "label", "regression": "cost"}.get(task)
    model = fit(source, spec(name, random_state=0) if "random_state" in cls().get_params() else spec(name),
                target, NUMERIC, None, None, POLICIES)  # fmt: skip
    restored = from_skops(to_skops(model, facts=True), describe(model))
    assert np.array_equal(restored.estimator.predict(model.X_eval[:20]), model.estimator.predict(model.X_eval[:20]))


def _with_schema(data: bytes, edit: Any) -> bytes:
    source = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for item in source.namelist():
            content = source.read(item)
            if item == "schema.json":
                content = json.dumps(edit(json.loads(content))).encode()
            target.writestr(item, content)
    return out.getvalue()


def test_skops_files_naming_anything_else_are_refused(source: SourceTable) -> None:
    x = source.table.select(NUMERIC).to_pandas().to_numpy(dtype=float)
    y = source.table.column("label").to_numpy()
    other = sio.dumps(KNeighborsClassifier().fit(x, y))  # skops itself trusts this by default
    with pytest.raises(VaultError, match=r"does not load: .*sklearn\.neighbors"):
        load_estimator(other)
    forest = sio.dumps(RandomForestClassifier(n_estimators=2, random_state=0).fit(x, y))
    assert type(load_estimator(forest)) is RandomForestClassifier

    def system(schema: dict[str, Any]) -> dict[str, Any]:
        schema["content"]["content"]["n_estimators"] = {"__class__": "system", "__module__": "os",
                                                        "__loader__": "FunctionNode", "content": {}}  # fmt: skip
        return schema

    with pytest.raises(VaultError, match=r"does not load: 'os\.system'"):
        load_estimator(_with_schema(forest, system))

    def loader(schema: dict[str, Any]) -> dict[str, Any]:
        schema["content"]["content"]["n_estimators"]["__loader__"] = "MethodNode"
        return schema

    with pytest.raises(VaultError, match="loader the vault does not run"):
        load_estimator(_with_schema(forest, loader))
    for junk in (b"", b"PK\x03\x04 not a zip", b"\x00" * 100):
        with pytest.raises(VaultError, match=r"not a \.skops file"):
            load_estimator(junk)


def test_round_trip_of_client_encoding_for_a_fitted_pipeline(source: SourceTable) -> None:
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    encoded = encode_estimator(make_pipeline(SimpleImputer(), LogisticRegression(C=0.5)))
    model = fit(source, json.loads(json.dumps(encoded)), "label", NUMERIC, None, None, POLICIES)
    assert model.estimator.steps[1][1].C == 0.5


def test_multiclass_string_targets(source: SourceTable) -> None:
    model = fit(source, LOGISTIC, "region", NUMERIC, 0.3, 0, POLICIES)
    values = metrics(model, POLICIES)
    assert {"f1", "roc_auc", "log_loss"} <= set(values)  # macro and one-vs-rest averages over three classes
    released = params(model, POLICIES)
    assert released["classes_"] == sorted(REGIONS)
    assert set(released["coef_"]) == set(REGIONS) and set(released["intercept_"]) == set(REGIONS)
    out = predict(model, public_rows(), POLICIES)
    assert out.column_names == ["prediction", *(f"proba_{region}" for region in sorted(REGIONS))]
    assert set(out.column("prediction").to_pylist()) <= set(REGIONS)


def test_numeric_features_reach_scikit_learn_as_one_c_ordered_float64_matrix(source: SourceTable) -> None:
    """The layout scikit-learn's solvers want, so fitting adds no second copy (the speed of the vault path)."""
    matrix = models._matrix(source.table, NUMERIC)
    assert matrix.dtype == np.float64 and matrix.flags.c_contiguous
    assert np.array_equal(matrix[:, 2], source.table.column("smoker").to_numpy(zero_copy_only=False).astype(float))
    assert not fit(source, LOGISTIC, "label", NUMERIC, None, None, POLICIES).frame


def test_an_exported_model_leaves_out_values_per_training_row(source: SourceTable) -> None:
    kmeans = spec("sklearn.cluster.KMeans", n_clusters=3, random_state=0, n_init=2)
    model = fit(source, kmeans, None, ["age", "bmi"], None, None, POLICIES)
    exported = load_estimator(to_skops(model))
    assert not hasattr(exported, "labels_")  # a cluster label for every training record
    assert np.array_equal(exported.predict(model.X_eval), model.estimator.predict(model.X_eval))
    assert hasattr(model.estimator, "labels_")  # the vault's own model is untouched
    sealed = from_skops(to_skops(model, facts=True), describe(model))
    assert hasattr(sealed.estimator, "labels_")  # a sealed model stays whole: only this vault can open it
    forest = spec("sklearn.ensemble.RandomForestClassifier", n_estimators=10, oob_score=True, random_state=0)
    pipeline = spec("sklearn.pipeline.Pipeline", steps=[["scale", spec("sklearn.preprocessing.StandardScaler")],
                                                        ["model", forest]])  # fmt: skip
    fitted = fit(source, pipeline, "label", NUMERIC, None, None, POLICIES)
    with pytest.raises(PolicyViolation, match="single records' values"):
        to_skops(fitted)  # out-of-bag predictions per record, and trees: the forest does not leave at all


# -- training fails or succeeds by the request, never by the values ----------------------------------------------


def _fit_outcome(table: pa.Table, estimator: dict[str, Any], target: str | None, features: list[str]) -> str:
    try:
        fit(SourceTable.from_dataset("claims", table), estimator, target, features, None, 0, POLICIES)
    except VaultError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "trained"


def _with(table: pa.Table, name: str, rows: dict[int, Any]) -> pa.Table:
    values = table.column(name).to_pylist()
    for row, value in rows.items():
        values[row] = value
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values, table.schema.field(name).type))


@pytest.mark.parametrize(
    "estimator",
    [
        LOGISTIC,
        spec("sklearn.ensemble.HistGradientBoostingClassifier", max_iter=5),
        spec("sklearn.tree.DecisionTreeClassifier", max_depth=2),
        spec(
            "sklearn.pipeline.Pipeline",
            steps=[["scale", spec("sklearn.preprocessing.StandardScaler")], ["model", LOGISTIC]],
        ),
        spec(
            "sklearn.pipeline.Pipeline",
            steps=[["impute", spec("sklearn.impute.SimpleImputer", strategy="mean")], ["model", LOGISTIC]],
        ),
    ],
)
def test_missing_and_infinite_features_never_make_training_fail(estimator: dict[str, Any]) -> None:
    table = claims()
    variants = [
        table,
        _with(table, "bmi", {3: float("nan")}),
        _with(table, "bmi", {3: float("inf"), 5: float("-inf")}),
        _with(table, "age", {0: None, 1: float("nan")}),
    ]
    assert {_fit_outcome(t, estimator, "label", NUMERIC) for t in variants} == {"trained"}


def test_an_estimator_that_rejects_nan_trains_on_complete_rows_and_one_that_accepts_it_on_all() -> None:
    table = _with(claims(), "bmi", {3: float("inf"), 5: float("nan")})
    source = SourceTable.from_dataset("claims", table)
    assert fit(source, LOGISTIC, "label", NUMERIC, None, None, POLICIES).n_train == table.num_rows - 2
    imputed = spec("sklearn.pipeline.Pipeline", steps=[["impute", spec("sklearn.impute.SimpleImputer")],
                                                       ["model", LOGISTIC]])  # fmt: skip
    assert fit(source, imputed, "label", NUMERIC, None, None, POLICIES).n_train == table.num_rows
    clusters = fit(source, spec("sklearn.cluster.KMeans", n_clusters=2, n_init=1), None, NUMERIC, None, 0, POLICIES)
    assert clusters.n_train == table.num_rows - 2


def test_one_class_and_a_second_class_of_few_records_are_refused_alike() -> None:
    table = claims()
    labels = table.column("label").to_pylist()
    ones = [i for i, label in enumerate(labels) if label == 1]
    single = _with(table, "label", dict.fromkeys(ones, 0))
    few = _with(table, "label", dict.fromkeys(ones[K - 1 :], 0))  # K - 1 records of class 1 remain
    one = _with(table, "label", dict.fromkeys(ones[1:], 0))
    seen = {_fit_outcome(t, LOGISTIC, "label", NUMERIC) for t in (single, few, one)}
    assert seen == {
        "PolicyViolation: the smallest class of the training target is computed from fewer than 10 records of the "
        "dataset [rule release.min_group_size of 'claims']"
    }
    # The legitimate twin: K records of the second class train, and the model's parameters are released.
    enough = _with(table, "label", dict.fromkeys(ones[K:], 0))
    model = fit(SourceTable.from_dataset("claims", enough), LOGISTIC, "label", NUMERIC, None, None, POLICIES)
    assert params(model, POLICIES)["classes_"] == [0, 1]


def test_a_regression_target_beyond_2_53_trains_as_floats() -> None:
    table = claims()
    small = table.append_column("big", pa.array(range(table.num_rows), pa.int64()))
    huge = table.append_column("big", pa.array([2**62 + i for i in range(table.num_rows)], pa.int64()))
    linear = spec("sklearn.linear_model.LinearRegression")
    assert {_fit_outcome(t, linear, "big", NUMERIC) for t in (small, huge)} == {"trained"}
    model = fit(SourceTable.from_dataset("claims", huge), linear, "big", NUMERIC, None, None, POLICIES)
    assert model.y_eval is not None and float(model.y_eval[0]) == float(2**62)


def test_a_score_that_is_not_finite_is_released_as_null() -> None:
    table = claims()
    linear = spec("sklearn.linear_model.LinearRegression")
    ordinary = fit(SourceTable.from_dataset("claims", table), linear, "cost", NUMERIC, 0.3, 0, POLICIES)
    value = score(ordinary, POLICIES)
    assert value is not None and 0.5 < value <= 1.0
    overflowing = table.set_column(6, "cost", pa.array([1e300 * (i % 7) for i in range(table.num_rows)]))
    model = fit(SourceTable.from_dataset("claims", overflowing), linear, "cost", NUMERIC, 0.3, 0, POLICIES)
    assert score(model, POLICIES) is None
