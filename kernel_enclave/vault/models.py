"""Scikit-learn inside the vault: estimators rebuilt from specs, trained on plaintext, released under the policy.

The analyst describes an estimator as a JSON *spec* (:func:`confnb.analyst.estimators.encode_estimator`); the vault
rebuilds it here from an allowlist of classes (:data:`ALLOWED`) with every parameter checked, because the executor
is hostile: nothing it sends is unpickled, imported by name or called. A fitted model stays in the vault as a
:class:`TrainedModel` and leaves only as released facts: metrics on its evaluation set, its parameters, its
predictions on public data, or a sealed/exported ``.skops`` file, each behind the owners' output policy:

- features and target are model inputs, so a ``never_release`` column (or one derived from it) is refused before
  training starts;
- metrics need an evaluation set of at least ``min_group_size`` records; parameters and predictions need a training
  set that large, and every group whose value they reveal (a class label, a cluster centre, a one-hot category
  named in a coefficient) must be that large too;
- records are counted where they contribute: a row counts only when its target and every feature are present
  (NaN as null), rows without a target are left out of training, and a column counts only the records whose value
  differs from its most common value (and, for the target, holds a dataset value rather than a constant the plan
  put there). A target below k releases nothing of the model; a feature below k nulls the parameters tied to it and
  withholds metrics, predictions and the file; a linear fit whose coefficients pass through one record (leverage
  near 1, as with ``age`` and ``age + indicator``) is withheld whole;
- predictions are a released table, so ``max_rows`` caps them;
- an exported ``.skops`` file carries only :data:`FITTED_ATTRIBUTES`, checked on the vault's copy before it is
  written, and never the fitted state of a class that keeps single records' values (trees, extremes, medians).

Spec values beyond JSON scalars, lists and nested specs use three tagged objects, because JSON has no NaN, no
types and no non-string mapping keys: ``{"float": "nan"|"inf"|"-inf"}``, ``{"dtype": "float64"}`` and
``{"dict": [[key, value], ...]}``.

Errors never carry data values: scikit-learn and NumPy messages may quote values (an unknown category, an
unparsable string), so a failure is reported by exception type and a fixed description chosen here.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import io
import json
import math
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

import numpy as np
import pandas as pd  # type: ignore[import-untyped]
import polars as pl
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]
import skops.io as sio  # type: ignore[import-untyped]
from sklearn import metrics as skm  # type: ignore[import-untyped]
from sklearn.base import is_classifier, is_clusterer, is_regressor  # type: ignore[import-untyped]
from sklearn.compose import ColumnTransformer  # type: ignore[import-untyped]
from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]
from sklearn.pipeline import Pipeline  # type: ignore[import-untyped]
from sklearn.preprocessing import OneHotEncoder  # type: ignore[import-untyped]
from sklearn.utils import _safe_indexing, get_tags  # type: ignore[import-untyped]
from sklearn.utils._param_validation import InvalidParameterError  # type: ignore[import-untyped]

from confnb.policy.output import OutputPolicy
from kernel_enclave.vault import stoppable
from kernel_enclave.vault.combinations import RecordValues, isolating
from kernel_enclave.vault.plan import SourceTable
from kernel_enclave.vault.protocol import PolicyViolation, VaultError
from kernel_enclave.vault.release import check_columns, check_count, require_kind

__all__ = [
    "ALLOWED",
    "TrainedModel",
    "build_estimator",
    "describe",
    "fit",
    "from_skops",
    "load_estimator",
    "metrics",
    "params",
    "predict",
    "score",
    "to_skops",
]

_ENSEMBLES = (
    "RandomForestClassifier",
    "RandomForestRegressor",
    "ExtraTreesClassifier",
    "ExtraTreesRegressor",
    "GradientBoostingClassifier",
    "GradientBoostingRegressor",
    "HistGradientBoostingClassifier",
    "HistGradientBoostingRegressor",
)
_CLASSES: Final = (
    (
        "sklearn.linear_model",
        ("LogisticRegression", "LinearRegression", "Ridge", "Lasso", "ElasticNet", "SGDClassifier", "SGDRegressor"),
    ),
    ("sklearn.tree", ("DecisionTreeClassifier", "DecisionTreeRegressor")),
    ("sklearn.ensemble", _ENSEMBLES),
    ("sklearn.naive_bayes", ("GaussianNB", "MultinomialNB", "BernoulliNB")),
    ("sklearn.cluster", ("KMeans",)),
    ("sklearn.preprocessing", ("StandardScaler", "MinMaxScaler", "RobustScaler", "OneHotEncoder")),
    ("sklearn.impute", ("SimpleImputer",)),
    ("sklearn.pipeline", ("Pipeline",)),
    ("sklearn.compose", ("ColumnTransformer",)),
)

ALLOWED: Final[Mapping[str, type]] = MappingProxyType(
    {f"{module}.{name}": getattr(importlib.import_module(module), name) for module, names in _CLASSES for name in names}
)
"""Public dotted class name -> class: the only estimators the vault builds, trains or loads."""

_SHORT_NAMES: Final = ", ".join(sorted(name.rsplit(".", 1)[1] for name in ALLOWED))
_DTYPES: Final[Mapping[str, type]] = MappingProxyType(
    {
        "float64": np.float64,
        "float32": np.float32,
        "int64": np.int64,
        "int32": np.int32,
        "int16": np.int16,
        "int8": np.int8,
        "uint8": np.uint8,
        "bool": np.bool_,
    }
)
_SPECIAL_FLOATS: Final = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
MAX_SPEC_DEPTH: Final = 8  # nested estimators (a pipeline in a column transformer in a pipeline, ...)
MAX_VALUE_DEPTH: Final = 16  # lists inside lists inside a parameter
MAX_SPEC_NODES: Final = 100_000  # values in one spec, so a hostile spec cannot make the vault build without bound
MAX_STRING: Final = 10_000
MAX_STEPS: Final = 64
SILHOUETTE_SAMPLE: Final = 10_000


# -- building estimators from specs -------------------------------------------------------------------------------


class _Budget:
    """Counts the values of one spec as it is decoded: a cap on work, whatever the nesting."""

    def __init__(self) -> None:
        self.nodes = 0

    def take(self, where: str) -> None:
        self.nodes += 1
        if self.nodes > MAX_SPEC_NODES:
            raise VaultError(f"estimator spec: more than {MAX_SPEC_NODES} values (at {where})")


def _short(text: object, limit: int = 80) -> str:
    """A bounded repr of analyst-supplied text for an error message (their own input, never data)."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def build_estimator(spec: object) -> Any:
    """A fresh, unfitted estimator from a spec, or :class:`VaultError` naming what is wrong with the spec.

    Every class comes from :data:`ALLOWED`, every parameter name from the class's own constructor, every value is
    data (JSON scalars, lists, tagged objects, nested specs); ``n_jobs`` is forced to ``None`` (one worker, no
    processes that would receive plaintext) and ``verbose`` to the class default (no training output in the vault's
    logs). Parameter values are validated by scikit-learn before any data is involved.
    """
    return _build(spec, "estimator", 0, _Budget())


def _build(spec: object, where: str, depth: int, budget: _Budget) -> Any:
    budget.take(where)
    if depth > MAX_SPEC_DEPTH:
        raise VaultError(f"{where}: estimators nested more than {MAX_SPEC_DEPTH} deep")
    if not isinstance(spec, Mapping):
        raise VaultError(f'{where}: an estimator spec is an object {{"class": ..., "params": {{...}}}}')
    unknown = set(spec) - {"class", "params"}
    if unknown:
        raise VaultError(f"{where}: unknown spec keys {sorted(map(_short, unknown))} (expected class, params)")
    name = spec.get("class")
    if not isinstance(name, str):
        raise VaultError(f'{where}: "class" must be a dotted class name such as sklearn.linear_model.Ridge')
    cls = ALLOWED.get(name)
    if cls is None:
        raise VaultError(f"estimator {_short(name)} is not on the vault's allowlist (allowed: {_SHORT_NAMES})")
    raw = spec.get("params", {})
    if not isinstance(raw, Mapping):
        raise VaultError(f'{where}: "params" of {cls.__name__} must be an object')
    signature = inspect.signature(cls)
    accepted = {
        p.name: p
        for p in signature.parameters.values()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }
    here = f"{where} {cls.__name__}" if where == "estimator" else f"{where} ({cls.__name__})"
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or key not in accepted:
            raise VaultError(f"{here}: unknown parameter {_short(key)} (parameters: {', '.join(sorted(accepted))})")
        default = accepted[key].default
        if key == "n_jobs":
            kwargs[key] = None
        elif key == "verbose":
            kwargs[key] = default
        elif cls is Pipeline and key == "memory":
            if value is not None:
                raise VaultError(f"{here}: memory must be null (the vault keeps no cache on disk)")
            kwargs[key] = None
        elif cls is Pipeline and key == "steps":
            kwargs[key] = _steps(value, f"{here}.steps", depth, budget)
        elif cls is ColumnTransformer and key == "transformers":
            kwargs[key] = _transformers(value, f"{here}.transformers", depth, budget)
        else:
            decoded = _decode(value, f"{here}.{key}", depth, 0, budget)
            if isinstance(default, tuple) and isinstance(decoded, list):
                decoded = tuple(decoded)
            kwargs[key] = decoded
    missing = [
        p for p, parameter in accepted.items() if parameter.default is inspect.Parameter.empty and p not in kwargs
    ]
    if missing:
        raise VaultError(f"{here}: missing parameter {', '.join(missing)}")
    try:
        estimator = cls(**kwargs)
        validate = getattr(estimator, "_validate_params", None)
        if callable(validate):
            validate()
    except InvalidParameterError as exc:  # about the analyst's own parameter values, never about data
        raise VaultError(f"{here}: {_bounded(str(exc))}") from None
    except (TypeError, ValueError) as exc:
        raise VaultError(f"{here}: invalid parameters ({type(exc).__name__})") from None
    return estimator


def _bounded(message: str, limit: int = 500) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."


def _decode(value: object, where: str, depth: int, level: int, budget: _Budget) -> Any:
    budget.take(where)
    if level > MAX_VALUE_DEPTH:
        raise VaultError(f"{where}: values nested more than {MAX_VALUE_DEPTH} deep")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise VaultError(f'{where}: a non-finite number is sent as {{"float": "nan"|"inf"|"-inf"}}')
        return float(value)
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise VaultError(f"{where}: a string longer than {MAX_STRING} characters")
        return str(value)
    if isinstance(value, list):
        return [_decode(item, f"{where}[{i}]", depth, level + 1, budget) for i, item in enumerate(value)]
    if isinstance(value, Mapping):
        if "class" in value:
            return _build(value, where, depth + 1, budget)
        keys = set(value)
        if keys == {"float"}:
            special = _SPECIAL_FLOATS.get(value["float"]) if isinstance(value["float"], str) else None
            if special is None:
                raise VaultError(f'{where}: "float" is one of nan, inf, -inf')
            return special
        if keys == {"dtype"}:
            dtype = _DTYPES.get(value["dtype"]) if isinstance(value["dtype"], str) else None
            if dtype is None:
                raise VaultError(f"{where}: dtype is one of {', '.join(_DTYPES)}")
            return dtype
        if keys == {"dict"}:
            pairs = value["dict"]
            if not isinstance(pairs, list):
                raise VaultError(f'{where}: "dict" is a list of [key, value] pairs')
            mapping: dict[Any, Any] = {}
            for i, pair in enumerate(pairs):
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise VaultError(f'{where}: "dict" is a list of [key, value] pairs')
                key = _decode(pair[0], f"{where} key {i}", depth, level + 1, budget)
                if not isinstance(key, str | int | float | bool):
                    raise VaultError(f"{where}: a mapping key is a string or a number")
                mapping[key] = _decode(pair[1], f"{where}[{_short(key, 40)}]", depth, level + 1, budget)
            return mapping
        raise VaultError(
            f'{where}: an object is an estimator spec ("class") or one of {{"float"}}, {{"dtype"}}, {{"dict"}}'
        )
    raise VaultError(f"{where}: a {type(value).__name__} is not a JSON value")


