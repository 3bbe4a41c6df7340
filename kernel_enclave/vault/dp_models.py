"""Differentially private models: diffprivlib's estimators, fitted on one dataset and charged to its owner's budget.

Under ``[privacy] mode = "dp"`` exact models are refused: a coefficient of an exact fit can be made to carry one
record's value. A DP fit is decided and priced from the request alone, before any row is read, then charged at the
owner's broker by the vault (as a noisy release is, see :mod:`kernel_enclave.vault.dp`), and only then run:

- the plan is one dataset under a chain of ``filter``/``select``/``assign`` whose expressions are row-wise (no
  window function): each training row comes from one record, so a person changes at most their own rows;
- the estimator is one of :data:`DP_ESTIMATORS`, with the analyst's parameters checked against each class's list.
  What privacy rests on is the vault's, never the analyst's: every feature's bounds (and a regression target's)
  are the owner's ``[privacy.bounds]``, narrowed to the analyst's ``bounds``/``bounds_X``/``bounds_y`` where those
  lie inside them (the vault clips to the intersection itself), a classifier's classes are the owner's
  ``[privacy.keys]`` of its target, a norm is the bounds' unless the analyst gives a smaller one (diffprivlib clips
  each row to it), and there is no seed (``random_state=None``: diffprivlib's mechanisms then draw every noise
  value from ``secrets.SystemRandom``; a fixed seed would let two fits cancel each other's noise);
- the price is the estimator's ε times ``max_contributions``: diffprivlib's guarantee is per row, and a person
  has at most that many rows (with a ``unit`` column each person's rows are truncated to it, as for releases);
  δ is 0 (these mechanisms are pure ε-DP);
- the data: rows with a missing feature or target are left out, values are clipped to the owner's bounds by the
  vault itself, a classifier's rows whose label is no public key are left out; then public rows at the centre of
  the bounds are added: one per class, one per cluster (k-means needs k rows), one for the others. That changes no
  guarantee (the rows are the same for every dataset) and makes the fit total: it never fails, nor succeeds,
  because of what the data holds (no rows at all, a class absent);
- released: the fitted attributes in :data:`FITTED`, each produced by diffprivlib's mechanisms (not the exact row
  count some of them also keep, nor iteration counts), and predictions on public data (computed from those
  parameters only). Metrics on the sealed data, ``score`` and exports are refused: nothing exact leaves.

Not offered: diffprivlib's ``GaussianNB`` (its noisy class counts are forced to add up to the exact row count)
and its trees (their fitted state keeps per-node sample counts).
"""

from __future__ import annotations

import inspect
import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

import numpy as np
import polars as pl
import pyarrow as pa  # type: ignore[import-untyped]
from diffprivlib import models as dpl  # type: ignore[import-untyped]

from confnb.receipt_format import sha256_digest
from kernel_enclave.vault import plan, stoppable
from kernel_enclave.vault.dp import PrivacyBudgetRules
from kernel_enclave.vault.plan import Assign, Call, Col, Expr, Filter, Lit, Select, Source, SourceTable, quote
from kernel_enclave.vault.protocol import PolicyViolation, VaultError

__all__ = ["DP_ESTIMATORS", "FITTED", "DpModel", "PreparedDpFit", "params", "predict", "prepare"]

RULE = "privacy.mode"
MAX_FEATURES: Final = 256
# Parameters the vault sets itself (see the module docstring); the analyst leaves them unset.
_VAULT_SET: Final = frozenset({"random_state", "accountant"})
# Bounds and norms an analyst may give to narrow the owner's (less noise): the vault keeps the intersection with the
# owner's bounds and clips the data to it, so whatever is given, no value reaches the fit outside the owner's bounds.
_NARROWING: Final = frozenset({"bounds", "bounds_X", "bounds_y", "data_norm"})


def _positive(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value) and value > 0


def _flag(value: object) -> bool:
    return isinstance(value, bool)


def _count(low: int, high: int) -> Callable[[object], bool]:
    def check(value: object) -> bool:
        return not isinstance(value, bool) and isinstance(value, int) and low <= value <= high

    return check


