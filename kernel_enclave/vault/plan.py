"""The vault's plan evaluator: JSON plan trees from the executor, evaluated into Arrow tables with column lineage.

The executor is the analyst's process and therefore hostile, so a plan is parsed strictly before anything runs:
every field's type is checked, unknown keys and nodes are refused, nesting and size are bounded. Evaluation only
ever calls a fixed set of ``pyarrow.compute`` kernels; nothing in a plan is executed as code.

Every column of an evaluated table carries its *lineage*, the set of ``(dataset_id, source_column)`` it was
derived from. The output policy (:mod:`kernel_enclave.vault.release`) uses it to keep ``never_release`` columns and
everything derived from them out of released results; a filter predicate or join key does not enter the lineage of
the columns it selects rows of, as the spec allows.

A table also knows which source *records* each row came from (:attr:`SourceTable.record_ids`) once a join has run:
a join can repeat one record many times, and ``min_group_size`` is about records, not rows, so the release engine
counts distinct records per dataset rather than trusting row counts after a join.

Error messages name operations, columns and types, never a data value: Arrow's own messages can quote values
("Failed to parse string: '...'"), so they are never passed through.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped]  # pyarrow ships no type information
import pyarrow.compute as pc  # type: ignore[import-untyped]

from kernel_enclave.vault.protocol import VaultError

MAX_DEPTH = 64
MAX_NODES = 10_000
MAX_NAME_CHARS = 1024
MAX_ISIN_VALUES = 100_000

Lineage = frozenset[tuple[str, str]]
_NO_LINEAGE: Lineage = frozenset()

JOIN_TYPES = {"inner": "inner", "left": "left outer", "right": "right outer", "outer": "full outer"}
AGG_FUNCS = ("count", "sum", "mean", "min", "max", "std", "var", "median", "quantile", "nunique")
CAST_TYPES: dict[str, Any] = {"int64": pa.int64(), "float64": pa.float64(), "string": pa.string(), "bool": pa.bool_()}

_COMPARISONS = {
    "eq": pc.equal,
    "ne": pc.not_equal,
    "lt": pc.less,
    "le": pc.less_equal,
    "gt": pc.greater,
    "ge": pc.greater_equal,
}
_ARITHMETIC = {"add": pc.add, "sub": pc.subtract, "mul": pc.multiply, "pow": pc.power}
_LOGICAL = {"and": pc.and_kleene, "or": pc.or_kleene, "xor": pc.xor}
_UNARY_MATH = {"log": pc.ln, "exp": pc.exp, "sqrt": pc.sqrt, "neg": pc.negate, "abs": pc.abs}
_TEMPORAL = {"year": pc.year, "month": pc.month, "day": pc.day, "hour": pc.hour, "weekday": pc.day_of_week}
_STRING = {"lower": pc.utf8_lower, "upper": pc.utf8_upper, "len": pc.utf8_length}

# fn name -> (number of args, allowed option keys, required option keys)
_FUNCTIONS: dict[str, tuple[int, frozenset[str], frozenset[str]]] = {
    **{name: (2, frozenset(), frozenset()) for name in (*_COMPARISONS, *_ARITHMETIC, "truediv", "floordiv", "mod")},
    **{name: (2, frozenset(), frozenset()) for name in _LOGICAL},
    **{name: (1, frozenset(), frozenset()) for name in (*_UNARY_MATH, *_TEMPORAL, "lower", "upper", "len")},
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
}


# ---------------------------------------------------------------------------------------------------------------
# Tables with lineage


@dataclass(frozen=True)
class SourceTable:
    """An Arrow table inside the vault with, per column, the dataset columns it derives from.

    ``record_ids`` is ``None`` while each row is a distinct record of every dataset in ``datasets`` (true of a
    dataset and of anything selected, filtered or derived from it). After a join it lists, per occurrence of a
    dataset in the join tree, the id of the source record behind each row (null where an outer join had no match),
    so that the release engine can count records instead of rows.
    """

    table: pa.Table
    lineage: Mapping[str, Lineage]
    datasets: frozenset[str]
    record_ids: tuple[tuple[str, pa.ChunkedArray], ...] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_dataset(cls, dataset_id: str, table: pa.Table) -> SourceTable:
        """A dataset as the vault decrypted it: each column's lineage is itself."""
        names = list(table.column_names)
        if len(set(names)) != len(names):
            raise VaultError(f"dataset {quote(dataset_id)} has duplicate column names")
        return cls(table, {name: frozenset({(dataset_id, name)}) for name in names}, frozenset({dataset_id}))

    def record_occurrences(self) -> tuple[tuple[str, pa.ChunkedArray], ...]:
        """Record ids per dataset occurrence, materialising the implicit "row i is record i" when none are stored."""
        if self.record_ids is not None:
            return self.record_ids
        ids = pa.chunked_array([pa.array(range(self.table.num_rows), pa.int64())])
        return tuple((dataset, ids) for dataset in sorted(self.datasets))


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