def _steps(value: object, where: str, depth: int, budget: _Budget) -> list[tuple[str, Any]]:
    if not isinstance(value, list) or not value or len(value) > MAX_STEPS:
        raise VaultError(f'{where}: a list of 1-{MAX_STEPS} ["name", spec] pairs')
    steps = []
    for i, item in enumerate(value):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
            raise VaultError(f'{where}[{i}]: a step is a ["name", spec] pair')
        step = item[1]
        estimator = step if step is None or step == "passthrough" else _build(step, f"{where}[{i}]", depth + 1, budget)
        steps.append((item[0], estimator))
    return steps


def _transformers(value: object, where: str, depth: int, budget: _Budget) -> list[tuple[str, Any, Any]]:
    if not isinstance(value, list) or len(value) > MAX_STEPS:
        raise VaultError(f'{where}: a list of at most {MAX_STEPS} ["name", spec, columns] triples')
    transformers = []
    for i, item in enumerate(value):
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)):
            raise VaultError(f'{where}[{i}]: a transformer is a ["name", spec|"drop"|"passthrough", columns] triple')
        name, step, columns = item
        transformer = step if step in ("drop", "passthrough") else _build(step, f"{where}[{i}]", depth + 1, budget)
        transformers.append((name, transformer, _columns_of(columns, f"{where}[{i}] columns", budget)))
    return transformers


def _columns_of(columns: object, where: str, budget: _Budget) -> Any:
    budget.take(where)
    if isinstance(columns, str) or (isinstance(columns, int) and not isinstance(columns, bool)):
        return columns
    if isinstance(columns, list) and (
        all(isinstance(c, str) for c in columns) or all(isinstance(c, int) and not isinstance(c, bool) for c in columns)
    ):
        return list(columns)
    raise VaultError(f"{where}: a column name, a position, or a list of names or of positions")


def _walk(estimator: Any) -> Iterator[Any]:
    """The estimator and every estimator nested in its parameters (pipeline steps, column transformers)."""
    yield estimator
    if isinstance(estimator, Pipeline):
        for _, step in estimator.steps:
            if hasattr(step, "get_params"):
                yield from _walk(step)
    elif isinstance(estimator, ColumnTransformer):
        for _, transformer, _ in getattr(estimator, "transformers_", estimator.transformers):
            if hasattr(transformer, "get_params"):
                yield from _walk(transformer)
        if hasattr(estimator.remainder, "get_params"):
            yield from _walk(estimator.remainder)
    else:
        for value in estimator.get_params(deep=False).values():
            if hasattr(value, "get_params") and not isinstance(value, type):
                yield from _walk(value)


# Fitted state that is single records' values whatever the policy's counts say: trees keep split points (midpoints
# of two records) and leaves as small as one record; MinMaxScaler keeps each feature's minimum and maximum;
# RobustScaler its median and quartiles (order statistics: one or two records' exact values).
_UNEXPORTABLE_MODULES = ("sklearn.tree", "sklearn.ensemble")
_UNEXPORTABLE_CLASSES = ("MinMaxScaler", "RobustScaler")

_LINEAR_ATTRIBUTES: Final = frozenset({"coef_", "intercept_", "n_iter_"})
_SHAPE: Final = frozenset({"n_features_in_", "feature_names_in_"})  # the analyst's own column names and count
_TREE_ATTRIBUTES: Final = frozenset({"classes_", "feature_importances_", "n_iter_"})

FITTED_ATTRIBUTES: Final[Mapping[str, frozenset[str]]] = MappingProxyType(
    {
        "LogisticRegression": _SHAPE | _LINEAR_ATTRIBUTES | {"classes_"},
        "LinearRegression": _SHAPE | {"coef_", "intercept_"},
        "Ridge": _SHAPE | _LINEAR_ATTRIBUTES | {"solver_"},
        "Lasso": _SHAPE | _LINEAR_ATTRIBUTES | {"l1_ratio"},
        "ElasticNet": _SHAPE | _LINEAR_ATTRIBUTES,
        "SGDClassifier": _SHAPE | _LINEAR_ATTRIBUTES | {"classes_"},
        "SGDRegressor": _SHAPE | _LINEAR_ATTRIBUTES,
        "GaussianNB": _SHAPE | {"classes_", "theta_", "var_", "class_prior_"},
        "MultinomialNB": _SHAPE | {"classes_", "feature_log_prob_", "class_log_prior_"},
        "BernoulliNB": _SHAPE | {"classes_", "feature_log_prob_", "class_log_prior_"},
        "KMeans": _SHAPE | {"cluster_centers_", "n_iter_", "_n_features_out", "_n_threads", "_algorithm", "_n_init"},
        "StandardScaler": _SHAPE | {"mean_", "var_", "scale_", "n_samples_seen_"},
        "OneHotEncoder": _SHAPE
        | {"categories_", "drop_idx_", "_infrequent_enabled", "_n_features_outs", "_drop_idx_after_grouping"},
        "SimpleImputer": _SHAPE | {"statistics_", "_fit_dtype", "_fill_dtype", "indicator_"},
        "ColumnTransformer": _SHAPE
        | {
            "transformers_",
            "_columns",
            "_remainder",
            "_transformer_to_input_indices",
            "output_indices_",
            "sparse_output_",
            "_name_to_fitted_passthrough",
        },
        "Pipeline": frozenset(),
        **{
            name: _SHAPE | _TREE_ATTRIBUTES for name in ("DecisionTreeClassifier", "DecisionTreeRegressor", *_ENSEMBLES)
        },
        "MinMaxScaler": _SHAPE,
        "RobustScaler": _SHAPE,
    }
)
"""Per allowlisted class, the fitted attributes that may leave the vault: :func:`params` releases the final
estimator's coefficients, intercepts, classes, importances, centres and iteration counts from this set, and an
exported ``.skops`` file carries nothing else (its preprocessing statistics — a scaler's means and scales, an
imputer's means, an encoder's categories — under the same record rules as a parameter of their columns). Each
attribute is a statistic of at least min_group_size records once the model's checks pass, or carries no data.
Classes whose fitted state holds single records' values (:data:`_UNEXPORTABLE_CLASSES`, trees) are here only for
what :func:`params` may show of them."""

# Fitted attributes an exported file leaves out: prediction does not need them and params() does not release them
# (per training row: cluster labels, out-of-bag predictions; or statistics nobody checked: singular values of the
# design matrix, a duality gap, an inertia, class counts, SGD's update count).
_STRIPPED: Final[Mapping[str, frozenset[str]]] = MappingProxyType(
    {
        "LinearRegression": frozenset({"rank_", "singular_"}),
        "Lasso": frozenset({"dual_gap_"}),
        "ElasticNet": frozenset({"dual_gap_"}),
        "SGDClassifier": frozenset(
            {
                "t_",
                "_expanded_class_weight",
                "_loss_function_",
                "_average_coef",
                "_average_intercept",
                "_standard_coef",
                "_standard_intercept",
            }
        ),
        "SGDRegressor": frozenset(
            {"t_", "_average_coef", "_average_intercept", "_standard_coef", "_standard_intercept"}
        ),
        "GaussianNB": frozenset({"class_count_", "epsilon_"}),
        "MultinomialNB": frozenset({"class_count_", "feature_count_"}),
        "BernoulliNB": frozenset({"class_count_", "feature_count_"}),
        "KMeans": frozenset({"labels_", "inertia_", "_tol"}),
    }
)


def _allowlist(estimator: Any) -> frozenset[str]:
    return FITTED_ATTRIBUTES.get(type(estimator).__name__, frozenset())


def _fitted_state(part: Any) -> list[str]:
    """The attributes fitting added to an estimator: everything in its ``__dict__`` but what its constructor sets
    (the analyst's own values, and constants such as SGD's ``C`` in scikit-learn 1.7)."""
    given = set(part.get_params(deep=False)) | set(vars(type(part)(**part.get_params(deep=False))))
    return [name for name in vars(part) if name not in given]


def _structural_refusal(estimator: Any) -> str | None:
    """Why an estimator's fitted state may not leave the vault as a file (whatever the counts), or None."""
    for part in _walk(estimator):
        kind = type(part)
        if kind.__module__.startswith(_UNEXPORTABLE_MODULES) or kind.__name__ in _UNEXPORTABLE_CLASSES:
            return (
                f"a fitted {kind.__name__} keeps single records' values (split points, leaves, extremes or "
                "medians); release what the policy allows with m.params() and m.metrics() instead"
            )
        if isinstance(part, OneHotEncoder) and (
            getattr(part, "drop_idx_", None) is not None or getattr(part, "_infrequent_enabled", False)
        ):
            return (
                "a fitted OneHotEncoder with drop or infrequent categories keeps category values whose records "
                "are not counted; export an encoder without them"
            )
        if type(part).__name__ == "SimpleImputer" and (
            part.strategy in ("median", "most_frequent") or getattr(part, "indicator_", None) is not None
        ):
            return (
                "a fitted SimpleImputer with a median or most frequent value (one record's value) or a missing "
                "indicator cannot be exported; use strategy='mean' or 'constant'"
            )
        allowed = _allowlist(part) | _STRIPPED.get(kind.__name__, frozenset())
        unknown = sorted(name for name in _fitted_state(part) if name not in allowed)
        if unknown:
            return f"a fitted {kind.__name__} carries {', '.join(unknown[:5])}, which is not on the export allowlist"
    return None


def _fit_policies(model: TrainedModel) -> dict[str, OutputPolicy]:
    """The min_group_size the model was trained under, for checks made without the policies at hand."""
    return {dataset: OutputPolicy(id="fit", min_group_size=k) for dataset, k in model.min_group_size.items()}


def export_refusal(model: TrainedModel, policies: Mapping[str, OutputPolicy] | None = None) -> str | None:
    """Why this model's fitted state may not leave the vault as a file, or None when it may.

    Structural reasons (a class whose state holds single records' values, an attribute not on
    :data:`FITTED_ATTRIBUTES`) are returned as text; a count below min_group_size raises
    :class:`PolicyViolation` naming the dataset and the column: every check :func:`params` makes, and the column
    rule for every feature and input (a scaler's mean of a column that is 0 but in one record is that record's
    value over n). Without ``policies`` the thresholds the model was trained under apply.
    """
    refusal = _structural_refusal(model.estimator)
    if refusal is not None:
        return refusal
    effective = policies if policies is not None else _fit_policies(model)
    if not set(model.datasets) <= set(effective):
        raise VaultError(f"{model.estimator_name}: the thresholds the model was trained under are unknown")
    _check_groups(model, effective)
    if any(isinstance(part, OneHotEncoder) for part in _walk(model.estimator)):
        _check_records(model.category_records, model, effective, "the smallest one-hot category")
    if getattr(_final(model.estimator), "cluster_centers_", None) is not None:
        _check_records(model.cluster_records, model, effective, "the smallest cluster")
    _check_columns(model, effective)
    return None


