"""Estimator specs: what the analyst's process sends instead of a pickled estimator. Every allowlisted class, and
pipelines and column transformers of them, must come back from the vault with exactly the parameters given; a
parameter that is not data is refused on the analyst's side, naming it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.compose import ColumnTransformer, make_column_selector
from sklearn.ensemble import GradientBoostingClassifier, HistGradientBoostingClassifier, RandomForestRegressor
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, MinMaxScaler, OneHotEncoder, RobustScaler, StandardScaler
from sklearn.tree import DecisionTreeClassifier

from confnb.analyst import estimators
from confnb.analyst.estimators import class_path, encode_estimator
from kernel_enclave.vault.models import ALLOWED, build_estimator

ESTIMATORS_FILE = Path(estimators.__file__)


def normalized(value: Any) -> Any:
    """Parameters in a comparable form: estimators by class and parameters (they compare by identity), NaN equal
    to NaN, lists and tuples kept apart (scikit-learn insists on tuples in places)."""
    if hasattr(value, "get_params") and not isinstance(value, type):
        return ("estimator", type(value), normalized(value.get_params(deep=False)))
    if isinstance(value, dict):
        return {key: normalized(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return (type(value).__name__, [normalized(item) for item in value])
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value


def round_trip(estimator: Any) -> Any:
    """Encode on the analyst's side, cross the JSON wire, rebuild in the vault."""
    wire = json.loads(json.dumps(encode_estimator(estimator), allow_nan=False))
    return build_estimator(wire)


def assert_same(original: Any, rebuilt: Any) -> None:
    assert type(rebuilt) is type(original)
    assert normalized(rebuilt.get_params(deep=True)) == normalized(original.get_params(deep=True))


@pytest.mark.parametrize("name", sorted(name for name in ALLOWED if not name.endswith(("Pipeline", "Transformer"))))
def test_every_allowlisted_class_round_trips_with_defaults(name: str) -> None:
    original = ALLOWED[name]()
    encoded = encode_estimator(original)
    assert encoded["class"] == name  # the public path, which is what the vault's allowlist names
    assert_same(original, round_trip(original))


@pytest.mark.parametrize(
    "original",
    [
        LogisticRegression(C=np.float64(0.3), class_weight={0: 1.0, 1: 2.5}, max_iter=np.int64(50), random_state=3),
        MinMaxScaler(feature_range=(-1, 2)),
        RobustScaler(quantile_range=(10.0, 90.0)),
        SimpleImputer(missing_values=np.nan, strategy="constant", fill_value=-1),
        SimpleImputer(missing_values=-999, strategy="median"),
        OneHotEncoder(dtype=np.float32, categories=[["a", "b"]], handle_unknown="ignore", sparse_output=False),
        GradientBoostingClassifier(init=DecisionTreeClassifier(max_depth=2), learning_rate=0.05),
        HistGradientBoostingClassifier(categorical_features=[0], monotonic_cst=[1, 0], max_iter=7),
        RandomForestRegressor(max_features=None, max_depth=4, n_estimators=5, bootstrap=False),
        SimpleImputer(strategy="constant", fill_value=float("-inf")),
        make_pipeline(SimpleImputer(), StandardScaler(), LogisticRegression()),
        Pipeline([("scale", StandardScaler()), ("skip", "passthrough"), ("model", Ridge(alpha=2.0))]),
        ColumnTransformer(
            [
                ("num", make_pipeline(SimpleImputer(), StandardScaler()), ["a", "b"]),
                ("cat", OneHotEncoder(handle_unknown="ignore"), ["c"]),
                ("gone", "drop", ["d"]),
                ("kept", "passthrough", [4, 5]),
            ],
            remainder=MinMaxScaler(),
            transformer_weights={"num": 2.0, "cat": 1.0},
        ),
        make_pipeline(
            ColumnTransformer([("num", StandardScaler(), ["a"]), ("cat", OneHotEncoder(), "c")]),
            HistGradientBoostingClassifier(),
        ),
    ],
    ids=lambda estimator: type(estimator).__name__,
)
def test_non_default_parameters_pipelines_and_column_transformers_round_trip(original: Any) -> None:
    assert_same(original, round_trip(original))


