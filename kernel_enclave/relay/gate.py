"""The relay's message gate: the last check on everything the executor says before the client's key signs it.

The executor runs the analyst's code, so anything it sends may be forged: unknown types, wrong channels, fields of
the wrong type, huge payloads, tracebacks in places the protocol never puts them. The gate therefore works from
allowlists (message types per channel, MIME types per policy) and fails closed: a message it cannot vouch for is
withheld, never passed on and never allowed to raise into the relay. What the client loses is replaced by a short
notice that names the rule but carries nothing of the withheld content, and a withheld reply still becomes an error
reply, so a client never waits forever for an answer.

The gate is on the path of every message, so an approved message that needs no change is returned as the very same
object (the relay then forwards its original, byte-exact frames), and a rewrite copies only the parts it changes.

Runs inside the CVM: standard library only.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import date
from types import MappingProxyType
from typing import Any

from kernel_enclave.relay.display import DisplayPolicy

__all__ = [
    "ALLOWED_TYPES",
    "ATTESTATION_FEATURE",
    "REMEMBERED_REQUESTS",
    "RULES",
    "HeaderFactory",
    "Message",
    "MessageGate",
]

Message = dict[str, Any]
HeaderFactory = Callable[[str], dict[str, Any]]

RULE_MIME = "display.mime"
RULE_MESSAGE_BYTES = "display.max_message_bytes"
RULE_OUTPUT_BYTES = "display.max_output_bytes"
RULE_TRACEBACKS = "display.tracebacks"
RULE_DEBUGGER = "debugger"
RULE_COMMS = "comms"
RULE_MESSAGE_TYPE = "message_type"
RULE_MALFORMED = "malformed"
RULE_EXECUTE_INPUT = "execute_input"
RULES = (
    RULE_MIME,
    RULE_MESSAGE_BYTES,
    RULE_OUTPUT_BYTES,
    RULE_TRACEBACKS,
    RULE_DEBUGGER,
    RULE_COMMS,
    RULE_MESSAGE_TYPE,
    RULE_MALFORMED,
    RULE_EXECUTE_INPUT,
)

_COMM_TYPES = frozenset({"comm_open", "comm_msg", "comm_close"})
_DISPLAY_TYPES = frozenset({"display_data", "update_display_data", "execute_result"})
IOPUB_TYPES = frozenset(
    {"status", "execute_input", "stream", "clear_output", "error", "shutdown_reply"} | _DISPLAY_TYPES | _COMM_TYPES
)
REPLY_TYPES = frozenset(
    {
        "execute_reply",
        "kernel_info_reply",
        "complete_reply",
        "inspect_reply",
        "history_reply",
        "is_complete_reply",
        "comm_info_reply",
        "interrupt_reply",
        "shutdown_reply",
        "usage_reply",
        "create_subshell_reply",
        "list_subshell_reply",
        "delete_subshell_reply",
        "debug_reply",
    }
)
STDIN_TYPES = frozenset({"input_request"})
ALLOWED_TYPES: Mapping[str, frozenset[str]] = MappingProxyType(
    {"iopub": IOPUB_TYPES, "shell": REPLY_TYPES, "control": REPLY_TYPES, "stdin": STDIN_TYPES}
)
# Output that belongs to a cell and is paid for from that cell's byte budget.
_OUTPUT_TYPES = frozenset({"stream", "error", "input_request"} | _DISPLAY_TYPES | _COMM_TYPES)
_OUTPUT_CHANNELS = frozenset({"iopub", "stdin"})

ATTESTATION_FEATURE = "confnb-attestation"
REMEMBERED_REQUESTS = 1024
_DEBUGGER_DISABLED = {
    "status": "error",
    "ename": "DebuggerDisabled",
    "evalue": "the debugger is disabled in confidential kernels",
    "traceback": [],
}

# Headers are flat maps of short scalars (msg_id, session, date, ...). Anything else is a place to smuggle data
# past the size caps, since the caps measure content.
_MAX_HEADER_ITEMS = 32
_MAX_HEADER_KEY = 64
_MAX_HEADER_TEXT = 1024

_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
_CELL_LINE = re.compile(r"Cell In\[[0-9]{1,12}\], line ([0-9]{1,9})(?![0-9])")
_ENAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,127}")
#: A vault refusal ends its message with the rule and the datasets that imposed it
#: (``kernel_enclave.vault.protocol.PolicyViolation``). DESIGN.md promises the analyst a message naming the rule,
#: so redaction keeps that part, rebuilt from a fixed vocabulary: one of these rules and up to eight dataset ids.
_REFUSAL_NAME = "PolicyViolation"
_REFUSAL_RULES = frozenset(
    {
        "release.allow",
        "release.min_group_size",
        "release.never_release",
        "release.max_rows",
        "release.max_releases",
        "release.difference",
        "release.order_statistics",
        "privacy.mode",
        "privacy.budget",
    }
)
_REFUSAL = re.compile(r"(?:\A|.* )\[rule ([a-z_.]{1,64}) of ([^\]\n]{1,1200})\]\Z", re.DOTALL)
_DATASET_NAME = re.compile(r"'[A-Za-z0-9][A-Za-z0-9._-]{0,127}'")
_MAX_REFUSAL_DATASETS = 8
_IMPLIED_REPLY = re.compile(r"[a-z][a-z0-9_]{0,62}_reply")
_MAX_TRACEBACK_SCAN = 64 * 1024  # per traceback entry: the cell line is near the start of a frame
_STATES = frozenset({"busy", "idle", "starting"})
_STREAMS = frozenset({"stdout", "stderr"})
_IS_COMPLETE = frozenset({"complete", "incomplete", "invalid", "unknown"})
_EXECUTE_STATUSES = frozenset({"ok", "error", "aborted"})
_PARTLY_SHOWN = "some of its MIME types are not allowed"


class _WithheldError(Exception):
    """Raised inside the gate's checks: the whole message is withheld under ``rule``."""

    def __init__(self, rule: str) -> None:
        super().__init__(rule)
        self.rule = rule


