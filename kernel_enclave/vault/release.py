"""The output policy engine for table results: what of an evaluated plan may leave the vault, and in what shape.

Raw rows never leave. A release plan's root is an aggregation (``aggregate``, ``value_counts``, ``describe``) or a
row ``count``; the vault computes it itself and enforces each dataset owner's :class:`OutputPolicy` on the facts it
computed, never on the text of the result:

- ``allow``: the result kind must be allowed by *every* dataset the plan touches;
- ``never_release``: no released column may be, or derive from, a never_release column (lineage from
  :mod:`kernel_enclave.vault.plan`); filter predicates and join keys do not put a column into the result;
- ``min_group_size``: every released *number* is computed from at least k *contributing records* of each dataset
  (see below); a group below k is dropped, a number below k inside a released table becomes null, and an
  ungrouped scalar (or a whole result) below k raises :class:`PolicyViolation`;
- ``max_rows``: a released table has at most that many rows.

Contributing records. A group's rows are not what a number is computed from: ``where(who, x, None)`` leaves one
non-null value in a group of thousands. So each number counts the distinct source records that contribute to it:
for ``count``, ``min``, ``max`` the records whose value of the column comes from a dataset value (not null, not
NaN, not a literal put there by ``where`` or ``fill_null``); for a group's size, a value count and a row count, the
rows counted. ``sum``, ``mean``, ``std``, ``var``, ``nunique`` and the order statistics also leave out the records
holding the group's most common value: a fill derived from the data but constant (``where(who, x, t.age * 0)``)
contributes nothing an analyst does not already know, so a mean over one real value and many such fills is that
one value. After a join the vault counts distinct source records per dataset, not rows (a join can repeat one
record many times), from the hidden record-id columns the join leaves.

Order statistics (``median``, ``quantile``, describe's quartiles) never release one record's value. The group's
contributing values are sorted and their ranks split into disjoint blocks of k (k = the strictest
``min_group_size`` of the datasets involved; a last partial block merges into the one before it); quantile q is
released as the mean of the block holding rank ``round(q * (n - 1))`` (halves to even). So each is the mean of at
least k records, and the blocks depend only on how many values there are, never on q: nearby quantiles give the
same number. A release may ask for at most :data:`MAX_ORDER_STATISTICS` order statistics of one column
(rule ``release.order_statistics``). ``min`` and ``max`` are released only when at least k records hold the
extreme.

Withheld values are reported one way: a released table carries, in its schema metadata under ``confnb_withheld``,
``{"groups": <groups (or described columns) dropped>, "cells": {<column>: [<row positions of nulled cells>]}}``;
``suppressed`` is the total of both, for the audit log.

For the vault's difference checks, a release can also hand out the record set behind each released number
(``record_sets=True``): per dataset, the sorted ids of the contributing records; a number whose set is its group's
rows is listed once, under its group. Where the table's rows are distinct records of one in-memory dataset, or of
several after a join that meets each record at most once, it can hand out each set's *sketch* instead
(``sketches=True``; see :mod:`.differences`): the sum of the records' hidden weights, two more sums per dataset in
the group-by that computes the numbers (the group's rows, and the rows where a column contributes), less, on a
single table, the weights of the records holding a value k of them share, summed apart. A sketch describes exactly
the set the listed route gives, under the same label. On a single table the blocks of order statistics (a
``describe``'s quartiles) are listed beside the sketches of the release's other numbers, unless a block would be
compared under a key whose numbers add up over groups (then every set is listed).

Several datasets: each rule is checked against each dataset's own policy, so a violation names exactly the datasets
whose rule failed; the released result reports the id of the combined (strictest) policy.

Null group keys are dropped, as pandas' ``groupby(dropna=True)`` default does; NaN counts as null throughout, as it
does in pandas.

Cost. Where each row is a distinct record (no join has repeated records) and the table is in memory, the common
case, the work columns are read once and every statistic and count is a plain column aggregation (Polars' fastest
group-by); a contribution mask costs only where a column has one, or nulls. The most-common-value rule costs
nothing on a column no two records of its dataset share a value of (a load-time fact, kept through filters and
copies): each group's most common value is held by one record. Elsewhere it is screened by a bound: counting the
contributing records on each side of a split of the values (a number against the column's mean) bounds from below
those differing from the most common value; only groups the bound leaves open (a flag, a category) get an exact
count. Order statistics are selections on each group's gathered values, bracketed from a
sorted sample for large groups. Whether k records share a value (record sets) is ruled out by counting (group,
value) pairs into hash bins; only a column where that fails gets the exact count. After a join, or on a scanned
dataset, every aggregation runs as one Polars query that counts distinct records, with the rule screened (from
the first ``2k - 1`` contributing values of each group where rows are records in memory; on a scanned dataset, by
the group's values hashed into a few bins, or, where the release is sketched, by counting in the same pass the rows
holding the values k records of the dataset hold; by the split of the values, per dataset, after a join that meets
each record at most once) and decided exactly where that is inconclusive. Both routes
release the same numbers and record sets.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa  # type: ignore[import-untyped]  # pyarrow ships no type information

from confnb.policy.output import OutputPolicy, strictest
from kernel_enclave.vault import stoppable
from kernel_enclave.vault.combinations import RecordValues, isolating_groups
from kernel_enclave.vault.differences import Sketch, sizes_of
from kernel_enclave.vault.plan import (
    RELEASE_NODES,
    Aggregate,
    ColumnFact,
    Count,
    Describe,
    Lineage,
    SourceTable,
    ValueCounts,
    empty_sources,
    engine_errors,
    evaluate_node,
    lineage_of,
    node_datasets,
    parse_plan,
    quote,
    require_columns,
    schema_of,
    to_arrow,
    uses_window,
)
from kernel_enclave.vault.protocol import PolicyViolation, VaultError

RAW_ROWS = "raw rows are never released; aggregate them (group_by/agg, value_counts, describe, count)"
DESCRIBE_STATISTICS = ("count", "mean", "std", "min", "25%", "50%", "75%", "max")
MAX_ORDER_STATISTICS = 10
WITHHELD_METADATA = b"confnb_withheld"
_NUMERIC_FUNCS = frozenset({"sum", "mean", "std", "var", "median", "quantile"})
_ORDER_FUNCS = frozenset({"median", "quantile"})
# Numbers a constant fill derived from the data could carry one record's value in: the records holding the group's
# most common value do not count towards them.
_MODE_RULE = frozenset({"sum", "mean", "std", "var", "nunique", "median", "quantile"})

# (dataset, label, sorted unique record ids, comparison keys: which other numbers it is compared with)
RecordSet = tuple[str, str, np.ndarray, frozenset[str]]
COUNT_KEY = "count"  # the comparison key of numbers that count records (kernel_enclave.vault.differences)
SUM_PREFIX = "sum:"  # a sum's keys again, under which the groups of a release are added up
_COUNTED = frozenset({COUNT_KEY})


@dataclass(frozen=True)
class Released:
    """A result the policy let through, in the shape the client rebuilds (DataFrame, Series or scalar)."""

    kind: str  # "aggregate" | "row_count" | "schema"
    table: pa.Table | None
    value: int | float | None
    index: tuple[str, ...]  # columns the client sets as the index
    series: bool  # the client squeezes the table to a Series
    suppressed: int  # groups (or described columns) dropped plus cells nulled by min_group_size
    datasets: tuple[str, ...]
    policy_id: str
    # {"groups": int, "cells": {column: [row positions]}}: what min_group_size withheld from ``table``
    withheld: Mapping[str, Any] = field(default_factory=lambda: {"groups": 0, "cells": {}})
    # (dataset, label of the released number, sorted unique record ids), with release(..., record_sets=True)
    record_sets: tuple[RecordSet, ...] = field(default=(), compare=False, repr=False)
    # with release(..., record_sets=True, sketches=True), where the route gives them: the sets' sketches instead
    sketches: tuple[Sketch, ...] | None = field(default=None, compare=False, repr=False)
    # whether it released a sum, mean, count, std or var (or a group's size), and whether one reads a computed column
    adds_up: bool = field(default=False, compare=False)
    reads_computed: bool = field(default=False, compare=False)
    # with release(..., values=True): what each record adds to those numbers, per dataset it read them from
    values: tuple[tuple[str, RecordValues], ...] = field(default=(), compare=False, repr=False)


@dataclass
class _Gathered:
    """What the rule on combinations saw while a release ran (see :func:`_combined`)."""

    asked: bool = False  # gather the values of every release, not only of those the rule searches
    adds_up: bool = False
    reads_computed: bool = False
    values: list[tuple[str, RecordValues]] = field(default_factory=list)


_GATHERED: ContextVar[_Gathered | None] = ContextVar("confnb_vault_gathered", default=None)


# ---------------------------------------------------------------------------------------------------------------
# Rule checks (reused by the model operations)


def _policy(dataset: str, policies: Mapping[str, OutputPolicy], rule: str) -> OutputPolicy:
    policy = policies.get(dataset)
    if policy is None:  # fail closed: a dataset nobody set a policy for releases nothing
        raise PolicyViolation(rule, [dataset], "no output policy is known for this dataset")
    return policy


def require_kind(kind: str, datasets: Iterable[str], policies: Mapping[str, OutputPolicy]) -> str:
    """Every dataset's policy must allow ``kind``; returns the id of the combined (strictest) policy."""
    chosen = sorted(set(datasets))
    if not chosen:
        raise PolicyViolation("release.allow", [], f"a {kind} result must come from a dataset with an output policy")
    failing = [d for d in chosen if d not in policies or not policies[d].allows(kind)]
    if failing:
        raise PolicyViolation("release.allow", failing, f"the output policy does not allow releasing {kind} results")
    return strictest(policies[d] for d in chosen).id


def require_windows_allowed(
    tree: Mapping[str, Any], datasets: Iterable[str], policies: Mapping[str, OutputPolicy], what: str
) -> None:
    """A plan that computes a window function reads rows only where every dataset's owner allows ``window``.

    A window puts a statistic of other records on each row: the difference of two group sums over everyone and over
    everyone but one person is that person's value on every row, which a mean then releases whole and a filter
    turns into one bit per group of a grouped count. No rule on the released number sees it, so exact mode does not
    let windows near a dataset unless its owner accepts that."""
    if not uses_window(tree):
        return
    chosen = sorted(set(datasets))
    failing = [d for d in chosen if d not in policies or not policies[d].allows("window")]
    if failing or not chosen:
        raise PolicyViolation(
            "release.allow",
            failing,
            f"{what}: the output policy does not allow window functions (rank or transform with over): a group "
            "statistic on every row carries other records' values; aggregate with group_by instead",
        )


def check_columns(columns_lineage: Mapping[str, Lineage], policies: Mapping[str, OutputPolicy], what: str) -> None:
    """No column of a result may be, or derive from, a never_release column of any dataset."""
    failing: list[str] = []
    first = ""
    for column, lineage in columns_lineage.items():
        for dataset, source in sorted(lineage):
            policy = policies.get(dataset)
            if policy is not None and source not in policy.never_release:
                continue
            if dataset not in failing:
                failing.append(dataset)
            if not first:
                first = (
                    f"{what}: column {quote(column)} derives from never_release column {quote(source)}"
                    if policy is not None
                    else f"{what}: column {quote(column)} derives from a dataset with no known output policy"
                )
    if failing:
        raise PolicyViolation("release.never_release", sorted(failing), first)


def check_count(n: int, datasets: Iterable[str], policies: Mapping[str, OutputPolicy], what: str) -> None:
    """A result that is one number over ``n`` records (a count, a model's training set) needs n ≥ every k."""
    _check_records(dict.fromkeys(datasets, n), policies, what)


def record_counts(frame: SourceTable) -> dict[str, int]:
    """Records of each dataset behind a table's rows: its row count, or distinct source records after a join.

    A model's training set is "computed from" these records, so ``min_group_size`` checks on it should use them.
    """
    return _records_total(frame, None)


def _check_records(records: Mapping[str, int], policies: Mapping[str, OutputPolicy], what: str) -> None:
    failing = [d for d in sorted(records) if records[d] < _policy(d, policies, "release.min_group_size").min_group_size]
    if failing:
        k = max(policies[d].min_group_size for d in failing)
        raise PolicyViolation(
            "release.min_group_size", failing, f"{what} is computed from fewer than {k} records of the dataset"
        )


def _check_rows(rows: int, datasets: Sequence[str], policies: Mapping[str, OutputPolicy], what: str) -> None:
    failing = []
    for d in datasets:
        limit = _policy(d, policies, "release.max_rows").max_rows
        if limit is not None and rows > limit:
            failing.append(d)
    if failing:
        limit = min(policies[d].max_rows or 0 for d in failing)
        raise PolicyViolation("release.max_rows", failing, f"{what} has more than {limit} rows")


# ---------------------------------------------------------------------------------------------------------------
# Operations


def release(
    plan: Mapping[str, Any],
    sources: Mapping[str, SourceTable],
    policies: Mapping[str, OutputPolicy],
    *,
    record_sets: bool = False,
    sketches: bool = False,
    values: bool = False,
) -> Released:
    """Evaluate a release plan and apply the output policy; raises PolicyViolation when the result is withheld.

    With ``record_sets`` the result also lists the records behind each released number, for difference checks;
    with ``sketches`` too, a release whose route can (see :mod:`.differences`) gives only each set's sketch
    (``Released.sketches``), and ``release(plan, ..., record_sets=True)`` lists the same sets. With ``values``, it
    gives what each record adds to its sums, means, counts, standard deviations and variances (``Released.values``),
    for the rule on combinations across releases; a release the rule on combinations searches gives them anyway.
    """
    gathered = _Gathered(asked=values)
    token = _GATHERED.set(gathered)
    try:
        out = _release(plan, sources, policies, record_sets, sketches)
    finally:
        _GATHERED.reset(token)
    return replace(
        out,
        adds_up=gathered.adds_up,
        reads_computed=gathered.reads_computed,
        values=tuple(gathered.values),
    )


def _release(
    plan: Mapping[str, Any],
    sources: Mapping[str, SourceTable],
    policies: Mapping[str, OutputPolicy],
    record_sets: bool,
    sketches: bool,
) -> Released:
    node = parse_plan(plan)
    datasets = tuple(sorted(node_datasets(node, sources)))
    if not isinstance(node, RELEASE_NODES):
        raise PolicyViolation("release.allow", datasets, RAW_ROWS)
    kind = "row_count" if isinstance(node, Count) else "aggregate"
    policy_id = require_kind(kind, datasets, policies)
    frame = evaluate_node(node.input, sources)
    if isinstance(node, Count):
        _check_records(_records_total(frame, None), policies, "the row count")
        sets = _all_records(frame, "all rows") if record_sets else ()
        return Released("row_count", None, frame.num_rows, (), False, 0, datasets, policy_id, record_sets=sets)
    if isinstance(node, Aggregate):
        try:
            out = _aggregate(node, frame, policies, record_sets, record_sets and sketches)
        except _ListedError:
            if (gathered := _GATHERED.get()) is not None:
                gathered.values.clear()  # gathered again by the second run
            out = _aggregate(node, frame, policies, record_sets, False)
        index, series = node.by, len(node.aggs) == 1
    elif isinstance(node, ValueCounts):
        out = _value_counts(node, frame, policies, record_sets, record_sets and sketches)
        index, series = (node.column,), True
    else:
        out = _describe(node, frame, policies, record_sets, record_sets and sketches)
        index, series = ("statistic",), False
    _check_rows(out.table.num_rows, datasets, policies, "the result")
    withheld = {"groups": out.groups, "cells": out.cells}
    table = out.table.replace_schema_metadata(
        {**(out.table.schema.metadata or {}), WITHHELD_METADATA: json.dumps(withheld, sort_keys=True).encode()}
    )
    suppressed = out.groups + sum(len(rows) for rows in out.cells.values())
    return Released(
        "aggregate",
        table,
        None,
        index,
        series,
        suppressed,
        datasets,
        policy_id,
        withheld,
        tuple(out.record_sets),
        None if out.sketches is None else tuple(out.sketches),
    )


def schema(
    plan: Mapping[str, Any], sources: Mapping[str, SourceTable], policies: Mapping[str, OutputPolicy]
) -> list[dict[str, str]]:
    """Names and types of a row-level plan's result, computed over zero rows so no data is touched."""
    node = parse_plan(plan)
    require_kind("schema", node_datasets(node, sources), policies)
    return schema_of(evaluate_node(node, empty_sources(sources)))


