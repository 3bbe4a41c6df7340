"""Red team: models fitted to one patient, with documented calls only, against the hospital's admissions.

Each attack computes the analyst's estimate of the target patient's value from whatever numbers came back and
checks it is not that value; each has a legitimate twin over all patients that is still released, with values
checked against scikit-learn on the plaintext.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd  # type: ignore[import-untyped]
import pytest
import skops.io as sio  # type: ignore[import-untyped]
from sklearn.impute import SimpleImputer  # type: ignore[import-untyped]
from sklearn.linear_model import Lasso, LinearRegression  # type: ignore[import-untyped]
from sklearn.metrics import mean_absolute_error, r2_score  # type: ignore[import-untyped]
from sklearn.pipeline import Pipeline  # type: ignore[import-untyped]
from sklearn.preprocessing import RobustScaler, StandardScaler  # type: ignore[import-untyped]

import confnb as cn

Recovered = Callable[[float | None, float], bool]


def who(t: Any, target: pd.Series) -> Any:
    """The target patient by what an attacker knows of them: age, sex, diagnosis and the bill's amount."""
    return (
        (t.age == int(target.age))
        & (t.sex == str(target.sex))
        & (t.diagnosis == str(target.diagnosis))
        & (t.cost == float(target.cost))
    )


def singles_out_the_target(frame: pd.DataFrame, target: pd.Series) -> None:
    matches = (
        (frame.age == target.age)
        & (frame.sex == target.sex)
        & (frame.diagnosis == target.diagnosis)
        & (frame.cost == target.cost)
    )
    assert int(matches.sum()) == 1


def attempt(call: Callable[[], Any]) -> Any:
    """What came back to the analyst: the value, or None when the policy withheld it."""
    try:
        return call()
    except cn.PolicyViolation as violation:
        refusal = (violation.rule, violation.datasets)
    assert refusal == ("release.min_group_size", ("admissions",))
    return None


def skops_payload(path: Path) -> bytes:
    bundle = json.loads(path.read_bytes())
    return base64.b64decode(bundle["payload"])


HUGE_LASSO = Lasso(alpha=1e12, fit_intercept=False)


def bands(frame: pd.DataFrame) -> Any:
    return np.where(frame.age < 40, 1.0, np.where(frame.age < 70, 2.0, 3.0))


def vault_model(hospital: Any) -> Any:
    """The vault's own copy of the one model fitted in this kernel, to show what a withheld release would have given."""
    (inner,) = hospital.vault._models.values()
    return inner


# -- extreme regularisation on a masked target: MAE times n ------------------------------------------------------------


@pytest.mark.parametrize("fill", [None, 0.0], ids=["null", "zero"])
def test_a_huge_lasso_on_a_masked_target_does_not_give_the_value(
    hospital: Any, recovered: Recovered, fill: Any, tmp_path: Path
) -> None:
    singles_out_the_target(hospital.frame, hospital.target)
    secret = float(hospital.target.length_of_stay)
    t = hospital.open()
    masked = t.assign(y=cn.where(who(t, hospital.target), t.length_of_stay, fill))
    model = attempt(lambda: cn.fit(HUGE_LASSO, masked, target="y", features=["age"]))
    if model is None:
        assert fill is None  # one complete row: refused before training
        return
    values = attempt(model.metrics)
    estimate = None if values is None else values["mae"] * (values["n_train"] + values["n_test"])
    assert not recovered(estimate, secret)
    assert values is None
    inner = vault_model(hospital)  # what was at stake: the vault's own MAE times n is the stay
    assert recovered(mean_absolute_error(inner.y_eval, inner.estimator.predict(inner.X_eval)) * 4000, secret)
    for release in (model.score, model.params, lambda: model.predict(pd.DataFrame({"age": [40, 60]}))):
        assert attempt(release) is None
    assert attempt(lambda: cn.export(model, tmp_path / "lasso.skops")) is None


def test_constants_chosen_by_predicates_are_no_records_target(hospital: Any, recovered: Recovered) -> None:
    """Bands of constants pass a "differs from the most common value" count; only contributing records count."""
    frame, target = hospital.frame, hospital.target
    secret = float(target.length_of_stay)
    t = hospital.open()
    banded = cn.where(who(t, target), t.length_of_stay, cn.where(t.age < 40, 1.0, cn.where(t.age < 70, 2.0, 3.0)))
    model = cn.fit(HUGE_LASSO, t.assign(y=banded), target="y", features=["age"])
    values = attempt(model.metrics)
    estimate = None
    if values is not None:  # the zero model's absolute errors are the constants, whose counts an aggregate tells
        estimate = values["mae"] * len(frame) - bands(frame)[frame.patient_id != hospital.target_id].sum()
    assert not recovered(estimate, secret)
    # What was at stake: the vault's own metric would have given the stay.
    inner = vault_model(hospital)
    mae = mean_absolute_error(inner.y_eval, inner.estimator.predict(inner.X_eval))
    assert recovered(mae * len(frame) - bands(frame)[frame.patient_id != hospital.target_id].sum(), secret)
    assert attempt(model.params) is None