class _Changes:
    """Policy rules one message was rewritten under: counted only if the message is in the end let through."""

    __slots__ = ("applied", "notify")

    def __init__(self) -> None:
        self.applied: list[str] = []
        self.notify: dict[str, str] = {}  # rule -> reason, for rewrites the analyst would otherwise not notice

    def add(self, rule: str, notify: str | None = None) -> None:
        if rule not in self.applied:
            self.applied.append(rule)
        if notify is not None:
            self.notify.setdefault(rule, notify)


class _Cell:
    """What the gate knows about one execute_request: its code, its output so far, the notices already sent."""

    __slots__ = ("code", "noticed", "used")

    def __init__(self, code: str) -> None:
        self.code = code
        self.used = 0
        self.noticed: set[str] = set()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _require(condition: bool) -> None:
    if not condition:
        raise _WithheldError(RULE_MALFORMED)


def _encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _flat(header: dict[Any, Any]) -> bool:
    if len(header) > _MAX_HEADER_ITEMS:
        return False
    for key, value in header.items():
        if not isinstance(key, str) or len(key) > _MAX_HEADER_KEY or not _encodable(key):
            return False
        if isinstance(value, str):
            if len(value) > _MAX_HEADER_TEXT or not _encodable(value):
                return False
        # Session.deserialize turns header dates into datetimes; floats are left out (NaN is not JSON).
        elif not (value is None or isinstance(value, (int, date))):
            return False
    return True


_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=str)
_NOT_SPECIAL = bytes(range(0x20, 0x100)).replace(b'"', b"").replace(b"\\", b"")
_SHORT_ESCAPES = b'"\\\b\f\n\r\t'  # escaped as two characters; other control characters take six
_LONG_TEXT = 1024
_WALK_DEPTH = 4
_WALK_ITEMS = 256


def _encoded_size(value: object) -> int:
    text = _ENCODER.encode(value)
    # Strict UTF-8: a lone surrogate is not text, and the relay could not encode it for the client either.
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _text_size(text: str) -> int:
    """The JSON size of a string; long ones are counted in bytes, several times faster than encoding them."""
    if len(text) < _LONG_TEXT:
        return _encoded_size(text)
    raw = text.encode("utf-8")
    specials = raw.translate(None, _NOT_SPECIAL)
    extra = len(specials)
    if extra:
        extra += 4 * (extra - sum(specials.count(byte) for byte in _SHORT_ESCAPES))
    return len(raw) + 2 + extra


