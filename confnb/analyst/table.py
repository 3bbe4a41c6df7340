"""Sealed tables: pandas-shaped handles to data that stays in the vault.

A :class:`SealedTable` is a plan (the vault spec's JSON tree) plus what the vault chose to say about it: dataset
ids, column names and types, and the owners' output policies. Every method builds a bigger plan; nothing runs
until a result's :meth:`SealedResult.release`, which sends the plan to the vault, where the output policy decides
what comes back. The handle never holds a row, so there is nothing here to leak, and every path by which Python or
pandas would pull rows out of an object (iteration, ``len``, ``numpy.asarray``, ``.values``, ``.head()``) is refused
with a message that says what to do instead.

Results are shaped as pandas would shape them for the same call on the plaintext (group keys as the index, a Series
for ``value_counts`` and for one column's statistics, a Python scalar for a scalar), so that released values drop
into the analyst's usual code.
"""

from __future__ import annotations

import copy
import html
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, NoReturn

from confnb.analyst.errors import VaultError, short_traceback
from confnb.analyst.expr import Column, Expr, as_expr
from confnb.analyst.results import remember
from confnb.analyst.session import VaultSession

if TYPE_CHECKING:
    import pandas as pd  # type: ignore[import-untyped]

__all__ = ["AGG_FUNCS", "GroupBy", "SealedResult", "SealedTable"]

AGG_FUNCS: Final = ("count", "sum", "mean", "min", "max", "std", "var", "median", "quantile", "nunique")
_AGG_ALIASES: Final = {"size": "count", "nunique": "nunique", "average": "mean"}
JOIN_HOWS: Final = ("inner", "left", "right", "outer")
_SEALED: Final = "rows are sealed in the vault"
_VALUE: Final = "value"  # the name a computed (non-column) expression gets when it is aggregated on its own

# Attribute names that would hand out rows in pandas, and what to use instead.
_REFUSED: Final = {
    **dict.fromkeys(
        ("to_pandas", "to_numpy", "values", "to_dict", "to_records", "to_arrow", "to_list", "tolist", "collect"),
        "Aggregate it (group_by(...).agg(...), value_counts(), describe(), count()) and call .release() on the "
        "result; the output policy decides what leaves.",
    ),
    **dict.fromkeys(
        ("to_csv", "to_parquet", "to_json", "to_excel", "to_sql", "to_feather"),
        "Release an aggregate and pass it to cn.export(value, path), which writes it with a signed receipt; "
        "t.seal(path) keeps the whole table encrypted for a later kernel.",
    ),
    **dict.fromkeys(
        ("head", "tail", "sample", "iloc", "loc", "at", "iat", "iterrows", "itertuples", "items", "show"),
        "t.preview() shows what the output policy allows; t.mock() makes up rows with the same columns and types "
        "to try code on.",
    ),
    **dict.fromkeys(
        ("shape", "size", "index", "empty"),
        "t.columns lists the columns; t.count().release() counts rows, if the policy releases row counts.",
    ),
    "query": "Filter with a column expression: t.filter(t['age'] > 40) or t[t['age'] > 40].",
    "sort_values": "Released aggregates come sorted by their group keys (value_counts: by count).",
    "groupby_apply": "Use group_by(...).agg(name=(column, function)).",
}


@dataclass(frozen=True)
class ColumnInfo:
    """A column as the vault described it; ``type`` is None for a column computed here whose type the vault knows."""

    name: str
    type: str | None = None


def _columns_from(reply_columns: object) -> tuple[ColumnInfo, ...] | None:
    if not isinstance(reply_columns, list):
        return None
    found = []
    for entry in reply_columns:
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            kind = entry.get("type")
            found.append(ColumnInfo(entry["name"], kind if isinstance(kind, str) else None))
    return tuple(found)


def _names(value: object, what: str) -> list[str]:
    """One column name or several, as a list (the spelling pandas accepts for ``by=``, ``on=``, ``columns=``)."""
    if isinstance(value, Column):
        return [value.name]
    if isinstance(value, str):
        return [value]
    if isinstance(value, Expr) or not isinstance(value, Iterable):
        raise TypeError(f"{what} takes a column name or a list of column names")
    names = [item.name if isinstance(item, Column) else item for item in value]
    if not all(isinstance(name, str) and name for name in names):
        raise TypeError(f"{what} takes a column name or a list of column names")
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(f"{what} names {', '.join(map(repr, duplicated))} more than once")
    return names


