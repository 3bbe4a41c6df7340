"""Reading policy TOML with errors that name the file, the line and the key.

``tomllib`` reports positions only for syntax errors, yet a person fixing a policy needs the line of the *key* that
is wrong. :class:`KeyLines` finds it by scanning the text (already accepted by ``tomllib``) for where each key path
is first defined. :func:`parse_policy` is the one way in: it parses, then refuses any name the schema does not know
(:mod:`confnb.policy.schema`), and :class:`TableReader` offers the typed accessors every policy table needs.
"""

from __future__ import annotations

import contextlib
import re
import tomllib
from collections.abc import Collection
from pathlib import Path
from typing import Any

from confnb.attest.errors import PolicyError
from confnb.policy.schema import POLICY_TABLES, check_names

_HEX = re.compile(r"^[0-9a-fA-F]*$")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SCALAR_END = re.compile(r"[,\]}#\r\n]")


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
    except RecursionError:  # tomllib recurses per nested array or inline table; a few hundred levels exhaust it
        raise PolicyError(f"{source}: not valid TOML: arrays or inline tables nested too deeply") from None


def parse_policy(text: str, source: str, *, tables: Collection[str] = POLICY_TABLES) -> dict[str, Any]:
    """The document of a policy text whose every name, at every level, is known (and its table in ``tables``)."""
    document = parse_toml(text, source)
    check_names(document, source, tables=tables, locate=KeyLines(text).line)
    return document


