"""The vault's JSON plan language, written by hand in tests: a source, columns, literals, function calls."""

from __future__ import annotations

from typing import Any


def src(handle: str = "t") -> dict[str, Any]:
    return {"node": "source", "handle": handle}


def col(name: str) -> dict[str, Any]:
    return {"col": name}


def lit(value: Any) -> dict[str, Any]:
    return {"lit": value}


def fn(name: str, *args: dict[str, Any], **options: Any) -> dict[str, Any]:
    return {"fn": name, "args": list(args), **options}


def assign(expr: dict[str, Any], name: str = "out", handle: str = "t") -> dict[str, Any]:
    return {"node": "assign", "input": src(handle), "columns": [[name, expr]]}
