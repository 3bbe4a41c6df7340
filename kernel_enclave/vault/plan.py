"""The vault's plan evaluator: JSON plan trees from the executor, compiled to Polars and run with column lineage.

The executor is the analyst's process and therefore hostile, so a plan is parsed strictly before anything runs:
every field's type is checked, unknown keys and nodes are refused, nesting and size are bounded, and every
expression is type-checked against the schema before a row is read. The vault then builds the Polars expressions
itself from a fixed set of operations; nothing in a plan is deserialised as a Polars plan, pickled or executed as
code, and no Python callable ever enters a Polars query.

Every column of an evaluated table carries its *lineage*, the set of ``(dataset_id, source_column)`` it was
derived from. The output policy (:mod:`kernel_enclave.vault.release`) uses it to keep ``never_release`` columns and
everything derived from them out of released results; a filter predicate or join key does not enter the lineage of
the columns it selects rows of, as the spec allows.

A table also knows which source *records* each row came from: a dataset carries a hidden record-id column (the
record's position in the dataset, so the same record has the same id in every release), and after a join there is
one per occurrence of a dataset in the join tree; they travel through every filter, assignment and join inside the
Polars frame. A join can repeat one record many times, and ``min_group_size`` is about records, not rows, so the
release engine counts distinct records per dataset rather than trusting row counts.

A value *contributes* to a released number only where it came from a non-null (non-NaN) value of a dataset record:
a constant, or a constant picked by a data predicate (``where(who, 1, 0)``), tells about the predicate but is no
record's value, and a group of rows whose values are all masked out is computed from none of them. Each compiled
expression therefore carries its contribution mask (:attr:`Value.contributes`); a column whose mask is not simply
"the value is present" keeps it as a hidden boolean column, and :meth:`SourceTable.contributes` gives it to the
release engine, which counts only contributing records.

Error messages name operations, columns and types, never a data value: Polars' own messages can quote values
("conversion failed for values [...]"), so they are never passed through.
"""

from __future__ import annotations

import functools
import math
import operator
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import cached_property
from typing import Any, Literal
from zoneinfo import ZoneInfo

import numpy as np
import polars as pl
import pyarrow as pa  # type: ignore[import-untyped]  # pyarrow ships no type information

from kernel_enclave.vault import stoppable
from kernel_enclave.vault.differences import weight_bits, weight_expression, weights_of
from kernel_enclave.vault.protocol import VaultError

MAX_DEPTH = 64
MAX_NODES = 10_000
MAX_NAME_CHARS = 1024
MAX_ISIN_VALUES = 100_000

Lineage = frozenset[tuple[str, str]]
_NO_LINEAGE: Lineage = frozenset()

JOIN_TYPES: dict[str, Literal["inner", "left", "right", "full"]] = {
    "inner": "inner",
    "left": "left",
    "right": "right",
    "outer": "full",
}
AGG_FUNCS = ("count", "sum", "mean", "min", "max", "std", "var", "median", "quantile", "nunique")
CAST_TYPES: dict[str, Any] = {"int64": pl.Int64, "float64": pl.Float64, "string": pl.String, "bool": pl.Boolean}
# Window functions over groups (a group transform): one value per row, computed within the row's group. No
# minimum or maximum: a group's extreme copied onto every row would pass the release engine's lone-extreme check.
WINDOW_FUNCS = ("rank", "sum", "mean", "count")

_COMPARISONS = ("eq", "ne", "lt", "le", "gt", "ge")
_ARITHMETIC = ("add", "sub", "mul", "pow")
_LOGICAL = ("and", "or", "xor")
_UNARY_MATH = ("log", "exp", "sqrt", "neg", "abs")
TEMPORAL_PARTS = ("year", "month", "day", "hour", "weekday")
_TEMPORAL = TEMPORAL_PARTS
_STRING = ("lower", "upper", "len")

# fn name -> (number of args, allowed option keys, required option keys)
_FUNCTIONS: dict[str, tuple[int, frozenset[str], frozenset[str]]] = {
    **{name: (2, frozenset(), frozenset()) for name in (*_COMPARISONS, *_ARITHMETIC, "truediv", "floordiv", "mod")},
    **{name: (2, frozenset(), frozenset()) for name in _LOGICAL},
    **{name: (1, frozenset(), frozenset()) for name in (*_UNARY_MATH, *_TEMPORAL, *_STRING)},
    "not": (1, frozenset(), frozenset()),
    "is_null": (1, frozenset(), frozenset()),
    "not_null": (1, frozenset(), frozenset()),
    "isin": (1, frozenset({"values"}), frozenset({"values"})),
    "between": (3, frozenset(), frozenset()),
    "where": (3, frozenset(), frozenset()),
    "fill_null": (2, frozenset(), frozenset()),
    "round": (1, frozenset({"ndigits"}), frozenset()),
    "startswith": (1, frozenset({"prefix"}), frozenset({"prefix"})),
    "cast": (1, frozenset({"type"}), frozenset({"type"})),
    "over": (1, frozenset({"func", "by"}), frozenset({"func", "by"})),
}

# ---------------------------------------------------------------------------------------------------------------
# Tables with lineage

_RECORD_PREFIX = "\x01record"
_MASK_PREFIX = "\x01contributes"
_WEIGHT_PREFIX = "\x01weight"
MAX_HELD_OFTEN = 4096  # values held by k records of a dataset column that a scanned release counts per group


class DatasetFacts:
    """What the vault knows of one dataset as it was loaded: its row count, and which columns hold no value twice.

    A join's size limit is decided from these alone, never from the rows a request reaches, so a refusal is the
    same for every request and says nothing about any record. Each fact is found on first need and kept: the
    dataset never changes once loaded, so finding it later gives what finding it at load would have given.
    """

    def __init__(self, data: pl.LazyFrame, streaming: bool, rows: int | None = None) -> None:
        self._data = data
        self._streaming = streaming
        self._rows = rows
        self._unique: dict[str, bool] = {}
        self._held_often: dict[tuple[str, int], pl.Series | None] = {}
        self._every_value_held_often: set[tuple[str, int]] = set()
        self._floats_exact: dict[str, bool] = {}
        self._lock = threading.Lock()

    def rows_known(self) -> bool:
        """Whether the row count is known without reading the dataset (given at load, or counted already)."""
        return self._rows is not None

    def rows(self) -> int:
        with self._lock:
            if self._rows is None:
                self._rows = int(stoppable.collect(self._data.select(pl.len()), streaming=self._streaming).item())
            return self._rows

    def unique(self, column: str) -> bool:
        """Whether no two records share a (non-null) value of ``column``: null keys match nothing in a join."""
        with self._lock:
            if column not in self._unique:
                values = pl.col(column).drop_nulls()
                counted = self._data.select(values.n_unique() == values.len())
                self._unique[column] = bool(stoppable.collect(counted, streaming=self._streaming).item())
            return self._unique[column]

    def floats_exact(self, column: str) -> bool:
        """Whether an integer ``column``'s values are all exact as floats (within 2**53 of zero): then two records
        share a value as floats exactly when they share it as integers, and its facts hold for its floats too."""
        with self._lock:
            if column not in self._floats_exact:
                dtype = self._data.collect_schema()[column]
                exact = False
                if dtype.is_integer():  # compared as integers (as floats, 2**53 + 1 would pass)
                    ends = self._data.select(pl.col(column).min().alias("low"), pl.col(column).max().alias("high"))
                    low, high = stoppable.collect(ends, streaming=self._streaming).row(0)
                    exact = low is None or (low >= -(2**53) and high <= 2**53)
                self._floats_exact[column] = exact
            return self._floats_exact[column]

    def held_often(self, column: str, times: int) -> pl.Series | None:
        """The values of ``column`` that ``times`` or more records hold (floats with -0.0 as 0.0, as the
        most-common-value rule compares them), or None when there are more than :data:`MAX_HELD_OFTEN` of them.

        No subset of the records holds any other value ``times`` times, so a release over a scanned dataset learns
        whether some group's most common value is held by k records by counting these values alone.
        """
        with self._lock:
            if (column, times) not in self._held_often:
                dtype = self._data.collect_schema()[column]
                value = (pl.col(column) + 0.0 if dtype.is_float() else pl.col(column)).alias("value")
                found = None if self._streaming else self._held_often_in_memory(column, value, dtype, times)
                if found is None:  # a hash table of the distinct values (streams over a scanned dataset)
                    counted = self._data.select(value).drop_nulls().group_by("value").len()
                    often = counted.filter(pl.col("len") >= times).select("value").head(MAX_HELD_OFTEN + 1)
                    found = stoppable.collect(often, streaming=self._streaming).get_column("value")
                self._held_often[(column, times)] = found if found.len() <= MAX_HELD_OFTEN else None
            return self._held_often[(column, times)]

    def every_value_held_often(self, column: str, times: int) -> bool:
        """Whether every value of ``column`` is one of :meth:`held_often`'s (a column of a few values, each held by
        many records: a count restricted to those values counts every row). False where not known."""
        self.held_often(column, times)
        return (column, times) in self._every_value_held_often

    def _held_often_in_memory(self, column: str, value: pl.Expr, dtype: Any, times: int) -> pl.Series | None:
        """:meth:`held_often` for a numeric column in memory, by sorting a copy of its values: a few bytes a record
        at its peak, where a hash table of a million distinct values takes tens of megabytes. None for other
        columns, and for floats holding NaN (which a sort does not put side by side as equal)."""
        if not (dtype.is_integer() or dtype.is_float()):
            return None
        present = stoppable.collect(self._data.select(value.drop_nulls()), streaming=False).to_series()
        if dtype.is_float() and present.is_nan().any():
            return None
        ordered = np.sort(present.to_numpy())
        if ordered.size < times:
            return present.head(0)
        starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
        lengths = np.diff(np.append(starts, ordered.size))
        if (lengths >= times).all():
            self._every_value_held_often.add((column, times))
        return pl.Series("value", ordered[starts[lengths >= times]], dtype=present.dtype)


class ColumnFact:
    """A dataset column's load-time facts, as a table derived from the dataset still holds them for the column: a
    call says whether its values are unique (what a join's size bound needs)."""

    def __init__(self, facts: DatasetFacts, column: str) -> None:
        self._facts = facts
        self._column = column

    def __call__(self) -> bool:
        return self._facts.unique(self._column)

    def held_often(self, times: int) -> pl.Series | None:
        return self._facts.held_often(self._column, times)

    def every_value_held_often(self, times: int) -> bool:
        return self._facts.every_value_held_often(self._column, times)

    def floats_exact(self) -> bool:
        return self._facts.floats_exact(self._column)


@dataclass(frozen=True)
class RowBound:
    """An upper bound on a table's rows, from its datasets' load-time facts and the plan, never from a request's rows.

    ``rows`` gives the bound (the datasets' full row counts, as a filter may keep every row), ``unique`` says, per
    visible column, whether it still holds no value twice by a load-time fact (a dataset column found unique, kept
    through filters and selections, and through joins that meet each of its rows at most once).
    """

    rows: Callable[[], int]
    unique: Mapping[str, Callable[[], bool]] = field(default_factory=dict)

    def only(self, columns: Sequence[str]) -> RowBound:
        return RowBound(self.rows, {name: known for name, known in self.unique.items() if name in columns})

    def assigned(self, name: str, source: str | None) -> RowBound:
        """After column ``name`` is assigned: a copy of a unique column (``source``) is unique, anything else not."""
        unique = {column: known for column, known in self.unique.items() if column != name}
        if source is not None and source in self.unique:
            unique[name] = self.unique[source]
        return RowBound(self.rows, unique)


