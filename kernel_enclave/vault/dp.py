"""Differentially private releases: a plan compiled into an OpenDP Polars query, released once with OpenDP's noise.

Under an owner's ``[privacy] mode = "dp"`` nothing exact leaves the vault: a release plan is rewritten as an OpenDP
query (:mod:`opendp.extras.polars`) whose every statistic carries noise that OpenDP samples, calibrated by OpenDP to
the ε (and δ) the release costs. Everything about a release (which shapes are allowed, the noise scales, the
partition-selection threshold, what it costs) is decided by :func:`prepare` from the plan, the schema, the owner's
privacy policy and load-time facts, before any row is read, so that the broker can charge the budget between
:func:`prepare` and :meth:`PreparedDpRelease.run`, and a refusal never depends on the data.

OpenDP's Polars integration accepts only the expressions it can prove stable, so the vault does not hand it the
exact engine's compiled expressions (which use constructs OpenDP refuses, such as ``when/then``); a small compiler
here maps the plan functions OpenDP can take onto expressions with the exact engine's semantics (NaN is missing,
comparisons with NaN are false) and refuses every other function by name. The plan is type-checked first by the
exact engine's own evaluator, over zero rows, so both modes refuse a badly typed plan with the same message.

The privacy unit: with ``unit`` the owner names the column identifying a person, and OpenDP measures privacy per
identifier; each person's rows are truncated to ``max_contributions`` (the first in dataset order) before the plan
runs, so the bound is enforced rather than trusted. Without ``unit`` one row is one person, and a person is
assumed to contribute at most ``max_contributions`` rows.

OpenDP receives a dataset's columns once, not per release: it copies whatever it is given, which cost more than the
release itself. Each loaded dataset (per set of columns a release names) sits in OpenDP behind a fully adaptive
composition, and every release submits its own measurement, calibrated by OpenDP to that release's ε (and δ); the
owner's broker, charged between :func:`prepare` and :meth:`PreparedDpRelease.run`, keeps the budget.
"""

from __future__ import annotations

import json
import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import opendp.prelude as dp
import polars as pl
import pyarrow as pa  # type: ignore[import-untyped]  # pyarrow ships no type information
from opendp.accuracy import summarize_polars_measurement
from opendp.extras.polars import DPExpr, LazyFrameQuery, Margin, dp_len

from confnb.receipt_format import sha256_digest
from kernel_enclave.vault.plan import (
    CAST_TYPES,
    TEMPORAL_PARTS,
    Agg,
    Aggregate,
    Assign,
    Call,
    Col,
    Count,
    Describe,
    Expr,
    Filter,
    Join,
    Lineage,
    Lit,
    Node,
    Select,
    Source,
    SourceTable,
    ValueCounts,
    date_part,
    evaluate_node,
    parse_plan,
    quote,
    to_arrow,
)
from kernel_enclave.vault.protocol import VaultError

dp.enable_features("contrib")

ALPHA = 0.05  # accuracy is stated as the half-width of a 95% interval
MAX_PUBLIC_GROUPS = 100_000  # a product of public key sets larger than this is refused
MAX_ISIN_VALUES = 1_000  # isin compiles to one comparison per value
MAX_QUANTILE_CANDIDATES = 101
MIN_LENGTH_BOUND = 1_000
_HIDDEN = "\x01dp"  # names of helper statistics that are computed but not released as columns


VALUE_COUNT = "count"  # the column of a value_counts release, as the exact engine names it


def _refuse(message: str) -> VaultError:
    return VaultError(f"differential privacy: {message}")


# ---------------------------------------------------------------------------------------------------------------
# The owner's privacy policy


@dataclass(frozen=True)
class PrivacyBudgetRules:
    """One dataset's ``[privacy]`` table in dp mode, read from the canonical dict the vault receives.

    Read again here, not trusted: a malformed policy must refuse the release (fail closed) rather than release with
    a bound the owner did not set.
    """

    epsilon: float
    delta: float
    epsilon_per_kernel: float | None
    unit: str | None
    max_contributions: int
    bounds: Mapping[str, tuple[float, float]]
    keys: Mapping[str, tuple[str | int, ...]]

    @classmethod
    def from_dict(cls, dataset: str, privacy: Mapping[str, Any] | None) -> PrivacyBudgetRules:
        where = f"the privacy policy of dataset {quote(dataset)}"
        if privacy is None or privacy.get("mode") != "dp":
            raise _refuse(f"{where} is not in dp mode")
        epsilon = _number(privacy.get("epsilon"), f"{where}: epsilon")
        if not 0 < epsilon <= 100:
            raise _refuse(f"{where}: epsilon must be in (0, 100]")
        delta = _number(privacy.get("delta", 0.0), f"{where}: delta")
        if not 0 <= delta < 1e-3:
            raise _refuse(f"{where}: delta must be in [0, 1e-3)")
        per_kernel = privacy.get("epsilon_per_kernel")
        if per_kernel is not None:
            per_kernel = _number(per_kernel, f"{where}: epsilon_per_kernel")
            if not 0 < per_kernel <= epsilon:
                raise _refuse(f"{where}: epsilon_per_kernel must be in (0, epsilon]")
        unit = privacy.get("unit")
        if unit is not None and (not isinstance(unit, str) or not unit):
            raise _refuse(f"{where}: unit must be a column name")
        contributions = privacy.get("max_contributions", 1)
        if isinstance(contributions, bool) or not isinstance(contributions, int) or not 1 <= contributions <= 10_000:
            raise _refuse(f"{where}: max_contributions must be an integer in 1..10000")
        bounds: dict[str, tuple[float, float]] = {}
        for column, pair in dict(privacy.get("bounds") or {}).items():
            if not (isinstance(pair, list | tuple) and len(pair) == 2):
                raise _refuse(f"{where}: bounds.{column} must be [low, high]")
            low, high = (_number(v, f"{where}: bounds.{column}") for v in pair)
            if not low < high:
                raise _refuse(f"{where}: bounds.{column} must have low < high")
            bounds[str(column)] = (low, high)
        keys: dict[str, tuple[str | int, ...]] = {}
        for column, values in dict(privacy.get("keys") or {}).items():
            if not isinstance(values, list | tuple) or not values or len(set(values)) != len(values):
                raise _refuse(f"{where}: keys.{column} must be a non-empty list without duplicates")
            if any(isinstance(v, bool) or not isinstance(v, str | int) for v in values):
                raise _refuse(f"{where}: keys.{column} must hold strings or integers")
            keys[str(column)] = tuple(values)
        return cls(epsilon, delta, per_kernel, unit, contributions, bounds, keys)

    @property
    def epsilon_limit(self) -> float:
        """The most one release may cost: the per-kernel cap, else the whole budget."""
        return self.epsilon_per_kernel if self.epsilon_per_kernel is not None else self.epsilon


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _refuse(f"{where} must be a finite number")
    return float(value)


# ---------------------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class ColumnAccuracy:
    """How far one released column may be from the exact value: OpenDP's noise and a 95% interval per row.

    ``half_width`` has one entry per released row (a mean's interval depends on its own noisy count); ``None``
    where OpenDP states no interval (a quantile is chosen by the exponential mechanism among the candidates).
    """

    column: str
    statistic: str  # count | sum | mean | quantile
    distribution: str  # OpenDP's name, e.g. "Integer Laplace", "Float Laplace", "ExponentialMin"
    scale: float
    half_width: tuple[float | None, ...]


@dataclass(frozen=True)
class DpRelease:
    """A released table with what it cost and how accurate each column is.

    ``threshold`` is the noisy count a group needed to be released, when groups were chosen by partition
    selection (no public keys), else ``None``.
    """

    table: pa.Table
    epsilon: float
    delta: float
    accuracy: tuple[ColumnAccuracy, ...]
    threshold: int | None = None


