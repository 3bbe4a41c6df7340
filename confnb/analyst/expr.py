"""Column expressions: Python operators that build the vault's expression JSON instead of computing anything.

An analyst writes ``t["age"] > 40`` exactly as in pandas, but the executor never has the column, so the operators
return an :class:`Expr` that only *describes* the computation (``{"fn": "gt", "args": [{"col": "age"}, {"lit":
40}]}``); the vault evaluates it next to the data. Expressions hold column names and the analyst's own literals,
never data, so building them cannot leak anything.

pandas' idioms that would need a truth value of a whole column (``and``, ``or``, ``not``, chained comparisons,
``if expr:``) are refused with a :class:`TypeError` that says what to write instead, because silently taking
Python's truthiness of an object would build the wrong filter.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final, Protocol

if TYPE_CHECKING:
    from confnb.analyst.table import SealedResult

__all__ = ["Column", "Expr", "Window", "col", "lit", "where"]

JsonScalar = bool | int | float | str | None

CAST_TYPES: Final = ("int64", "float64", "string", "bool")
# A group's minimum or maximum is not offered: copied onto every row of the group it would pass the vault's check
# that an extreme is shared by at least k records.
WINDOW_FUNCS: Final = ("rank", "sum", "mean", "count")
_CAST_ALIASES: Final = {
    "int": "int64",
    "int64": "int64",
    "Int64": "int64",
    "integer": "int64",
    "float": "float64",
    "float64": "float64",
    "Float64": "float64",
    "double": "float64",
    "str": "string",
    "string": "string",
    "bool": "bool",
    "boolean": "bool",
}
_PYTHON_TYPES: Final[dict[type, str]] = {int: "int64", float: "float64", str: "string", bool: "bool"}

_NO_TRUTH = (
    "a column expression has no single truth value (its rows are sealed in the vault): combine conditions with "
    "& | ~ instead of and/or/not, and parenthesise each comparison, e.g. (t['age'] > 40) & (t['sex'] == 'F')"
)


class _AggregateTarget(Protocol):
    """What an expression bound to a table delegates column statistics to (a SealedTable)."""

    def _column_stat(self, expr: Expr, func: str, q: float | None = None) -> SealedResult: ...

    def _column_quantiles(self, expr: Expr, qs: list[float]) -> SealedResult: ...

    def _column_value_counts(self, expr: Expr, dropna: bool, ascending: bool) -> SealedResult: ...

    def _column_describe(self, expr: Expr) -> SealedResult: ...


def _literal(value: object) -> dict[str, Any]:
    """The JSON form of an analyst's constant; only JSON scalars cross the wire (no NaN, no objects)."""
    if isinstance(value, Expr):
        return value.to_json()
    if value is None or type(value).__name__ == "NAType":  # pandas.NA means "missing", as None does
        return {"lit": None}
    if type(value).__module__ == "numpy" and callable(getattr(value, "item", None)):
        value = value.item()  # type: ignore[attr-defined]  # numpy scalars (np.float64 is also a float)
    for base in (bool, int, float, str):
        if isinstance(value, base):
            value = base(value)  # subclasses (released values, enums) as the plain JSON type
            break
    else:
        raise TypeError(
            f"a {type(value).__name__} cannot be a literal in a vault expression: use int, float, str, bool or None "
            "(for dates, compare .dt parts, e.g. t['when'].dt.year == 2024)"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("NaN and infinity are not literals in a vault expression: use .isnull() / .notnull()")
    return {"lit": value}


def _scalar(value: object, what: str) -> JsonScalar:
    node = _literal(value)
    if "lit" not in node:
        raise TypeError(f"{what} must be constants, not column expressions")
    result: JsonScalar = node["lit"]
    return result


def _bind(*operands: object) -> _AggregateTarget | None:
    """The one table the operands' columns come from, if they agree (for ``expr.mean()`` and friends)."""
    tables = {id(o._table): o._table for o in operands if isinstance(o, Expr) and o._table is not None}
    return next(iter(tables.values())) if len(tables) == 1 else None


def _fn(name: str, *args: object, **options: Any) -> Expr:
    return Expr({"fn": name, "args": [_literal(arg) for arg in args], **options}, _bind(*args))


class Expr:
    """A lazy, data-free description of a per-row computation, evaluated by the vault.

    Supports pandas' operators (comparison, arithmetic, ``& | ^ ~``) and the usual Series methods. Expressions
    compare with ``==`` to build predicates, so they are unhashable, like pandas Series.
    """

    __slots__ = ("_node", "_table")
    __hash__ = None  # type: ignore[assignment]  # == builds a predicate, so equal-hash semantics cannot hold

    def __init__(self, node: dict[str, Any], table: _AggregateTarget | None = None) -> None:
        self._node = node
        self._table = table

    def to_json(self) -> dict[str, Any]:
        """The expression as the vault spec's JSON (a fresh copy; the caller may change it)."""
        return copy.deepcopy(self._node)

    def columns(self) -> set[str]:
        """The column names the expression reads (checked against a table's known columns before sending)."""
        found: set[str] = set()
        stack: list[Any] = [self._node]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                if isinstance(node.get("col"), str):
                    found.add(node["col"])
                if node.get("fn") == "over":
                    found.update(name for name in node.get("by", []) if isinstance(name, str))
                stack.extend(node.get("args", []))
        return found

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {_render(self._node)}>"

    def __bool__(self) -> bool:
        raise TypeError(_NO_TRUTH)

    def __iter__(self) -> Any:
        raise TypeError("a column expression cannot be iterated: its rows are sealed in the vault")

    def __reduce__(self) -> Any:
        return (Expr, (self.to_json(),))  # copy/deepcopy keep the JSON; the table binding is a convenience only

    # -- comparison -------------------------------------------------------------------------------------------

    def __eq__(self, other: object) -> Expr:  # type: ignore[override]
        return _fn("eq", self, other)

    def __ne__(self, other: object) -> Expr:  # type: ignore[override]
        return _fn("ne", self, other)

    def __lt__(self, other: object) -> Expr:
        return _fn("lt", self, other)

    def __le__(self, other: object) -> Expr:
        return _fn("le", self, other)

    def __gt__(self, other: object) -> Expr:
        return _fn("gt", self, other)

    def __ge__(self, other: object) -> Expr:
        return _fn("ge", self, other)

    def eq(self, other: object) -> Expr:
        return _fn("eq", self, other)

    def ne(self, other: object) -> Expr:
        return _fn("ne", self, other)

    def lt(self, other: object) -> Expr:
        return _fn("lt", self, other)

    def le(self, other: object) -> Expr:
        return _fn("le", self, other)

    def gt(self, other: object) -> Expr:
        return _fn("gt", self, other)

    def ge(self, other: object) -> Expr:
        return _fn("ge", self, other)

    # -- arithmetic -------------------------------------------------------------------------------------------

    def __add__(self, other: object) -> Expr:
        return _fn("add", self, other)

    def __radd__(self, other: object) -> Expr:
        return _fn("add", other, self)

    def __sub__(self, other: object) -> Expr:
        return _fn("sub", self, other)

    def __rsub__(self, other: object) -> Expr:
        return _fn("sub", other, self)

    def __mul__(self, other: object) -> Expr:
        return _fn("mul", self, other)

    def __rmul__(self, other: object) -> Expr:
        return _fn("mul", other, self)

    def __truediv__(self, other: object) -> Expr:
        return _fn("truediv", self, other)

    def __rtruediv__(self, other: object) -> Expr:
        return _fn("truediv", other, self)

    def __floordiv__(self, other: object) -> Expr:
        return _fn("floordiv", self, other)

    def __rfloordiv__(self, other: object) -> Expr:
        return _fn("floordiv", other, self)

    def __mod__(self, other: object) -> Expr:
        return _fn("mod", self, other)

    def __rmod__(self, other: object) -> Expr:
        return _fn("mod", other, self)

    def __pow__(self, other: object) -> Expr:
        return _fn("pow", self, other)

    def __rpow__(self, other: object) -> Expr:
        return _fn("pow", other, self)

    def __neg__(self) -> Expr:
        return _fn("neg", self)

    def __pos__(self) -> Expr:
        return self

    def __abs__(self) -> Expr:
        return _fn("abs", self)

    def __round__(self, ndigits: int | None = None) -> Expr:
        return self.round(0 if ndigits is None else ndigits)

    # -- logic ------------------------------------------------------------------------------------------------

    def __and__(self, other: object) -> Expr:
        return _fn("and", self, other)

    def __rand__(self, other: object) -> Expr:
        return _fn("and", other, self)

    def __or__(self, other: object) -> Expr:
        return _fn("or", self, other)

    def __ror__(self, other: object) -> Expr:
        return _fn("or", other, self)

    def __xor__(self, other: object) -> Expr:
        return _fn("xor", self, other)

    def __rxor__(self, other: object) -> Expr:
        return _fn("xor", other, self)

    def __invert__(self) -> Expr:
        return _fn("not", self)

    # -- Series-like methods ----------------------------------------------------------------------------------

    def isin(self, values: Iterable[object]) -> Expr:
        """Membership in a list of constants (pandas' ``Series.isin``)."""
        if isinstance(values, str | bytes) or not isinstance(values, Iterable):
            raise TypeError("isin takes a list of constants, e.g. t['state'].isin(['CA', 'NY'])")
        if isinstance(values, Expr):
            raise TypeError("isin takes a list of constants, not a column expression")
        return Expr(
            {"fn": "isin", "args": [self.to_json()], "values": [_scalar(v, "isin values") for v in values]},
            self._table,
        )

    def isnull(self) -> Expr:
        return _fn("is_null", self)

    def notnull(self) -> Expr:
        return _fn("not_null", self)

    isna = isnull
    notna = notnull

    def between(self, left: object, right: object, inclusive: str = "both") -> Expr:
        """pandas' ``Series.between``: ``inclusive`` is "both" (the default), "neither", "left" or "right"."""
        if inclusive == "both":
            return _fn("between", self, left, right)
        if inclusive == "neither":
            return (self > left) & (self < right)
        if inclusive == "left":
            return (self >= left) & (self < right)
        if inclusive == "right":
            return (self > left) & (self <= right)
        raise ValueError('inclusive must be "both", "neither", "left" or "right"')

    def fillna(self, value: object) -> Expr:
        return _fn("fill_null", self, value)

    def round(self, decimals: int = 0) -> Expr:
        if isinstance(decimals, bool) or not isinstance(decimals, int):
            raise TypeError("round takes an integer number of decimals")
        return Expr({"fn": "round", "args": [self.to_json()], "ndigits": decimals}, self._table)

    def abs(self) -> Expr:
        return _fn("abs", self)

    def log(self) -> Expr:
        """Natural logarithm, as numpy's ``np.log``."""
        return _fn("log", self)

    def exp(self) -> Expr:
        return _fn("exp", self)

    def sqrt(self) -> Expr:
        return _fn("sqrt", self)

    def astype(self, dtype: object) -> Expr:
        """Cast to int64, float64, string or bool (Python types, numpy dtypes and pandas names are accepted)."""
        return Expr({"fn": "cast", "args": [self.to_json()], "type": _cast_name(dtype)}, self._table)

    # -- window functions over groups (one value per row, computed within the row's group) ----------------------

    def rank(self) -> Window:
        """The row's rank within its group, ties averaged: ``t["pay"].rank().over("dept")`` is pandas'
        ``df.groupby("dept")["pay"].rank()``."""
        return Window(self, "rank")

    def transform(self, func: str) -> Window:
        """A group statistic on every row of the group: ``t["pay"].transform("mean").over("dept")`` is pandas'
        ``df.groupby("dept")["pay"].transform("mean")``; ``func`` is sum, mean or count."""
        if func not in WINDOW_FUNCS or func == "rank":
            raise ValueError(f"transform takes one of {', '.join(f for f in WINDOW_FUNCS if f != 'rank')}")
        return Window(self, func)

    # -- statistics (lazy results; need an expression taken from a table, e.g. t["age"]) ------------------------

    def _target(self, what: str) -> _AggregateTarget:
        if self._table is None:
            raise TypeError(
                f"{what} needs a column taken from a table, e.g. t['age'].{what}(); this expression is not bound "
                "to one table"
            )
        return self._table

    def count(self) -> SealedResult:
        """Non-null values (pandas' ``Series.count``); ``t.count()`` counts rows."""
        return self._target("count")._column_stat(self, "count")

    def sum(self) -> SealedResult:
        return self._target("sum")._column_stat(self, "sum")

    def mean(self) -> SealedResult:
        return self._target("mean")._column_stat(self, "mean")

    def min(self) -> SealedResult:
        return self._target("min")._column_stat(self, "min")

    def max(self) -> SealedResult:
        return self._target("max")._column_stat(self, "max")

    def std(self) -> SealedResult:
        """Sample standard deviation (ddof=1, as pandas)."""
        return self._target("std")._column_stat(self, "std")

    def var(self) -> SealedResult:
        return self._target("var")._column_stat(self, "var")

    def median(self) -> SealedResult:
        return self._target("median")._column_stat(self, "median")

    def nunique(self) -> SealedResult:
        return self._target("nunique")._column_stat(self, "nunique")

    def quantile(self, q: float | Iterable[float] = 0.5) -> SealedResult:
        """One quantile → a scalar; a list of them → a Series indexed by q, as pandas."""
        target = self._target("quantile")
        if isinstance(q, Iterable):
            return target._column_quantiles(self, [_quantile(value) for value in q])
        return target._column_stat(self, "quantile", _quantile(q))

    def value_counts(
        self, normalize: bool = False, sort: bool = True, ascending: bool = False, dropna: bool = True
    ) -> SealedResult:
        """Counts per distinct value, largest first (groups below the policy's minimum size are suppressed)."""
        if normalize:
            raise ValueError(
                "value_counts(normalize=True) is not offered: suppressed small groups would skew the shares; divide "
                "the released counts by t.count().release() yourself"
            )
        if not sort:
            raise ValueError("value_counts is always sorted by count")
        return self._target("value_counts")._column_value_counts(self, dropna, ascending)

    def describe(self) -> SealedResult:
        return self._target("describe")._column_describe(self)

    # -- accessors (last: the name ``str`` shadows the builtin inside this class body) -------------------------

    @property
    def dt(self) -> _DatetimeAccessor:
        return _DatetimeAccessor(self)

    @property
    def str(self) -> _StringAccessor:
        return _StringAccessor(self)


class Window:
    """``expr.rank()`` or ``expr.transform(func)`` waiting for its groups: ``.over("g")`` makes it an expression."""

    __slots__ = ("_expr", "_func")

    def __init__(self, expr: Expr, func: str) -> None:
        self._expr = expr
        self._func = func

    def over(self, *by: str | Iterable[str]) -> Expr:
        names: list[str] = []
        for item in by:
            names.extend([item] if isinstance(item, str) else list(item))
        if not names or not all(isinstance(name, str) and name for name in names):
            raise TypeError("over takes the names of the group columns, e.g. .over('dept')")
        node = {"fn": "over", "args": [self._expr.to_json()], "func": self._func, "by": names}
        return Expr(node, self._expr._table)

    def __repr__(self) -> str:
        return f"<Window {self._func} of {_render(self._expr._node)}; call .over(columns)>"


class Column(Expr):
    """A named column; ``t["age"]`` binds it to the table ``t`` so that ``t["age"].mean()`` works."""

    __slots__ = ("name",)

    def __init__(self, name: str, table: _AggregateTarget | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError("a column name is a non-empty string")
        super().__init__({"col": name}, table)
        self.name = name

    def __reduce__(self) -> Any:
        return (Column, (self.name,))

    def __repr__(self) -> str:
        return f"<Column {self.name!r}>"


class _DatetimeAccessor:
    """``expr.dt.year`` etc.: parts of a timestamp or date column, as pandas' ``.dt`` accessor."""

    __slots__ = ("_expr",)

    def __init__(self, expr: Expr) -> None:
        self._expr = expr

    @property
    def year(self) -> Expr:
        return _fn("year", self._expr)

    @property
    def month(self) -> Expr:
        return _fn("month", self._expr)

    @property
    def day(self) -> Expr:
        return _fn("day", self._expr)

    @property
    def hour(self) -> Expr:
        return _fn("hour", self._expr)

    @property
    def weekday(self) -> Expr:
        """Monday = 0 … Sunday = 6, as pandas."""
        return _fn("weekday", self._expr)

    dayofweek = weekday
    day_of_week = weekday


class _StringAccessor:
    """``expr.str.lower()`` etc., as pandas' ``.str`` accessor."""

    __slots__ = ("_expr",)

    def __init__(self, expr: Expr) -> None:
        self._expr = expr

    def lower(self) -> Expr:
        return _fn("lower", self._expr)

    def upper(self) -> Expr:
        return _fn("upper", self._expr)

    def len(self) -> Expr:
        return _fn("len", self._expr)

    def startswith(self, pat: str | tuple[str, ...]) -> Expr:
        """Prefix test; a tuple of prefixes matches any of them (as ``str.startswith``)."""
        prefixes = pat if isinstance(pat, tuple) else (pat,)
        if not prefixes or not all(isinstance(p, str) for p in prefixes):
            raise TypeError("startswith takes a string or a tuple of strings")
        built = [
            Expr({"fn": "startswith", "args": [self._expr.to_json()], "prefix": p}, self._expr._table) for p in prefixes
        ]
        result = built[0]
        for other in built[1:]:
            result = result | other
        return result


def col(name: str) -> Column:
    """A column by name, not tied to a table: ``t.filter(cn.col("age") > 40)``."""
    return Column(name)


def lit(value: object) -> Expr:
    """A constant as an expression (for ``t.assign(source=cn.lit("claims"))``)."""
    return Expr(_literal(value))


def where(cond: object, a: object, b: object) -> Expr:
    """``a`` where ``cond`` holds, else ``b`` (``numpy.where`` for sealed columns)."""
    if not isinstance(cond, Expr):
        raise TypeError("where's condition must be a column expression, e.g. cn.where(t['age'] > 40, 'old', 'young')")
    return _fn("where", cond, a, b)


def as_expr(value: object) -> Expr:
    """A column expression or a constant, as an :class:`Expr`."""
    return value if isinstance(value, Expr) else lit(value)


def _cast_name(dtype: object) -> str:
    if isinstance(dtype, type) and dtype in _PYTHON_TYPES:
        return _PYTHON_TYPES[dtype]
    name = getattr(dtype, "__name__", None) if isinstance(dtype, type) else None
    text = name if isinstance(name, str) else str(dtype)
    if text in _CAST_ALIASES:
        return _CAST_ALIASES[text]
    raise TypeError(f"astype supports {', '.join(CAST_TYPES)} (or int, float, str, bool), not {text!r}")


def _quantile(q: object) -> float:
    if isinstance(q, bool) or not isinstance(q, int | float) or not 0 <= q <= 1:
        raise ValueError("a quantile is a number between 0 and 1")
    return float(q)


def _render(node: Any) -> str:
    """A compact, readable form of an expression for reprs: only names, function names and the analyst's literals."""
    if not isinstance(node, dict):
        return "?"
    if "col" in node:
        return f"[{node['col']}]"
    if "lit" in node:
        return repr(node["lit"])
    args = ", ".join(_render(arg) for arg in node.get("args", []))
    options = ", ".join(f"{key}={value!r}" for key, value in node.items() if key not in ("fn", "args"))
    return f"{node.get('fn', '?')}({args}{', ' if args and options else ''}{options})"