def test_the_legitimate_lasso_over_every_patient_is_released(hospital: Any) -> None:
    frame = hospital.frame
    t = hospital.open()
    model = cn.fit(Lasso(alpha=0.5), t, target="length_of_stay", features=["age", "cost"])
    values = model.metrics()
    expected = Lasso(alpha=0.5).fit(frame[["age", "cost"]].to_numpy(float), frame.length_of_stay)
    predicted = expected.predict(frame[["age", "cost"]].to_numpy(float))
    assert values["mae"] == pytest.approx(mean_absolute_error(frame.length_of_stay, predicted), rel=1e-6)
    assert model.params()["coef_"]["cost"] == pytest.approx(expected.coef_[1], rel=1e-6)


# -- an indicator feature: coef_ + intercept_ ---------------------------------------------------------------------


@pytest.mark.parametrize("form", ["predicate", "where"])
def test_an_indicator_of_one_patient_does_not_give_their_stay(hospital: Any, recovered: Recovered, form: str) -> None:
    frame, target = hospital.frame, hospital.target
    singles_out_the_target(frame, target)
    secret = float(target.length_of_stay)
    t = hospital.open()
    flag = who(t, target) if form == "predicate" else cn.where(who(t, target), 1, 0)
    model = cn.fit(LinearRegression(), t.assign(flag=flag), target="length_of_stay", features=["age", "cost", "flag"])
    released = model.params()
    coef = released["coef_"]
    assert coef["flag"] is None and released["confnb_suppressed"] == ["flag"]
    baseline = released["intercept_"] + coef["age"] * target.age + coef["cost"] * target.cost
    estimate = None if coef["flag"] is None else baseline + coef["flag"]
    assert not recovered(estimate, secret)
    inner = vault_model(hospital).estimator  # what was at stake: coef_ + intercept_ at the patient's age and cost
    assert recovered(inner.intercept_ + inner.coef_ @ [target.age, target.cost, 1.0], secret)
    # The rest of the model is the regression over every other patient, as scikit-learn computes it.
    others = frame[frame.patient_id != hospital.target_id]
    expected = LinearRegression().fit(others[["age", "cost"]].to_numpy(float), others.length_of_stay)
    assert coef["age"] == pytest.approx(expected.coef_[0], rel=1e-6)
    assert released["intercept_"] == pytest.approx(expected.intercept_, rel=1e-6)
    # Predictions at flag 1 and 0 differ by the coefficient; metrics tell the squared deviation through R².
    public = pd.DataFrame({"age": [int(target.age)] * 2, "cost": [float(target.cost)] * 2, "flag": [1, 0]})
    predictions = attempt(lambda: model.predict(public))
    assert not recovered(None if predictions is None else float(predictions[0]), secret)
    assert attempt(model.metrics) is None and attempt(model.score) is None


def test_columns_that_combine_into_an_indicator_do_not_give_the_stay(hospital: Any, recovered: Recovered) -> None:
    """``age`` and ``age + indicator`` each have thousands of distinct records; their difference singles one out."""
    target = hospital.target
    secret = float(target.length_of_stay)
    t = hospital.open()
    shifted = t.assign(age2=t.age + cn.where(who(t, target), 1, 0))
    model = cn.fit(LinearRegression(), shifted, target="length_of_stay", features=["age", "cost", "age2"])
    released = attempt(model.params)
    estimate = None
    if released is not None:
        coef = released["coef_"]
        estimate = released["intercept_"] + coef["age"] * target.age + coef["cost"] * target.cost
        estimate += coef["age2"] * (target.age + 1)
    assert not recovered(estimate, secret)
    inner = vault_model(hospital).estimator  # what was at stake
    assert recovered(inner.intercept_ + inner.coef_ @ [target.age, target.cost, target.age + 1], secret)
    public = pd.DataFrame({"age": [int(target.age)], "cost": [float(target.cost)], "age2": [int(target.age) + 1]})
    predictions = attempt(lambda: model.predict(public))
    assert not recovered(None if predictions is None else float(predictions[0]), secret)
    assert attempt(model.metrics) is None