def _final(estimator: Any) -> Any:
    """The estimator whose parameters a pipeline exposes: its last step (``None`` for "passthrough")."""
    if isinstance(estimator, Pipeline):
        last = estimator.steps[-1][1]
        return None if last is None or last == "passthrough" else _final(last)
    return estimator


def _task(estimator: Any) -> str:
    if is_classifier(estimator):
        return "classification"
    if is_regressor(estimator):
        return "regression"
    if is_clusterer(estimator):
        return "clustering"
    return "transform"


# -- trained models ------------------------------------------------------------------------------------------------


Records = Mapping[str, int]
"""Per dataset, how many of its records something is computed from (distinct records: a join repeats rows)."""


@dataclass(repr=False, eq=False)
class TrainedModel:
    """A fitted estimator and the facts the output policy needs about its training, held only inside the vault.

    ``X_eval``/``y_eval`` are the evaluation set (the held-out split, else the training set) for metrics; a model
    brought back from a sealed file carries none. The record counts are computed from the training data when
    fitting, because releasing parameters or predictions later reveals those groups and :func:`params` and
    :func:`predict` must check them without the data: the training set, its smallest class, its smallest cluster
    and its smallest one-hot category, each per dataset (``None`` where the model has no such groups).

    Only *complete* rows count (target and every feature present, NaN taken as null), and a column counts only the
    records whose value differs from the column's most common value: a column that is one value everywhere but in
    a few rows is a statistic of those few, whatever the row count (:data:`_COLUMN_RULE`). ``target_records`` and
    ``eval_target_records`` apply that to the target on the training and evaluation rows (the target's records
    also must *contribute*, i.e. hold a dataset value rather than a constant of the plan); ``feature_records`` to
    each feature as given; ``input_records`` to each column the final estimator sees (after a pipeline's
    transforms), in the order of its coefficients. ``min_group_size`` keeps each dataset's k at fit time, for
    checks made without the policies at hand (an export's file). ``leverage`` is a linear model's largest
    training-row leverage (:func:`_max_leverage`).
    """

    estimator: Any
    estimator_name: str
    task: str
    features: tuple[str, ...]
    target: str | None
    n_train: int
    n_test: int
    datasets: frozenset[str]
    lineage: Mapping[str, frozenset[tuple[str, str]]]
    frame: bool = False  # inputs are given as a pandas DataFrame (column transformers, non-numeric features)
    X_eval: Any = None
    y_eval: Any = None
    train_records: Records = field(default_factory=dict)
    eval_records: Records = field(default_factory=dict)
    class_records: Records | None = None
    cluster_records: Records | None = None
    category_records: Records | None = None
    warnings: tuple[str, ...] = field(default=())  # warning categories raised while fitting, never their text
    target_records: Records | None = None
    eval_target_records: Records | None = None
    feature_records: Mapping[str, Records] | None = None
    input_records: tuple[Records, ...] | None = None
    min_group_size: Mapping[str, int] = field(default_factory=dict)
    leverage: float | None = None  # a linear model's largest training-row leverage, over its non-weak inputs
    # A regression target that a combination of the numeric features (and a constant) matches on all but fewer than
    # k records: whatever the model, its errors and coefficients describe those records (see _target_isolated).
    target_isolated: bool = False

    def __repr__(self) -> str:
        return (
            f"<TrainedModel {self.estimator_name} ({self.task}) features={list(self.features)} "
            f"target={self.target!r} datasets={sorted(self.datasets)}>"
        )


_FIT_FAILURES: Final = (
    ("contains nan", "the input has missing values; impute them (SimpleImputer) or use an estimator that accepts NaN"),
    ("infinity", "the input has infinite values or values too large for float64"),
    ("could not convert", "a feature is not numeric; encode it (OneHotEncoder in a ColumnTransformer)"),
    ("unknown label type", "the target is continuous but the estimator is a classifier"),
    ("number of classes has to be greater than one", "the training target has a single class"),
    ("needs samples of at least 2 classes", "the training target has a single class"),
    ("only one class", "the training target has a single class"),
    ("found unknown categories", "a category did not occur in training (OneHotEncoder(handle_unknown='ignore'))"),
    ("should be >= n_clusters", "fewer records than clusters"),
    ("0 sample(s)", "no records"),
    ("negative values", "the input has negative values, which this estimator does not accept"),
    ("feature names", "the columns do not match the features the model was trained on"),
    ("features, but", "the number of features does not match the model"),
)


def _failure(stage: str, name: str, exc: BaseException) -> VaultError:
    """A data-free description of an exception raised while scikit-learn touched data."""
    if isinstance(exc, VaultError):
        return exc
    if isinstance(exc, MemoryError):
        return VaultError(f"{stage} failed: out of memory in {name}")
    text = str(exc).lower()
    for needle, description in _FIT_FAILURES:
        if needle in text:
            return VaultError(f"{stage} failed: {type(exc).__name__} in {name} ({description})")
    return VaultError(f"{stage} failed: {type(exc).__name__} in {name} (details withheld: they may quote data)")


def _is_numeric(data_type: pa.DataType) -> bool:
    return bool(pa.types.is_integer(data_type) or pa.types.is_floating(data_type) or pa.types.is_boolean(data_type))


def _matrix(table: pa.Table, columns: Sequence[str]) -> np.ndarray[Any, Any]:
    """Numeric columns as one C-ordered float64 matrix, the layout scikit-learn's solvers want without copying.

    A pandas DataFrame would hold the same values column-major and make scikit-learn copy again. Arrow hands out
    each column without copying (nulls become NaN); the columns are written contiguously into a column-major
    buffer and transposed in one blocked copy, which is several times faster than writing strided columns.
    """
    buffer = np.empty((len(columns), table.num_rows), dtype=np.float64)
    for j, name in enumerate(columns):
        column = table.column(name)
        if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
            column = pc.cast(column, pa.float64())  # booleans; nulls become NaN
        buffer[j] = column.to_numpy()  # zero-copy for a single null-free chunk; integers with nulls arrive as NaN
    return np.ascontiguousarray(buffer.T)


def _inputs(table: pa.Table, features: Sequence[str], frame: bool) -> Any:
    """The features as the estimator reads them, infinities as NaN: scikit-learn rejects an infinity where it
    accepts NaN, so an infinity is missing, as it is when :func:`fit` picks the complete rows."""
    if frame:
        data = table.select(list(features)).to_pandas()
        floats = [name for name in data.columns if pd.api.types.is_float_dtype(data[name].dtype)]
        if floats:
            data[floats] = data[floats].replace([np.inf, -np.inf], np.nan)
        return data
    matrix = _matrix(table, features)
    matrix[np.isinf(matrix)] = np.nan
    return matrix


_IMPUTERS: Final = frozenset({"SimpleImputer"})


def _nan_flow(estimator: Any) -> str:
    """What an estimator does with a missing value: ``"rejects"`` it, ``"passes"`` it on, or ``"removes"`` it.

    Decided from the estimator's classes and scikit-learn's ``allow_nan`` tags, never from the data, so whether
    rows with missing features are dropped before training is a property of the request.
    """
    if estimator is None or isinstance(estimator, str):  # "passthrough" passes values on, "drop" keeps none
        return "removes" if estimator == "drop" else "passes"
    if type(estimator).__name__ in _IMPUTERS:
        return "removes"
    if isinstance(estimator, Pipeline):
        for _, step in estimator.steps:
            flow = _nan_flow(step)
            if flow != "passes":
                return flow  # after an imputer every later step sees complete rows
        return "passes"
    if isinstance(estimator, ColumnTransformer):
        parts = [_nan_flow(part) for _, part, _ in estimator.transformers] + [_nan_flow(estimator.remainder)]
        if "rejects" in parts:
            return "rejects"
        return "removes" if all(flow == "removes" for flow in parts) else "passes"
    try:
        return "passes" if get_tags(estimator).input_tags.allow_nan else "rejects"
    except Exception:  # an estimator without tags: assume the strict answer
        return "rejects"


def _rows(data: Any, rows: np.ndarray[Any, Any]) -> Any:
    return data.iloc[rows] if isinstance(data, pd.DataFrame) else np.take(data, rows, axis=0)


def _target(table: pa.Table, target: str, task: str) -> np.ndarray[Any, Any]:
    """The target as NumPy, from a table whose target is present in every row (:func:`fit` drops the others)."""
    column = table.column(target)
    if task == "regression":
        # Unsafe: an integer beyond 2**53 is rounded to the nearest float, as NumPy does, where a safe cast fails.
        return np.asarray(pc.cast(column, pa.float64(), safe=False).to_numpy())
    if pa.types.is_dictionary(column.type):
        column = pc.cast(column, column.type.value_type)
    return np.asarray(column.to_numpy())


def _check_names(table: pa.Table, target: str | None, features: Sequence[str] | None) -> tuple[str, ...]:
    names = table.column_names
    if target is not None and target not in names:
        raise VaultError(f"fit: no column {target!r} to use as the target")
    if features is None:
        chosen = tuple(name for name in names if name != target)
    else:
        if isinstance(features, str) or not all(isinstance(name, str) for name in features):
            raise VaultError("fit: features is a list of column names")
        chosen = tuple(features)
        missing = [name for name in chosen if name not in names]
        if missing:
            raise VaultError(f"fit: no column {', '.join(map(repr, missing))} to use as a feature")
        if len(set(chosen)) != len(chosen):
            raise VaultError("fit: a feature is named twice")
        if target is not None and target in chosen:
            raise VaultError(f"fit: the target {target!r} is also a feature")
    if not chosen:
        raise VaultError("fit: no feature columns")
    return chosen


