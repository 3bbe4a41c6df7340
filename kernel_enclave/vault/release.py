"""The output policy engine for table results: what of an evaluated plan may leave the vault, and in what shape.

Raw rows never leave. A release plan's root is an aggregation (``aggregate``, ``value_counts``, ``describe``) or a
row ``count``; the vault computes it itself and enforces each dataset owner's :class:`OutputPolicy` on the facts it
computed, never on the text of the result:

- ``allow``: the result kind must be allowed by *every* dataset the plan touches;
- ``never_release``: no released column may be, or derive from, a never_release column (lineage from
  :mod:`kernel_enclave.vault.plan`); filter predicates and join keys do not put a column into the result;
- ``min_group_size``: every released row (a group, a value count, a described column, a row count) is computed from
  at least k records of each dataset, counted by the vault. Groups below k are dropped and counted in
  ``suppressed``; an ungrouped result below k is withheld. After a join the vault counts *distinct source records*
  per dataset, not rows, because a join can repeat one record many times;
- ``max_rows``: a released table has at most that many rows.

Several datasets: each rule is checked against each dataset's own policy, so a violation names exactly the datasets
whose rule failed; the released result reports the id of the combined (strictest) policy.

Null group keys are dropped, as pandas' ``groupby(dropna=True)`` default does; NaN counts as null throughout, as it
does in pandas.

Every aggregation runs as one Polars query over the evaluated frame: the group sizes, the distinct source records
of each dataset per group (from the hidden record-id columns a join leaves) and the ties of each extreme are
computed in the same group-by as the requested statistics, so the policy checks cost no second pass over the rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa  # type: ignore[import-untyped]  # pyarrow ships no type information

from confnb.policy.output import OutputPolicy, strictest
from kernel_enclave.vault.plan import (
    RELEASE_NODES,
    Agg,
    Aggregate,
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
)
from kernel_enclave.vault.protocol import PolicyViolation, VaultError

RAW_ROWS = "raw rows are never released; aggregate them (group_by/agg, value_counts, describe, count)"
DESCRIBE_STATISTICS = ("count", "mean", "std", "min", "25%", "50%", "75%", "max")
_NUMERIC_FUNCS = frozenset({"sum", "mean", "std", "var", "median", "quantile"})


@dataclass(frozen=True)
class Released:
    """A result the policy let through, in the shape the client rebuilds (DataFrame, Series or scalar)."""

    kind: str  # "aggregate" | "row_count" | "schema"
    table: pa.Table | None
    value: int | float | None
    index: tuple[str, ...]  # columns the client sets as the index
    series: bool  # the client squeezes the table to a Series
    suppressed: int  # groups (or described columns) withheld by min_group_size
    datasets: tuple[str, ...]
    policy_id: str


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
    plan: Mapping[str, Any], sources: Mapping[str, SourceTable], policies: Mapping[str, OutputPolicy]
) -> Released:
    """Evaluate a release plan and apply the output policy; raises PolicyViolation when the result is withheld."""
    node = parse_plan(plan)
    datasets = tuple(sorted(node_datasets(node, sources)))
    if not isinstance(node, RELEASE_NODES):
        raise PolicyViolation("release.allow", datasets, RAW_ROWS)
    kind = "row_count" if isinstance(node, Count) else "aggregate"
    policy_id = require_kind(kind, datasets, policies)
    frame = evaluate_node(node.input, sources)
    if isinstance(node, Count):
        _check_records(_records_total(frame, None), policies, "the row count")
        return Released("row_count", None, frame.num_rows, (), False, 0, datasets, policy_id)
    if isinstance(node, Aggregate):
        table, suppressed = _aggregate(node, frame, policies)
        index, series = node.by, len(node.aggs) == 1
    elif isinstance(node, ValueCounts):
        table, suppressed = _value_counts(node, frame, policies)
        index, series = (node.column,), True
    else:
        table, suppressed = _describe(node, frame, policies)
        index, series = ("statistic",), False
    _check_rows(table.num_rows, datasets, policies, "the result")
    return Released("aggregate", table, None, index, series, suppressed, datasets, policy_id)


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


def _record_exprs(frame: SourceTable, prefix: str, mask: pl.Expr | None = None) -> list[pl.Expr]:
    """Per dataset occurrence, the distinct records in a group (where ``mask`` holds); none before a join."""
    exprs = []
    for i, (_, hidden) in enumerate(frame.records or ()):
        ids = pl.col(f"r{i}") if mask is None else pl.col(f"r{i}").filter(mask.fill_null(False))
        exprs.append(_records_of(frame, hidden, ids).alias(f"{prefix}{i}"))
    return exprs


def _group_records(frame: SourceTable, grouped: pl.DataFrame, prefix: str, rows: str) -> dict[str, Any]:
    """Per group, the records of each dataset as NumPy: the rows, or the fewest distinct ids over its occurrences."""
    if frame.records is None:
        counts = grouped.get_column(rows).fill_null(0).to_numpy()
        return dict.fromkeys(frame.datasets, counts)
    records: dict[str, Any] = {}
    for i, (dataset, _) in enumerate(frame.records):
        counts = grouped.get_column(f"{prefix}{i}").fill_null(0).to_numpy()
        records[dataset] = counts if dataset not in records else np.minimum(records[dataset], counts)
    return records


def _kept_groups(rows: int, records: Mapping[str, Any], policies: Mapping[str, OutputPolicy]) -> Any:
    """Which grouped rows have at least k records of every dataset, as NumPy."""
    kept = np.ones(rows, dtype=bool)
    for dataset, counts in records.items():
        kept &= counts >= _policy(dataset, policies, "release.min_group_size").min_group_size
    return kept


def _lone(records: Mapping[str, Any], policies: Mapping[str, OutputPolicy], rows: int) -> Any:
    """Which grouped rows have fewer than k records of some dataset, as NumPy."""
    return ~_kept_groups(rows, records, policies)


def _suppress(
    grouped: pl.DataFrame, records: Mapping[str, Any], policies: Mapping[str, OutputPolicy], grouped_by: bool, what: str
) -> tuple[pl.DataFrame, int]:
    """Drop groups computed from fewer than k records of any dataset; without a group-by, withhold instead."""
    if not grouped_by:
        _check_records({d: int(counts[0]) for d, counts in records.items()}, policies, what)
        return grouped, 0
    keep = _kept_groups(grouped.height, records, policies)
    kept = grouped.filter(pl.Series(keep, dtype=pl.Boolean))
    return kept, grouped.height - kept.height


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


def _work_frame(frame: SourceTable, exprs: list[pl.Expr]) -> pl.LazyFrame:
    """The columns an aggregation reads, with the record ids (``r0``...) of each dataset occurrence."""
    records = [pl.col(column).alias(f"r{i}") for i, (_, column) in enumerate(frame.records or ())]
    if not exprs and not records:  # a count over no columns: something to count rows over
        return frame.data.with_row_index("\x01rows").select("\x01rows")
    return frame.data.select([*exprs, *records])


# ---------------------------------------------------------------------------------------------------------------
# aggregate


def _aggregate(node: Aggregate, frame: SourceTable, policies: Mapping[str, OutputPolicy]) -> tuple[pa.Table, int]:
    inputs = [agg.column for agg in node.aggs if agg.column is not None]
    require_columns(frame, list(node.by) + inputs, "aggregate")
    used = {name: lineage_of(frame, name) for name in (*node.by, *inputs)}
    check_columns(used, policies, "aggregate")

    subjects = [f"column {quote(c)} ({frame.arrow_type(c)})" for c in dict.fromkeys((*node.by, *inputs))]
    key_names = [f"k{i}" for i in range(len(node.by))]
    work: list[pl.Expr] = [_key_expr(frame, name).alias(k) for k, name in zip(key_names, node.by, strict=True)]
    value_names: dict[tuple[str, str], str] = {}  # (column, work kind) -> work column
    as_numbers = {agg.column for agg in node.aggs if agg.func in _NUMERIC_FUNCS}

    def kind_of(agg: Agg) -> str:
        """A count reads any form with NaN as null (the numeric one if there is one); min, max and nunique also
        need -0.0 as 0.0; the numeric aggregations need numbers."""
        if agg.func in _NUMERIC_FUNCS or (agg.func == "count" and agg.column in as_numbers):
            return "number"
        return "present" if agg.func == "count" else "plain"

    for agg in node.aggs:
        if agg.column is None:
            continue
        kind = kind_of(agg)
        if kind == "number":
            expr = _value_expr(frame, agg.column, agg.func)
        else:
            expr = _present_expr(frame, agg.column) if kind == "present" else _key_expr(frame, agg.column)
        if (agg.column, kind) not in value_names:
            value_names[(agg.column, kind)] = f"v{len(value_names)}"
            work.append(expr.alias(value_names[(agg.column, kind)]))
    strictest_k = max(
        (_policy(d, policies, "release.min_group_size").min_group_size for d in frame.datasets), default=1
    )

    aggregations = [pl.len().cast(pl.Int64).alias("count_all"), *_record_exprs(frame, "n")]
    outputs: dict[str, str] = {}  # agg name -> grouped column
    extremes: list[tuple[str, str]] = []  # (agg name, grouped column holding the ties' records prefix)
    quantiles: list[tuple[str, str, float]] = []  # (agg name, valid-count column, q)
    seen: set[str] = set()
    for position, agg in enumerate(node.aggs):
        if agg.column is None:
            outputs[agg.name] = "count_all"
            continue
        work_name = value_names[(agg.column, kind_of(agg))]
        value = pl.col(work_name)
        output = f"a{position}"
        outputs[agg.name] = output
        if agg.func == "count":
            aggregations.append(value.count().cast(pl.Int64).alias(output))
        elif agg.func == "nunique":
            aggregations.append(_distinct(value).alias(output))
        elif agg.func == "sum":
            dtype = frame.dtype(agg.column)
            widen = (dtype.is_integer() and dtype != pl.UInt64) or dtype == pl.Boolean
            widened = value.cast(pl.Int64) if widen else value
            aggregations.append(widened.sum().alias(output))
        elif agg.func == "mean":
            aggregations.append(value.cast(pl.Float64).mean().alias(output))
        elif agg.func in ("std", "var"):
            as_float = value.cast(pl.Float64)
            aggregations.append((as_float.std(ddof=1) if agg.func == "std" else as_float.var(ddof=1)).alias(output))
        elif agg.func in ("median", "quantile"):
            q = 0.5 if agg.q is None else agg.q
            aggregations.append(value.cast(pl.Float64).quantile(q, interpolation="linear").alias(output))
            valid = f"{work_name}_valid"
            if valid not in seen:
                seen.add(valid)
                aggregations.append(value.count().cast(pl.Int64).alias(valid))
            quantiles.append((agg.name, valid, q))
        else:  # min, max: also the records that hold the extreme, so a lone one is withheld
            extreme = value.min() if agg.func == "min" else value.max()
            aggregations.append(extreme.alias(output))
            ties = value == extreme
            aggregations.append(ties.fill_null(False).sum().cast(pl.Int64).alias(f"{output}_ties"))
            aggregations.extend(_record_exprs(frame, f"{output}_t", ties))
            extremes.append((agg.name, output))

    with engine_errors("aggregate", subjects):
        lazy = _work_frame(frame, work)
        if key_names:
            # Rows with a null key form groups of their own, dropped afterwards: cheaper than filtering every row.
            groups = lazy.group_by(key_names).agg(aggregations)
            grouped = frame.collect(groups.drop_nulls(key_names).sort(key_names))
        else:
            grouped = frame.collect(lazy.select(aggregations))

    rows = grouped.height
    records = _group_records(frame, grouped, "n", "count_all")
    kept = _kept_groups(rows, records, policies)
    hidden = 0
    masks: dict[str, Any] = {}
    for _, output in extremes:
        shared = _group_records(frame, grouped, f"{output}_t", f"{output}_ties")
        lone = _lone(shared, policies, rows) & grouped.get_column(output).is_not_null().to_numpy()
        hidden += int((lone & kept).sum())
        masks[output] = lone
    for name, valid, q in quantiles:
        # Near the ends a quantile is one record's value (q = 1 is the maximum): fewer than k records at or below
        # it, or at or above it, and it is withheld.
        n_valid = grouped.get_column(valid).to_numpy()
        position = q * np.maximum(n_valid - 1, 0)
        low, high = np.floor(position), np.ceil(position)
        tail = (n_valid > 0) & ((low + 1 < strictest_k) | (n_valid - high < strictest_k))
        hidden += int((tail & kept).sum())
        output = outputs[name]
        masks[output] = masks[output] | tail if output in masks else tail
    if masks:
        grouped = grouped.with_columns(
            pl.when(pl.Series(mask, dtype=pl.Boolean)).then(None).otherwise(pl.col(output)).alias(output)
            for output, mask in masks.items()
        )
    result = grouped.select(
        *(pl.col(k).alias(name) for k, name in zip(key_names, node.by, strict=True)),
        *(pl.col(outputs[agg.name]).alias(agg.name) for agg in node.aggs),
    )
    survivors, suppressed = _suppress(result, records, policies, bool(node.by), "the aggregate")
    return to_arrow(survivors, {}), suppressed + hidden


# ---------------------------------------------------------------------------------------------------------------
# value_counts


def _value_counts(node: ValueCounts, frame: SourceTable, policies: Mapping[str, OutputPolicy]) -> tuple[pa.Table, int]:
    require_columns(frame, [node.column], "value_counts")
    if node.column == "count":
        raise VaultError("value_counts: a column named 'count' would clash with the counts; rename it with assign")
    check_columns({node.column: lineage_of(frame, node.column)}, policies, "value_counts")
    with engine_errors("value_counts", [f"column {quote(node.column)} ({frame.arrow_type(node.column)})"]):
        lazy = _work_frame(frame, [_key_expr(frame, node.column).alias("k0")])
        grouped_lazy = lazy.group_by("k0").agg(pl.len().cast(pl.Int64).alias("count_all"), *_record_exprs(frame, "n"))
        if node.dropna:
            grouped_lazy = grouped_lazy.drop_nulls("k0")
        grouped = frame.collect(grouped_lazy.sort(["count_all", "k0"], descending=[True, False], nulls_last=True))
    records = _group_records(frame, grouped, "n", "count_all")
    result = grouped.select(pl.col("k0").alias(node.column), pl.col("count_all").alias("count"))
    survivors, suppressed = _suppress(result, records, policies, True, "the value counts")
    return to_arrow(survivors, {}), suppressed


# ---------------------------------------------------------------------------------------------------------------
# describe


def _describe(node: Describe, frame: SourceTable, policies: Mapping[str, OutputPolicy]) -> tuple[pa.Table, int]:
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

    exprs: list[pl.Expr] = []
    work = [
        (
            pl.col(name).cast(pl.Float64) if name in frame.nan_free else pl.col(name).cast(pl.Float64).fill_nan(None)
        ).alias(f"c{i}")
        for i, name in enumerate(columns)
    ]
    for i in range(len(columns)):
        c = pl.col(f"c{i}")
        present = c.is_not_null()
        exprs += [
            c.count().cast(pl.Int64).alias(f"c{i}_n"),
            *_record_exprs(frame, f"c{i}_r", present),
            c.count().cast(pl.Float64).alias(f"c{i}_count"),
            c.mean().alias(f"c{i}_mean"),
            c.std(ddof=1).alias(f"c{i}_std"),
            c.min().alias(f"c{i}_min"),
            *(c.quantile(q, interpolation="linear").alias(f"c{i}_{label}") for q, label in _QUARTILES),
            c.max().alias(f"c{i}_max"),
        ]
        for label, extreme in (("min", c.min()), ("max", c.max())):
            ties = c == extreme
            exprs.append(ties.fill_null(False).sum().cast(pl.Int64).alias(f"c{i}_{label}_ties"))
            exprs.extend(_record_exprs(frame, f"c{i}_{label}_t", ties))
    with engine_errors("describe", [f"column {quote(name)} ({frame.arrow_type(name)})" for name in columns]):
        stats = frame.collect(_work_frame(frame, work).select(exprs))

    k = max(_policy(d, policies, "release.min_group_size").min_group_size for d in frame.datasets)
    kept: dict[str, Any] = {}
    suppressed = 0
    failing: set[str] = set()
    for i, name in enumerate(columns):
        records = {d: int(v[0]) for d, v in _group_records(frame, stats, f"c{i}_r", f"c{i}_n").items()}
        short = [d for d, n in records.items() if n < _policy(d, policies, "release.min_group_size").min_group_size]
        if short:
            failing.update(short)
            suppressed += 1
            continue
        statistics: list[float | None] = [stats.get_column(f"c{i}_{s}").item() for s in _STAT_COLUMNS]
        count = int(statistics[0] or 0)
        for row, q in ((4, 0.25), (5, 0.5), (6, 0.75)):
            position = q * max(count - 1, 0)
            if statistics[row] is not None and (int(position) + 1 < k or count - math.ceil(position) < k):
                statistics[row] = None  # a quartile near an end is one record's value: see _aggregate
                suppressed += 1
        for row, label in ((DESCRIBE_STATISTICS.index("min"), "min"), (DESCRIBE_STATISTICS.index("max"), "max")):
            if statistics[row] is None:
                continue
            holders = _group_records(frame, stats, f"c{i}_{label}_t", f"c{i}_{label}_ties")
            if any(int(n[0]) < policies[d].min_group_size for d, n in holders.items()):
                statistics[row] = None  # one record's exact value: see _aggregate
                suppressed += 1
        kept[name] = statistics
    if not kept:
        k = max(policies[d].min_group_size for d in failing)
        raise PolicyViolation(
            "release.min_group_size",
            sorted(failing),
            f"describe: every column is computed from fewer than {k} records of the dataset",
        )
    arrays = [pa.array(DESCRIBE_STATISTICS, pa.string())] + [pa.array(v, pa.float64()) for v in kept.values()]
    return pa.table(arrays, names=["statistic", *kept]), suppressed


_QUARTILES = ((0.25, "q25"), (0.5, "q50"), (0.75, "q75"))
_STAT_COLUMNS = ("count", "mean", "std", "min", "q25", "q50", "q75", "max")


def _describable(dtype: Any) -> bool:
    return bool(dtype.is_integer() or dtype.is_float() or isinstance(dtype, pl.Decimal))


def _never_released(lineage: Lineage, policies: Mapping[str, OutputPolicy]) -> bool:
    return any(d not in policies or c in policies[d].never_release for d, c in lineage)
