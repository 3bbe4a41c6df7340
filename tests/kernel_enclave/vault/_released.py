"""Comparing two released tables row by row, as two routes or two forms of the same data must release them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest


def assert_same_rows(mine: Sequence[dict[str, Any]], theirs: Sequence[dict[str, Any]]) -> None:
    """The same rows, columns and values; floats to rounding (a parallel sum adds in any order)."""
    assert len(mine) == len(theirs)
    for row, other in zip(mine, theirs, strict=True):
        assert row.keys() == other.keys()
        for name, value in row.items():
            if isinstance(value, float) and isinstance(other[name], float):
                assert value == pytest.approx(other[name], rel=1e-9, abs=1e-12, nan_ok=True), name
            else:
                assert value == other[name], name