def fit(
    source: SourceTable,
    spec: object,
    target: str | None,
    features: Sequence[str] | None,
    test_size: float | None,
    random_state: int | None,
    policies: Mapping[str, OutputPolicy],
) -> TrainedModel:
    """Train an estimator built from ``spec`` on a vault table; nothing is released.

    The never_release rule is checked on the features and target *before* training: a model trained on such a
    column would carry it into every metric, parameter and prediction. ``test_size`` (a fraction) holds out an
    evaluation set for :func:`metrics`.
    """
    estimator = build_estimator(spec)
    name = type(estimator).__name__
    task = _task(estimator)
    table = source.table
    chosen = _check_names(table, target, features)
    if task in ("classification", "regression") and target is None:
        raise VaultError(f"fit: {name} is a {task} estimator; name its target column")
    if task in ("clustering", "transform") and target is not None:
        raise VaultError(f"fit: {name} does not use a target; pass target=None and choose the features")
    if test_size is not None and (
        isinstance(test_size, bool) or not isinstance(test_size, int | float) or not 0.0 < test_size < 1.0
    ):
        raise VaultError("fit: test_size is a fraction between 0 and 1 (exclusive)")
    if random_state is not None and (isinstance(random_state, bool) or not isinstance(random_state, int)):
        raise VaultError("fit: random_state is an integer or null")
    used = [*chosen, *([target] if target is not None else [])]
    missing_lineage = [column for column in used if column not in source.lineage]
    if missing_lineage:
        raise VaultError(f"fit: no lineage for column {', '.join(map(repr, missing_lineage))}")
    lineage = {column: frozenset(source.lineage[column]) for column in used}
    check_columns(lineage, policies, "model features and target")

    frame = any(isinstance(part, ColumnTransformer) for part in _walk(estimator)) or not all(
        _is_numeric(table.schema.field(column).type) for column in chosen
    )
    if target is not None and task == "regression" and not _is_numeric(table.schema.field(target).type):
        raise VaultError(f"fit: the target column {target!r} ({table.schema.field(target).type}) is not numeric")
    # Rows without a target teach a supervised model nothing: they are left out (as whether any exist is a fact
    # about the data, an error here would answer a question about it). Rows with a missing feature (null, NaN or
    # an infinity) are kept for an estimator that handles them (an imputer, or one that accepts NaN), but only
    # complete rows count; for any other estimator they are left out too, so that training never fails because
    # some value is missing. Which of the two is decided by the estimator's classes, never by the data.
    present = _present(table, target) if target is not None else np.ones(table.num_rows, dtype=bool)
    if _nan_flow(estimator) == "rejects":
        for column in chosen:
            present &= _present(table, column)
    kept = np.flatnonzero(present)
    work = table if kept.size == table.num_rows else table.take(pa.array(kept, pa.int64()))
    complete = np.ones(kept.size, dtype=bool)
    for column in chosen:
        complete &= _present(work, column)
    counter_all = _RecordCounter(source, kept)
    # A model of fewer than k records could release nothing, and even its training errors (one class only, say)
    # would describe those few records: refuse as a withheld row count would, before touching the values.
    all_records = counter_all.within(complete)
    _require_records(all_records, policies, "the training data")
    try:
        x = _inputs(work, chosen, frame)
    except (pa.ArrowException, ValueError, TypeError) as exc:
        raise _failure("fit", name, exc) from None
    y = _target(work, target, task) if target is not None else None
    contributing = _contributing(source, target, kept) if target is not None else None
    target_isolated = task == "regression" and _target_isolated(x, y, complete, _thresholds(source.datasets, policies))
    train_rows: np.ndarray[Any, Any]
    test_rows: np.ndarray[Any, Any] | None = None
    if test_size is not None:
        # Splitting row numbers (then taking them) is what train_test_split does to each array anyway; the row
        # numbers are also what the record counts below need.
        try:
            train_rows, test_rows = train_test_split(
                np.arange(kept.size), test_size=test_size, random_state=random_state
            )
        except ValueError:
            raise VaultError("fit: too few records to hold out a test split of that size") from None
        x_train, y_train = _rows(x, train_rows), (y[train_rows] if y is not None else None)
        x_test, y_test = _rows(x, test_rows), (y[test_rows] if y is not None else None)
    else:
        train_rows = np.arange(kept.size)
        x_train, y_train, x_test, y_test = x, y, None, None
    n_train = len(x_train)
    train_complete = complete[train_rows]
    counter = _RecordCounter(source, kept[train_rows[train_complete]])  # the complete training rows
    train_records = counter.total() if test_rows is not None else all_records
    _require_records(train_records, policies, "the training split")
    if task == "classification" and y_train is not None:
        # A classifier needs two classes; one class, or a second class of fewer than k records, is refused alike,
        # in the words of the smallest-class rule, so the refusal does not tell an empty class from a small one.
        _require_records(counter.second_group(y_train[train_complete]), policies, _SMALLEST_CLASS)

    # Training runs in a worker process the vault kills when the analyst interrupts the cell (see stoppable).
    estimator, fit_warnings = stoppable.run(_train, estimator, x_train, y_train, openmp=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            class_records = (
                counter.smallest_group(y_train[train_complete])
                if task == "classification" and y_train is not None
                else None
            )
            labels = getattr(_final(estimator), "labels_", None)
            cluster_records = (
                counter.smallest_group(np.asarray(labels)[train_complete])
                if task == "clustering" and labels is not None
                else None
            )
            category_records = None
            if any(isinstance(part, OneHotEncoder) for part in _walk(estimator)):
                indicators = [matrix[np.flatnonzero(train_complete)] for matrix in _indicators(estimator, x_train)]
                category_records = counter.smallest_indicator(indicators)
            feature_records = {
                column: counter.within(_off_mode(_values(work.column(column), train_rows[train_complete])))
                for column in chosen
            }
            input_records = (
                [feature_records[column] for column in chosen]
                if not isinstance(estimator, Pipeline) and not frame  # the final estimator sees the features
                else _input_records(estimator, x_train, train_complete, counter)
            )
            thresholds = _thresholds(source.datasets, policies)
            weak = {
                position
                for position, records in enumerate(input_records or ())
                if any(records.get(dataset, 0) < k for dataset, k in thresholds.items())
            }
            leverage = _max_leverage(estimator, x_train, train_complete, weak)
        except Exception as exc:
            raise _failure("fit", name, exc) from None
    categories = tuple(dict.fromkeys([*fit_warnings, *(w.category.__name__ for w in caught)]))
    target_records = eval_target_records = None
    if y_train is not None and contributing is not None:
        target_records = counter.within(_off_mode(y_train[train_complete]) & contributing[train_rows[train_complete]])
        eval_target_records = target_records
    if test_rows is not None:
        test_complete = complete[test_rows]
        eval_counter = _RecordCounter(source, kept[test_rows[test_complete]])
        eval_records = eval_counter.total()
        if y_test is not None and contributing is not None:
            eval_target_records = eval_counter.within(
                _off_mode(y_test[test_complete]) & contributing[test_rows[test_complete]]
            )
    else:
        eval_records = train_records
    return TrainedModel(
        estimator=estimator,
        estimator_name=name,
        task=task,
        features=chosen,
        target=target,
        n_train=n_train,
        n_test=0 if x_test is None else len(x_test),
        datasets=frozenset(source.datasets),
        lineage=MappingProxyType(lineage),
        frame=frame,
        X_eval=x_test if x_test is not None else x_train,
        y_eval=y_test if x_test is not None else y_train,
        train_records=MappingProxyType(train_records),
        eval_records=MappingProxyType(eval_records),
        class_records=_frozen(class_records),
        cluster_records=_frozen(cluster_records),
        category_records=_frozen(category_records),
        warnings=categories,
        target_records=_frozen(target_records),
        eval_target_records=_frozen(eval_target_records),
        feature_records=MappingProxyType({column: MappingProxyType(r) for column, r in feature_records.items()}),
        input_records=None if input_records is None else tuple(MappingProxyType(r) for r in input_records),
        min_group_size=MappingProxyType(thresholds),
        leverage=leverage,
        target_isolated=target_isolated,
    )


def _target_isolated(x: Any, y: Any, complete: np.ndarray[Any, Any], thresholds: Mapping[str, int]) -> bool:
    """Whether the target, on the complete rows, is a combination of the numeric features and a constant on all
    but 1 to k - 1 of them (the rule on combinations of a release's numbers, :mod:`.combinations`).

    ``cn.where(who, t.cost, t.age)`` as the target and ``age`` as the feature: the fit is exact everywhere but on
    one record, so its coefficients, errors and predictions all carry that record's cost less its age. Where the
    target sits on a plain combination of the features, any model learns it; the few records off it are all its
    errors say."""
    rows = np.flatnonzero(complete)
    if y is None or rows.size == 0 or not thresholds:
        return False
    if isinstance(x, pd.DataFrame):
        numeric = [
            x[c].to_numpy(dtype=np.float64, na_value=np.nan) for c in x.columns if pd.api.types.is_numeric_dtype(x[c])
        ]
    else:
        matrix = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        numeric = [matrix[:, j] for j in range(matrix.shape[1])]
    vectors = [np.asarray(y, dtype=np.float64)[rows], *(column[rows] for column in numeric), np.ones(rows.size)]
    return bool(isolating(vectors, max(thresholds.values()))[0])


def target_values(source: SourceTable, target: str, features: Sequence[str]) -> list[tuple[str, RecordValues]]:
    """What each record adds to a regression's numbers, for the rule on combinations across releases (see
    :mod:`.earlier_values`): its target and the target times each numeric feature, over the rows where all are
    present. A linear model's coefficients are those sums (with the features' own): ``cn.where(who, t.cost, t.age)``
    as the target, after ``sum(t.age)`` was released, gives the target's cost from the intercept. Per dataset
    occurrence, a record on several rows (after a join) adds up its rows."""
    table = source.table
    numeric = [name for name in features if _is_numeric(table.schema.field(name).type)]
    y = _target(table, target, "regression") if table.num_rows else np.zeros(0)
    x = _matrix(table, numeric) if numeric else np.zeros((table.num_rows, 0))
    rows = np.isfinite(y) & np.isfinite(x).all(axis=1)
    columns = [y, *(y * x[:, j] for j in range(x.shape[1]))]
    found: list[tuple[str, RecordValues]] = []
    for dataset, ids in source.record_occurrences():
        held = np.asarray(pc.is_valid(ids).to_numpy(zero_copy_only=False), dtype=bool) & rows
        at = np.asarray(pc.fill_null(ids, 0).to_numpy(zero_copy_only=False), dtype=np.int64)[held]
        records, inverse = np.unique(at, return_inverse=True)
        sums = tuple(
            np.bincount(inverse, weights=column[held], minlength=len(records)).astype(np.float64) for column in columns
        )
        found.append((dataset, RecordValues(records, np.zeros(len(records), dtype=np.int64), sums)))
    return found


def _train(estimator: Any, x: Any, y: Any) -> tuple[Any, list[str]]:
    """The fitted estimator and the categories of the warnings it raised (in the worker process: no text leaves)."""
    name = type(estimator).__name__
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if y is None:
                estimator.fit(x)
            else:
                estimator.fit(x, y)
        except Exception as exc:  # scikit-learn raises many types; none of their text leaves
            raise _failure("fit", name, exc) from None
    return estimator, list(dict.fromkeys(w.category.__name__ for w in caught))


def _frozen(records: dict[str, int] | None) -> Records | None:
    return None if records is None else MappingProxyType(records)


# -- what a column is computed from ----------------------------------------------------------------------------------

_COLUMN_RULE: Final = "its records whose value differs from the column's most common value"
"""How a model's column is counted for min_group_size. A target that is 0 everywhere but one row (a masked value
filled with a constant) makes a mean absolute error of a constant model that row's value times 1/n; a feature that
is 1 in one row (an indicator of one record) makes its coefficient plus the intercept that row's target. In both
the column is a statistic of the rows that differ from the rest, so only those rows count."""


def _present(table: pa.Table, name: str) -> np.ndarray[Any, Any]:
    """Per row, whether the column holds a value a model can learn from: not null, not NaN (which the release
    engine treats as null) and not an infinity (which scikit-learn rejects)."""
    column = table.column(name)
    valid = pc.is_valid(column)
    if pa.types.is_floating(column.type):
        valid = pc.and_(valid, pc.fill_null(pc.is_finite(column), False))
    return np.asarray(valid.to_numpy(zero_copy_only=False), dtype=bool)


def _values(column: pa.ChunkedArray, rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    picked = column.take(pa.array(rows, pa.int64()))
    if pa.types.is_dictionary(picked.type):
        picked = pc.cast(picked, picked.type.value_type)
    return np.asarray(picked.to_numpy(zero_copy_only=False))


def _off_mode(values: Any) -> np.ndarray[Any, Any]:
    """Per row, whether its value differs from the most common value of ``values`` (a missing value never does)."""
    array = np.asarray(values).ravel()
    if array.dtype.kind in "fiub":  # numbers: runs of a sorted copy, several times faster than hashing
        if array.size == 0:
            return np.zeros(0, dtype=bool)
        if array.dtype.kind == "f" and _all_distinct(array):
            # Every run holds one value: the first run (the smallest value) is the most common, as below.
            return np.asarray(array != array.min(), dtype=bool)
        ordered = np.sort(array)
        starts = np.concatenate([[0], np.flatnonzero(ordered[1:] != ordered[:-1]) + 1])
        lengths = np.diff(np.append(starts, ordered.size))
        heads = ordered[starts]
        floating = array.dtype.kind == "f"
        known_runs = ~np.isnan(heads) if floating else np.ones(heads.size, dtype=bool)  # NaN runs hold no value
        if not known_runs.any():
            return np.zeros(array.size, dtype=bool)
        mode = heads[known_runs][int(np.argmax(lengths[known_runs]))]
        differs = array != mode
        return np.asarray(differs & ~np.isnan(array) if floating else differs, dtype=bool)
    codes, _ = pd.factorize(array, use_na_sentinel=True)
    known = codes >= 0
    if not known.any():
        return np.zeros(codes.size, dtype=bool)
    mode = int(np.argmax(np.bincount(codes[known])))
    return np.asarray(known & (codes != mode), dtype=bool)


def _all_distinct(array: np.ndarray[Any, Any]) -> bool:
    """Whether a float array holds no NaN and no value twice (0.0 and -0.0 are one value, as ``==`` has it):
    Polars' hashing counts them in a fraction of a sort's time, on every core."""
    if np.isnan(array).any():
        return False
    return bool(pl.Series(array + 0.0).n_unique() == array.size)  # + 0.0 turns -0.0 into 0.0


def _contributing(source: SourceTable, target: str, kept: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Per kept row, whether its target is a record's value rather than a constant the plan put there.

    ``where(who, y, 0)`` gives one record's ``y`` and a constant elsewhere; the constant rows are no record's
    target, so they do not count towards the records a model of that target is computed from.
    """
    found = source.collect(source.data.select(source.contributes(target).alias("contributes")))
    mask = np.asarray(found.get_column("contributes").to_numpy(), dtype=bool)
    return np.asarray(mask[kept], dtype=bool)


def _final_inputs(estimator: Any, x: Any) -> Any:
    """What the final estimator of a (nested) pipeline is given: the inputs after every transforming step."""
    if isinstance(estimator, Pipeline):
        if len(estimator) > 1:
            x = estimator[:-1].transform(x)
        last = estimator.steps[-1][1]
        return _final_inputs(last, x) if isinstance(last, Pipeline) else x
    return x


def _off_mode_columns(matrix: Any) -> Iterator[np.ndarray[Any, Any]]:
    """Per column of a (dense, sparse or DataFrame) matrix, :func:`_off_mode` of its rows."""
    if isinstance(matrix, pd.DataFrame):
        for position in range(matrix.shape[1]):
            yield _off_mode(matrix.iloc[:, position].to_numpy())
    elif hasattr(matrix, "tocsc"):
        # One-hot output can be thousands of sparse columns: read each column's stored entries, not n zeros.
        csc = matrix.tocsc()
        csc.eliminate_zeros()
        n = csc.shape[0]
        for j in range(csc.shape[1]):
            rows = csc.indices[csc.indptr[j] : csc.indptr[j + 1]]
            codes, _ = pd.factorize(csc.data[csc.indptr[j] : csc.indptr[j + 1]], use_na_sentinel=True)
            known = codes >= 0
            counts = np.bincount(codes[known]) if known.any() else np.zeros(0, dtype=np.int64)
            mask = np.zeros(n, dtype=bool)
            if counts.size and int(counts.max()) > n - rows.size:  # a stored value is more common than zero
                mask[:] = True
                mask[rows[known & (codes == int(np.argmax(counts)))]] = False
                mask[rows[~known]] = False
            else:
                mask[rows[known]] = True
            yield mask
    else:
        dense = np.asarray(matrix)
        dense = dense.reshape(dense.shape[0], -1)
        for j in range(dense.shape[1]):
            yield _off_mode(dense[:, j])


def _input_records(
    estimator: Any, x_train: Any, complete: np.ndarray[Any, Any], counter: _RecordCounter
) -> list[dict[str, int]] | None:
    """Per column the final estimator sees (its coefficients' order), the records that differ from the column's
    most common value, among the complete training rows; None for a pipeline that ends in "passthrough"."""
    if _final(estimator) is None:
        return None
    inputs = _final_inputs(estimator, x_train)
    return [counter.within(mask[complete]) for mask in _off_mode_columns(inputs)]


# Regressors only: their fitted value is a combination of the targets, which passes through a row of leverage 1. A
# classifier's loss saturates on a far-out row instead of interpolating it, and a row isolated in its design (an
# extreme outlier, common in real data) would refuse every classifier on it; what a classifier can still say about
# one record through a combination of columns is at most that record's class (docs: Known limits).
_LINEAR_FINALS: Final = frozenset({"LinearRegression", "Ridge", "Lasso", "ElasticNet", "SGDRegressor"})
MAX_LEVERAGE_WORK: Final = 2 * 10**10  # n x p^2: beyond this the check would cost more than most fits
_LEVERAGE_CHUNK: Final = 65_536


def _max_leverage(estimator: Any, x_train: Any, complete: np.ndarray[Any, Any], weak: set[int]) -> float | None:
    """The largest leverage of a complete training row in a linear model's design, or None for other models.

    A row's leverage h is the weight its own target has in its fitted value, and the largest share one record can
    have in any combination of the coefficients. At h = 1 the fit passes through that row whatever the others
    are: the coefficients and the row's features give its target exactly. An indicator column does that, and so
    does any set of columns whose span holds one (``age`` and ``age + indicator``), which no per-column count sees.
    Columns already withheld as weak (their coefficients are null) are left out, and the intercept counts as a
    column. Computed as ``Z (ZᵀZ)⁺ Zᵀ``'s diagonal over columns scaled to unit norm, in row chunks.
    """
    final = _final(estimator)
    if type(final).__name__ not in _LINEAR_FINALS:
        return None
    inputs = _final_inputs(estimator, x_train)
    rows = np.flatnonzero(complete)
    if hasattr(inputs, "tocsc"):
        matrix: Any = inputs.tocsr()[rows]
    else:
        matrix = np.asarray(inputs.to_numpy() if isinstance(inputs, pd.DataFrame) else inputs, dtype=np.float64)
        matrix = matrix.reshape(matrix.shape[0], -1)[rows]
    kept = [j for j in range(matrix.shape[1]) if j not in weak]
    matrix = matrix[:, kept]
    n, p = matrix.shape[0], matrix.shape[1] + (1 if getattr(final, "fit_intercept", False) else 0)
    if n == 0 or p == 0 or n * p * p > MAX_LEVERAGE_WORK:
        return None

    size = max(_LEVERAGE_CHUNK, 8_000_000 // p)  # about 64 MB of float64 per block

    def block(start: int) -> np.ndarray[Any, Any]:
        part = matrix[start : start + size]
        dense = np.asarray(part.toarray() if hasattr(part, "toarray") else part, dtype=np.float64)
        if p > dense.shape[1]:
            dense = np.column_stack([dense, np.ones(dense.shape[0])])
        return dense

    starts = range(0, n, size)
    gram = np.zeros((p, p))
    for start in starts:
        rows_block = block(start)
        gram += rows_block.T @ rows_block
    norms = np.sqrt(np.diag(gram))
    norms[norms == 0] = 1.0
    values, vectors = np.linalg.eigh(gram / np.outer(norms, norms))
    keep = values > values.max() * p * 1e-12
    projection = vectors[:, keep] / np.sqrt(values[keep])
    largest = 0.0
    for start in starts:
        scaled = block(start) / norms
        largest = max(largest, float(np.max(np.sum((scaled @ projection) ** 2, axis=1))))
    return min(largest, 1.0)


def _thresholds(datasets: frozenset[str], policies: Mapping[str, OutputPolicy]) -> dict[str, int]:
    return {dataset: policies[dataset].min_group_size for dataset in sorted(datasets) if dataset in policies}


class _RecordCounter:
    """Counts the source records behind some rows of a table, per dataset, as the release engine does.

    Before any join each row is one record of every dataset, so counting rows is exact and cheap. After a join a
    row may repeat a record; :attr:`SourceTable.record_ids` then gives the record behind each row per occurrence of
    a dataset, and a group is computed from as many records of a dataset as its *distinct* ids (the smallest over
    the dataset's occurrences).
    """

    def __init__(self, source: SourceTable, rows: np.ndarray[Any, Any] | None) -> None:
        self.rows = rows
        self.n_rows = source.table.num_rows if rows is None else len(rows)
        self.datasets = sorted(source.datasets)
        self.occurrences: list[tuple[str, Any]] = []
        # Per occurrence, where each row's id is a record seen in no other row (a dataset's own ids): there the
        # distinct records among some rows are the rows with an id, counted without hashing.
        self.unique_ids: list[np.ndarray[Any, Any] | None] = []
        if source.record_ids is not None:
            picked = None if rows is None else pa.array(rows, pa.int64())
            hidden = [name for _, name in source.records or ()]
            for position, (dataset, ids) in enumerate(source.record_ids):
                taken = ids if picked is None else ids.take(picked)
                self.occurrences.append((dataset, taken))
                unique = position < len(hidden) and hidden[position] in source.unique
                self.unique_ids.append(
                    np.asarray(pc.is_valid(taken).to_numpy(zero_copy_only=False), dtype=bool) if unique else None
                )

    def _counts(self, per_occurrence: Any, default: int) -> dict[str, int]:
        counts = dict.fromkeys(self.datasets, default)
        seen: set[str] = set()
        for (dataset, ids), valid in zip(self.occurrences, self.unique_ids, strict=True):
            count = int(per_occurrence(ids, valid))
            counts[dataset] = count if dataset not in seen else min(counts[dataset], count)
            seen.add(dataset)
        return counts

    def total(self) -> dict[str, int]:
        return self._counts(lambda ids, _: pc.count_distinct(ids, mode="only_valid").as_py(), self.n_rows)

    def within(self, mask: np.ndarray[Any, Any]) -> dict[str, int]:
        """Per dataset, the distinct records behind the counted rows where ``mask`` is true."""
        picked = np.flatnonzero(mask)
        taken = pa.array(picked, pa.int64())
        counts = dict.fromkeys(self.datasets, int(picked.size))
        seen: set[str] = set()
        for (dataset, ids), valid in zip(self.occurrences, self.unique_ids, strict=True):
            if valid is not None:
                count = int(np.count_nonzero(valid[picked]))
            else:
                count = int(pc.count_distinct(ids.take(taken), mode="only_valid").as_py())
            counts[dataset] = count if dataset not in seen else min(counts[dataset], count)
            seen.add(dataset)
        return counts

    def _group_records(self, labels: Any) -> tuple[np.ndarray[Any, Any], Any]:
        """The rows of each group of rows sharing a label, and a function giving one occurrence's records per
        group: rows with an id where each id is a record seen in no other row, else distinct ids per group."""
        values = np.asarray(labels)
        _, inverse, rows = np.unique(values, return_inverse=True, return_counts=True)
        inverse = inverse.ravel()

        def records(ids: Any, valid: np.ndarray[Any, Any] | None) -> np.ndarray[Any, Any]:
            if valid is not None:  # a dataset's own ids: its records in a group are the group's rows with an id
                return np.bincount(inverse, weights=valid, minlength=rows.size).astype(np.int64)
            grouped = (
                pa.table({"g": pa.array(inverse), "id": ids})
                .group_by("g")
                .aggregate([("id", "count_distinct", pc.CountOptions(mode="only_valid"))])
            )
            found = np.zeros(rows.size, dtype=np.int64)
            found[grouped.column("g").to_numpy()] = grouped.column("id_count_distinct").to_numpy()
            return found

        return rows, records

    def smallest_group(self, labels: Any) -> dict[str, int]:
        """Per dataset, the records of the smallest group of rows sharing a label (a class, a cluster)."""
        rows, records = self._group_records(labels)
        smallest_rows = int(rows.min()) if rows.size else 0

        def smallest(ids: Any, valid: np.ndarray[Any, Any] | None) -> int:
            found = records(ids, valid)
            return int(found.min()) if found.size else 0

        return self._counts(smallest, smallest_rows)

    def second_group(self, labels: Any) -> dict[str, int]:
        """Per dataset, the records of the second largest group of rows sharing a label (0 with one group)."""
        rows, records = self._group_records(labels)
        second_rows = int(np.sort(rows)[-2]) if rows.size > 1 else 0

        def second(ids: Any, valid: np.ndarray[Any, Any] | None) -> int:
            found = np.sort(records(ids, valid))
            return int(found[-2]) if found.size > 1 else 0

        return self._counts(second, second_rows)

    def smallest_indicator(self, indicators: list[Any]) -> dict[str, int] | None:
        """Per dataset, the records of the smallest one-hot column (the rows where a category is present)."""
        present: list[np.ndarray[Any, Any]] = []
        for matrix in indicators:
            if hasattr(matrix, "tocsc"):
                csc = matrix.tocsc()
                csc.eliminate_zeros()
                present.extend(csc.indices[csc.indptr[j] : csc.indptr[j + 1]] for j in range(csc.shape[1]))
            else:
                dense = np.asarray(matrix)
                present.extend(np.flatnonzero(dense[:, j]) for j in range(dense.shape[1]))
        if not present:
            return None
        smallest_rows = min(len(rows) for rows in present)

        def smallest(ids: Any, valid: np.ndarray[Any, Any] | None) -> int:
            if valid is not None:  # a dataset's own ids: the rows with an id are its records
                return min(int(np.count_nonzero(valid[rows])) for rows in present)
            return min(
                int(pc.count_distinct(ids.take(pa.array(rows, pa.int64())), mode="only_valid").as_py())
                for rows in present
            )

        return self._counts(smallest, smallest_rows)


def _indicators(estimator: Any, x: Any) -> list[Any]:
    """The output of every fitted one-hot encoder on the training set: each column names a category value."""
    if isinstance(estimator, OneHotEncoder):
        return [estimator.transform(x)]
    found: list[Any] = []
    if isinstance(estimator, Pipeline):
        for index, (_, step) in enumerate(estimator.steps):
            if step is None or step == "passthrough":
                continue
            found.extend(_indicators(step, x))
            if index < len(estimator.steps) - 1:
                x = step.transform(x)
    elif isinstance(estimator, ColumnTransformer):
        for _, transformer, columns in estimator.transformers_:
            if transformer in ("drop", "passthrough"):
                continue
            found.extend(_indicators(transformer, _safe_indexing(x, columns, axis=1)))
    return found


# -- released facts ------------------------------------------------------------------------------------------------


def _require_eval(model: TrainedModel) -> None:
    if model.X_eval is None:
        raise VaultError(
            f"{model.estimator_name}: this model was brought back from a sealed file without its evaluation set; "
            "fit it again to compute metrics"
        )


def _check_records(
    records: Records | None, model: TrainedModel, policies: Mapping[str, OutputPolicy], what: str
) -> None:
    """min_group_size for a group counted per dataset: every dataset of the model needs ≥ its own k records."""
    if records is None or set(records) != set(model.datasets):
        raise VaultError(f"{model.estimator_name}: the record counts of {what} are unknown, so it is withheld")
    _require_records(records, policies, what)


def _require_records(records: Records, policies: Mapping[str, OutputPolicy], what: str) -> None:
    if not records:
        raise VaultError(f"the record counts of {what} are unknown")
    failing: list[str] = []
    first: PolicyViolation | None = None
    for dataset in sorted(records):
        try:
            check_count(records[dataset], [dataset], policies, what)
        except PolicyViolation as exc:
            failing.append(dataset)
            first = first or exc
    if first is not None:
        if len(failing) == 1:
            raise first
        k = max(policies[dataset].min_group_size for dataset in failing)
        raise PolicyViolation(
            "release.min_group_size", failing, f"{what} is computed from fewer than {k} records of the dataset"
        )


def _finite(value: Any) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


def metrics(model: TrainedModel, policies: Mapping[str, OutputPolicy]) -> dict[str, float]:
    """Standard metrics of the task on the evaluation set, released as ``model_metrics``.

    The evaluation set must hold at least ``min_group_size`` records: a metric over fewer is a statistic of a few
    people. Metrics that are undefined on this evaluation set (one class only, say) are left out. Every fitted
    value enters the metrics, so each column the model uses must meet the column rule too (:func:`_check_metrics`).
    """
    require_kind("model_metrics", model.datasets, policies)
    _require_eval(model)
    _check_metrics(model, policies)
    if model.task == "transform":
        raise VaultError(f"{model.estimator_name} is a transformer: it has no metrics")
    estimator, x, y = model.estimator, model.X_eval, model.y_eval
    values: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if model.task == "classification":
                values.update(_classification_metrics(estimator, x, y))
            elif model.task == "regression":
                predicted = estimator.predict(x)
                values["r2"] = skm.r2_score(y, predicted)
                values["rmse"] = math.sqrt(skm.mean_squared_error(y, predicted))
                values["mae"] = skm.mean_absolute_error(y, predicted)
            else:
                values.update(_clustering_metrics(estimator, x))
        except VaultError:
            raise
        except Exception as exc:
            raise _failure("metrics", model.estimator_name, exc) from None
    released = {key: finite for key, value in values.items() if (finite := _finite(value)) is not None}
    released["n_train"] = model.n_train
    released["n_test"] = model.n_test
    return released


def _attempt(values: dict[str, float], key: str, compute: Any) -> None:
    """One optional metric: left out when it is undefined on this evaluation set (ValueError from scikit-learn)."""
    try:
        values[key] = float(compute())
    except (ValueError, IndexError, ZeroDivisionError):
        return


def _classification_metrics(estimator: Any, x: Any, y: Any) -> dict[str, float]:
    predicted = estimator.predict(x)
    classes = np.asarray(estimator.classes_)
    values: dict[str, float] = {}
    _attempt(values, "accuracy", lambda: skm.accuracy_score(y, predicted))
    _attempt(values, "balanced_accuracy", lambda: skm.balanced_accuracy_score(y, predicted))
    binary = len(classes) == 2
    averaging: dict[str, Any] = (
        {"average": "binary", "pos_label": classes[1]} if binary else {"average": "macro", "labels": classes}
    )
    _attempt(values, "f1", lambda: skm.f1_score(y, predicted, zero_division=0, **averaging))
    _attempt(values, "precision", lambda: skm.precision_score(y, predicted, zero_division=0, **averaging))
    _attempt(values, "recall", lambda: skm.recall_score(y, predicted, zero_division=0, **averaging))
    if _has(estimator, "predict_proba"):
        proba = estimator.predict_proba(x)
        if binary:
            _attempt(values, "roc_auc", lambda: skm.roc_auc_score(y == classes[1], proba[:, 1]))
        else:
            _attempt(
                values,
                "roc_auc",
                lambda: skm.roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=classes),
            )
        _attempt(values, "log_loss", lambda: skm.log_loss(y, proba, labels=classes))
    return values


def _clustering_metrics(estimator: Any, x: Any) -> dict[str, float]:
    values: dict[str, float] = {"inertia": -float(estimator.score(x))}
    labels = estimator.predict(x)
    space = estimator[:-1].transform(x) if isinstance(estimator, Pipeline) and len(estimator) > 1 else x
    n_labels = len(np.unique(labels))
    if 2 <= n_labels < len(labels):
        sample = min(len(labels), SILHOUETTE_SAMPLE)
        _attempt(
            values,
            "silhouette",
            lambda: skm.silhouette_score(space, labels, sample_size=sample, random_state=0),
        )
    return values


def _has(estimator: Any, method: str) -> bool:
    """Whether a method is available: scikit-learn hides some behind ``available_if`` (AttributeError on access)."""
    try:
        return callable(getattr(estimator, method))
    except AttributeError:
        return False


def score(model: TrainedModel, policies: Mapping[str, OutputPolicy]) -> float | None:
    """``estimator.score`` on the evaluation set (accuracy, R², negative inertia), released as ``model_metrics``.

    A score that is not a finite number is released as null, as :func:`metrics` leaves such a metric out: an error
    there would be one the values alone decide.
    """
    require_kind("model_metrics", model.datasets, policies)
    _require_eval(model)
    _check_metrics(model, policies)
    if not _has(model.estimator, "score"):
        raise VaultError(f"{model.estimator_name} has no score")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            value = model.estimator.score(model.X_eval, model.y_eval)
        except Exception as exc:
            raise _failure("score", model.estimator_name, exc) from None
    return _finite(value)


_SMALLEST_CLASS: Final = "the smallest class of the training target"


def _check_groups(model: TrainedModel, policies: Mapping[str, OutputPolicy]) -> None:
    """The training set, its target and every group whose value a parameter or prediction names must meet
    min_group_size."""
    _check_records(model.train_records, model, policies, "the model's training set")
    _check_target(model, policies)
    _check_leverage(model, policies)
    if model.task == "classification":
        _check_records(model.class_records, model, policies, _SMALLEST_CLASS)


def _check_leverage(model: TrainedModel, policies: Mapping[str, OutputPolicy]) -> None:
    """A linear fit may not rest on one record: its own target may weigh at most 1 - 1/k in its fitted value.

    At leverage 1 the coefficients give a training record's target exactly (see :func:`_max_leverage`); the bound
    leaves the record's fitted value at least a k-th part made of the others'.
    """
    if model.leverage is None:
        return
    failing = [
        dataset
        for dataset in sorted(model.datasets)
        if (policy := policies.get(dataset)) is None or model.leverage > 1.0 - 1.0 / max(policy.min_group_size, 1)
    ]
    if failing:
        k = max(policies[d].min_group_size if d in policies else 0 for d in failing)
        raise PolicyViolation(
            "release.min_group_size",
            failing,
            f"{model.estimator_name}: one training record decides its own fitted value (leverage above 1 - 1/{k}), "
            "so a combination of the model's coefficients and that record's features is its target",
        )


def _check_target(model: TrainedModel, policies: Mapping[str, OutputPolicy], *, evaluation: bool = False) -> None:
    """A target that differs from its most common value in fewer than k records releases nothing of the model."""
    if model.target is None:
        return
    what = f"the target column {model.target!r} ({_COLUMN_RULE})"
    _check_records(model.target_records, model, policies, what)
    if evaluation:
        _check_records(model.eval_target_records, model, policies, f"{what} on the evaluation set")
    if model.target_isolated:  # after the rule on the target alone: a constant but in one row is its business
        failing = sorted(model.datasets)
        k = max((policies[d].min_group_size for d in failing if d in policies), default=0)
        raise PolicyViolation(
            "release.difference",
            failing,
            f"{model.estimator_name}: the target column {model.target!r} agrees with a combination of the features "
            f"on all but fewer than {k} records, so what the model says of its errors is about those records",
        )


def _check_metrics(model: TrainedModel, policies: Mapping[str, OutputPolicy]) -> None:
    """Metrics sum over every evaluation row's error, so the training and evaluation sets, the target on both and
    every column the model uses must meet min_group_size: with a feature that singles out one record, the error
    sums (an R² against the total variance, say) give that record's target."""
    _check_records(model.train_records, model, policies, "the model's training set")
    _check_records(model.eval_records, model, policies, "the model's evaluation set")
    _check_target(model, policies, evaluation=True)
    _check_leverage(model, policies)
    _check_columns(model, policies)


def _check_columns(model: TrainedModel, policies: Mapping[str, OutputPolicy]) -> None:
    """Every feature as given and every column the final estimator sees must meet the column rule."""
    if model.feature_records is None:
        raise VaultError(f"{model.estimator_name}: the record counts of its features are unknown, so it is withheld")
    for column in model.features:
        _check_records(model.feature_records.get(column), model, policies, f"the feature {column!r} ({_COLUMN_RULE})")
    weak = _weak_inputs(model, policies)
    if weak:
        # Transformed columns are named by position: a one-hot column's name quotes a category of the data.
        _check_records(
            _inputs_of(model)[weak[0]],
            model,
            policies,
            f"the model's input column {weak[0]} after its transforms ({_COLUMN_RULE})",
        )


def _inputs_of(model: TrainedModel) -> tuple[Records, ...]:
    if model.input_records is None and _final(model.estimator) is not None:
        raise VaultError(f"{model.estimator_name}: the record counts of its inputs are unknown, so it is withheld")
    return model.input_records or ()


def _weak_inputs(model: TrainedModel, policies: Mapping[str, OutputPolicy]) -> list[int]:
    """Positions of the final estimator's input columns that fewer than k records (of some dataset) differ in."""
    weak = []
    for position, records in enumerate(_inputs_of(model)):
        for dataset in model.datasets:
            policy = policies.get(dataset)
            if policy is None or records.get(dataset, 0) < policy.min_group_size:
                weak.append(position)
                break
    return weak


def params(model: TrainedModel, policies: Mapping[str, OutputPolicy]) -> dict[str, Any]:
    """Fitted parameters by feature name, released as ``model_parameters``.

    Coefficients, intercepts, classes, feature importances, cluster centres and iteration counts. Internals that
    quote training values directly (tree thresholds, scaler means, per-class feature means) are not released.
    Cluster centres are the means of their clusters, and one-hot categories and class labels are values of the
    data, so each such group must meet min_group_size like an aggregate row.

    A parameter tied to an input column that differs from its most common value in fewer than k records (an
    indicator of one record, say) is determined by those records: its coefficient and cluster-centre entries are
    null, feature importances (which sum to one) are all null, and ``confnb_suppressed`` names those columns.
    The names come from :data:`FITTED_ATTRIBUTES`, the allowlist an exported file is held to as well.
    """
    require_kind("model_parameters", model.datasets, policies)
    _check_groups(model, policies)
    any_encoder = any(isinstance(part, OneHotEncoder) for part in _walk(model.estimator))
    if any_encoder:
        _check_records(model.category_records, model, policies, "the smallest one-hot category")
    final = _final(model.estimator)
    names = _input_names(model)
    released: dict[str, Any] = {"estimator": model.estimator_name, "features": names, "n_train": model.n_train}
    if final is None:
        return released
    weak = _weak_inputs(model, policies)
    if len(_inputs_of(model)) != len(names):
        weak = list(range(len(names)))  # coefficients that cannot be matched to their columns' counts
    hidden = {names[position] for position in weak}
    allowed = _allowlist(final)
    classes = getattr(final, "classes_", None) if "classes_" in allowed else None
    labels = [_scalar(label) for label in classes] if classes is not None else None
    if labels is not None:
        released["classes_"] = labels
    coef = getattr(final, "coef_", None) if "coef_" in allowed else None
    if coef is not None:
        released["coef_"] = _by_row(np.asarray(coef, dtype=np.float64), names, labels, hidden)
    intercept = getattr(final, "intercept_", None) if "intercept_" in allowed else None
    if intercept is not None:
        values = np.atleast_1d(np.asarray(intercept, dtype=np.float64))
        if values.size == 1:
            released["intercept_"] = _finite(values[0])
        else:
            keys = [str(label) for label in labels] if labels is not None and len(labels) == values.size else None
            released["intercept_"] = (
                dict(zip(keys, map(_finite, values), strict=True)) if keys else [_finite(v) for v in values]
            )
    importances = _attribute(final, "feature_importances_") if "feature_importances_" in allowed else None
    if importances is not None:
        # Importances are normalised to sum to one, so one withheld entry is the others' complement: none is shown.
        every = set(names) if hidden else set()
        released["feature_importances_"] = _named(np.asarray(importances, dtype=np.float64), names, every)
    centers = getattr(final, "cluster_centers_", None) if "cluster_centers_" in allowed else None
    if centers is not None:
        _check_records(model.cluster_records, model, policies, "the smallest cluster")
        released["cluster_centers_"] = [_named(row, names, hidden) for row in np.asarray(centers, dtype=np.float64)]
    n_iter = getattr(final, "n_iter_", None) if "n_iter_" in allowed else None
    if n_iter is not None:
        array = np.asarray(n_iter)
        released["n_iter_"] = int(array) if array.ndim == 0 else [int(v) for v in array.ravel()]
    if hidden:
        released["confnb_suppressed"] = [name for name in names if name in hidden]
    return released


def _attribute(estimator: Any, name: str) -> Any:
    try:
        return getattr(estimator, name, None)
    except (AttributeError, ValueError):
        return None


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _named(
    row: np.ndarray[Any, Any], names: Sequence[str], hidden: set[str] | frozenset[str] = frozenset()
) -> dict[str, float | None]:
    return {name: None if name in hidden else _finite(value) for name, value in zip(names, row, strict=True)}


def _by_row(coef: np.ndarray[Any, Any], names: Sequence[str], labels: list[Any] | None, hidden: set[str]) -> Any:
    if coef.ndim == 1:
        return _named(coef, names, hidden)
    if coef.shape[0] == 1:
        return _named(coef[0], names, hidden)
    if labels is not None and len(labels) == coef.shape[0]:
        return {str(label): _named(row, names, hidden) for label, row in zip(labels, coef, strict=True)}
    return [_named(row, names, hidden) for row in coef]


def _input_names(model: TrainedModel) -> list[str]:
    """The names of the columns the final estimator sees: the features, or a pipeline's transformed columns."""
    estimator = model.estimator
    if not (isinstance(estimator, Pipeline) and len(estimator) > 1):
        return list(model.features)
    given = None if model.frame else np.asarray(model.features, dtype=object)
    try:
        return [str(name) for name in estimator[:-1].get_feature_names_out(given)]
    except (AttributeError, ValueError, TypeError):
        width = _width(_final(estimator))
        return [f"x{i}" for i in range(width)]


def _width(final: Any) -> int:
    count = getattr(final, "n_features_in_", None)
    if count is None:
        raise VaultError("params: the model's transformed feature names are unavailable")
    return int(count)


def predict(model: TrainedModel, public: pa.Table, policies: Mapping[str, OutputPolicy]) -> pa.Table:
    """Predictions on public data the analyst sent, released as ``predict_public`` (at most max_rows rows).

    Column ``prediction``, and ``proba_<class>`` per class when the estimator gives probabilities. A classifier's
    predictions name its classes, so each class must have met min_group_size in training.
    """
    require_kind("predict_public", model.datasets, policies)
    _check_groups(model, policies)
    _check_columns(model, policies)  # a prediction at an indicator's 1 and at its 0 differ by its coefficient
    _check_rows(public.num_rows, model.datasets, policies)
    if not _has(model.estimator, "predict"):
        raise VaultError(f"{model.estimator_name} has no predict (a transformer)")
    missing = [name for name in model.features if name not in public.column_names]
    if missing:
        raise VaultError(f"predict: the public data lacks the feature column {', '.join(map(repr, missing))}")
    if not model.frame:
        wrong = [name for name in model.features if not _is_numeric(public.schema.field(name).type)]
        if wrong:
            raise VaultError(f"predict: the feature column {', '.join(map(repr, wrong))} is not numeric")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            x = _inputs(public, model.features, model.frame)
            columns: dict[str, Any] = {"prediction": pa.array(np.asarray(model.estimator.predict(x)))}
            if _has(model.estimator, "predict_proba"):
                proba = np.asarray(model.estimator.predict_proba(x), dtype=np.float64)
                for index, label in enumerate(model.estimator.classes_):
                    columns[f"proba_{_scalar(label)}"] = pa.array(proba[:, index])
        except Exception as exc:
            raise _failure("predict", model.estimator_name, exc) from None
    return pa.table(columns)


def _check_rows(n_rows: int, datasets: frozenset[str], policies: Mapping[str, OutputPolicy]) -> None:
    exceeded = []
    for dataset in sorted(datasets):
        policy = policies.get(dataset)
        if policy is None:
            raise VaultError(f"no output policy for dataset {dataset!r}")
        if policy.max_rows is not None and n_rows > policy.max_rows:
            exceeded.append((dataset, policy.max_rows))
    if exceeded:
        limit = min(limit for _, limit in exceeded)
        raise PolicyViolation(
            "release.max_rows",
            [dataset for dataset, _ in exceeded],
            f"predictions would have {n_rows} rows; the policy allows at most {limit}",
        )


# -- sealing and export ----------------------------------------------------------------------------------------------

_FACTS_ENTRY: Final = "confnb-model.json"
# Types a fitted allowlisted model is made of, besides the allowlisted classes themselves (the parts scikit-learn
# builds inside fit: trees, binners, losses, internal encoders). Nothing else is constructed when loading.
_SKOPS_PARTS: Final = frozenset(
    {
        "builtins.dict",
        "builtins.list",
        "builtins.slice",
        "builtins.str",
        "builtins.tuple",
        "builtins.int",
        "builtins.float",
        "builtins.bool",
        "builtins.NoneType",
        "functools.partial",
        "numpy.dtype",
        "numpy.ndarray",
        "numpy.float64",
        "numpy.float32",
        "numpy.int64",
        "numpy.int32",
        "numpy.uint64",
        "numpy.bool_",
        "numpy.random._generator.Generator",
        "numpy.random.mtrand.RandomState",
        "sklearn.dummy.DummyClassifier",
        "sklearn.dummy.DummyRegressor",
        "sklearn.ensemble._hist_gradient_boosting.binning._BinMapper",
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
        "sklearn.preprocessing._encoders.OrdinalEncoder",
        "sklearn.preprocessing._function_transformer.FunctionTransformer",
        "sklearn.preprocessing._label.LabelEncoder",
        "sklearn.tree._classes.ExtraTreeClassifier",
        "sklearn.tree._classes.ExtraTreeRegressor",
        "sklearn.tree._tree.Tree",
        "sklearn.utils.validation.check_array",
    }
)
# Loss and link objects of the linear, SGD and boosting models: value classes defined in these modules, one per
# ``loss`` option. Only classes defined there are accepted, not whatever else the module namespace holds.
_SKOPS_PART_MODULES: Final = (
    "sklearn._loss.loss",
    "sklearn._loss._loss",
    "sklearn._loss.link",
    "sklearn.linear_model._sgd_fast",
)
# scikit-learn before 1.8 builds its Cython loss classes with a bare module name (``_loss.CyHalfBinomialLoss``).
_SKOPS_PART_ALIASES: Final = {"_loss": "sklearn._loss._loss"}
_SKOPS_LOADERS: Final = frozenset(
    {
        "DTypeNode",
        "DictNode",
        "FunctionNode",
        "JsonNode",
        "ListNode",
        "LossNode",
        "NdArrayNode",
        "ObjectNode",
        "PartialNode",
        "RandomGeneratorNode",
        "RandomStateNode",
        "SliceNode",
        "TreeNode",
        "TupleNode",
        "TypeNode",
    }
)
_ALLOWED_REAL: Final = frozenset(f"{cls.__module__}.{cls.__qualname__}" for cls in ALLOWED.values())
MAX_SKOPS_BYTES: Final = 2 * 1024 * 1024 * 1024


def _accepted_type(name: str) -> bool:
    if name in _ALLOWED_REAL or name in _SKOPS_PARTS:
        return True
    module_name, _, attribute = name.rpartition(".")
    home = _SKOPS_PART_ALIASES.get(module_name, module_name)
    if home not in _SKOPS_PART_MODULES:
        return False
    found = getattr(importlib.import_module(home), attribute, None)
    return inspect.isclass(found) and found.__module__ == module_name


# Fitted attributes with one entry per training row: a cluster label or out-of-bag prediction for every record, in
# row order. Prediction does not need them, so an exported file leaves them out.
_PER_ROW_ATTRIBUTES: Final = ("labels_", "oob_decision_function_", "oob_prediction_")


def to_skops(model: TrainedModel, *, facts: bool = False) -> bytes:
    """The fitted estimator as a ``.skops`` file (a zip that ``skops.io.load`` reads; never a pickle).

    Without ``facts`` this is what an export gives the analyst, minus the fitted attributes that hold a value per
    training row (:data:`_PER_ROW_ATTRIBUTES`). Sealing passes ``facts=True``: the file then keeps the whole model
    and carries ``confnb-model.json``, the record counts the policy checks need after :func:`from_skops`; they
    are not released values, so only the sealed (encrypted) payload carries them.
    """
    if not facts:
        return bytes(sio.dumps(_exported_copy(model)))
    buffer = io.BytesIO(sio.dumps(model.estimator))
    with zipfile.ZipFile(buffer, "a", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(_FACTS_ENTRY, json.dumps(_facts(model), sort_keys=True, allow_nan=False))
    return buffer.getvalue()


def _exported_copy(model: TrainedModel) -> Any:
    """A copy of the vault's estimator holding only :data:`FITTED_ATTRIBUTES`, checked before any byte is written.

    Attributes on :data:`_STRIPPED` (and per-row values) are removed; any other fitted attribute refuses the whole
    file, so a new scikit-learn attribute never leaves unreviewed and no partial file is written.
    """
    refusal = _structural_refusal(model.estimator)
    if refusal is not None:
        raise PolicyViolation("release.min_group_size", sorted(model.datasets), f"export: {refusal}")
    stripped = copy.deepcopy(model.estimator)
    for part in _walk(stripped):
        removed = _STRIPPED.get(type(part).__name__, frozenset()) | set(_PER_ROW_ATTRIBUTES)
        for name in _fitted_state(part):
            if name in removed:
                delattr(part, name)
    for part in _walk(stripped):  # the copy itself is what is written: check it, not the original
        left = [name for name in _fitted_state(part) if name not in _allowlist(part)]
        if left:
            raise VaultError(f"export: a fitted {type(part).__name__} still carries {', '.join(sorted(left)[:5])}")
    return stripped


_RECORD_FACTS: Final = (
    "train_records",
    "eval_records",
    "class_records",
    "cluster_records",
    "category_records",
    "target_records",
)


def _facts(model: TrainedModel) -> dict[str, Any]:
    facts: dict[str, Any] = {"n_train": model.n_train, "n_test": model.n_test, "warnings": list(model.warnings)}
    for key in _RECORD_FACTS:
        records = getattr(model, key)
        facts[key] = None if records is None else dict(records)
    features = model.feature_records or {}
    facts["feature_records"] = [[column, dict(features[column])] for column in model.features if column in features]
    facts["input_records"] = None if model.input_records is None else [dict(r) for r in model.input_records]
    facts["min_group_size"] = dict(model.min_group_size)
    facts["leverage"] = model.leverage
    facts["target_isolated"] = model.target_isolated
    return facts


def describe(model: TrainedModel) -> dict[str, Any]:
    """What a sealed model's readable header says about it: names only, no counts and no values.

    Sealed headers are authenticated, not encrypted; the record counts travel inside the sealed payload.
    """
    return {
        "estimator": model.estimator_name,
        "task": model.task,
        "features": list(model.features),
        "target": model.target,
        "datasets": sorted(model.datasets),
        "lineage": {column: sorted(map(list, origins)) for column, origins in model.lineage.items()},
        "frame": model.frame,
    }


def load_estimator(data: bytes) -> Any:
    """A fitted estimator from ``.skops`` bytes, constructing only the types an allowlisted model is made of.

    skops trusts some types by default (any scikit-learn estimator among them); the vault trusts fewer, so every
    type and loader the file names is checked here first, and the file is refused if anything is outside the set.
    """
    if not isinstance(data, bytes | bytearray) or len(data) > MAX_SKOPS_BYTES:
        raise VaultError("a model file is bytes, at most 2 GiB")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            schema = json.loads(archive.read("schema.json"))
    except (zipfile.BadZipFile, KeyError, ValueError, UnicodeDecodeError, RecursionError):
        raise VaultError("the model file is not a .skops file") from None
    if not isinstance(schema, dict):
        raise VaultError("the model file is not a .skops file")
    try:
        named = set(_schema_types(schema, 0))
    except RecursionError:
        raise VaultError("the model file nests too deeply") from None
    refused = sorted(name for name in named if not _accepted_type(name))
    if refused:
        shown = ", ".join(_short(name, 100) for name in refused[:5])
        raise VaultError(f"the model file names types the vault does not load: {shown}")
    root = f"{schema.get('__module__')}.{schema.get('__class__')}"
    if root not in _ALLOWED_REAL:
        raise VaultError(f"the model file holds a {_short(root, 100)}, not an allowlisted estimator")
    try:
        untrusted = sio.get_untrusted_types(data=bytes(data))
        if any(not _accepted_type(name) for name in untrusted):
            raise VaultError("the model file names types the vault does not load")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. a file written by another scikit-learn version
            estimator = sio.loads(bytes(data), trusted=untrusted)
    except VaultError:
        raise
    except Exception as exc:
        raise VaultError(f"the model file could not be loaded ({type(exc).__name__})") from None
    if type(estimator) not in ALLOWED.values():
        raise VaultError("the model file does not hold an allowlisted estimator")
    return estimator


def _schema_types(node: object, depth: int) -> Iterator[str]:
    if depth > 200:
        raise VaultError("the model file nests too deeply")
    if isinstance(node, dict):
        if "__loader__" in node or "__class__" in node or "__module__" in node:
            loader = node.get("__loader__")
            if loader not in _SKOPS_LOADERS:
                raise VaultError(f"the model file uses a loader the vault does not run: {_short(loader, 60)}")
            yield f"{node.get('__module__')}.{node.get('__class__')}"
        for value in node.values():
            yield from _schema_types(value, depth + 1)
    elif isinstance(node, list):
        for value in node:
            yield from _schema_types(value, depth + 1)


def from_skops(data: bytes, description: Mapping[str, Any]) -> TrainedModel:
    """A :class:`TrainedModel` from :func:`to_skops` bytes (with facts) and its :func:`describe` header.

    The estimator is loaded under :func:`load_estimator`'s type check and must agree with the description; a file
    without the record counts is refused, since parameters and predictions could not be checked without them.
    It carries no evaluation set, so :func:`metrics` and :func:`score` need a new fit.
    """
    estimator = load_estimator(data)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            facts = json.loads(archive.read(_FACTS_ENTRY))
    except (zipfile.BadZipFile, KeyError, ValueError, UnicodeDecodeError):
        raise VaultError("the model file carries no record counts (it was not sealed by a vault)") from None
    try:
        if not isinstance(description, Mapping) or not isinstance(facts, dict):
            raise TypeError
        name = description["estimator"]
        task = description["task"]
        features = description["features"]
        target = description["target"]
        datasets = description["datasets"]
        lineage_doc = description["lineage"]
        frame = description["frame"]
        if not (
            name == type(estimator).__name__
            and task == _task(estimator)
            and isinstance(features, list)
            and features
            and all(isinstance(f, str) for f in features)
            and (target is None or isinstance(target, str))
            and isinstance(datasets, list)
            and datasets
            and all(isinstance(d, str) for d in datasets)
            and isinstance(lineage_doc, dict)
            and isinstance(frame, bool)
        ):
            raise TypeError
        lineage = {
            str(column): frozenset((str(pair[0]), str(pair[1])) for pair in origins)
            for column, origins in lineage_doc.items()
        }
        if set(lineage) != {*features, *([target] if target is not None else [])}:
            raise TypeError
        if not all(key in facts for key in ("target_records", "feature_records", "input_records", "target_isolated")):
            raise VaultError(
                "the sealed model carries no per-column record counts (it was sealed by an earlier vault); fit it again"
            )
        records = {key: _records_fact(facts[key], set(datasets)) for key in _RECORD_FACTS}
        if records["train_records"] is None or (target is not None and records["target_records"] is None):
            raise TypeError
        feature_doc = facts["feature_records"]
        if not isinstance(feature_doc, list) or [pair[0] for pair in feature_doc] != list(features):
            raise TypeError
        feature_records = {
            str(pair[0]): _records_fact(pair[1], set(datasets)) or MappingProxyType({}) for pair in feature_doc
        }
        input_doc = facts["input_records"]
        if input_doc is not None and not isinstance(input_doc, list):
            raise TypeError
        input_records = (
            None
            if input_doc is None
            else tuple(_records_fact(item, set(datasets)) or MappingProxyType({}) for item in input_doc)
        )
        thresholds = _records_fact(facts.get("min_group_size"), set(datasets)) or MappingProxyType({})
        leverage = facts.get("leverage")
        if leverage is not None and (isinstance(leverage, bool) or not isinstance(leverage, int | float)):
            raise TypeError
        target_isolated = facts["target_isolated"]
        if not isinstance(target_isolated, bool):
            raise TypeError
        n_train, n_test = _count(facts["n_train"]), _count(facts["n_test"])
        categories = facts.get("warnings", [])
        if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
            raise TypeError
    except (KeyError, TypeError, ValueError, IndexError):
        raise VaultError("the sealed model's description or record counts are malformed") from None
    return TrainedModel(
        estimator=estimator,
        estimator_name=name,
        task=task,
        features=tuple(features),
        target=target,
        n_train=n_train,
        n_test=n_test,
        datasets=frozenset(datasets),
        lineage=MappingProxyType(lineage),
        frame=frame,
        train_records=records["train_records"] or {},
        eval_records=MappingProxyType({}),  # no evaluation set travels with a sealed model
        class_records=records["class_records"],
        cluster_records=records["cluster_records"],
        category_records=records["category_records"],
        warnings=tuple(categories),
        target_records=records["target_records"],
        feature_records=MappingProxyType(feature_records),
        input_records=input_records,
        min_group_size=thresholds,
        leverage=None if leverage is None else float(leverage),
        target_isolated=target_isolated,
    )


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError("a count")
    return value


def _records_fact(value: object, datasets: set[str]) -> Records | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != datasets:
        raise TypeError("record counts per dataset")
    return MappingProxyType({str(dataset): _count(count) for dataset, count in value.items()})