def _json_size(value: object, depth: int = 0) -> int:
    """UTF-8 size of the compact JSON the client will receive; NaN and other non-JSON raise (and so withhold).

    Big payloads are long strings (base64 images, text) in shallow containers, so those few levels are walked
    here and long strings measured without encoding them; everything else is left to the C encoder.
    """
    if isinstance(value, str):
        return _text_size(value)
    if depth < _WALK_DEPTH:
        if isinstance(value, dict) and len(value) <= _WALK_ITEMS:
            total = 1 + 2 * len(value) if value else 2  # braces, colons, commas
            for key, item in value.items():
                if not isinstance(key, str):
                    return _encoded_size(value)
                total += _text_size(key) + _json_size(item, depth + 1)
            return total
        if isinstance(value, list) and len(value) <= _WALK_ITEMS:
            total = 1 + len(value) if value else 2  # brackets, commas
            for item in value:
                total += _json_size(item, depth + 1)
            return total
    return _encoded_size(value)


def _buffer_bytes(buffers: list[Any]) -> int:
    total = 0
    for buffer in buffers:
        if isinstance(buffer, (bytes, bytearray)):
            total += len(buffer)
        elif isinstance(buffer, memoryview):
            total += buffer.nbytes
        else:
            raise _WithheldError(RULE_MALFORMED)
    return total


def _refusal(ename: object, evalue: object) -> str | None:
    """``[rule R of 'a', 'b']`` when this error is a vault refusal naming a known rule and well-formed datasets.

    Only these words survive: an executor can raise a PolicyViolation of its own, so the rest of its message
    is treated like any other exception's.
    """
    if ename != _REFUSAL_NAME or not isinstance(evalue, str):
        return None
    found = _REFUSAL.fullmatch(evalue[-2048:])
    if found is None or found.group(1) not in _REFUSAL_RULES:
        return None
    named = found.group(2)
    if named != "no dataset":
        names = named.split(", ")
        if len(names) > _MAX_REFUSAL_DATASETS or not all(_DATASET_NAME.fullmatch(name) for name in names):
            return None
    return f"[rule {found.group(1)} of {named}]"


def _redacted_traceback(ename: object, traceback: object, refusal: str | None = None) -> tuple[str, list[str]]:
    """Exception type and cell line only: enough to find the bug, nothing of the values involved (and, for a vault
    refusal, the rule that refused)."""
    name = ename if isinstance(ename, str) and _ENAME.fullmatch(ename) else "Exception"
    line = None
    if isinstance(traceback, list):
        for entry in traceback:
            if isinstance(entry, str):
                found = _CELL_LINE.search(_ANSI.sub("", entry[:_MAX_TRACEBACK_SCAN]))
                if found:
                    line = found.group(1)
                    break
    where = name if line is None else f"{name} at line {line} of the cell"
    if refusal is not None:
        where += f": withheld by the data owner's output policy {refusal}"
    return name, [f"{where} (details withheld by the display policy)"]


