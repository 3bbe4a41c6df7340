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
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]  # pyarrow ships no type information
import pyarrow.compute as pc  # type: ignore[import-untyped]

from confnb.policy.output import OutputPolicy, strictest
from kernel_enclave.vault.plan import (
    RELEASE_NODES,
    Aggregate,
    Count,
    Describe,
    Lineage,
    SourceTable,
    ValueCounts,
    arrow_errors,
    empty_sources,
    evaluate_node,
    lineage_of,
    nan_to_null,
    node_datasets,
    parse_plan,
    quote,
    require_columns,
    schema_of,
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
        return Released("row_count", None, frame.table.num_rows, (), False, 0, datasets, policy_id)
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
    found = evaluate_node(node, empty_sources(sources)).table.schema
    return pa.schema([pa.field(f.name, bare_type(f.type), f.nullable) for f in found]).empty_table()


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
        result["rows"] = frame.table.num_rows
    except PolicyViolation as exc:
        withheld["rows"] = str(exc)
    withheld["values"] = RAW_ROWS
    result["withheld"] = withheld
    return result


# ---------------------------------------------------------------------------------------------------------------
# Record counting


def _records_total(frame: SourceTable, mask: Any) -> dict[str, int]:
    """Records of each dataset behind the rows (where ``mask`` is true): distinct source records after a join."""
    if frame.record_ids is None:
        rows = frame.table.num_rows if mask is None else int(pc.sum(mask).as_py() or 0)
        return dict.fromkeys(frame.datasets, rows)
    records: dict[str, int] = {}
    for dataset, ids in frame.record_ids:
        chosen = ids if mask is None else ids.filter(mask)
        count = int(pc.count_distinct(chosen, mode="only_valid").as_py())
        records[dataset] = min(records.get(dataset, count), count)
    return records


def _suppress(
    grouped: pa.Table, records: Mapping[str, Any], policies: Mapping[str, OutputPolicy], grouped_by: bool, what: str
) -> tuple[pa.Table, int]:
    """Drop groups computed from fewer than k records of any dataset; without a group-by, withhold instead."""
    if not grouped_by:
        _check_records({d: int(counts[0].as_py()) for d, counts in records.items()}, policies, what)
        return grouped, 0
    keep = pa.chunked_array([pa.array(np.ones(grouped.num_rows, dtype=bool))])
    for dataset, counts in records.items():
        k = _policy(dataset, policies, "release.min_group_size").min_group_size
        keep = pc.and_(keep, pc.greater_equal(counts, k))
    kept = grouped.filter(keep)
    return kept, grouped.num_rows - kept.num_rows


def _record_aggregations(frame: SourceTable, arrays: dict[str, Any]) -> list[tuple[str, str]]:
    """Add each dataset occurrence's record ids to the work table; returns (work column, dataset) pairs."""
    pairs = []
    for i, (dataset, ids) in enumerate(frame.record_ids or ()):
        arrays[f"r{i}"] = ids
        pairs.append((f"r{i}", dataset))
    return pairs


def _count_aggregations(pairs: Sequence[tuple[str, str]]) -> list[tuple[Any, ...]]:
    """The group size (always computed, requested or not) and the distinct records of each dataset occurrence."""
    distinct = pc.CountOptions(mode="only_valid")
    return [([], "count_all"), *((work, "count_distinct", distinct) for work, _ in pairs)]


def _group_records(frame: SourceTable, grouped: pa.Table, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Per group, the records of each dataset: the group size, or distinct record ids after a join."""
    if frame.record_ids is None:
        return dict.fromkeys(frame.datasets, grouped.column("count_all"))
    records: dict[str, Any] = {}
    for work, dataset in pairs:
        counts = grouped.column(f"{work}_count_distinct")
        records[dataset] = counts if dataset not in records else pc.min_element_wise(records[dataset], counts)
    return records


# ---------------------------------------------------------------------------------------------------------------
# aggregate


def _aggregate(node: Aggregate, frame: SourceTable, policies: Mapping[str, OutputPolicy]) -> tuple[pa.Table, int]:
    inputs = [agg.column for agg in node.aggs if agg.column is not None]
    require_columns(frame, list(node.by) + inputs, "aggregate")
    used = {name: lineage_of(frame, name) for name in (*node.by, *inputs)}
    check_columns(used, policies, "aggregate")

    subjects = [f"column {quote(c)} ({frame.table.column(c).type})" for c in dict.fromkeys((*node.by, *inputs))]
    arrays: dict[str, Any] = {}
    key_names = [f"k{i}" for i in range(len(node.by))]
    value_names: dict[tuple[str, bool], str] = {}  # (column, as number) -> work column
    with arrow_errors("aggregate", subjects):
        for work, name in zip(key_names, node.by, strict=True):
            arrays[work] = _key_column(frame.table.column(name))
        for agg in node.aggs:
            if agg.column is None:
                continue
            numeric = agg.func in _NUMERIC_FUNCS
            if (agg.column, numeric) not in value_names:
                column = frame.table.column(agg.column)
                work = f"v{len(value_names)}"
                value_names[(agg.column, numeric)] = work
                arrays[work] = _value_column(column, agg.func, agg.column) if numeric else _plain_column(column)
            elif numeric:
                _value_column(frame.table.column(agg.column), agg.func, agg.column)  # type check only
        pairs = _record_aggregations(frame, arrays)
        work_table = _drop_null_keys(pa.table(arrays) if arrays else _rows_only(frame.table.num_rows), key_names)

    aggregations = _count_aggregations(pairs)
    requested: set[str] = set()
    outputs: dict[str, str] = {}  # agg name -> grouped column
    quantiles: dict[str, list[tuple[str, float]]] = {}  # work column -> [(agg name, q)]
    for agg in node.aggs:
        if agg.column is None:
            outputs[agg.name] = "count_all"
            continue
        work = value_names[(agg.column, agg.func in _NUMERIC_FUNCS)]
        if agg.func in ("median", "quantile"):
            quantiles.setdefault(work, []).append((agg.name, 0.5 if agg.q is None else agg.q))
            continue
        function, options = _HASH_AGGREGATES[agg.func]
        output = f"{work}_{function}"
        if output not in requested:
            requested.add(output)
            aggregations.append((work, function, options) if options is not None else (work, function))
        outputs[agg.name] = output

    with arrow_errors("aggregate", subjects):
        grouped = work_table.group_by(key_names, use_threads=True).aggregate(aggregations)
        if key_names:
            grouped = grouped.sort_by([(k, "ascending") for k in key_names])
        quantile_columns: dict[str, Any] = {}
        groups = _quantile_groups(work_table, grouped, key_names) if quantiles else None
        strictest_k = max(
            (_policy(d, policies, "release.min_group_size").min_group_size for d in frame.datasets), default=1
        )
        tails = np.zeros(grouped.num_rows, dtype=np.int64)
        for work, wanted in quantiles.items():
            assert groups is not None
            values, hidden_tails = _grouped_quantiles(
                work_table.column(work), groups, [q for _, q in wanted], strictest_k
            )
            tails += hidden_tails
            quantile_columns.update({name: array for (name, _), array in zip(wanted, values, strict=True)})

    result_arrays = [grouped.column(k) for k in key_names]
    for agg in node.aggs:
        result_arrays.append(quantile_columns[agg.name] if agg.name in quantile_columns else grouped[outputs[agg.name]])
    result = pa.table(result_arrays, names=[*node.by, *(agg.name for agg in node.aggs)])
    records = _group_records(frame, grouped, pairs)
    with arrow_errors("aggregate", subjects):
        result, hidden = _hide_lone_extremes(
            result, grouped, work_table, key_names, node, value_names, pairs, frame, records, policies
        )
    kept_groups = _kept_groups(result.num_rows, records, policies)
    hidden += int(tails[kept_groups].sum()) if quantiles else 0
    kept, suppressed = _suppress(result, records, policies, bool(node.by), "the aggregate")
    return kept, suppressed + hidden


def _kept_groups(rows: int, records: Mapping[str, Any], policies: Mapping[str, OutputPolicy]) -> Any:
    """Which grouped rows have at least k records of every dataset (what :func:`_suppress` keeps), as NumPy."""
    kept = np.ones(rows, dtype=bool)
    for dataset, counts in records.items():
        k = _policy(dataset, policies, "release.min_group_size").min_group_size
        kept &= pc.fill_null(pc.greater_equal(counts, k), False).to_numpy(zero_copy_only=False)
    return kept


def _hide_lone_extremes(
    result: pa.Table,
    grouped: pa.Table,
    work_table: pa.Table,
    key_names: Sequence[str],
    node: Aggregate,
    value_names: Mapping[tuple[str, bool], str],
    pairs: list[tuple[str, str]],
    frame: SourceTable,
    records: Mapping[str, Any],
    policies: Mapping[str, OutputPolicy],
) -> tuple[pa.Table, int]:
    """A minimum or maximum is one record's value: shown only when at least k records share it.

    Everything else in a group of k records blends them; an extreme names one of them exactly (the one outlier
    salary, the oldest patient). So each min/max cell whose value fewer than k records hold is withheld (null);
    the count of withheld cells joins the reply's ``suppressed``.
    """
    hidden = 0
    group_kept = pa.chunked_array([pa.array(_kept_groups(result.num_rows, records, policies))])
    for position, agg in enumerate(node.aggs):
        if agg.func not in ("min", "max") or agg.column is None or result.num_rows == 0:
            continue
        work = value_names[(agg.column, agg.func in _NUMERIC_FUNCS)]
        index = len(key_names) + position
        extremes = result.column(index)
        if key_names:
            keyed = pa.table([*(grouped.column(k) for k in key_names), extremes], names=[*key_names, "\x00extreme"])
            joined = work_table.join(keyed, keys=list(key_names), join_type="inner")
            ties = joined.filter(pc.equal(joined.column(work), joined.column("\x00extreme")))
            counted = ties.group_by(list(key_names)).aggregate(_count_aggregations(pairs))
            aligned = grouped.select(list(key_names)).join(counted, keys=list(key_names), join_type="left outer")
            aligned = aligned.sort_by([(k, "ascending") for k in key_names])
            shared = _group_records(frame, aligned, pairs)
            shared = {d: pc.fill_null(counts, 0) for d, counts in shared.items()}
        else:
            mask = pc.fill_null(pc.equal(work_table.column(work), extremes[0]), False)
            shared = {d: pa.chunked_array([pa.array([n])]) for d, n in _records_total(frame, mask).items()}
        lone = pa.chunked_array([pa.array(np.zeros(result.num_rows, dtype=bool))])
        for dataset, counts in shared.items():
            k = _policy(dataset, policies, "release.min_group_size").min_group_size
            lone = pc.or_(lone, pc.less(counts, k))
        lone = pc.and_(lone, pc.is_valid(extremes))
        if pc.any(lone).as_py():
            hidden += int(pc.sum(pc.and_(lone, group_kept)).as_py() or 0)  # cells of groups that stay
            masked = pc.if_else(lone, pa.scalar(None, extremes.type), extremes)
            result = result.set_column(index, result.schema.field(index), masked)
    return result, hidden


_HASH_AGGREGATES: dict[str, tuple[str, Any]] = {
    "count": ("count", pc.CountOptions(mode="only_valid")),
    "nunique": ("count_distinct", pc.CountOptions(mode="only_valid")),
    "sum": ("sum", pc.ScalarAggregateOptions(skip_nulls=True, min_count=0)),  # pandas: an empty sum is 0
    "mean": ("mean", None),
    "min": ("min", None),
    "max": ("max", None),
    "std": ("stddev", pc.VarianceOptions(ddof=1)),
    "var": ("variance", pc.VarianceOptions(ddof=1)),
}


def _rows_only(rows: int) -> pa.Table:
    """A table with ``rows`` rows and one placeholder column, for a count over a table without columns."""
    return pa.table({"_": pa.nulls(rows)})


def _decoded(column: Any) -> Any:
    if pa.types.is_dictionary(column.type):
        return column.cast(column.type.value_type)
    return column


def _key_column(column: Any) -> Any:
    """A group key as pandas sees it: decoded, NaN as null, and -0.0 the same group as 0.0."""
    column = nan_to_null(_decoded(column))
    if pa.types.is_floating(column.type):
        column = pc.add(column, pa.scalar(0.0, column.type))
    return column


def _plain_column(column: Any) -> Any:
    """An input of count, nunique, min or max: -0.0 and 0.0 are one value, as pandas counts them."""
    return _key_column(column)


def _value_column(column: Any, func: str, name: str) -> Any:
    """An input of a numeric aggregation: booleans count as 0/1 (as in pandas), decimals as floats."""
    column = _decoded(column)
    kind = column.type
    if pa.types.is_boolean(kind) or pa.types.is_decimal(kind):
        return column.cast(pa.int64() if pa.types.is_boolean(kind) else pa.float64())
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
        raise VaultError(f"aggregate: {func} needs a numeric column; {quote(name)} is {kind}")
    return nan_to_null(column)


def _drop_null_keys(table: pa.Table, keys: Sequence[str]) -> pa.Table:
    """pandas' groupby default (dropna=True): a row with a null key belongs to no group."""
    if not any(table.column(k).null_count for k in keys):
        return table
    valid = None
    for k in keys:
        present = pc.is_valid(table.column(k))
        valid = present if valid is None else pc.and_(valid, present)
    return table.filter(valid)


def _group_codes(key_columns: Sequence[Any]) -> Any:
    """A dense integer code per row such that rows share a code exactly when all their keys are equal."""
    codes = None
    for column in key_columns:
        array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        if pa.types.is_boolean(array.type):
            array = array.cast(pa.int8())
        encoded = pc.dictionary_encode(array)
        if encoded.indices.null_count:  # null keys were dropped before grouping; anything else is a bug
            raise VaultError("aggregate: a null group key reached the quantile computation")
        indices = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        if codes is None:
            codes = indices
        else:
            combined = codes * len(encoded.dictionary) + indices
            codes = np.unique(combined, return_inverse=True)[1].astype(np.int64)
    return codes


def _quantile_groups(table: pa.Table, grouped: pa.Table, keys: Sequence[str]) -> tuple[Any, Any, int]:
    """Group codes of the work rows and of the grouped rows (computed together, so they agree), and their count."""
    rows, groups = table.num_rows, grouped.num_rows
    if not keys:
        return np.zeros(rows, dtype=np.int64), np.zeros(groups, dtype=np.int64), 1
    key_columns = [pa.chunked_array(table.column(k).chunks + grouped.column(k).chunks) for k in keys]
    all_codes = _group_codes(key_columns)
    size = int(all_codes.max()) + 1 if len(all_codes) else 0
    return all_codes[:rows], all_codes[rows:], size


def _grouped_quantiles(
    values_column: Any, groups: tuple[Any, Any, int], qs: Sequence[float], k: int = 1
) -> tuple[list[Any], Any]:
    """Exact per-group quantiles with linear interpolation (pandas' default), aligned with the grouped rows.

    Sorting by value and then, stably, by group code puts each group's values in a contiguous sorted run with NaN
    (null) last; the quantile positions of all groups are then NumPy arithmetic, with no per-group Python loop.
    """
    codes, grouped_codes, size = groups
    rows = len(codes)
    values = values_column.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
    by_value = np.argsort(values)  # NaN sorts last
    small_codes = codes[by_value].astype(np.min_scalar_type(max(size - 1, 0)))  # small ints sort by radix
    ordered = values[by_value[np.argsort(small_codes, kind="stable")]]
    counts = np.bincount(codes, minlength=size)
    starts = (np.cumsum(counts) - counts)[grouped_codes]
    n_valid = np.bincount(codes, weights=~np.isnan(values), minlength=size).astype(np.int64)[grouped_codes]
    empty = n_valid == 0
    results = []
    hidden = np.zeros(len(grouped_codes), dtype=np.int64)
    for q in qs:
        position = q * np.maximum(n_valid - 1, 0)
        low = np.floor(position).astype(np.int64)
        high = np.ceil(position).astype(np.int64)
        fraction = position - low
        # Near the ends a quantile is one record's value (q = 1 is the maximum): fewer than k records at or below
        # it, or at or above it, and it is withheld.
        tail = ~empty & ((low + 1 < k) | (n_valid - high < k))
        hidden += tail
        if rows:
            low_values = ordered[np.minimum(starts + low, rows - 1)]
            high_values = ordered[np.minimum(starts + high, rows - 1)]
        else:
            low_values = high_values = np.full(len(grouped_codes), np.nan)
        with np.errstate(invalid="ignore"):
            interpolated = low_values + (high_values - low_values) * fraction
        results.append(pa.chunked_array([pa.array(interpolated, pa.float64(), mask=empty | tail)]))
    return results, hidden


# ---------------------------------------------------------------------------------------------------------------
# value_counts


def _value_counts(node: ValueCounts, frame: SourceTable, policies: Mapping[str, OutputPolicy]) -> tuple[pa.Table, int]:
    require_columns(frame, [node.column], "value_counts")
    if node.column == "count":
        raise VaultError("value_counts: a column named 'count' would clash with the counts; rename it with assign")
    check_columns({node.column: lineage_of(frame, node.column)}, policies, "value_counts")
    with arrow_errors("value_counts", [f"column {quote(node.column)} ({frame.table.column(node.column).type})"]):
        arrays: dict[str, Any] = {"k0": _key_column(frame.table.column(node.column))}
        pairs = _record_aggregations(frame, arrays)
        work_table = pa.table(arrays)
        if node.dropna:
            work_table = _drop_null_keys(work_table, ["k0"])
        aggregations = _count_aggregations(pairs)
        grouped = work_table.group_by(["k0"], use_threads=True).aggregate(aggregations)
        grouped = grouped.sort_by([("count_all", "descending"), ("k0", "ascending")])
    result = pa.table([grouped.column("k0"), grouped.column("count_all")], names=[node.column, "count"])
    records = _group_records(frame, grouped, pairs)
    return _suppress(result, records, policies, True, "the value counts")


# ---------------------------------------------------------------------------------------------------------------
# describe


def _describe(node: Describe, frame: SourceTable, policies: Mapping[str, OutputPolicy]) -> tuple[pa.Table, int]:
    table = frame.table
    if node.columns is None:
        columns = [
            f.name
            for f in table.schema
            if _describable(f.type) and not _never_released(lineage_of(frame, f.name), policies)
        ]
        if not columns:
            raise VaultError("describe: the table has no numeric columns that may be released")
    else:
        columns = list(node.columns)
        require_columns(frame, columns, "describe")
        for name in columns:
            kind = table.schema.field(name).type
            if not _describable(kind):
                raise VaultError(f"describe: column {quote(name)} is {kind}; describe covers numeric columns")
        check_columns({name: lineage_of(frame, name) for name in columns}, policies, "describe")
    if "statistic" in columns:
        raise VaultError("describe: a column named 'statistic' would clash with the row labels; rename it")

    kept: dict[str, Any] = {}
    suppressed = 0
    failing: set[str] = set()
    for name in columns:
        with arrow_errors("describe", [f"column {quote(name)} ({table.schema.field(name).type})"]):
            column = nan_to_null(_decoded(table.column(name)))
            if pa.types.is_decimal(column.type):
                column = column.cast(pa.float64())
            present = pc.is_valid(column)
            records = _records_total(frame, present)
            short = [d for d, n in records.items() if n < _policy(d, policies, "release.min_group_size").min_group_size]
            if short:
                failing.update(short)
                suppressed += 1
                continue
            statistics = _describe_column(column)
            k = max(_policy(d, policies, "release.min_group_size").min_group_size for d in frame.datasets)
            count = int(statistics[0] or 0)
            for row, q in ((4, 0.25), (5, 0.5), (6, 0.75)):
                position = q * max(count - 1, 0)
                if statistics[row] is not None and (int(position) + 1 < k or count - math.ceil(position) < k):
                    statistics[row] = None  # a quartile near an end is one record's value: see _grouped_quantiles
                    suppressed += 1
            for row in (DESCRIBE_STATISTICS.index("min"), DESCRIBE_STATISTICS.index("max")):
                if statistics[row] is None:
                    continue
                ties = _records_total(frame, pc.fill_null(pc.equal(column.cast(pa.float64()), statistics[row]), False))
                if any(n < _policy(d, policies, "release.min_group_size").min_group_size for d, n in ties.items()):
                    statistics[row] = None  # one record's exact value: see _hide_lone_extremes
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


def _describable(kind: Any) -> bool:
    return bool(pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind))


def _never_released(lineage: Lineage, policies: Mapping[str, OutputPolicy]) -> bool:
    return any(d not in policies or c in policies[d].never_release for d, c in lineage)


def _describe_column(column: Any) -> list[float | None]:
    """count, mean, std (ddof=1), min, 25%, 50%, 75%, max, as pandas' describe computes them."""
    count = column.length() - column.null_count
    as_float = column.cast(pa.float64())
    quartiles = pc.quantile(as_float, q=[0.25, 0.5, 0.75], interpolation="linear").to_pylist()
    return [
        float(count),
        pc.mean(as_float).as_py(),
        pc.stddev(as_float, ddof=1).as_py(),
        pc.min(as_float).as_py(),
        *quartiles,
        pc.max(as_float).as_py(),
    ]
