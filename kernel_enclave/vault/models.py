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
- predictions are a released table, so ``max_rows`` caps them.

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
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]
import skops.io as sio  # type: ignore[import-untyped]
from sklearn import metrics as skm  # type: ignore[import-untyped]
from sklearn.base import is_classifier, is_clusterer, is_regressor  # type: ignore[import-untyped]
from sklearn.compose import ColumnTransformer  # type: ignore[import-untyped]
from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]
from sklearn.pipeline import Pipeline  # type: ignore[import-untyped]
from sklearn.preprocessing import OneHotEncoder  # type: ignore[import-untyped]
from sklearn.utils import _safe_indexing  # type: ignore[import-untyped]
from sklearn.utils._param_validation import InvalidParameterError  # type: ignore[import-untyped]

from confnb.policy.output import OutputPolicy
from kernel_enclave.vault import stoppable
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

_CLASSES: Final = (
    (
        "sklearn.linear_model",
        ("LogisticRegression", "LinearRegression", "Ridge", "Lasso", "ElasticNet", "SGDClassifier", "SGDRegressor"),
    ),
    ("sklearn.tree", ("DecisionTreeClassifier", "DecisionTreeRegressor")),
    (
        "sklearn.ensemble",
        (
            "RandomForestClassifier",
            "RandomForestRegressor",
            "ExtraTreesClassifier",
            "ExtraTreesRegressor",
            "GradientBoostingClassifier",
            "GradientBoostingRegressor",
            "HistGradientBoostingClassifier",
            "HistGradientBoostingRegressor",
        ),
    ),
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
# of two records) and leaves as small as one record; MinMaxScaler keeps each feature's minimum and maximum.
_UNEXPORTABLE_MODULES = ("sklearn.tree", "sklearn.ensemble")
_UNEXPORTABLE_CLASSES = ("MinMaxScaler",)


def export_refusal(model: TrainedModel) -> str | None:
    """Why this model's full fitted state may not leave the vault as a file, or None when it may."""
    for part in _walk(model.estimator):
        kind = type(part)
        if kind.__module__.startswith(_UNEXPORTABLE_MODULES) or kind.__name__ in _UNEXPORTABLE_CLASSES:
            return (
                f"a fitted {kind.__name__} keeps single records' values (split points, leaves or extremes); "
                "release what the policy allows with m.params() and m.metrics() instead"
            )
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
    if frame:
        return table.select(list(features)).to_pandas()
    return _matrix(table, features)


def _rows(data: Any, rows: np.ndarray[Any, Any]) -> Any:
    return data.iloc[rows] if isinstance(data, pd.DataFrame) else np.take(data, rows, axis=0)


def _target(table: pa.Table, target: str, task: str) -> np.ndarray[Any, Any]:
    column = table.column(target)
    if column.null_count:
        raise VaultError(f"fit: the target column {target!r} has missing values; filter them out first")
    if task == "regression":
        if not _is_numeric(column.type):
            raise VaultError(f"fit: the target column {target!r} ({column.type}) is not numeric")
        return np.asarray(pc.cast(column, pa.float64()).to_numpy())
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
    try:
        x = _inputs(table, chosen, frame)
    except (pa.ArrowException, ValueError, TypeError) as exc:
        raise _failure("fit", name, exc) from None
    y = _target(table, target, task) if target is not None else None
    n_rows = table.num_rows
    # A model of fewer than k records could release nothing, and even its training errors (one class only, say)
    # would describe those few records: refuse as a withheld row count would, before touching the values.
    all_records = _RecordCounter(source, None).total()
    _require_records(all_records, policies, "the training data")
    train_rows: np.ndarray[Any, Any] | None = None
    test_rows: np.ndarray[Any, Any] | None = None
    if test_size is not None:
        # Splitting row numbers (then taking them) is what train_test_split does to each array anyway; the row
        # numbers are also what the record counts below need.
        try:
            train_rows, test_rows = train_test_split(np.arange(n_rows), test_size=test_size, random_state=random_state)
        except ValueError:
            raise VaultError("fit: too few records to hold out a test split of that size") from None
        x_train, y_train = _rows(x, train_rows), (y[train_rows] if y is not None else None)
        x_test, y_test = _rows(x, test_rows), (y[test_rows] if y is not None else None)
    else:
        x_train, y_train, x_test, y_test = x, y, None, None
    n_train = len(x_train)
    counter = _RecordCounter(source, train_rows)
    train_records = counter.total() if train_rows is not None else all_records
    _require_records(train_records, policies, "the training split")

    # Training runs in a worker process the vault kills when the analyst interrupts the cell (see stoppable).
    estimator, fit_warnings = stoppable.run(_train, estimator, x_train, y_train, openmp=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            class_records = counter.smallest_group(y_train) if task == "classification" else None
            labels = getattr(_final(estimator), "labels_", None)
            cluster_records = counter.smallest_group(labels) if task == "clustering" and labels is not None else None
            category_records = None
            if any(isinstance(part, OneHotEncoder) for part in _walk(estimator)):
                category_records = counter.smallest_indicator(_indicators(estimator, x_train))
        except Exception as exc:
            raise _failure("fit", name, exc) from None
    categories = tuple(dict.fromkeys([*fit_warnings, *(w.category.__name__ for w in caught)]))
    eval_records = _RecordCounter(source, test_rows).total() if test_rows is not None else train_records
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
    )


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
        if source.record_ids is not None:
            picked = None if rows is None else pa.array(rows, pa.int64())
            for dataset, ids in source.record_ids:
                self.occurrences.append((dataset, ids if picked is None else ids.take(picked)))

    def _counts(self, per_occurrence: Any, default: int) -> dict[str, int]:
        counts = dict.fromkeys(self.datasets, default)
        seen: set[str] = set()
        for dataset, ids in self.occurrences:
            count = int(per_occurrence(ids))
            counts[dataset] = count if dataset not in seen else min(counts[dataset], count)
            seen.add(dataset)
        return counts

    def total(self) -> dict[str, int]:
        return self._counts(lambda ids: pc.count_distinct(ids, mode="only_valid").as_py(), self.n_rows)

    def smallest_group(self, labels: Any) -> dict[str, int]:
        """Per dataset, the records of the smallest group of rows sharing a label (a class, a cluster)."""
        values = np.asarray(labels)
        _, counts = np.unique(values, return_counts=True)
        smallest_rows = int(counts.min()) if counts.size else 0

        def smallest(ids: Any) -> int:
            grouped = (
                pa.table({"g": pa.array(values), "id": ids})
                .group_by("g")
                .aggregate([("id", "count_distinct", pc.CountOptions(mode="only_valid"))])
            )
            return int(pc.min(grouped.column("id_count_distinct")).as_py() or 0)

        return self._counts(smallest, smallest_rows)

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

        def smallest(ids: Any) -> int:
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
    people. Metrics that are undefined on this evaluation set (one class only, say) are left out.
    """
    require_kind("model_metrics", model.datasets, policies)
    _require_eval(model)
    _check_records(model.train_records, model, policies, "the model's training set")
    _check_records(model.eval_records, model, policies, "the model's evaluation set")
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


def score(model: TrainedModel, policies: Mapping[str, OutputPolicy]) -> float:
    """``estimator.score`` on the evaluation set (accuracy, R², negative inertia), released as ``model_metrics``."""
    require_kind("model_metrics", model.datasets, policies)
    _require_eval(model)
    _check_records(model.train_records, model, policies, "the model's training set")
    _check_records(model.eval_records, model, policies, "the model's evaluation set")
    if not _has(model.estimator, "score"):
        raise VaultError(f"{model.estimator_name} has no score")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            value = model.estimator.score(model.X_eval, model.y_eval)
        except Exception as exc:
            raise _failure("score", model.estimator_name, exc) from None
    result = _finite(value)
    if result is None:
        raise VaultError(f"{model.estimator_name}: the score is not a finite number")
    return result


def _check_groups(model: TrainedModel, policies: Mapping[str, OutputPolicy]) -> None:
    """The training set and every group whose value a parameter or prediction names must meet min_group_size."""
    _check_records(model.train_records, model, policies, "the model's training set")
    if model.task == "classification":
        _check_records(model.class_records, model, policies, "the smallest class of the training target")


def params(model: TrainedModel, policies: Mapping[str, OutputPolicy]) -> dict[str, Any]:
    """Fitted parameters by feature name, released as ``model_parameters``.

    Coefficients, intercepts, classes, feature importances, cluster centres and iteration counts. Internals that
    quote training values directly (tree thresholds, scaler means, per-class feature means) are not released.
    Cluster centres are the means of their clusters, and one-hot categories and class labels are values of the
    data, so each such group must meet min_group_size like an aggregate row.
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
    classes = getattr(final, "classes_", None)
    labels = [_scalar(label) for label in classes] if classes is not None else None
    if labels is not None:
        released["classes_"] = labels
    coef = getattr(final, "coef_", None)
    if coef is not None:
        released["coef_"] = _by_row(np.asarray(coef, dtype=np.float64), names, labels)
    intercept = getattr(final, "intercept_", None)
    if intercept is not None:
        values = np.atleast_1d(np.asarray(intercept, dtype=np.float64))
        if values.size == 1:
            released["intercept_"] = _finite(values[0])
        else:
            keys = [str(label) for label in labels] if labels is not None and len(labels) == values.size else None
            released["intercept_"] = (
                dict(zip(keys, map(_finite, values), strict=True)) if keys else [_finite(v) for v in values]
            )
    importances = _attribute(final, "feature_importances_")
    if importances is not None:
        released["feature_importances_"] = _named(np.asarray(importances, dtype=np.float64), names)
    centers = getattr(final, "cluster_centers_", None)
    if centers is not None:
        _check_records(model.cluster_records, model, policies, "the smallest cluster")
        released["cluster_centers_"] = [_named(row, names) for row in np.asarray(centers, dtype=np.float64)]
    n_iter = getattr(final, "n_iter_", None)
    if n_iter is not None:
        array = np.asarray(n_iter)
        released["n_iter_"] = int(array) if array.ndim == 0 else [int(v) for v in array.ravel()]
    return released


def _attribute(estimator: Any, name: str) -> Any:
    try:
        return getattr(estimator, name, None)
    except (AttributeError, ValueError):
        return None


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _named(row: np.ndarray[Any, Any], names: Sequence[str]) -> dict[str, float | None]:
    return {name: _finite(value) for name, value in zip(names, row, strict=True)}


def _by_row(coef: np.ndarray[Any, Any], names: Sequence[str], labels: list[Any] | None) -> Any:
    if coef.ndim == 1:
        return _named(coef, names)
    if coef.shape[0] == 1:
        return _named(coef[0], names)
    if labels is not None and len(labels) == coef.shape[0]:
        return {str(label): _named(row, names) for label, row in zip(labels, coef, strict=True)}
    return [_named(row, names) for row in coef]


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
    if module_name not in _SKOPS_PART_MODULES:
        return False
    found = getattr(importlib.import_module(module_name), attribute, None)
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
        return bytes(sio.dumps(_without_rows(model.estimator)))
    buffer = io.BytesIO(sio.dumps(model.estimator))
    with zipfile.ZipFile(buffer, "a", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(_FACTS_ENTRY, json.dumps(_facts(model), sort_keys=True, allow_nan=False))
    return buffer.getvalue()


def _without_rows(estimator: Any) -> Any:
    if not any(hasattr(part, name) for part in _walk(estimator) for name in _PER_ROW_ATTRIBUTES):
        return estimator
    stripped = copy.deepcopy(estimator)
    for part in _walk(stripped):
        for name in _PER_ROW_ATTRIBUTES:
            if name in vars(part):
                delattr(part, name)
    return stripped


_RECORD_FACTS: Final = ("train_records", "eval_records", "class_records", "cluster_records", "category_records")


def _facts(model: TrainedModel) -> dict[str, Any]:
    facts: dict[str, Any] = {"n_train": model.n_train, "n_test": model.n_test, "warnings": list(model.warnings)}
    for key in _RECORD_FACTS:
        records = getattr(model, key)
        facts[key] = None if records is None else dict(records)
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
        records = {key: _records_fact(facts[key], set(datasets)) for key in _RECORD_FACTS}
        if records["train_records"] is None:
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
