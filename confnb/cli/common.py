"""What every subcommand shares: reading inputs with one-line errors, writing outputs atomically, printing."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from confnb.fileio import write_atomically

EXIT_OK = 0
EXIT_REJECTED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad arguments or an unreadable file: reported in one line with exit code 2."""


def read_bytes(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{what} {path}: is a directory") from None
    except OSError as exc:
        raise UsageError(f"{what} {path}: {exc.strerror or exc}") from None


def write_output(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """Write a command's output file all at once, or report in one line why it could not be written."""
    try:
        write_atomically(path, data, mode)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None


def print_json(document: Any) -> None:
    json.dump(document, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def use_color(stream: Any = sys.stdout) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)()) and "NO_COLOR" not in os.environ


def paint(text: str, color: str, stream: Any = sys.stdout) -> str:
    codes = {"red": "31", "green": "32", "yellow": "33", "bold": "1", "dim": "2", "inverse-yellow": "30;43"}
    return f"\033[{codes[color]}m{text}\033[0m" if use_color(stream) else text
