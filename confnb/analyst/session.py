"""The executor's one connection to the vault: a Unix socket named by ``CONFNB_VAULT_SOCKET``.

The launcher sets that variable only in a confidential kernel's executor, so its absence is how the API knows it is
running somewhere else (a laptop, a plain kernel) and says so, instead of failing later with a socket error. The
connection is opened on first use and shared by every handle; a lock makes each request/reply pair atomic, so
threads in the analyst's notebook cannot interleave frames. After any transport failure the socket is discarded
(the stream may be out of step) and the next request reconnects; requests are never retried, because a release or
a fit is not idempotent (each gets its own audit entry).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Sequence
from typing import Any

from confnb.analyst.errors import NotInKernelError, ProtocolError, VaultError
from kernel_enclave.vault.protocol import PROTOCOL, error_from_dict, recv_message, send_message

__all__ = ["NOT_IN_KERNEL", "SOCKET_VARIABLE", "VaultSession", "current_session"]

SOCKET_VARIABLE = "CONFNB_VAULT_SOCKET"
NOT_IN_KERNEL = f"not inside a confidential kernel: {SOCKET_VARIABLE} is not set"


class VaultSession:
    """Requests to one vault. Thread-safe; connects lazily and again after a broken connection (or a fork)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._pid = 0
        self._kernel: dict[str, Any] | None = None
        self._forgotten: list[dict[str, str]] = []  # appended by finalizers: list.append is atomic

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
            try:
                self._send_drops(connection)
                send_message(connection, header, buffers)
                reply, out = recv_message(connection)
            except ProtocolError as exc:
                self._discard()
                raise ProtocolError(f"the vault's reply to {op!r} was malformed: {exc}") from None
            except (OSError, EOFError) as exc:
                self._discard()
                raise VaultError(f"the connection to the vault broke during {op!r} ({type(exc).__name__})") from None
        if reply.get("ok") is True:
            return reply, out
        raise error_from_dict(reply.get("error"))

    def _send_drops(self, connection: socket.socket) -> None:
        drops = []
        while self._forgotten:
            drops.append(self._forgotten.pop())
        for drop in drops:  # pipelined: the vault answers in order
            send_message(connection, drop)
        for _ in drops:
            recv_message(connection)  # a drop cannot fail in a way the analyst could act on

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
            connection.connect(self.path)
        except OSError as exc:
            connection.close()
            reason = exc.strerror or type(exc).__name__
            raise VaultError(
                f"cannot reach the vault at {self.path} ({reason}); is the kernel still running?"
            ) from None
        try:
            send_message(connection, {"op": "hello"})
            hello, _ = recv_message(connection)
        except (OSError, EOFError, ProtocolError):
            connection.close()
            raise VaultError(f"the vault at {self.path} did not answer its greeting") from None
        if hello.get("ok") is not True or hello.get("protocol") != PROTOCOL:
            connection.close()
            raise ProtocolError(f"the peer at {self.path} does not speak {PROTOCOL}")
        kernel = hello.get("kernel")
        self._kernel = dict(kernel) if isinstance(kernel, dict) else {}
        self._socket, self._pid = connection, os.getpid()
        return connection

    def _discard(self) -> None:
        if self._socket is not None:
            self._socket.close()
        self._socket = None


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