def test_the_spec_is_plain_json_with_tagged_values() -> None:
    encoded = encode_estimator(
        make_pipeline(SimpleImputer(), OneHotEncoder(), LogisticRegression(class_weight={0: 1, 1: 3}))
    )
    assert encoded["class"] == "sklearn.pipeline.Pipeline"
    steps = encoded["params"]["steps"]
    assert [name for name, _ in steps] == ["simpleimputer", "onehotencoder", "logisticregression"]
    assert steps[0][1]["params"]["missing_values"] == {"float": "nan"}
    assert steps[1][1]["params"]["dtype"] == {"dtype": "float64"}
    assert steps[2][1]["params"]["class_weight"] == {"dict": [[0, 1], [1, 3]]}
    json.dumps(encoded, allow_nan=False)


@pytest.mark.parametrize(
    ("estimator", "where"),
    [
        (FunctionTransformer(func=np.log1p), "FunctionTransformer.func"),
        (LogisticRegression(random_state=np.random.RandomState(0)), "LogisticRegression.random_state"),
        (OneHotEncoder(categories=[np.array(["a", "b"])]), "OneHotEncoder.categories[0]"),
        (
            ColumnTransformer([("num", StandardScaler(), make_column_selector(dtype_include=float))]),
            "ColumnTransformer.transformers[0][2]",
        ),
        (make_pipeline(FunctionTransformer(func=lambda x: x)), "steps[0][1] FunctionTransformer.func"),
        (LogisticRegression(class_weight={(0, 1): 1.0}), "LogisticRegression.class_weight"),
        (Ridge(alpha=object()), "Ridge.alpha"),
    ],
)
def test_parameters_that_are_not_data_are_refused_naming_the_parameter(estimator: Any, where: str) -> None:
    with pytest.raises(TypeError) as caught:
        encode_estimator(estimator)
    assert where in str(caught.value)


def test_only_estimator_instances_are_encoded() -> None:
    for thing in (LogisticRegression, "LogisticRegression", {"class": "x"}, 3):
        with pytest.raises(TypeError, match="not a scikit-learn estimator instance"):
            encode_estimator(thing)


def test_class_paths_are_public_module_paths() -> None:
    assert class_path(HistGradientBoostingClassifier) == "sklearn.ensemble.HistGradientBoostingClassifier"
    assert class_path(OneHotEncoder) == "sklearn.preprocessing.OneHotEncoder"

    class Local(Ridge):  # not exported anywhere: the full path, which the vault's allowlist will not know
        pass

    assert class_path(Local).endswith("test_estimators.test_class_paths_are_public_module_paths.<locals>.Local")


def test_encoding_imports_nothing_from_the_enclave() -> None:
    """It runs in the analyst's process and needs only scikit-learn: loaded on its own, outside the confnb package,
    it encodes a pipeline without any of the vault's code being imported."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('standalone', {str(ESTIMATORS_FILE)!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "from sklearn.pipeline import make_pipeline\n"
        "from sklearn.preprocessing import StandardScaler\n"
        "from sklearn.linear_model import Ridge\n"
        "module.encode_estimator(make_pipeline(StandardScaler(), Ridge()))\n"
        "print(sorted(m for m in sys.modules if m.startswith(('kernel_enclave', 'confnb'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


finite = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(
    c=finite,
    weights=st.dictionaries(st.integers(0, 5), finite, max_size=4),
    tol=st.floats(min_value=1e-9, max_value=1.0) | st.just(np.float32(0.5)),
    intercept=st.booleans(),
    random_state=st.none() | st.integers(0, 2**31 - 1),
)
def test_encoded_parameters_survive_the_wire_exactly(
    c: float, weights: dict[int, float], tol: float, intercept: bool, random_state: int | None
) -> None:
    original = LogisticRegression(
        C=c, class_weight=weights or None, tol=tol, fit_intercept=intercept, random_state=random_state
    )
    assert_same(original, round_trip(original))
