"""Models trained in the vault: ``cn.fit`` sends a scikit-learn estimator's *description*, never data.

The estimator is encoded as a JSON spec (class path and parameters, see :mod:`confnb.analyst.estimators`) and the
vault rebuilds it from an allowlist, so no pickle and no analyst code crosses into the vault. What comes back is a
:class:`SealedModel`: a handle whose metrics, parameters and predictions on public data are each a release kind of
the data owners' output policy, asked for one at a time.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from confnb.analyst.errors import VaultError, short_traceback
from confnb.analyst.expr import Column
from confnb.analyst.results import remember
from confnb.analyst.session import VaultSession
from confnb.analyst.table import SealedTable

if TYPE_CHECKING:
    import numpy as np

__all__ = ["SealedModel", "fit"]


class SealedModel:
    """A model that lives in the vault. Its training data never leaves; what it learnt leaves only as the policy allows.

    ``m.metrics()`` / ``m.score()`` (release kind ``model_metrics``), ``m.params()`` (``model_parameters``),
    ``m.predict(public_df)`` (``predict_public``); ``cn.export(m, "model.skops")`` exports it with a receipt.
    """

    __slots__ = ("__weakref__", "_datasets", "_dp", "_id", "_info", "_session")

    def __init__(self, session: VaultSession, reply: Mapping[str, Any]) -> None:
        model_id = reply.get("model")
        if not isinstance(model_id, str):
            raise VaultError("the vault's reply names no model")
        self._session = session
        self._id = model_id
        # The vault keeps a model's evaluation data while a handle to it exists, and no longer.
        weakref.finalize(self, session.forget, "model", model_id)
        self._info = {key: reply.get(key) for key in ("estimator", "task", "features", "target")}
        datasets = reply.get("datasets")
        self._datasets = tuple(str(d) for d in datasets) if isinstance(datasets, list) else ()
        account = reply.get("dp")
        self._dp: dict[str, Any] | None = dict(account) if isinstance(account, Mapping) else None

    @property
    def estimator(self) -> str:
        """The estimator's class name (e.g. ``LogisticRegression``)."""
        return str(self._info.get("estimator") or "?")

    @property
    def task(self) -> str | None:
        task = self._info.get("task")
        return task if isinstance(task, str) else None

    @property
    def features(self) -> list[str]:
        features = self._info.get("features")
        return [str(f) for f in features] if isinstance(features, list) else []

    @property
    def target(self) -> str | None:
        target = self._info.get("target")
        return target if isinstance(target, str) else None

    @property
    def datasets(self) -> tuple[str, ...]:
        return self._datasets

    @property
    def dp(self) -> dict[str, Any] | None:
        """For a differentially private model, what its fit cost: ``epsilon`` (charged: the estimator's ε times the
        owner's ``max_contributions``), ``delta`` and ``epsilon_remaining`` per dataset; None for an exact model."""
        return None if self._dp is None else dict(self._dp)

    @short_traceback
    def metrics(self) -> dict[str, Any]:
        """Evaluation metrics on the held-out test split (a dict; release kind ``model_metrics``).

        Withheld (``PolicyViolation``) when the held-out rows, or the records in them whose target differs from its
        most common value, are fewer than the policy's ``min_group_size``, or when a feature singles out fewer.
        """
        return self._release("model_metrics")  # type: ignore[no-any-return]

    @short_traceback
    def score(self, *args: object, **kwargs: object) -> float | None:
        """The estimator's own ``score`` on the held-out test split, computed in the vault (``model_metrics``).

        ``None`` when the score is not a finite number on this split: the vault releases it as null rather than
        failing, so whether the call fails never depends on the data."""
        if args or kwargs:
            raise TypeError(
                "m.score() scores on the held-out split inside the vault; to score on public data, call "
                "m.predict(X) and compare with your own labels"
            )
        return self._release("model_score")  # type: ignore[no-any-return]

    @short_traceback
    def params(self) -> dict[str, Any]:
        """Learnt parameters (e.g. ``coef_``, ``intercept_``) as JSON-able values (``model_parameters``).

        A coefficient of a column that differs from its most common value in fewer than ``min_group_size`` records
        (an indicator of a few records) is ``None``, and ``params()["confnb_suppressed"]`` names those columns.
        """
        return self._release("model_params")  # type: ignore[no-any-return]

    @short_traceback
    def predict(self, X: Any) -> np.ndarray[Any, Any]:  # noqa: N803 - scikit-learn's name for the features
        """Predictions for public data (a pandas DataFrame with the model's feature columns); ``predict_public``."""
        import numpy as np
        import pyarrow as pa  # type: ignore[import-untyped]

        table = _public_table(X, self.features)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        reply, buffers = self._session.request({"op": "predict", "model": self._id}, [sink.getvalue().to_pybytes()])
        if len(buffers) != 1:
            raise VaultError("the vault's predict reply carries no predictions")
        try:
            predictions = pa.ipc.open_stream(pa.py_buffer(buffers[0])).read_all()
        except (pa.ArrowException, ValueError, OSError):
            raise VaultError("the vault's predictions are not an Arrow IPC stream") from None
        if "prediction" not in predictions.column_names:
            raise VaultError("the vault's predictions lack the 'prediction' column")
        values = np.asarray(predictions.column("prediction").to_numpy(zero_copy_only=False))
        result_id = reply.get("result")
        return remember(values, result_id) if isinstance(result_id, str) else values

    @short_traceback
    def seal(self, path: str | os.PathLike[str]) -> Path:
        """Write this model, encrypted to this kernel's measurement, to ``path`` (``cn.unseal(path)`` reads it)."""
        from confnb.fileio import write_atomically

        _, buffers = self._session.request({"op": "seal", "model": self._id})
        if len(buffers) != 1:
            raise VaultError("the vault's seal reply carries no sealed bytes")
        target = Path(path).expanduser()
        write_atomically(target, buffers[0])
        return target

    def export(self, path: str | os.PathLike[str], recipient: object = None) -> Path:
        """``cn.export(m, path, recipient)``: the model as ``.skops`` with a signed receipt."""
        from confnb.analyst.api import export

        return export(self, path, recipient=recipient)

    def _release(self, op: str) -> Any:
        reply, _ = self._session.request({"op": op, "model": self._id})
        result_id = reply.get("result")
        if not isinstance(result_id, str):
            raise VaultError("the vault released a value without a result id")
        return remember(reply.get("value"), result_id)

    def __repr__(self) -> str:
        target = f", target {self.target!r}" if self.target else ""
        task = f" ({self.task})" if self.task else ""
        datasets = ", ".join(map(repr, self.datasets)) or "?"
        spent = ""
        if self._dp is not None:
            left = self._dp.get("epsilon_remaining") or {}
            remaining = ", ".join(
                f"{name}: {value:g}" for name, value in left.items() if isinstance(value, float | int)
            )
            spent = f"; differentially private, ε {self._dp.get('epsilon', 0):g} spent ({remaining or '?'} left)"
        return (
            f"<SealedModel {self._id}: {self.estimator}{task} on {datasets}, features {self.features}{target}{spent}; "
            "its training data stays in the vault>"
        )

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or not name.endswith("_"):
            raise AttributeError(f"SealedModel has no attribute {name!r}")
        raise AttributeError(
            f"SealedModel has no {name!r}: the fitted estimator stays in the vault; m.params() releases its learnt "
            "parameters if the output policy allows model_parameters"
        )

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("a SealedModel cannot be pickled: m.seal(path) writes it encrypted for a later kernel")