def node_datasets(node: Node, sources: Mapping[str, SourceTable]) -> frozenset[str]:
    if isinstance(node, Source):
        return _source(node, sources).datasets
    if isinstance(node, Join):
        return node_datasets(node.left, sources) | node_datasets(node.right, sources)
    return node_datasets(node.input, sources)


def evaluate_node(node: Node, sources: Mapping[str, SourceTable]) -> SourceTable:
    if isinstance(node, Source):
        return _source(node, sources)
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
    present = set(frame.table.column_names)
    for name in names:
        if name not in present:
            raise VaultError(f"{what}: no column {quote(name)}; columns are {_column_list(frame.table.column_names)}")


def lineage_of(frame: SourceTable, name: str) -> Lineage:
    """A column's lineage; a column without one is refused (fail closed) rather than treated as underived."""
    lineage = frame.lineage.get(name)
    if lineage is None:
        raise VaultError(f"column {quote(name)} has no recorded lineage, so nothing derived from it is released")
    return lineage


def _column_list(names: Sequence[str]) -> str:
    shown = ", ".join(n if len(n) <= 80 else n[:77] + "..." for n in names[:50])
    return (shown + f", ... ({len(names) - 50} more)") if len(names) > 50 else (shown or "(none)")


def _select(frame: SourceTable, columns: tuple[str, ...]) -> SourceTable:
    require_columns(frame, columns, "select")
    return SourceTable(
        frame.table.select(list(columns)),
        {name: lineage_of(frame, name) for name in columns},
        frame.datasets,
        frame.record_ids,
    )


def _filter(frame: SourceTable, predicate: Expr) -> SourceTable:
    value = _eval_expr(predicate, frame)
    if not pa.types.is_boolean(value.type):
        raise VaultError(f"filter: the predicate ({value.label}) is {value.type}, not a boolean")
    mask = _broadcast(value, frame.table.num_rows)
    with arrow_errors("filter", [value.label]):
        table = frame.table.filter(mask)
        records = None
        if frame.record_ids is not None:
            records = tuple((dataset, ids.filter(mask)) for dataset, ids in frame.record_ids)
    return SourceTable(table, frame.lineage, frame.datasets, records)


def _assign(frame: SourceTable, columns: tuple[tuple[str, Expr], ...]) -> SourceTable:
    table = frame.table
    lineage = dict(frame.lineage)
    for name, expr in columns:
        current = SourceTable(table, lineage, frame.datasets)
        value = _eval_expr(expr, current)
        array = _broadcast(value, table.num_rows)
        with arrow_errors("assign", [name]):
            if name in table.column_names:
                table = table.set_column(table.column_names.index(name), name, array)
            else:
                table = table.append_column(name, array)
        lineage[name] = value.lineage
    return SourceTable(table, lineage, frame.datasets, frame.record_ids)