# -- results --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    """How a released Arrow table becomes the pandas object pandas itself would have returned.

    ``form``: ``scalar`` (one value), ``frame`` (keys → index), ``series`` (keys → index, one value column),
    ``row`` (a one-row table → a Series indexed by its column names or ``labels``), ``describe``.
    """

    form: Literal["scalar", "frame", "series", "row", "describe"]
    index: tuple[str, ...] = ()
    value: str | None = None
    name: Any = None
    index_name: Any = ...  # ... keeps the key columns' own names
    labels: tuple[Any, ...] | None = None
    ascending: bool | None = None  # value_counts: sort the released counts this way


class SealedResult:
    """A computation on sealed data whose result has not left the vault yet.

    ``.release()`` asks the vault for it; the output policy decides, and the pandas object (or scalar) comes back
    together with nothing else. ``.preview()`` shows what the policy would let out without releasing it.
    """

    __slots__ = ("__weakref__", "_datasets", "_plan", "_session", "_shape", "_what")

    def __init__(
        self, session: VaultSession, plan: dict[str, Any], shape: _Shape, datasets: Sequence[str], what: str
    ) -> None:
        self._session = session
        self._plan = plan
        self._shape = shape
        self._datasets = tuple(datasets)
        self._what = what

    @property
    def plan(self) -> dict[str, Any]:
        """The plan the vault will evaluate (JSON; names and the analyst's own constants only)."""
        return copy.deepcopy(self._plan)

    @property
    def datasets(self) -> tuple[str, ...]:
        return self._datasets

    @short_traceback
    def release(self, epsilon: float | None = None, delta: float | None = None) -> Any:
        """Ask the vault to release this result under the output policy; the pandas object or Python scalar.

        Raises :class:`~confnb.PolicyViolation` (naming the rule and the datasets) when the policy withholds it.
        A scalar the policy withholds raises too; inside a released table a withheld number is null, and
        ``attrs["confnb_suppressed"]`` says which: ``{"groups": <groups (or described columns) removed>, "cells":
        {<column>: [<index labels of the nulled cells>]}}``.

        On a dataset in differential-privacy mode the result is noisy and ``epsilon`` (or the session's, see
        :func:`confnb.set_epsilon`) is charged to the owner's budget before it leaves; ``attrs["confnb_dp"]`` (a
        number: its ``.dp``) says what was spent, what is left and how noisy each column is.
        """
        from confnb.analyst.privacy import noisy, requested_loss

        request = {"op": "release", "plan": self._plan, **requested_loss(epsilon, delta)}
        reply, buffers = self._session.request(request)
        result_id = reply.get("result")
        if not isinstance(result_id, str):
            raise VaultError("the vault released a value without a result id")
        value = _decode(reply, buffers, self._shape)
        account = reply.get("dp")
        if isinstance(account, dict):
            value = noisy(value, account)
        return remember(value, result_id)

    @short_traceback
    def preview(self) -> dict[str, Any]:
        """What the output policy allows to be shown of the rows this result is computed from (columns, row count).

        Nothing of the result itself: its value is exactly what :meth:`release` asks the policy about.
        """
        reply, _ = self._session.request({"op": "preview", "plan": self._plan["input"]})
        preview = reply.get("preview")
        return dict(preview) if isinstance(preview, dict) else {}

    def __repr__(self) -> str:
        named = ", ".join(map(repr, self._datasets)) or "no dataset"
        return f"<SealedResult: {self._what} of {named}; {_SEALED} until .release() (the output policy decides)>"

    def _refuse(self, *_: object) -> NoReturn:
        raise TypeError(f"{self._what} is still in the vault: call .release() to get its value")

    __float__ = __int__ = __bool__ = __iter__ = __len__ = __index__ = _refuse


def _decode(reply: Mapping[str, Any], buffers: Sequence[bytes], shape: _Shape) -> Any:
    if reply.get("shape") == "scalar" or not buffers:
        if shape.form != "scalar":
            raise VaultError("the vault released a scalar where a table was expected")
        return reply.get("value")
    import pyarrow as pa  # type: ignore[import-untyped]

    try:
        table = pa.ipc.open_stream(pa.py_buffer(buffers[0])).read_all()
    except (pa.ArrowException, ValueError, OSError):
        raise VaultError("the vault's released table is not an Arrow IPC stream") from None
    frame = table.to_pandas()
    groups, cells = _withheld(table, reply)
    result: Any
    if shape.form == "scalar":
        if frame.shape[0] != 1:
            raise VaultError("the vault released a table where one value was expected")
        column = shape.value if shape.value in frame.columns else frame.columns[-1]
        return _python_scalar(frame[column].iloc[0])
    if shape.form == "row":
        if frame.shape[0] != 1:
            raise VaultError("the vault released several rows where one was expected")
        import pandas as pd

        labels = list(shape.labels) if shape.labels is not None else list(frame.columns)
        values = [_python_scalar(frame[column].iloc[0]) for column in frame.columns]
        result = pd.Series(values, index=labels, name=shape.name)
        named = dict(zip(frame.columns, labels, strict=True))
        nulled = [named[column] for column in cells if column in named]
        shown = {_column_key(shape.name): [_label(label) for label in nulled]} if nulled else {}
        result.attrs["confnb_suppressed"] = {"groups": groups, "cells": shown}
        return result
    elif shape.form == "describe":
        frame = frame.set_index("statistic") if "statistic" in frame.columns else frame
        frame.index.name = None
        positions = list(frame.index)
        result = frame[shape.value] if shape.value is not None else frame
        if shape.value is not None:
            result = result.rename(shape.name)
            cells = {shape.name: cells[shape.value]} if shape.value in cells else {}
    else:
        positions = list(range(len(frame)))
        if shape.index:
            frame = frame.set_index(list(shape.index))
            positions = list(frame.index)
            if shape.ascending is None:
                frame = _sorted_index(frame)
            if shape.index_name is not ...:
                frame.index.name = shape.index_name
        if shape.form == "series":
            result = frame[shape.value].rename(shape.name)
            cells = {shape.name: cells[shape.value]} if shape.value in cells else {}
            if shape.ascending is not None:
                result = result.sort_values(ascending=shape.ascending, kind="stable")
        else:
            result = frame
    shown = {
        _column_key(column): [_label(positions[row]) for row in rows if 0 <= row < len(positions)]
        for column, rows in cells.items()
    }
    result.attrs["confnb_suppressed"] = {"groups": groups, "cells": shown}
    return result


def _withheld(table: Any, reply: Mapping[str, Any]) -> tuple[int, dict[Any, list[int]]]:
    """Groups removed, and the row positions of nulled cells per column, as the vault attached them to the table."""
    metadata = table.schema.metadata or {}
    found = metadata.get(b"confnb_withheld")
    if found is None:  # a vault that reports only a count
        suppressed = reply.get("suppressed", 0)
        return (suppressed if isinstance(suppressed, int) else 0), {}
    try:
        withheld = json.loads(found)
        groups = int(withheld.get("groups", 0))
        cells = {str(c): [int(r) for r in rows] for c, rows in dict(withheld.get("cells", {})).items()}
    except (ValueError, TypeError, AttributeError):
        raise VaultError("the vault's report of withheld values is malformed") from None
    return groups, cells


def _column_key(column: Any) -> str:
    return "" if column is None else str(column)


def _label(label: Any) -> Any:
    """An index label in JSON's terms (a MultiIndex label is a list), so the report can be stored or sent."""
    if isinstance(label, tuple):
        return [_label(part) for part in label]
    label = _python_scalar(label)
    if label is None or isinstance(label, str | int | float | bool):
        return label
    return label.isoformat() if hasattr(label, "isoformat") else str(label)


def _sorted_index(frame: pd.DataFrame) -> pd.DataFrame:
    """pandas' groupby sorts by the keys; the vault's order is not promised, so sort here (mixed keys stay as-is)."""
    try:
        return frame.sort_index()
    except TypeError:
        return frame


def _python_scalar(value: Any) -> Any:
    """numpy and pandas scalars as the Python scalar pandas' ``Series.mean()`` users compare against."""
    item = getattr(value, "item", None)
    if callable(item) and type(value).__module__.partition(".")[0] == "numpy":
        return item()
    if type(value).__name__ in ("NAType", "NaTType"):
        return None
    return value


# -- aggregation specs ----------------------------------------------------------------------------------------


def _agg_spec(name: str, spec: object) -> dict[str, Any]:
    """One pandas named aggregation (``("age", "mean")``, ``("age", "quantile", 0.9)``, ``pd.NamedAgg``)."""
    if not isinstance(name, str) or not name:
        raise TypeError("an aggregation's output name is a non-empty string")
    if hasattr(spec, "column") and hasattr(spec, "aggfunc"):  # pd.NamedAgg (a namedtuple before pandas 3)
        args, kwargs = getattr(spec, "args", ()) or (), dict(getattr(spec, "kwargs", {}) or {})
        q = kwargs.pop("q", args[0] if args else None)
        if kwargs or len(args) > 1:
            raise TypeError(f"aggregation {name!r}: only quantile's q can be passed to a function")
        spec = (spec.column, spec.aggfunc) if q is None else (spec.column, spec.aggfunc, q)
    if not isinstance(spec, tuple) or len(spec) not in (2, 3):
        raise TypeError(
            f"aggregation {name!r}: use pandas' named form, {name}=('column', 'mean'), or "
            f"{name}=('column', 'quantile', 0.9)"
        )
    column, func, *rest = spec
    if isinstance(column, Column):
        column = column.name
    if column is not None and (not isinstance(column, str) or not column):
        raise TypeError(f"aggregation {name!r}: the column is a column name")
    return _agg(name, column, func, rest[0] if rest else None)


def _agg(name: str, column: str | None, func: object, q: object = None) -> dict[str, Any]:
    if not isinstance(func, str):
        raise TypeError(
            f"aggregation {name!r}: name the function as a string ({', '.join(AGG_FUNCS)}); callables do not run in "
            "the vault"
        )
    wanted = func
    if func == "size":
        column = None
    func = _AGG_ALIASES.get(func, func)
    if func not in AGG_FUNCS:
        raise ValueError(f"aggregation {name!r}: {wanted!r} is not one of {', '.join(AGG_FUNCS)}")
    if column is None and func != "count":
        raise ValueError(f"aggregation {name!r}: {func} needs a column")
    entry: dict[str, Any] = {"name": name, "column": column, "func": func}
    if func == "quantile":
        if isinstance(q, bool) or not isinstance(q, int | float) or not 0 <= q <= 1:
            raise ValueError(f"aggregation {name!r}: quantile needs q between 0 and 1, e.g. ('age', 'quantile', 0.9)")
        entry["q"] = float(q)
    elif q is not None:
        raise TypeError(f"aggregation {name!r}: only quantile takes a third element")
    return entry


def _named_aggs(args: tuple[Any, ...], named: Mapping[str, Any], what: str) -> list[dict[str, Any]]:
    """pandas' ``agg`` spellings: named aggregations, or a ``{"column": "func"}`` dict (output named by column)."""
    aggs: list[dict[str, Any]] = []
    if args:
        if len(args) != 1 or not isinstance(args[0], Mapping) or named:
            raise TypeError(
                f"{what} takes named aggregations, e.g. {what}(mean_age=('age', 'mean'), n=('age', 'count')), or a "
                "dict {'age': 'mean'}"
            )
        for column, func in args[0].items():
            if not isinstance(func, str):
                raise TypeError(
                    f"{what}({{{column!r}: ...}}): give one function name per column, or use named aggregations for "
                    "several"
                )
            aggs.append(_agg(column, column, func))
    aggs.extend(_agg_spec(name, spec) for name, spec in named.items())
    if not aggs:
        raise TypeError(f"{what} needs at least one aggregation, e.g. {what}(n=('age', 'count'))")
    return aggs


# -- tables ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Facts:
    """What the client knows about a plan's output without asking: datasets, policies, columns (if tracked)."""

    datasets: tuple[str, ...]
    policies: Mapping[str, Mapping[str, Any]]
    columns: tuple[ColumnInfo, ...] | None


class SealedTable:
    """A table whose rows stay in the vault: its schema and policy are visible, its rows never are.

    Build computations as in pandas (``t[t["age"] > 40].group_by("sex").agg(n=("age", "count"))``) and call
    ``.release()`` on the result; the data owner's output policy decides what comes back.
    """

    __slots__ = ("__weakref__", "_facts", "_plan", "_session")

    def __init__(self, session: VaultSession, plan: dict[str, Any], facts: _Facts) -> None:
        self._session = session
        self._plan = plan
        self._facts = facts

    @classmethod
    def _from_reply(cls, session: VaultSession, reply: Mapping[str, Any]) -> SealedTable:
        """A table for the vault's ``open``/``unseal`` reply (a handle, a dataset id, columns and a policy)."""
        handle = reply.get("handle")
        if not isinstance(handle, str):
            raise VaultError("the vault's reply names no table handle")
        dataset = str(reply.get("dataset") or handle)
        policy = reply.get("policy")
        facts = _Facts(
            datasets=tuple(dataset.split("+")) if "+" in dataset else (dataset,),
            policies={dataset: policy} if isinstance(policy, dict) else {},
            columns=_columns_from(reply.get("columns")),
        )
        return cls(session, {"node": "source", "handle": handle}, facts)

    def _derive(self, plan: dict[str, Any], columns: tuple[ColumnInfo, ...] | None) -> SealedTable:
        return SealedTable(self._session, plan, _Facts(self._facts.datasets, self._facts.policies, columns))

    # -- what may be seen -------------------------------------------------------------------------------------

    @property
    def datasets(self) -> tuple[str, ...]:
        """The ids of the datasets this table is computed from."""
        return self._facts.datasets

    @property
    def policy(self) -> dict[str, Any]:
        """The output policy of each dataset (``{dataset_id: policy}``), as the owner signed it."""
        return copy.deepcopy(dict(self._facts.policies))

    @property
    def plan(self) -> dict[str, Any]:
        """The computation so far, as the vault spec's JSON plan."""
        return copy.deepcopy(self._plan)

    @property
    def columns(self) -> list[str]:
        """Column names (known locally after select/filter/assign; otherwise asked of the vault)."""
        known = self._facts.columns
        return [c.name for c in known] if known is not None else list(self.schema)

    @property
    @short_traceback
    def schema(self) -> dict[str, str]:
        """``{column: type}`` as the vault computes it (needs the policy's ``schema`` release kind)."""
        known = self._facts.columns
        if known is not None and all(c.type is not None for c in known):
            return {c.name: str(c.type) for c in known}
        reply, _ = self._session.request({"op": "schema", "plan": self._plan})
        columns = _columns_from(reply.get("columns")) or ()
        self._facts = _Facts(self._facts.datasets, self._facts.policies, columns)
        return {c.name: str(c.type) for c in columns}

    dtypes = schema

    # -- building plans ---------------------------------------------------------------------------------------

    def _require(self, names: Iterable[str], what: str) -> None:
        known = self._facts.columns
        if known is None:
            return  # the vault checks; it knows the columns of every plan
        have = {c.name for c in known}
        missing = [name for name in names if name not in have]
        if missing:
            listed = ", ".join(repr(c.name) for c in known) or "none"
            raise KeyError(f"{what}: no column {', '.join(map(repr, missing))}; the table has {listed}")

    def select(self, columns: str | Iterable[str]) -> SealedTable:
        """Keep these columns, in this order (``t[["a", "b"]]``)."""
        names = _names(columns, "select")
        self._require(names, "select")
        known = self._facts.columns
        kept = None if known is None else tuple(next(c for c in known if c.name == n) for n in names)
        return self._derive({"node": "select", "input": self._plan, "columns": names}, kept)

    def filter(self, predicate: Expr) -> SealedTable:
        """Keep the rows where ``predicate`` holds (``t[t["age"] > 40]``). Rows with a null predicate are dropped."""
        if not isinstance(predicate, Expr):
            raise TypeError("filter takes a column expression, e.g. t.filter(t['age'] > 40)")
        self._require(predicate.columns(), "filter")
        return self._derive(
            {"node": "filter", "input": self._plan, "predicate": predicate.to_json()}, self._facts.columns
        )

    def assign(self, **columns: Any) -> SealedTable:
        """New or replaced columns from expressions, constants or ``lambda t: ...`` (as ``DataFrame.assign``)."""
        if not columns:
            return self
        pairs: list[list[Any]] = []
        known = list(self._facts.columns) if self._facts.columns is not None else None
        current = self
        for name, value in columns.items():
            expr = as_expr(value(current) if callable(value) and not isinstance(value, Expr) else value)
            current._require(expr.columns(), f"assign {name!r}")
            pairs.append([name, expr.to_json()])
            if known is not None:
                position = next((i for i, c in enumerate(known) if c.name == name), None)
                if position is None:
                    known.append(ColumnInfo(name))
                else:
                    known[position] = ColumnInfo(name)
            current = self._derive(self._plan, tuple(known) if known is not None else None)  # later kwargs see it
        return self._derive(
            {"node": "assign", "input": self._plan, "columns": pairs}, tuple(known) if known is not None else None
        )

    def join(
        self,
        other: SealedTable,
        on: str | Sequence[str],
        how: str = "inner",
        suffixes: tuple[str, str] = ("_x", "_y"),
    ) -> SealedTable:
        """Join on equal key columns (pandas' ``merge`` semantics: keys once, other shared names get suffixes)."""
        if not isinstance(other, SealedTable):
            raise TypeError("join takes another SealedTable (public data goes to m.predict, not into a join)")
        if other._session.path != self._session.path:
            raise ValueError("the two tables live in different kernels' vaults")
        keys = _names(on, "join on")
        if how not in JOIN_HOWS:
            raise ValueError(f"how must be one of {', '.join(JOIN_HOWS)}")
        if (
            not isinstance(suffixes, tuple | list)
            or len(suffixes) != 2
            or not all(isinstance(s, str) for s in suffixes)
            or suffixes[0] == suffixes[1]
        ):
            raise ValueError("suffixes are two different strings, e.g. ('_x', '_y')")
        self._require(keys, "join (left)")
        other._require(keys, "join (right)")
        plan = {
            "node": "join",
            "left": self._plan,
            "right": other._plan,
            "on": keys,
            "how": how,
            "suffixes": list(suffixes),
        }
        datasets = tuple(dict.fromkeys((*self.datasets, *other.datasets)))
        policies = {**self._facts.policies, **other._facts.policies}
        return SealedTable(self._session, plan, _Facts(datasets, policies, None))

    def merge(
        self,
        right: SealedTable,
        how: str = "inner",
        on: str | Sequence[str] | None = None,
        suffixes: tuple[str, str] = ("_x", "_y"),
    ) -> SealedTable:
        """pandas' spelling of :meth:`join` (``on`` is required: sealed tables have no index to join on)."""
        if on is None:
            raise TypeError("merge needs on=...: the key column(s) both tables share")
        return self.join(right, on=on, how=how, suffixes=suffixes)

    def drop(self, columns: str | Iterable[str]) -> SealedTable:
        """All columns but these (needs the column list, which the vault gives when the policy allows schema)."""
        names = _names(columns, "drop")
        self._require(names, "drop")
        return self.select([name for name in self.columns if name not in names])

    def rename(self, columns: Mapping[str, str]) -> SealedTable:
        """Rename columns, keeping their order."""
        if not isinstance(columns, Mapping):
            raise TypeError("rename takes columns={'old': 'new'}")
        self._require(columns, "rename")
        order = [columns.get(name, name) for name in self.columns]
        return self.assign(**{new: Column(old) for old, new in columns.items()}).select(order)

    def dropna(self, subset: str | Iterable[str] | None = None, how: str = "any") -> SealedTable:
        """Drop rows with nulls in ``subset`` (all columns by default), as pandas."""
        names = self.columns if subset is None else _names(subset, "dropna subset")
        self._require(names, "dropna")
        if not names:
            return self
        tests = [Column(name).notnull() for name in names]
        combined = tests[0]
        for test in tests[1:]:
            combined = (combined & test) if how == "any" else (combined | test)
        if how not in ("any", "all"):
            raise ValueError('how is "any" or "all"')
        return self.filter(combined)

    def group_by(self, by: str | Iterable[str]) -> GroupBy:
        """Group rows by key columns; follow with ``.agg(...)``, ``.size()`` or ``["col"].mean()`` etc."""
        keys = _names(by, "group_by")
        if not keys:
            raise ValueError("group_by needs at least one key column")
        self._require(keys, "group_by")
        return GroupBy(self, keys)

    groupby = group_by

    def agg(self, *args: Any, **named: Any) -> SealedResult:
        """Aggregates over the whole table, as a Series indexed by the output names (pandas' named form)."""
        aggs = _named_aggs(args, named, "agg")
        self._require([a["column"] for a in aggs if a["column"] is not None], "agg")
        plan = {"node": "aggregate", "input": self._plan, "by": [], "aggs": aggs}
        return self._result(plan, _Shape("row"), "an aggregate")

    aggregate = agg

    def count(self) -> SealedResult:
        """The number of rows (an int once released; needs the policy's ``row_count`` kind)."""
        return self._result({"node": "count", "input": self._plan}, _Shape("scalar"), "a row count")

    def describe(self, columns: str | Iterable[str] | None = None) -> SealedResult:
        """count, mean, std, min, quartiles and max of the numeric columns, laid out as ``DataFrame.describe``."""
        names = None if columns is None else _names(columns, "describe")
        if names is not None:
            self._require(names, "describe")
        plan = {"node": "describe", "input": self._plan, "columns": names}
        return self._result(plan, _Shape("describe"), "a description")

    def value_counts(self, column: str, dropna: bool = True) -> SealedResult:
        """Counts of each value of one column (same as ``t[column].value_counts()``)."""
        self._require([column], "value_counts")
        return Column(column, self).value_counts(dropna=dropna)

    @short_traceback
    def preview(self) -> dict[str, Any]:
        """What the output policy allows to be shown of this table (e.g. columns, a row count) without rows."""
        reply, _ = self._session.request({"op": "preview", "plan": self._plan})
        preview = reply.get("preview")
        return dict(preview) if isinstance(preview, dict) else {}

    @short_traceback
    def mock(self, rows: int = 100, seed: int = 0, null_rate: float = 0.0) -> pd.DataFrame:
        """Made-up rows with this table's columns and types, to write and debug pandas code on before running it
        here (needs the policy's ``schema`` release kind). The values come from ``seed`` alone, never from the data;
        ``null_rate`` makes that share of each nullable column's values null.
        """
        import pyarrow as pa

        from confnb.analyst.mock import mock_table

        _, buffers = self._session.request({"op": "schema", "plan": self._plan, "arrow": True})
        if len(buffers) != 1:
            raise VaultError("the vault sent no schema to make mock data from")
        try:
            schema = pa.ipc.open_stream(pa.py_buffer(buffers[0])).schema
        except (pa.ArrowException, ValueError, OSError):
            raise VaultError("the vault's schema is not an Arrow IPC stream") from None
        return mock_table(schema, rows, seed, null_rate).to_pandas()

    @short_traceback
    def seal(self, path: str | os.PathLike[str]) -> Path:
        """Write this table, encrypted to this kernel's measurement, to ``path``; ``cn.unseal(path)`` gets it back."""
        from confnb.fileio import write_atomically

        _, buffers = self._session.request({"op": "seal", "plan": self._plan})
        if len(buffers) != 1:
            raise VaultError("the vault's seal reply carries no sealed bytes")
        target = Path(path).expanduser()
        write_atomically(target, buffers[0])
        return target

    def _result(self, plan: dict[str, Any], shape: _Shape, what: str) -> SealedResult:
        return SealedResult(self._session, plan, shape, self.datasets, what)

    # -- column statistics (Expr delegates here) --------------------------------------------------------------

    def _as_column(self, expr: Expr) -> tuple[SealedTable, str, Any]:
        """The table and column name to aggregate ``expr`` by (a computed expression becomes a column first)."""
        if isinstance(expr, Column):
            self._require([expr.name], expr.name)
            return self, expr.name, expr.name
        return self.assign(**{_VALUE: expr}), _VALUE, None

    def _column_stat(self, expr: Expr, func: str, q: float | None = None) -> SealedResult:
        table, name, _ = self._as_column(expr)
        agg = _agg(name, name, func, q)
        plan = {"node": "aggregate", "input": table._plan, "by": [], "aggs": [agg]}
        return self._result(plan, _Shape("scalar", value=name), f"the {func} of {name!r}")

    def _column_quantiles(self, expr: Expr, qs: list[float]) -> SealedResult:
        table, name, label = self._as_column(expr)
        if not qs:
            raise ValueError("quantile needs at least one q")
        aggs = [_agg(f"q{i}", name, "quantile", q) for i, q in enumerate(qs)]
        plan = {"node": "aggregate", "input": table._plan, "by": [], "aggs": aggs}
        return self._result(plan, _Shape("row", name=label, labels=tuple(qs)), f"quantiles of {name!r}")

    def _column_value_counts(self, expr: Expr, dropna: bool, ascending: bool) -> SealedResult:
        table, name, label = self._as_column(expr)
        plan = {"node": "value_counts", "input": table._plan, "column": name, "dropna": bool(dropna)}
        shape = _Shape("series", index=(name,), value="count", name="count", index_name=label, ascending=ascending)
        return self._result(plan, shape, f"value counts of {name!r}")

    def _column_describe(self, expr: Expr) -> SealedResult:
        table, name, label = self._as_column(expr)
        plan = {"node": "describe", "input": table._plan, "columns": [name]}
        return self._result(plan, _Shape("describe", value=name, name=label), f"a description of {name!r}")

    # -- pandas-style access ----------------------------------------------------------------------------------

    def __getitem__(self, key: object) -> Any:
        if isinstance(key, str):
            self._require([key], "t[...]")
            return Column(key, self)
        if isinstance(key, Expr):
            return self.filter(key)
        if isinstance(key, list | tuple):
            return self.select(key)
        raise TypeError(
            f"{_SEALED}: t[...] takes a column name, a list of names or a condition such as t['age'] > 40, not "
            f"a {type(key).__name__} (there is no positional row access; t.preview() shows what the policy allows)"
        )

    def __setitem__(self, name: str, value: object) -> None:
        """``t["bmi"] = t["weight"] / t["height"] ** 2``: this handle now refers to the table with that column."""
        if not isinstance(name, str):
            raise TypeError("a new column's name is a string")
        derived = self.assign(**{name: value})
        self._plan, self._facts = derived._plan, derived._facts

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        hint = _REFUSED.get(name)
        if hint is not None:
            raise AttributeError(f"SealedTable has no {name!r}: {_SEALED}. {hint}")
        known = self._facts.columns
        if known is not None and any(c.name == name for c in known):
            return Column(name, self)
        raise AttributeError(f"SealedTable has no attribute or column {name!r}")

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.columns

    def __len__(self) -> int:
        raise TypeError(f"{_SEALED}: len() is not available; t.count().release() counts rows if the policy allows")

    def __iter__(self) -> Iterator[Any]:
        raise TypeError(
            f"{_SEALED}: a SealedTable cannot be iterated; aggregate it (group_by/agg, value_counts, describe) and "
            ".release() the result (t.columns lists the column names)"
        )

    def __array__(self, dtype: object = None, copy: object = None) -> NoReturn:
        raise TypeError(f"{_SEALED}: a SealedTable cannot become an array; release an aggregate instead")

    def __bool__(self) -> bool:
        return True  # a handle exists; its row count is a release, so len() is never consulted

    def __copy__(self) -> SealedTable:
        return SealedTable(self._session, self._plan, self._facts)

    def __deepcopy__(self, memo: dict[int, Any]) -> SealedTable:
        return self.__copy__()

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("a SealedTable cannot be pickled: t.seal(path) writes it encrypted for a later kernel")

    # -- display ----------------------------------------------------------------------------------------------

    def _summary(self) -> tuple[str, list[tuple[str, str]] | None, list[str]]:
        datasets = ", ".join(map(repr, self.datasets)) or "none"
        known = self._facts.columns
        columns = None if known is None else [(c.name, c.type or "?") for c in known]
        policies = [_policy_line(name, policy) for name, policy in self._facts.policies.items()]
        return datasets, columns, policies

    def __repr__(self) -> str:
        datasets, columns, policies = self._summary()
        lines = [f"SealedTable over {datasets} ({_SEALED})"]
        if columns is None:
            lines.append("  columns: not known yet (t.columns asks the vault)")
        else:
            lines.append(f"  columns ({len(columns)}): " + ", ".join(f"{n}: {t}" for n, t in columns))
        lines.extend(f"  policy {line}" for line in policies)
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        datasets, columns, policies = self._summary()
        lines = [f"**SealedTable** over {_md(datasets)} — *{_SEALED}*", ""]
        if columns is None:
            lines.append("columns: not known yet (`t.columns` asks the vault)")
        else:
            lines += ["| column | type |", "|---|---|"] + [f"| {_md(n)} | {_md(t)} |" for n, t in columns]
        lines += [""] + [f"- policy {_md(line)}" for line in policies]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        datasets, columns, policies = self._summary()
        parts = [f"<div><b>SealedTable</b> over {html.escape(datasets)} &mdash; <i>{_SEALED}</i>"]
        if columns is None:
            parts.append("<p>columns: not known yet (<code>t.columns</code> asks the vault)</p>")
        else:
            rows = "".join(f"<tr><td>{html.escape(n)}</td><td>{html.escape(t)}</td></tr>" for n, t in columns)
            parts.append(f"<table><thead><tr><th>column</th><th>type</th></tr></thead><tbody>{rows}</tbody></table>")
        parts += [f"<p>policy {html.escape(line)}</p>" for line in policies]
        parts.append("</div>")
        return "".join(parts)


def _policy_line(dataset: str, policy: Mapping[str, Any]) -> str:
    """One line per policy: id, allowed kinds and the rules that shape results."""
    ident = policy.get("policy", {}).get("id", "?") if isinstance(policy.get("policy"), dict) else "?"
    release = policy.get("release") if isinstance(policy.get("release"), dict) else {}
    assert isinstance(release, dict)
    allow = ", ".join(map(str, release.get("allow", []))) or "nothing (default deny)"
    privacy = policy.get("privacy") if isinstance(policy.get("privacy"), dict) else {}
    assert isinstance(privacy, dict)
    if privacy.get("mode") == "dp":
        budget = f"ε = {privacy.get('epsilon')}" + (f", δ = {privacy['delta']}" if privacy.get("delta") else "")
        public = ", ".join(["schema", *map(str, privacy.get("public", []))])
        parts = [
            f"{ident} ({dataset}): differential privacy, noisy releases only (release(epsilon=...)) from a budget "
            f"of {budget}; exact: {public}"
        ]
        if release.get("never_release"):
            parts.append("never releases " + ", ".join(map(str, release["never_release"])))
        return "; ".join(parts)
    parts = [f"{ident} ({dataset}): releases {allow}", f"min_group_size {release.get('min_group_size', 10)}"]
    if release.get("never_release"):
        parts.append("never releases " + ", ".join(map(str, release["never_release"])))
    if release.get("max_rows") is not None:
        parts.append(f"max_rows {release['max_rows']}")
    return "; ".join(parts)


def _md(text: str) -> str:
    """Markdown-inert text (names come from data owners' files; they must not render as links or HTML)."""
    return html.escape(text).replace("|", "\\|").replace("*", "\\*").replace("_", "\\_").replace("`", "\\`")


# -- group-by -------------------------------------------------------------------------------------------------


class GroupBy:
    """``t.group_by(keys)``: aggregations per group, indexed by the keys as ``DataFrame.groupby`` results are."""

    __slots__ = ("_keys", "_selection", "_series", "_table")

    def __init__(
        self, table: SealedTable, keys: list[str], selection: list[str] | None = None, series: bool = False
    ) -> None:
        self._table = table
        self._keys = keys
        self._selection = selection
        self._series = series

    def __getitem__(self, key: str | list[str]) -> GroupBy:
        """``g["age"]`` (Series results) or ``g[["age", "bmi"]]`` (DataFrame results)."""
        names = _names(key, "group_by(...)[...]")
        self._table._require(names, "group_by(...)[...]")
        clash = [n for n in names if n in self._keys]
        if clash:
            raise ValueError(f"{', '.join(map(repr, clash))} is a group key; aggregate another column")
        return GroupBy(self._table, self._keys, names, series=isinstance(key, str))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        known = self._table._facts.columns
        if known is not None and any(c.name == name for c in known) and name not in self._keys:
            return self[name]
        raise AttributeError(f"GroupBy has no attribute or column {name!r}")

    def __iter__(self) -> Iterator[Any]:
        raise TypeError(f"{_SEALED}: groups cannot be iterated; aggregate them with .agg(...)")

    def __repr__(self) -> str:
        selected = f", columns {self._selection}" if self._selection else ""
        return f"<GroupBy by {self._keys}{selected} over {', '.join(map(repr, self._table.datasets))}; {_SEALED}>"

    def agg(self, *args: Any, **named: Any) -> SealedResult:
        """Named aggregation: ``.agg(mean_age=("age", "mean"), n=("age", "count"), p90=("age", "quantile", 0.9))``.

        On a selected column, also ``g["age"].agg("mean")`` (a Series) and ``g["age"].agg(["mean", "max"])``.
        """
        if self._selection is not None and len(args) == 1 and not named:
            func = args[0]
            if isinstance(func, str):
                return self._stat(func)
            if isinstance(func, list) and all(isinstance(f, str) for f in func) and len(self._selection) == 1:
                column = self._selection[0]
                return self._aggregate([_agg(f, column, f) for f in func], series=None)
        if self._selection is not None and len(self._selection) == 1 and named and not args:
            column = self._selection[0]
            aggs = []
            for name, spec in named.items():
                aggs.append(_agg(name, column, spec) if isinstance(spec, str) else _agg_spec(name, spec))
            return self._aggregate(aggs, series=None)
        return self._aggregate(_named_aggs(args, named, "agg"), series=None)

    aggregate = agg

    def size(self) -> SealedResult:
        """Rows per group, as a Series (groups below the policy's minimum size are suppressed)."""
        return self._aggregate([_agg("size", None, "count")], series="size", name=None)

    def count(self) -> SealedResult:
        return self._stat("count")

    def sum(self) -> SealedResult:
        return self._stat("sum")

    def mean(self) -> SealedResult:
        return self._stat("mean")

    def min(self) -> SealedResult:
        return self._stat("min")

    def max(self) -> SealedResult:
        return self._stat("max")

    def std(self) -> SealedResult:
        return self._stat("std")

    def var(self) -> SealedResult:
        return self._stat("var")

    def median(self) -> SealedResult:
        return self._stat("median")

    def nunique(self) -> SealedResult:
        return self._stat("nunique")

    def quantile(self, q: float = 0.5) -> SealedResult:
        return self._stat("quantile", q)

    def _stat(self, func: str, q: float | None = None) -> SealedResult:
        columns = self._selection
        if columns is None:
            known = self._table._facts.columns
            if known is None:
                raise TypeError(f"select the columns first, e.g. t.group_by({self._keys!r})['age'].{func}()")
            columns = [c.name for c in known if c.name not in self._keys]
        aggs = [_agg(column, column, func, q) for column in columns]
        if self._series and len(columns) == 1:
            return self._aggregate(aggs, series=columns[0], name=columns[0])
        return self._aggregate(aggs, series=None)

    def _aggregate(self, aggs: list[dict[str, Any]], series: str | None, name: Any = None) -> SealedResult:
        outputs = [a["name"] for a in aggs]
        clash = sorted({n for n in outputs if n in self._keys or outputs.count(n) > 1})
        if clash:
            raise ValueError(f"aggregation output names must be unique and differ from the keys: {clash}")
        self._table._require([a["column"] for a in aggs if a["column"] is not None], "agg")
        plan = {"node": "aggregate", "input": self._table._plan, "by": list(self._keys), "aggs": aggs}
        keys = tuple(self._keys)
        shape = _Shape("series", keys, value=series, name=name) if series is not None else _Shape("frame", keys)
        return self._table._result(plan, shape, f"an aggregate by {list(keys)}")