def schema_table(
    plan: Mapping[str, Any], sources: Mapping[str, SourceTable], policies: Mapping[str, OutputPolicy]
) -> pa.Table:
    """A table with no rows and the result's schema, for the analyst's mock data (``SealedTable.mock``).

    Rebuilt from the types alone: a zero-row slice of a dictionary column still carries its dictionary (the
    category values), and a schema's metadata can carry pandas' index values; neither may leave with the schema.
    """
    node = parse_plan(plan)
    require_kind("schema", node_datasets(node, sources), policies)
    found = evaluate_node(node, empty_sources(sources))
    return pa.schema([pa.field(name, bare_type(found.arrow_type(name)), True) for name in found.columns]).empty_table()


def bare_type(arrow_type: pa.DataType) -> pa.DataType:
    """``arrow_type`` with every nested field rebuilt without its metadata."""

    def field(child: pa.Field) -> pa.Field:
        return pa.field(child.name, bare_type(child.type), child.nullable)

    if pa.types.is_struct(arrow_type):
        return pa.struct([field(arrow_type.field(i)) for i in range(arrow_type.num_fields)])
    if pa.types.is_map(arrow_type):
        return pa.map_(field(arrow_type.key_field), field(arrow_type.item_field), arrow_type.keys_sorted)
    if pa.types.is_fixed_size_list(arrow_type):
        return pa.list_(field(arrow_type.value_field), arrow_type.list_size)
    if pa.types.is_large_list(arrow_type):
        return pa.large_list(field(arrow_type.value_field))
    if pa.types.is_list(arrow_type):
        return pa.list_(field(arrow_type.value_field))
    if pa.types.is_dictionary(arrow_type):
        return pa.dictionary(arrow_type.index_type, bare_type(arrow_type.value_type), arrow_type.ordered)
    return arrow_type


def preview(
    plan: Mapping[str, Any], sources: Mapping[str, SourceTable], policies: Mapping[str, OutputPolicy]
) -> dict[str, Any]:
    """What may be said about a row-level plan's result: its columns and row count, each only if allowed."""
    node = parse_plan(plan)
    datasets = node_datasets(node, sources)
    result: dict[str, Any] = {}
    withheld: dict[str, str] = {}
    try:
        result["columns"] = schema(plan, sources, policies)
    except PolicyViolation as exc:
        withheld["columns"] = str(exc)
    try:
        require_kind("row_count", datasets, policies)
        frame = evaluate_node(node, sources)
        _check_records(_records_total(frame, None), policies, "the row count")
        result["rows"] = frame.num_rows
    except PolicyViolation as exc:
        withheld["rows"] = str(exc)
    withheld["values"] = RAW_ROWS
    result["withheld"] = withheld
    return result


# ---------------------------------------------------------------------------------------------------------------
# Record counting


def _distinct(column: pl.Expr) -> pl.Expr:
    return column.drop_nulls().n_unique().cast(pl.Int64)


def _records_total(frame: SourceTable, mask: pl.Expr | None) -> dict[str, int]:
    """Records of each dataset behind the rows (where ``mask`` is true): distinct source records after a join."""
    if frame.records is None:
        if mask is None:
            return dict.fromkeys(frame.datasets, frame.num_rows)
        with engine_errors("count", []):
            rows = frame.collect(frame.data.select(mask.fill_null(False).sum())).item()
        return dict.fromkeys(frame.datasets, int(rows or 0))
    exprs = [
        _records_of(frame, c, pl.col(c) if mask is None else pl.col(c).filter(mask.fill_null(False))).alias(f"r{i}")
        for i, (_, c) in enumerate(frame.records)
    ]
    with engine_errors("count", []):
        row = frame.collect(frame.data.select(exprs)).row(0)
    records: dict[str, int] = {}
    for (dataset, _), count in zip(frame.records, row, strict=True):
        records[dataset] = min(records.get(dataset, int(count)), int(count))
    return records


def _records_of(frame: SourceTable, hidden: str, ids: pl.Expr) -> pl.Expr:
    """Distinct record ids; where each record is known to appear once (:attr:`SourceTable.unique`), the ids."""
    return ids.count().cast(pl.Int64) if hidden in frame.unique else _distinct(ids)


def _all_records(frame: SourceTable, label: str) -> tuple[RecordSet, ...]:
    """The records behind every row of a table, per dataset (none for a table without stable record ids)."""
    if frame.records is None:
        return ()
    with engine_errors("count", []):
        ids = frame.collect(frame.data.select(pl.col(name) for _, name in frame.records))
    found: dict[str, list[np.ndarray]] = {}
    for dataset, name in frame.records:
        found.setdefault(dataset, []).append(ids.get_column(name).drop_nulls().to_numpy())
    sets: list[RecordSet] = []
    for dataset, parts in sorted(found.items()):
        union = _union(parts)
        sets += [(dataset, label, union, _COUNTED), *_sides(dataset, label, parts, union, _COUNTED)]
    return tuple(sets)


def _union(parts: Sequence[np.ndarray]) -> np.ndarray:
    joined = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return np.unique(joined.astype(np.int64, copy=False))


def _sides(dataset: str, label: str, parts: Sequence[np.ndarray], union: np.ndarray, keys: Set[str]) -> list[RecordSet]:
    """Where a dataset is on several sides of a join (a self-join), each side's records on their own, beside their
    union. One side can carry a few chosen records onto every row of the other (the target and a cover, joined on a
    key of one value, a filter on the carried value): every number then rests on thousands of records, but only the
    chosen side's records, compared on their own, show two numbers a record apart."""
    if len(parts) < 2:
        return []
    found: list[RecordSet] = []
    for side, part in enumerate(parts, 1):
        ids = np.unique(part.astype(np.int64, copy=False))
        if ids.size and ids.size != union.size:
            found.append((dataset, f"{label} (side {side})", ids, frozenset(keys)))
    return found


def _weights(frame: SourceTable) -> tuple[str, int] | None:
    """The hidden weight column of the table's records and its count width, where the table has rows that are
    distinct records of one dataset and kept its weights (see :mod:`.differences`): what a sketch sums."""
    if frame.records is None or not _rows_are_records(frame):
        return None
    found = frame.weights.get(frame.records[0][1])
    if found is None or found[0] in frame.lineage or found[0] not in frame.schema.names():
        return None
    return found


def _rows_are_records(frame: SourceTable) -> bool:
    """Whether every row is a distinct record of each dataset (no join has repeated or left out records)."""
    if frame.records is None:
        return True
    return len(frame.records) == 1 and frame.records[0][1] in frame.unique


def _count_exprs(frame: SourceTable, prefix: str, mask: pl.Expr | None, present_in: str = "r") -> list[pl.Expr]:
    """Per dataset occurrence, the distinct records among a group's rows where ``mask`` (null-free) holds.

    ``present_in``: the work columns (``r0``... the record ids; ``w0``... the weights, where the ids are not read)
    that are null exactly where an occurrence had no match; an occurrence whose records may repeat reads its ids."""
    if frame.records is None:
        rows = pl.len() if mask is None else mask.sum()
        return [rows.alias(f"{prefix}0")]
    exprs = []
    for i, (_, hidden) in enumerate(frame.records):
        ids = pl.col(f"r{i}")
        if hidden in frame.unique:
            present = pl.col(f"{present_in}{i}").is_not_null()
            counted = (present if mask is None else present & mask).sum()
        else:
            counted = _distinct(ids if mask is None else ids.filter(mask))
        exprs.append(counted.alias(f"{prefix}{i}"))
    return exprs


def _counts(frame: SourceTable, grouped: pl.DataFrame, prefix: str) -> dict[str, np.ndarray]:
    """Per group, the records of each dataset (the fewest over a dataset's occurrences in a self-join)."""
    if frame.records is None:
        rows = grouped.get_column(f"{prefix}0").fill_null(0).to_numpy()
        return dict.fromkeys(frame.datasets, rows)
    records: dict[str, np.ndarray] = {}
    for i, (dataset, _) in enumerate(frame.records):
        counts = grouped.get_column(f"{prefix}{i}").fill_null(0).to_numpy()
        records[dataset] = counts if dataset not in records else np.minimum(records[dataset], counts)
    return records


def _min_sizes(frame: SourceTable, policies: Mapping[str, OutputPolicy]) -> dict[str, int]:
    return {d: _policy(d, policies, "release.min_group_size").min_group_size for d in sorted(frame.datasets)}


def _check_order_statistics(asked: Iterable[tuple[str | None, str]], datasets: Iterable[str], what: str) -> None:
    """At most MAX_ORDER_STATISTICS order statistics of one column per release, checked before any row is read."""
    per_column: dict[str, int] = {}
    for column, func in asked:
        if column is not None and func in _ORDER_FUNCS:
            per_column[column] = per_column.get(column, 0) + 1
    for column, count in per_column.items():
        if count > MAX_ORDER_STATISTICS:
            raise PolicyViolation(
                "release.order_statistics",
                sorted(datasets),
                f"{what}: more than {MAX_ORDER_STATISTICS} medians or quantiles of column {quote(column)} in one "
                "release",
            )


# ---------------------------------------------------------------------------------------------------------------
# Work columns


def _key_expr(frame: SourceTable, name: str) -> pl.Expr:
    """A group key as pandas sees it: decoded, NaN as null, and -0.0 the same group as 0.0."""
    dtype = frame.dtype(name)
    column = pl.col(name)
    if isinstance(dtype, pl.Categorical | pl.Enum):
        return column.cast(pl.String)
    if dtype.is_float():
        column = column if name in frame.nan_free else column.fill_nan(None)
        return pl.when(column == 0).then(pl.lit(0.0, dtype)).otherwise(column)
    return column


def _group_key(frame: SourceTable, name: str) -> pl.Expr:
    """A group key: as :func:`_key_expr`, but a categorical column (a coded string column, or an owner's dictionary
    column) keeps its codes, which group as their strings do and sort as them, twice as fast as the strings; a
    released key is a string again (:func:`kernel_enclave.vault.plan.to_arrow`)."""
    return pl.col(name) if isinstance(frame.dtype(name), pl.Categorical) else _key_expr(frame, name)


def _present_expr(frame: SourceTable, name: str) -> pl.Expr:
    """A column as a count reads it: NaN is missing, as pandas counts."""
    column = pl.col(name)
    return column.fill_nan(None) if frame.dtype(name).is_float() and name not in frame.nan_free else column


def _value_expr(frame: SourceTable, name: str, func: str) -> pl.Expr:
    """An input of a numeric aggregation: booleans count as 0/1 (as in pandas), decimals as floats."""
    dtype = frame.dtype(name)
    column = pl.col(name)
    if dtype == pl.Boolean:
        return column.cast(pl.Int64)
    if isinstance(dtype, pl.Decimal):
        return column.cast(pl.Float64)
    if dtype.is_integer():
        return column
    if dtype.is_float():
        return column if name in frame.nan_free else column.fill_nan(None)
    shown = frame.arrow_type(name)
    if pa.types.is_dictionary(shown):
        shown = shown.value_type
    raise VaultError(f"aggregate: {func} needs a numeric column; {quote(name)} is {shown}")


def _work_expr(frame: SourceTable, name: str, kind: str, func: str) -> pl.Expr:
    if kind == "number":
        return _value_expr(frame, name, func)
    if kind == "present":
        return _present_expr(frame, name)
    if kind == "float":
        as_float = pl.col(name).cast(pl.Float64)
        return as_float if name in frame.nan_free else as_float.fill_nan(None)
    return _key_expr(frame, name)


def _floating(frame: SourceTable, name: str, kind: str) -> bool:
    dtype = frame.dtype(name)
    return kind == "float" or (kind == "number" and (dtype.is_float() or isinstance(dtype, pl.Decimal)))


def _normal(value: pl.Expr, floating: bool) -> pl.Expr:
    """Values as the most-common-value rule compares them: -0.0 is 0.0, so a fill of both is still one value."""
    return value + 0.0 if floating else value  # IEEE: -0.0 + 0.0 is 0.0


_BINS = 8
_BIN_SEED = 0x636E62  # fixed: a group's bins depend on its values only
_BIN_BITS = 64 // _BINS  # a bin's count in a packed sum of bins
_COMPARED_OFTEN = 32  # up to this many values k records hold are binned by comparisons, more by a lookup


def _streamed_off_mode(
    frame: SourceTable,
    work: list[pl.Expr],
    key_names: list[str],
    grouped: pl.DataFrame,
    undecided: np.ndarray[Any, Any],
    mask: pl.Expr,
    v: str,
    floating: bool,
) -> np.ndarray[Any, Any]:
    """Per group of ``grouped``, the contributing records off the group's most common value, in two streaming
    group-bys (count each value, then keep all but the largest count), for a scanned dataset whose rows are records."""
    value = _normal(pl.col(v), floating).alias("\x01value")
    rows = _work_frame(frame, work).filter(mask)
    if key_names:  # only the groups the bins left undecided: few distinct values each, so few pairs to count
        keys = grouped.filter(pl.Series(undecided, dtype=pl.Boolean)).select(key_names).lazy()
        rows = rows.join(keys, on=key_names, how="semi", nulls_equal=True)
    off = pl.col(_COUNT).sum() - pl.col(_COUNT).max()
    return _per_group_of_values(frame, rows, key_names, grouped, value, off)


def _often_binned(value: pl.Expr, often: pl.Series) -> pl.Expr:
    """Each row's field in the packed bins of the values k records hold (see :func:`_numbers`): value i of
    ``often`` adds 1 to bin ``i % _BINS``, any other value 0. A few values are compared one by one, bin by bin (the
    comparisons run vectorised, several times faster than a hash lookup per row); many are looked up."""
    if often.len() > _COMPARED_OFTEN:
        fields = [1 << (_BIN_BITS * (i % _BINS)) for i in range(often.len())]
        return value.replace_strict(often, fields, default=0, return_dtype=pl.UInt64)
    values = often.to_list()
    bins = [
        pl.any_horizontal([value == pl.lit(held, often.dtype) for held in values[b::_BINS]]).cast(pl.UInt64)
        * pl.lit(1 << (_BIN_BITS * b), pl.UInt64)
        for b in range(min(_BINS, len(values)))
    ]
    return pl.sum_horizontal(bins)


def _often_most(grouped: pl.DataFrame, v: str, bins: int) -> np.ndarray[Any, Any]:
    """Per group, at least the records holding any one of the values k records of the dataset hold, from the counts
    a scanned release made (see :func:`_numbers`): its largest bin, or all its rows holding them where a bin may
    have carried."""
    if not bins:
        return np.zeros(grouped.height, dtype=np.int64)
    rows = grouped.get_column(f"{v}_often").fill_null(0).to_numpy().astype(np.int64)
    packed = grouped.get_column(f"{v}_often_bins").fill_null(0).to_numpy().astype(np.uint64)
    shifts = (np.arange(bins) * _BIN_BITS).astype(np.uint64)
    largest = ((packed[:, None] >> shifts) & np.uint64((1 << _BIN_BITS) - 1)).max(axis=1).astype(np.int64)
    return np.where(rows < 1 << _BIN_BITS, largest, rows)


_COUNT = "\x01n"  # a (group, value) pair's records, in the tallies of _per_group_of_values


def _per_group_of_values(
    frame: SourceTable,
    rows: pl.LazyFrame,
    key_names: Sequence[str],
    grouped: pl.DataFrame,
    value: pl.Expr,
    per_group: pl.Expr,
) -> np.ndarray[Any, Any]:
    """``per_group`` over each group's value counts (column ``_COUNT``: the rows holding each value), in the order
    of ``grouped``'s groups (0 for a group with no rows): two group-bys, which stream over a scanned dataset."""
    tallies = rows.group_by([*key_names, value]).agg(pl.len().cast(pl.Int64).alias(_COUNT))
    with engine_errors("aggregate", []):
        if not key_names:
            found = frame.collect(tallies.select(per_group.alias("\x01found")))
            return np.array([int(found.item() or 0)] * grouped.height, dtype=np.int64)
        counted = frame.collect(tallies.group_by(key_names).agg(per_group.alias("\x01found")))
    aligned = grouped.select(key_names).join(counted, on=key_names, how="left", nulls_equal=True, maintain_order="left")
    return aligned.get_column("\x01found").fill_null(0).to_numpy().astype(np.int64)