# ---------------------------------------------------------------------------------------------------------------
# Expressions OpenDP accepts, with the exact engine's semantics

_COMPARE = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
}
_ARITHMETIC = ("add", "sub", "mul", "truediv")
_LITERAL_TYPES: dict[type, Any] = {bool: pl.Boolean, int: pl.Int64, float: pl.Float64, str: pl.String}


@dataclass(frozen=True)
class _Compiled:
    expr: pl.Expr
    dtype: Any
    literal: bool = False


class ExpressionCompiler:
    """Plan expressions as Polars expressions OpenDP's stability analysis accepts, or a refusal naming the function.

    Each function mirrors the exact engine (:mod:`.plan`): NaN counts as missing, a comparison involving NaN is
    false (``ne`` true), a predicate that is null keeps no row. Functions OpenDP cannot analyse are refused here,
    with the operation's name, rather than by OpenDP with a message quoting the compiled expression.
    """

    def __init__(self, schema: Mapping[str, Any], where: str) -> None:
        self.schema = schema
        self.where = where

    def compile(self, expr: Expr) -> _Compiled:
        if isinstance(expr, Col):
            if expr.name not in self.schema:
                raise _refuse(f"{self.where}: no column {quote(expr.name)}")
            return _Compiled(pl.col(expr.name), self.schema[expr.name])
        if isinstance(expr, Lit):
            if expr.value is None:
                raise _refuse(f"{self.where}: null literals are not supported")
            dtype = _LITERAL_TYPES[type(expr.value)]
            return _Compiled(pl.lit(expr.value, dtype=dtype), dtype, literal=True)
        return self._call(expr)

    def _call(self, call: Call) -> _Compiled:
        fn = call.fn
        if fn == "isin":
            return self._isin(self.compile(call.args[0]), call.options["values"])
        args = [self.compile(arg) for arg in call.args]
        if fn in _COMPARE:
            return _Compiled(_compare(fn, args[0], args[1]), pl.Boolean)
        if fn == "between":
            low = _compare("ge", args[0], args[1])
            high = _compare("le", args[0], args[2])
            return _Compiled(low & high, pl.Boolean)
        if fn in ("and", "or", "xor", "not"):
            exprs = [arg.expr.cast(pl.Boolean) for arg in args]
            if fn == "not":
                return _Compiled(~exprs[0], pl.Boolean)
            combined = {"and": exprs[0] & exprs[1], "or": exprs[0] | exprs[1], "xor": exprs[0].xor(exprs[1])}[fn]
            return _Compiled(combined, pl.Boolean)
        if fn in ("is_null", "not_null"):
            missing = _missing(args[0])
            return _Compiled(missing if fn == "is_null" else ~missing, pl.Boolean)
        if fn in _ARITHMETIC:
            left, right = (_as_number(arg) for arg in args)
            if fn == "truediv":
                left, right = left.cast(pl.Float64), right.cast(pl.Float64)
            result = {"add": left + right, "sub": left - right, "mul": left * right, "truediv": left / right}[fn]
            return _Compiled(result, self._dtype(result))
        if fn == "fill_null":
            data, fill = args
            if not fill.literal:
                raise _refuse(f"{self.where}: fill_null needs a literal fill value")
            filled = data.expr.fill_nan(fill.expr) if data.dtype.is_float() else data.expr
            filled = filled.fill_null(fill.expr)
            return _Compiled(filled, self._dtype(filled))
        if fn == "cast":
            target = CAST_TYPES[call.options["type"]]
            return _Compiled(args[0].expr.cast(target, strict=False), target)
        if fn in TEMPORAL_PARTS:  # the exact engine's date parts: the same numbers in both modes
            return _Compiled(date_part(args[0].expr, fn), pl.Int64)
        raise _refuse(f"{self.where}: function {quote(fn)} is not supported yet")

    def _isin(self, value: _Compiled, values: tuple[Any, ...]) -> _Compiled:
        present = [v for v in values if v is not None]
        if len(present) > MAX_ISIN_VALUES:
            raise _refuse(f"{self.where}: isin takes at most {MAX_ISIN_VALUES} values")
        dtype = value.dtype
        numeric = dtype.is_integer() or dtype.is_float()
        fits = (
            (dtype == pl.String and all(isinstance(v, str) for v in present))
            or (dtype == pl.Boolean and all(isinstance(v, bool) for v in present))
            or (
                numeric
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in present)
                and (dtype.is_float() or all(float(v).is_integer() for v in present))
            )
        )
        if not fits:
            raise _refuse(f"{self.where}: isin on a {dtype} column with these values is not supported yet")
        missing = _missing(value)
        if present:
            members = [value.expr == pl.lit(v, dtype=dtype if numeric else None) for v in present]
            member = members[0]
            for other in members[1:]:
                member = member | other
            member = member.fill_null(False)
        else:
            member = pl.lit(False)
        has_null = len(present) != len(values)
        return _Compiled(missing | member if has_null else ~missing & member, pl.Boolean)

    def _dtype(self, expr: pl.Expr) -> Any:
        empty = pl.LazyFrame(schema=dict(self.schema))
        try:
            return empty.select(expr.alias("\x01")).collect_schema()["\x01"]
        except Exception:  # type-checked by the exact engine already; fail closed on anything else
            raise _refuse(f"{self.where}: the expression's types do not fit together") from None


def _missing(value: _Compiled) -> pl.Expr:
    """Null or NaN: what pandas, and so the exact engine, treats as missing."""
    if value.dtype.is_float() and not value.literal:
        return value.expr.is_null() | value.expr.is_nan()
    return value.expr.is_null()


def _as_number(value: _Compiled) -> pl.Expr:
    if value.dtype == pl.Boolean:
        return value.expr.cast(pl.Int64)
    if isinstance(value.dtype, pl.Decimal):
        return value.expr.cast(pl.Float64)
    return value.expr


def _compare(fn: str, left: _Compiled, right: _Compiled) -> pl.Expr:
    """A comparison where NaN equals nothing and orders with nothing, as pandas compares."""
    result: pl.Expr = _COMPARE[fn](_as_comparable(left), _as_comparable(right))
    for side in (left, right):
        if side.dtype.is_float() and not side.literal:
            nan = side.expr.is_nan()
            result = (result | nan) if fn == "ne" else (result & ~nan)
    return result


def _as_comparable(value: _Compiled) -> pl.Expr:
    return value.expr if value.dtype == pl.Boolean else _as_number(value)


# ---------------------------------------------------------------------------------------------------------------
# The OpenDP input: a dataset's own columns, nothing hidden

_CASTS: dict[Any, Any] = {pl.UInt8: pl.Int64, pl.UInt16: pl.Int64}
_READABLE = (
    pl.Int8,
    pl.Int16,
    pl.Int32,
    pl.Int64,
    pl.UInt32,
    pl.UInt64,
    pl.Float32,
    pl.Float64,
    pl.Boolean,
    pl.String,
    pl.Date,
    pl.Time,
)


def _opendp_column(name: str, dtype: Any) -> pl.Expr | None:
    """How a dataset column enters OpenDP: as is, cast to a type OpenDP reads (categories as strings), or not."""
    if isinstance(dtype, pl.Categorical | pl.Enum):
        return pl.col(name).cast(pl.String)
    if isinstance(dtype, pl.Decimal):
        return pl.col(name).cast(pl.Float64)
    if dtype in _CASTS:
        return pl.col(name).cast(_CASTS[dtype])
    if isinstance(dtype, pl.Datetime) or any(dtype == kind for kind in _READABLE):
        return pl.col(name)
    return None