@dataclass(frozen=True)
class _Kind:
    """One DP estimator class: its task, the parameters an analyst may set (name -> check, with what it expects),
    and how its bounds reach it."""

    cls: type
    task: str  # classification, regression, clustering, transform
    settable: Mapping[str, tuple[Callable[[object], bool], str]]
    needs: Callable[[np.ndarray, np.ndarray, tuple[float, float] | None], dict[str, Any]]


def _box(low: np.ndarray, high: np.ndarray, _: tuple[float, float] | None) -> dict[str, Any]:
    return {"bounds": (low.tolist(), high.tolist())}


def _norm(low: np.ndarray, high: np.ndarray, _: tuple[float, float] | None) -> dict[str, Any]:
    """A row's largest L2 norm inside the box: the norm a logistic regression clips to."""
    return {"data_norm": max(float(np.linalg.norm(np.maximum(np.abs(low), np.abs(high)))), 1e-12)}


def _pca(low: np.ndarray, high: np.ndarray, _: tuple[float, float] | None) -> dict[str, Any]:
    """A centred row's largest norm: the mean lies in the box, so no row is farther from it than the box's diagonal."""
    return {"bounds": (low.tolist(), high.tolist()), "data_norm": max(float(np.linalg.norm(high - low)), 1e-12)}


def _linear(low: np.ndarray, high: np.ndarray, target: tuple[float, float] | None) -> dict[str, Any]:
    assert target is not None
    return {"bounds_X": (low.tolist(), high.tolist()), "bounds_y": target}


_EPSILON: Final = (_positive, "a positive number")
DP_ESTIMATORS: Final[Mapping[str, _Kind]] = MappingProxyType(
    {
        "diffprivlib.models.LinearRegression": _Kind(
            dpl.LinearRegression,
            "regression",
            {"epsilon": _EPSILON, "fit_intercept": (_flag, "true or false"), "copy_X": (_flag, "true or false")},
            _linear,
        ),
        "diffprivlib.models.LogisticRegression": _Kind(
            dpl.LogisticRegression,
            "classification",
            {
                "epsilon": _EPSILON,
                "C": (_positive, "a positive number"),
                "tol": (_positive, "a positive number"),
                "fit_intercept": (_flag, "true or false"),
                "max_iter": (_count(1, 10_000), "an integer in 1..10000"),
            },
            _norm,
        ),
        "diffprivlib.models.KMeans": _Kind(
            dpl.KMeans,
            "clustering",
            {"epsilon": _EPSILON, "n_clusters": (_count(1, 256), "an integer in 1..256")},
            _box,
        ),
        "diffprivlib.models.PCA": _Kind(
            dpl.PCA,
            "transform",
            {
                "epsilon": _EPSILON,
                "n_components": (_count(1, MAX_FEATURES), f"an integer in 1..{MAX_FEATURES}"),
                "centered": (_flag, "true or false"),
                "whiten": (_flag, "true or false"),
                "copy": (_flag, "true or false"),
            },
            _pca,
        ),
        "diffprivlib.models.StandardScaler": _Kind(
            dpl.StandardScaler,
            "transform",
            {
                "epsilon": _EPSILON,
                "with_mean": (_flag, "true or false"),
                "with_std": (_flag, "true or false"),
                "copy": (_flag, "true or false"),
            },
            _box,
        ),
    }
)
"""Public dotted class name -> what the vault accepts of it: the only estimators fitted on a DP dataset."""

FITTED: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "LinearRegression": ("coef_", "intercept_"),
        "LogisticRegression": ("classes_", "coef_", "intercept_"),
        "KMeans": ("cluster_centers_",),
        "PCA": ("components_", "mean_", "explained_variance_ratio_"),
        "StandardScaler": ("mean_", "var_", "scale_"),
    }
)
"""The fitted attributes released per DP estimator: each the output of diffprivlib's mechanisms."""


@dataclass(frozen=True)
class DpModel:
    """A DP-fitted estimator held in the vault, with what its fit cost."""

    estimator: Any
    estimator_name: str
    task: str
    features: tuple[str, ...]
    target: str | None
    datasets: frozenset[str]
    epsilon: float  # charged: the estimator's ε times max_contributions
    epsilon_remaining: Mapping[str, float] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"<DpModel {self.estimator_name} ({self.task}) features={list(self.features)} ε={self.epsilon:g}>"