def _rows_of(data: pl.LazyFrame, streaming: bool) -> RowBound:
    """The bound of a table built without load-time facts: its own row count, counted once."""
    facts = DatasetFacts(data, streaming)
    return RowBound(facts.rows)


@dataclass(frozen=True)
class SourceTable:
    """A lazy Polars query inside the vault with, per column, the dataset columns it derives from.

    A plan compiles to one lazy query over the decrypted datasets, so Polars' optimiser sees all of it (only the
    columns a result needs are read, filters move below joins); it runs when a release, a schema or a model needs it.

    ``records`` lists, per occurrence of a dataset (one for a dataset, one per side after a join), the hidden column
    of ``data`` holding the id of the source record behind each row (null where an outer join had no match), so
    that the release engine can count records instead of rows. A dataset's ids are its records' positions, given
    before any filter, so one record has one id in every release. ``records`` is ``None`` only for a table built
    from Arrow without ids (each row then stands for a distinct record of every dataset in ``datasets``). Hidden
    columns are never visible to a plan: :attr:`columns` leaves them out. ``unique`` names the hidden columns known
    to hold each record at most once (a dataset's own ids; after a join on keys unique on the other side by a
    load-time fact), where counting distinct records is counting rows with an id. ``bound`` (a :class:`RowBound`)
    decides the join size limit without reading a request's rows.

    ``masks`` maps a visible column to the hidden boolean column saying where its value contributes (see
    :meth:`contributes`); a column without one contributes exactly where it is present, the common case, which
    costs nothing.

    ``weights`` maps a record-id column to the hidden column of its records' weights and their count width, which
    the difference checks sum instead of listing ids (:mod:`kernel_enclave.vault.differences`): made once when an
    in-memory dataset is loaded (by the reader as it reads, for a scanned one), kept through filters, selections,
    assignments and joins that meet each record once, dropped by sealing (a table without them has its record sets
    listed).

    ``arrow_types`` remembers the Arrow type of each column that is still a dataset column as the vault decrypted
    it, so that schemas and materialised tables show the owner's types (Polars reads a dictionary column as
    categorical, a string column as a large string) and error messages name them.
    """

    data: pl.LazyFrame
    lineage: Mapping[str, Lineage]
    datasets: frozenset[str]
    records: tuple[tuple[str, str], ...] | None = field(default=None, compare=False, repr=False)
    arrow_types: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    unique: frozenset[str] = field(default=frozenset(), compare=False, repr=False)
    streaming: bool = field(default=False, compare=False, repr=False)  # reads a scanned dataset: streaming engine
    # Float columns known to hold no NaN (checked once when a dataset is loaded): read without a NaN-to-null pass.
    nan_free: frozenset[str] = field(default=frozenset(), compare=False, repr=False)
    masks: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    bound: RowBound | None = field(default=None, compare=False, repr=False)  # None: count this table's rows
    weights: Mapping[str, tuple[str, int]] = field(default_factory=dict, compare=False, repr=False)
    # A scanned dataset's float columns found free of NaN by its complete reads so far (see with_learned_facts).
    learned_nan_free: Callable[[], frozenset[str]] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.data, pa.Table):  # an Arrow table, with record ids as Arrow arrays (tests, models)
            table = self.data
            given: Sequence[tuple[str, Any]] = self.records or ()
            hidden = fresh_names(len(given), set(table.column_names))
            for name, (_, ids) in zip(hidden, given, strict=True):
                table = table.append_column(name, ids)
            pairs = [(name, dataset) for name, (dataset, _) in zip(hidden, given, strict=True)]
            converted = SourceTable.from_arrow(table, self.lineage, self.datasets, pairs)
            object.__setattr__(self, "data", converted.data)
            object.__setattr__(self, "records", converted.records)
            object.__setattr__(self, "arrow_types", converted.arrow_types)
            object.__setattr__(self, "nan_free", converted.nan_free)
            object.__setattr__(self, "bound", converted.bound)

    @classmethod
    def from_dataset(cls, dataset_id: str, table: pa.Table, *, coded: bool = True) -> SourceTable:
        """A dataset as the vault decrypted it: each column's lineage is itself, each record's id its position.
        ``coded``: its repeated string columns are held coded (see :func:`_repeated_strings_coded`); not for an
        analyst's uploads, whose strings would stay in Polars' process-wide categories for the kernel's life."""
        names = list(table.column_names)
        if len(set(names)) != len(names):
            raise VaultError(f"dataset {quote(dataset_id)} has duplicate column names")
        lineage = {name: frozenset({(dataset_id, name)}) for name in names}
        loaded = cls.from_arrow(table, lineage, frozenset({dataset_id}), ())
        if coded:
            loaded = replace(loaded, data=_repeated_strings_coded(loaded.data.collect()).lazy())
        return loaded._with_record_ids(dataset_id, DatasetFacts(loaded.data, False, table.num_rows))

    def _with_record_ids(self, dataset_id: str, facts: DatasetFacts) -> SourceTable:
        """This table with a hidden id per row, its position, as the records of ``dataset_id`` (unique).

        The ids are numbered as each query reads the rows, before any filter (Polars' row index, which costs a query
        that reads no id nothing measurable): a record has the same id in every query, and memory holds no column of
        them. In memory the weights are one column made once (8 bytes a record), which each query reads without
        copying; a scanned dataset makes them as its rows stream by.
        """
        name, weight = _hidden_names(self.schema.names())
        weights: dict[str, tuple[str, int]] = {}
        order = [*self.schema.names(), name]
        if self.streaming:
            data = self.data.with_row_index(name).with_columns(pl.col(name).cast(pl.Int64))
            bits = weight_bits(facts.rows()) if facts.rows_known() else None
            if bits is not None:  # computed as the rows stream by, only by the queries that read them
                weights[name] = (weight, bits)
                data = data.with_columns(weight_expression(pl.col(name), bits).alias(weight))
        else:
            data = self.data
            rows = facts.rows()
            bits = weight_bits(rows)
            if bits is not None:  # 8 bytes a record more, so that a difference check lists no ids (see above)
                weights[name] = (weight, bits)
                data = data.with_columns(pl.Series(weight, _record_weights(rows, bits)))
            data = data.collect().lazy().with_row_index(name).with_columns(pl.col(name).cast(pl.Int64))
        data = data.select([*order, *(w for w, _ in weights.values())])
        return SourceTable(
            data,
            self.lineage,
            self.datasets,
            ((dataset_id, name),),
            self.arrow_types,
            frozenset({name}),
            self.streaming,
            self.nan_free,
            bound=RowBound(facts.rows, {column: _fact(facts, column) for column in self.lineage}),
            weights=weights,
        )

    @classmethod
    def from_arrow(
        cls,
        table: pa.Table,
        lineage: Mapping[str, Lineage],
        datasets: frozenset[str],
        record_columns: Sequence[tuple[str, str]],
        mask_columns: Sequence[tuple[str, str]] = (),
    ) -> SourceTable:
        """An Arrow table (a dataset, or an unsealed table with its hidden record-id and mask columns) as a frame.

        ``record_columns`` are ``(hidden column, dataset)`` pairs, ``mask_columns`` ``(hidden column, column)``
        pairs, as :meth:`sealed_form` gives them for sealing.
        """
        try:
            data = pl.from_arrow(table, rechunk=True)  # one chunk per column: sorts and quantiles need no copy
        except (Exception, pl.exceptions.PanicException):
            raise VaultError("a table has a column type the vault's query engine cannot read") from None
        assert isinstance(data, pl.DataFrame)
        if any("\x00" in name for name in data.columns):
            raise VaultError("a table has a column name with a NUL character")
        hidden = {name for name, _ in record_columns}
        masks = {column: name for name, column in mask_columns}
        if (hidden | set(masks.values())) & set(lineage) or hidden & set(masks.values()):
            raise VaultError("a table's record-id columns clash with its columns")
        if not set(masks) <= set(lineage) or len(masks) != len(mask_columns):
            raise VaultError("a table's contribution masks do not match its columns")
        data = data.with_columns(pl.col(name).cast(pl.Int64) for name in hidden)
        data = data.with_columns(pl.col(name).cast(pl.Boolean).fill_null(False) for name in masks.values())
        arrow_types = {f.name: f.type for f in table.schema if f.name not in hidden and f.name not in masks.values()}
        records = tuple((dataset, name) for name, dataset in record_columns) or None
        floats = [name for name, dtype in data.schema.items() if dtype.is_float()]
        has_nan = data.select(pl.col(name).is_nan().any() for name in floats).row(0) if floats else ()
        nan_free = frozenset(name for name, found in zip(floats, has_nan, strict=True) if not found)
        bound = RowBound(DatasetFacts(data.lazy(), False, data.height).rows)
        return cls(
            data.lazy(), dict(lineage), datasets, records, arrow_types, frozenset(), False, nan_free, masks, bound
        )

    @classmethod
    def from_scan(
        cls,
        dataset_id: str,
        scan: pl.LazyFrame | Callable[[str, tuple[str, int] | None], pl.LazyFrame],
        arrow_schema: pa.Schema,
        rows: int | None = None,
        learned_nan_free: Callable[[], frozenset[str]] | None = None,
    ) -> SourceTable:
        """A dataset too large for memory, read segment by segment as queries run (:mod:`.scan`).

        ``scan`` is the lazy frame, or a function that makes it given the names of the hidden record-id column and
        weight column (with the weights' count width), which the reader then fills as it reads (faster than Polars
        numbering the rows as they stream by). ``rows``: the row count as the signed manifest gives it (the reader
        fails a query over a file with any other count); without it the rows are counted when first needed, and
        the dataset's releases list their record sets. ``learned_nan_free`` gives the float columns its complete
        reads have found without NaN so far (see :meth:`with_learned_facts`).
        """
        names = list(arrow_schema.names)
        if len(set(names)) != len(names) or any("\x00" in name for name in names):
            raise VaultError(f"dataset {quote(dataset_id)} has duplicate column names or names with NUL characters")
        lineage = {name: frozenset({(dataset_id, name)}) for name in names}
        arrow_types = {f.name: f.type for f in arrow_schema}
        if isinstance(scan, pl.LazyFrame):
            scanned = cls(scan, lineage, frozenset({dataset_id}), None, arrow_types, frozenset(), True)
            return scanned._with_record_ids(dataset_id, DatasetFacts(scan, True, rows))
        record, weight = _hidden_names(names)
        bits = weight_bits(rows) if rows is not None else None
        numbered = scan(record, None if bits is None else (weight, bits))
        facts = DatasetFacts(numbered, True, rows)
        return cls(
            numbered,
            lineage,
            frozenset({dataset_id}),
            ((dataset_id, record),),
            arrow_types,
            frozenset({record}),
            True,
            bound=RowBound(facts.rows, {column: _fact(facts, column) for column in lineage}),
            weights={} if bits is None else {record: (weight, bits)},
            learned_nan_free=learned_nan_free,
        )

    def with_learned_facts(self) -> SourceTable:
        """This scanned dataset as its complete reads have shown it: the float columns they found without NaN are
        then read without a NaN-to-null pass, as a dataset in memory is from its load (the same results, faster).
        Itself when nothing new was learned, or for any other table. A plan's source is evaluated so; the vault
        keeps the table it registered."""
        if self.learned_nan_free is None:
            return self
        learned = self.learned_nan_free() & self.lineage.keys()
        return self if learned <= self.nan_free else replace(self, nan_free=self.nan_free | learned)

    def collect(self, query: pl.LazyFrame) -> pl.DataFrame:
        """Run a query over this table: on Polars' streaming engine when a scanned dataset is behind it."""
        return stoppable.collect(query, streaming=self.streaming)

    @cached_property
    def schema(self) -> pl.Schema:
        """Names and types of every column (hidden ones included), resolved without reading a row."""
        with engine_errors("plan", []):
            return self.data.collect_schema()

    def empty(self) -> pl.DataFrame:
        """A frame with this schema and no rows: plans are type-checked on it before any row is read."""
        return pl.DataFrame(schema=self.schema)

    @cached_property
    def hidden(self) -> list[str]:
        """The hidden columns of ``data``: record ids, contribution masks, then record weights."""
        return [name for _, name in self.records or ()] + list(self.masks.values()) + self.weight_columns

    @property
    def weight_columns(self) -> list[str]:
        return [weight for weight, _ in self.weights.values()]

    @cached_property
    def columns(self) -> list[str]:
        """The columns a plan sees, in order (hidden record-id and mask columns left out)."""
        hidden = set(self.hidden)
        return [name for name in self.schema.names() if name not in hidden]

    def contributes(self, name: str) -> pl.Expr:
        """Where the value of visible column ``name`` came from a present (non-null, non-NaN) value of a record.

        A boolean expression over :attr:`data`, never null. False where the value is null or NaN, where it is a
        constant of the plan (a literal, or a literal chosen by a ``where`` on the data), and on the side of an
        outer join that had no match; the release engine counts a record towards a number only where its input
        contributes.
        """
        require_columns(self, [name], "contributes")
        present = _present(pl.col(name), self.dtype(name), name in self.nan_free)
        mask = self.masks.get(name)
        return present if mask is None else pl.col(mask).fill_null(False) & present

    def sealed_form(self) -> tuple[pa.Table, list[tuple[str, str]], list[tuple[str, str]]]:
        """The visible table with its record ids and contribution masks appended, read in one query so their rows
        line up, and the ``(hidden column, dataset)`` and ``(hidden column, column)`` pairs that name them: what a
        sealed table keeps so that, unsealed (:meth:`from_arrow`), its records and masks still count."""
        with engine_errors("evaluation", []):
            kept = [*(name for _, name in self.records or ()), *self.masks.values()]  # weights are made again
            found = self.collect(self.data.select([*self.columns, *kept]))
        table = to_arrow(found.select(self.columns), self.arrow_types)
        record_names = fresh_names(len(self.records or ()), set(self.columns))
        names = record_names + fresh_names(len(self.masks), set(self.columns) | set(record_names), _MASK_PREFIX)
        renamed = dict(zip(kept, names, strict=True))
        for old, new in renamed.items():
            table = table.append_column(new, found.get_column(old).to_arrow())
        records = [(renamed[name], dataset) for dataset, name in self.records or ()]
        masks = [(renamed[mask], column) for column, mask in self.masks.items()]
        return table, records, masks

    @cached_property
    def num_rows(self) -> int:
        with engine_errors("count", []):
            return int(self.collect(self.data.select(pl.len())).item())

    def dtype(self, name: str) -> Any:
        return self.schema[name]

    def arrow_type(self, name: str) -> Any:
        """The column's Arrow type: the dataset's own while the column is unchanged, else Polars' type in Arrow."""
        known = self.arrow_types.get(name)
        return known if known is not None else arrow_type_of(self.schema[name])

    def visible(self) -> pl.DataFrame:
        with engine_errors("evaluation", []):
            return self.collect(self.data.select(self.columns))

    @cached_property
    def table(self) -> pa.Table:
        """The visible columns as an Arrow table, with each unchanged dataset column in its original Arrow type."""
        return to_arrow(self.visible(), self.arrow_types)

    @cached_property
    def record_ids(self) -> tuple[tuple[str, pa.ChunkedArray], ...] | None:
        """Record ids per dataset occurrence as Arrow arrays (for the models), or None for a table without ids."""
        if self.records is None:
            return None
        ids = self.collect(self.data.select([name for _, name in self.records]))
        return tuple((dataset, ids.get_column(name).to_arrow()) for dataset, name in self.records)

    def record_columns(self) -> tuple[pl.LazyFrame, tuple[tuple[str, str], ...], frozenset[str]]:
        """The query with a record-id column for every dataset occurrence, and the ones known unique.

        A table from Arrow without ids gets "row i is record i" made explicit here, numbered as its rows are now;
        every dataset already carries ids fixed before any filter."""
        if self.records is not None:
            return self.data, self.records, self.unique
        occurrences = []
        data = self.data
        taken = set(self.schema.names())
        for i, dataset in enumerate(sorted(self.datasets)):
            name = fresh_names(1, taken, f"{_RECORD_PREFIX}{i}")[0]
            taken.add(name)
            data = data.with_row_index(name).with_columns(pl.col(name).cast(pl.Int64))
            occurrences.append((dataset, name))
        return data, tuple(occurrences), frozenset(name for _, name in occurrences)

    def record_occurrences(self) -> tuple[tuple[str, pa.ChunkedArray], ...]:
        """Record ids per dataset occurrence, materialising the implicit "row i is record i" when none are stored."""
        data, occurrences, _ = self.record_columns()
        ids = self.collect(data.select([name for _, name in occurrences]))
        return tuple((dataset, ids.get_column(name).to_arrow()) for dataset, name in occurrences)

    def replace(
        self,
        data: pl.LazyFrame,
        lineage: Mapping[str, Lineage] | None = None,
        arrow_types: Mapping[str, Any] | None = None,
    ) -> SourceTable:
        return SourceTable(
            data,
            self.lineage if lineage is None else lineage,
            self.datasets,
            self.records,
            self.arrow_types if arrow_types is None else arrow_types,
            self.unique,
            self.streaming,
            self.nan_free,
            self.masks,
            self.bound,
            self.weights,
        )

    def row_bound(self) -> RowBound:
        return self.bound if self.bound is not None else _rows_of(self.data, self.streaming)


