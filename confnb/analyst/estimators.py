"""Estimator specs: a scikit-learn estimator described as JSON, for the vault to rebuild from its allowlist.

The analyst's estimator object never crosses to the vault: pickling it would let the analyst's process run code in
the vault. Instead its class name and constructor parameters (``get_params(deep=False)``) are written down as data,
and the vault builds a fresh estimator from an allowlist of classes, checking every parameter. A parameter that is
not data (a callable, an array, a random generator) cannot be written down, so it is refused here with a message
naming it, before anything is sent.

Spec::

    {"class": "sklearn.linear_model.LogisticRegression", "params": {"C": 0.5, ...}}

Nested estimators (pipeline steps, column transformers, ``init`` of gradient boosting) are specs themselves; tuples
become lists; NumPy scalars become Python numbers. Three values JSON cannot express are tagged objects:
``{"float": "nan"|"inf"|"-inf"}`` (SimpleImputer's ``missing_values=np.nan``), ``{"dtype": "float64"}``
(OneHotEncoder's ``dtype``) and ``{"dict": [[key, value], ...]}`` (a mapping such as ``class_weight={0: 1, 1: 5}``,
whose keys need not be strings).

This module runs in the analyst's process and needs only scikit-learn's duck-typed estimator protocol; it imports
nothing from the enclave.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["encode_estimator"]

MAX_DEPTH = 8  # estimators nested in estimators, as the vault accepts
_MAX_VALUE_DEPTH = 16


def encode_estimator(estimator: object) -> dict[str, Any]:
    """The spec of an (unfitted or fitted) estimator: its class and constructor parameters as JSON data.

    Fitted state is not part of the spec: the vault trains the estimator itself. Raises :class:`TypeError` naming
    the parameter that cannot be sent.
    """
    return _encode_estimator(estimator, type(estimator).__name__, 0)


def _is_estimator(value: object) -> bool:
    return not isinstance(value, type) and callable(getattr(value, "get_params", None))


def _encode_estimator(estimator: object, where: str, depth: int) -> dict[str, Any]:
    if not _is_estimator(estimator):
        raise TypeError(f"{where}: a {type(estimator).__name__} is not a scikit-learn estimator instance")
    if depth > MAX_DEPTH:
        raise TypeError(f"{where}: estimators nested more than {MAX_DEPTH} deep")
    cls = type(estimator)
    parameters = estimator.get_params(deep=False)  # type: ignore[attr-defined]  # checked by _is_estimator
    if not isinstance(parameters, Mapping):
        raise TypeError(f"{where}: get_params() did not return a mapping")
    path = class_path(cls)
    if path.startswith("diffprivlib.") and "accountant" in parameters:
        _check_accountant(parameters["accountant"], where)
        parameters = {**parameters, "accountant": None}
    encoded = {
        str(name): _encode(value, f"{where}.{name}" if depth == 0 else f"{where} {cls.__name__}.{name}", depth, 0)
        for name, value in parameters.items()
    }
    return {"class": path, "params": encoded}


def _check_accountant(accountant: object, where: str) -> None:
    """diffprivlib's estimators carry a budget accountant; in confnb the data owner's broker keeps the budget, so only
    the default one (which the estimator sets itself) is accepted, and it is sent as unset."""
    from diffprivlib.accountant import BudgetAccountant  # type: ignore[import-untyped]

    if accountant is not None and accountant is not BudgetAccountant.load_default(None):
        raise TypeError(f"{where}.accountant: the privacy budget is kept by the data owner's broker; leave it unset")


def class_path(cls: type) -> str:
    """The public dotted name of a class: ``sklearn.linear_model.LogisticRegression``, not its private module.

    scikit-learn defines classes in private modules (``sklearn.linear_model._logistic``) and exports them from the
    public package; the vault's allowlist names the public path, which stays stable across releases.
    """
    parts = cls.__module__.split(".")
    public = []
    for part in parts:
        if part.startswith("_"):
            break
        public.append(part)
    # The shortest package that exports the class (diffprivlib.models, not diffprivlib.models.logistic_regression).
    for end in range(min(2, len(public)), len(public) + 1):
        candidate = ".".join(public[:end])
        if not candidate or candidate == cls.__module__:
            continue
        try:
            module = importlib.import_module(candidate)
        except ImportError:
            continue
        if getattr(module, cls.__qualname__, None) is cls:
            return f"{candidate}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _encode(value: object, where: str, depth: int, level: int) -> Any:
    import numpy as np

    if level > _MAX_VALUE_DEPTH:
        raise TypeError(f"{where}: values nested more than {_MAX_VALUE_DEPTH} deep")
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, np.generic):
        if isinstance(value, np.bool_):
            return bool(value)
        if isinstance(value, np.integer):
            return int(value)
        if isinstance(value, np.floating):
            return _float(float(value))
        if isinstance(value, np.str_):
            return str(value)
        raise TypeError(f"{where}: a NumPy {type(value).__name__} cannot be sent to the vault")
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, np.dtype):
        return {"dtype": value.name}
    if isinstance(value, type) and issubclass(value, np.generic):
        return {"dtype": np.dtype(value).name}
    if _is_estimator(value):
        return _encode_estimator(value, where, depth + 1)
    if isinstance(value, np.ndarray):
        raise TypeError(f"{where}: an array cannot be sent to the vault; pass a list of values instead")
    if isinstance(value, list | tuple):
        return [_encode(item, f"{where}[{i}]", depth, level + 1) for i, item in enumerate(value)]
    if isinstance(value, Mapping):
        pairs = []
        for key, item in value.items():
            encoded_key = _encode(key, f"{where} key", depth, level + 1)
            if not isinstance(encoded_key, str | int | float | bool):
                raise TypeError(f"{where}: a mapping key must be a string or a number")
            pairs.append([encoded_key, _encode(item, f"{where}[{key!r}]", depth, level + 1)])
        return {"dict": pairs}
    if isinstance(value, np.random.RandomState | np.random.Generator):
        raise TypeError(f"{where}: a random generator cannot be sent to the vault; pass an integer seed")
    if callable(value):
        name = getattr(value, "__qualname__", type(value).__name__)
        raise TypeError(
            f"{where}: a callable ({name}) cannot be sent to the vault, which rebuilds estimators from data only; "
            "use one of the estimator's named options"
        )
    raise TypeError(f"{where}: a {type(value).__name__} cannot be sent to the vault (JSON values, lists, estimators)")


def _float(value: float) -> Any:
    if math.isnan(value):
        return {"float": "nan"}
    if math.isinf(value):
        return {"float": "inf" if value > 0 else "-inf"}
    return value