def test_the_legitimate_regression_of_stay_on_age_and_cost_is_released(hospital: Any, tmp_path: Path) -> None:
    frame = hospital.frame
    x = frame[["age", "cost"]].to_numpy(float)
    t = hospital.open()
    model = cn.fit(LinearRegression(), t, target="length_of_stay", features=["age", "cost"])
    expected = LinearRegression().fit(x, frame.length_of_stay)
    released = model.params()
    assert released["coef_"]["age"] == pytest.approx(expected.coef_[0], rel=1e-6)
    assert released["coef_"]["cost"] == pytest.approx(expected.coef_[1], rel=1e-6)
    assert released["intercept_"] == pytest.approx(expected.intercept_, rel=1e-6)
    values = model.metrics()
    assert values["r2"] == pytest.approx(r2_score(frame.length_of_stay, expected.predict(x)), rel=1e-9)
    exported = sio.loads(payload := skops_payload(cn.export(model, tmp_path / "stay.skops")),
                         trusted=sio.get_untrusted_types(data=payload))  # fmt: skip
    assert exported.coef_ == pytest.approx(expected.coef_, rel=1e-6)
    assert np.allclose(exported.predict(x[:50]), expected.predict(x[:50]))


# -- an export's preprocessing statistics ---------------------------------------------------------------------


def test_an_export_does_not_carry_a_scaler_of_one_patients_value(
    hospital: Any, recovered: Recovered, tmp_path: Path
) -> None:
    """RobustScaler.center_ of a feature present in one row is that row's value; params() never showed it."""
    target = hospital.target
    secret = float(target.length_of_stay)
    t = hospital.open()
    lone = t.assign(x=cn.where(who(t, target), t.length_of_stay, None))
    pipeline = Pipeline([("scale", RobustScaler()), ("impute", SimpleImputer()), ("fit", LinearRegression())])
    model = attempt(lambda: cn.fit(pipeline, lone, target="cost", features=["age", "x"]))
    estimate = None
    if model is not None:
        path = attempt(lambda: cn.export(model, tmp_path / "robust.skops"))
        if path is not None:
            payload = skops_payload(path)
            estimate = float(sio.loads(payload, trusted=sio.get_untrusted_types(data=payload))[0].center_[1])
    assert not recovered(estimate, secret)
    assert model is None  # one complete row: nothing was trained

    # Filled with zeros instead, every row is complete: a mean-based scaler's mean_ times n would be the value.
    zeros = t.assign(x=cn.where(who(t, target), t.length_of_stay, 0.0))
    for scaler in (StandardScaler(), RobustScaler()):
        fitted = cn.fit(Pipeline([("scale", scaler), ("fit", LinearRegression())]), zeros, target="cost",
                        features=["age", "x"])  # fmt: skip
        path = attempt(partial(cn.export, fitted, tmp_path / "zeros.skops"))
        estimate = None
        if path is not None:
            payload = skops_payload(path)
            step = sio.loads(payload, trusted=sio.get_untrusted_types(data=payload))[0]
            n = len(hospital.frame)
            estimate = float(step.mean_[1]) * n if hasattr(step, "mean_") else float(step.center_[1])
        assert not recovered(estimate, secret)
        assert path is None
    assert list(tmp_path.iterdir()) == []  # no partial file


def test_the_legitimate_scaled_pipeline_exports_its_statistics(hospital: Any, tmp_path: Path) -> None:
    frame = hospital.frame
    x = frame[["age", "cost"]].to_numpy(float)
    t = hospital.open()
    model = cn.fit(Pipeline([("scale", StandardScaler()), ("fit", LinearRegression())]), t, target="length_of_stay",
                   features=["age", "cost"])  # fmt: skip
    payload = skops_payload(cn.export(model, tmp_path / "scaled.skops"))
    exported = sio.loads(payload, trusted=sio.get_untrusted_types(data=payload))
    assert exported[0].mean_ == pytest.approx(x.mean(axis=0), rel=1e-9)
    expected = Pipeline([("scale", StandardScaler()), ("fit", LinearRegression())]).fit(x, frame.length_of_stay)
    assert np.allclose(exported.predict(x[:50]), expected.predict(x[:50]))
    assert set(vars(exported[-1])) - set(exported[-1].get_params()) == {"coef_", "intercept_", "n_features_in_"}