def _join(node: Join, left: SourceTable, right: SourceTable) -> SourceTable:
    require_columns(left, node.on, "join (left side)")
    require_columns(right, node.on, "join (right side)")
    left_suffix, right_suffix = node.suffixes
    keys = set(node.on)
    left_rest = [n for n in left.table.column_names if n not in keys]
    right_rest = [n for n in right.table.column_names if n not in keys]
    clashing = set(left_rest) & set(right_rest)
    if clashing and left_suffix == right_suffix:
        raise VaultError("join: the two suffixes must differ when both sides share column names")

    def renamed(name: str, suffix: str) -> str:
        return name + suffix if name in clashing else name

    out_names = list(node.on) + [renamed(n, left_suffix) for n in left_rest]
    out_names += [renamed(n, right_suffix) for n in right_rest]
    if len(set(out_names)) != len(out_names):
        raise VaultError("join: the suffixes make two result columns share a name; choose other suffixes")
    # Record ids ride along as extra columns under names neither side uses, then come back out.
    left_records, right_records = left.record_occurrences(), right.record_occurrences()
    taken = set(out_names) | set(left.table.column_names) | set(right.table.column_names)
    hidden = _fresh_names(len(left_records) + len(right_records), taken)
    left_hidden, right_hidden = hidden[: len(left_records)], hidden[len(left_records) :]
    # Rename both sides up front so the output never depends on Arrow's suffix rules.
    left_table = left.table.rename_columns(
        [n if n in keys else renamed(n, left_suffix) for n in left.table.column_names]
    )
    right_table = right.table.rename_columns(
        [n if n in keys else renamed(n, right_suffix) for n in right.table.column_names]
    )
    for name, (_, ids) in zip(left_hidden, left_records, strict=True):
        left_table = left_table.append_column(name, ids)
    for name, (_, ids) in zip(right_hidden, right_records, strict=True):
        right_table = right_table.append_column(name, ids)
    key_types = ", ".join(
        f"{quote(k)} {left.table.schema.field(k).type}/{right.table.schema.field(k).type}" for k in node.on
    )
    with arrow_errors("join", [f"keys {key_types}"]):
        _check_join_size(left_table, right_table, list(node.on))
        joined = left_table.join(
            right_table, keys=list(node.on), join_type=JOIN_TYPES[node.how], coalesce_keys=True, use_threads=True
        )
    records = tuple(
        (dataset, joined.column(name)) for name, (dataset, _) in zip(hidden, left_records + right_records, strict=True)
    )
    lineage: dict[str, Lineage] = {key: lineage_of(left, key) | lineage_of(right, key) for key in node.on}
    lineage.update({renamed(n, left_suffix): lineage_of(left, n) for n in left_rest})
    lineage.update({renamed(n, right_suffix): lineage_of(right, n) for n in right_rest})
    return SourceTable(joined.select(out_names), lineage, left.datasets | right.datasets, records)


MAX_JOIN_ROWS = 200_000_000


def _check_join_size(left: pa.Table, right: pa.Table, keys: list[str]) -> None:
    """Refuse a join whose result could not fit, before Arrow tries: a many-to-many join is quadratic."""
    left_counts = left.select(keys).group_by(keys).aggregate([([], "count_all")]).rename_columns([*keys, "\x00l"])
    right_counts = right.select(keys).group_by(keys).aggregate([([], "count_all")]).rename_columns([*keys, "\x00r"])
    matched = left_counts.join(right_counts, keys=keys, join_type="inner")
    pairs = pc.sum(pc.multiply_checked(matched.column("\x00l"), matched.column("\x00r"))).as_py() or 0
    if pairs + left.num_rows + right.num_rows > MAX_JOIN_ROWS:
        raise VaultError(
            f"join: the result would have more than {MAX_JOIN_ROWS:,} rows (a many-to-many join?); "
            "aggregate one side first or join on more keys"
        )


def _fresh_names(count: int, taken: set[str]) -> list[str]:
    names: list[str] = []
    i = 0
    while len(names) < count:
        candidate = f"\x00record{i}"
        if candidate not in taken:
            names.append(candidate)
        i += 1
    return names


# -- expressions --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Value:
    """An evaluated expression: an Arrow array (one value per row) or scalar, with lineage and a safe label."""

    data: Any  # pa.ChunkedArray | pa.Scalar
    lineage: Lineage
    label: str  # "column 'age'", "a literal", "the result of add": what error messages may say about it

    @property
    def type(self) -> Any:
        return self.data.type

    @property
    def is_scalar(self) -> bool:
        return isinstance(self.data, pa.Scalar)


@contextmanager
def arrow_errors(operation: str, subjects: Sequence[str]) -> Iterator[None]:
    """Turn an Arrow/NumPy failure into a VaultError that names the operation, never a value Arrow may quote."""
    try:
        yield
    except VaultError:
        raise
    except pa.ArrowNotImplementedError:
        raise VaultError(f"{operation} is not supported for {_subjects(subjects)}") from None
    except (pa.ArrowTypeError, TypeError):
        raise VaultError(f"{operation}: the types of {_subjects(subjects)} do not fit together") from None
    except (pa.ArrowInvalid, ValueError, OverflowError, ArithmeticError):
        raise VaultError(
            f"{operation} failed on {_subjects(subjects)}: a value does not convert, overflows or divides by zero"
        ) from None
    except (pa.ArrowException, IndexError, KeyError, MemoryError):
        raise VaultError(f"{operation} failed on {_subjects(subjects)}") from None


def _subjects(subjects: Sequence[str]) -> str:
    return ", ".join(subjects) if subjects else "its input"