def _public_table(X: Any, features: list[str]) -> Any:  # noqa: N803
    """The public data as Arrow: the model's features only (extra columns are the analyst's, not the vault's)."""
    import pyarrow as pa

    if isinstance(X, pa.Table):
        table = X
    else:
        import pandas as pd  # type: ignore[import-untyped]

        frame = pd.DataFrame(X) if isinstance(X, Mapping) else X
        if not isinstance(frame, pd.DataFrame):
            raise TypeError("predict takes public data as a pandas DataFrame (or a dict of columns, or an Arrow table)")
        table = pa.Table.from_pandas(frame, preserve_index=False)
    if features:
        missing = [name for name in features if name not in table.column_names]
        if missing:
            raise KeyError(
                f"predict: the public data lacks the model's feature column(s) {', '.join(map(repr, missing))}"
            )
        table = table.select(features)
    return table


@short_traceback
def fit(
    estimator: Any,
    table: SealedTable,
    target: str | Column | None = None,
    features: Iterable[str | Column] | None = None,
    test_size: float | None = None,
    random_state: int | None = None,
) -> SealedModel:
    """Train ``estimator`` (an unfitted scikit-learn estimator or Pipeline) on ``table`` inside the vault.

    ``target`` names the label column (None for unsupervised estimators); ``features`` the input columns (default:
    all others). The vault holds out ``test_size`` of the rows (its default when None) for :meth:`SealedModel.metrics`.
    Rows whose target is missing (null or NaN) are left out; rows with a missing feature are given to the
    estimator (use an imputer) but are not counted towards ``min_group_size``.
    Your ``estimator`` object itself is not fitted; the returned :class:`SealedModel` is.
    """
    from confnb.analyst.estimators import encode_estimator

    if not isinstance(table, SealedTable):
        raise TypeError("fit trains on a SealedTable, e.g. cn.fit(LogisticRegression(), t, target='label')")
    target_name = target.name if isinstance(target, Column) else target
    if target_name is not None and not isinstance(target_name, str):
        raise TypeError("target is a column name")
    feature_names: list[str] | None = None
    if features is not None:
        if isinstance(features, str):
            features = [features]
        feature_names = [f.name if isinstance(f, Column) else f for f in features]
        if not all(isinstance(name, str) and name for name in feature_names):
            raise TypeError("features is a list of column names")
    if test_size is not None and (isinstance(test_size, bool) or not isinstance(test_size, int | float)):
        raise TypeError("test_size is a fraction between 0 and 1")
    if test_size is not None and not 0 < test_size < 1:
        raise ValueError("test_size is a fraction between 0 and 1")
    if random_state is not None and (isinstance(random_state, bool) or not isinstance(random_state, int)):
        raise TypeError("random_state is an integer (or None)")
    wanted = [*(feature_names or []), *([target_name] if target_name else [])]
    table._require(wanted, "fit")
    header = {
        "op": "fit",
        "plan": table._plan,
        "estimator": encode_estimator(estimator),
        "target": target_name,
        "features": feature_names,
        "test_size": float(test_size) if test_size is not None else None,
        "random_state": random_state,
    }
    reply, _ = table._session.request(header)
    return SealedModel(table._session, reply)