@dataclass(frozen=True)
class PreparedDpFit:
    """A DP fit decided and priced from the request and the schema; :meth:`run` reads the rows and fits."""

    dataset: str
    epsilon: float
    plan_digest: str
    lineage: Mapping[str, plan.Lineage]  # of the features and the target, for the never_release rule
    _run: Callable[[], DpModel] = field(repr=False)

    @property
    def datasets(self) -> tuple[str, ...]:
        return (self.dataset,)

    def run(self) -> DpModel:
        return self._run()


def _refuse(message: str, dataset: str) -> PolicyViolation:
    return PolicyViolation(RULE, [dataset], f"fit: {message}")


def prepare(
    tree: Mapping[str, Any],
    sources: Mapping[str, SourceTable],
    spec: object,
    target: str | None,
    features: Sequence[str] | None,
    privacy: Mapping[str, Any],
    dataset: str,
) -> PreparedDpFit:
    """Check a DP fit against the owner's privacy policy and price it; nothing is read, nothing is spent."""
    rules = PrivacyBudgetRules.from_dict(dataset, privacy)
    node = plan.parse_plan(tree)
    base = _row_wise_source(node, sources, dataset)
    name, kind, settable = _estimator(spec, dataset)
    source = plan.evaluate_node(node, sources)
    columns = source.columns
    chosen = [column for column in columns if column != target] if features is None else list(features)
    unknown = [column for column in [*chosen, *([target] if target else [])] if column not in columns]
    if unknown:
        raise VaultError(f"fit: no column {', '.join(map(quote, unknown))} in the table")
    if not chosen or len(chosen) > MAX_FEATURES or len(set(chosen)) != len(chosen):
        raise VaultError(f"fit: name 1 to {MAX_FEATURES} distinct feature columns")
    if target in chosen:
        raise VaultError(f"fit: the target {quote(target or '')} is also a feature")
    if kind.task in ("classification", "regression") and target is None:
        raise VaultError(f"fit: {name} is a {kind.task} estimator; name its target column")
    if kind.task in ("clustering", "transform") and target is not None:
        raise VaultError(f"fit: {name} does not use a target; pass target=None and choose the features")
    schema = source.schema
    for column in chosen:
        if not (schema[column].is_numeric() or schema[column] == pl.Boolean):
            raise VaultError(f"fit: the feature {quote(column)} ({schema[column]}) is not numeric")
    missing = [column for column in chosen if column not in rules.bounds]
    if kind.task == "regression" and target is not None:
        if not schema[target].is_numeric():
            raise VaultError(f"fit: the target {quote(target)} ({schema[target]}) is not numeric")
        missing += [target] if target not in rules.bounds else []
    if missing:
        raise PolicyViolation(
            "privacy.bounds",
            [dataset],
            f"fit: the owner's policy gives no bounds for {', '.join(map(quote, missing))}; a differentially "
            "private model clips every input to public bounds",
        )
    classes: tuple[str | int, ...] | None = None
    if kind.task == "classification" and target is not None:
        classes = rules.keys.get(target)
        if classes is None or len(classes) < 2:
            raise PolicyViolation(
                "privacy.keys",
                [dataset],
                f"fit: a differentially private classifier needs the owner's public keys of its target "
                f"{quote(target)} (at least two), so that its classes say nothing about the data",
            )
    if rules.unit is not None and rules.unit not in base.columns:
        raise VaultError(f"fit: the owner's privacy.unit names column {quote(rules.unit)}, which the dataset lacks")
    if "n_components" in settable and settable["n_components"] > len(chosen):
        raise VaultError(f"fit: n_components is at most the number of features ({len(chosen)})")
    epsilon = float(settable["epsilon"]) * rules.max_contributions
    if epsilon > rules.epsilon_limit:
        raise PolicyViolation(
            "privacy.budget",
            [dataset],
            f"fit: ε {settable['epsilon']:g} times max_contributions {rules.max_contributions} = {epsilon:g} is more "
            f"than one request may spend ({rules.epsilon_limit:g})",
        )
    low = np.array([rules.bounds[column][0] for column in chosen], dtype=np.float64)
    high = np.array([rules.bounds[column][1] for column in chosen], dtype=np.float64)
    target_bounds = rules.bounds[target] if kind.task == "regression" and target is not None else None
    low, high, target_bounds = _narrowed(name, settable, low, high, target_bounds)
    vault_set = {**kind.needs(low, high, target_bounds), "random_state": None}
    norm = settable.pop("data_norm", None)
    if norm is not None:
        if not _positive(norm):
            raise VaultError(f"fit: {name}.data_norm must be a positive number")
        if "data_norm" not in vault_set:
            raise VaultError(f"fit: {name} takes no data_norm")
        vault_set["data_norm"] = min(float(norm), vault_set["data_norm"])
    padding = 1
    if kind.task == "clustering":
        padding = int(settable.get("n_clusters", inspect.signature(kind.cls).parameters["n_clusters"].default))
    asked = {"plan": tree, "estimator": spec, "target": target, "features": chosen}
    digest = sha256_digest(json.dumps(asked, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())
    job = _Job(
        kind.cls,
        name,
        kind.task,
        dict(settable),
        vault_set,
        tuple(chosen),
        target,
        low,
        high,
        target_bounds,
        classes,
        padding,
    )

    def run() -> DpModel:
        x, y = _training_data(source, base, job, rules)
        estimator = stoppable.run(_fit, job, x, y, openmp=True)
        return DpModel(estimator, name, kind.task, job.features, target, frozenset({dataset}), epsilon)

    used = [*job.features, *([target] if target else [])]
    return PreparedDpFit(dataset, epsilon, digest, {column: source.lineage[column] for column in used}, run)


@dataclass(frozen=True)
class _Job:
    cls: type
    name: str
    task: str
    settable: dict[str, Any]
    vault_set: dict[str, Any]
    features: tuple[str, ...]
    target: str | None
    low: np.ndarray
    high: np.ndarray
    target_bounds: tuple[float, float] | None
    classes: tuple[str | int, ...] | None
    padding: int  # public rows added (classifiers: one per class)


def _narrowed(
    name: str,
    settable: dict[str, Any],
    low: np.ndarray,
    high: np.ndarray,
    target: tuple[float, float] | None,
) -> tuple[np.ndarray, np.ndarray, tuple[float, float] | None]:
    """The owner's bounds, narrowed to the analyst's where given (taken out of ``settable``): per feature the
    intersection, which must not be empty."""
    features = settable.pop("bounds", None)
    if features is None:
        features = settable.pop("bounds_X", None)
    else:
        settable.pop("bounds_X", None)
    if features is not None:
        given_low, given_high = _pair(features, f"{name}.bounds", low.size)
        low, high = np.maximum(low, given_low), np.minimum(high, given_high)
        if (low >= high).any():
            raise VaultError(f"fit: {name}'s bounds leave no range inside the owner's bounds for some feature")
    given_target = settable.pop("bounds_y", None)
    if given_target is not None:
        if target is None:
            raise VaultError(f"fit: {name} takes no bounds_y")
        (target_low,), (target_high,) = _pair(given_target, f"{name}.bounds_y", 1)
        target = (max(target[0], float(target_low)), min(target[1], float(target_high)))
        if target[0] >= target[1]:
            raise VaultError(f"fit: {name}.bounds_y leaves no range inside the owner's bounds for the target")
    return low, high, target


def _pair(value: object, where: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(low, high)`` as diffprivlib takes them: two numbers, or two lists of one number per feature."""
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise VaultError(f"fit: {where} must be (low, high)")
    sides = []
    for side in value:
        items = side if isinstance(side, list | tuple) else [side] * size
        if len(items) != size or not all(
            not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v) for v in items
        ):
            raise VaultError(f"fit: {where} must hold {size} finite number(s) on each side")
        sides.append(np.array(items, dtype=np.float64))
    return sides[0], sides[1]


def _row_wise_source(node: plan.Node, sources: Mapping[str, SourceTable], dataset: str) -> SourceTable:
    """The dataset under a chain of filter/select/assign nodes with row-wise expressions; anything else refused."""
    while not isinstance(node, Source):
        if not isinstance(node, Filter | Select | Assign):
            raise _refuse(
                f"a {type(node).__name__.lower()} in the plan: a differentially private model trains on one "
                "dataset's rows, filtered, selected or computed row by row",
                dataset,
            )
        expressions: list[Expr] = []
        if isinstance(node, Filter):
            expressions.append(node.predicate)
        elif isinstance(node, Assign):
            expressions.extend(expr for _, expr in node.columns)
        for expr in expressions:
            if _has_window(expr):
                raise _refuse("a window function makes a row depend on other records; compute row by row", dataset)
        node = node.input
    found = sources.get(node.handle)
    if found is None:
        raise VaultError(f"no dataset or table with handle {quote(node.handle)} is open")
    return found


def _has_window(expr: Expr) -> bool:
    if isinstance(expr, Col | Lit):
        return False
    assert isinstance(expr, Call)
    return expr.fn == "over" or any(_has_window(arg) for arg in expr.args)


def _estimator(spec: object, dataset: str) -> tuple[str, _Kind, dict[str, Any]]:
    """The class and the analyst's parameters, each checked; parameters the vault sets must be left unset."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("class"), str):
        raise VaultError("fit: the estimator spec is not an object with a class name")
    path = spec["class"]
    kind = DP_ESTIMATORS.get(path)
    if kind is None:
        offered = ", ".join(name.rsplit(".", 1)[1] for name in DP_ESTIMATORS)
        raise _refuse(
            f"the owner releases this dataset only with differential privacy; {path.rsplit('.', 1)[-1][:80]} is "
            f"not a differentially private estimator the vault offers ({offered}, from diffprivlib.models)",
            dataset,
        )
    given = spec.get("params", {})
    if not isinstance(given, Mapping):
        raise VaultError("fit: the estimator's params are not an object")
    signature = inspect.signature(kind.cls).parameters
    name = path.rsplit(".", 1)[1]
    settable: dict[str, Any] = {}
    for key, value in given.items():
        if key not in signature or key == "self":
            raise VaultError(f"fit: {name} has no parameter {quote(str(key)[:80])}")
        if key in _VAULT_SET:
            if value is not None:
                why = (
                    "a fixed seed would let two fits cancel each other's noise"
                    if key == "random_state"
                    else "the budget is kept by the owner's broker"
                )
                raise VaultError(f"fit: leave {name}.{key} unset: {why}")
            continue
        if key in _NARROWING:
            if value is not None:
                settable[key] = value  # checked against the features once they are known (see _narrowed)
            continue
        check = kind.settable.get(key)
        if check is None:
            default = signature[key].default
            if value != default:
                raise VaultError(f"fit: {name}.{key} cannot be changed under differential privacy (leave {default!r})")
            continue
        if not check[0](value):
            raise VaultError(f"fit: {name}.{key} must be {check[1]}")
        settable[key] = value
    if "epsilon" not in settable:
        raise VaultError(f"fit: give {name} the ε to spend (epsilon=...)")
    return name, kind, settable


def _training_data(
    source: SourceTable, base: SourceTable, job: _Job, rules: PrivacyBudgetRules
) -> tuple[np.ndarray, np.ndarray | None]:
    """The training rows: complete, at most max_contributions per person, clipped, with the public rows added."""
    used = [*job.features, *([job.target] if job.target else [])]
    hidden = source.records[0][1] if source.records else None
    wanted = [pl.col(column) for column in used] + ([pl.col(hidden).alias("\x01id")] if hidden else [])
    data = source.collect(source.data.select(wanted))
    for column in used:
        present = pl.col(column).is_not_null()
        if data.schema[column].is_float():
            present &= pl.col(column).is_finite()
        data = data.filter(present)
    if rules.unit is not None and hidden is not None:
        units = base.collect(base.data.select(rules.unit)).get_column(rules.unit)
        data = (
            data.with_columns(units.gather(data.get_column("\x01id")).alias("\x01unit"))
            .sort("\x01id")
            .filter(pl.int_range(pl.len()).over("\x01unit") < rules.max_contributions)
        )
    x = np.clip(data.select(job.features).to_numpy().astype(np.float64), job.low, job.high)
    centre = (job.low + job.high) / 2
    if job.classes is not None and job.target is not None:
        labels = data.get_column(job.target)
        keep = labels.cast(pl.String).is_in([str(c) for c in job.classes]).to_numpy()
        y = np.asarray(labels.to_list(), dtype=object)[keep]
        x = x[keep]
        public = np.asarray(job.classes, dtype=object)
        x = np.vstack([x, np.tile(centre, (public.size, 1))])
        y = np.concatenate([_as_keys(y, job.classes), public])
        return x, y
    x = np.vstack([x, np.tile(centre, (job.padding, 1))])
    if job.target_bounds is not None and job.target is not None:
        low, high = job.target_bounds
        y = np.clip(data.get_column(job.target).cast(pl.Float64).to_numpy(), low, high)
        return x, np.concatenate([y, [(low + high) / 2]])
    return x, None


def _as_keys(labels: np.ndarray, classes: tuple[str | int, ...]) -> np.ndarray:
    """The labels as the public keys' own values (a key 1 and a label "1" are one class)."""
    by_text = {str(key): key for key in classes}
    return np.asarray([by_text[str(label)] for label in labels], dtype=object)


def _fit(job: _Job, x: np.ndarray, y: np.ndarray | None) -> Any:
    """Fit in the worker process; diffprivlib's own warnings would only repeat what the vault decided."""
    estimator = job.cls(**job.settable, **job.vault_set)
    if y is not None and job.classes is not None:
        y = np.asarray([str(v) for v in y]) if any(isinstance(c, str) for c in job.classes) else y.astype(np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if y is None:
                estimator.fit(x)
            else:
                estimator.fit(x, y)
        except MemoryError:
            raise VaultError(f"fit: out of memory in {job.name}") from None
        except Exception as exc:  # a message may quote data: the type only
            raise VaultError(f"fit: {type(exc).__name__} in {job.name} (details withheld)") from None
    return estimator


# -- releases ------------------------------------------------------------------------------------------------------


def params(model: DpModel) -> dict[str, Any]:
    """The fitted attributes in :data:`FITTED`, by feature (and class) name where they have one."""
    released: dict[str, Any] = {
        "estimator": model.estimator_name,
        "features": list(model.features),
        "epsilon": model.epsilon,
    }
    classes = [_scalar(c) for c in getattr(model.estimator, "classes_", [])]
    for attribute in FITTED[model.estimator_name]:
        value = getattr(model.estimator, attribute, None)
        if value is None:
            continue
        if attribute == "classes_":
            released[attribute] = classes
            continue
        array = np.asarray(value, dtype=np.float64)
        released[attribute] = _named(array, list(model.features), classes, attribute)
    return released


def _named(array: np.ndarray, features: list[str], classes: list[Any], attribute: str) -> Any:
    if array.ndim == 0:
        return _finite(float(array))
    if array.ndim == 1 and array.size == len(features) and attribute != "intercept_":
        return {name: _finite(v) for name, v in zip(features, array.tolist(), strict=True)}
    if array.ndim == 1:
        return [_finite(v) for v in array.tolist()]
    rows = [{name: _finite(v) for name, v in zip(features, row, strict=True)} for row in array.tolist()]
    if attribute == "coef_" and len(classes) == len(rows) and len(classes) > 2:
        return {str(label): row for label, row in zip(classes, rows, strict=True)}
    return rows[0] if attribute == "coef_" and len(rows) == 1 else rows


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def predict(model: DpModel, public: pa.Table, max_rows: int | None) -> pa.Table:
    """Predictions on public data: computed from the DP parameters alone, so as private as they are."""
    if not hasattr(model.estimator, "predict"):
        raise VaultError(f"{model.estimator_name} has no predict (a transformer)")
    if max_rows is not None and public.num_rows > max_rows:
        raise PolicyViolation("release.max_rows", sorted(model.datasets), f"predict: more than {max_rows} rows")
    missing = [name for name in model.features if name not in public.column_names]
    if missing:
        raise VaultError(f"predict: the public data lacks the feature column {', '.join(map(quote, missing))}")
    try:
        x = np.column_stack(
            [np.asarray(public.column(name).to_numpy(zero_copy_only=False), np.float64) for name in model.features]
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            columns: dict[str, Any] = {"prediction": pa.array(np.asarray(model.estimator.predict(x)))}
            if hasattr(model.estimator, "predict_proba"):
                proba = np.asarray(model.estimator.predict_proba(x), dtype=np.float64)
                for index, label in enumerate(model.estimator.classes_):
                    columns[f"proba_{_scalar(label)}"] = pa.array(proba[:, index])
    except (ValueError, TypeError, pa.ArrowException) as exc:
        raise VaultError(f"predict: {type(exc).__name__} (the public features must be numeric)") from None
    return pa.table(columns)
