"""The in-kernel audit log: every request, release, refusal and export, hash-chained and signed by the kernel.

The data owner's broker logs which kernels received keys; this log says what a kernel *did* with them. It is signed
with the kernel's Ed25519 key, the one bound into the attestation evidence, so whoever trusts the evidence can
check that the log came from that kernel and was not edited by the host that stores it or the analyst who reads it.
The design mirrors the broker's log (``confnb.broker.audit``)::

    entry_hash = SHA-256(canonical JSON of {seq, time, event, fields, prev_hash})
    signature  = Ed25519(kernel key, the 32 bytes of entry_hash)

with ``prev_hash`` the previous entry's ``entry_hash`` (64 zeros for seq 1) and canonical JSON being UTF-8 with
sorted keys and no whitespace. :func:`verify_kernel_log` finds edited, deleted, inserted, reordered and re-signed
entries and names the seq of each. Like any hash chain, it cannot show that the newest entries were dropped unless
the verifier knows a later head (``expected_head``): the vault hands out its head with every audit reply.

Entries never contain data values. Callers record operation digests, dataset ids, decisions, rule names and
result digests; to make an accidental leak less likely, floating-point values (which are almost always results)
are refused and an entry is capped at :data:`MAX_ENTRY_BYTES`.

The log lives in memory and, when given a path, is also appended to a JSONL file (one canonical entry a line,
fsynced before :meth:`KernelAuditLog.append` returns). A write that fails leaves the log unusable: a decision that
could not be recorded must not be acted on, and a half-written line must not be followed by more entries.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import hmac
import json
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = [
    "GENESIS_HASH",
    "AuditRecord",
    "KernelAuditError",
    "KernelAuditLog",
    "KernelLogVerification",
    "compute_entry_hash",
    "describe_plan",
    "parse_jsonl",
    "verify_kernel_log",
]

GENESIS_HASH: Final = "0" * 64
MAX_ENTRY_BYTES: Final = 64 * 1024
MAX_REPORTED_PROBLEMS: Final = 1000
ENTRY_FIELDS: Final = ("seq", "time", "event", "fields", "prev_hash", "entry_hash", "signature")
_EVENT = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})")


class KernelAuditError(RuntimeError):
    """The audit log cannot record an entry (bad content, unwritable file, or an earlier write failed)."""


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def compute_entry_hash(seq: int, time: str, event: str, fields: Mapping[str, Any], prev_hash: str) -> str:
    """Hex SHA-256 of the canonical JSON of an entry's content and its link to the previous entry."""
    content = {"seq": seq, "time": time, "event": event, "fields": fields, "prev_hash": prev_hash}
    return hashlib.sha256(_canonical(content)).hexdigest()


def _check_value(path: str, value: object) -> None:
    """JSON without floats: strings, integers, booleans, null, lists and objects of those."""
    if value is None or isinstance(value, str | bool | int):
        return
    if isinstance(value, float):
        raise ValueError(f"audit field {path} is a float: entries record digests, ids, counts and decisions only")
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_value(f"{path}[{index}]", item)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"audit field {path} has a non-string key")
            _check_value(f"{path}.{key}", item)
        return
    raise ValueError(f"audit field {path} is a {type(value).__name__}, not a JSON value")


@dataclass(frozen=True)
class AuditRecord:
    """One entry as recorded. ``fields`` is the parsed canonical JSON object (treat it as read-only)."""

    seq: int
    time: str
    event: str
    fields: dict[str, Any] = field(hash=False)
    prev_hash: str
    entry_hash: str
    signature: bytes

    def to_dict(self) -> dict[str, Any]:
        """The entry as JSON-ready values (signature in base64): the form of the JSONL file and audit replies."""
        return {
            "seq": self.seq,
            "time": self.time,
            "event": self.event,
            "fields": copy.deepcopy(self.fields),
            "prev_hash": self.prev_hash,
            "entry_hash": self.entry_hash,
            "signature": base64.b64encode(self.signature).decode("ascii"),
        }


