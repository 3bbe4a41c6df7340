"""The owner's ``[privacy]`` table: exact numbers under the release rules, or differential privacy under a budget.

In ``mode = "dp"`` every released number is noisy and charged to a total budget ``epsilon`` that the owner's broker
keeps; the bounds and group keys listed here are public facts the noise is calibrated to, so they must be written by
the owner, never learnt from the data. Parsing is as strict as the rest of the policy file: a key that would change
nothing (any DP setting under ``mode = "exact"``) is refused rather than ignored, so an owner never believes in a
budget nobody charges.

The canonical form (:meth:`PrivacyPolicy.to_dict`) holds only what was written or has a fixed default, so that the
signed policy names exactly the rules the vault applies.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from confnb.attest.errors import PolicyError
from confnb.policy.toml import KeyLines, TableReader, brief

MODES = ("exact", "dp")
PUBLIC_KINDS = ("row_count",)  # "schema" is always released; it holds no row's value
MAX_EPSILON = 100.0
MAX_DELTA = 1e-3  # exclusive: a larger delta is a real chance of publishing a record outright
MAX_CONTRIBUTIONS = 10_000
MAX_KEYS = 10_000
_INT64 = (-(2**63), 2**63 - 1)  # group keys are compared with column values, which are at most 64-bit integers
_DP_KEYS = ("epsilon", "delta", "epsilon_per_kernel", "unit", "max_contributions", "public", "bounds", "keys")
_BARE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class PrivacyPolicy:
    """One dataset's privacy mode. Built by :func:`read_privacy`, which validates; defaults are those of the table."""

    mode: str = "exact"
    epsilon: float | None = None  # dp: the dataset's total budget
    delta: float = 0.0
    epsilon_per_kernel: float | None = None  # dp: None lets one kernel spend the whole budget
    unit: str | None = None  # dp: the column naming a person; None: one row is one person
    max_contributions: int = 1
    public: tuple[str, ...] = ()
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    keys: Mapping[str, tuple[str | int, ...]] = field(default_factory=dict)

    def __hash__(self) -> int:
        # The mappings are not hashable; the canonical form names the same content.
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    @property
    def is_dp(self) -> bool:
        return self.mode == "dp"

    def to_dict(self) -> dict[str, Any]:
        if not self.is_dp:
            return {"mode": self.mode}
        document: dict[str, Any] = {
            "mode": self.mode,
            "epsilon": float(self.epsilon) if self.epsilon is not None else None,
            "delta": float(self.delta),
            "max_contributions": self.max_contributions,
        }
        if self.epsilon_per_kernel is not None:
            document["epsilon_per_kernel"] = float(self.epsilon_per_kernel)
        if self.unit is not None:
            document["unit"] = self.unit
        if self.public:
            document["public"] = sorted(self.public)
        if self.bounds:
            document["bounds"] = {column: [float(low), float(high)] for column, (low, high) in self.bounds.items()}
        if self.keys:
            document["keys"] = {column: list(values) for column, values in self.keys.items()}
        return document


def read_privacy(lines: KeyLines, source: str, value: Any) -> PrivacyPolicy:
    """The typed ``[privacy]`` table (from TOML or from its canonical dict), whose names the schema has checked."""
    return _Reader(lines, source, "privacy").read(value)


