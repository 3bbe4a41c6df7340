"""The executor ↔ vault wire: length-prefixed JSON headers with optional binary buffers, over a Unix socket.

One request, one reply, in order. The executor is the analyst's process and therefore hostile, so nothing on this
wire is ever unpickled or evaluated: headers are strict JSON objects, buffers are Arrow IPC streams (parsed by
Arrow, which validates them) or opaque ciphertext. Frames are capped so a hostile peer cannot make the vault
allocate without bound.

Frame: ``u32 header_length | header (UTF-8 JSON object) | u32 buffer_count | (u64 length | bytes) * buffer_count``,
all big-endian.

A reply header is ``{"ok": true, ...}`` or ``{"ok": false, "error": {"type": ..., "message": ..., ...}}``; errors
carry column names and types at most, never data values.

Requests carry ids. The executor numbers its requests (``"id"``: a positive integer, increasing on a connection) and
every reply repeats the id of the request it answers, so a reply can never be taken for another's. An analyst's
interrupt abandons a request: the executor sends ``{"op": "cancel", "id": n}`` (no reply), the vault stops that
request's work and answers it with a :class:`Cancelled` error, and the executor discards that reply when it reads
past it. Closing the connection cancels every request still open on it.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
from collections.abc import Sequence
from typing import Any

PROTOCOL = "confnb-vault/1"
CANCEL = "cancel"  # {"op": "cancel", "id": n}: stop request n; answered by request n's own (discarded) reply
MAX_REQUEST_ID = 2**53 - 1  # exact in every JSON implementation
# Beside the socket: why the vault process ended, in a few words, written by the launcher when it does, so that the
# executor can tell the analyst ("the vault stopped: killed by SIGKILL ...; restart the kernel").
EXIT_STATUS_FILE = "vault.exit"
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_BUFFERS = 16
MAX_BUFFER_BYTES = 8 * 1024 * 1024 * 1024
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class VaultError(Exception):
    """A vault operation failed. The message names operations, columns and types, never data values."""

    kind = "VaultError"

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "message": str(self)}


class PolicyViolation(VaultError):  # noqa: N818 - the name analysts see, as the product promises it
    """A result was withheld by the data owner's output policy.

    ``rule`` names the policy rule (``release.allow``, ``release.min_group_size``, ``release.never_release``,
    ``release.max_rows``) and ``datasets`` the datasets whose policy imposed it. Nothing of the withheld value is in
    the message.
    """

    kind = "PolicyViolation"

    def __init__(self, rule: str, datasets: Sequence[str], message: str) -> None:
        self.rule = rule
        self.datasets = tuple(datasets)
        named = ", ".join(repr(name) for name in self.datasets) or "no dataset"
        super().__init__(f"{message} [rule {rule} of {named}]")

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "rule": self.rule, "datasets": list(self.datasets)}

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled only between the vault and its own worker processes (kernel_enclave.vault.stoppable).
        return (_rebuild_violation, (self.rule, self.datasets, str(self)))


def _rebuild_violation(rule: str, datasets: Sequence[str], message: str) -> PolicyViolation:
    violation = PolicyViolation(rule, datasets, "")
    violation.args = (message,)
    return violation


class ProtocolError(VaultError):
    """A frame that is not a well-formed message of this protocol."""

    kind = "ProtocolError"


class Cancelled(VaultError):  # noqa: N818 - an outcome, like PolicyViolation, not a fault
    """A request stopped because the executor cancelled it (the analyst interrupted the cell) or went away."""

    kind = "Cancelled"

    def __init__(self, message: str = "cancelled: the request was interrupted") -> None:
        super().__init__(message)


def request_id(header: dict[str, Any]) -> int | None:
    """The request's id (``None`` for a request without one), or :class:`ProtocolError` for a malformed id."""
    value = header.get("id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_REQUEST_ID:
        raise ProtocolError(f"a request id is an integer from 1 to {MAX_REQUEST_ID}")
    return value


def error_from_dict(error: object) -> VaultError:
    """The exception a reply's ``error`` object describes (for the client side)."""
    if not isinstance(error, dict):
        return ProtocolError("the vault's reply carries a malformed error")
    message = str(error.get("message", "the vault refused the request"))
    if error.get("type") == PolicyViolation.kind:
        violation = PolicyViolation(str(error.get("rule", "")), [str(d) for d in error.get("datasets", [])], "")
        violation.args = (message,)  # the vault's own wording, already naming rule and datasets
        return violation
    if error.get("type") == Cancelled.kind:
        return Cancelled(message)
    return VaultError(message)


def describe_exit(returncode: int) -> str:
    """Why a vault process with this return code (negative: killed by that signal) ended, for the analyst."""
    if returncode >= 0:
        return f"it exited with status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    if -returncode == signal.SIGKILL:
        return f"it was killed by {name} (out of memory, or stopped from outside)"
    return f"it was killed by {name}"


def error_reply(exc: VaultError) -> dict[str, Any]:
    return {"ok": False, "error": exc.to_dict()}


def _recv_exactly(sock: socket.socket, size: int) -> bytearray:
    data = bytearray(size)
    view = memoryview(data)
    received = 0
    while received < size:
        count = sock.recv_into(view[received:], size - received)
        if count == 0:
            raise EOFError("the peer closed the vault connection")
        received += count
    return data


def send_message(sock: socket.socket, header: dict[str, Any], buffers: Sequence[bytes | memoryview] = ()) -> None:
    if len(buffers) > MAX_BUFFERS:
        raise ProtocolError(f"a message carries at most {MAX_BUFFERS} buffers")
    encoded = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    if len(encoded) > MAX_HEADER_BYTES:
        raise ProtocolError(f"a message header is at most {MAX_HEADER_BYTES} bytes")
    parts: list[bytes | memoryview] = [_U32.pack(len(encoded)), encoded, _U32.pack(len(buffers))]
    for buffer in buffers:
        parts.append(_U64.pack(memoryview(buffer).nbytes))
        parts.append(buffer)
    sock.sendall(b"".join(parts[:3]))
    for part in parts[3:]:
        sock.sendall(part)


def recv_message(sock: socket.socket) -> tuple[dict[str, Any], list[bytes]]:
    """One message; raises :class:`EOFError` on a clean close and :class:`ProtocolError` on a malformed frame."""
    (length,) = _U32.unpack(_recv_exactly(sock, _U32.size))
    if length > MAX_HEADER_BYTES:
        raise ProtocolError(f"a message header is at most {MAX_HEADER_BYTES} bytes")
    try:
        header = json.loads(bytes(_recv_exactly(sock, length)), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("a message header is not JSON") from None
    except RecursionError:
        raise ProtocolError("a message header is nested too deeply") from None
    if not isinstance(header, dict):
        raise ProtocolError("a message header is not a JSON object")
    (count,) = _U32.unpack(_recv_exactly(sock, _U32.size))
    if count > MAX_BUFFERS:
        raise ProtocolError(f"a message carries at most {MAX_BUFFERS} buffers")
    buffers = []
    for _ in range(count):
        (size,) = _U64.unpack(_recv_exactly(sock, _U64.size))
        if size > MAX_BUFFER_BYTES:
            raise ProtocolError(f"a buffer is at most {MAX_BUFFER_BYTES} bytes")
        buffers.append(bytes(_recv_exactly(sock, size)))
    return header, buffers


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