@dataclass(frozen=True)
class DatasetInput:
    """The frame OpenDP reads: the columns of one dataset a release names, never its record ids or masks.

    Only the named columns: OpenDP copies its input when it receives it, and a column it never reads would be copied
    for nothing. ``data`` is the lazy selection; it is read once per dataset and set of columns (see
    :func:`_opendp_input`).
    """

    dataset: str
    source: SourceTable
    data: pl.LazyFrame
    schema: Mapping[str, Any]
    rows: int  # the dataset's rows, a load-time fact

    @classmethod
    def of(cls, source: SourceTable, named: set[str]) -> DatasetInput:
        """The dataset behind ``source`` restricted to the visible columns in ``named`` that it has.

        A plan naming a column of a type OpenDP cannot read is refused, naming the column. A plan naming no column
        (a plain count) still needs one for OpenDP to count rows: the first readable column, a number if any.
        """
        if len(source.datasets) != 1:
            raise _refuse("joins are not supported yet")
        dataset = next(iter(source.datasets))
        records = source.records or ()
        plain = (
            not source.masks
            and len(records) == 1
            and records[0][1] in source.unique
            and all(source.lineage.get(name) == frozenset({(dataset, name)}) for name in source.columns)
        )
        if not plain:
            raise _refuse("a release must start from a dataset as loaded, not from a derived table")
        readable: dict[str, pl.Expr] = {}
        for name in source.columns:  # the visible columns: hidden ones never reach OpenDP
            expr = _opendp_column(name, source.dtype(name))
            if expr is not None:
                readable[name] = expr
            elif name in named:
                raise _refuse(f"column {quote(name)} has a type OpenDP cannot read")
        chosen = [name for name in source.columns if name in named]
        if not chosen:
            numbers = [n for n in readable if source.dtype(n).is_integer() or source.dtype(n).is_float()]
            fallback = (numbers or list(readable))[:1]
            if not fallback:
                raise _refuse(f"dataset {quote(dataset)} has no column OpenDP can read")
            chosen = fallback
        data = source.data.select([readable[name] for name in chosen])
        schema = dict(data.collect_schema())
        return cls(dataset, source, data, schema, source.row_bound().rows())

    def empty_table(self) -> SourceTable:
        """The input with no rows, for the exact engine's type checks and lineage."""
        arrow = pl.DataFrame(schema=dict(self.schema)).to_arrow()
        lineage = {name: frozenset({(self.dataset, name)}) for name in self.schema}
        return SourceTable.from_arrow(arrow, lineage, frozenset({self.dataset}), ())

    @property
    def length_bound(self) -> int:
        """A public upper bound on rows (and so on groups): the power of ten at or above the dataset's size.

        OpenDP needs one for float sums; the dataset's size to within a power of ten is public already, as its
        ciphertext's length shows it.
        """
        return int(10 ** math.ceil(math.log10(max(self.rows, MIN_LENGTH_BOUND))))


# ---------------------------------------------------------------------------------------------------------------
# OpenDP's copy of a dataset: received once, queried per release

MAX_OPENDP_INPUTS = 16  # datasets (and column sets, units, measures, margins) OpenDP holds at once
MAX_CALIBRATIONS = 256  # calibrated measurements kept per input


class _Calibrated(NamedTuple):
    measurement: dp.Measurement
    summary: pl.DataFrame  # OpenDP's noise per statistic at 95%
    split_summary: pl.DataFrame  # and at 97.5%, for a mean's two parts


class _OpenDPInput:
    """One dataset's columns inside OpenDP, behind a fully adaptive composition (an odometer), for many releases.

    OpenDP copies its input when it receives it (serialised, tens of megabytes a million rows); handing it over per
    release cost far more than the release. The odometer's queryable takes the data once and then any measurement
    over its domain, metric and measure: each release's measurement is calibrated by OpenDP to that release's ε (and
    δ) and checked against it again before it runs. The odometer sets no limit of its own: the owner's broker,
    charged before the release runs, is the budget that stops releases. Calls are serialised (the queryable updates
    its running privacy loss on each).
    """

    def __init__(self, frame: pl.DataFrame, domain: Any, metric: Any, measure: Any) -> None:
        self.domain = domain
        self.metric = metric
        self.measure = measure
        odometer = dp.c.make_fully_adaptive_composition(
            input_domain=domain, input_metric=metric, output_measure=measure
        )
        self._queryable = odometer(frame.lazy())
        self._lock = threading.Lock()
        self._calibrations: OrderedDict[tuple[Any, ...], _Calibrated] = OrderedDict()
        self._calibrations_lock = threading.Lock()  # not the queryable's: a prepare never waits for a run

    def calibrated(self, key: tuple[Any, ...], calibrate: Callable[[], _Calibrated]) -> _Calibrated:
        """The measurement OpenDP calibrated for this plan, policy, ε and δ, calibrated once and then reused.

        A measurement is a description of the mechanism: each run samples fresh noise, so a repeated release (the
        same query at the same ε) pays for its own run and merely skips recomputing the same noise scale.
        """
        with self._calibrations_lock:
            found = self._calibrations.get(key)
        if found is None:
            found = calibrate()
            with self._calibrations_lock:
                self._calibrations[key] = found
                while len(self._calibrations) > MAX_CALIBRATIONS:
                    self._calibrations.popitem(last=False)
        return found

    def release(self, measurement: dp.Measurement, d_in: Any, d_out: Any) -> pl.DataFrame:
        """Run ``measurement`` on the data, after OpenDP confirms it costs at most ``d_out`` at ``d_in``."""
        if not measurement.check(d_in, d_out):
            raise _refuse("the release would cost more than was charged for it")
        with self._lock:
            found: pl.DataFrame = self._queryable(measurement).collect()
        return found


class _InputSlot:
    """A cache entry, filled by the first release that needs it while others wait on its lock only."""

    def __init__(self, source: SourceTable) -> None:
        self.source = weakref.ref(source)
        self.lock = threading.Lock()
        self.value: _OpenDPInput | None = None


_inputs: OrderedDict[tuple[Any, ...], _InputSlot] = OrderedDict()
_inputs_lock = threading.Lock()


def _forget() -> None:
    """Drop the entries of sources that are gone, so that a closed dataset's copy inside OpenDP goes with it.

    Called by the garbage collector as well, possibly on a thread that holds the lock: then the next lookup purges.
    """
    if not _inputs_lock.acquire(blocking=False):
        return
    try:
        for key in [key for key, slot in _inputs.items() if slot.source() is None]:
            del _inputs[key]
    finally:
        _inputs_lock.release()


def _domain(data: DatasetInput, margins: Sequence[Margin]) -> Any:
    """OpenDP's domain of ``data``: it follows from the schema and the margins."""
    found = dp.domain_of(pl.LazyFrame(schema=dict(data.schema)), infer=True)
    for margin in margins:
        found = dp.with_margin(found, margin)
    return found


def _opendp_input(data: DatasetInput, metric: Any, measure: Any, margins: tuple[Margin, ...]) -> _OpenDPInput:
    """OpenDP's copy of ``data`` for this metric, measure and margins: made once per loaded dataset, then shared.

    Keyed by the identity of the vault's source table (a dataset as loaded lives as long as the kernel) and what the
    domain and odometer depend on. A scanned dataset (larger than memory) is not kept: its columns are read per
    release.
    """

    def domain() -> Any:  # built for a new input only
        return _domain(data, margins)

    if data.source.streaming:
        return _OpenDPInput(data.source.collect(data.data), domain(), metric, measure)
    described = tuple((tuple(m.by or ()), m.max_length, m.max_groups, str(m.invariant)) for m in margins)
    key = (id(data.source), tuple(data.schema.items()), described, str(metric), str(measure))
    _forget()
    with _inputs_lock:
        slot = _inputs.get(key)
        if slot is None or slot.source() is not data.source:  # an id is unique among live objects only
            slot = _inputs[key] = _InputSlot(data.source)
            weakref.finalize(data.source, _forget)
        _inputs.move_to_end(key)
        while len(_inputs) > MAX_OPENDP_INPUTS:
            _inputs.popitem(last=False)
    with slot.lock:
        if slot.value is None:
            slot.value = _OpenDPInput(data.source.collect(data.data), domain(), metric, measure)
        return slot.value