def _eval_expr(expr: Expr, frame: SourceTable) -> Value:
    if isinstance(expr, Col):
        require_columns(frame, [expr.name], "expression")
        column = frame.table.column(expr.name)
        return Value(column, lineage_of(frame, expr.name), f"column {quote(expr.name)} ({column.type})")
    if isinstance(expr, Lit):
        with arrow_errors("literal", ["a literal"]):
            scalar = pa.scalar(expr.value)
        return Value(scalar, _NO_LINEAGE, f"a {scalar.type} literal")
    args = [_eval_expr(arg, frame) for arg in expr.args]
    lineage = frozenset().union(*(arg.lineage for arg in args))
    labels = [f"{arg.label}" for arg in args]
    with arrow_errors(expr.fn, labels):
        data = _call(expr, args)
    return Value(data, lineage, f"the result of {expr.fn} ({data.type})")


def _call(expr: Call, args: list[Value]) -> Any:
    fn = expr.fn
    if fn in _COMPARISONS:
        left, right = _coerce_pair(args[0], args[1])
        return _COMPARISONS[fn](left, right)
    if fn in _ARITHMETIC:
        _require_numeric(fn, args)
        return _ARITHMETIC[fn](args[0].data, args[1].data)
    if fn == "truediv":
        _require_numeric(fn, args)
        return pc.divide(_to_float(args[0].data), _to_float(args[1].data))
    if fn in ("floordiv", "mod"):
        _require_numeric(fn, args)
        return _floordiv_mod(fn, args[0].data, args[1].data)
    if fn in _LOGICAL or fn == "not":
        for arg in args:
            if not pa.types.is_boolean(arg.type) and not pa.types.is_null(arg.type):
                raise VaultError(f"{fn} needs booleans; {arg.label} is not")
        if fn == "not":
            return pc.invert(args[0].data)
        return _LOGICAL[fn](args[0].data, args[1].data)
    if fn in ("is_null", "not_null"):
        isnull = pc.is_null(args[0].data, nan_is_null=True)
        return isnull if fn == "is_null" else pc.invert(isnull)
    if fn == "isin":
        return _isin(args[0], expr.options["values"])
    if fn == "between":
        low = _COMPARISONS["ge"](*_coerce_pair(args[0], args[1]))
        high = _COMPARISONS["le"](*_coerce_pair(args[0], args[2]))
        return pc.and_kleene(low, high)
    if fn == "where":
        cond, then, otherwise = args
        if not pa.types.is_boolean(cond.type):
            raise VaultError(f"where needs a boolean condition; {cond.label} is not")
        then_data, otherwise_data = _coerce_pair(then, otherwise)
        return pc.if_else(cond.data, then_data, otherwise_data)
    if fn == "fill_null":
        data = nan_to_null(args[0].data)
        fill = args[1].data
        if args[1].is_scalar and fill.type != data.type and fill.is_valid:
            try:
                fill = fill.cast(data.type)
            except (pa.ArrowException, ValueError, TypeError, OverflowError):
                fill = args[1].data  # let coalesce find a common type, as pandas upcasts
        return pc.coalesce(data, fill)
    if fn == "round":
        _require_numeric(fn, args)
        return pc.round(args[0].data, ndigits=expr.options["ndigits"], round_mode="half_to_even")
    if fn in _UNARY_MATH:
        _require_numeric(fn, args)
        return _UNARY_MATH[fn](args[0].data)
    if fn in _TEMPORAL:
        kind = args[0].type
        if not (pa.types.is_timestamp(kind) or (pa.types.is_date(kind) and fn != "hour")):
            raise VaultError(f"{fn} needs a timestamp{'' if fn == 'hour' else ' or date'}; {args[0].label} is not")
        result = _TEMPORAL[fn](args[0].data)
        return result.cast(pa.int64())
    if fn in _STRING or fn == "startswith":
        if not _is_string(args[0].type):
            raise VaultError(f"{fn} needs a string; {args[0].label} is not")
        if fn == "startswith":
            return pc.starts_with(args[0].data, pattern=expr.options["prefix"])
        result = _STRING[fn](args[0].data)
        return result.cast(pa.int64()) if fn == "len" else result
    assert fn == "cast"
    return _cast(args[0], CAST_TYPES[expr.options["type"]])


def _is_string(kind: Any) -> bool:
    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind))


def _is_numeric(kind: Any) -> bool:
    return bool(pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind))


def _require_numeric(fn: str, args: Sequence[Value]) -> None:
    for arg in args:
        if not _is_numeric(arg.type) and not pa.types.is_boolean(arg.type) and not pa.types.is_null(arg.type):
            raise VaultError(f"{fn} needs numbers; {arg.label} is not numeric")


def _to_float(data: Any) -> Any:
    return data if pa.types.is_floating(data.type) else data.cast(pa.float64())


