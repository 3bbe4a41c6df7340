"""Models trained in a real vault: each of metrics, parameters and predictions is a release the policy decides."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

import confnb as cn
from confnb.analyst import SealedModel, SealedTable


@pytest.fixture
def claims(vault: Any) -> SealedTable:
    return cn.open("claims")


@pytest.fixture
def model(claims: SealedTable) -> SealedModel:
    return cn.fit(LogisticRegression(), claims, target="readmitted", features=["age"], test_size=0.25, random_state=0)


def test_fit_returns_a_handle_that_describes_the_model(model: SealedModel) -> None:
    assert model.estimator == "LogisticRegression"
    assert model.features == ["age"] and model.target == "readmitted"
    assert model.datasets == ("claims",)
    assert "LogisticRegression" in repr(model) and "stays in the vault" in repr(model)
    with pytest.raises(AttributeError, match=r"m\.params\(\)"):
        model.coef_  # noqa: B018
    with pytest.raises(TypeError, match=r"m\.seal"):
        pickle.dumps(model)


def test_metrics_score_and_params_are_released_values(model: SealedModel) -> None:
    metrics = model.metrics()
    assert isinstance(metrics, dict) and 0.5 < metrics["accuracy"] <= 1.0
    score = model.score()
    assert isinstance(score, float) and score == pytest.approx(metrics["accuracy"])
    params = model.params()
    assert params["features"] == ["age"] and params["classes_"] == [0, 1]
    assert params["coef_"]["age"] > 0  # older patients are readmitted more in this data
    assert isinstance(params["intercept_"], float)
    with pytest.raises(TypeError, match="held-out split"):
        model.score(pd.DataFrame({"age": [1]}), [0])


def test_predict_on_public_data_agrees_with_the_same_model_trained_here(vault: Any, model: SealedModel) -> None:
    public = pd.DataFrame({"age": [19, 35, 55, 75, 89], "unrelated": ["a", "b", "c", "d", "e"]})
    predictions = model.predict(public)
    assert isinstance(predictions, np.ndarray) and predictions.shape == (5,)
    params = model.params()
    local = LogisticRegression()
    local.fit(np.array([[0.0], [1.0]]), [0, 1])  # shape the estimator, then load the released parameters
    local.coef_ = np.array([[params["coef_"]["age"]]])
    local.intercept_ = np.array([params["intercept_"]])
    local.classes_ = np.array(params["classes_"])
    np.testing.assert_array_equal(predictions, local.predict(public[["age"]].to_numpy(dtype=float)))
    with pytest.raises(KeyError, match="'age'"):
        model.predict(pd.DataFrame({"years": [30]}))
    with pytest.raises(TypeError, match="pandas DataFrame"):
        model.predict([[30]])


def test_pipelines_and_regression_train_in_the_vault(claims: SealedTable, vault: Any) -> None:
    pipeline = Pipeline([("impute", SimpleImputer()), ("scale", StandardScaler()), ("fit", LinearRegression())])
    known_cost = claims[claims["cost"].notnull()]
    fitted = cn.fit(pipeline, known_cost, target="cost", features=["age"], random_state=1)
    assert fitted.task == "regression"
    metrics = fitted.metrics()
    assert set(metrics) & {"r2", "mae", "rmse", "mse"}


def test_a_never_release_feature_is_refused_before_training(claims: SealedTable) -> None:
    with pytest.raises(cn.PolicyViolation) as caught:
        cn.fit(LogisticRegression(), claims, target="readmitted", features=["patient_id", "age"])
    assert caught.value.rule == "release.never_release" and caught.value.datasets == ("claims",)


def test_model_kinds_follow_the_policy(vault: Any) -> None:
    members = cn.open("members")
    joined = cn.open("claims").join(members, on="patient_id")
    model = cn.fit(LogisticRegression(), joined, target="readmitted", features=["age"], random_state=0)
    with pytest.raises(cn.PolicyViolation) as caught:
        model.metrics()
    assert caught.value.rule == "release.allow" and caught.value.datasets == ("members",)
    with pytest.raises(cn.PolicyViolation):
        model.predict(pd.DataFrame({"age": [40]}))


def test_fit_arguments_are_checked_before_anything_is_sent(claims: SealedTable) -> None:
    with pytest.raises(KeyError, match="'nope'"):
        cn.fit(LogisticRegression(), claims, target="nope")
    with pytest.raises(ValueError, match="fraction"):
        cn.fit(LogisticRegression(), claims, target="readmitted", test_size=1.5)
    with pytest.raises(TypeError, match="SealedTable"):
        cn.fit(LogisticRegression(), pd.DataFrame({"a": [1]}), target="a")  # type: ignore[arg-type]


def test_a_forgotten_model_is_dropped_by_the_vault(claims: SealedTable) -> None:
    """A fitted model keeps its evaluation data in the vault; once no handle refers to it, the vault lets go."""
    import gc

    kept = cn.fit(LogisticRegression(), claims, target="readmitted", features=["age"], test_size=0.25)
    gone = cn.fit(LogisticRegression(), claims, target="readmitted", features=["age"], test_size=0.25)
    gone_id = repr(gone).split()[1].rstrip(":")
    del gone
    gc.collect()
    drops = [entry for entry in cn.audit() if entry["event"] == "request" and entry["fields"]["op"] == "drop"]
    assert len(drops) == 1
    with pytest.raises(cn.VaultError, match=f"no model '{gone_id}'"):
        kept._session.request({"op": "model_score", "model": gone_id})
    assert kept.score() > 0  # the handle still held is untouched