# ---------------------------------------------------------------------------------------------------------------
# Planning a release


@dataclass(frozen=True)
class _Statistic:
    """One released column: its OpenDP expressions (a mean has two) and how to read its accuracy."""

    name: str
    statistic: str
    exprs: tuple[pl.Expr, ...]
    parts: tuple[str, ...]  # the names OpenDP reports the expressions under
    bounds: tuple[float, float] | None = None
    shown: bool = True  # False: computed for OpenDP's partition selection only
    # Row-level inputs of ``exprs`` (a clipped value, a presence indicator), computed in one pass before grouping:
    # Polars then aggregates plain columns on its fast path, where an expression per group was twice as slow.
    inputs: tuple[pl.Expr, ...] = ()


class PreparedDpRelease:
    """A release decided and calibrated but not run: what it costs is known before a row is read.

    The broker charges ``epsilon``/``delta`` per dataset in ``datasets`` between :func:`prepare` and :meth:`run`;
    :meth:`run` executes OpenDP's measurement once (a second call is refused: each run would spend the budget again).
    """

    def __init__(
        self,
        *,
        datasets: tuple[str, ...],
        epsilon: float,
        delta: float,
        plan_digest: str,
        columns: tuple[str, ...],
        opendp_input: _OpenDPInput,
        measurement: dp.Measurement,
        d_in: Any,
        d_out: Any,
        statistics: tuple[_Statistic, ...],
        by: tuple[str, ...],
        threshold: int | None,
        summary: pl.DataFrame,
        split_summary: pl.DataFrame,
        value_counts: ValueCounts | None = None,
        described: tuple[tuple[str, tuple[str, ...]], ...] | None = None,
    ) -> None:
        self.datasets = datasets
        self.epsilon = epsilon
        self.delta = delta
        self.plan_digest = plan_digest
        self.columns = columns  # what OpenDP's input holds: the dataset's columns this release names
        self._input = opendp_input
        self._measurement = measurement
        self._d_in = d_in
        self._d_out = d_out
        self._statistics = statistics
        self._by = by
        self.threshold = threshold
        self._summary = summary
        self._split_summary = split_summary
        self._value_counts = value_counts
        self._described = described
        self._lock = threading.Lock()
        self._ran = False

    def run(self) -> DpRelease:
        with self._lock:
            if self._ran:
                raise _refuse("this release has run already; prepare (and pay for) it again")
            self._ran = True
        try:
            found = self._input.release(self._measurement, self._d_in, self._d_out)
        except Exception:  # OpenDP's and Polars' messages can quote values: never pass them on
            raise _refuse("the release failed while computing") from None
        if self._by:  # groups in key order: the order OpenDP's engine produced them in says nothing more
            found = found.sort(list(self._by), nulls_last=True)
        columns: list[pl.Series] = [found.get_column(name) for name in self._by]
        accuracy: list[ColumnAccuracy] = []
        for stat in self._statistics:
            if stat.shown:
                values, entry = self._finish(stat, found)
                columns.append(values.alias(stat.name))
                accuracy.append(entry)
        frame = pl.DataFrame(columns)
        if self._described is not None:
            frame, accuracy = _as_description(frame, accuracy, self._described)
        if self._value_counts is not None:  # post-processing of the noisy counts: largest first, as pandas orders
            key = self._value_counts.column
            if self._value_counts.dropna:
                frame = frame.drop_nulls(key)
            frame = frame.sort([VALUE_COUNT, key], descending=[True, False], nulls_last=True)
        return DpRelease(to_arrow(frame, {}), self.epsilon, self.delta, tuple(accuracy), self.threshold)

    def _finish(self, stat: _Statistic, found: pl.DataFrame) -> tuple[pl.Series, ColumnAccuracy]:
        rows = found.height
        if stat.statistic != "mean":
            row = _summary_row(self._summary, stat.parts[0])
            width = row["accuracy"]
            values = found.get_column(stat.parts[0])
            entry = ColumnAccuracy(stat.name, stat.statistic, row["distribution"], float(row["scale"]), (width,) * rows)
            return values, entry
        # A mean is a noisy sum over a noisy count: both are within their 97.5% half-widths with probability 95%,
        # and then |S/N - s/n| <= (a_S + |S/N| a_N) / (N - a_N), since n >= N - a_N.
        total = found.get_column(stat.parts[0]).cast(pl.Float64).to_list()
        count = found.get_column(stat.parts[1]).cast(pl.Float64).to_list()
        sum_row = _summary_row(self._split_summary, stat.parts[0])
        count_row = _summary_row(self._split_summary, stat.parts[1])
        a_sum, a_count = float(sum_row["accuracy"]), float(count_row["accuracy"])
        assert stat.bounds is not None
        low, high = stat.bounds
        means: list[float | None] = []
        widths: list[float | None] = []
        for s, n in zip(total, count, strict=True):
            if s is None or n is None or n <= 0:
                means.append(None)
                widths.append(math.inf)
                continue
            mean = s / n
            means.append(min(max(mean, low), high))  # the clipped values' mean lies in the bounds
            widths.append((a_sum + abs(mean) * a_count) / (n - a_count) if n > a_count else math.inf)
        entry = ColumnAccuracy(
            stat.name,
            "mean",
            f"{sum_row['distribution']} sum / {count_row['distribution']} count",
            float(sum_row["scale"]),
            tuple(widths),
        )
        return pl.Series(stat.name, means, dtype=pl.Float64), entry


DP_DESCRIBE_STATISTICS: tuple[tuple[str, str, float | None], ...] = (
    ("count", "count", None),
    ("mean", "mean", None),
    ("25%", "quantile", 0.25),
    ("50%", "quantile", 0.5),
    ("75%", "quantile", 0.75),
)
"""The rows of a noisy ``describe``: what OpenDP can release of a column (no spread, no extremes)."""


def _describe_as_aggregate(
    node: Describe,
    sources: Mapping[str, SourceTable],
    privacy: Mapping[str, Mapping[str, Any]],
    never_release: Mapping[str, frozenset[str]],
) -> tuple[Aggregate, tuple[tuple[str, tuple[str, ...]], ...]]:
    """A describe as one aggregate over its columns (each needs the owner's bounds), and which output columns form
    which described column's statistics. The columns are chosen from the plan's schema, never from the data."""
    source = _only_source(node.input, sources)
    if len(source.datasets) != 1:
        raise _refuse("joins are not supported yet")
    (dataset,) = source.datasets
    rules = PrivacyBudgetRules.from_dict(dataset, privacy.get(dataset))
    frame = evaluate_node(node.input, sources)  # lazy: the schema and lineage, no row read
    hidden = never_release.get(dataset, frozenset())

    def describable(name: str) -> bool:
        dtype = frame.dtype(name)
        return bool(dtype.is_numeric()) and not any(column in hidden for _, column in frame.lineage.get(name, ()))

    if node.columns is None:
        columns = [name for name in frame.columns if describable(name) and name in rules.bounds]
        if not columns:
            raise _refuse("describe: no numeric column of this table has public bounds (privacy.bounds)")
    else:
        columns = list(node.columns)
        missing = [name for name in columns if name not in frame.columns]
        if missing:
            raise VaultError(f"describe: no column {', '.join(map(quote, missing))}")
        unbounded = [name for name in columns if name not in rules.bounds]
        if unbounded:
            raise _refuse(
                f"describe: the owner's policy gives no bounds for {', '.join(map(quote, unbounded))} "
                f"(privacy.bounds.{unbounded[0]}); a noisy mean or quartile needs them"
            )
    if "statistic" in columns:
        raise VaultError("describe: a column named 'statistic' would clash with the row labels; rename it")
    aggs: list[Agg] = []
    layout: list[tuple[str, tuple[str, ...]]] = []
    for i, name in enumerate(columns):
        names = tuple(f"d{i}_{j}" for j in range(len(DP_DESCRIBE_STATISTICS)))
        aggs += [Agg(part, name, func, q) for part, (_, func, q) in zip(names, DP_DESCRIBE_STATISTICS, strict=True)]
        layout.append((name, names))
    return Aggregate(_without_selects(node.input), (), tuple(aggs)), tuple(layout)