def brief(value: Any, limit: int = 60) -> str:
    """``repr`` of a wrong value, cut short: an error quotes what was written, not all of it."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class KeyLines:
    """The 1-based line where each key path of a TOML text is first defined (a header, a key, an inline-table key).

    Built on first use, since only errors need it. The text must be one ``tomllib`` accepted: the scanner follows
    TOML's grammar only as far as finding keys needs, and stops quietly at anything it does not expect.
    """

    def __init__(self, text: str) -> None:
        self._text = text
        self._lines: dict[tuple[str, ...], int] | None = None

    def line(self, path: tuple[str, ...]) -> int | None:
        if self._lines is None:
            self._lines = _Scanner(self._text).scan()
        return self._lines.get(path)


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.line = 1
        self.found: dict[tuple[str, ...], int] = {}

    def scan(self) -> dict[tuple[str, ...], int]:
        # A position the scanner cannot place is reported without a line, never as a crash.
        with contextlib.suppress(IndexError, ValueError, RecursionError, tomllib.TOMLDecodeError):
            self._document()
        return self.found

    def _document(self) -> None:
        table: tuple[str, ...] = ()
        while True:
            self._skip(newlines=True)
            if self.pos >= len(self.text):
                return
            start = self.pos
            if self.text.startswith("[[", self.pos):
                self.pos += 2
                table = self._record(self._key())
                self._expect("]]")
            elif self.text[self.pos] == "[":
                self.pos += 1
                table = self._record(self._key())
                self._expect("]")
            else:
                path = self._record((*table, *self._key()))
                self._expect("=")
                self._value(path)
            if self.pos == start:
                return

    def _record(self, path: tuple[str, ...]) -> tuple[str, ...]:
        for end in range(1, len(path) + 1):
            self.found.setdefault(path[:end], self.line)
        return path

    def _key(self) -> tuple[str, ...]:
        parts = []
        while True:
            self._skip(newlines=False)
            parts.append(self._simple_key())
            self._skip(newlines=False)
            if self.text.startswith(".", self.pos):
                self.pos += 1
                continue
            return tuple(parts)

    def _simple_key(self) -> str:
        char = self.text[self.pos]
        if char in "\"'":
            start = self.pos
            self._string()
            raw = self.text[start : self.pos]
            return next(iter(tomllib.loads(f"{raw} = 0")))  # let tomllib decode the escapes
        bare = _BARE_KEY.match(self.text, self.pos)
        if bare is None:
            raise ValueError("not a key")
        self.pos = bare.end()
        return bare.group()

    def _value(self, path: tuple[str, ...]) -> None:
        self._skip(newlines=False)
        char = self.text[self.pos]
        if char in "\"'":
            self._string()
        elif char == "[":
            self.pos += 1
            while True:
                self._skip(newlines=True)
                if self.text[self.pos] == "]":
                    self.pos += 1
                    return
                self._value(path)
                self._skip(newlines=True)
                if self.text[self.pos] == ",":
                    self.pos += 1
        elif char == "{":
            self.pos += 1
            while True:
                self._skip(newlines=True)
                if self.text[self.pos] == "}":
                    self.pos += 1
                    return
                key = self._record((*path, *self._key()))
                self._expect("=")
                self._value(key)
                self._skip(newlines=True)
                if self.text[self.pos] == ",":
                    self.pos += 1
        else:
            end = _SCALAR_END.search(self.text, self.pos)
            self.pos = end.start() if end else len(self.text)

    def _string(self) -> None:
        quote = self.text[self.pos]
        if self.text.startswith(quote * 3, self.pos):
            self.pos += 3
            while not self.text.startswith(quote * 3, self.pos):
                self._advance(escapes=quote == '"')
            self.pos += 3
            while self.text.startswith(quote, self.pos):  # up to two quotes may end the content
                self.pos += 1
            return
        self.pos += 1
        while self.text[self.pos] != quote:
            self._advance(escapes=quote == '"')
        self.pos += 1

    def _advance(self, *, escapes: bool) -> None:
        step = 2 if escapes and self.text[self.pos] == "\\" else 1
        self.line += self.text.count("\n", self.pos, self.pos + step)
        self.pos += step
        if self.pos > len(self.text):
            raise IndexError("unterminated string")

    def _skip(self, *, newlines: bool) -> None:
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char in " \t" or (newlines and char == "\r"):
                self.pos += 1
            elif char == "#":
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            elif newlines and char == "\n":
                self.line += 1
                self.pos += 1
            else:
                return

    def _expect(self, token: str) -> None:
        self._skip(newlines=False)
        if not self.text.startswith(token, self.pos):
            raise ValueError(f"expected {token!r}")
        self.pos += len(token)


class TableReader:
    """Typed access to one top-level table; every failure is a PolicyError at ``source:line: table.key``."""

    def __init__(self, lines: KeyLines, source: str, table: str) -> None:
        self.lines = lines
        self.source = source
        self.table = table

    def fail(self, key: str, message: str) -> PolicyError:
        """``key`` is dotted below the table (``min_tcb.Turin.snp``); the names were checked, so none holds a dot."""
        line = self.lines.line((self.table, *key.split(".")) if key else (self.table,))
        where = f"{self.source}:{line}" if line else self.source
        return PolicyError(f"{where}: {self.table}.{key}: {message}" if key else f"{where}: [{self.table}]: {message}")

    def boolean(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, not {brief(value)}")
        return value

    def integer(self, key: str, value: Any, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(key, f"must be an integer from {low} to {high}, not {brief(value)}")
        return value

    def string(self, key: str, value: Any, pattern: str | None = None, what: str = "a string") -> str:
        if not isinstance(value, str) or not value or (pattern is not None and not re.fullmatch(pattern, value)):
            raise self.fail(key, f"must be {what}, not {brief(value)}")
        return value

    def hex_list(self, key: str, value: Any, size: int) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.fail(key, f"must be a list of {2 * size}-character hex strings")
        for item in value:
            if not isinstance(item, str) or len(item) != 2 * size or not _HEX.match(item):
                raise self.fail(key, f"{brief(item)} is not {2 * size} hex characters ({size} bytes)")
        return tuple(item.lower() for item in value)

    def choices(self, key: str, value: Any, allowed: tuple[str, ...], *, allow_empty: bool = False) -> tuple[str, ...]:
        if not isinstance(value, list) or (not value and not allow_empty):
            raise self.fail(key, f"must be a {'' if allow_empty else 'non-empty '}list drawn from {', '.join(allowed)}")
        for item in value:
            if item not in allowed:
                raise self.fail(key, f"{brief(item)} is not one of {', '.join(allowed)}")
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