def _work_frame(frame: SourceTable, exprs: list[pl.Expr], records_too: bool = True) -> pl.LazyFrame:
    """The columns an aggregation reads, with the record ids (``r0``...) of each dataset occurrence (unless the
    caller reads none: ``records_too`` false)."""
    records = [pl.col(column).alias(f"r{i}") for i, (_, column) in enumerate(frame.records or ())]
    records = records if records_too else []
    if not exprs and not records:  # a count over no columns: something to count rows over
        return frame.data.with_row_index("\x01rows").select("\x01rows")
    return frame.data.select([*exprs, *records])


def _listed(expr: pl.Expr, grouped: bool) -> pl.Expr:
    """A group's values as one list (a group-by gathers a column into a list by itself)."""
    return expr if grouped else expr.implode()


def _block(values: pl.Expr, k: int, q: float) -> tuple[pl.Expr, pl.Expr, pl.Expr]:
    """The block of quantile ``q`` among a group's values: its mean, and the first rank and the length of the block
    (to pick its records with a stable sort by value, ties in row order as an ordinal rank has them).

    Ranks 0..n-1 are split into blocks of k; the last block also takes the remainder (all of them when n < k). One
    sort of the group's values serves every quantile of the column (Polars computes the common sort once).
    """
    n = values.len().cast(pl.Int64)
    blocks = pl.max_horizontal(n // k, pl.lit(1, pl.Int64))
    nearest = ((n - 1).cast(pl.Float64) * q).round(0, mode="half_to_even").cast(pl.Int64)
    block = pl.min_horizontal(nearest // k, blocks - 1)
    start = block * k
    length = pl.when(block == blocks - 1).then(n - start).otherwise(pl.lit(k, pl.Int64))
    return values.sort().slice(start, length).mean(), start, length


# ---------------------------------------------------------------------------------------------------------------
# Numbers per group


@dataclass(frozen=True)
class _Cell:
    """One requested number per group."""

    name: str  # its column in the grouped frame
    shown: str  # how a record set's label and a refusal name it
    column: str | None  # None: the group's rows
    func: str  # an aggregation; "rows" for the group's size
    kind: str  # the column's work form: "number", "present", "plain" or "float"
    q: float | None = None


@dataclass
class _Numbers:
    grouped: pl.DataFrame  # k0... (the keys), then one column per cell
    group_records: dict[str, np.ndarray]  # per dataset, the records of each group
    kept: np.ndarray  # groups with at least k records of every dataset
    failing: dict[str, dict[str, np.ndarray]]  # cell -> dataset -> groups where it has fewer than k records
    record_sets: list[RecordSet]
    sketches: list[Sketch] | None = None  # instead of the record sets, where asked for and the route gives them
    combined: frozenset[str] = frozenset()  # cells withheld because a combination of them rests on few records

    def withheld(self, cell: str) -> np.ndarray:
        bad = np.zeros(self.grouped.height, dtype=bool)
        for groups in self.failing[cell].values():
            bad |= groups
        return bad


@dataclass
class _Out:
    table: pa.Table
    groups: int  # groups (or described columns) dropped
    cells: dict[str, list[int]]  # column -> row positions of nulled cells
    record_sets: list[RecordSet]
    sketches: list[Sketch] | None = None


def _numbers(
    frame: SourceTable,
    by: Sequence[str],
    cells: Sequence[_Cell],
    policies: Mapping[str, OutputPolicy],
    want_sets: bool,
    what: str,
    subjects: Sequence[str],
    sketch: bool = False,
) -> _Numbers:
    """Every cell per group in one Polars group-by, with the records that contribute to each (or, with ``sketch``,
    their sketches where the route gives them)."""
    if _direct_route(frame):
        return _numbers_direct(frame, by, cells, policies, want_sets, what, subjects, sketch)
    ks = _min_sizes(frame, policies)
    k = max(ks.values(), default=1)
    grouped_by = bool(by)
    key_names = [f"k{i}" for i in range(len(by))]
    work = [_group_key(frame, name).alias(key) for key, name in zip(key_names, by, strict=True)]
    masks: dict[str, str] = {}  # column -> its contributing-rows work column
    values: dict[tuple[str, str], str] = {}  # (column, kind) -> work column
    value_exprs: dict[str, pl.Expr] = {}  # work column -> its expression
    present: set[str] = set()  # the work columns counted by a flag of their presence (Polars' fastest route)
    often_bins: dict[str, int] = {}  # scanned: work column -> bins of the values k records hold, counted per group
    for cell in cells:
        if cell.column is None:
            continue
        if cell.column not in masks:
            masks[cell.column] = f"m{len(masks)}"
            work.append(frame.contributes(cell.column).alias(masks[cell.column]))
        if (cell.column, cell.kind) not in values:
            values[(cell.column, cell.kind)] = f"v{len(values)}"
            value_exprs[values[(cell.column, cell.kind)]] = _work_expr(frame, cell.column, cell.kind, cell.func)
            work.append(value_exprs[values[(cell.column, cell.kind)]].alias(values[(cell.column, cell.kind)]))
        in_work = values[(cell.column, cell.kind)]
        if cell.func == "count" and in_work not in present:
            present.add(in_work)
            work.append(value_exprs[in_work].is_not_null().alias(f"{in_work}_n"))

    def mask_of(column: str, v: str) -> pl.Expr:
        return pl.col(masks[column]) & pl.col(v).is_not_null()

    sets = want_sets and frame.records is not None
    simple = _rows_are_records(frame)
    occurrences = list(enumerate(frame.records or ()))
    weights = _joined_weights(frame) if sets and sketch and not any(c.func in _ORDER_FUNCS for c in cells) else None
    sketching = weights is not None
    listing = sets and not sketching
    # Sketching, every occurrence holds each record once and its weights mark where it matched: no id is read.
    present_in = "w" if sketching else "r"
    # The most-common-value rule screened from a few values per group, unless the record sets are listed (then the
    # holders of a value k records share are listed too): sketches ask only whether there is such a value.
    screen = simple and not listing
    for i, (weight, _) in enumerate(weights or ()):
        work.append(pl.col(weight).alias(f"w{i}"))
    moded = {values[(c.column, c.kind)] for c in cells if c.column is not None and c.func in _MODE_RULE}
    split = _split_screened(frame, values, moded, simple or listing)
    if split:
        schema = _work_frame(frame, work, records_too=False).collect_schema()
        for (column, kind), v in values.items():
            if v in split:
                normal = _normal(value_exprs[v], _floating(frame, column, kind))
                work.append(_screen_bit(normal, schema[v]).fill_null(False).alias(f"{v}_b"))

    def mode_exprs(column: str, kind: str, v: str) -> list[pl.Expr]:
        mask = mask_of(column, v)
        value = _normal(pl.col(v), _floating(frame, column, kind))
        common = value.filter(mask).mode().min()
        holders = mask & (value == common).fill_null(False)
        exprs = [
            *_count_exprs(frame, f"{v}_nm", mask & ~holders, present_in),
            value.filter(mask).unique_counts().max().cast(pl.Int64).alias(f"{v}_fmax"),
        ]
        if listing:
            listed.extend(
                _listed(pl.col(f"r{i}").filter(holders), grouped_by).alias(f"{v}_hold{i}") for i, _ in occurrences
            )
        return exprs

    # Sketching, the records counted are the low bits of their weights' sum (see .differences): no count of its own.
    exprs: list[pl.Expr] = [pl.len().alias("rows"), *([] if sketching else _count_exprs(frame, "g", None, present_in))]
    # The record sets' id lists: gathered by a group-by of their own after the numbers', so that an interrupt,
    # which Polars sees between operators, is not kept waiting by both at once.
    listed: list[pl.Expr] = []
    sorted_ids: set[str] = set()
    if listing:
        listed += [_listed(pl.col(f"r{i}"), grouped_by).alias(f"g_ids{i}") for i, _ in occurrences]
    if sketching:  # each occurrence's weights (null where its side did not match) over the group's rows
        exprs += [pl.col(f"w{i}").sum().alias(f"g_w{i}") for i, _ in occurrences]
    for (column, kind), v in values.items():
        mask = mask_of(column, v)
        exprs += [] if sketching else _count_exprs(frame, f"{v}_c", mask, present_in)
        if sketching:  # (0 where not: a sum over a column with no nulls added stays on Polars' fastest route)
            exprs += [pl.when(mask).then(pl.col(f"w{i}")).otherwise(0).sum().alias(f"{v}_w{i}") for i, _ in occurrences]
        if listing:
            for i, (_, hidden) in occurrences:
                # Records known unique: the few rows left out are cheaper to gather than the many counted.
                left_out = hidden in frame.unique
                ids = pl.col(f"r{i}").filter(~mask if left_out else mask)
                listed.append(_listed(ids, grouped_by).alias(f"{v}_{'out' if left_out else 'in'}{i}"))
        if v not in moded:
            continue
        if screen and frame.streaming:
            # A group's first values would take the streaming engine off its streaming path (the whole dataset in
            # memory). Sums of elementwise inputs only (a distinct count or a filter inside an aggregation would
            # make the streaming engine hold the dataset in memory).
            normal = _normal(pl.col(v), _floating(frame, column, kind))
            exprs += [mask.sum().cast(pl.Int64).alias(f"{v}_len")]
            often = _held_often(frame, column, kind, k) if sketching else None
            if often is not None:
                # The values k records of the dataset hold (found for the sketches anyway, and kept): no group holds
                # any other value k times. A group's rows holding them are counted, and counted again in a few bins
                # of these values (one value a bin where there are few), 8 bits a bin in one 64-bit sum: where a
                # group has fewer than 256 such rows no bin carries into the next. Its most common value is then
                # held by at most its largest bin's rows (else all of them), or k - 1; the same counts tell the
                # sketches whether a value k records share is left out of a set (see _held_k_times), with no
                # second pass over the dataset. Each row's bin is a work column: inside the aggregation, the lookup
                # and the mask would cost the streaming engine far more.
                if not often.is_empty():  # as the work column holds them (_value_fact: a cast to float merges none)
                    dtype = _work_frame(frame, work, records_too=False).collect_schema()[v]
                    often = often.cast(dtype, strict=False).drop_nulls().unique(maintain_order=True)
                often_bins[v] = min(often.len(), _BINS)
                if often_bins[v]:
                    normal_value = _normal(value_exprs[v], _floating(frame, column, kind))
                    binned = _often_binned(normal_value, often)
                    held = frame.contributes(column) & value_exprs[v].is_not_null()
                    work.append(pl.when(held).then(binned).otherwise(0).fill_null(0).alias(f"{v}_of"))
                    exprs += [
                        (pl.col(f"{v}_of") > 0).sum().cast(pl.Int64).alias(f"{v}_often"),
                        pl.col(f"{v}_of").sum().alias(f"{v}_often_bins"),
                    ]
            else:
                # The group's values hashed into a few bins. The most common value's records all fall into one bin,
                # so the records outside the largest bin are off it.
                hashed = normal.hash(_BIN_SEED) % _BINS
                exprs += [(mask & (hashed == b)).sum().cast(pl.Int64).alias(f"{v}_bin{b}") for b in range(_BINS)]
        elif screen:
            contributing = pl.col(v).filter(mask)
            head = _normal(contributing.head(2 * k - 1), _floating(frame, column, kind))
            exprs += [
                contributing.len().cast(pl.Int64).alias(f"{v}_len"),
                head.unique_counts().max().cast(pl.Int64).alias(f"{v}_head"),
            ]
        elif v in split:
            exprs += _count_exprs(frame, f"{v}_h", mask & pl.col(f"{v}_b"), present_in)
            if sketching and _held_often(frame, column, kind, k) is None:
                # Whether a group holds a value k times decides what its sets leave out (see _held_k_times): with
                # no load-time fact to tell, its largest value count, in the same pass (half the exact rule's cost).
                normal = _normal(pl.col(v), _floating(frame, column, kind))
                exprs.append(normal.filter(mask).unique_counts().max().cast(pl.Int64).alias(f"{v}_fmax"))
        else:
            exprs += mode_exprs(column, kind, v)
    for cell in cells:
        if cell.column is None:
            exprs.append(pl.len().alias(cell.name))
            continue
        v = values[(cell.column, cell.kind)]
        value, mask = pl.col(v), mask_of(cell.column, v)
        func = cell.func
        if func == "count":
            exprs.append(pl.col(f"{v}_n").sum().alias(cell.name))
        elif func == "nunique":
            exprs.append(_distinct(value).alias(cell.name))
        elif func == "sum":
            dtype = frame.dtype(cell.column)
            widen = (dtype.is_integer() and dtype != pl.UInt64) or dtype == pl.Boolean
            exprs.append((value.cast(pl.Int64) if widen else value).sum().alias(cell.name))
        elif func == "mean":
            exprs.append(value.cast(pl.Float64).mean().alias(cell.name))
        elif func in ("std", "var"):
            as_float = value.cast(pl.Float64)
            exprs.append((as_float.std(ddof=1) if func == "std" else as_float.var(ddof=1)).alias(cell.name))
        elif func in _ORDER_FUNCS:
            contributing = value.cast(pl.Float64).filter(mask)
            mean, start, length = _block(contributing, k, 0.5 if cell.q is None else cell.q)
            exprs.append(mean.alias(cell.name))
            for i, (_, _hidden) in occurrences:
                ids = pl.col(f"r{i}").filter(mask).sort_by(contributing, maintain_order=True).slice(start, length)
                if not simple:  # a join can repeat a record within a block: count the block's records
                    exprs.append(_distinct(ids).alias(f"{cell.name}_b{i}"))
                if listing and f"{v}_sorted{i}" not in sorted_ids:  # one sort per column: each block is a slice of it
                    sorted_ids.add(f"{v}_sorted{i}")
                    by_value = pl.col(f"r{i}").filter(mask).sort_by(contributing, maintain_order=True)
                    listed.append(_listed(by_value, grouped_by).alias(f"{v}_sorted{i}"))
        else:  # min, max: also the records that hold the extreme, so a lone one is withheld
            extreme = value.min() if func == "min" else value.max()
            exprs.append(extreme.alias(cell.name))
            exprs += _count_exprs(frame, f"{cell.name}_t", mask & (value == extreme).fill_null(False), present_in)

    released = {cell.name for cell in cells if cell.column is not None and cell.func != "count"}

    def tallied(found: pl.DataFrame) -> pl.DataFrame:
        """Counts as Int64, cast after the group-by: a cast inside an aggregation takes Polars off its fastest
        route (a released number keeps its type)."""
        index = pl.get_index_type()
        counts = [name for name, dtype in found.schema.items() if dtype == index and name not in released]
        return found.with_columns(pl.col(counts).cast(pl.Int64))

    def run(aggregations: list[pl.Expr]) -> pl.DataFrame:
        with engine_errors(what, subjects):
            lazy = _work_frame(frame, work, records_too=present_in == "r")
            if key_names:
                # Rows with a null key form groups of their own, dropped afterwards: cheaper than filtering rows
                # (dropped from the collected groups, or Polars would push the filter down to the rows).
                found = frame.collect(lazy.group_by(key_names).agg(aggregations).sort(key_names, nulls_last=True))
                return tallied(found.drop_nulls(key_names))
            try:
                return tallied(frame.collect(lazy.select(aggregations)))
            except pl.exceptions.ShapeError:
                if not frame.streaming:
                    raise
            # Polars' streaming engine cannot always run a select of whole-column aggregations of different lengths
            # (a filtered input next to a plain one); the same aggregations over one group can. The key is a
            # column's hash times zero, not a literal, which Polars would group by in memory. No rows make no
            # group, so the one row a select gives is then computed over the (empty) first zero rows.
            whole = "\x01whole"
            key = (pl.first().hash(0) * 0).alias(whole)
            found = frame.collect(lazy.with_columns(key).group_by(whole).agg(aggregations).drop(whole))
            return tallied(found if found.height else frame.collect(lazy.head(0).select(aggregations)))

    grouped = run(exprs)
    if sketching and weights is not None:
        grouped = grouped.hstack(
            [
                pl.Series(f"{prefix}{i}", sizes_of(grouped.get_column(f"{total}{i}").to_numpy(), bits))
                for i, (_, bits) in enumerate(weights)
                for prefix, total in [("g", "g_w"), *((f"{v}_c", f"{v}_w") for v in values.values())]
            ]
        )
    if listed:
        stoppable.check()
        gathered = run(listed)
        if gathered.height != grouped.height:  # the same groups in the same order, or no record sets
            raise VaultError(f"{what}: the record sets do not match the groups")
        grouped = grouped.hstack(gathered.drop(key_names))
    group_records = _counts(frame, grouped, "g")
    kept = np.ones(grouped.height, dtype=bool)
    for dataset, counts in group_records.items():
        kept &= counts >= ks[dataset]

    nonmode: dict[str, dict[str, np.ndarray]] = {}
    if screen:
        inconclusive: list[tuple[str, str, str]] = []
        for (column, kind), v in values.items():
            if v not in moded:
                continue
            n = grouped.get_column(f"{v}_len").fill_null(0).to_numpy()
            if frame.streaming and v in often_bins:
                most = _often_most(grouped, v, often_bins[v])
                screened = np.where(n - np.maximum(most, k - 1) >= k, n, -1)
            elif frame.streaming:
                bins = [grouped.get_column(f"{v}_bin{b}").fill_null(0).to_numpy() for b in range(_BINS)]
                screened = np.where(n - np.max(bins, axis=0) >= k, n, -1)
            else:
                most = grouped.get_column(f"{v}_head").fill_null(0).to_numpy()
                small = n < 2 * k - 1  # the head is the whole group: exact
                screened = np.where(small, n - most, np.where(most < k, n, -1))
            nonmode[v] = {d: screened for d in group_records}
            if ((screened < 0) & kept).any():
                inconclusive.append((column, kind, v))
        if inconclusive and frame.streaming:
            for column, kind, v in inconclusive:
                floating = _floating(frame, column, kind)
                undecided = next(iter(nonmode[v].values())) < 0
                off_mode = _streamed_off_mode(
                    frame, work, key_names, grouped, undecided, mask_of(column, v), v, floating
                )
                nonmode[v] = {d: np.where(was < 0, off_mode, was) for d, was in nonmode[v].items()}
        elif inconclusive:
            exact = run([e for column, kind, v in inconclusive for e in mode_exprs(column, kind, v)])
            for _, _, v in inconclusive:
                counted = _counts(frame, exact, f"{v}_nm")
                nonmode[v] = {d: np.where(was < 0, counted[d], was) for d, was in nonmode[v].items()}
    else:
        inconclusive = []
        for (column, kind), v in values.items():
            if v in split:
                # min(h, n - h) records on the smaller side of the split differ from the most common value
                screened_of: dict[str, np.ndarray] = {}
                for i, (dataset, _) in occurrences:
                    n = grouped.get_column(f"{v}_c{i}").fill_null(0).to_numpy()
                    high = grouped.get_column(f"{v}_h{i}").fill_null(0).to_numpy()
                    # a number short of records is withheld whatever its most common value
                    screened = np.where((np.minimum(high, n - high) >= k) | (n < ks[dataset]), n, -1)
                    was = screened_of.get(dataset)
                    screened_of[dataset] = (
                        screened if was is None else np.where(was < 0, was, np.minimum(was, screened))
                    )
                nonmode[v] = screened_of
                if any(((screened < 0) & kept).any() for screened in screened_of.values()):
                    inconclusive.append((column, kind, v))
            elif v in moded:
                nonmode[v] = _counts(frame, grouped, f"{v}_nm")
        if inconclusive:
            exact = run([e for column, kind, v in inconclusive for e in mode_exprs(column, kind, v)])
            for _, _, v in inconclusive:
                counted = _counts(frame, exact, f"{v}_nm")
                nonmode[v] = {d: np.where(was < 0, counted[d], was) for d, was in nonmode[v].items()}

    failing: dict[str, dict[str, np.ndarray]] = {}
    for cell in cells:
        if cell.column is None:
            failing[cell.name] = {}
            continue
        v = values[(cell.column, cell.kind)]
        short = {d: counts < ks[d] for d, counts in _counts(frame, grouped, f"{v}_c").items()}
        extra: list[dict[str, np.ndarray]] = []
        if cell.func in _MODE_RULE:
            # None differing from the most common value: every contributing record holds the released value.
            extra.append({d: np.where(counts == 0, np.iinfo(np.int64).max, counts) for d, counts in nonmode[v].items()})
        if cell.func in ("min", "max"):
            extra.append(_counts(frame, grouped, f"{cell.name}_t"))
        if cell.func in _ORDER_FUNCS and not simple:
            extra.append(_counts(frame, grouped, f"{cell.name}_b"))
        for counts_of in extra:
            for d, counts in counts_of.items():
                short[d] = short[d] | (counts < ks[d])
        failing[cell.name] = short
    rows = _work_frame(frame, work, records_too=True)
    types: dict[str, pl.DataType] = {}  # found once, and only where the rule runs (a computed column is read)

    def joined_vector(cell: _Cell, form: str) -> tuple[tuple[str, str], pl.Expr] | None:
        if cell.column is None:
            return ("ones", ""), pl.lit(1.0)
        v = values[(cell.column, cell.kind)]
        if form == "present":
            return (form, v), pl.col(v).is_not_null()
        if not types:
            types.update(rows.collect_schema())
        dtype = types[v]
        if not (dtype.is_numeric() or dtype == pl.Boolean):
            return None
        value = pl.when(mask_of(cell.column, v)).then(pl.col(v).cast(pl.Float64)).otherwise(0.0)
        return (form, v), value * value if form == "squares" else value

    already = {name: np.logical_or.reduce([*by_dataset.values(), ~kept]) for name, by_dataset in failing.items()}
    combined = _combined(frame, rows, key_names, grouped, cells, joined_vector, already, kept, k, True)
    for name, groups in combined.items():
        for dataset in group_records:
            failing[name][dataset] = failing[name].get(dataset, np.zeros(grouped.height, dtype=bool)) | groups

    numbers = _Numbers(grouped, group_records, kept, failing, [], combined=frozenset(combined))
    if listing:
        numbers.record_sets = _number_sets(frame, numbers, by, cells, values, moded, k)
    elif sketching and weights is not None:
        for (column, kind), v in values.items():
            mask = mask_of(column, v)
            often_most = _often_most(grouped, v, often_bins[v]) if v in often_bins else None
            if v in moded and _held_k_times(
                frame, work, key_names, grouped, kept, mask, v, (column, kind), k, often_most
            ):
                raise _ListedError  # the sets leave out the records holding that value: listed
        numbers.sketches = _joined_sketches(frame, numbers, by, cells, values, k, [b for _, b in weights])
    return numbers


def _split_screened(
    frame: SourceTable,
    values: Mapping[tuple[str, str], str],
    moded: Set[str],
    screened_otherwise: bool,
) -> set[str]:
    """The work columns whose most-common-value rule :func:`_numbers` screens by a split of their values.

    After a join that meets each record at most once (in memory), a dataset's contributing records in a group are
    its rows where it is present and the column contributes, so the records on the smaller side of a split of the
    values (:func:`_screen_bit`) differ from the most common value, as on the direct route; the groups that bound
    leaves open are counted exactly. Not where the rule is screened otherwise (one table) or decided with the
    record sets listed (the holders of a value k records share are then listed too). With sketches, whether a group
    holds a value k times is asked apart (:func:`_held_k_times`).
    """
    occurrences = frame.records or ()
    if screened_otherwise or frame.streaming or not occurrences:
        return set()
    if any(hidden not in frame.unique for _, hidden in occurrences):
        return set()
    return {v for v in values.values() if v in moded}


def _held_k_times(
    frame: SourceTable,
    work: list[pl.Expr],
    key_names: list[str],
    grouped: pl.DataFrame,
    kept: np.ndarray[Any, Any],
    mask: pl.Expr,
    v: str,
    source: tuple[str, str],
    k: int,
    often_most: np.ndarray[Any, Any] | None = None,
) -> bool:
    """Whether k or more contributing records of a kept group may hold one value of work column ``v``.

    From the group's largest value count where the release computed it; else from the values k records of the
    whole dataset hold (a load-time fact: no group holds any other value k times): a group with fewer than k rows
    holding any of them (a scanned release counts those rows as it streams) holds none k times; else they are
    counted per value and group in one more query that keeps only the rows holding them, so that a scanned dataset
    streams through it. Where neither is known, True: the sets are then listed.
    """
    if f"{v}_fmax" in grouped.columns:
        common = grouped.get_column(f"{v}_fmax").fill_null(0).to_numpy()
        return bool(((common >= k) & kept).any())
    if often_most is not None and not ((often_most >= k) & kept).any():
        return False  # no kept group holds k rows in any bin of the values k records hold: none held k times
    column, kind = source
    often = _held_often(frame, column, kind, k)
    if often is None:
        return True
    if often.is_empty() or not kept.any():
        return False
    value = _normal(pl.col(v), _floating(frame, column, kind)).alias("\x01value")
    lazy = _work_frame(frame, work, records_too=False)
    often = often.cast(lazy.collect_schema()[v], strict=False).drop_nulls()  # the work column's type, same values
    rows = lazy.filter(mask & value.is_in(often.implode()))
    most = _per_group_of_values(frame, rows, key_names, grouped, value, pl.col(_COUNT).max())
    return bool(((most >= k) & kept).any())


def _held_often(frame: SourceTable, column: str, kind: str, k: int) -> pl.Series | None:
    """The values k or more records of ``column``'s dataset hold, where a load-time fact gives them for the column
    as the table holds it (see :func:`_held_once`); else None."""
    fact = _value_fact(frame, column, kind, k)
    return None if fact is None else fact.held_often(k)


def _every_value_held_often(frame: SourceTable, column: str, kind: str, k: int) -> bool:
    """Whether every value of ``column``, as the table holds it, is among those k or more of its records hold."""
    fact = _value_fact(frame, column, kind, k)
    return fact is not None and fact.every_value_held_often(k)


def _value_fact(frame: SourceTable, column: str, kind: str, k: int) -> ColumnFact | None:
    """The load-time facts of the dataset column ``column`` still is, where they hold for its values as read for
    ``kind`` (a cast to float can merge two large integers); else None."""
    if k < 2 or frame.bound is None or column not in frame.bound.unique:
        return None
    fact = frame.bound.unique[column]
    dtype = frame.dtype(column)
    if not isinstance(fact, ColumnFact) or kind not in ("number", "plain", "float") or isinstance(dtype, pl.Decimal):
        return None
    if kind == "float" and not dtype.is_float() and not (dtype.is_integer() and fact.floats_exact()):
        return None
    return fact


# ---------------------------------------------------------------------------------------------------------------
# Numbers per group where every row is a distinct record (the common case)
#
# The same numbers and rules as above, computed the cheap way: the work columns are read once into memory; the
# statistics and counts are plain column aggregations (Polars' fastest group-by route); the order statistics are
# two selections per block and the gathered values of the group; the most-common-value rule is screened by a bound
# and decided exactly only for the groups the bound leaves open.

_SCREEN_SEED = 17  # only how fast the most-common-value rule is decided depends on the hash; never its outcome
_SORT_BELOW = 512  # groups this small are sorted outright; larger ones use selections:
_NUMPY_BELOW = 8192  # numpy's (all blocks of a group at once) up to this size, a sample's brackets above


@dataclass
class _Input:
    """One input column of the cells, in its work form."""

    v: str  # the work column
    floating: bool
    masked: bool  # the column has a contribution mask of its own (else it contributes wherever it is present)
    indicator: str | None = None  # bool work column: the record contributes (None: every row contributes)
    present: str | None = None  # bool work column: the value is present (None: every row)
    moded: bool = False  # a cell on it follows the most-common-value rule
    held_once: bool = False  # moded, and no two records of its dataset hold one value (see _held_once)
    ordered: bool = False  # a cell on it is an order statistic
    funcs: set[str] = field(default_factory=set)
    column: str | None = None  # the column it reads, and in which form ("number", "present", "plain", "float")
    kind: str = ""

    def normal(self) -> pl.Expr:
        """The contributing values as the most-common-value rule compares them (null where none contributes)."""
        value = pl.col(self.v) if self.indicator is None else pl.when(pl.col(self.indicator)).then(pl.col(self.v))
        return _normal(value, self.floating)


def _screen_bit(value: pl.Expr, dtype: Any) -> pl.Expr:
    """A bit of each value, the same for equal values, that splits the values of a column into two sides.

    Counting the contributing records with the bit set (h of n) bounds the records differing from the most common
    value from below by min(h, n - h): the most common value is on one side. A number is compared with the column's
    mean, which lies strictly between two different values (a flag's two values always fall on both sides).
    """
    if dtype == pl.Boolean:
        return value
    if dtype.is_integer() or dtype.is_float():
        return value > value.mean()
    return (value.hash(_SCREEN_SEED) % 2) == 1


def _joined_weights(frame: SourceTable) -> list[tuple[str, int]] | None:
    """Each dataset occurrence's weight column and count width, where every occurrence holds each of its records at
    most once (a join on keys unique on the other side), no dataset occurs twice and every one kept its weights;
    else None (the record sets are listed)."""
    if frame.records is None:
        return None
    datasets = [dataset for dataset, _ in frame.records]
    if len(set(datasets)) != len(datasets) or any(hidden not in frame.unique for _, hidden in frame.records):
        return None
    names = set(frame.schema.names())
    found = [frame.weights.get(hidden) for _, hidden in frame.records]
    if any(w is None or w[0] not in names or w[0] in frame.lineage for w in found):
        return None
    return [w for w in found if w is not None]


def _joined_sketches(
    frame: SourceTable,
    numbers: _Numbers,
    by: Sequence[str],
    cells: Sequence[_Cell],
    values: Mapping[tuple[str, str], str],
    k: int,
    bits: Sequence[int],
) -> list[Sketch]:
    """The sketches of the sets :func:`_number_sets` lists, per dataset, where each record is on one row at most: a
    group's records of a dataset are its rows with that dataset's id, a number's those where its column contributes.
    No value k records share may be left out of a set (see :func:`_held_k_times`): such sets are listed."""
    grouped = numbers.grouped
    occurrences = list(enumerate(frame.records or ()))
    released = {cell.name: ~numbers.withheld(cell.name) for cell in cells}
    found: list[Sketch] = []
    emitted: dict[tuple[int, str, str | None], int] = {}
    for row in (int(r) for r in np.nonzero(numbers.kept)[0]):
        keys = tuple(grouped.get_column(f"k{i}")[row] for i in range(len(by)))
        group = f"group {keys!r}" if by else "all rows"
        for cell in cells:
            if not released[cell.name][row]:
                continue
            for i, (dataset, _) in occurrences:
                whole = int(grouped.get_column(f"g{i}")[row] or 0), int(grouped.get_column(f"g_w{i}")[row] or 0)
                if cell.column is None:
                    size, total = whole
                else:
                    v = values[(cell.column, cell.kind)]
                    size = int(grouped.get_column(f"{v}_c{i}")[row] or 0)
                    total = int(grouped.get_column(f"{v}_w{i}")[row] or 0)
                bucket = None if size == whole[0] else values.get((cell.column or "", cell.kind))
                label = group if bucket is None else (f"{group} {cell.shown}" if by else cell.shown)
                if bucket is None:
                    size, total = whole
                key = _comparison_keys(frame, cell, dataset)
                at = emitted.get((row, dataset, bucket))
                if at is None:
                    emitted[(row, dataset, bucket)] = len(found)
                    found.append(Sketch(dataset, label, size, total, key, row, bits[i]))
                else:
                    earlier = found[at]
                    found[at] = Sketch(dataset, earlier.label, size, total, earlier.keys | key, row, bits[i])
    return found


class _ListedError(Exception):
    """A release asked for sketches turns out to need its record sets listed (see :func:`_joined_sketches`)."""


def _direct_route(frame: SourceTable) -> bool:
    """Whether every row is a distinct record and the table is in memory (not a scanned dataset)."""
    return not frame.streaming and _rows_are_records(frame)


def _numbers_direct(
    frame: SourceTable,
    by: Sequence[str],
    cells: Sequence[_Cell],
    policies: Mapping[str, OutputPolicy],
    want_sets: bool,
    what: str,
    subjects: Sequence[str],
    sketch: bool = False,
) -> _Numbers:
    """:func:`_numbers` for a table whose rows are distinct records: the same numbers, rules and record sets.

    With ``sketch`` the record sets are not listed but sketched: each is a group's rows, or those of them where a
    column contributes, so its size is a count the release makes anyway and its id sum two more sums in the same
    group-by; a value k records share, left out of a set, is summed apart and taken off. Order statistics (a block
    of ranks) are not sketched: their sets are listed.
    """
    ks = _min_sizes(frame, policies)
    k = max(ks.values(), default=1)
    key_names = [f"k{i}" for i in range(len(by))]
    work = [_group_key(frame, name).alias(key) for key, name in zip(key_names, by, strict=True)]
    inputs: dict[tuple[str, str], _Input] = {}
    for cell in cells:
        if cell.column is None:
            continue
        spec = inputs.get((cell.column, cell.kind))
        if spec is None:
            spec = _Input(
                f"v{len(inputs)}",
                _floating(frame, cell.column, cell.kind),
                cell.column in frame.masks,
                column=cell.column,
                kind=cell.kind,
            )
            inputs[(cell.column, cell.kind)] = spec
            work.append(_work_expr(frame, cell.column, cell.kind, cell.func).alias(spec.v))
            if spec.masked:
                work.append(frame.contributes(cell.column).alias(f"{spec.v}_m"))
        spec.moded |= cell.func in _MODE_RULE
        spec.ordered |= cell.func in _ORDER_FUNCS
        spec.funcs.add(cell.func)
    for spec in inputs.values():
        # A column no two records hold one value of (a load-time fact): each group's most common value is held once,
        # so the rule's count is known without screening or counting anything (see the rule below).
        spec.held_once = spec.moded and _held_once(frame, spec, k)
    sets = want_sets and frame.records is not None
    weights = _weights(frame) if sets and sketch else None
    # Grouped order statistics alone: their counts come from the gathered values, with no pass of their own.
    tallied = not key_names or not inputs or any(not spec.ordered for spec in inputs.values())
    tallied = tallied or any(c.column is not None and c.func not in _ORDER_FUNCS for c in cells)
    ordered = any(spec.ordered for spec in inputs.values())
    sketching = weights is not None and (not ordered or (tallied and _blocks_apart(frame, cells)))
    listing = sets and not sketching
    # With sketches, the order statistics' blocks are still listed (a block's records are no column's or group's)
    blocks_listed = sketching and ordered
    if weights is not None and sketching:
        work.append(pl.col(weights[0]).alias("w0"))
    datasets = [frame.records[0][0]] if frame.records else sorted(frame.datasets)

    with engine_errors(what, subjects):
        gathered = _GATHERED.get()
        gathering = gathered is not None and (gathered.asked or _reads_computed(frame, cells))
        table = frame.collect(_work_frame(frame, work, records_too=listing or blocks_listed or gathering))
        if key_names and any(table.get_column(key).null_count() for key in key_names):
            table = table.drop_nulls(key_names)  # a null key forms no group (pandas' dropna)
        flags: list[pl.Expr] = []  # the indicator columns, then what is computed from them
        derived: list[pl.Expr] = []
        for spec in inputs.values():
            value = pl.col(spec.v)
            nulls = table.get_column(spec.v).null_count() > 0
            if spec.masked:
                spec.indicator = f"{spec.v}_i"
                flags.append((pl.col(f"{spec.v}_m") & value.is_not_null()).alias(spec.indicator))
                if nulls:
                    spec.present = f"{spec.v}_p"
                    flags.append(value.is_not_null().alias(spec.present))
            elif nulls:
                spec.indicator = spec.present = f"{spec.v}_i"
                flags.append(value.is_not_null().alias(spec.indicator))
            contributing = value if spec.indicator is None else pl.when(pl.col(spec.indicator)).then(value)
            if spec.moded and tallied and not spec.held_once:
                bit = _screen_bit(value, table.schema[spec.v]).fill_null(False)
                on = bit if spec.indicator is None else bit & pl.col(spec.indicator)
                derived.append(on.alias(f"{spec.v}_h"))
            if spec.ordered:
                derived.append(contributing.cast(pl.Float64).alias(f"{spec.v}_o"))
            if spec.funcs & {"min", "max"} and spec.indicator is not None:
                derived.append(contributing.alias(f"{spec.v}_x"))
            # The aggregations read their inputs as they are (a cast inside one takes Polars off its fastest route).
            dtype = table.schema[spec.v]
            if "sum" in spec.funcs and dtype.is_integer() and dtype not in (pl.Int64, pl.UInt64):
                derived.append(value.cast(pl.Int64).alias(f"{spec.v}_w"))
            if spec.funcs & {"mean", "std", "var"} and not (dtype.is_integer() or dtype == pl.Float64):
                derived.append(value.cast(pl.Float64).alias(f"{spec.v}_f"))
        for stage in (flags, derived):
            table = table.with_columns(stage) if stage else table

        def counted(column: str | None) -> pl.Expr:
            return pl.len() if column is None else pl.col(column).sum()

        def read(spec: _Input, form: str) -> pl.Expr:
            return pl.col(f"{spec.v}_{form}" if f"{spec.v}_{form}" in table.columns else spec.v)

        fast: list[pl.Expr] = [pl.len().alias("rows")]
        slow: list[pl.Expr] = []
        listed: list[pl.Expr] = []  # a group's values, for the order statistics and the record sets
        if sketching:
            fast.append(pl.col("w0").sum().alias("w_sum"))
        for spec in inputs.values():
            if not (sketching and spec.indicator is not None):  # else the low bits of its weight sum
                fast.append(counted(spec.indicator).alias(f"{spec.v}_c"))
            if spec.moded and tallied and not spec.held_once:
                fast.append(counted(f"{spec.v}_h").alias(f"{spec.v}_hs"))
            if spec.ordered:
                listed.append(pl.col(f"{spec.v}_o"))
            if listing and spec.indicator is not None:
                listed.append(pl.col(spec.indicator))
            if sketching and spec.indicator is not None:  # the weights of the contributing rows, summed (0 elsewhere:
                # a sum with no nulls added stays on Polars' fastest route)
                contributing_weight = pl.when(pl.col(spec.indicator)).then(pl.col("w0")).otherwise(0)
                fast.append(contributing_weight.sum().alias(f"{spec.v}_ws"))
        if listing or blocks_listed:
            listed.append(pl.col("r0"))
        for cell in cells:
            if cell.column is None:
                fast.append(pl.len().alias(cell.name))
                continue
            spec = inputs[(cell.column, cell.kind)]
            value = pl.col(spec.v)
            func = cell.func
            if func == "count":
                fast.append(counted(spec.present).alias(cell.name))
            elif func == "nunique":
                slow.append(_distinct(value).alias(cell.name))
            elif func == "sum":
                fast.append(read(spec, "w").sum().alias(cell.name))
            elif func == "mean":
                fast.append(read(spec, "f").mean().alias(cell.name))
            elif func in ("std", "var"):
                as_float = read(spec, "f")
                fast.append((as_float.std(ddof=1) if func == "std" else as_float.var(ddof=1)).alias(cell.name))
            elif func in ("min", "max"):
                extreme = value.min() if func == "min" else value.max()
                fast.append(extreme.alias(cell.name))
                # The contributing records holding the extreme. Per group, counted up to k (all the rule needs): the
                # k least (or greatest) contributing values that equal it; ungrouped, all of them (as cheap).
                held = value if spec.indicator is None else pl.col(f"{spec.v}_x")
                nearest = held if not key_names else held.bottom_k(k) if func == "min" else held.top_k(k)
                slow.append((nearest == extreme).sum().alias(f"{cell.name}_t"))

        flattened: dict[str, tuple[np.ndarray, np.ndarray]] = {}

        def segments(name: str) -> tuple[np.ndarray, np.ndarray]:
            """A listed column's values, flat, and where each group starts (a group has at least one row)."""
            if name not in flattened:
                if not key_names:
                    flattened[name] = table.get_column(name).to_numpy(), np.array([0, table.height])
                else:
                    flattened[name] = _flat_lists(grouped.get_column(name))
            return flattened[name]

        if key_names:

            def by_keys(aggregations: list[pl.Expr]) -> pl.LazyFrame:
                return table.lazy().group_by(key_names).agg(aggregations).sort(key_names)

            parts = [by_keys(fast if tallied else listed)]
            parts += [by_keys(p).drop(key_names) for p in (slow, listed if tallied else []) if p]
            grouped = frame.collect(pl.concat(parts, how="horizontal") if len(parts) > 1 else parts[0])
            if not tallied:
                grouped = grouped.with_columns(_tallies_of_values(inputs, cells, segments))
        else:
            grouped = frame.collect(table.lazy().select(fast + slow))
        if sketching and weights is not None:  # a count is the low bits of its weights' sum
            grouped = grouped.hstack(
                [
                    pl.Series(f"{spec.v}_c", sizes_of(grouped.get_column(f"{spec.v}_ws").to_numpy(), weights[1]))
                    for spec in inputs.values()
                    if spec.indicator
                ]
            )
        tallies = ["rows", *(f"{spec.v}_c" for spec in inputs.values())]
        tallies += [cell.name for cell in cells if cell.column is None or cell.func == "count"]
        grouped = grouped.with_columns(pl.col(tallies).cast(pl.Int64))

    rows = grouped.get_column("rows").to_numpy()
    group_records = dict.fromkeys(datasets, rows)
    kept = np.ones(grouped.height, dtype=bool)
    for dataset in datasets:
        kept &= rows >= ks[dataset]
    count = {spec.v: grouped.get_column(f"{spec.v}_c").to_numpy() for spec in inputs.values()}

    # The most-common-value rule: records differing from the group's most common value, per group (a bound of at
    # least k where the screen settles it); with record sets, also whether k or more records hold that value.
    nonmode: dict[str, np.ndarray] = {}
    modes: dict[str, dict[int, Any]] = {}  # v -> group row -> the most common value, where k or more hold it
    for spec in inputs.values():
        if not spec.moded:
            continue
        n = count[spec.v]
        if spec.held_once:  # the most common value is held by one record: all the others differ from it
            nonmode[spec.v] = np.where(kept & (n >= k), n - 1, -1)
            continue
        high = grouped.get_column(f"{spec.v}_hs").to_numpy()
        screened = np.where(np.minimum(high, n - high) >= k, n, -1)
        open_ = kept & (screened < 0) & (n >= k)
        if sets:
            none_held = _none_often_held_k_times(frame, table, key_names, spec, k, what, subjects)
            if none_held is None:  # the load-time fact does not settle it: hash bins
                none_held = _none_held_k_times(table, key_names, spec, k, what, subjects)
            if not none_held:
                open_ = kept & (n > 0)  # the record sets leave out a value k records share: find it exactly
        if open_.any():
            most, common = _most_common(frame, table, grouped, key_names, spec, open_, what, subjects, n, k)
            screened = np.where(open_, n - most, screened)
            if sets:
                modes[spec.v] = {int(r): common[int(r)] for r in np.nonzero(open_ & (most >= k))[0]}
        nonmode[spec.v] = screened

    # Order statistics: the mean of the block of ranks holding round(q * (n - 1)).
    blocks: dict[str, dict[int, np.ndarray]] = {}  # cell -> group row -> positions (within the group) in its block
    order_cells = [cell for cell in cells if cell.func in _ORDER_FUNCS]
    columns: dict[str, list[float | None]] = {cell.name: [None] * grouped.height for cell in order_cells}
    for spec in inputs.values():
        if not spec.ordered:
            continue
        mine = [cell for cell in order_cells if inputs[(cell.column or "", cell.kind)] is spec]
        flat, bounds = segments(f"{spec.v}_o")
        large: list[tuple[str, int, np.ndarray, np.ndarray | None, int, int]] = []
        wanted = [int(r) for r in np.nonzero(kept & (count[spec.v] >= k))[0]]
        with_ids = listing or blocks_listed
        for row in wanted:
            stoppable.check()  # NumPy from here on: an interrupt is seen between groups
            for name, mean, inside, where, missed in _group_blocks(flat, bounds, spec, mine, k, with_ids, row):
                if missed is not None:  # the sample's bracket missed: selected below, all at once
                    large.append((name, row, missed[0], where, missed[1], missed[2]))
                    continue
                columns[name][row] = mean
                if with_ids and inside is not None:
                    blocks.setdefault(name, {})[row] = inside if where is None else where[inside]
        with engine_errors(what, subjects):
            bounding = _select_ranks(
                [(values, rank) for _, _, values, _, start, end in large for rank in (start, end - 1)]
            )
        for i, (name, row, values, where, start, end) in enumerate(large):
            mean, inside = _block_mean(
                values, start, end, bounding[2 * i], bounding[2 * i + 1], listing or blocks_listed
            )
            columns[name][row] = mean
            if inside is not None:
                blocks.setdefault(name, {})[row] = inside if where is None else where[inside]
    if columns:
        grouped = grouped.with_columns(pl.Series(name, found, dtype=pl.Float64) for name, found in columns.items())

    failing: dict[str, dict[str, np.ndarray]] = {}
    for cell in cells:
        if cell.column is None:
            failing[cell.name] = {}
            continue
        spec = inputs[(cell.column, cell.kind)]
        short = {d: count[spec.v] < ks[d] for d in datasets}
        extra: list[np.ndarray] = []
        if cell.func in _MODE_RULE:  # none differing: every contributing record holds the released value
            extra.append(np.where(nonmode[spec.v] == 0, np.iinfo(np.int64).max, nonmode[spec.v]))
        if cell.func in ("min", "max"):
            extra.append(grouped.get_column(f"{cell.name}_t").to_numpy())
        for counts in extra:
            short = {d: bad | (counts < ks[d]) for d, bad in short.items()}
        failing[cell.name] = short
    already = {name: np.logical_or.reduce([*by_dataset.values(), ~kept]) for name, by_dataset in failing.items()}

    def direct_vector(cell: _Cell, form: str) -> tuple[tuple[str, str], pl.Expr] | None:
        spec = inputs[(cell.column, cell.kind)] if cell.column is not None else None
        flag = None if spec is None else spec.present if form == "present" else spec.indicator
        if spec is None or (form == "present" and flag is None):
            return ("ones", ""), pl.lit(1.0)  # every row is counted
        if form == "present":
            return (form, spec.v), pl.col(str(flag))
        dtype = table.schema[spec.v]
        if not (dtype.is_numeric() or dtype == pl.Boolean):
            return None
        value = pl.col(spec.v).cast(pl.Float64)
        value = value if flag is None else pl.when(pl.col(flag)).then(value).otherwise(0.0)
        return (form, spec.v), value * value if form == "squares" else value

    combined = _combined(frame, table.lazy(), key_names, grouped, cells, direct_vector, already, kept, k, False)
    for name, groups in combined.items():
        for dataset in datasets:
            failing[name][dataset] = failing[name].get(dataset, np.zeros(grouped.height, dtype=bool)) | groups

    numbers = _Numbers(
        grouped.select(*key_names, *(cell.name for cell in cells)),
        group_records,
        kept,
        failing,
        [],
        combined=frozenset(combined),
    )
    keys_of = {cell.name: _comparison_keys(frame, cell) for cell in cells}
    if listing:
        numbers.record_sets = _direct_sets(
            numbers, datasets[0], by, cells, inputs, segments, modes, blocks, table, key_names, keys_of
        )
    elif sketching and weights is not None:
        held_out = {
            spec.v: _held_sketches(frame, table, key_names, grouped, spec, modes[spec.v], what, subjects)
            for spec in inputs.values()
            if modes.get(spec.v)
        }
        sums = {spec.v: grouped.get_column(f"{spec.v}_ws").to_numpy() for spec in inputs.values() if spec.indicator}
        numbers.sketches = _direct_sketches(
            numbers,
            datasets[0],
            by,
            [cell for cell in cells if cell.func not in _ORDER_FUNCS],
            inputs,
            rows,
            count,
            grouped.get_column("w_sum").to_numpy(),
            sums,
            held_out,
            keys_of,
            weights[1],
        )
        if blocks_listed:
            order_cells = [cell for cell in cells if cell.func in _ORDER_FUNCS]
            numbers.record_sets = _direct_sets(
                numbers, datasets[0], by, order_cells, inputs, segments, {}, blocks, table, key_names, keys_of
            )
    return numbers


def _reads_computed(frame: SourceTable, cells: Sequence[_Cell]) -> bool:
    """Whether a sum, mean, count, std or var among ``cells`` reads a computed column: the rule on combinations
    runs for it (the columns of a dataset as loaded agree on few rows only by the data's own doing)."""
    return any(
        cell.column is not None
        and cell.func in _ADDS_UP
        and (cell.column not in frame.arrow_types or cell.column in frame.masks)
        for cell in cells
    )


# What each number adds up, row by row, for the rule on combinations of a release's numbers (see .combinations).
_ADDS_UP: dict[str, tuple[str, ...]] = {
    "rows": ("ones",),
    "count": ("present",),
    "sum": ("values",),
    "mean": ("values",),  # (with the count of its column, its sum; without, a sum over an unknown count)
    "std": ("values", "squares"),
    "var": ("values", "squares"),
}


def _combined(
    frame: SourceTable,
    rows: pl.LazyFrame,
    key_names: Sequence[str],
    grouped: pl.DataFrame,
    cells: Sequence[_Cell],
    vector_of: Callable[[_Cell, str], tuple[tuple[str, str], pl.Expr] | None],
    withheld: Mapping[str, np.ndarray],
    kept: np.ndarray,
    k: int,
    by_records: bool,
) -> dict[str, np.ndarray]:
    """The cells withheld (in every group) because a combination of some group's numbers, with coefficients the
    analyst knows, rests on fewer than k records of a dataset (see :mod:`.combinations`):
    ``sum(cn.where(who, t.cost, t.age))`` beside ``sum(t.age)``. Withheld everywhere, not in that group alone: which
    group it was would place the records.

    ``rows``: the release's work rows, with its keys and each dataset occurrence's record ids (``r0``...) where the
    frame has them (``by_records``; else each row is a distinct record); a record on several rows (after a join)
    adds up its rows. ``vector_of(cell, form)`` gives a number's vector of ``form`` (see :data:`_ADDS_UP`) as a key
    and an expression over the rows, or None where it has none (the values of a string column). ``withheld``: per
    cell, the groups where it is withheld already (no part of what they release). Only where a number reads a
    computed column: the columns of a dataset as they were loaded agree on few rows only by the data's own doing,
    which the rules on each number already see (a column constant but for a few rows)."""
    linear = [cell for cell in cells if cell.func in _ADDS_UP]
    computed = _reads_computed(frame, cells)
    gathered = _GATHERED.get()
    if gathered is not None:
        gathered.adds_up |= bool(linear)
        gathered.reads_computed |= computed
    # The values each record adds are kept where the rule searches them (or where asked): the rule across releases
    # compares them with earlier releases' (see .earlier_values).
    gathering = gathered is not None and (gathered.asked or computed) and frame.records is not None
    gathering = gathering and (by_records or "r0" in rows.collect_schema())
    if not (computed or gathering) or not linear:
        return {}
    exprs: dict[tuple[str, str], pl.Expr] = {}
    by_cell: dict[str, list[tuple[str, str]]] = {}
    for cell in linear:
        by_cell[cell.name] = []
        for form in _ADDS_UP[cell.func]:
            found = vector_of(cell, form)
            if found is not None:
                exprs.setdefault(found[0], found[1])
                by_cell[cell.name].append(found[0])
    searched = computed and len(exprs) >= 2  # the rule within this release
    if not (searched or gathering) or not exprs:
        return {}
    keys = list(exprs)
    names = [f"\x01vector{i}" for i in range(len(keys))]
    vectors = [exprs[key].cast(pl.Float64).fill_null(0.0).alias(name) for key, name in zip(keys, names, strict=True)]
    index = grouped.select(key_names).with_row_index("\x01group") if key_names else None
    involved: set[tuple[str, str]] = set()
    seen: list[tuple[str, np.ndarray, np.ndarray, list[np.ndarray]]] = []  # per occurrence, where values are gathered
    with_ids = frame.records if (by_records or gathering) and frame.records else None
    occurrences = list(enumerate(with_ids)) if with_ids else [(None, None)]
    for position_of, occurrence in occurrences:
        stoppable.check()
        record = None if position_of is None else f"r{position_of}"
        if record is None or not by_records:  # each row a distinct record (its id listed, where values are gathered)
            per_record = rows.select(*key_names, *([] if record is None else [record]), *vectors)
        else:
            per_record = (
                rows.select(*key_names, record, *vectors)
                .drop_nulls(record)
                .group_by([*key_names, record])
                .agg(pl.col(names).sum())
                .sort(record)  # the records in one order, whatever the group-by's: the same request, the same draws
            )
        listed_names = [*names, record] if gathering and record is not None else names
        if index is not None:  # each group's records, one group after another
            listed = per_record.group_by(key_names).agg(pl.col(listed_names)).join(index.lazy(), on=key_names)
            table = frame.collect(listed.sort("\x01group"))
            groups = table.get_column("\x01group").to_numpy()
            flat = [_flat_lists(table.get_column(name)) for name in listed_names]
            columns, bounds = [values for values, _ in flat], flat[0][1]
        else:
            table = frame.collect(per_record)
            groups, bounds = np.zeros(1, dtype=np.int64), np.array([0, table.height], dtype=np.int64)
            columns = [table.get_column(name).to_numpy() for name in listed_names]
        if gathering and record is not None and occurrence is not None:
            columns, ids = columns[: len(names)], columns[len(names)]
            seen.append((occurrence[0], ids, np.repeat(groups, np.diff(bounds)), columns))
        if not searched:
            continue
        # Groups that release the same numbers are searched together (usually all of them).
        alike: dict[tuple[tuple[str, str], ...], list[int]] = {}
        for position, group in enumerate(groups.tolist()):
            if kept[group] and bounds[position + 1] > bounds[position]:
                released = tuple(
                    dict.fromkeys(
                        key for cell in linear if not withheld[cell.name][group] for key in by_cell[cell.name]
                    )
                )
                if len(released) >= 2:
                    alike.setdefault(released, []).append(position)
        for released, positions in alike.items():
            stoppable.check()
            chosen = [keys.index(key) for key in released]
            at = np.asarray(positions)
            if len(at) == len(groups):
                picked, picked_bounds = [columns[j] for j in chosen], bounds
            else:
                taken = np.concatenate([np.arange(bounds[p], bounds[p + 1]) for p in at])
                picked = [columns[j][taken] for j in chosen]
                picked_bounds = np.zeros(len(at) + 1, dtype=np.int64)
                np.cumsum(bounds[at + 1] - bounds[at], out=picked_bounds[1:])
            isolated = isolating_groups(picked, picked_bounds, k)
            involved.update(released[i] for i in np.flatnonzero(isolated))
    # Withheld in every group: which group held the few records would say something of them.
    everywhere = np.ones(len(kept), dtype=bool)
    combined = {cell.name: everywhere for cell in linear if involved.intersection(by_cell[cell.name])}
    if gathering and gathered is not None:
        # A vector counts in a group where a number released there adds it up.
        adds_in = np.zeros((len(keys), len(kept)), dtype=bool)
        for cell in linear:
            if cell.name not in combined:
                for key in by_cell[cell.name]:
                    adds_in[keys.index(key)] |= ~withheld[cell.name]
        for dataset, ids, group_of, columns in seen:
            order = _by_id(ids)
            groups = group_of[order]
            counted = [
                column[order] if adds_in[j].all() else np.where(adds_in[j][groups], column[order], 0.0)
                for j, column in enumerate(columns)
            ]
            gathered.values.append((dataset, RecordValues(ids[order], groups, tuple(counted))))
    return combined


def _by_id(ids: np.ndarray) -> np.ndarray:
    """The order that sorts record ids (row numbers, so mostly dense): placed by id where they are dense enough and
    distinct, sorted otherwise (after a join a record is listed once per group it has rows in)."""
    if len(ids) and int(ids.max()) < 4 * len(ids) + (1 << 20):
        position = np.full(int(ids.max()) + 1, -1, dtype=np.int64)
        position[ids] = np.arange(len(ids))
        order = position[position >= 0]
        if len(order) == len(ids):
            return order
    return np.argsort(ids, kind="stable")


def _tallies_of_values(
    inputs: Mapping[tuple[str, str], _Input],
    cells: Sequence[_Cell],
    segments: Callable[[str], tuple[np.ndarray, np.ndarray]],
) -> list[pl.Series]:
    """The group sizes, contributing counts and screen counts the plain aggregations would give, from each group's
    gathered values (NaN where a record does not contribute)."""
    found: list[pl.Series] = []
    for spec in inputs.values():
        flat, bounds = segments(f"{spec.v}_o")
        rows = np.diff(bounds)
        if not found:
            found += [pl.Series("rows", rows, dtype=pl.Int64)]
            found += [pl.Series(c.name, rows, dtype=pl.Int64) for c in cells if c.column is None]
        starts = bounds[:-1]
        contributing = None if spec.indicator is None else ~np.isnan(flat)
        counts = rows if contributing is None else np.add.reduceat(contributing, starts)
        found.append(pl.Series(f"{spec.v}_c", counts, dtype=pl.Int64))
        if spec.moded and not spec.held_once:
            present = flat if contributing is None else flat[contributing]
            threshold = float(present.mean()) if len(present) else 0.0
            with np.errstate(invalid="ignore"):
                high = (flat > threshold).view(np.int8)  # as _screen_bit: one side of a threshold (NaN on neither)
            found.append(pl.Series(f"{spec.v}_hs", np.add.reduceat(high, starts, dtype=np.int64), dtype=pl.Int64))
    return found


def _flat_lists(lists: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """A list column's values, flat, and where each list starts (an empty list holds no value). Read from the
    Arrow buffers: numbers without nulls are not copied, where an exploded copy of a million values costs a
    release milliseconds of page faults."""
    array = lists.to_arrow()
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    offsets = array.offsets.to_numpy().astype(np.int64, copy=False)
    values = array.flatten()
    numeric = pa.types.is_integer(values.type) or pa.types.is_floating(values.type) or pa.types.is_boolean(values.type)
    if not numeric or (values.null_count and not pa.types.is_floating(values.type)):  # NumPy's null is NaN
        return lists.explode(empty_as_null=False).to_numpy(), offsets - offsets[0]
    return values.to_numpy(zero_copy_only=False), offsets - offsets[0]


class _Sample:
    """Brackets for the blocks of a large array, from a sorted sample of it (every ``step``-th value).

    A block's ranks lie, with high probability, between two sample values a few sample ranks either side of where
    the block falls; one pass then counts the values below the bracket and picks those inside it, and the block is
    found among those few. Whether the bracket holds is checked, never assumed: :meth:`block` gives None otherwise.
    """

    def __init__(self, values: np.ndarray, size: int | None = None) -> None:
        self.values = values
        if size is None:  # the sample's sort against the bracket's size (about 4n / sqrt(size) values)
            size = min(max(int(8 * np.sqrt(len(values))), 256), 8192)
        self.sorted = np.sort(values[:: max(len(values) // size, 1)])

    def block(self, start: int, end: int, want_ids: bool) -> tuple[float, np.ndarray | None] | None:
        n, m = len(self.values), len(self.sorted)
        margin = int(4 * np.sqrt(m) / 2) + 2  # four standard deviations of a sample rank, at worst
        low_at, high_at = int(start * m / n) - margin, int(end * m / n) + margin
        values = self.values
        if low_at > 0:
            inside = values >= self.sorted[low_at]
            below = n - int(np.count_nonzero(inside))
        else:
            below, inside = 0, np.ones(n, dtype=bool)
        if high_at < m - 1:
            inside &= values <= self.sorted[high_at]
        where = np.flatnonzero(inside)  # then a take: cheaper than a gather by a mask over every value
        found = values[where]
        if not (below <= start and end <= below + len(found)):
            return None
        first, last = start - below, end - below
        if not want_ids:
            parted = np.partition(found, [first, last - 1])
            return float(parted[first:last].mean()), None
        # With the ranks either side: where no tie crosses an edge of the block, its records are those holding a
        # value between its lowest and highest (ties inside the block are all in it); else picked in row order.
        parted = np.partition(found, sorted({max(first - 1, 0), first, last - 1, min(last, len(found) - 1)}))
        mean = float(parted[first:last].mean())
        low, high = float(parted[first]), float(parted[last - 1])
        crossed = (first > 0 and parted[first - 1] == low) or (last < len(found) and parted[last] == high)
        if not crossed:
            return mean, where[np.flatnonzero((found >= low) & (found <= high))]
        _, chosen = _block_mean(found, first, last, low, high, True)
        return mean, None if chosen is None else where[chosen]


# (cell name, block mean, block positions, where those are in the group, or (values, start, end) for a block the
# sample's bracket missed)
_GroupBlock = tuple[str, float, np.ndarray | None, np.ndarray | None, tuple[np.ndarray, int, int] | None]


def _group_blocks(
    flat: np.ndarray, bounds: np.ndarray, spec: _Input, cells: Sequence[_Cell], k: int, with_ids: bool, row: int
) -> list[_GroupBlock]:
    """The blocks of one group's order statistics: per cell, its name, the block's mean, its positions among the
    contributing values (with ``with_ids``) and where those are in the group, or the values themselves when the
    sample's bracket missed (selected afterwards, all at once)."""
    segment = flat[bounds[row] : bounds[row + 1]]
    where = np.nonzero(~np.isnan(segment))[0] if spec.indicator is not None else None
    values = segment if where is None else segment[where]
    ranks = [_block_ranks(len(values), k, 0.5 if cell.q is None else cell.q) for cell in cells]
    if _SORT_BELOW < len(values) <= _NUMPY_BELOW:
        parted = np.partition(values, sorted({r for start, end in ranks for r in (start, end - 1)}))
    sample = _Sample(values) if len(values) > _NUMPY_BELOW else None
    found: list[_GroupBlock] = []
    for cell, (start, end) in zip(cells, ranks, strict=True):
        inside: np.ndarray | None
        if sample is not None:
            block = sample.block(start, end, with_ids)
            if block is None:
                found.append((cell.name, 0.0, None, where, (values, start, end)))
                continue
            mean, inside = block
        elif len(values) > _SORT_BELOW:
            # The block's values are exactly parted[start:end]; its records, with ties in row order:
            mean, inside = float(parted[start:end].mean()), None
            if with_ids:
                _, inside = _block_mean(values, start, end, parted[start], parted[end - 1], True)
        else:
            inside = np.sort(np.argsort(values, kind="stable")[start:end])  # ordinal rank: ties in row order
            mean = float(values[inside].mean())
        found.append((cell.name, mean, inside, where, None))
    return found


def _block_ranks(n: int, k: int, q: float) -> tuple[int, int]:
    """The ranks ``[start, end)`` of the block holding rank round(q * (n - 1)) among n values, blocks of k ranks (a
    last partial block merged into the one before)."""
    blocks = max(n // k, 1)
    block = min(round(float(n - 1) * q) // k, blocks - 1)
    start = block * k
    return start, (n if block == blocks - 1 else start + k)


def _select_ranks(wanted: Sequence[tuple[np.ndarray, int]]) -> list[float]:
    """The value at each rank (0-based) of each array: order-statistic selections, run in batches on Polars' pool."""
    found: list[float] = []
    for first in range(0, len(wanted), 64):
        batch = wanted[first : first + 64]
        exprs = [
            pl.lit(pl.Series(values)).quantile(min((rank + 0.5) / max(len(values) - 1, 1), 1.0), "lower").alias(f"s{i}")
            for i, (values, rank) in enumerate(batch)
        ]
        found += [float(x) for x in pl.select(exprs).row(0)] if exprs else []
    return found


def _block_mean(
    values: np.ndarray, start: int, end: int, low: float, high: float, want_ids: bool
) -> tuple[float, np.ndarray | None]:
    """The mean of the values ranked ``start`` to ``end - 1`` (in row order; ``low`` and ``high`` are the values at
    those ranks) and, with ``want_ids``, their positions (ties ranked in row order, as an ordinal rank does)."""
    at_low = np.nonzero(values == low)[0]
    below_low = int(np.count_nonzero(values < low))
    if low == high:  # the whole block holds one value
        return low, (at_low[start - below_low : end - below_low] if want_ids else None)
    at_high = np.nonzero(values == high)[0]
    below_high = int(np.count_nonzero(values < high))
    lows = below_low + len(at_low) - start  # the block's copies of its lowest value: the last ties in row order
    highs = end - below_high  # and of its highest: the first ties
    between = (values > low) & (values < high)
    mean = (low * lows + float(values[between].sum()) + high * highs) / (end - start)
    if not want_ids:
        return mean, None
    return mean, np.sort(np.concatenate([at_low[len(at_low) - lows :], np.nonzero(between)[0], at_high[:highs]]))


def _held_once(frame: SourceTable, spec: _Input, k: int) -> bool:
    """Whether no two rows hold one value of ``spec``'s column, by a load-time fact (the column was found unique in
    its dataset, as the join size bound uses, and filters keep that): then no value is held by k >= 2 records, and
    the most-common-value rule leaves no record out without counting anything per release."""
    if k < 2 or frame.bound is None or spec.column is None or spec.column not in frame.bound.unique:
        return False
    dtype = frame.dtype(spec.column)
    if spec.kind not in ("number", "plain", "float") or isinstance(dtype, pl.Decimal):
        return False  # a presence flag repeats; a cast to float can merge two large integers or decimals
    fact = frame.bound.unique[spec.column]
    exact = dtype.is_float() or (dtype.is_integer() and isinstance(fact, ColumnFact) and fact.floats_exact())
    if spec.kind == "float" and not exact:
        return False  # a cast to float can merge two large integers
    return fact()


def _none_often_held_k_times(
    frame: SourceTable,
    table: pl.DataFrame,
    key_names: Sequence[str],
    spec: _Input,
    k: int,
    what: str,
    subjects: Sequence[str],
) -> bool | None:
    """Whether no value of ``spec``'s column is held by k or more contributing records of one group, shown from the
    values k records of the whole dataset hold (a load-time fact, usually none or a few: no group holds another
    value k times), counted per group over the rows holding them; False without counting for a table taken whole
    (one group: counting its most common value exactly costs no more). None where the fact is not known."""
    if spec.column is None:
        return None
    often = _held_often(frame, spec.column, spec.kind, k)
    if often is None:
        return None
    if often.is_empty():
        return True
    if not key_names:
        return False
    value = spec.normal()
    often = often.cast(table.schema[spec.v], strict=False).drop_nulls()
    with engine_errors(what, subjects):
        holding = table.lazy().filter(value.is_in(often.implode())).select(*key_names, value.alias("\x01value"))
        most = holding.group_by([*key_names, "\x01value"]).len().select(pl.col("len").max()).collect()
    return int(most.item() or 0) < k


def _none_held_k_times(
    table: pl.DataFrame, key_names: Sequence[str], spec: _Input, k: int, what: str, subjects: Sequence[str]
) -> bool:
    """Whether no value of work column ``v`` is held by k or more contributing records of one group, shown by
    counting (group, value) pairs into hash bins: equal pairs share a bin, so no bin of fewer than k rules it out.
    Where a bin holds k or more (chance, in a large table: the bins are capped), the pairs in such bins are counted
    by their whole 64-bit hash: equal pairs share it, so no hash held k times rules it out too."""
    value = spec.normal()
    hashed = value.hash(_SCREEN_SEED)
    for i, name in enumerate(key_names):
        hashed = hashed ^ pl.col(name).hash(_SCREEN_SEED + 1 + i)
    with engine_errors(what, subjects):
        found = table.select(hashed.filter(value.is_not_null())).to_series().to_numpy()
    bits = min(max(int(2 * len(found)).bit_length(), 8), 21)  # 2 to 4 bins a pair: k share one only by rare chance
    slots = (found >> np.uint64(64 - bits)).astype(np.intp)
    bins = np.bincount(slots, minlength=1 << bits)
    crowded = bins >= k
    if not crowded.any():
        return True
    suspects = found[crowded[slots]]
    if suspects.size > max(len(found) // 2, 4096):  # most bins crowded: values repeat, as in a flag; count exactly
        return False
    _, held = np.unique(suspects, return_counts=True)
    return int(held.max(initial=0)) < k


def _most_common(
    frame: SourceTable,
    table: pl.DataFrame,
    grouped: pl.DataFrame,
    key_names: Sequence[str],
    spec: _Input,
    open_: np.ndarray,
    what: str,
    subjects: Sequence[str],
    counts: np.ndarray | None = None,
    k: int = 0,
) -> tuple[np.ndarray, list[Any]]:
    """Per group (where ``open_``), how many contributing records hold the most common value, and that value (the
    least of the most common ones).

    Given the groups' contributing ``counts`` and ``k``, and where the values k records of the whole dataset hold
    are a load-time fact, only the rows holding those are counted (usually few; a large table taken whole costs a
    hash table of every distinct value otherwise). No other value is held k times, so a group whose most common of
    them is held fewer than k times has its most common value held fewer than k times: the count found is then a
    lower bound that decides the rule as the exact one would (both leave at least k records off it) where the group
    has 2k - 1 contributing records or more; smaller groups are counted in full.
    """
    value = f"{spec.v}_n"
    often = None if counts is None or spec.column is None else _held_often(frame, spec.column, spec.kind, k)
    if often is not None and spec.column is not None and _every_value_held_often(frame, spec.column, spec.kind, k):
        often = None  # the restriction would keep every row: the count is exact
    with engine_errors(what, subjects):
        lazy = table.lazy().with_columns(spec.normal().alias(value))
        if often is not None:
            often = often.cast(lazy.collect_schema()[value], strict=False).drop_nulls()
            lazy = lazy.filter(pl.col(value).is_in(often.implode()))
        tallies = lazy.drop_nulls(value).group_by(*key_names, value).agg(pl.len().alias("\x01n"))
        top = pl.col("\x01n").max()
        common = pl.col(value).filter(pl.col("\x01n") == top).min()
        if key_names:
            best = tallies.group_by(key_names).agg(top, common)
            rows = grouped.lazy().select(key_names).with_row_index("\x01group")
            found = frame.collect(rows.join(best, on=list(key_names)).select("\x01group", "\x01n", value))
        else:
            found = frame.collect(tallies.select(pl.lit(0).alias("\x01group"), top, common))
    most = np.zeros(grouped.height, dtype=np.int64)
    modes: list[Any] = [None] * grouped.height
    for group, n, mode in found.iter_rows():
        if n is not None and open_[int(group)]:
            most[int(group)] = int(n)
            modes[int(group)] = mode
    if often is not None and counts is not None:
        small = open_ & (most < k) & (counts < 2 * k - 1)
        if small.any():
            exact, exact_modes = _most_common(frame, table, grouped, key_names, spec, small, what, subjects)
            most = np.where(small, exact, most)
            modes = [exact_modes[i] if small[i] else mode for i, mode in enumerate(modes)]
    return most, modes


def _direct_sets(
    numbers: _Numbers,
    dataset: str,
    by: Sequence[str],
    cells: Sequence[_Cell],
    inputs: Mapping[tuple[str, str], _Input],
    segments: Callable[[str], tuple[np.ndarray, np.ndarray]],
    modes: Mapping[str, Mapping[int, Any]],
    blocks: Mapping[str, Mapping[int, np.ndarray]],
    table: pl.DataFrame,
    key_names: Sequence[str],
    keys_of: Mapping[str, frozenset[str]],
) -> list[RecordSet]:
    """The records behind each released number (as :func:`_number_sets`); one behind all of its group's rows is
    listed once, as the group."""
    ids, bounds = segments("r0")
    ids = ids.astype(np.int64, copy=False)
    flags = {
        spec.v: segments(spec.indicator)[0]
        for (column, kind), spec in inputs.items()
        if spec.indicator is not None
        and any(c.column == column and c.kind == kind and c.func not in _ORDER_FUNCS for c in cells)
    }
    # The values of each column whose most common value some group leaves out, in the same order as the ids.
    shared = {spec.v: spec.normal().alias(spec.v) for spec in inputs.values() if modes.get(spec.v)}
    if shared and key_names:
        gathered = table.lazy().group_by(key_names).agg(shared.values()).sort(key_names).collect()
        values_of = {v: gathered.get_column(v).explode() for v in shared}
    else:
        values_of = {v: table.select(expr).to_series() for v, expr in shared.items()}
    held: dict[tuple[str, int], np.ndarray] = {}  # (column, group row) -> its rows holding the most common value

    def holders(v: str, row: int, start: int, end: int) -> np.ndarray:
        if (v, row) not in held:
            segment = values_of[v].slice(start, end - start)
            held[(v, row)] = (segment == modes[v][row]).fill_null(False).to_numpy()
        return held[(v, row)]

    released = {cell.name: ~numbers.withheld(cell.name) for cell in cells}
    found: list[RecordSet] = []
    for row in (int(r) for r in np.nonzero(numbers.kept)[0]):
        stoppable.check()  # NumPy from here on: an interrupt is seen between groups
        start, end = int(bounds[row]), int(bounds[row + 1])
        mine = ids[start:end]  # in row order: ascending unless the plan reordered rows
        order: np.ndarray | None = None
        whole = mine  # sorted when a number other than an order statistic needs it
        if any(released[cell.name][row] and cell.func not in _ORDER_FUNCS for cell in cells):
            order = None if bool(np.all(mine[1:] > mine[:-1])) else np.argsort(mine, kind="stable")
            whole = mine if order is None else mine[order]
        keys = tuple(numbers.grouped.get_column(f"k{i}")[row] for i in range(len(by)))
        group = f"group {keys!r}" if by else "all rows"
        emitted: dict[Any, list[int]] = {}  # a set's bucket (None: the group's own records) -> places in found
        for cell in cells:
            if not released[cell.name][row]:
                continue
            chosen = whole
            if cell.func in _ORDER_FUNCS:
                chosen = np.sort(mine[blocks[cell.name][row]])
            elif cell.column is not None:
                spec = inputs[(cell.column, cell.kind)]
                inside = None if spec.indicator is None else flags[spec.v][start:end]
                if row in modes.get(spec.v, {}):  # a value k records share is left out, as counted
                    inside = ~holders(spec.v, row, start, end) & (True if inside is None else inside)
                if inside is not None and not inside.all():
                    chosen = mine[inside] if order is None else whole[inside[order]]
            whole_group = chosen.size == mine.size  # a subset of the group's records, so all of them
            label = group if whole_group else (f"{group} {cell.shown}" if by else cell.shown)
            key = None if whole_group else _bucket(chosen)
            # (a block holding the whole group is its ids sorted: the group's own records, as ``whole`` would be)
            listed = whole if whole_group and cell.func not in _ORDER_FUNCS else chosen
            _emit(found, emitted, key, (dataset, label, listed, keys_of[cell.name]))
    return found


def _held_sketches(
    frame: SourceTable,
    table: pl.DataFrame,
    key_names: Sequence[str],
    grouped: pl.DataFrame,
    spec: _Input,
    modes: Mapping[int, Any],
    what: str,
    subjects: Sequence[str],
) -> dict[int, tuple[int, int]]:
    """Per group row in ``modes``, how many contributing records hold its most common value and their weights'
    sum (what the group's sketch leaves out, as :func:`_direct_sets` leaves the records out)."""
    value = spec.normal().alias("\x01v")
    rows = sorted(modes)
    with engine_errors(what, subjects):
        dtype = table.lazy().select(value).collect_schema()["\x01v"]
        chosen = table.lazy().select(*key_names, value, pl.col("w0"))
        if key_names:
            wanted = grouped.select(key_names)[rows].with_columns(
                pl.Series("\x01group", rows, dtype=pl.Int64), pl.Series("\x01mode", [modes[r] for r in rows], dtype)
            )
            chosen = chosen.join(wanted.lazy(), on=list(key_names))
        else:
            chosen = chosen.with_columns(
                pl.lit(rows[0], pl.Int64).alias("\x01group"), pl.lit(modes[rows[0]], dtype).alias("\x01mode")
            )
        holding = chosen.filter(pl.col("\x01v") == pl.col("\x01mode")).group_by("\x01group")
        found = frame.collect(holding.agg(pl.len().alias("\x01n"), pl.col("w0").sum().alias("\x01w")))
    return {int(group): (int(n), int(w)) for group, n, w in found.iter_rows()}


def _blocks_apart(frame: SourceTable, cells: Sequence[_Cell]) -> bool:
    """Whether a release's order statistics can have their blocks listed while its other numbers are sketched: no
    block is compared under a key whose numbers add up over groups (counts, sums; their groups' union is checked
    from the numbers of one kind, all sketched or all listed, see :mod:`.differences`)."""
    return not any(
        key == COUNT_KEY or key.startswith(SUM_PREFIX)
        for cell in cells
        if cell.func in _ORDER_FUNCS
        for key in _comparison_keys(frame, cell)
    )


def _direct_sketches(
    numbers: _Numbers,
    dataset: str,
    by: Sequence[str],
    cells: Sequence[_Cell],
    inputs: Mapping[tuple[str, str], _Input],
    rows: np.ndarray,
    counts: Mapping[str, np.ndarray],
    group_sums: np.ndarray,
    contributing_sums: Mapping[str, np.ndarray],
    held: Mapping[str, Mapping[int, tuple[int, int]]],
    keys_of: Mapping[str, frozenset[str]],
    bits: int,
) -> list[Sketch]:
    """The sketches of the sets :func:`_direct_sets` lists, with the same labels: per released number, its group's
    rows or the rows where its column contributes, less those holding a value k of them share (``held``: per
    column and group, how many hold it and their weights' sum)."""
    released = {cell.name: ~numbers.withheld(cell.name) for cell in cells}
    found: list[Sketch] = []
    for row in (int(r) for r in np.nonzero(numbers.kept)[0]):
        keys = tuple(numbers.grouped.get_column(f"k{i}")[row] for i in range(len(by)))
        group = f"group {keys!r}" if by else "all rows"
        emitted: dict[str | None, int] = {}  # the contributing column (None: the group's rows) -> place in found
        for cell in cells:
            if not released[cell.name][row]:
                continue
            spec = None if cell.column is None else inputs[(cell.column, cell.kind)]
            less = (0, 0) if spec is None else held.get(spec.v, {}).get(row, (0, 0))
            if spec is None or (spec.indicator is None and not less[0]) or counts[spec.v][row] - less[0] == rows[row]:
                bucket, label, size, total = None, group, int(rows[row]), int(group_sums[row])
            else:
                bucket = spec.v
                label = f"{group} {cell.shown}" if by else cell.shown
                size = int(counts[spec.v][row]) - less[0]
                total = int(contributing_sums[spec.v][row] if spec.indicator else group_sums[row]) - less[1]
            at = emitted.get(bucket)
            if at is None:
                emitted[bucket] = len(found)
                found.append(Sketch(dataset, label, size, total, keys_of[cell.name], row, bits))
            else:
                earlier = found[at]
                found[at] = Sketch(
                    dataset, earlier.label, earlier.size, earlier.total, earlier.keys | keys_of[cell.name], row, bits
                )
    return found


def _bucket(ids: np.ndarray) -> tuple[int, int, int]:
    """Where a set of sorted ids is looked for among the sets already emitted: its size and ends (cheap, where the
    ids' bytes as a key cost a copy and a hash of the whole set); equal sets share a bucket, and :func:`_emit`
    compares the sets within one exactly."""
    return (int(ids.size), int(ids[0]), int(ids[-1])) if ids.size else (0, 0, 0)


def _emit(found: list[RecordSet], emitted: dict[Any, list[int]], key: Any, record: RecordSet) -> None:
    """Add a number's record set, or its comparison keys to the same set emitted for another number."""
    places = emitted.setdefault(key, [])
    for at in places:
        dataset, label, ids, keys = found[at]
        if key is None or np.array_equal(ids, record[2]):
            found[at] = (dataset, label, ids, keys | record[3])
            return
    places.append(len(found))
    found.append(record)


def _comparison_keys(frame: SourceTable, cell: _Cell, dataset: str | None = None) -> frozenset[str]:
    """The keys under which a number's record set of ``dataset`` is compared with others (see :mod:`.differences`):
    every dataset column its value derives from, and ``count`` for numbers that count records (a statistic of a flag
    counts). After a join, the records of a dataset none of whose columns the number reads (the accounts behind a
    count of people) are compared as a count: the number says nothing of their values itself, but their values can
    have chosen its rows (a filter on them after the join, a join onto a few chosen accounts), and a group's count of
    people then says whether one account passed."""
    lineage = frame.lineage.get(cell.column, frozenset()) if cell.column is not None else frozenset()
    if dataset is not None and lineage and dataset not in {source for source, _ in lineage}:
        return _COUNTED
    if cell.column is None or cell.func == "count":
        return _COUNTED
    keys = {f"{source}:{column}" for source, column in lineage}
    if cell.func == "sum":  # sums add up over groups: their unions are compared too (see .differences)
        keys |= {f"{SUM_PREFIX}{key}" for key in keys}
    if cell.func == "nunique" or frame.dtype(cell.column) == pl.Boolean or not keys:
        keys.add(COUNT_KEY)
    return frozenset(keys)


def _number_sets(
    frame: SourceTable,
    numbers: _Numbers,
    by: Sequence[str],
    cells: Sequence[_Cell],
    values: Mapping[tuple[str, str], str],
    moded: set[str],
    k: int,
) -> list[RecordSet]:
    """The records behind each released number; one behind all of its group's rows is listed once, as the group."""
    grouped = numbers.grouped
    occurrences = list(enumerate(frame.records or ()))
    unique = {i for i, (_, hidden) in occurrences if hidden in frame.unique}
    released = {cell.name: ~numbers.withheld(cell.name) for cell in cells}
    found: list[RecordSet] = []

    def ids_at(column: str, row: int) -> np.ndarray:
        listed = grouped.get_column(column)[row]
        return np.asarray(listed.drop_nulls().to_numpy(), dtype=np.int64)

    for row in np.nonzero(numbers.kept)[0]:
        stoppable.check()  # NumPy from here on: an interrupt is seen between groups
        keys = tuple(grouped.get_column(f"k{i}")[int(row)] for i in range(len(by)))
        group = f"group {keys!r}" if by else "all rows"
        group_ids = {i: np.unique(ids_at(f"g_ids{i}", int(row))) for i, _ in occurrences}
        whole = {
            d: _union([group_ids[i] for i, (dd, _) in occurrences if dd == d]) for d in {d for _, (d, _) in occurrences}
        }
        emitted: dict[Any, list[int]] = {}

        for cell in cells:
            if not released[cell.name][row]:
                continue
            stoppable.check()
            per: dict[str, list[np.ndarray]] = {}
            for i, (dataset, _) in occurrences:
                if cell.column is None:
                    ids = group_ids[i]
                elif cell.func in _ORDER_FUNCS:  # the block's slice of the records sorted by value
                    ordered = grouped.get_column(f"{values[(cell.column, cell.kind)]}_sorted{i}")[int(row)].to_numpy()
                    start, end = _block_ranks(len(ordered), k, 0.5 if cell.q is None else cell.q)
                    ids = np.unique(ordered[start:end].astype(np.int64))
                else:
                    v = values[(cell.column, cell.kind)]
                    if i in unique:
                        ids = np.setdiff1d(group_ids[i], ids_at(f"{v}_out{i}", int(row)), assume_unique=True)
                    else:
                        ids = np.unique(ids_at(f"{v}_in{i}", int(row)))
                    common = grouped.get_column(f"{v}_fmax")[int(row)] if v in moded else None
                    if common is not None and common >= k:  # a value k records share is left out, as counted
                        ids = np.setdiff1d(ids, ids_at(f"{v}_hold{i}", int(row)))
                per.setdefault(dataset, []).append(ids)
            for dataset, parts in per.items():
                ids = _union(parts)
                if ids.size == whole[dataset].size:
                    label, ids = group, whole[dataset]
                else:
                    label = f"{group} {cell.shown}" if by else cell.shown
                compared = _comparison_keys(frame, cell, dataset)
                for record in [(dataset, label, ids, compared), *_sides(dataset, label, parts, ids, compared)]:
                    _emit(found, emitted, (dataset, *_bucket(record[2])), record)
    return found


def _check_withheld_groups_apart(
    frame: SourceTable, by: Sequence[str], grouped: pl.DataFrame, kept: np.ndarray, what: str, subjects: Sequence[str]
) -> None:
    """Refuse a grouped release whose withheld groups share a record of a dataset.

    How many groups a release withheld is reported with it (``attrs["confnb_suppressed"]``): a count that one record
    changes by one at most where it stands behind the rows of one group. A join that repeats a record on many rows
    (the target joined onto every row by a key of one value) can put one record behind many withheld groups, and a
    filter whose threshold differs per group then makes their number say where that record's value lies. Such a
    release is withheld whole, which says one bit."""
    repeating = [(dataset, hidden) for dataset, hidden in frame.records or () if hidden not in frame.unique]
    if not repeating or int((~kept).sum()) < 2:
        return
    key_names = [f"k{i}" for i in range(len(by))]
    withheld = grouped.filter(pl.Series(~kept, dtype=pl.Boolean)).select(key_names)
    keys = [_group_key(frame, name).alias(key) for key, name in zip(key_names, by, strict=True)]
    with engine_errors(what, subjects):
        rows = frame.data.select(*keys, *(pl.col(hidden) for _, hidden in repeating))
        rows = rows.join(withheld.lazy(), on=key_names, how="semi")
        most = [
            rows.select(*key_names, hidden)
            .drop_nulls(hidden)
            .unique()
            .group_by(hidden)
            .len()
            .select(pl.col("len").max().alias(hidden))
            for _, hidden in repeating
        ]
        found = frame.collect(pl.concat(most, how="horizontal")).row(0)
    shared = sorted({dataset for (dataset, _), groups in zip(repeating, found, strict=True) if (groups or 0) > 1})
    if shared:
        raise PolicyViolation(
            "release.min_group_size",
            shared,
            f"{what}: groups withheld as too small share records (a join repeats them on many rows), so how many "
            "were withheld could describe one record; the result is withheld whole",
        )


def _null_withheld(
    numbers: _Numbers, cells: Sequence[_Cell], keep: np.ndarray
) -> tuple[pl.DataFrame, dict[str, list[int]]]:
    """The kept groups with each withheld number set to null, and the row positions nulled per cell."""
    grouped = numbers.grouped.filter(pl.Series(keep, dtype=pl.Boolean))
    positions: dict[str, list[int]] = {}
    nulled = []
    for cell in cells:
        bad = numbers.withheld(cell.name)[keep]
        if bad.any():
            positions[cell.name] = [int(p) for p in np.nonzero(bad)[0]]
            nulled.append(
                pl.when(pl.Series(bad, dtype=pl.Boolean)).then(None).otherwise(pl.col(cell.name)).alias(cell.name)
            )
    return (grouped.with_columns(nulled) if nulled else grouped), positions


def _refuse(
    failing: Iterable[str], policies: Mapping[str, OutputPolicy], what: str, *, combined: bool = False
) -> PolicyViolation:
    """A number with too few contributing records; with ``combined``, numbers withheld by the rule on combinations
    of a release's numbers (see :mod:`.combinations`)."""
    datasets = sorted(set(failing))
    k = max(policies[d].min_group_size for d in datasets)
    if combined:
        return PolicyViolation(
            "release.difference",
            datasets,
            f"{what}: numbers of this result agree on all but fewer than {k} records of the dataset; their "
            "difference would describe those records",
        )
    return PolicyViolation(
        "release.min_group_size",
        datasets,
        f"{what} is computed from fewer than {k} contributing records of the dataset",
    )


# ---------------------------------------------------------------------------------------------------------------
# aggregate


def _aggregate(
    node: Aggregate, frame: SourceTable, policies: Mapping[str, OutputPolicy], want_sets: bool, sketch: bool
) -> _Out:
    inputs = [agg.column for agg in node.aggs if agg.column is not None]
    require_columns(frame, list(node.by) + inputs, "aggregate")
    used = {name: lineage_of(frame, name) for name in (*node.by, *inputs)}
    check_columns(used, policies, "aggregate")
    _check_order_statistics(((agg.column, agg.func) for agg in node.aggs), frame.datasets, "aggregate")

    subjects = [f"column {quote(c)} ({frame.arrow_type(c)})" for c in dict.fromkeys((*node.by, *inputs))]
    as_numbers = {agg.column for agg in node.aggs if agg.func in _NUMERIC_FUNCS}
    cells = []
    for position, agg in enumerate(node.aggs):
        # A count reads any form with NaN as null (the numeric one if there is one); min, max and nunique also need
        # -0.0 as 0.0; the numeric aggregations need numbers.
        if agg.func in _NUMERIC_FUNCS or (agg.func == "count" and agg.column in as_numbers):
            kind = "number"
        else:
            kind = "present" if agg.func == "count" else "plain"
        func = "rows" if agg.column is None else agg.func
        q = 0.5 if agg.func == "median" else agg.q
        cells.append(_Cell(f"a{position}", f"column {quote(agg.name)}", agg.column, func, kind, q))
    numbers = _numbers(frame, node.by, cells, policies, want_sets, "aggregate", subjects, sketch)

    if not node.by:
        if not numbers.kept[0]:
            _check_records({d: int(c[0]) for d, c in numbers.group_records.items()}, policies, "the aggregate")
        short = [(agg, cell) for agg, cell in zip(node.aggs, cells, strict=True) if numbers.withheld(cell.name)[0]]
        if short and (len(cells) == 1 or len(short) == len(cells)):  # a scalar, or nothing left: withhold it
            failing = [d for _, cell in short for d, groups in numbers.failing[cell.name].items() if groups[0]]
            if any(cell.name in numbers.combined for _, cell in short):
                raise _refuse(failing, policies, "aggregate", combined=True)
            raise _refuse(failing, policies, f"aggregate: {quote(short[0][0].name)}")
    else:
        _check_withheld_groups_apart(frame, node.by, numbers.grouped, numbers.kept, "aggregate", subjects)
    survivors, positions = _null_withheld(numbers, cells, numbers.kept)
    result = survivors.select(
        *(pl.col(f"k{i}").alias(name) for i, name in enumerate(node.by)),
        *(pl.col(cell.name).alias(agg.name) for agg, cell in zip(node.aggs, cells, strict=True)),
    )
    named = {cell.name: agg.name for agg, cell in zip(node.aggs, cells, strict=True)}
    return _Out(
        to_arrow(result, {}),
        int((~numbers.kept).sum()),
        {named[name]: rows for name, rows in positions.items()},
        numbers.record_sets,
        numbers.sketches,
    )


# ---------------------------------------------------------------------------------------------------------------
# value_counts


def _value_counts(
    node: ValueCounts, frame: SourceTable, policies: Mapping[str, OutputPolicy], want_sets: bool, sketch: bool
) -> _Out:
    require_columns(frame, [node.column], "value_counts")
    if node.column == "count":
        raise VaultError("value_counts: a column named 'count' would clash with the counts; rename it with assign")
    check_columns({node.column: lineage_of(frame, node.column)}, policies, "value_counts")
    sets = want_sets and frame.records is not None
    # Each value's records are its rows where every row is a distinct record: a count and an id sum sketch them.
    weights = _weights(frame) if sets and sketch else None
    if weights is not None:
        listed = [pl.col(weights[0]).sum().alias("w_sum")]
    else:
        listed = [pl.col(f"r{i}").alias(f"g_ids{i}") for i in range(len(frame.records or ()))] if sets else []
    with engine_errors("value_counts", [f"column {quote(node.column)} ({frame.arrow_type(node.column)})"]):
        weight = [] if weights is None else [pl.col(weights[0])]
        # Rows that are distinct records of one dataset: a value's records are counted by its rows, ids unread.
        by_rows = _rows_are_records(frame) and not (sets and weights is None)
        lazy = _work_frame(frame, [_group_key(frame, node.column).alias("k0"), *weight], records_too=not by_rows)
        # Counts cast to Int64 after the group-by (a cast inside an aggregation takes Polars off its fastest route)
        counted = [] if by_rows else _count_exprs(frame, "g", None)
        grouped_lazy = lazy.group_by("k0").agg(pl.len().alias("count_all"), *counted, *listed)
        grouped = frame.collect(grouped_lazy.sort(["count_all", "k0"], descending=[True, False], nulls_last=True))
        if node.dropna:  # after the group-by: Polars would filter every row for a non-null key before it
            grouped = grouped.drop_nulls("k0")
        tallies = [pl.col("count_all").cast(pl.Int64)]
        tallies += [pl.col("count_all").cast(pl.Int64).alias("g0")] if by_rows else [pl.col("^g[0-9]+$").cast(pl.Int64)]
        grouped = grouped.with_columns(tallies)
    ks = _min_sizes(frame, policies)
    keep = np.ones(grouped.height, dtype=bool)
    for dataset, counts in _counts(frame, grouped, "g").items():
        keep &= counts >= ks[dataset]
    _check_withheld_groups_apart(frame, [node.column], grouped, keep, "value_counts", [quote(node.column)])
    survivors = grouped.filter(pl.Series(keep, dtype=pl.Boolean))
    found: list[RecordSet] = []
    if weights is not None:
        dataset = (frame.records or ())[0][0]
        sketches = [
            Sketch(dataset, f"value {value!r}", int(n), int(total), _COUNTED, row, weights[1])
            for row, (value, n, total) in enumerate(survivors.select("k0", "count_all", "w_sum").iter_rows())
        ]
        result = survivors.select(pl.col("k0").alias(node.column), pl.col("count_all").alias("count"))
        return _Out(to_arrow(result, {}), int((~keep).sum()), {}, [], sketches)
    if sets:
        for row in range(survivors.height):
            per: dict[str, list[np.ndarray]] = {}
            for i, (dataset, _) in enumerate(frame.records or ()):
                listed_ids = survivors.get_column(f"g_ids{i}")[row].drop_nulls().to_numpy()
                per.setdefault(dataset, []).append(np.asarray(listed_ids, dtype=np.int64))
            label = f"value {survivors.get_column('k0')[row]!r}"
            for dataset, parts in sorted(per.items()):
                union = _union(parts)
                found += [(dataset, label, union, _COUNTED), *_sides(dataset, label, parts, union, _COUNTED)]
    result = survivors.select(pl.col("k0").alias(node.column), pl.col("count_all").alias("count"))
    return _Out(to_arrow(result, {}), int((~keep).sum()), {}, found)


# ---------------------------------------------------------------------------------------------------------------
# describe


_QUARTILES = (("25%", 0.25), ("50%", 0.5), ("75%", 0.75))


def _describe(
    node: Describe, frame: SourceTable, policies: Mapping[str, OutputPolicy], want_sets: bool, sketch: bool = False
) -> _Out:
    if node.columns is None:
        columns = [
            name
            for name in frame.columns
            if _describable(frame.dtype(name)) and not _never_released(lineage_of(frame, name), policies)
        ]
        if not columns:
            raise VaultError("describe: the table has no numeric columns that may be released")
    else:
        columns = list(node.columns)
        require_columns(frame, columns, "describe")
        for name in columns:
            if not _describable(frame.dtype(name)):
                raise VaultError(
                    f"describe: column {quote(name)} is {frame.arrow_type(name)}; describe covers numeric columns"
                )
        check_columns({name: lineage_of(frame, name) for name in columns}, policies, "describe")
    if "statistic" in columns:
        raise VaultError("describe: a column named 'statistic' would clash with the row labels; rename it")

    cells: list[_Cell] = []
    for i, name in enumerate(columns):
        for statistic in DESCRIBE_STATISTICS:
            q = dict(_QUARTILES).get(statistic)
            func = "quantile" if q is not None else statistic
            shown = f"column {quote(name)} statistic {quote(statistic)}"
            cells.append(_Cell(f"c{i}_{DESCRIBE_STATISTICS.index(statistic)}", shown, name, func, "float", q))
    subjects = [f"column {quote(name)} ({frame.arrow_type(name)})" for name in columns]
    numbers = _numbers(frame, (), cells, policies, want_sets, "describe", subjects, sketch)
    if not numbers.kept[0]:
        _check_records({d: int(c[0]) for d, c in numbers.group_records.items()}, policies, "describe")

    kept: dict[str, list[float | None]] = {}
    positions: dict[str, list[int]] = {}
    failing: set[str] = set()
    dropped = 0
    for i, name in enumerate(columns):
        mine = [cell for cell in cells if cell.name.startswith(f"c{i}_")]
        count = numbers.failing[mine[0].name]  # too few contributing records: the column is not described
        if any(groups[0] for groups in count.values()):
            failing.update(d for d, groups in count.items() if groups[0])
            dropped += 1
            continue
        statistics: list[float | None] = []
        for row, cell in enumerate(mine):
            value = numbers.grouped.get_column(cell.name)[0]
            if numbers.withheld(cell.name)[0]:
                positions.setdefault(name, []).append(row)
                value = None
            statistics.append(None if value is None else float(value))
        kept[name] = statistics
    if not kept:
        raise _refuse(failing, policies, "describe: every column")
    described = {name for name in kept}

    def of_described(label: str) -> bool:
        return any(f"column {quote(n)} " in label or label == "all rows" for n in described)

    sets = [s for s in numbers.record_sets if of_described(s[1])]
    sketches = None if numbers.sketches is None else [s for s in numbers.sketches if of_described(s.label)]
    arrays = [pa.array(DESCRIBE_STATISTICS, pa.string())] + [pa.array(v, pa.float64()) for v in kept.values()]
    return _Out(pa.table(arrays, names=["statistic", *kept]), dropped, positions, sets, sketches)


def _describable(dtype: Any) -> bool:
    return bool(dtype.is_integer() or dtype.is_float() or isinstance(dtype, pl.Decimal))


def _never_released(lineage: Lineage, policies: Mapping[str, OutputPolicy]) -> bool:
    return any(d not in policies or c in policies[d].never_release for d, c in lineage)