def _without_selects(node: Node) -> Node:
    """The chain with its ``select`` nodes left out: they choose columns, not rows, and OpenDP forgets the table's
    length bound at a projection (an aggregate names the columns it reads anyway)."""
    if isinstance(node, Select):
        return _without_selects(node.input)
    if isinstance(node, Filter):
        return Filter(_without_selects(node.input), node.predicate)
    if isinstance(node, Assign):
        return Assign(_without_selects(node.input), node.columns)
    return node


def _as_description(
    frame: pl.DataFrame, accuracy: list[ColumnAccuracy], layout: tuple[tuple[str, tuple[str, ...]], ...]
) -> tuple[pl.DataFrame, list[ColumnAccuracy]]:
    """The one-row aggregate laid out as ``DataFrame.describe`` lays it out, and each statistic's noise named by its
    column and row."""
    labels = [label for label, _, _ in DP_DESCRIBE_STATISTICS]
    columns = [pl.Series("statistic", labels, dtype=pl.String)]
    renamed: dict[str, str] = {}
    for name, parts in layout:
        values = [frame.get_column(part).cast(pl.Float64)[0] for part in parts]
        columns.append(pl.Series(name, values, dtype=pl.Float64))
        renamed.update({part: f"{name} {label}" for part, label in zip(parts, labels, strict=True)})
    named = [replace(entry, column=renamed.get(entry.column, entry.column)) for entry in accuracy]
    return pl.DataFrame(columns), named


def _summary_row(summary: pl.DataFrame, column: str) -> dict[str, Any]:
    rows = summary.filter(pl.col("column") == column).to_dicts()
    if len(rows) != 1:
        raise _refuse("OpenDP did not describe the noise of a released statistic")
    return rows[0]