def _fact(facts: DatasetFacts, column: str) -> Callable[[], bool]:
    return ColumnFact(facts, column)


def _record_weights(rows: int, bits: int, chunk: int = 1 << 16) -> np.ndarray:
    """The weights of record ids 0..rows-1, made a chunk at a time so that loading holds no large temporaries."""
    found = np.empty(rows, dtype=np.int64)
    for start in range(0, rows, chunk):
        found[start : start + chunk] = weights_of(np.arange(start, min(start + chunk, rows), dtype=np.int64), bits)
    return found


def _hidden_names(columns: Sequence[str]) -> tuple[str, str]:
    """The names of a dataset's hidden record-id and weight columns, given its columns."""
    record = fresh_names(1, set(columns))[0]
    return record, fresh_names(1, set(columns) | {record}, _WEIGHT_PREFIX)[0]


def fresh_names(count: int, taken: set[str], prefix: str = _RECORD_PREFIX) -> list[str]:
    """Names for hidden columns that no visible column uses."""
    names: list[str] = []
    i = 0
    while len(names) < count:
        candidate = prefix if i == 0 and prefix != _RECORD_PREFIX else f"{prefix}{i}"
        if candidate not in taken and candidate not in names:
            names.append(candidate)
        i += 1
    return names


_ARROW_OF: dict[Any, Any] = {}


def arrow_type_of(dtype: Any) -> Any:
    """The Arrow type a Polars column becomes, with Polars' large/view string types shown as plain strings."""
    key = repr(dtype)
    found = _ARROW_OF.get(key)
    if found is None:
        try:
            found = _plain_arrow(pl.Series("x", [], dtype=dtype).to_arrow().type)
        except Exception:
            found = pa.null()
        _ARROW_OF[key] = found
    return found


_CODED_SHARE = 4  # a string column is held coded when it has at most one distinct value per this many rows
_CODED_ISIN = 16  # isin over a coded column compares the codes for up to this many values, reads strings beyond


def _repeated_strings_coded(data: pl.DataFrame) -> pl.DataFrame:
    """A dataset in memory with each string column that repeats its values held as Polars categoricals: four
    bytes a row instead of the string, and a group-by on it hashes numbers (twice as fast as on the strings).

    Nothing a plan sees changes: an expression reads such a column as its strings (as it reads an owner's
    dictionary column, see :func:`_eval_expr`), a comparison with a string literal is made on the codes, group
    keys and window partitions use the codes, which sort as their strings do, and a released key is a string again
    (:func:`to_arrow`). Which columns are coded depends on the data, so no result and no error may depend on it:
    tests run every release over both forms.
    """
    rows = data.height
    strings = [name for name, dtype in data.schema.items() if dtype == pl.String]
    if not strings or rows < _CODED_SHARE:
        return data
    distinct = data.select(pl.col(name).n_unique() for name in strings).row(0)
    coded = [name for name, n in zip(strings, distinct, strict=True) if n * _CODED_SHARE <= rows]
    return data.with_columns(pl.col(name).cast(pl.Categorical) for name in coded) if coded else data


def _plain_arrow(kind: Any) -> Any:
    if pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        return pa.string()
    if pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind):
        return pa.binary()
    if pa.types.is_dictionary(kind):
        return pa.dictionary(pa.int32(), _plain_arrow(kind.value_type))
    return kind


def to_arrow(frame: pl.DataFrame, arrow_types: Mapping[str, Any]) -> pa.Table:
    """A Polars frame as Arrow: dataset columns in their original types, computed ones in plain Arrow types."""
    table = frame.to_arrow()
    arrays = []
    fields = []
    for position, arrow_field in enumerate(table.schema):
        column = table.column(position)
        wanted = arrow_types.get(arrow_field.name) or _plain_arrow(arrow_field.type)
        if pa.types.is_dictionary(wanted) and arrow_field.name not in arrow_types:
            wanted = wanted.value_type  # a group key of a coded string column (see _repeated_strings_coded)
        if column.type != wanted:
            try:
                column = column.cast(wanted)
            except (pa.ArrowException, ValueError, TypeError, OverflowError):
                wanted = column.type
        arrays.append(column)
        fields.append(pa.field(arrow_field.name, wanted, arrow_field.nullable))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


# ---------------------------------------------------------------------------------------------------------------
# Parsed plans


@dataclass(frozen=True)
class Col:
    name: str


@dataclass(frozen=True)
class Lit:
    value: str | int | float | bool | None


@dataclass(frozen=True)
class Call:
    fn: str
    args: tuple[Expr, ...]
    options: Mapping[str, Any]


Expr = Col | Lit | Call


@dataclass(frozen=True)
class Source:
    handle: str


@dataclass(frozen=True)
class Select:
    input: Node
    columns: tuple[str, ...]


@dataclass(frozen=True)
class Filter:
    input: Node
    predicate: Expr


