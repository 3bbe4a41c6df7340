"""The executor's one connection to the vault: a Unix socket named by ``CONFNB_VAULT_SOCKET``.

The launcher sets that variable only in a confidential kernel's executor, so its absence is how the API knows it is
running somewhere else (a laptop, a plain kernel) and says so, instead of failing later with a socket error. The
connection is opened on first use and shared by every handle; a lock makes each request/reply pair atomic, so
threads in the analyst's notebook cannot interleave frames. Requests are never retried, because a release or a fit
is not idempotent (each gets its own audit entry).

Every request carries an id, increasing, and the reply must name it: a reply is never taken for another request's.
An interrupt (``KeyboardInterrupt``, or any exception) while the vault works abandons the request: the session
sends ``cancel`` for its id, the vault stops the work, and the reply to the abandoned request, when it comes, is
read and discarded by the next request. An interrupt in the middle of a frame leaves the stream out of step, so
the connection is closed instead (which cancels too) and the next request reconnects. A vault that has died is
reported as such, with the reason the launcher recorded, and the advice to restart the kernel.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from confnb.analyst.errors import NotInKernelError, ProtocolError, VaultError
from kernel_enclave.vault.protocol import (
    CANCEL,
    EXIT_STATUS_FILE,
    PROTOCOL,
    error_from_dict,
    recv_message,
    send_message,
)

__all__ = ["NOT_IN_KERNEL", "SOCKET_VARIABLE", "VaultSession", "current_session"]

SOCKET_VARIABLE = "CONFNB_VAULT_SOCKET"
NOT_IN_KERNEL = f"not inside a confidential kernel: {SOCKET_VARIABLE} is not set"
EXIT_STATUS_WAIT_S = 2.0  # the launcher records why the vault stopped moments after the connection breaks
# connect(2) on a Unix socket whose listener is gone: nobody serves the path any more.
_GONE = (errno.ECONNREFUSED, errno.ENOENT)


class VaultSession:
    """Requests to one vault. Thread-safe; connects lazily and again after a broken connection (or a fork)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._pid = 0
        self._kernel: dict[str, Any] | None = None
        self._forgotten: list[dict[str, str]] = []  # appended by finalizers: list.append is atomic
        self._last_id = 0

    def forget(self, kind: str, ident: str) -> None:
        """A handle is gone: the vault may free what it held (a model's training data). Sent with the next request.

        Called from finalizers, at any moment (even while this thread holds the lock in :meth:`request`), so it
        only queues; nothing here may block or touch the socket.
        """
        self._forgotten.append({"op": "drop", kind: ident})

    def request(
        self, header: dict[str, Any], buffers: Sequence[bytes | memoryview] = ()
    ) -> tuple[dict[str, Any], list[bytes]]:
        """Send one request; return the successful reply and its buffers, or raise the vault's error."""
        op = str(header.get("op", "?"))
        with self._lock:
            connection = self._connected()
            self._send_drops(connection, op)
            reply, out = self._exchange(connection, header, buffers, op)
        if reply.get("ok") is True:
            return reply, out
        raise error_from_dict(reply.get("error"))

    def _new_id(self) -> int:
        self._last_id += 1
        return self._last_id

    def _exchange(
        self, connection: socket.socket, header: dict[str, Any], buffers: Sequence[bytes | memoryview], op: str
    ) -> tuple[dict[str, Any], list[bytes]]:
        """One request and its reply. ``stage`` says, if anything interrupts, whether the stream is still whole."""
        rid = self._new_id()
        stage = "sending"
        try:
            send_message(connection, {**header, "id": rid}, buffers)
            while True:
                stage = "waiting"  # between frames: the request can be cancelled and the stream kept
                _wait_readable(connection)
                stage = "reading"
                reply, out = recv_message(connection)
                stage = "waiting"
                if self._answers(reply, rid):
                    stage = "done"
                    return reply, out
        except ProtocolError as exc:
            stage = "done"
            self._discard()
            raise ProtocolError(f"the vault's reply to {op!r} was malformed: {exc}") from None
        except (OSError, EOFError) as exc:
            stage = "done"
            self._discard()
            raise self._broken(op, exc) from None
        finally:
            if stage == "waiting":
                self._abandon(connection, rid)
            elif stage != "done":
                self._discard()

    @staticmethod
    def _answers(reply: dict[str, Any], rid: int) -> bool:
        """Whether ``reply`` answers request ``rid``; ``False`` for a reply to an abandoned (earlier) request."""
        answered = reply.get("id")
        if answered == rid and not isinstance(answered, bool):
            return True
        if isinstance(answered, int) and not isinstance(answered, bool) and 0 < answered < rid:
            return False  # every earlier request was answered or abandoned: this one was abandoned, discard it
        if answered is None and reply.get("ok") is False:  # the vault refused the frame itself, then hung up
            raise ProtocolError(str(error_from_dict(reply.get("error"))))
        raise ProtocolError(f"a reply names request {answered!r}, not the request {rid} waiting for it")

    def _abandon(self, connection: socket.socket, rid: int) -> None:
        """Stop the vault's work on ``rid``; if even that cannot be said, close the connection (which also does)."""
        if self._socket is not connection:
            return
        self._socket = None  # from here, whatever interrupts us leaves no half-used connection behind
        try:
            send_message(connection, {"op": CANCEL, "id": rid})
        except BaseException:
            connection.close()
            raise
        self._socket = connection

    def _send_drops(self, connection: socket.socket, op: str) -> None:
        drops = []
        while self._forgotten:
            drops.append(self._forgotten.pop())
        if not drops:
            return
        ids = [self._new_id() for _ in drops]
        finished = False
        try:
            for rid, drop in zip(ids, drops, strict=True):  # pipelined: the vault answers in order
                send_message(connection, {**drop, "id": rid})
            for rid in ids:
                while True:
                    _wait_readable(connection)
                    reply, _ = recv_message(connection)
                    if self._answers(reply, rid):  # a drop cannot fail in a way the analyst could act on
                        break
            finished = True
        except ProtocolError:
            finished = True
            self._discard()
            raise
        except (OSError, EOFError) as exc:
            finished = True
            self._discard()
            raise self._broken(op, exc) from None
        finally:
            if not finished:  # interrupted: the stream may be out of step; the vault keeps the memory, no harm
                self._discard()

    def _broken(self, op: str, exc: BaseException) -> VaultError:
        """The error for a connection that broke: the vault stopped (and why), or the stream alone failed."""
        if self._vault_gone():
            return VaultError(f"the vault stopped: {self._exit_reason(op)}; restart the kernel")
        return VaultError(f"the connection to the vault broke during {op!r} ({type(exc).__name__})")

    def _vault_gone(self) -> bool:
        """Whether the vault process has ended: the launcher recorded its exit, or nobody listens any more.

        A dying process closes its connections before its listening socket, so this looks for a moment."""
        deadline = time.monotonic() + EXIT_STATUS_WAIT_S
        while True:
            if Path(self.path).with_name(EXIT_STATUS_FILE).exists() or _gone(self.path):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    def _exit_reason(self, op: str | None) -> str:
        recorded = Path(self.path).with_name(EXIT_STATUS_FILE)
        deadline = time.monotonic() + EXIT_STATUS_WAIT_S
        while True:
            with contextlib.suppress(OSError, UnicodeDecodeError):
                text = recorded.read_text(encoding="utf-8").strip()
                if text:
                    return text[:200]
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        during = f" during {op!r}" if op else ""
        return f"it closed its connection{during} and no longer answers"

    def kernel(self) -> dict[str, Any]:
        """The vault's ``hello``: the TEE kind, the kernel's measurement and its export-signing public key."""
        if self._kernel is None:
            with self._lock:
                self._connected()
        assert self._kernel is not None
        return dict(self._kernel)

    def close(self) -> None:
        with self._lock:
            self._discard()

    def _connected(self) -> socket.socket:
        if self._socket is not None and self._pid == os.getpid():
            return self._socket
        if self._socket is not None:  # a forked child: its copy of the parent's stream must not be shared
            self._socket.close()  # close(2) on the child's descriptor leaves the parent's connection intact
            self._socket = None
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                connection.connect(self.path)
            except OSError as exc:
                if exc.errno == errno.ECONNREFUSED:  # the socket is there, nobody listens: the vault died
                    raise VaultError(f"the vault stopped: {self._exit_reason(None)}; restart the kernel") from None
                reason = exc.strerror or type(exc).__name__
                raise VaultError(
                    f"cannot reach the vault at {self.path} ({reason}); is the kernel still running?"
                ) from None
            rid = self._new_id()
            try:
                send_message(connection, {"op": "hello", "id": rid})
                _wait_readable(connection)
                hello, _ = recv_message(connection)
            except (OSError, EOFError, ProtocolError):
                if self._vault_gone():
                    raise VaultError(f"the vault stopped: {self._exit_reason(None)}; restart the kernel") from None
                raise VaultError(f"the vault at {self.path} did not answer its greeting") from None
            if hello.get("ok") is not True or hello.get("protocol") != PROTOCOL or hello.get("id") != rid:
                raise ProtocolError(f"the peer at {self.path} does not speak {PROTOCOL}")
        except BaseException:
            connection.close()
            raise
        kernel = hello.get("kernel")
        self._kernel = dict(kernel) if isinstance(kernel, dict) else {}
        self._socket, self._pid = connection, os.getpid()
        return connection

    def _discard(self) -> None:
        if self._socket is not None:
            self._socket.close()
        self._socket = None


def _wait_readable(connection: socket.socket) -> None:
    """Block until a frame starts arriving. An interrupt here finds the stream between frames (nothing consumed)."""
    poller = select.poll()
    poller.register(connection.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
    while not poller.poll():
        pass


def _gone(path: str) -> bool:
    """Whether nobody listens at ``path`` any more (the vault process is gone)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError as exc:
            return exc.errno in _GONE
    return False


_default: VaultSession | None = None
_default_lock = threading.Lock()


def current_session() -> VaultSession:
    """The session for the socket ``CONFNB_VAULT_SOCKET`` names now (a changed variable gets a new connection)."""
    global _default  # noqa: PLW0603 - one connection per process is the point
    path = os.environ.get(SOCKET_VARIABLE, "")
    if not path:
        raise NotInKernelError(NOT_IN_KERNEL)
    with _default_lock:
        if _default is None or _default.path != path:
            if _default is not None:
                _default.close()
            _default = VaultSession(path)
        return _default