def prepare(
    plan: Mapping[str, Any],
    sources: Mapping[str, SourceTable],
    privacy: Mapping[str, Mapping[str, Any]],
    epsilon: float,
    delta: float | None = None,
    *,
    never_release: Mapping[str, frozenset[str]],
) -> PreparedDpRelease:
    """Decide and calibrate a release of the JSON ``plan`` under the owners' dp policies; no row is read.

    ``privacy`` maps each dataset to its owner's canonical privacy dict and ``never_release`` to its never_release
    columns. ``epsilon`` is what the release costs; ``delta`` what it may cost when partition selection is needed
    (default: the owner's δ in proportion to ε over the total budget), otherwise the release is pure ε-DP and costs
    no δ.
    """
    node = parse_plan(plan)
    digest = sha256_digest(json.dumps(plan, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())
    counted: ValueCounts | None = None
    if isinstance(node, ValueCounts):  # a noisy count per value: the group-by it is, shown as value_counts shows it
        if node.column == VALUE_COUNT:
            raise _refuse(f"value_counts of a column named {quote(VALUE_COUNT)} would name two columns alike")
        counted = node
        node = Aggregate(node.input, (node.column,), (Agg(VALUE_COUNT, None, "count", None),))
    described: tuple[tuple[str, tuple[str, ...]], ...] | None = None
    if isinstance(node, Describe):  # count, mean and quartiles per column: the aggregate it is, shown as describe
        node, described = _describe_as_aggregate(node, sources, privacy, never_release)
    if not isinstance(node, Aggregate | Count):
        raise _refuse("raw rows are never released; aggregate them (group_by/agg or count)")
    joined = _joined(node, sources, privacy, never_release)
    if joined is not None:  # two owners' datasets: one private input, the join of both, made here
        node, rules, data, contributions, charged = joined
        hidden_never: frozenset[tuple[str, str]] = frozenset()  # checked on the join's own lineage (_joined)
    else:
        source = _only_source(node.input, sources)
        if len(source.datasets) != 1:
            raise _refuse("a release reads one dataset, or the inner join of two")
        dataset = next(iter(source.datasets))
        rules = PrivacyBudgetRules.from_dict(dataset, privacy.get(dataset))
        if rules.unit is not None and rules.unit not in source.columns:
            raise _refuse(f"the owner's privacy.unit names column {quote(rules.unit)}, which the dataset lacks")
        data = DatasetInput.of(source, _named_columns(node) | ({rules.unit} if rules.unit else set()))
        hidden_never = frozenset((data.dataset, c) for c in never_release.get(data.dataset, frozenset()))
        contributions, charged = None, (data.dataset,)
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or not math.isfinite(epsilon) or epsilon <= 0:
        raise _refuse("epsilon must be a number greater than 0")
    if epsilon > rules.epsilon_limit:
        raise _refuse(f"epsilon {epsilon:g} exceeds the owner's limit of {rules.epsilon_limit:g} per release")
    empty = data.empty_table()
    empty_sources = {handle: empty for handle in _handles(node.input)}
    row_level = evaluate_node(node.input, empty_sources)  # the exact engine's type checks, on zero rows
    by = node.by if isinstance(node, Aggregate) else ()
    aggs = node.aggs if isinstance(node, Aggregate) else ()
    for column in by:
        _require_releasable(column, row_level.lineage.get(column, frozenset()), hidden_never, "group by")
    for agg in aggs:
        if agg.column is not None:
            _require_releasable(agg.column, row_level.lineage.get(agg.column, frozenset()), hidden_never, agg.func)
    public_keys = _public_keys(by, rules, row_level, data.dataset)
    partition_selection = bool(by) and public_keys is None
    release_delta = 0.0
    if partition_selection:
        if rules.delta == 0:
            raise _refuse(
                f"grouping by {', '.join(quote(c) for c in by)} without public keys needs partition selection, "
                "which needs delta > 0 in the owner's privacy policy; or the owner lists privacy.keys for them"
            )
        release_delta = rules.delta * epsilon / rules.epsilon if delta is None else _release_delta(delta, rules)
        if release_delta <= 0:
            raise _refuse("partition selection needs a delta greater than 0")
    schema = dict(row_level.schema)
    _require_group_bounds(node, schema, set(data.schema), keyed=public_keys is not None)
    # Dataset columns the plan leaves as they are and the vault found free of NaN when it loaded them: read without
    # a NaN pass (a third of the work of a mean over a million rows).
    nan_free = frozenset(data.source.nan_free) - _assigned(node.input)
    statistics = _statistics(node, aggs, schema, rules, partition_selection, nan_free)
    unit = dp.unit_of(contributions=1, identifier=rules.unit) if rules.unit else None
    privacy_unit = unit or dp.unit_of(contributions=contributions or rules.max_contributions)
    loss = (
        dp.loss_of(epsilon=float(epsilon), delta=release_delta) if partition_selection else dp.loss_of(epsilon=epsilon)
    )
    bound = data.length_bound
    margins = [Margin(by=(), max_length=bound)]
    if by and set(by) <= set(data.schema):  # OpenDP's margins describe its input's columns only
        margins.append(Margin(by=list(by), max_length=bound, max_groups=bound))
    try:
        if joined is not None:  # made for this release: not kept
            frame = data.source.collect(data.data)
            opendp_input = _OpenDPInput(frame, _domain(data, margins), privacy_unit[0], loss[0])
        else:
            opendp_input = _opendp_input(data, privacy_unit[0], loss[0], tuple(margins))
        # a plan builder holding no data (OpenDP leaves its constructor unannotated)
        query = LazyFrameQuery(pl.LazyFrame(schema=dict(data.schema)), None)  # type: ignore[no-untyped-call]
        if rules.unit is not None:  # each person's first max_contributions rows, before the analyst's plan
            # OpenDP's own truncation (LazyFrameQuery.truncate_per_group with keep="first"), spelled out
            query = query.filter(pl.int_range(pl.len()).over(rules.unit) < rules.max_contributions)
        query.polars_plan = _row_level(node.input, query.polars_plan, empty_sources)
        exprs = [expr for stat in statistics for expr in stat.exprs]
        inputs = [expr for stat in statistics for expr in stat.inputs]
        if inputs:
            query = query.with_columns(inputs)
        if by:
            query = query.group_by(list(by)).agg(exprs)
            if public_keys is not None:
                query = query.with_keys(public_keys)
        else:
            query = query.select(exprs)
        plan_of_release = query.polars_plan

        def calibrate() -> _Calibrated:
            found = _calibrate(opendp_input, plan_of_release, privacy_unit[1], loss[1], partition_selection)
            return _Calibrated(
                found, summarize_polars_measurement(found, ALPHA), summarize_polars_measurement(found, ALPHA / 2)
            )

        rules_key = json.dumps(privacy.get(data.dataset), sort_keys=True, default=str)
        measurement, summary, split_summary = opendp_input.calibrated(
            (digest, rules_key, float(epsilon), release_delta), calibrate
        )
    except VaultError:
        raise
    except Exception:
        raise _refuse("OpenDP cannot make this plan private (an operation it cannot bound)") from None
    threshold = None
    if "threshold" in summary.columns:
        found = [t for t in summary.get_column("threshold").to_list() if t is not None]
        threshold = int(found[0]) if found else None
    return PreparedDpRelease(
        datasets=charged,
        epsilon=float(epsilon),
        delta=float(release_delta),
        plan_digest=digest,
        columns=tuple(data.schema),
        opendp_input=opendp_input,
        measurement=measurement,
        d_in=privacy_unit[1],
        d_out=loss[1],
        statistics=statistics,
        by=tuple(by),
        threshold=threshold,
        summary=summary,
        split_summary=split_summary,
        value_counts=counted,
        described=described,
    )


def _calibrate(
    opendp_input: _OpenDPInput, plan: pl.LazyFrame, d_in: Any, d_out: Any, approximate: bool
) -> dp.Measurement:
    """OpenDP's measurement for ``plan`` at the noise scale (and threshold) that spends ``d_out``, the release's cost.

    OpenDP's own search (``LazyFrameQuery.resolve``) bisects over a thousand candidate measurements, about a second
    per release; the privacy loss of these mechanisms is inversely proportional to the scale, so one measurement at
    scale 1 gives the scale, nudged up until OpenDP's own privacy map accepts it. OpenDP's ``check`` has the last
    word on the measurement returned.
    """
    domain, metric, measure = opendp_input.domain, opendp_input.metric, opendp_input.measure
    no_threshold = 2**32 - 1 if approximate else None  # while the scale is found, no group is held back

    def make(scale: float, threshold: int | None) -> dp.Measurement:
        return dp.m.make_private_lazyframe(domain, metric, measure, plan, global_scale=scale, threshold=threshold)

    def loss(measurement: dp.Measurement) -> Any:
        return measurement.map(d_in)  # type: ignore[no-untyped-call]  # OpenDP leaves it unannotated

    def epsilon_of(measurement: dp.Measurement) -> float:
        spent = loss(measurement)
        return float(spent[0] if approximate else spent)

    target = float(d_out[0] if approximate else d_out)
    at_one = epsilon_of(make(1.0, no_threshold))
    if at_one <= 0:
        raise _refuse("OpenDP found nothing to add noise to in this plan")
    scale = at_one / target
    for attempt in range(40):
        if epsilon_of(make(scale, no_threshold)) <= target:
            break
        scale *= 1 + 1e-9 * 4**attempt
    else:
        raise _refuse("OpenDP's noise scale did not settle for this plan")
    threshold: int | None = None
    if approximate:

        def within_delta(candidate: float) -> bool:  # OpenDP passes integers (T=int)
            return bool(loss(make(scale, int(candidate)))[1] <= d_out[1])

        threshold = int(dp.binary_search(within_delta, T=int))
    found = make(scale, threshold)
    if not found.check(d_in, d_out):
        raise _refuse("OpenDP could not calibrate the noise for this plan")
    return found


def _require_group_bounds(node: Aggregate | Count, schema: Mapping[str, Any], inputs: set[str], *, keyed: bool) -> None:
    """Refuse a grouped sum, mean or quantile OpenDP cannot bound: it needs a public bound on the groups' sizes,
    which OpenDP keeps for grouping by unchanged input columns, after a filter only when the groups are the owner's
    public keys (``keyed``; with partition selection it drops the bound at a filter)."""
    if not isinstance(node, Aggregate) or not node.by:
        return
    float_count = [a for a in node.aggs if a.func == "count" and schema.get(a.column or "", pl.Null).is_float()]
    sized = [a for a in node.aggs if a.func in ("sum", "mean", "median", "quantile")] + float_count
    if not sized:
        return
    filtered = False
    current: Node = node.input
    while isinstance(current, Filter | Select | Assign):
        filtered = filtered or isinstance(current, Filter)
        current = current.input
    if (filtered and not keyed) or not set(node.by) <= inputs:
        raise _refuse(
            f"{sized[0].func} of column {quote(str(sized[0].column))} by groups is supported when grouping by "
            "dataset columns, after a filter only by columns with the owner's public keys (OpenDP cannot bound the "
            "groups' sizes otherwise)"
        )


def _release_delta(delta: object, rules: PrivacyBudgetRules) -> float:
    value = _number(delta, "delta")
    if not 0 <= value <= rules.delta:
        raise _refuse(f"delta must be in [0, {rules.delta:g}], the owner's delta")
    return value


JOINED = "\x01joined"  # the handle of the join of two datasets, made for one release
JOIN_MATCHES = 1  # rows kept per join key on each side: each row of one side meets at most this many of the other


def _joined(
    node: Aggregate | Count,
    sources: Mapping[str, SourceTable],
    privacy: Mapping[str, Mapping[str, Any]],
    never_release: Mapping[str, frozenset[str]],
) -> tuple[Aggregate | Count, PrivacyBudgetRules, DatasetInput, int, tuple[str, ...]] | None:
    """The release over the inner join of two owners' datasets, as a release over one private input, or None.

    OpenDP's Polars integration joins a private frame only with a public one, so the vault makes the join itself and
    hands it to OpenDP as the private input, with a stability it can prove from public rules alone: each person's
    rows are first truncated to their owner's ``max_contributions`` (by ``unit``), then each side keeps its first
    :data:`JOIN_MATCHES` rows per join key. One person then changes at most ``m`` rows of their side, each meeting
    at most ``JOIN_MATCHES`` rows of the other; and removing a row lets at most one other row of its key in, so the
    joined table changes by at most ``2 * JOIN_MATCHES * m`` rows, the contributions OpenDP calibrates to. The
    release is then ε-DP for each owner's persons, and both owners are charged. Filters and columns computed after
    the join are applied here too, row by row; bounds and public keys are each owner's, found through the join's
    lineage; never_release is checked on that lineage.
    """
    chain: list[Filter | Select | Assign] = []
    current: Node = node.input
    while isinstance(current, Filter | Select | Assign):
        chain.append(current)
        current = current.input
    if not isinstance(current, Join):
        return None
    join = current
    if join.how != "inner":
        raise _refuse("a join of two datasets is released only as an inner join")
    rules_of: dict[str, PrivacyBudgetRules] = {}
    sides: list[SourceTable] = []
    rows = 0
    for side in (join.left, join.right):
        base = _only_source(side, sources)
        if len(base.datasets) != 1:
            raise _refuse("a release joins at most two datasets")
        (dataset,) = base.datasets
        if dataset in rules_of:
            raise _refuse("a dataset joined with itself is not supported")
        rules = rules_of[dataset] = PrivacyBudgetRules.from_dict(dataset, privacy.get(dataset))
        rows = max(rows, base.row_bound().rows())
        if rules.unit is not None:
            if rules.unit not in base.columns:
                raise _refuse(f"the owner's privacy.unit names column {quote(rules.unit)}, which {dataset} lacks")
            first = pl.int_range(pl.len()).over(rules.unit) < rules.max_contributions
            base = replace(base, data=base.data.filter(first))
        evaluated = evaluate_node(side, {**sources, _handles(side)[0]: base})
        missing = [key for key in join.on if key not in evaluated.columns]
        if missing:
            raise VaultError(f"join: no column {', '.join(map(quote, missing))} on one side")
        kept = pl.int_range(pl.len()).over(list(join.on)) < JOIN_MATCHES
        sides.append(replace(evaluated, data=evaluated.data.filter(kept)))
    datasets = tuple(rules_of)
    local = {f"{JOINED}left": sides[0], f"{JOINED}right": sides[1]}
    rebuilt: Node = Join(Source(f"{JOINED}left"), Source(f"{JOINED}right"), join.on, join.how, join.suffixes)
    for link in reversed(chain):
        rebuilt = replace(link, input=rebuilt)
    frame = evaluate_node(rebuilt, local)
    hidden = frozenset((d, c) for d in datasets for c in never_release.get(d, frozenset()))
    by = node.by if isinstance(node, Aggregate) else ()
    for column in by:
        _require_releasable(column, frame.lineage.get(column, frozenset()), hidden, "group by")
    for agg in node.aggs if isinstance(node, Aggregate) else ():
        if agg.column is not None:
            _require_releasable(agg.column, frame.lineage.get(agg.column, frozenset()), hidden, agg.func)
    bounds: dict[str, tuple[float, float]] = {}
    keys: dict[str, tuple[str | int, ...]] = {}
    for column in frame.columns:
        origin = frame.lineage.get(column, frozenset())
        if len(origin) == 1:
            ((dataset, original),) = origin
            owner = rules_of.get(dataset)
            if owner is not None and original in owner.bounds:
                bounds[column] = owner.bounds[original]
            if owner is not None and original in owner.keys:
                keys[column] = owner.keys[original]
    merged = PrivacyBudgetRules(
        epsilon=min(r.epsilon for r in rules_of.values()),
        delta=min(r.delta for r in rules_of.values()),
        epsilon_per_kernel=min(r.epsilon_limit for r in rules_of.values()),
        unit=None,
        max_contributions=1,
        bounds=bounds,
        keys=keys,
    )
    rewritten: Aggregate | Count = (
        Aggregate(Source(JOINED), node.by, node.aggs) if isinstance(node, Aggregate) else Count(Source(JOINED))
    )
    named = _named_columns(rewritten)  # what the aggregate reads: the rows below it are made here
    readable = {name: _opendp_column(name, frame.dtype(name)) for name in frame.columns}
    for name in sorted(named & set(frame.columns)):
        if readable[name] is None:
            raise _refuse(f"column {quote(name)} has a type OpenDP cannot read")
    chosen = [name for name in frame.columns if name in named] or [
        name for name in frame.columns if readable[name] is not None
    ][:1]
    if not chosen:
        raise _refuse("the join has no column OpenDP can read")
    collected = frame.collect(frame.data.select([readable[name] for name in chosen if readable[name] is not None]))
    name = "+".join(datasets)
    lineage = {column: frozenset({(name, column)}) for column in collected.columns}
    virtual = SourceTable.from_arrow(collected.to_arrow(), lineage, frozenset({name}), ())
    data = DatasetInput(name, virtual, virtual.data, dict(collected.schema), rows)
    contributions = 2 * JOIN_MATCHES * max(r.max_contributions for r in rules_of.values())
    return rewritten, merged, data, contributions, datasets


def _only_source(node: Node, sources: Mapping[str, SourceTable]) -> SourceTable:
    """The one dataset under a chain of filter/select/assign nodes; anything else is refused by name."""
    while not isinstance(node, Source):
        if isinstance(node, Join):
            raise _refuse("joins are not supported yet")
        if not isinstance(node, Filter | Select | Assign):
            raise _refuse(f"a {type(node).__name__.lower()} node inside a release plan is not supported")
        node = node.input
    found = sources.get(node.handle)
    if found is None:
        raise VaultError(f"no dataset or table with handle {quote(node.handle)} is open")
    return found


def _assigned(node: Node) -> frozenset[str]:
    """The columns a chain of filter/select/assign nodes computes (an assign may replace a dataset column)."""
    found: set[str] = set()
    while isinstance(node, Filter | Select | Assign):
        if isinstance(node, Assign):
            found.update(name for name, _ in node.columns)
        node = node.input
    return frozenset(found)


def _handles(node: Node) -> list[str]:
    while not isinstance(node, Source):
        assert isinstance(node, Filter | Select | Assign)
        node = node.input
    return [node.handle]


def _named_columns(node: Aggregate | Count) -> set[str]:
    """Every column name the plan reads or writes: the dataset's columns among them are what OpenDP receives."""
    named: set[str] = set()

    def walk_expr(expr: Expr) -> None:
        if isinstance(expr, Col):
            named.add(expr.name)
        elif isinstance(expr, Call):
            for arg in expr.args:
                walk_expr(arg)

    current: Node = node.input
    while not isinstance(current, Source):
        if isinstance(current, Filter):
            walk_expr(current.predicate)
        elif isinstance(current, Select):
            named.update(current.columns)
        elif isinstance(current, Assign):
            for _, expr in current.columns:
                walk_expr(expr)
        assert isinstance(current, Filter | Select | Assign)
        current = current.input
    if isinstance(node, Aggregate):
        named.update(node.by)
        named.update(agg.column for agg in node.aggs if agg.column is not None)
    return named


def _require_releasable(column: str, lineage: Lineage, never: frozenset[tuple[str, str]], use: str) -> None:
    hit = sorted(lineage & never)
    if hit:
        raise _refuse(
            f"{use} on column {quote(column)} is refused: it derives from never_release column {quote(hit[0][1])}"
        )


def _public_keys(by: Sequence[str], rules: PrivacyBudgetRules, frame: SourceTable, dataset: str) -> pl.LazyFrame | None:
    """Every combination of the owner's public keys when each group column has them, else None."""
    if not by or any(c not in rules.keys or frame.lineage.get(c) != frozenset({(dataset, c)}) for c in by):
        return None
    size = math.prod(len(rules.keys[c]) for c in by)
    if size > MAX_PUBLIC_GROUPS:
        raise _refuse(f"the public keys of {', '.join(quote(c) for c in by)} make more than {MAX_PUBLIC_GROUPS} groups")
    keys: pl.DataFrame | None = None
    for column in by:
        try:
            part = pl.DataFrame({column: pl.Series(list(rules.keys[column])).cast(frame.dtype(column))})
        except Exception:
            raise _refuse(f"the owner's privacy.keys.{column} do not fit the column's type") from None
        keys = part if keys is None else keys.join(part, how="cross")
    assert keys is not None
    return keys.lazy()


def _statistics(
    node: Aggregate | Count,
    aggs: Sequence[Agg],
    schema: Mapping[str, Any],
    rules: PrivacyBudgetRules,
    partition_selection: bool,
    nan_free: frozenset[str] = frozenset(),
) -> tuple[_Statistic, ...]:
    if isinstance(node, Count):
        return (_Statistic("count", "count", (dp_len(signed=True).alias("count"),), ("count",)),)
    found: list[_Statistic] = []
    for i, agg in enumerate(aggs):
        found.append(_statistic(agg, f"{_HIDDEN}{i}", schema, rules, agg.column in nan_free))
    # A count of a column beside its mean is the mean's noisy count, released once: one measurement fewer (so more
    # of the ε for each), and the two numbers agree.
    means = {agg.column: stat for agg, stat in zip(aggs, found, strict=True) if stat.statistic == "mean"}
    for position, (agg, stat) in enumerate(zip(aggs, list(found), strict=True)):
        mean = means.get(agg.column) if agg.func == "count" and agg.column is not None else None
        if mean is not None:
            found[position] = _Statistic(stat.name, "count", (), (mean.parts[1],))
    if partition_selection and not any(a.func == "count" and a.column is None for a in aggs):
        # OpenDP selects groups by a noisy row count; without one in the plan, one is computed and not shown
        name = f"{_HIDDEN}len"
        found.append(_Statistic(name, "count", (dp_len(signed=True).alias(name),), (name,), shown=False))
    return tuple(found)


def _statistic(
    agg: Agg, hidden: str, schema: Mapping[str, Any], rules: PrivacyBudgetRules, nan_free: bool = False
) -> _Statistic:
    if agg.func == "count" and agg.column is None:
        return _Statistic(agg.name, "count", (dp_len(signed=True).alias(hidden),), (hidden,))
    if agg.func not in ("count", "sum", "mean", "median", "quantile"):
        raise _refuse(f"aggregation {quote(agg.func)} is not supported yet (count, sum, mean, median, quantile are)")
    assert agg.column is not None
    column = agg.column
    if column not in schema:
        raise _refuse(f"{agg.func}: no column {quote(column)}")
    dtype = schema[column]
    value = _Compiled(pl.col(column), pl.Int64 if nan_free and dtype.is_float() else dtype)  # missing: null only
    if agg.func == "count" and not value.dtype.is_float():
        return _Statistic(agg.name, "count", (_noisy(pl.col(column)).count(signed=True).alias(hidden),), (hidden,))
    if agg.func == "count":  # non-missing values (NaN is missing): a sum of 0/1 indicators, sensitivity one
        present = (~_missing(value)).cast(pl.Int64).alias(f"{hidden}p")
        count = _noisy(pl.col(f"{hidden}p")).sum((0, 1)).alias(hidden)
        return _Statistic(agg.name, "count", (count,), (hidden,), inputs=(present,))
    if not (dtype.is_integer() or dtype.is_float() or dtype == pl.Boolean):
        raise _refuse(f"{agg.func} needs a numeric column; {quote(column)} is {dtype}")
    bounds = rules.bounds.get(column)
    if bounds is None:
        raise _refuse(
            f"{agg.func} of column {quote(column)} needs public bounds: the owner must add privacy.bounds.{column}"
        )
    low, high = bounds
    if agg.func in ("median", "quantile"):
        q = 0.5 if agg.func == "median" else float(agg.q if agg.q is not None else 0.5)
        candidates = _candidates(low, high, dtype.is_integer() or dtype == pl.Boolean)
        expr = _noisy(pl.col(column).cast(pl.Float64)).quantile(q, candidates).alias(hidden)
        return _Statistic(agg.name, "quantile", (expr,), (hidden,))
    clipped, sum_bounds = _clipped(pl.col(column), dtype, low, high, nan_free)
    total = _noisy(pl.col(f"{hidden}c")).sum(sum_bounds).alias(hidden)
    if agg.func == "sum":
        return _Statistic(agg.name, "sum", (total,), (hidden,), inputs=(clipped.alias(f"{hidden}c"),))
    count_name = f"{hidden}n"
    if not value.dtype.is_float():  # missing is null only: OpenDP counts the values, with no column of flags
        count = _noisy(pl.col(column)).count(signed=True).alias(count_name)
        inputs: tuple[pl.Expr, ...] = (clipped.alias(f"{hidden}c"),)
    else:
        present = (~_missing(value)).cast(pl.Int64).alias(f"{hidden}p")
        count = _noisy(pl.col(f"{hidden}p")).sum((0, 1)).alias(count_name)
        inputs = (clipped.alias(f"{hidden}c"), present)
    return _Statistic(agg.name, "mean", (total, count), (hidden, count_name), (low, high), inputs=inputs)


def _noisy(expr: pl.Expr) -> DPExpr:
    """OpenDP's statistics on ``expr`` (the ``.dp`` namespace, spelled so that type checkers see it)."""
    return DPExpr(expr)  # type: ignore[no-untyped-call]  # OpenDP leaves its constructor unannotated


def _clipped(
    column: pl.Expr, dtype: Any, low: float, high: float, nan_free: bool = False
) -> tuple[pl.Expr, tuple[Any, Any]]:
    """The value clipped to the bounds, a missing one as 0 (it adds nothing, as pandas skips it), and the bounds
    OpenDP's sum clips it to again (they include 0)."""
    integral = (dtype.is_integer() or dtype == pl.Boolean) and float(low).is_integer() and float(high).is_integer()
    if integral:
        lo, hi = int(low), int(high)
        return column.cast(pl.Int64).clip(lo, hi).fill_null(0), (min(lo, 0), max(hi, 0))
    clipped = column.cast(pl.Float64).clip(low, high)
    if not nan_free:
        clipped = clipped.fill_nan(0.0)
    clipped = clipped.fill_null(0.0)
    return clipped, (min(low, 0.0), max(high, 0.0))


def _candidates(low: float, high: float, integral: bool) -> list[float]:
    """Public quantile candidates from the bounds alone: every integer when few, else evenly spaced points."""
    if integral and float(low).is_integer() and float(high).is_integer() and high - low < MAX_QUANTILE_CANDIDATES:
        return [float(v) for v in range(int(low), int(high) + 1)]
    step = (high - low) / (MAX_QUANTILE_CANDIDATES - 1)
    return [low + i * step for i in range(MAX_QUANTILE_CANDIDATES - 1)] + [high]


def _row_level(node: Node, root: pl.LazyFrame, empty: Mapping[str, SourceTable]) -> pl.LazyFrame:
    """The filter/select/assign chain as a Polars plan over ``root`` (OpenDP's input, possibly truncated).

    An assigned column is cast to the type the exact engine gives it, so both modes agree on result types.
    """
    if isinstance(node, Source):
        return root
    assert isinstance(node, Filter | Select | Assign)
    frame = _row_level(node.input, root, empty)
    schema = dict(frame.collect_schema())
    if isinstance(node, Select):
        return frame.select(list(node.columns))
    if isinstance(node, Filter):
        predicate = ExpressionCompiler(schema, "filter").compile(node.predicate)
        return frame.filter(predicate.expr)
    for i, (name, expr) in enumerate(node.columns):
        compiled = ExpressionCompiler(schema, "assign").compile(expr)
        expected = evaluate_node(Assign(node.input, node.columns[: i + 1]), empty).dtype(name)
        frame = frame.with_columns(compiled.expr.cast(expected).alias(name))
        schema = dict(frame.collect_schema())
    return frame