@dataclass(frozen=True)
class Assign:
    input: Node
    columns: tuple[tuple[str, Expr], ...]


@dataclass(frozen=True)
class Join:
    left: Node
    right: Node
    on: tuple[str, ...]
    how: str
    suffixes: tuple[str, str]


@dataclass(frozen=True)
class Agg:
    name: str
    column: str | None
    func: str
    q: float | None


@dataclass(frozen=True)
class Aggregate:
    input: Node
    by: tuple[str, ...]
    aggs: tuple[Agg, ...]


@dataclass(frozen=True)
class ValueCounts:
    input: Node
    column: str
    dropna: bool


@dataclass(frozen=True)
class Describe:
    input: Node
    columns: tuple[str, ...] | None


@dataclass(frozen=True)
class Count:
    input: Node


Node = Source | Select | Filter | Assign | Join | Aggregate | ValueCounts | Describe | Count
RELEASE_NODES = (Aggregate, ValueCounts, Describe, Count)

# node name -> (required keys, optional keys)
_NODE_KEYS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "source": (frozenset({"handle"}), frozenset()),
    "select": (frozenset({"input", "columns"}), frozenset()),
    "filter": (frozenset({"input", "predicate"}), frozenset()),
    "assign": (frozenset({"input", "columns"}), frozenset()),
    "join": (frozenset({"left", "right", "on"}), frozenset({"how", "suffixes"})),
    "aggregate": (frozenset({"input", "by", "aggs"}), frozenset()),
    "value_counts": (frozenset({"input", "column"}), frozenset({"dropna"})),
    "describe": (frozenset({"input"}), frozenset({"columns"})),
    "count": (frozenset({"input"}), frozenset()),
}


def parse_plan(plan: object) -> Node:
    """Validate a plan tree from the executor and return it as typed nodes; any deviation is a VaultError."""
    return _Parser().node(plan, 1, "plan")


class _Parser:
    """One pass over the JSON; counts nodes so a wide tree is bounded as well as a deep one."""

    def __init__(self) -> None:
        self.count = 0

    def _enter(self, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise VaultError(f"the plan nests deeper than {MAX_DEPTH} levels")
        self.count += 1
        if self.count > MAX_NODES:
            raise VaultError(f"the plan has more than {MAX_NODES} nodes and expressions")

    def node(self, obj: object, depth: int, where: str) -> Node:
        self._enter(depth)
        if not isinstance(obj, dict):
            raise VaultError(f"{where}: a plan node must be a JSON object, not {_json_type(obj)}")
        kind = obj.get("node")
        if not isinstance(kind, str):
            raise VaultError(f'{where}: a plan node needs a "node" string')
        if kind not in _NODE_KEYS:
            raise VaultError(f"{where}: unknown plan node {quote(kind)}; nodes are {', '.join(_NODE_KEYS)}")
        required, optional = _NODE_KEYS[kind]
        _check_keys(obj, required | {"node"}, optional, f"{where} ({kind})")
        at = f"{where} ({kind})"
        if kind == "source":
            return Source(_name(obj["handle"], f"{at}.handle"))
        if kind == "join":
            how = obj.get("how", "inner")
            if not isinstance(how, str) or how not in JOIN_TYPES:
                raise VaultError(f"{at}.how must be one of {', '.join(JOIN_TYPES)}")
            suffixes = obj.get("suffixes", ["_x", "_y"])
            if not (isinstance(suffixes, list) and len(suffixes) == 2):
                raise VaultError(f"{at}.suffixes must be a list of two strings")
            left_suffix, right_suffix = (_name(s, f"{at}.suffixes", empty=True) for s in suffixes)
            return Join(
                self.node(obj["left"], depth + 1, f"{where}.left"),
                self.node(obj["right"], depth + 1, f"{where}.right"),
                _names(obj["on"], f"{at}.on", empty=False),
                how,
                (left_suffix, right_suffix),
            )
        child = self.node(obj["input"], depth + 1, f"{where}.input")
        if kind == "select":
            return Select(child, _names(obj["columns"], f"{at}.columns", empty=True))
        if kind == "filter":
            return Filter(child, self.expr(obj["predicate"], depth + 1, f"{at}.predicate"))
        if kind == "assign":
            pairs = obj["columns"]
            if not isinstance(pairs, list):
                raise VaultError(f"{at}.columns must be a list of [name, expression] pairs")
            assigned: list[tuple[str, Expr]] = []
            for i, pair in enumerate(pairs):
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise VaultError(f"{at}.columns[{i}] must be a [name, expression] pair")
                name = _name(pair[0], f"{at}.columns[{i}]")
                assigned.append((name, self.expr(pair[1], depth + 1, f"{at}.columns[{i}]")))
            return Assign(child, tuple(assigned))
        if kind == "aggregate":
            by = _names(obj["by"], f"{at}.by", empty=True)
            aggs = obj["aggs"]
            if not isinstance(aggs, list) or not aggs:
                raise VaultError(f"{at}.aggs must be a non-empty list")
            parsed = tuple(self.agg(agg, depth + 1, f"{at}.aggs[{i}]") for i, agg in enumerate(aggs))
            names = [a.name for a in parsed]
            if len(set(names)) != len(names) or set(names) & set(by):
                raise VaultError(f"{at}: aggregation names must be unique and differ from the group keys")
            return Aggregate(child, by, parsed)
        if kind == "value_counts":
            dropna = obj.get("dropna", True)
            if not isinstance(dropna, bool):
                raise VaultError(f"{at}.dropna must be true or false")
            return ValueCounts(child, _name(obj["column"], f"{at}.column"), dropna)
        if kind == "describe":
            columns = obj.get("columns")
            return Describe(child, None if columns is None else _names(columns, f"{at}.columns", empty=False))
        return Count(child)

    def agg(self, obj: object, depth: int, where: str) -> Agg:
        self._enter(depth)
        if not isinstance(obj, dict):
            raise VaultError(f"{where} must be a JSON object")
        _check_keys(obj, frozenset({"name", "func"}), frozenset({"column", "q"}), where)
        name = _name(obj["name"], f"{where}.name")
        func = obj["func"]
        if not isinstance(func, str) or func not in AGG_FUNCS:
            raise VaultError(f"{where}.func must be one of {', '.join(AGG_FUNCS)}")
        column = obj.get("column")
        if column is not None:
            column = _name(column, f"{where}.column")
        elif func != "count":
            raise VaultError(f"{where}: {func} needs a column (only count may have column null)")
        q = obj.get("q")
        if func == "quantile":
            if isinstance(q, bool) or not isinstance(q, int | float) or not 0.0 <= q <= 1.0:
                raise VaultError(f"{where}.q must be a number between 0 and 1 for quantile")
            q = float(q)
        elif q is not None:
            raise VaultError(f"{where}.q is only for quantile")
        return Agg(name, column, func, q)

    def expr(self, obj: object, depth: int, where: str) -> Expr:
        self._enter(depth)
        if not isinstance(obj, dict):
            raise VaultError(f"{where}: an expression must be a JSON object, not {_json_type(obj)}")
        if "col" in obj:
            _check_keys(obj, frozenset({"col"}), frozenset(), where)
            return Col(_name(obj["col"], f"{where}.col"))
        if "lit" in obj:
            _check_keys(obj, frozenset({"lit"}), frozenset(), where)
            value = obj["lit"]
            _check_scalar(value, f"{where}.lit")
            return Lit(value)
        if "fn" not in obj:
            raise VaultError(
                f'{where}: an expression is {{"col": ...}}, {{"lit": ...}} or {{"fn": ..., "args": [...]}}'
            )
        fn = obj["fn"]
        if not isinstance(fn, str) or fn not in _FUNCTIONS:
            shown = quote(fn) if isinstance(fn, str) else _json_type(fn)
            raise VaultError(f"{where}: unknown function {shown}; functions are {', '.join(sorted(_FUNCTIONS))}")
        arity, allowed, required = _FUNCTIONS[fn]
        _check_keys(obj, frozenset({"fn", "args"}) | required, allowed, f"{where} ({fn})")
        args = obj["args"]
        if not isinstance(args, list) or len(args) != arity:
            raise VaultError(f"{where} ({fn}): args must be a list of {arity} expression(s)")
        parsed = tuple(self.expr(arg, depth + 1, f"{where}.args[{i}]") for i, arg in enumerate(args))
        options: dict[str, Any] = {}
        if fn == "isin":
            values = obj["values"]
            if not isinstance(values, list) or len(values) > MAX_ISIN_VALUES:
                raise VaultError(f"{where} (isin): values must be a list of at most {MAX_ISIN_VALUES} JSON scalars")
            for value in values:
                _check_scalar(value, f"{where} (isin).values")
            options["values"] = tuple(values)
        elif fn == "round":
            ndigits = obj.get("ndigits", 0)
            if isinstance(ndigits, bool) or not isinstance(ndigits, int) or not -30 <= ndigits <= 30:
                raise VaultError(f"{where} (round): ndigits must be an integer between -30 and 30")
            options["ndigits"] = ndigits
        elif fn == "startswith":
            options["prefix"] = _name(obj["prefix"], f"{where} (startswith).prefix", empty=True)
        elif fn == "cast":
            if not isinstance(obj["type"], str) or obj["type"] not in CAST_TYPES:
                raise VaultError(f"{where} (cast): type must be one of {', '.join(CAST_TYPES)}")
            options["type"] = obj["type"]
        elif fn == "over":
            if not isinstance(obj["func"], str) or obj["func"] not in WINDOW_FUNCS:
                raise VaultError(f"{where} (over): func must be one of {', '.join(WINDOW_FUNCS)}")
            options["func"] = obj["func"]
            options["by"] = _names(obj["by"], f"{where} (over).by", empty=False)
        return Call(fn, parsed, options)


def _check_keys(obj: Mapping[str, Any], required: frozenset[str], optional: frozenset[str], where: str) -> None:
    unknown = [key for key in obj if key not in required and key not in optional]
    if unknown:
        raise VaultError(f"{where}: unknown key(s) {', '.join(quote(k) for k in sorted(map(str, unknown)))}")
    missing = sorted(required - obj.keys())
    if missing:
        raise VaultError(f"{where}: missing key(s) {', '.join(missing)}")


def _check_scalar(value: object, where: str) -> None:
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise VaultError(f"{where}: integers must fit in 64 bits")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise VaultError(f"{where}: numbers must be finite")
        return
    raise VaultError(f"{where}: a literal is a JSON scalar (number, string, boolean or null), not {_json_type(value)}")


def _name(value: object, where: str, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise VaultError(f"{where} must be a string, not {_json_type(value)}")
    if len(value) > MAX_NAME_CHARS or (not value and not empty):
        raise VaultError(f"{where} must be a string of 1-{MAX_NAME_CHARS} characters")
    if "\x00" in value:
        raise VaultError(f"{where} must not contain NUL characters")
    return value


def _names(value: object, where: str, *, empty: bool) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise VaultError(f"{where} must be a list of column names, not {_json_type(value)}")
    names = tuple(_name(item, where) for item in value)
    if not names and not empty:
        raise VaultError(f"{where} must name at least one column")
    if len(set(names)) != len(names):
        raise VaultError(f"{where} names a column twice")
    return names


def _json_type(value: object) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), "a non-JSON value")