class _Reader(TableReader):
    def read(self, value: Any) -> PrivacyPolicy:
        table = self.table_of("", value, '{ mode = "dp", epsilon = 1.0 }')
        if "mode" not in table:
            raise self.fail("", 'needs a mode: "exact" (numbers as computed) or "dp" (differential privacy)')
        mode = table["mode"]
        if mode not in MODES:
            raise self.fail("mode", f'must be "exact" or "dp", not {brief(mode)}')
        if mode == "exact":
            for key in _DP_KEYS:
                if key in table:
                    raise self.fail(key, 'has no effect in exact mode; remove it, or set mode = "dp"')
            return PrivacyPolicy(mode="exact")
        if "epsilon" not in table:
            raise self.fail("", 'mode = "dp" needs epsilon, the dataset\'s total budget, e.g. epsilon = 1.0')
        epsilon = self._real("epsilon", table["epsilon"])
        if not 0 < epsilon <= MAX_EPSILON:
            raise self.fail(
                "epsilon", f"must be a number above 0 and at most {MAX_EPSILON:g}, not {brief(table['epsilon'])}"
            )
        values: dict[str, Any] = {"mode": "dp", "epsilon": epsilon}
        if "delta" in table:
            delta = self._real("delta", table["delta"])
            if not 0 <= delta < MAX_DELTA:
                raise self.fail("delta", f"must be a number from 0 to below {MAX_DELTA:g}, not {brief(table['delta'])}")
            values["delta"] = delta
        if "epsilon_per_kernel" in table:
            written = table["epsilon_per_kernel"]
            share = self._real("epsilon_per_kernel", written)
            if not 0 < share <= epsilon:
                raise self.fail(
                    "epsilon_per_kernel",
                    f"must be a number above 0 and at most epsilon ({epsilon!r}), not {brief(written)}",
                )
            values["epsilon_per_kernel"] = share
        if "unit" in table:
            values["unit"] = self.string("unit", table["unit"], what="a column name")
        if "max_contributions" in table:
            values["max_contributions"] = self.integer(
                "max_contributions", table["max_contributions"], 1, MAX_CONTRIBUTIONS
            )
        if "public" in table:
            public = table["public"]
            if isinstance(public, list) and "schema" in public:
                raise self.fail("public", "'schema' is always released and need not be listed; list only row_count")
            values["public"] = tuple(sorted(self.choices("public", public, PUBLIC_KINDS, allow_empty=True)))
        if "bounds" in table:
            bounds = self.table_of("bounds", table["bounds"], "{ age = [0, 120] }")
            values["bounds"] = {self._column("bounds", name): self._bounds(name, item) for name, item in bounds.items()}
        if "keys" in table:
            keys = self.table_of("keys", table["keys"], '{ diagnosis = ["cardiac", "respiratory"] }')
            values["keys"] = {self._column("keys", name): self._keys(name, item) for name, item in keys.items()}
        return PrivacyPolicy(**values)

    def _real(self, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"must be a number, not {brief(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float's range
            number = math.inf
        if not math.isfinite(number):
            raise self.fail(key, f"must be a finite number, not {brief(value)}")
        return number

    def _column(self, key: str, name: str) -> str:
        if not name:
            raise self._fail_at((key, name), "a column name cannot be empty")
        return name

    def _bounds(self, column: str, value: Any) -> tuple[float, float]:
        why = f"must be [low, high], two finite numbers with low < high, not {brief(value)}"
        if not isinstance(value, list) or len(value) != 2:
            raise self._fail_at(("bounds", column), why)
        numbers = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int | float):
                raise self._fail_at(("bounds", column), why)
            try:
                numbers.append(float(item))
            except OverflowError:
                raise self._fail_at(("bounds", column), why) from None
        low, high = numbers
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise self._fail_at(("bounds", column), why)
        return low, high

    def _keys(self, column: str, value: Any) -> tuple[str | int, ...]:
        path = ("keys", column)
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_KEYS:
            shown = f"{len(value)} entries" if isinstance(value, list) else brief(value)
            raise self._fail_at(path, f"must be a list of 1 to {MAX_KEYS} strings or integers, not {shown}")
        for item in value:
            if isinstance(item, bool) or not isinstance(item, str | int):
                raise self._fail_at(path, f"{brief(item)} is not a string or an integer")
            if isinstance(item, int) and not _INT64[0] <= item <= _INT64[1]:
                raise self._fail_at(path, f"{brief(item)} is not a 64-bit integer")
        if len({type(item) for item in value}) > 1:
            raise self._fail_at(path, "mixes strings and integers; one column's keys are all of one type")
        seen: set[str | int] = set()
        for item in value:
            if item in seen:
                raise self._fail_at(path, f"lists {brief(item)} twice")
            seen.add(item)
        return tuple(value)

    def _fail_at(self, path: tuple[str, str], message: str) -> PolicyError:
        """Like :meth:`fail`, for a column name the schema did not check (it may hold a dot or a newline)."""
        line = self.lines.line((self.table, *path))
        where = f"{self.source}:{line}" if line else self.source
        label = ".".join(part if _BARE_NAME.fullmatch(part) else json.dumps(part[:64]) for part in path)
        return PolicyError(f"{where}: {self.table}.{label}: {message}")