class KernelAuditLog:
    """The kernel's audit log; safe to share between threads.

    ``path``, when given, is a new or empty file that receives every entry as a JSONL line (mode 0600). A file that
    already holds entries is refused: each kernel has its own signing key, so one file never mixes two chains.
    """

    def __init__(self, signing_key: Ed25519PrivateKey, path: Path | None = None) -> None:
        if not isinstance(signing_key, Ed25519PrivateKey):
            raise TypeError(f"signing_key must be an Ed25519PrivateKey, got {type(signing_key).__name__}")
        self._key = signing_key
        self.signing_public_key = signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self._records: list[AuditRecord] = []
        self._lock = threading.Lock()
        self._broken: str | None = None
        self.path = Path(path) if path is not None else None
        self._fd: int | None = None
        if self.path is not None:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise KernelAuditError(f"{self.path}: cannot open the audit log ({exc.strerror})") from None
            if os.fstat(fd).st_size:
                os.close(fd)
                raise KernelAuditError(f"{self.path}: already holds entries; a kernel's audit log starts empty")
            self._fd = fd

    def close(self) -> None:
        """Close the file (idempotent); the in-memory entries stay readable, appending is refused."""
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)
            if self.path is not None and self._broken is None:
                self._broken = "the log was closed"

    def append(self, event: str, **fields: Any) -> AuditRecord:
        """Record one event (durably, when the log has a file) and return it.

        Raises ``ValueError`` for content that cannot be recorded (an event name that is not a lowercase
        identifier, a float or non-JSON value, an oversized entry) and :class:`KernelAuditError` when the entry
        could not be written. Either way nothing was recorded and the caller must not go ahead with what it was
        about to log.
        """
        if not isinstance(event, str) or not _EVENT.fullmatch(event):
            raise ValueError("audit event must be a lowercase identifier of 1 to 64 characters")
        for name, value in fields.items():
            if not _FIELD_NAME.fullmatch(name):
                raise ValueError("audit field names are identifiers of at most 64 characters")
            _check_value(name, value)
        try:
            normalized: dict[str, Any] = json.loads(_canonical(fields))
        except (TypeError, ValueError, RecursionError) as exc:
            raise ValueError(f"audit fields cannot be stored as canonical JSON ({type(exc).__name__})") from None
        with self._lock:
            if self._broken is not None:
                raise KernelAuditError(f"the audit log no longer accepts entries: {self._broken}")
            seq = len(self._records) + 1
            prev_hash = self._records[-1].entry_hash if self._records else GENESIS_HASH
            stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            entry_hash = compute_entry_hash(seq, stamp, event, normalized, prev_hash)
            signature = self._key.sign(bytes.fromhex(entry_hash))
            record = AuditRecord(seq, stamp, event, normalized, prev_hash, entry_hash, signature)
            line = _canonical(record.to_dict()) + b"\n"
            if len(line) > MAX_ENTRY_BYTES:
                raise ValueError(f"audit entry is larger than {MAX_ENTRY_BYTES} bytes")
            if self._fd is not None:
                self._write(line)
            self._records.append(record)
            return record

    def _write(self, line: bytes) -> None:
        assert self._fd is not None
        try:
            view = memoryview(line)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
        except OSError as exc:
            self._broken = f"writing {self.path} failed ({exc.strerror})"
            raise KernelAuditError(f"{self.path}: cannot record the audit entry ({exc.strerror})") from None

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, oldest first, as JSON-ready dicts (copies: changing them changes nothing here)."""
        with self._lock:
            return [record.to_dict() for record in self._records]

    def head(self) -> tuple[int, str]:
        """``(seq, entry_hash)`` of the newest entry (``(0, GENESIS_HASH)`` while empty), for ``expected_head``."""
        with self._lock:
            if not self._records:
                return 0, GENESIS_HASH
            last = self._records[-1]
            return last.seq, last.entry_hash


# -- plans in readable form ---------------------------------------------------------------------------------

MAX_PLAN_TEXT: Final = 4000
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_SHOWN_CHARS = 64  # of one name or string literal
_SHOWN_VALUES = 5  # of an isin list
_MAX_PLAN_DEPTH = 80
_BINARY = {
    "eq": "==",
    "ne": "!=",
    "lt": "<",
    "le": "<=",
    "gt": ">",
    "ge": ">=",
    "add": "+",
    "sub": "-",
    "mul": "*",
    "truediv": "/",
    "floordiv": "//",
    "mod": "%",
    "pow": "**",
    "and": "and",
    "or": "or",
    "xor": "xor",
}
_INPUTS = ("input", "left", "right")


def describe_plan(plan: object, sources: Mapping[str, str] | None = None) -> str:
    """A plan as one line a data owner can read: ``admissions | filter(age > 60) | group_by(sex) | agg(...)``.

    Digests prove which plan ran; this says what it asked. ``sources`` names a source handle by its dataset.
    Total on any JSON (a refused request's plan may be malformed) and bounded to :data:`MAX_PLAN_TEXT`
    characters. Every name and string the analyst chose is shown bare only when it is a plain ASCII identifier,
    else JSON-quoted with every non-ASCII and control character escaped, so that no name can end the line, fake
    another step or reorder the text on screen (bidirectional controls).
    """
    text = _PlanText(sources or {}).node(plan, 0)
    if len(text) <= MAX_PLAN_TEXT:
        return text
    return f"{text[:MAX_PLAN_TEXT]}... ({len(text) - MAX_PLAN_TEXT} more characters)"


class _PlanText:
    def __init__(self, sources: Mapping[str, str]) -> None:
        self.sources = sources

    def node(self, obj: object, depth: int) -> str:
        if depth > _MAX_PLAN_DEPTH:
            return "..."
        if not isinstance(obj, Mapping) or not isinstance(obj.get("node"), str):
            return "?"
        kind = obj["node"]
        if kind == "source":
            handle = obj.get("handle")
            return _name(self.sources.get(handle, handle) if isinstance(handle, str) else handle)
        step = self.step(kind, obj, depth)
        if kind == "join":
            return f"{self.node(obj.get('left'), depth + 1)} | {step}"
        if "input" in obj:
            return f"{self.node(obj['input'], depth + 1)} | {step}"
        return step

    def step(self, kind: str, obj: Mapping[str, Any], depth: int) -> str:
        if kind == "select":
            return f"select({_names(obj.get('columns'))})"
        if kind == "filter":
            return f"filter({self.expr(obj.get('predicate'), depth + 1)})"
        if kind == "assign":
            pairs = obj.get("columns")
            shown = [
                f"{_name(pair[0])} = {self.expr(pair[1], depth + 1)}"
                if isinstance(pair, list) and len(pair) == 2
                else "?"
                for pair in (pairs if isinstance(pairs, list) else [])
            ]
            return f"assign({', '.join(shown)})"
        if kind == "join":
            options = f"on=({_names(obj.get('on'))}), how={_name(obj.get('how', 'inner'))}"
            return f"join({self.node(obj.get('right'), depth + 1)}, {options})"
        if kind == "aggregate":
            aggs = obj.get("aggs")
            listed = ", ".join(self.agg(agg) for agg in (aggs if isinstance(aggs, list) else []))
            by = obj.get("by")
            return f"group_by({_names(by)}) | agg({listed})" if by else f"agg({listed})"
        if kind == "value_counts":
            dropna = "" if obj.get("dropna", True) is True else ", dropna=false"
            return f"value_counts({_name(obj.get('column'))}{dropna})"
        if kind == "describe":
            columns = obj.get("columns")
            return f"describe({'' if columns is None else _names(columns)})"
        if kind == "count":
            return "count()"
        rest = [f"{_name(key)}={_value(value)}" for key, value in obj.items() if key not in ("node", *_INPUTS)]
        return f"{_name(kind)}({', '.join(rest)})"

    def agg(self, obj: object) -> str:
        if not isinstance(obj, Mapping):
            return "?"
        column = obj.get("column")
        args = [] if column is None else [_name(column)]
        if "q" in obj:
            args.append(_value(obj["q"]))
        return f"{_name(obj.get('name'))} = {_name(obj.get('func'))}({', '.join(args)})"

    def expr(self, obj: object, depth: int) -> str:
        if depth > _MAX_PLAN_DEPTH:
            return "..."
        if not isinstance(obj, Mapping):
            return "?"
        if "col" in obj:
            return _name(obj["col"])
        if "lit" in obj:
            return _value(obj["lit"])
        fn = obj.get("fn")
        raw = obj.get("args")
        args = raw if isinstance(raw, list) else []
        if isinstance(fn, str) and fn in _BINARY and len(args) == 2:
            left, right = (self.operand(arg, depth + 1) for arg in args)
            return f"{left} {_BINARY[fn]} {right}"
        shown = [self.expr(arg, depth + 1) for arg in args]
        shown += [f"{_name(key)}={_value(value)}" for key, value in obj.items() if key not in ("fn", "args")]
        return f"{_name(fn)}({', '.join(shown)})"

    def operand(self, obj: object, depth: int) -> str:
        text = self.expr(obj, depth)
        binary = isinstance(obj, Mapping) and obj.get("fn") in _BINARY
        return f"({text})" if binary else text


def _name(value: object) -> str:
    if isinstance(value, str):
        if _PLAIN_NAME.fullmatch(value):
            return value
        return _quoted(value)
    return "?"


def _names(value: object) -> str:
    return ", ".join(_name(item) for item in value) if isinstance(value, list) else "?"


def _quoted(text: str) -> str:
    cut = text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."
    return json.dumps(cut, ensure_ascii=True)


def _value(value: object) -> str:
    if isinstance(value, str):
        return _quoted(value)
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        shown = [_value(item) if not isinstance(item, list | Mapping) else "..." for item in value[:_SHOWN_VALUES]]
        if len(value) > _SHOWN_VALUES:
            shown.append(f"... {len(value) - _SHOWN_VALUES} more")
        return f"[{', '.join(shown)}]"
    return "..."


# -- verification -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelLogVerification:
    """The outcome of :func:`verify_kernel_log`; ``problems`` in log order, each naming the seq (or entry)."""

    ok: bool
    problems: list[str]
    #: ``(seq, entry_hash)`` of the last well-formed entry, ``(0, GENESIS_HASH)`` for an empty log
    head: tuple[int, str] | None
    #: the seq of the first entry with a problem, None when no single entry is at fault
    first_bad_seq: int | None = None
    entries: int = 0


def parse_jsonl(data: bytes) -> list[object]:
    """The entries of an exported log, one JSON object per non-blank line.

    A line that is not JSON is kept as the string ``"<line N is not JSON>"`` so that the verifier reports it at
    its position instead of the chain silently closing over the gap.
    """
    entries: list[object] = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except (ValueError, RecursionError):
            entries.append(f"<line {number} is not JSON>")
    return entries


class _MalformedEntryError(Exception):
    pass


def _parse_entry(entry: object) -> tuple[int, str, str, dict[str, Any], str, str, bytes]:
    if not isinstance(entry, Mapping):
        raise _MalformedEntryError("is not a JSON object")
    keys = set(entry)
    if keys != set(ENTRY_FIELDS):
        missing = sorted(set(ENTRY_FIELDS) - keys)
        extra = sorted(str(key)[:40] for key in keys - set(ENTRY_FIELDS))
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unexpected {', '.join(extra)}"] if extra else []
        )
        raise _MalformedEntryError("; ".join(parts))
    seq, stamp, event, fields = entry["seq"], entry["time"], entry["event"], entry["fields"]
    prev_hash, entry_hash, signature_text = entry["prev_hash"], entry["entry_hash"], entry["signature"]
    if type(seq) is not int or seq < 1:
        raise _MalformedEntryError("seq is not a positive integer")
    if not isinstance(stamp, str) or not _RFC3339.fullmatch(stamp):
        raise _MalformedEntryError("time is not an RFC 3339 timestamp")
    try:
        datetime.fromisoformat(stamp)
    except ValueError:
        raise _MalformedEntryError("time is not a valid time") from None
    if not isinstance(event, str) or not _EVENT.fullmatch(event):
        raise _MalformedEntryError("event is not a lowercase identifier")
    if not isinstance(fields, dict):
        raise _MalformedEntryError("fields is not a JSON object")
    for name, value in (("prev_hash", prev_hash), ("entry_hash", entry_hash)):
        if not isinstance(value, str) or not _HEX64.fullmatch(value):
            raise _MalformedEntryError(f"{name} is not 64 lowercase hex digits")
    if not isinstance(signature_text, str):
        raise _MalformedEntryError("signature is not base64 text")
    try:
        signature = base64.b64decode(signature_text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise _MalformedEntryError("signature is not base64") from None
    if len(signature) != 64:
        raise _MalformedEntryError("signature is not a 64-byte Ed25519 signature")
    return seq, stamp, event, fields, prev_hash, entry_hash, signature


def verify_kernel_log(
    entries: Sequence[object],
    signing_public_key: bytes,
    expected_head: tuple[int, str] | None = None,
) -> KernelLogVerification:
    """Check a kernel audit log: entry shape, seq contiguity from 1, chain links, hashes and signatures.

    ``signing_public_key`` is the raw 32-byte Ed25519 key the caller trusts, taken from verified evidence (its
    ``signing_public_key`` claim), never from the log. ``expected_head`` is a ``(seq, entry_hash)`` seen earlier;
    without it, dropping the newest entries cannot be detected.
    """
    if not isinstance(signing_public_key, bytes) or len(signing_public_key) != 32:
        raise ValueError("signing_public_key must be the 32 raw bytes of an Ed25519 public key")
    verifier = Ed25519PublicKey.from_public_bytes(signing_public_key)
    problems: list[tuple[int | None, str]] = []
    previous_seq = 0
    previous_hash: str | None = GENESIS_HASH
    head: tuple[int, str] = (0, GENESIS_HASH)
    head_seen = expected_head is not None and expected_head[0] == 0

    if head_seen and expected_head is not None and not hmac.compare_digest(str(expected_head[1]), GENESIS_HASH):
        problems.append((None, "the expected head for seq 0 is not the genesis hash"))

    for position, entry in enumerate(entries, start=1):
        raw_seq = entry.get("seq") if isinstance(entry, Mapping) else None
        label = f"seq {raw_seq}" if type(raw_seq) is int else f"entry {position}"
        try:
            seq, stamp, event, fields, prev_hash, entry_hash, signature = _parse_entry(entry)
        except _MalformedEntryError as exc:
            problems.append((raw_seq if type(raw_seq) is int else None, f"{label}: {exc}"))
            stored = entry.get("entry_hash") if isinstance(entry, Mapping) else None
            previous_hash = stored if isinstance(stored, str) else None
            if type(raw_seq) is int:
                previous_seq = max(previous_seq, raw_seq)
            continue
        if seq <= previous_seq:
            problems.append((seq, f"{label}: out of order or duplicated (follows seq {previous_seq})"))
        elif seq != previous_seq + 1:
            missing = f"seq {previous_seq + 1}" if seq == previous_seq + 2 else f"seq {previous_seq + 1} to {seq - 1}"
            problems.append((seq, f"{label}: {missing} missing (deleted or renumbered)"))
        previous_seq = max(previous_seq, seq)
        if previous_hash is not None and not hmac.compare_digest(prev_hash, previous_hash):
            problems.append(
                (seq, f"{label}: prev_hash does not link to the previous entry (inserted, removed or reordered)")
            )
        try:
            recomputed = compute_entry_hash(seq, stamp, event, fields, prev_hash)
        except (TypeError, ValueError, RecursionError):
            recomputed = ""
        if not hmac.compare_digest(recomputed, entry_hash):
            problems.append((seq, f"{label}: entry_hash does not match the entry's content (edited?)"))
        try:
            verifier.verify(signature, bytes.fromhex(entry_hash))
        except InvalidSignature:
            problems.append((seq, f"{label}: signature does not verify with the kernel's signing key"))
        previous_hash = entry_hash
        head = (seq, entry_hash)
        if expected_head is not None and seq == expected_head[0]:
            head_seen = True
            if not hmac.compare_digest(entry_hash, str(expected_head[1])):
                problems.append((seq, f"{label}: entry_hash differs from the expected head (the log was rewritten)"))

    if expected_head is not None and not head_seen:
        last = "is empty" if head[0] == 0 else f"ends at seq {head[0]}"
        problems.append((None, f"the log {last}, but seq {expected_head[0]} was seen before (newest entries removed?)"))
    messages = [message for _, message in problems]
    if len(messages) > MAX_REPORTED_PROBLEMS:
        extra = len(messages) - MAX_REPORTED_PROBLEMS
        messages = [*messages[:MAX_REPORTED_PROBLEMS], f"... and {extra} more problems"]
    first_bad = next((seq for seq, _ in problems if seq is not None), None)
    return KernelLogVerification(not problems, messages, head, first_bad, len(entries))