def quote(name: str) -> str:
    """A name from the plan or a schema, quoted and cut short: never a data value, but still hostile input."""
    return repr(name if len(name) <= 80 else name[:77] + "...")


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(plan: Mapping[str, Any], sources: Mapping[str, SourceTable]) -> SourceTable:
    """The table a row-level plan (source/select/filter/assign/join) describes. It is raw: never released as is."""
    return evaluate_node(parse_plan(plan), sources)


def plan_datasets(plan: Mapping[str, Any], sources: Mapping[str, SourceTable]) -> frozenset[str]:
    """The datasets a plan touches, without evaluating it (for the audit log and policy checks)."""
    return node_datasets(parse_plan(plan), sources)


def uses_window(plan: Mapping[str, Any]) -> bool:
    """Whether a plan computes a window function anywhere: in a filter, an assigned column, either side of a join."""
    pending: list[Node | Expr] = [parse_plan(plan)]
    while pending:
        item = pending.pop()
        if isinstance(item, Call):
            if item.fn == "over":
                return True
            pending += item.args
        elif isinstance(item, Join):
            pending += [item.left, item.right]
        elif isinstance(item, Filter):
            pending += [item.input, item.predicate]
        elif isinstance(item, Assign):
            pending += [item.input, *(expr for _, expr in item.columns)]
        elif not isinstance(item, Source | Col | Lit):
            pending.append(item.input)
    return False


def plan_sources(plan: Mapping[str, Any], sources: Mapping[str, SourceTable]) -> dict[str, SourceTable]:
    """The source tables a plan reads, by handle (what running it again needs; unknown handles are refused)."""
    found: dict[str, SourceTable] = {}
    pending: list[Node] = [parse_plan(plan)]
    while pending:
        node = pending.pop()
        if isinstance(node, Source):
            found[node.handle] = _source(node, sources)
        elif isinstance(node, Join):
            pending += [node.left, node.right]
        else:
            pending.append(node.input)
    return found


def node_datasets(node: Node, sources: Mapping[str, SourceTable]) -> frozenset[str]:
    if isinstance(node, Source):
        return _source(node, sources).datasets
    if isinstance(node, Join):
        return node_datasets(node.left, sources) | node_datasets(node.right, sources)
    return node_datasets(node.input, sources)


def evaluate_node(node: Node, sources: Mapping[str, SourceTable]) -> SourceTable:
    """Run a row-level node with Polars, one node at a time.

    Each node is type-checked on the input's schema (which a zero-row frame gives without reading data) before its
    query runs, and every operation is total: where a value has no result (a cast that does not convert, an integer
    division by zero) the result is null. Whether a request fails, and what its error says, is then decided by the
    plan and the types alone, never by a row's value.
    """
    if isinstance(node, Source):
        # A scanned dataset as its reads have shown it so far. The registered table itself stays as it is: it names
        # the question in the difference checks' recipes, and a question asked again must be recognised as such.
        return _source(node, sources).with_learned_facts()
    if isinstance(node, RELEASE_NODES):
        kind = type(node).__name__.lower() if not isinstance(node, ValueCounts) else "value_counts"
        raise VaultError(f"a {kind} node may only be the root of a release plan")
    if isinstance(node, Join):
        return _join(node, evaluate_node(node.left, sources), evaluate_node(node.right, sources))
    frame = evaluate_node(node.input, sources)
    if isinstance(node, Select):
        return _select(frame, node.columns)
    if isinstance(node, Filter):
        return _filter(frame, node.predicate)
    assert isinstance(node, Assign)
    return _assign(frame, node.columns)


def _source(node: Source, sources: Mapping[str, SourceTable]) -> SourceTable:
    found = sources.get(node.handle)
    if found is None:
        raise VaultError(f"no dataset or table with handle {quote(node.handle)} is open")
    return found


def require_columns(frame: SourceTable, names: Sequence[str], what: str) -> None:
    """Raise a VaultError listing the table's columns when a plan names one it does not have."""
    present = set(frame.columns)
    for name in names:
        if name not in present:
            raise VaultError(f"{what}: no column {quote(name)}; columns are {_column_list(frame.columns)}")


def lineage_of(frame: SourceTable, name: str) -> Lineage:
    """A column's lineage; a column without one is refused (fail closed) rather than treated as underived."""
    lineage = frame.lineage.get(name)
    if lineage is None:
        raise VaultError(f"column {quote(name)} has no recorded lineage, so nothing derived from it is released")
    return lineage


def _column_list(names: Sequence[str]) -> str:
    shown = ", ".join(n if len(n) <= 80 else n[:77] + "..." for n in names[:50])
    return (shown + f", ... ({len(names) - 50} more)") if len(names) > 50 else (shown or "(none)")


@contextmanager
def engine_errors(operation: str, subjects: Sequence[str]) -> Iterator[None]:
    """Turn a Polars/Arrow failure into a VaultError that names the operation, never a value the engine quotes.

    Operations are total, so a failure here is a type error found on zero rows, or the engine's own failure; the
    text says nothing about values (no "a value does not convert"), which would describe the data.
    """
    try:
        yield
    except VaultError as exc:
        exc.__suppress_context__ = True  # written by this package: it carries no engine message
        raise
    except (pl.exceptions.InvalidOperationError, pl.exceptions.SchemaError, pl.exceptions.SchemaFieldNotFoundError):
        raise VaultError(f"{operation} is not supported for {_subjects(subjects)}") from None
    except (pl.exceptions.ComputeError, pa.ArrowInvalid, ValueError, OverflowError, ArithmeticError):
        raise VaultError(f"{operation} failed on {_subjects(subjects)}") from None
    except (pa.ArrowNotImplementedError, pa.ArrowTypeError, TypeError):
        raise VaultError(f"{operation}: the types of {_subjects(subjects)} do not fit together") from None
    except (pl.exceptions.PolarsError, pl.exceptions.PanicException, pa.ArrowException, IndexError, KeyError):
        raise VaultError(f"{operation} failed on {_subjects(subjects)}") from None
    except MemoryError:
        raise VaultError(f"{operation} failed on {_subjects(subjects)}") from None


arrow_errors = engine_errors  # the release engine's historical name


def _subjects(subjects: Sequence[str]) -> str:
    return ", ".join(subjects) if subjects else "its input"


def _select(frame: SourceTable, columns: tuple[str, ...]) -> SourceTable:
    require_columns(frame, columns, "select")
    masks = {name: mask for name, mask in frame.masks.items() if name in columns}
    records = [name for _, name in frame.records or ()]
    return SourceTable(
        frame.data.select([*columns, *records, *masks.values(), *frame.weight_columns]),
        {name: lineage_of(frame, name) for name in columns},
        frame.datasets,
        frame.records,
        {name: kind for name, kind in frame.arrow_types.items() if name in columns},
        frame.unique,
        frame.streaming,
        frame.nan_free & set(columns),
        masks,
        frame.row_bound().only(columns),
        frame.weights,
    )


def _filter(frame: SourceTable, predicate: Expr) -> SourceTable:
    value = _eval_expr(predicate, frame)
    if value.dtype not in (pl.Boolean, pl.Null):
        raise VaultError(f"filter: the predicate ({value.label}) is {_type_name(value.dtype)}, not a boolean")
    with engine_errors("filter", [value.label]):
        data = frame.data.filter(value.expr.fill_null(False))
    return frame.replace(data)


def _assign(frame: SourceTable, columns: tuple[tuple[str, Expr], ...]) -> SourceTable:
    current = frame
    for name, expr in columns:
        if name in current.hidden:  # a plan's name equal to a hidden column's: the hidden one moves aside
            current = _move_hidden(current, name)
        value = _eval_expr(expr, current)
        masks = {column: mask for column, mask in current.masks.items() if column != name}
        assigned = [value.expr.alias(name)]
        if value.contributes is not None:  # computed from the same input rows as the value itself
            mask = fresh_names(1, set(current.schema.names()) | {name}, _MASK_PREFIX)[0]
            assigned.append(value.contributes.alias(mask))
            masks[name] = mask
        data = current.data.with_columns(assigned)
        if name in current.masks:  # the overwritten value's mask goes with it
            data = data.drop(current.masks[name])
        if name not in current.lineage and current.hidden:  # keep hidden columns last
            hidden = [*(c for _, c in current.records or ()), *masks.values(), *current.weight_columns]
            data = data.select([*current.columns, name, *hidden])
        lineage = {**current.lineage, name: value.lineage}
        arrow_types = {k: v for k, v in current.arrow_types.items() if k != name}
        if isinstance(expr, Col) and expr.name in current.arrow_types:
            arrow_types[name] = current.arrow_types[expr.name]
        nan_free = current.nan_free - {name}
        if isinstance(expr, Col) and expr.name in current.nan_free:
            nan_free |= {name}
        current = SourceTable(
            data,
            lineage,
            current.datasets,
            current.records,
            arrow_types,
            current.unique,
            current.streaming,
            nan_free,
            masks,
            current.row_bound().assigned(name, expr.name if isinstance(expr, Col) else None),
            current.weights,
        )
    return current


def _move_hidden(frame: SourceTable, name: str) -> SourceTable:
    """The table with hidden column ``name`` renamed to a name nothing uses, so a plan may take ``name``."""
    if name in frame.masks.values():
        prefix = _MASK_PREFIX
    elif name in frame.weight_columns:
        prefix = _WEIGHT_PREFIX
    else:
        prefix = _RECORD_PREFIX
    new = fresh_names(1, set(frame.schema.names()) | {name}, prefix)[0]
    return SourceTable(
        frame.data.rename({name: new}),
        frame.lineage,
        frame.datasets,
        tuple((d, new if c == name else c) for d, c in frame.records) if frame.records is not None else None,
        frame.arrow_types,
        frozenset(new if c == name else c for c in frame.unique),
        frame.streaming,
        frame.nan_free,
        {column: new if mask == name else mask for column, mask in frame.masks.items()},
        frame.bound,
        {
            new if ids == name else ids: (new if weight == name else weight, bits)
            for ids, (weight, bits) in frame.weights.items()
        },
    )


MAX_JOIN_ROWS = 200_000_000
_KEY_KINDS = ("integer", "float", "string", "boolean", "temporal")