class MessageGate:
    """Decides, message by message, what of the executor's output the client may receive.

    It is stateful only where the protocol forces it: the code of recent execute_requests (so a forged
    execute_input cannot show the analyst code they never ran), each cell's output budget, and which notices
    were already sent (so a loop that keeps hitting a rule does not flood the client).
    """

    def __init__(self, policy: DisplayPolicy, new_header: HeaderFactory) -> None:
        if not isinstance(policy, DisplayPolicy):
            raise TypeError(f"policy must be a DisplayPolicy, not {type(policy).__name__}")
        self._policy = policy
        self._new_header = new_header
        self._withheld: dict[str, int] = {}
        self._cells: OrderedDict[str, _Cell] = OrderedDict()
        self._noticed: OrderedDict[str, set[str]] = OrderedDict()  # parents that are not cells
        self._handlers: dict[str, Callable[[dict[str, Any], str | None, _Changes], dict[str, Any]]] = {
            "status": self._status,
            "execute_input": self._execute_input,
            "stream": self._stream,
            "display_data": self._display,
            "update_display_data": self._update_display,
            "execute_result": self._execute_result,
            "clear_output": self._clear_output,
            "error": self._error,
            "comm_open": self._comm,
            "comm_msg": self._comm,
            "comm_close": self._comm,
            "input_request": self._input_request,
            "execute_reply": self._execute_reply,
            "kernel_info_reply": self._kernel_info_reply,
            "complete_reply": self._complete_reply,
            "inspect_reply": self._inspect_reply,
            "history_reply": self._history_reply,
            "is_complete_reply": self._is_complete_reply,
            "comm_info_reply": self._comm_info_reply,
            "debug_reply": self._debug_reply,
            "shutdown_reply": self._plain_reply,
            "interrupt_reply": self._plain_reply,
            "usage_reply": self._plain_reply,
            "create_subshell_reply": self._plain_reply,
            "list_subshell_reply": self._plain_reply,
            "delete_subshell_reply": self._plain_reply,
        }

    # -- state -----------------------------------------------------------------------------------------------------

    @property
    def policy(self) -> DisplayPolicy:
        return self._policy

    def tighten(self, policy: DisplayPolicy) -> None:
        """Combine with another owner's policy; there is deliberately no way to loosen a running gate."""
        self._policy = self._policy.tighten(policy)

    @property
    def withheld(self) -> Mapping[str, int]:
        """How many messages each rule withheld or rewrote: a copy, so callers cannot reset the record."""
        return dict(self._withheld)

    def observe_request(self, channel: str, msg: Message) -> None:
        """Remember what the client asked to run; the executor's echo of it is never trusted."""
        try:
            header = msg.get("header")
            if not isinstance(header, dict) or header.get("msg_type") != "execute_request":
                return
            msg_id = header.get("msg_id")
            if not isinstance(msg_id, str):
                return
            content = msg.get("content")
            code = content.get("code") if isinstance(content, dict) else None
            self._cells.pop(msg_id, None)
            self._cells[msg_id] = _Cell(code if isinstance(code, str) else "")
            while len(self._cells) > REMEMBERED_REQUESTS:
                self._cells.popitem(last=False)
        except Exception:  # the client's messages are the relay's business; the gate only learns from them
            return

    # -- filtering -------------------------------------------------------------------------------------------------

    def filter(self, channel: str, msg: Message) -> list[Message]:
        """The messages to send the client in place of ``msg``, in order; never raises."""
        try:
            return self._filter(channel, msg)
        except _WithheldError as withheld:
            rule = withheld.rule
        except Exception:  # includes RecursionError from absurdly nested JSON: fail closed, whatever it was
            rule = RULE_MALFORMED
        self._count(rule)
        try:
            return self._withhold(channel, msg, rule)
        except Exception:
            return []

    def _filter(self, channel: str, msg: Message) -> list[Message]:
        allowed_types = ALLOWED_TYPES.get(channel) if isinstance(channel, str) else None
        if allowed_types is None:
            raise _WithheldError(RULE_MESSAGE_TYPE)
        if not isinstance(msg, dict):
            raise _WithheldError(RULE_MALFORMED)
        header = msg.get("header")
        parent = msg.get("parent_header")
        metadata = msg.get("metadata")
        content = msg.get("content")
        buffers = msg.get("buffers")
        if (
            not isinstance(header, dict)
            or not isinstance(parent, dict)
            or not isinstance(metadata, dict)
            or not isinstance(content, dict)
            or not isinstance(buffers, list)
        ):
            raise _WithheldError(RULE_MALFORMED)
        msg_type = header.get("msg_type")
        if not isinstance(msg_type, str) or not _flat(header) or not _flat(parent):
            raise _WithheldError(RULE_MALFORMED)
        for key in ("msg_type", "msg_id"):
            _require(key not in msg or msg[key] == header.get(key))
        if msg_type == "iopub_welcome" and channel == "iopub":
            return []  # the relay greets subscribers itself
        if msg_type not in allowed_types:
            raise _WithheldError(RULE_DEBUGGER if msg_type == "debug_event" else RULE_MESSAGE_TYPE)
        if msg_type in _COMM_TYPES:
            if not self._policy.comms:
                raise _WithheldError(RULE_COMMS)
        else:
            _require(not buffers)  # only comms carry binary buffers; elsewhere they are a side door
        parent_id = parent.get("msg_id")
        if not isinstance(parent_id, str):
            parent_id = None

        changes = _Changes()
        handler = self._handlers.get(msg_type)
        if handler is None:
            raise _WithheldError(RULE_MALFORMED)  # an allowed type nobody taught the gate to check: fail closed
        approved = handler(content, parent_id, changes)

        size = _json_size(approved) + _buffer_bytes(buffers)
        if metadata:
            size += _json_size(metadata)
        if size > self._policy.max_message_bytes:
            raise _WithheldError(RULE_MESSAGE_BYTES)
        cell = None
        if msg_type in _OUTPUT_TYPES and channel in _OUTPUT_CHANNELS and parent_id is not None:
            cell = self._cells.get(parent_id)
            if cell is not None and cell.used + size > self._policy.max_output_bytes:
                raise _WithheldError(RULE_OUTPUT_BYTES)

        if approved is content:
            out = msg
        else:
            out = {
                "header": dict(header),
                "parent_header": dict(parent),
                "metadata": dict(metadata),
                "content": approved,
                "buffers": list(buffers),
            }
            for key in ("msg_id", "msg_type"):
                if key in msg:
                    out[key] = msg[key]
        notices = [
            self._notice(parent, rule, reason=reason)
            for rule, reason in changes.notify.items()
            if self._first_notice(parent_id, rule)
        ]
        if cell is not None:
            cell.used += size
        for rule in changes.applied:
            self._count(rule)
        return [*notices, out]

    # -- withholding -----------------------------------------------------------------------------------------------

    def _count(self, rule: str) -> None:
        self._withheld[rule] = self._withheld.get(rule, 0) + 1

    def _reason(self, rule: str, channel: str) -> str:
        # Fixed texts and the policy's own numbers only: a notice must carry nothing the executor chose.
        if rule == RULE_MIME:
            return "none of its MIME types is allowed"
        if rule == RULE_MESSAGE_BYTES:
            return f"larger than the {self._policy.max_message_bytes}-byte limit for one message"
        if rule == RULE_OUTPUT_BYTES:
            return f"the cell's output would exceed its {self._policy.max_output_bytes}-byte limit"
        if rule == RULE_DEBUGGER:
            return "the debugger is disabled in confidential kernels"
        if rule == RULE_COMMS:
            return "comms are disabled"
        if rule == RULE_EXECUTE_INPUT:
            return "it does not belong to a request this kernel received"
        if rule == RULE_MESSAGE_TYPE:
            return f"this kind of message is not allowed on the {channel} channel"
        return "not a well-formed Jupyter message"

    def _notice(self, parent: dict[str, Any], rule: str, channel: str = "iopub", reason: str | None = None) -> Message:
        text = reason or self._reason(rule, channel)
        return {
            "header": self._new_header("stream"),
            "parent_header": dict(parent),
            "metadata": {},
            "content": {"name": "stderr", "text": f"[confnb] output withheld by the display policy ({rule}): {text}\n"},
            "buffers": [],
        }

    def _first_notice(self, parent_id: str | None, rule: str) -> bool:
        key = parent_id or ""
        cell = self._cells.get(key)
        if cell is not None:
            seen = cell.noticed
        else:
            seen = self._noticed.setdefault(key, set())
            self._noticed.move_to_end(key)
            while len(self._noticed) > REMEMBERED_REQUESTS:
                self._noticed.popitem(last=False)
        if rule in seen:
            return False
        seen.add(rule)
        return True

    def _withhold(self, channel: str, msg: object, rule: str) -> list[Message]:
        """What the client gets instead of a withheld message, built only from parts known to be harmless."""
        if not isinstance(channel, str) or channel not in ALLOWED_TYPES or not isinstance(msg, dict):
            return []
        header = msg.get("header")
        parent = msg.get("parent_header")
        parent = parent if isinstance(parent, dict) and _flat(parent) else {}
        msg_type = header.get("msg_type") if isinstance(header, dict) else None
        parent_id = parent.get("msg_id") if isinstance(parent.get("msg_id"), str) else None
        reason = self._reason(rule, channel)
        if channel in ("shell", "control") and isinstance(msg_type, str):
            reply_type = msg_type if msg_type in REPLY_TYPES else self._implied_reply(msg_type, parent)
            if reply_type is not None:
                content: dict[str, Any] = {
                    "status": "error",
                    "ename": "OutputWithheld",
                    "evalue": f"withheld by the display policy ({rule}): {reason}",
                    "traceback": [],
                }
                original = msg.get("content")
                if reply_type == "execute_reply" and isinstance(original, dict):
                    count = original.get("execution_count")
                    if isinstance(count, int) and not isinstance(count, bool) and 0 <= count < 2**53:
                        content["execution_count"] = count
                return [
                    {
                        "header": self._new_header(reply_type),
                        "parent_header": dict(parent),
                        "metadata": {},
                        "content": content,
                        "buffers": [],
                    }
                ]
        notices = [self._notice(parent, rule, channel)] if self._first_notice(parent_id, rule) else []
        if channel == "stdin" and msg_type == "input_request":
            # The executor is blocked on this prompt: the analyst must still be able to answer it. ipykernel does
            # not match the answer to this header, so a fresh one keeps the withheld message's own out of it.
            original = msg.get("content")
            password = original.get("password") if isinstance(original, dict) else None
            request: Message = {
                "header": self._new_header("input_request"),
                "parent_header": dict(parent),
                "metadata": {},
                "content": {"prompt": "", "password": password if isinstance(password, bool) else False},
                "buffers": [],
            }
            return [*notices, request]
        return notices

    @staticmethod
    def _implied_reply(msg_type: str, parent: dict[str, Any]) -> str | None:
        """A reply type outside the allowlist still answers its request, with an error, if its parent asked for it."""
        if msg_type.startswith("confnb_"):
            return None  # the relay answers confnb's own requests; the executor may not even fail them
        if _IMPLIED_REPLY.fullmatch(msg_type) and parent.get("msg_type") == msg_type[: -len("_reply")] + "_request":
            return msg_type
        return None

    # -- MIME bundles ----------------------------------------------------------------------------------------------

    def _bundle(self, data: object) -> dict[str, Any]:
        """``data`` itself when every key is allowed, else a new dict of the allowed keys (possibly empty)."""
        _require(isinstance(data, dict))
        assert isinstance(data, dict)
        mime = self._policy.mime
        dropped = False
        for key, value in data.items():
            if key in mime:
                # Only JSON types carry structured values; every other type is a string on the wire.
                _require(isinstance(value, str) or key.endswith("json"))
            else:
                dropped = True
        if not dropped:
            return data
        return {key: value for key, value in data.items() if key in mime}

    def _bundle_metadata(self, metadata: object) -> dict[str, Any]:
        _require(isinstance(metadata, dict))
        assert isinstance(metadata, dict)
        mime = self._policy.mime
        if all(key in mime for key in metadata):
            return metadata
        return {key: value for key, value in metadata.items() if key in mime}

    def _with_bundle(self, content: dict[str, Any], changes: _Changes) -> dict[str, Any]:
        """``content`` with its data and metadata filtered; replies keep an emptied bundle rather than vanish."""
        data = self._bundle(content.get("data"))
        metadata = content.get("metadata", {})
        kept_metadata = self._bundle_metadata(metadata)
        if data is content.get("data") and kept_metadata is metadata:
            return content
        # Dropped data is worth a notice (the analyst sees less than the code made); dropped metadata is not.
        changes.add(RULE_MIME, _PARTLY_SHOWN if data is not content.get("data") else None)
        rewritten = dict(content)
        rewritten["data"] = data
        if "metadata" in content:
            rewritten["metadata"] = kept_metadata
        return rewritten

    # -- errors ----------------------------------------------------------------------------------------------------

    def _error_fields(self, content: dict[str, Any]) -> dict[str, Any] | None:
        """The redacted ename/evalue/traceback for an error, or None when the policy keeps full tracebacks."""
        _require(
            isinstance(content.get("ename", ""), str)
            and isinstance(content.get("evalue", ""), str)
            and _is_str_list(content.get("traceback", []))
        )
        if self._policy.tracebacks != "redacted":
            return None
        refusal = _refusal(content.get("ename"), content.get("evalue"))
        ename, traceback = _redacted_traceback(content.get("ename"), content.get("traceback"), refusal)
        return {"ename": ename, "evalue": refusal or "", "traceback": traceback}

    # -- handlers: each returns the content to send (``content`` itself when unchanged) or raises _WithheldError -----

    def _status(self, content: dict[str, Any], parent_id: str | None, changes: _Changes) -> dict[str, Any]:
        _require(content.get("execution_state") in _STATES)
        return content

    def _execute_input(self, content: dict[str, Any], parent_id: str | None, changes: _Changes) -> dict[str, Any]:
        count = content.get("execution_count")
        _require(_is_int(count) and isinstance(content.get("code"), str))
        cell = self._cells.get(parent_id) if parent_id is not None else None
        if cell is None:
            raise _WithheldError(RULE_EXECUTE_INPUT)
        canonical = {"code": cell.code, "execution_count": count}
        if content == canonical:
            return content
        changes.add(RULE_EXECUTE_INPUT)
        return canonical

    def _stream(self, content: dict[str, Any], parent_id: str | None, changes: _Changes) -> dict[str, Any]:
        _require(content.get("name") in _STREAMS and isinstance(content.get("text"), str))
        return content

    def _display(self, content: dict[str, Any], parent_id: str | None, changes: _Changes) -> dict[str, Any]:
        transient = content.get("transient", {})
        _require(isinstance(transient, dict) and isinstance(transient.get("display_id", ""), str))
        return self._with_display_bundle(content, changes)

    def _update_display(self, content: dict[str, Any], parent_id: str | None, changes: _Changes) -> dict[str, Any]:
        transient = content.get("transient")
        _require(isinstance(transient, dict) and isinstance(transient.get("display_id"), str))
        return self._with_display_bundle(content, changes)

    def _execute_result(self, content: dict[str, Any], parent_id: str | None, changes: _Changes) -> dict[str, Any]:
        _require(_is_int(content.get("execution_count")))
        return self._with_display_bundle(content, changes)

    def _with_display_bundle(self, content: dict[str, Any], changes: _Changes) -> dict[str, Any]:
        rewritten = self._with_bundle(content, changes)
        if not rewritten["data"]:
            raise _WithheldError(RULE_MIME)
        return rewritten

    def _clear_output(self, content: dict[str, Any], parent_id: str | None, changes: _Changes) -> dict[str, Any]:
        _require(isinstance(content.get("wait", False), bool))
        return content

    def _error(self, content: dict[str, Any], parent_id: str | None, changes: _Changes) -> dict[str, Any]:
        redacted = self._error_fields(content)
        if redacted is None or redacted == content:
            return content
        changes.add(RULE_TRACEBACKS)
        return redacted

    def _comm(self, content: dict[str, Any], parent_id: str | None, changes: _Changes) -> dict[str, Any]:
        _require(isinstance(content.get("comm_id"), str) and isinstance(content.get("data", {}), dict))
        if "target_name" in content:
            _require(isinstance(content["target_name"], str))
        if "target_module" in content:
            _require(content["target_module"] is None or isinstance(content["target_module"], str))
        return content

    def _input_request(self, content: dict[str, Any], parent_id: str | None, changes: _Changes) -> dict[str, Any]:
        _require(isinstance(content.get("prompt"), str) and isinstance(content.get("password", False), bool))
        return content

    def _execute_reply(self, content: dict[str, Any], parent_id: str | None, changes: _Changes) -> dict[str, Any]:
        status = content.get("status")
        _require(status in _EXECUTE_STATUSES)
        if status != "aborted" or "execution_count" in content:
            _require(_is_int(content.get("execution_count")))
        rewritten = dict(content)
        if "payload" in content:
            rewritten["payload"] = self._payload(content["payload"], changes)
        if "user_expressions" in content:
            rewritten["user_expressions"] = self._user_expressions(content["user_expressions"], changes)
        if status == "error":
            redacted = self._error_fields(content)
            if redacted is not None:
                redacted = {"status": "error", "execution_count": content["execution_count"], **redacted}
                for key in ("user_expressions", "payload"):
                    if key in rewritten:
                        redacted[key] = rewritten[key]
                if redacted != content:
                    changes.add(RULE_TRACEBACKS)
                    return redacted
        if all(rewritten[key] is content[key] for key in ("payload", "user_expressions") if key in content):
            return content
        return rewritten

    def _payload(self, payload: object, changes: _Changes) -> list[Any]:
        _require(isinstance(payload, list))
        assert isinstance(payload, list)
        kept: list[Any] = []
        changed = False
        for item in payload:
            _require(isinstance(item, dict))
            source = item.get("source")
            if source == "page":
                _require(_is_int(item.get("start", 0)))
                rewritten = self._with_bundle(item, changes)
                changed = changed or rewritten is not item
                kept.append(rewritten)
            elif source in ("set_next_input", "edit_magic"):
                # Text that lands in the analyst's notebook: the same as showing it as text/plain.
                _require(isinstance(item.get("text", ""), str) and isinstance(item.get("filename", ""), str))
                if "text/plain" in self._policy.mime:
                    kept.append(item)
                else:
                    changes.add(RULE_MIME, _PARTLY_SHOWN)
                    changed = True
            elif source == "ask_exit":
                _require(isinstance(item.get("keepkernel", False), bool))
                kept.append(item)
            else:
                changes.add(RULE_MALFORMED)
                changed = True
        return kept if changed else payload

    def _user_expressions(self, expressions: object, changes: _Changes) -> dict[str, Any]:
        _require(isinstance(expressions, dict))
        assert isinstance(expressions, dict)
        kept: dict[str, Any] = {}
        changed = False
        for name, result in expressions.items():
            _require(isinstance(name, str) and isinstance(result, dict))
            status = result.get("status")
            if status == "ok":
                rewritten = self._with_bundle(result, changes)
            elif status == "error":
                redacted = self._error_fields(result)
                if redacted is None or {"status": "error", **redacted} == result:
                    rewritten = result
                else:
                    changes.add(RULE_TRACEBACKS)
                    rewritten = {"status": "error", **redacted}
            else:
                raise _WithheldError(RULE_MALFORMED)
            changed = changed or rewritten is not result
            kept[name] = rewritten
        return kept if changed else expressions

    def _kernel_info_reply(self, content: dict[str, Any], parent_id: str | None, changes: _Changes) -> dict[str, Any]:
        features = content.get("supported_features", [])
        _require(_is_str_list(features) and isinstance(content.get("debugger", False), bool))
        kept: list[str] = []
        for feature in features:
            if feature != "debugger" and feature not in kept:
                kept.append(feature)
        if ATTESTATION_FEATURE not in kept:
            kept.append(ATTESTATION_FEATURE)
        if "debugger" in features or content.get("debugger") is True:
            changes.add(RULE_DEBUGGER)
        if kept == features and content.get("debugger", False) is False:
            return content
        rewritten = dict(content)
        rewritten["supported_features"] = kept
        if "debugger" in content:
            rewritten["debugger"] = False
        return rewritten

    def _complete_reply(self, content: dict[str, Any], parent_id: str | None, changes: _Changes) -> dict[str, Any]:
        if content.get("status") == "ok":
            _require(
                _is_str_list(content.get("matches"))
                and _is_int(content.get("cursor_start"))
                and _is_int(content.get("cursor_end"))
                and isinstance(content.get("metadata", {}), dict)
            )
            return content
        return self._other_status(content, changes)

    def _inspect_reply(self, content: dict[str, Any], parent_id: str | None, changes: _Changes) -> dict[str, Any]:
        if content.get("status") == "ok":
            _require(isinstance(content.get("found", False), bool))
            return self._with_bundle(content, changes)
        return self._other_status(content, changes)

    def _history_reply(self, content: dict[str, Any], parent_id: str | None, changes: _Changes) -> dict[str, Any]:
        if content.get("status") != "ok":
            return self._other_status(content, changes)
        history = content.get("history")
        _require(isinstance(history, list))
        assert isinstance(history, list)
        text_allowed = "text/plain" in self._policy.mime
        kept: list[Any] = []
        changed = False
        for entry in history:
            _require(isinstance(entry, (list, tuple)) and len(entry) == 3)
            session, line, cell = entry
            _require(_is_int(session) and _is_int(line))
            if isinstance(cell, str):
                kept.append(entry)
                continue
            _require(isinstance(cell, (list, tuple)) and len(cell) == 2)
            source, output = cell
            _require(isinstance(source, str) and (output is None or isinstance(output, str)))
            if text_allowed or not output:
                kept.append(entry)
            else:
                kept.append([session, line, [source, ""]])
                changed = True
        if not changed:
            return content
        changes.add(RULE_MIME, "the outputs in the history are text/plain, which is not allowed")
        rewritten = dict(content)
        rewritten["history"] = kept
        return rewritten

    def _is_complete_reply(self, content: dict[str, Any], parent_id: str | None, changes: _Changes) -> dict[str, Any]:
        _require(content.get("status") in _IS_COMPLETE and isinstance(content.get("indent", ""), str))
        return content

    def _comm_info_reply(self, content: dict[str, Any], parent_id: str | None, changes: _Changes) -> dict[str, Any]:
        if content.get("status") == "ok":
            comms = content.get("comms", {})
            _require(isinstance(comms, dict) and all(isinstance(info, dict) for info in comms.values()))
            return content
        return self._other_status(content, changes)

    def _debug_reply(self, content: dict[str, Any], parent_id: str | None, changes: _Changes) -> dict[str, Any]:
        changes.add(RULE_DEBUGGER)
        return dict(_DEBUGGER_DISABLED)

    def _plain_reply(self, content: dict[str, Any], parent_id: str | None, changes: _Changes) -> dict[str, Any]:
        if "status" not in content:
            return content
        return self._other_status(content, changes)

    def _other_status(self, content: dict[str, Any], changes: _Changes) -> dict[str, Any]:
        """A reply that is not "ok": an error keeps only its redacted details when the policy says so."""
        status = content.get("status")
        _require(isinstance(status, str))
        if status != "error":
            return content
        redacted = self._error_fields(content)
        if redacted is None:
            return content
        redacted = {"status": "error", **redacted}
        if redacted == content:
            return content
        changes.add(RULE_TRACEBACKS)
        return redacted
