"""Validating policy tables from TOML with errors that name the file, the line and the key.

``tomllib`` reports positions only for syntax errors, yet a person fixing a policy needs the line of the *value*
that is wrong. :class:`TableReader` finds it with a forgiving scan of the text and offers the typed accessors every
policy table needs, so the attestation and output policies validate their keys the same way.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from confnb.attest.errors import PolicyError

_HEX = re.compile(r"^[0-9a-fA-F]*$")
_HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]")


def read_policy_text(path: str | Path) -> str:
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read policy: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise PolicyError(f"{path}: policy is not UTF-8 text") from None


def parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source}: not valid TOML: {exc}") from None


class TableReader:
    """Typed access to one top-level table; every failure is a PolicyError at ``source:line: table.key``."""

    def __init__(self, text: str, source: str, table: str) -> None:
        self.lines = text.splitlines()
        self.source = source
        self.table = table

    def fail(self, key: str, message: str) -> PolicyError:
        line = line_of(self.lines, self.table, key)
        where = f"{self.source}:{line}" if line else self.source
        return PolicyError(f"{where}: {self.table}.{key}: {message}" if key else f"{where}: [{self.table}]: {message}")

    def reject_unknown(self, values: dict[str, Any], known: set[str]) -> None:
        for key in values:
            if key not in known:
                raise self.fail(key, f"unknown key (known keys: {', '.join(sorted(known))})")

    def boolean(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, not {value!r}")
        return value

    def integer(self, key: str, value: Any, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(key, f"must be an integer from {low} to {high}, not {value!r}")
        return value

    def string(self, key: str, value: Any, pattern: str | None = None, what: str = "a string") -> str:
        if not isinstance(value, str) or not value or (pattern is not None and not re.fullmatch(pattern, value)):
            raise self.fail(key, f"must be {what}, not {value!r}")
        return value

    def hex_list(self, key: str, value: Any, size: int) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.fail(key, f"must be a list of {2 * size}-character hex strings")
        for item in value:
            if not isinstance(item, str) or len(item) != 2 * size or not _HEX.match(item):
                raise self.fail(key, f"{item!r} is not {2 * size} hex characters ({size} bytes)")
        return tuple(item.lower() for item in value)

    def choices(self, key: str, value: Any, allowed: tuple[str, ...], *, allow_empty: bool = False) -> tuple[str, ...]:
        if not isinstance(value, list) or (not value and not allow_empty):
            raise self.fail(key, f"must be a {'' if allow_empty else 'non-empty '}list drawn from {', '.join(allowed)}")
        for item in value:
            if item not in allowed:
                raise self.fail(key, f"{item!r} is not one of {', '.join(allowed)}")
        if len(set(value)) != len(value):
            raise self.fail(key, "lists an entry twice")
        return tuple(value)

    def strings(self, key: str, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
            raise self.fail(key, "must be a list of non-empty strings")
        return tuple(value)

    def table_of(self, key: str, value: Any, example: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table such as {example}")
        return value


def line_of(lines: list[str], table: str, dotted_key: str) -> int | None:
    """The 1-based line where ``table.dotted_key`` is set, found by a forgiving scan of the text.

    Inside ``[table]`` or one of its sub-tables, the last component of the key is looked for on the left of an
    ``=``, or as the last component of a sub-table header.
    """
    if not dotted_key:
        return next((number for number, line in enumerate(lines, 1) if _header(line) == table), None)
    leaf = dotted_key.rsplit(".", maxsplit=1)[-1]
    assignment = re.compile(rf"(^|[{{,\s.])\"?{re.escape(leaf)}\"?\s*=")
    inside = False
    for number, line in enumerate(lines, start=1):
        name = _header(line)
        if name is not None:
            inside = name == table or name.startswith(f"{table}.")
            if inside and name.split(".")[-1] == leaf:
                return number
            continue
        if inside and assignment.search(line.split("#", 1)[0]):
            return number
    return None


def _header(line: str) -> str | None:
    found = _HEADER.match(line)
    return found.group(1).replace(" ", "") if found else None