def _join(node: Join, left: SourceTable, right: SourceTable) -> SourceTable:
    require_columns(left, node.on, "join (left side)")
    require_columns(right, node.on, "join (right side)")
    left_suffix, right_suffix = node.suffixes
    keys = set(node.on)
    left_rest = [n for n in left.columns if n not in keys]
    right_rest = [n for n in right.columns if n not in keys]
    clashing = set(left_rest) & set(right_rest)
    if clashing and left_suffix == right_suffix:
        raise VaultError("join: the two suffixes must differ when both sides share column names")

    def renamed(name: str, suffix: str) -> str:
        return name + suffix if name in clashing else name

    out_names = list(node.on) + [renamed(n, left_suffix) for n in left_rest]
    out_names += [renamed(n, right_suffix) for n in right_rest]
    if len(set(out_names)) != len(out_names):
        raise VaultError("join: the suffixes make two result columns share a name; choose other suffixes")
    key_types = ", ".join(f"{quote(k)} {left.arrow_type(k)}/{right.arrow_type(k)}" for k in node.on)
    key_casts = [_join_key_type(left.dtype(k), right.dtype(k), key_types) for k in node.on]
    # Record ids ride along as hidden columns under names neither side uses.
    left_data, left_records, left_unique = left.record_columns()
    right_data, right_records, right_unique = right.record_columns()
    taken = set(out_names) | set(left.columns) | set(right.columns)
    hidden = fresh_names(len(left_records) + len(right_records), taken)
    left_hidden, right_hidden = hidden[: len(left_records)], hidden[len(left_records) :]
    # Contribution masks ride along too: a column's own (null, so false, on a row its side did not match), and a
    # masked key's from both sides (the coalesced key holds either side's value).
    masked_keys = [k for k in node.on if k in left.masks or k in right.masks]
    left_masked = [n for n in left_rest if n in left.masks]
    right_masked = [n for n in right_rest if n in right.masks]
    mask_names = fresh_names(
        len(left_masked) + len(right_masked) + 2 * len(masked_keys), taken | set(hidden), _MASK_PREFIX
    )
    masked = [renamed(n, left_suffix) for n in left_masked] + [renamed(n, right_suffix) for n in right_masked]
    # Record weights ride along with their ids (null where a side did not match, as the ids are).
    left_weighted = [(old, new) for (_, old), new in zip(left_records, left_hidden, strict=True) if old in left.weights]
    right_weighted = [
        (old, new) for (_, old), new in zip(right_records, right_hidden, strict=True) if old in right.weights
    ]
    weight_names = fresh_names(
        len(left_weighted) + len(right_weighted), taken | set(hidden) | set(mask_names), _WEIGHT_PREFIX
    )
    weights = {
        new: (name, (left.weights if side == 0 else right.weights)[old][1])
        for (side, (old, new)), name in zip(
            [(0, pair) for pair in left_weighted] + [(1, pair) for pair in right_weighted], weight_names, strict=True
        )
    }
    column_masks = dict(zip(masked, mask_names[: len(masked)], strict=True))
    key_sides = mask_names[len(masked) :]
    left_keys, right_keys = key_sides[: len(masked_keys)], key_sides[len(masked_keys) :]
    # Rename both sides up front so the output never depends on Polars' suffix rules.
    left_frame = left_data.select(
        *(_key_expr(k, cast) for k, cast in zip(node.on, key_casts, strict=True)),
        *(pl.col(n).alias(renamed(n, left_suffix)) for n in left_rest),
        *(pl.col(old).alias(new) for (_, old), new in zip(left_records, left_hidden, strict=True)),
        *(pl.col(left.masks[n]).alias(column_masks[renamed(n, left_suffix)]) for n in left_masked),
        *(left.contributes(k).alias(name) for k, name in zip(masked_keys, left_keys, strict=True)),
        *(pl.col(left.weights[old][0]).alias(weights[new][0]) for old, new in left_weighted),
    )
    right_frame = right_data.select(
        *(_key_expr(k, cast) for k, cast in zip(node.on, key_casts, strict=True)),
        *(pl.col(n).alias(renamed(n, right_suffix)) for n in right_rest),
        *(pl.col(old).alias(new) for (_, old), new in zip(right_records, right_hidden, strict=True)),
        *(pl.col(right.masks[n]).alias(column_masks[renamed(n, right_suffix)]) for n in right_masked),
        *(right.contributes(k).alias(name) for k, name in zip(masked_keys, right_keys, strict=True)),
        *(pl.col(right.weights[old][0]).alias(weights[new][0]) for old, new in right_weighted),
    )
    masks = {**column_masks, **dict(zip(masked_keys, left_keys, strict=True))}

    def joined_of(left_side: pl.LazyFrame, right_side: pl.LazyFrame) -> pl.LazyFrame:
        how = JOIN_TYPES[node.how]
        joined = left_side.join(right_side, on=list(node.on), how=how, coalesce=True, nulls_equal=False)
        either = (
            (pl.col(mine).fill_null(False) | pl.col(theirs).fill_null(False)).alias(mine)
            for mine, theirs in zip(left_keys, right_keys, strict=True)
        )
        own = (pl.col(mask).fill_null(False) for mask in column_masks.values())
        return joined.select([*out_names, *hidden, *own, *either, *(name for name, _ in weights.values())])

    with engine_errors("join", [f"keys {key_types}"]):
        empty_left = pl.LazyFrame(schema=left_frame.collect_schema())
        joined_of(empty_left, pl.LazyFrame(schema=right_frame.collect_schema())).collect()  # type check, no rows
    streaming = left.streaming or right.streaming
    left_keys_unique = _keys_unique(left, node.on, key_casts)
    right_keys_unique = _keys_unique(right, node.on, key_casts)
    bound = _join_bound(node, (left, right), key_casts, renamed, (left_keys_unique, right_keys_unique))
    joined = joined_of(left_frame, right_frame)
    records = tuple((dataset, name) for name, (dataset, _) in zip(hidden, left_records + right_records, strict=True))
    # A record stays once per row when the other side's keys are unique (each row meets at most one partner).
    unique = {new for (_, old), new in zip(left_records, left_hidden, strict=True) if old in left_unique}
    unique = unique if right_keys_unique else set()
    if left_keys_unique:
        unique |= {new for (_, old), new in zip(right_records, right_hidden, strict=True) if old in right_unique}
    lineage: dict[str, Lineage] = {key: lineage_of(left, key) | lineage_of(right, key) for key in node.on}
    lineage.update({renamed(n, left_suffix): lineage_of(left, n) for n in left_rest})
    lineage.update({renamed(n, right_suffix): lineage_of(right, n) for n in right_rest})
    arrow_types = {renamed(n, left_suffix): t for n, t in left.arrow_types.items() if n in left_rest}
    arrow_types.update({renamed(n, right_suffix): t for n, t in right.arrow_types.items() if n in right_rest})
    arrow_types.update(
        {k: left.arrow_types[k] for k in node.on if k in left.arrow_types and left.dtype(k) == right.dtype(k)}
    )
    datasets = left.datasets | right.datasets
    nan_free = {renamed(n, left_suffix) for n in left_rest if n in left.nan_free}
    nan_free |= {renamed(n, right_suffix) for n in right_rest if n in right.nan_free}
    nan_free |= {k for k in node.on if k in left.nan_free and k in right.nan_free}
    return SourceTable(
        joined,
        lineage,
        datasets,
        records,
        arrow_types,
        frozenset(unique),
        streaming,
        frozenset(nan_free),
        masks,
        bound,
        weights,
    )


def _join_key_type(left: Any, right: Any, shown: str) -> Any:
    """The type both sides' key is read as: equal types, or two integers, two floats, string and categorical."""
    if left == right:  # categoricals too: every categorical of the vault shares Polars' global categories
        return None
    kinds = (_kind(left), _kind(right))
    if kinds == ("integer", "integer"):
        return pl.Int64
    if kinds == ("float", "float") or set(kinds) == {"integer", "float"}:
        return pl.Float64
    if kinds == ("string", "string"):
        return pl.String
    raise VaultError(f"join: the key types do not match ({shown})")


def _key_expr(name: str, cast: Any) -> pl.Expr:
    """A key read as the common type; a value it cannot hold (a uint64 beyond int64) becomes null, matching nothing."""
    return pl.col(name) if cast is None else pl.col(name).cast(cast, strict=False)


def _keys_unique(side: SourceTable, keys: tuple[str, ...], casts: list[Any]) -> bool:
    """Whether a load-time fact says no two rows of ``side`` share their keys: one key is a unique column.

    Only a key read as its own kind counts: an integer read as a float may share its value with another integer.
    """
    return any(_key_unique(side, key, cast) for key, cast in zip(keys, casts, strict=True))


def _key_unique(side: SourceTable, key: str, cast: Any) -> bool:
    unique = side.row_bound().unique
    kind = _kind(side.dtype(key))
    if key not in unique or kind not in ("integer", "string", "boolean", "date", "datetime"):
        return False
    return (cast is None or _kind(cast) == kind) and unique[key]()


def _join_bound(
    node: Join,
    sides: tuple[SourceTable, SourceTable],
    casts: list[Any],
    renamed: Callable[[str, str], str],
    keys_unique: tuple[bool, bool],
) -> RowBound:
    """Refuse a join whose result could exceed :data:`MAX_JOIN_ROWS`, by a bound fixed before any request.

    A many-to-many join is quadratic, so a limit is needed before Polars tries; counting the pairs the keys
    actually make would let a refusal tell whether some key values repeat, one bit per request. The bound is the
    product of the sides' bounds, or one side's bound where the other side's keys are unique by a load-time fact.
    """
    (left, right), (left_unique, right_unique) = sides, keys_unique
    left_bound, right_bound = left.row_bound(), right.row_bound()
    left_rows, right_rows = left_bound.rows(), right_bound.rows()
    pairs = left_rows * right_rows
    if right_unique:
        pairs = min(pairs, left_rows)
    if left_unique:
        pairs = min(pairs, right_rows)
    if pairs + left_rows + right_rows > MAX_JOIN_ROWS:
        raise VaultError(
            f"join: the result could have more than {MAX_JOIN_ROWS:,} rows, by the datasets' sizes and unique "
            "columns; aggregate one side first or join on a column unique in its dataset"
        )
    rows = pairs + (left_rows if node.how in ("left", "outer") else 0)
    rows += right_rows if node.how in ("right", "outer") else 0
    left_suffix, right_suffix = node.suffixes
    unique: dict[str, Callable[[], bool]] = {}
    if right_unique:  # each left row meets at most one partner: the left's unique columns stay unique
        unique.update({renamed(n, left_suffix): k for n, k in left_bound.unique.items() if n not in node.on})
    if left_unique:
        unique.update({renamed(n, right_suffix): k for n, k in right_bound.unique.items() if n not in node.on})
    for key, cast in zip(node.on, casts, strict=True):  # the coalesced key: unique on both sides, unique after
        if _key_unique(left, key, cast) and _key_unique(right, key, cast):
            unique[key] = _always
    return RowBound(lambda: rows, unique)


def _always() -> bool:
    return True


# -- expressions --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Value:
    """A compiled expression: a Polars expression with its type, lineage and a safe label.

    ``scalar`` holds a literal's Python value (a plan literal, never data), ``literal`` says whether there is one.
    ``contributes`` is the boolean expression saying on which rows the value came from a present value of a record
    (see :meth:`SourceTable.contributes`); ``None`` means exactly where the value is present (non-null, non-NaN),
    which holds of a dataset's column and of most functions of one, and needs no hidden column.
    """

    expr: pl.Expr
    dtype: Any
    lineage: Lineage
    label: str  # "column 'age' (int64)", "a int64 literal", "the result of add (int64)": safe to show
    literal: bool = False
    scalar: Any = None
    contributes: pl.Expr | None = None
    coded: pl.Expr | None = None  # a coded string column's codes (see _repeated_strings_coded): compared directly


def _kind(dtype: Any) -> str:
    if dtype == pl.Boolean:
        return "boolean"
    if dtype.is_integer():
        return "integer"
    if dtype.is_float() or isinstance(dtype, pl.Decimal):
        return "float"
    if dtype == pl.String or isinstance(dtype, pl.Categorical | pl.Enum):
        return "string"
    if isinstance(dtype, pl.Datetime):
        return "datetime"
    if dtype == pl.Date:
        return "date"
    if dtype == pl.Null:
        return "null"
    return "other"


