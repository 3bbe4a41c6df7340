"""The display half of an output policy: what the relay's gate lets a notebook show, and how much of it.

The vault decides which *results* may leave; this policy decides how anything the executor says may be *presented*:
which MIME types render, how large one message or one cell's output may grow, whether tracebacks keep their
details, and whether comms (widgets) run at all. The kernel starts from a default and data owners' ``[display]``
tables can only tighten it, so the type is immutable and :meth:`DisplayPolicy.tighten` is monotone.

Runs inside the CVM: standard library only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MAX_OUTPUT_BYTES",
    "DEFAULT_MIME",
    "MAX_BYTES_LIMIT",
    "TRACEBACK_MODES",
    "DisplayPolicy",
    "DisplayPolicyError",
]

DEFAULT_MIME: frozenset[str] = frozenset(
    {
        "text/plain",
        "text/html",
        "text/markdown",
        "text/latex",
        "image/png",
        "image/jpeg",
        "image/gif",
        "image/svg+xml",
        "application/json",
        "application/vnd.jupyter.widget-view+json",
    }
)
TRACEBACK_MODES = ("full", "redacted")
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024 * 1024
MAX_BYTES_LIMIT = 10_000_000_000  # 10 GB: far above anything useful, low enough to catch a unit mistake

# RFC 6838 restricted names; compared case-insensitively and stored lowercase, as Jupyter bundles key them.
_MIME_PATTERN = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}", re.ASCII)
_KEYS = ("mime", "max_message_bytes", "max_output_bytes", "tracebacks", "comms")


class DisplayPolicyError(ValueError):
    """A ``[display]`` table the kernel cannot enforce as written; the message names the key at fault."""


def _show(value: object) -> str:
    """A short, single-line rendering of a bad value for an error message."""
    try:
        text = repr(value)
    except Exception:  # a value whose repr fails must still produce an error, not a crash
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def _key_name(key: object) -> str:
    """A key as it can appear in a one-line message: unknown keys come from the owner's file, verbatim or not."""
    return key if isinstance(key, str) and key.isprintable() and 0 < len(key) <= 60 else _show(key)


def _byte_count(key: str, value: object) -> int:
    # bool is an int subclass: `max_output_bytes = true` is a mistake, not 1 byte.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_BYTES_LIMIT:
        raise DisplayPolicyError(f"display.{key}: must be an integer from 0 to {MAX_BYTES_LIMIT}, not {_show(value)}")
    return value


def _mime_set(value: object) -> frozenset[str]:
    # A bare string is iterable too; accepting it would allow one-letter "types".
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, set, frozenset)):
        raise DisplayPolicyError(f"display.mime: must be a list of MIME types such as 'text/plain', not {_show(value)}")
    entries: Iterable[object] = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
    allowed: set[str] = set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, str) or not _MIME_PATTERN.fullmatch(entry.lower()):
            raise DisplayPolicyError(
                f"display.mime: entry {index} must be a MIME type of the form type/subtype, not {_show(entry)}"
            )
        allowed.add(entry.lower())
    return frozenset(allowed)


def _traceback_mode(value: object) -> str:
    if not isinstance(value, str) or value not in TRACEBACK_MODES:
        raise DisplayPolicyError(f"display.tracebacks: must be 'full' or 'redacted', not {_show(value)}")
    return value


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise DisplayPolicyError(f"display.comms: must be true or false, not {_show(value)}")
    return value


@dataclass(frozen=True)
class DisplayPolicy:
    """What the gate lets through; immutable so that a policy handed around can never be loosened in place.

    Every constructor path validates, because the gate trusts these fields to be exactly the documented types.
    """

    mime: frozenset[str] = field(default=DEFAULT_MIME)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    tracebacks: str = "full"
    comms: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "mime", _mime_set(self.mime))
        _byte_count("max_message_bytes", self.max_message_bytes)
        _byte_count("max_output_bytes", self.max_output_bytes)
        _traceback_mode(self.tracebacks)
        _flag(self.comms)

    @classmethod
    def from_mapping(cls, table: Mapping[str, object]) -> DisplayPolicy:
        """Read a data owner's ``[display]`` table (or :meth:`to_dict` output); absent keys keep the default."""
        if not isinstance(table, Mapping):
            raise DisplayPolicyError(f"display: must be a table, not {_show(table)}")
        for key in table:
            if key not in _KEYS:
                raise DisplayPolicyError(
                    f"display.{_key_name(key)}: unknown key (known keys: {', '.join(sorted(_KEYS))})"
                )
        values: dict[str, Any] = {}
        if "mime" in table:
            values["mime"] = _mime_set(table["mime"])
        for key in ("max_message_bytes", "max_output_bytes"):
            if key in table:
                values[key] = _byte_count(key, table[key])
        if "tracebacks" in table:
            values["tracebacks"] = _traceback_mode(table["tracebacks"])
        if "comms" in table:
            values["comms"] = _flag(table["comms"])
        return cls(**values)

    def to_dict(self) -> dict[str, object]:
        """JSON-able and stable (sorted MIME types), so clients and audit records can compare policies."""
        return {
            "mime": sorted(self.mime),
            "max_message_bytes": self.max_message_bytes,
            "max_output_bytes": self.max_output_bytes,
            "tracebacks": self.tracebacks,
            "comms": self.comms,
        }

    def tighten(self, other: DisplayPolicy) -> DisplayPolicy:
        """The strictest of both, field by field: several owners' policies combine without any of them loosening."""
        if not isinstance(other, DisplayPolicy):
            raise TypeError(f"can only tighten with a DisplayPolicy, not {type(other).__name__}")
        return DisplayPolicy(
            mime=self.mime & other.mime,
            max_message_bytes=min(self.max_message_bytes, other.max_message_bytes),
            max_output_bytes=min(self.max_output_bytes, other.max_output_bytes),
            tracebacks="redacted" if "redacted" in (self.tracebacks, other.tracebacks) else "full",
            comms=self.comms and other.comms,
        )