def _floordiv_mod(fn: str, left: Any, right: Any) -> Any:
    """Python/pandas semantics: floor division and a remainder with the divisor's sign.

    Integers stay integers unless a divisor is zero, where pandas switches to floats (inf/NaN); so does this.
    """
    both_int = all(pa.types.is_integer(d.type) or pa.types.is_boolean(d.type) for d in (left, right))
    if both_int:
        left, right = left.cast(pa.int64()), right.cast(pa.int64())
        zero = pc.equal(right, 0)
        has_zero = zero.as_py() if isinstance(zero, pa.Scalar) else pc.any(zero).as_py()
        if not has_zero:
            remainder = pc.modulo(left, right)
            return remainder if fn == "mod" else pc.divide(pc.subtract(left, remainder), right)
    left, right = _to_float(left), _to_float(right)
    if fn == "mod":
        return pc.modulo(left, right)
    return pc.floor(pc.divide(left, right))


def nan_to_null(data: Any) -> Any:
    """pandas treats NaN as missing; Arrow keeps it as a value. Inputs are normalised so results agree."""
    if not pa.types.is_floating(data.type) or isinstance(data, pa.Scalar):
        return data
    nan = pc.is_nan(data)
    if not pc.any(nan).as_py():
        return data
    return pc.if_else(nan, pa.scalar(None, data.type), data)


def _coerce_pair(left: Value, right: Value) -> tuple[Any, Any]:
    """Let a string literal stand for a timestamp or date when compared with one, as pandas does."""
    return _coerce_to(left, right.type), _coerce_to(right, left.type)


def _coerce_to(value: Value, other: Any) -> Any:
    if value.is_scalar and _is_string(value.type) and (pa.types.is_timestamp(other) or pa.types.is_date(other)):
        return _temporal_literal(value.data, other)
    return value.data


def _temporal_literal(scalar: Any, kind: Any) -> Any:
    if not scalar.is_valid:
        return pa.scalar(None, kind)
    try:
        return scalar.cast(kind)
    except pa.ArrowInvalid:
        if not (pa.types.is_timestamp(kind) and kind.tz is not None):
            raise
    # A local time compared with a zoned column is read in the column's zone (pandas does the same).
    naive = pa.array([scalar]).cast(pa.timestamp(kind.unit))
    return pc.assume_timezone(naive, timezone=kind.tz)[0]


def _isin(value: Value, values: tuple[Any, ...]) -> Any:
    kind = value.type
    if _is_string(kind) and any(not isinstance(v, str) and v is not None for v in values):
        raise VaultError(f"isin: {value.label} is a string column; its values must be strings")
    value_set = pa.array(values) if values else pa.array([], kind)
    if (pa.types.is_timestamp(kind) or pa.types.is_date(kind)) and _is_string(value_set.type):
        value_set = pa.array([_temporal_literal(pa.scalar(v, pa.string()), kind) for v in values], kind)
    elif not pa.types.is_null(value_set.type) and value_set.type != kind:
        value_set = value_set.cast(kind)
    return pc.is_in(nan_to_null(value.data), value_set=value_set, skip_nulls=False)


def _cast(value: Value, target: Any) -> Any:
    data = value.data
    if pa.types.is_integer(target) and pa.types.is_floating(data.type):
        finite = pc.is_finite(data)
        bad = (not finite.as_py() if finite.is_valid else False) if value.is_scalar else not pc.all(finite).as_py()
        if bad:
            raise VaultError(f"cast to int64: {value.label} holds NaN or infinite values")
        return pc.cast(data, options=pc.CastOptions(target_type=target, allow_float_truncate=True))
    return pc.cast(data, target)


def _broadcast(value: Value, rows: int) -> Any:
    """A scalar expression result becomes a column (``assign(x=1)``); arrays must already match the table."""
    if value.is_scalar:
        with arrow_errors("broadcast", [value.label]):
            return pa.chunked_array([pa.repeat(value.data, rows)], type=value.type)
    data = value.data
    if isinstance(data, pa.Array):
        data = pa.chunked_array([data])
    if len(data) != rows:
        raise VaultError(f"{value.label} has a different length from the table")
    return data


def schema_of(frame: SourceTable) -> list[dict[str, str]]:
    return [{"name": f.name, "type": str(f.type)} for f in frame.table.schema]


def empty_sources(sources: Mapping[str, SourceTable]) -> dict[str, SourceTable]:
    """The same sources with no rows: evaluating a plan over them gives its schema without touching data."""
    return {
        handle: SourceTable(source.table.slice(0, 0), source.lineage, source.datasets)
        for handle, source in sources.items()
    }