def _type_name(dtype: Any) -> str:
    return str(arrow_type_of(dtype))


_LITERAL_TYPES: dict[type, Any] = {bool: pl.Boolean, int: pl.Int64, float: pl.Float64, str: pl.String}


def _eval_expr(expr: Expr, frame: SourceTable) -> Value:
    if isinstance(expr, Col):
        require_columns(frame, [expr.name], "expression")
        dtype = frame.dtype(expr.name)
        column = pl.col(expr.name)
        coded = None
        if isinstance(dtype, pl.Categorical | pl.Enum):  # read as its values, as pandas compares a category
            coded = column if isinstance(dtype, pl.Categorical) else None
            column, dtype = column.cast(pl.String), pl.String
        label = f"column {quote(expr.name)} ({frame.arrow_type(expr.name)})"
        mask = frame.masks.get(expr.name)
        contributes = None if mask is None else pl.col(mask).fill_null(False)
        return Value(column, dtype, lineage_of(frame, expr.name), label, contributes=contributes, coded=coded)
    if isinstance(expr, Lit):
        dtype = _LITERAL_TYPES.get(type(expr.value), pl.Null)
        label = f"a {'null' if dtype == pl.Null else _type_name(dtype)} literal"
        return Value(pl.lit(expr.value, dtype=dtype), dtype, _NO_LINEAGE, label, True, expr.value, _NOWHERE)
    args = [_eval_expr(arg, frame) for arg in expr.args]
    lineage = frozenset().union(*(arg.lineage for arg in args))
    labels = [arg.label for arg in args]
    with engine_errors(expr.fn, labels):
        compiled = _call(expr, args, frame)
        if expr.fn == "over":
            lineage |= frozenset().union(*(lineage_of(frame, name) for name in expr.options["by"]))
        dtype = frame.empty().lazy().select(compiled.alias("\x01")).collect().schema["\x01"]
        contributes = _contribution(expr, args, compiled, dtype)
        if contributes is not None:  # type-checked too, so a release never fails on it
            frame.empty().lazy().select(contributes.alias("\x01")).collect()
    return Value(compiled, dtype, lineage, f"the result of {expr.fn} ({_type_name(dtype)})", contributes=contributes)


_NOWHERE = pl.lit(False)
# Functions whose result is null or NaN wherever an argument is (NaN propagates, IEEE), whatever the types; with
# float arguments a comparison is false or true on NaN, a power can be 1, a cast can read NaN as "NaN".
_STRICT = frozenset({"add", "sub", "mul", "truediv", "floordiv", "mod", "not", "xor", "round", "startswith"}) | {
    *_UNARY_MATH,
    *_TEMPORAL,
    *_STRING,
}
_STRICT_WITHOUT_FLOATS = frozenset({*_COMPARISONS, "pow", "cast"})


def date_part(value: pl.Expr, part: str) -> pl.Expr:
    """One of :data:`TEMPORAL_PARTS` of a date or timestamp, as pandas numbers it (Monday is weekday 0)."""
    if part == "weekday":
        return (value.dt.weekday() - 1).cast(pl.Int64)
    parts = {"year": value.dt.year, "month": value.dt.month, "day": value.dt.day, "hour": value.dt.hour}
    return parts[part]().cast(pl.Int64)


def _present(expr: pl.Expr, dtype: Any, nan_free: bool = False) -> pl.Expr:
    """Where a value is there: not null, and not NaN (pandas' missing)."""
    return expr.fill_nan(None).is_not_null() if dtype.is_float() and not nan_free else expr.is_not_null()


def _contributes(value: Value) -> pl.Expr:
    return _present(value.expr, value.dtype) if value.contributes is None else value.contributes


def _plain(value: Value) -> bool:
    """Whether the value contributes exactly where it is present (a null literal is present nowhere)."""
    return value.contributes is None or (value.literal and value.scalar is None)


def _contribution(expr: Call, args: list[Value], compiled: pl.Expr, dtype: Any) -> pl.Expr | None:
    """Where the result of a function contributes, or None where that is exactly where it is present.

    A branch chosen by ``where`` contributes what the branch does (the condition, a predicate, never does);
    ``fill_null`` what the value does where it is present, else what the filler does; a group statistic (``over``)
    what the row's own input does; every other function where its result is present and some argument
    contributes. The ``None`` shortcut is taken only where it provably agrees, so the common case keeps no mask.
    """
    fn = expr.fn
    if fn == "where":
        cond, then, otherwise = args
        if _plain(then) and _plain(otherwise):
            return None  # the result is the chosen branch: present exactly where that branch is
        condition = cond.expr.cast(pl.Boolean)
        return (
            pl.when(condition.is_null())
            .then(False)
            .when(condition)
            .then(_contributes(then))
            .otherwise(_contributes(otherwise))
        )
    if fn == "fill_null":
        data, fill = args
        if _plain(data) and _plain(fill):
            return None
        return pl.when(_present(data.expr, data.dtype)).then(_contributes(data)).otherwise(_contributes(fill))
    present = _present(compiled, dtype)
    if fn == "over":
        return present & _contributes(args[0])
    floats = _has_float([arg for arg in args if not arg.literal])  # a plan's literals are finite numbers
    strict = fn in _STRICT or (fn in _STRICT_WITHOUT_FLOATS and not floats)
    if fn == "between":  # a Kleene "and" of two comparisons: null wherever the value compared is
        strict = not floats and not args[0].literal
    if fn in ("and", "or"):  # Kleene: a false (true) argument decides alone, so both must be data
        strict = not any(arg.literal for arg in args)
    if strict and all(_plain(arg) or arg.literal for arg in args) and not all(arg.literal for arg in args):
        return None  # a present result implies a present argument that is data, so that one contributes
    return present & pl.any_horizontal([_contributes(arg) for arg in args])


_NUMBER_KINDS = ("integer", "float")


def _require_fillable(data: Value, fill: Value) -> None:
    """Refuse, from the types, a fill the engine would reject only on reaching a row with a null.

    Numbers mix with numbers and a null with anything; otherwise both sides must be of one kind (a datetime of one
    type), and never of a kind outside the plain ones (durations, lists, structs), whose supertypes Polars resolves
    per row.
    """
    kinds = (_kind(data.dtype), _kind(fill.dtype))
    if "null" in kinds or set(kinds) <= set(_NUMBER_KINDS):
        return
    same = kinds[0] == kinds[1] and kinds[0] != "other"
    if same and (kinds[0] != "datetime" or data.dtype == fill.dtype):
        return
    raise VaultError(f"fill_null: the types of {data.label}, {fill.label} do not fit together")


def _call(expr: Call, args: list[Value], frame: SourceTable) -> pl.Expr:
    fn = expr.fn
    if fn in _COMPARISONS:
        equality = _coded_equality(fn, args[0], args[1])
        if equality is not None:
            return equality
        left, right = _comparable(fn, args[0], args[1])
        return _compare(fn, left, right, _has_float(args))
    if fn in _ARITHMETIC:
        _require_numeric(fn, args)
        return _arithmetic(fn, args, frame)
    if fn == "truediv":
        _require_numeric(fn, args)
        return _to_float(args[0]) / _to_float(args[1])
    if fn in ("floordiv", "mod"):
        _require_numeric(fn, args)
        return _floordiv_mod(fn, args, frame)
    if fn in _LOGICAL or fn == "not":
        for arg in args:
            if arg.dtype not in (pl.Boolean, pl.Null):
                raise VaultError(f"{fn} needs booleans; {arg.label} is not")
        exprs = [arg.expr.cast(pl.Boolean) for arg in args]
        if fn == "not":
            return ~exprs[0]
        if fn == "and":
            return exprs[0] & exprs[1]
        if fn == "or":
            return exprs[0] | exprs[1]
        return exprs[0].xor(exprs[1])
    if fn in ("is_null", "not_null"):
        isnull = _nan_to_null(args[0]).is_null()
        return isnull if fn == "is_null" else ~isnull
    if fn == "isin":
        return _isin(args[0], expr.options["values"])
    if fn == "between":
        low = _compare("ge", *_comparable(fn, args[0], args[1]), _has_float(args[:2]))
        high = _compare("le", *_comparable(fn, args[0], args[2]), _has_float(args[::2]))
        return low & high
    if fn == "where":
        cond, then, otherwise = args
        if cond.dtype not in (pl.Boolean, pl.Null):
            raise VaultError(f"where needs a boolean condition; {cond.label} is not")
        then_expr, otherwise_expr = _comparable(fn, then, otherwise)
        condition = cond.expr.cast(pl.Boolean)
        return pl.when(condition.is_null()).then(None).when(condition).then(then_expr).otherwise(otherwise_expr)
    if fn == "fill_null":
        data, fill = args
        fill_expr = fill.expr
        _require_fillable(data, fill)
        numbers = _kind(data.dtype) in _NUMBER_KINDS and _kind(fill.dtype) in _NUMBER_KINDS
        exact = numbers and (_kind(data.dtype) == "float" or float(fill.scalar or 0).is_integer())
        if fill.literal and fill.scalar is not None and fill.dtype != data.dtype and exact:
            fill_expr = pl.lit(fill.scalar).cast(data.dtype)  # a number the column's type holds keeps that type
        filled: pl.Expr = _nan_to_null(data).fill_null(fill_expr)
        return filled
    if fn == "round":
        _require_numeric(fn, args)
        ndigits: int = expr.options["ndigits"]
        value = _to_float(args[0])
        if ndigits >= 0:
            return value.round(ndigits, mode="half_to_even")
        scale = 10.0 ** (-ndigits)
        return (value / scale).round(0, mode="half_to_even") * scale
    if fn in _UNARY_MATH:
        _require_numeric(fn, args)
        value = args[0].expr
        if fn == "log":
            return _to_float(args[0]).log()
        if fn == "exp":
            return _to_float(args[0]).exp()
        if fn == "sqrt":
            return _to_float(args[0]).sqrt()
        return -value if fn == "neg" else value.abs()
    if fn in _TEMPORAL:
        kind = _kind(args[0].dtype)
        if not (kind == "datetime" or (kind == "date" and fn != "hour")):
            raise VaultError(f"{fn} needs a timestamp{'' if fn == 'hour' else ' or date'}; {args[0].label} is not")
        return date_part(args[0].expr, fn)
    if fn in _STRING or fn == "startswith":
        if args[0].dtype != pl.String:
            raise VaultError(f"{fn} needs a string; {args[0].label} is not")
        value = args[0].expr
        if fn == "startswith":
            return value.str.starts_with(expr.options["prefix"])
        if fn == "lower":
            return value.str.to_lowercase()
        if fn == "upper":
            return value.str.to_uppercase()
        return value.str.len_chars().cast(pl.Int64)
    if fn == "over":
        return _window(args[0], expr.options["func"], expr.options["by"], frame)
    assert fn == "cast"
    return _cast(args[0], CAST_TYPES[expr.options["type"]], frame)


def _require_numeric(fn: str, args: Sequence[Value]) -> None:
    for arg in args:
        if _kind(arg.dtype) not in ("integer", "float", "boolean", "null"):
            raise VaultError(f"{fn} needs numbers; {arg.label} is not numeric")


def _to_float(value: Value) -> pl.Expr:
    return value.expr if value.dtype == pl.Float64 else value.expr.cast(pl.Float64)


def _as_number(value: Value) -> pl.Expr:
    """Booleans count as 0/1 and decimals as floats in arithmetic, as in pandas."""
    if value.dtype == pl.Boolean:
        return value.expr.cast(pl.Int64)
    if isinstance(value.dtype, pl.Decimal):
        return value.expr.cast(pl.Float64)
    return value.expr


def _arithmetic(fn: str, args: list[Value], frame: SourceTable) -> pl.Expr:
    """Add, subtract, multiply and power, total on every value; the result's type follows from the plan alone.

    Integer overflow wraps, as in NumPy. A power is float if either side is a float or the exponent is a negative
    integer literal (Python's ``2 ** -1``); integers to an integer power stay int64, and an exponent outside
    0..2**32-1 (a negative one, which pandas refuses) gives null instead of an error, so that no value decides
    whether a request fails.
    """
    left, right = (_as_number(arg) for arg in args)
    if fn == "add":
        return left + right
    if fn == "sub":
        return left - right
    if fn == "mul":
        return left * right
    exponent = args[1]
    negative_literal = exponent.literal and isinstance(exponent.scalar, int) and exponent.scalar < 0
    integers = all(_kind(arg.dtype) in ("integer", "boolean") for arg in args)
    if not integers or negative_literal:
        return left.cast(pl.Float64).pow(right.cast(pl.Float64))
    power = right.cast(pl.Int64, strict=False)
    in_range = power.is_between(0, 2**32 - 1)
    return left.cast(pl.Int64, strict=False).pow(pl.when(in_range).then(power).otherwise(None).cast(pl.UInt32))


def _floordiv_mod(fn: str, args: list[Value], frame: SourceTable) -> pl.Expr:
    """Python/pandas semantics: floor division and a remainder with the divisor's sign.

    Integers stay int64 whatever the values: a zero divisor gives null where pandas would switch the whole column
    to floats (inf/NaN), because a result type that depends on the data would tell the analyst whether some
    divisor is zero. Unsigned values beyond int64 become null, as a cast to int64 would make them.
    """
    left, right = (_as_number(arg) for arg in args)
    both_int = all(_kind(arg.dtype) in ("integer", "boolean") for arg in args)
    if both_int:
        left, right = left.cast(pl.Int64, strict=False), right.cast(pl.Int64, strict=False)
        result = left % right if fn == "mod" else left // right
        return pl.when(right == 0).then(None).otherwise(result)
    left, right = left.cast(pl.Float64), right.cast(pl.Float64)
    if fn == "mod":
        return left % right
    return (left / right).floor()


def _nan_to_null(value: Value) -> pl.Expr:
    """pandas treats NaN as missing; Polars keeps it as a value. Inputs are normalised so results agree."""
    if value.dtype.is_float():
        return value.expr.fill_nan(None)
    return value.expr


def _has_float(args: Sequence[Value]) -> bool:
    return any(arg.dtype.is_float() for arg in args)


def _compare(fn: str, left: pl.Expr, right: pl.Expr, floats: bool) -> pl.Expr:
    """A comparison where NaN equals nothing and orders with nothing (IEEE, as pandas compares)."""
    if floats:
        compared = _compare(fn, left, right, False)
        nan = left.cast(pl.Float64).is_nan() | right.cast(pl.Float64).is_nan()
        return pl.when(nan.fill_null(False)).then(pl.lit(fn == "ne")).otherwise(compared)
    if fn == "eq":
        return left == right
    if fn == "ne":
        return left != right
    if fn == "lt":
        return left < right
    if fn == "le":
        return left <= right
    if fn == "gt":
        return left > right
    return left >= right


def _coded_equality(fn: str, left: Value, right: Value) -> pl.Expr | None:
    """``eq``/``ne`` of a coded string column and a string literal, on the codes (no string is materialised):
    the same truth, and null where the column is null, as the strings compared. None for any other comparison."""
    if fn not in ("eq", "ne"):
        return None
    for column, other in ((left, right), (right, left)):
        if column.coded is not None and other.literal and isinstance(other.scalar, str):
            text = pl.lit(other.scalar, dtype=pl.String)
            return column.coded == text if fn == "eq" else column.coded != text
    return None


def _comparable(fn: str, left: Value, right: Value) -> tuple[pl.Expr, pl.Expr]:
    """Both sides as expressions of one kind; a string literal stands for a timestamp or date, as in pandas."""
    left_kind, right_kind = _kind(left.dtype), _kind(right.dtype)
    if left.literal and left_kind == "string" and right_kind in ("datetime", "date"):
        return _temporal_literal(left.scalar, right.dtype), right.expr
    if right.literal and right_kind == "string" and left_kind in ("datetime", "date"):
        return left.expr, _temporal_literal(right.scalar, left.dtype)
    numeric = ("integer", "float")
    fits = (
        left_kind == right_kind or "null" in (left_kind, right_kind) or (left_kind in numeric and right_kind in numeric)
    )
    if not fits or left_kind == "other":
        raise VaultError(f"{fn} is not supported for {left.label}, {right.label}")
    return _as_number(left) if left_kind != "boolean" else left.expr, (
        _as_number(right) if right_kind != "boolean" else right.expr
    )


def _parse_temporal(text: str, dtype: Any) -> Any:
    """A plan's string literal read as the column's date or time (a local time is in the column's zone)."""
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise VaultError("a string literal compared with a date or time is not an ISO date or time") from None
    if dtype == pl.Date:
        if parsed.time() != datetime.min.time() or parsed.tzinfo is not None:
            raise VaultError("a string literal compared with a date column must be a date")
        return parsed.date()
    zone = dtype.time_zone
    if zone is None:
        if parsed.tzinfo is not None:
            parsed = parsed.astimezone(ZoneInfo("UTC")).replace(tzinfo=None)
        return parsed
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=ZoneInfo(zone))
    return parsed.astimezone(ZoneInfo(zone))


def _temporal_literal(text: Any, dtype: Any) -> pl.Expr:
    if text is None:
        return pl.lit(None, dtype=dtype)
    return pl.lit(_parse_temporal(str(text), dtype), dtype=dtype)


def _isin(value: Value, values: tuple[Any, ...]) -> pl.Expr:
    kind = _kind(value.dtype)
    if kind == "string" and any(not isinstance(v, str) and v is not None for v in values):
        raise VaultError(f"isin: {value.label} is a string column; its values must be strings")
    present = [v for v in values if v is not None]
    has_null = len(present) != len(values)
    if kind in ("datetime", "date") and all(isinstance(v, str) for v in present):
        members = pl.Series([_parse_temporal(v, value.dtype) for v in present], dtype=value.dtype)
    elif kind in ("integer", "float") and all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        if kind == "integer" and any(isinstance(v, float) and not v.is_integer() for v in present):
            members = pl.Series([float(v) for v in present], dtype=pl.Float64)
            return (
                pl.when(value.expr.is_null())
                .then(pl.lit(has_null))
                .otherwise(value.expr.cast(pl.Float64).is_in(members))
            )
        members = pl.Series([float(v) for v in present], dtype=pl.Float64)
        members = members.cast(value.dtype) if kind == "integer" else members
    else:
        try:
            members = pl.Series(present, strict=True).cast(value.dtype) if present else pl.Series([], dtype=value.dtype)
        except Exception:
            raise VaultError(f"isin: the values do not fit {value.label}") from None
    if value.coded is not None and 0 < len(present) <= _CODED_ISIN:
        # A coded string column compared with each value (no string materialised). Not looked up as a list: that
        # would add the plan's strings to Polars' process-wide categories, which never shrink.
        coded = value.coded
        found = functools.reduce(operator.or_, (coded == pl.lit(v, dtype=pl.String) for v in present))
        return pl.when(coded.is_null()).then(pl.lit(has_null)).otherwise(found)
    data = _nan_to_null(value)
    return pl.when(data.is_null()).then(pl.lit(has_null)).otherwise(data.is_in(members))


_CASTS_FROM: dict[str, tuple[Any, ...]] = {
    "integer": (pl.Int64, pl.Float64, pl.String, pl.Boolean),
    "float": (pl.Int64, pl.Float64, pl.String, pl.Boolean),
    "boolean": (pl.Int64, pl.Float64, pl.String, pl.Boolean),
    "null": (pl.Int64, pl.Float64, pl.String, pl.Boolean),
    "string": (pl.Int64, pl.Float64, pl.String),
    "datetime": (pl.Int64, pl.Float64, pl.String),
    "date": (pl.Int64, pl.Float64, pl.String),
}


def _cast(value: Value, target: Any, frame: SourceTable) -> pl.Expr:
    """``TRY_CAST``: a value that does not convert (NaN, an infinity, out of range, an unparsable string) is null.

    Whether a cast is allowed is decided by the types alone, from a fixed table: Polars type-checks some casts only
    when a row reaches them (a date to a boolean), and a plan checked on zero rows must not fail on one.
    """
    kind = _kind(value.dtype)
    if target not in _CASTS_FROM.get(kind, ()):
        target_name = next(name for name, dtype in CAST_TYPES.items() if dtype == target)
        raise VaultError(f"cast to {target_name} is not supported for {value.label}")
    return value.expr.cast(target, strict=False)


def _window(value: Value, func: str, by: tuple[str, ...], frame: SourceTable) -> pl.Expr:
    """A group transform: each row gets ``func`` of its group (pandas' ``groupby(by)[x].rank()/transform``).

    Rows with a null key belong to no group and get null, as pandas' groupby drops them.
    """
    require_columns(frame, by, "over")
    keys = [pl.col(name) for name in by]
    data = _nan_to_null(value)
    if func == "rank":
        if _kind(value.dtype) not in ("integer", "float", "boolean", "string", "datetime", "date"):
            raise VaultError(f"over (rank) needs values that sort; {value.label} does not")
        result = data.rank("average").cast(pl.Float64).over(keys)
    elif func == "count":
        result = data.count().cast(pl.Int64).over(keys)
    else:
        if _kind(value.dtype) not in ("integer", "float", "boolean"):
            raise VaultError(f"over ({func}) needs numbers; {value.label} is not numeric")
        number = _as_number(Value(data, value.dtype, value.lineage, value.label))
        result = (number.sum() if func == "sum" else number.cast(pl.Float64).mean()).over(keys)
    valid = pl.all_horizontal([key.is_not_null() for key in keys])
    return pl.when(valid).then(result).otherwise(None)


def schema_of(frame: SourceTable) -> list[dict[str, str]]:
    return [{"name": name, "type": str(frame.arrow_type(name))} for name in frame.columns]


def empty_sources(sources: Mapping[str, SourceTable]) -> dict[str, SourceTable]:
    """The same sources with no rows: evaluating a plan over them gives its schema without touching data."""
    return {
        handle: SourceTable(
            source.empty().lazy(),
            source.lineage,
            source.datasets,
            source.records,
            source.arrow_types,
            source.unique,
            False,
            source.nan_free,
            source.masks,
            source.row_bound(),  # a schema request is refused where a release would be
            source.weights,
        )
        for handle, source in sources.items()
    }
