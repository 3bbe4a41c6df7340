"""The vault's Unix socket: where the executor's requests come in.

The socket lives in a directory only the kernel's processes can reach, and every connection is checked with
``SO_PEERCRED`` against the one user the executor runs as, so another process in the VM cannot ask the vault for
anything even if it finds the path. :class:`~kernel_enclave.vault.vault.Vault` serializes the work itself.

Each connection gets two threads: a reader, which takes frames off the socket as they come, and a worker, which
answers the requests in order, each reply naming the id of its request. The reader stays free while a request
runs, so a ``cancel`` (or the connection closing) reaches the running request's cancellation token at once, and
the work stops (:mod:`kernel_enclave.vault.stoppable`); requests still queued behind a cancel are answered, in
order, as soon as it has stopped.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from kernel_enclave.vault import stoppable
from kernel_enclave.vault.protocol import (
    CANCEL,
    Cancelled,
    ProtocolError,
    error_reply,
    recv_message,
    request_id,
    send_message,
)
from kernel_enclave.vault.vault import Reply, Vault

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
# Requests read ahead of the one running (the executor pipelines its handle drops before a request). Beyond this the
# reader waits, so a client cannot make the vault hold an unbounded number of frames.
MAX_QUEUED = 16
_Request = tuple[dict[str, Any], list[bytes], int | None, stoppable.CancelToken]


class Connection(Protocol):
    """What one accepted connection's requests go to; :meth:`close` runs when the peer goes away."""

    def handle(self, header: dict[str, Any], buffers: list[bytes]) -> Reply: ...

    def close(self) -> None: ...


class _VaultConnection:
    """The executor's connections: stateless, every request goes straight to the vault."""

    def __init__(self, vault: Vault) -> None:
        self._vault = vault

    def handle(self, header: dict[str, Any], buffers: list[bytes]) -> Reply:
        return self._vault.handle(header, buffers)

    def close(self) -> None:
        pass


class VaultServer:
    """Serves one :class:`Vault` on a Unix socket at ``path`` (created here, removed by :meth:`close`).

    ``connections`` makes the handler of each accepted connection (default: the vault's own operations); the
    upload socket uses it to serve only the upload operations, with state that dies with the connection.
    """

    def __init__(
        self,
        vault: Vault,
        path: str | Path,
        *,
        allowed_uid: int | None = None,
        owner_uid: int = -1,
        connections: Callable[[], Connection] | None = None,
    ) -> None:
        self.vault = vault
        self.path = Path(path)
        self._connections = connections or (lambda: _VaultConnection(vault))
        self._allowed_uid = os.getuid() if allowed_uid is None else allowed_uid
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.path))
        # Only the executor's user may connect (connect(2) on a Unix socket needs write permission on its file).
        os.chmod(self.path, 0o600)
        if owner_uid >= 0:
            os.chown(self.path, owner_uid, -1)
        self._listener.listen(8)
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.serve_forever, name="confnb-vault", daemon=True)
        self._thread.start()
        return self._thread

    def serve_forever(self) -> None:
        while not self._closed.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return  # closed
            if not self._peer_allowed(connection):
                connection.close()
                continue
            threading.Thread(target=self._serve, args=(connection,), name="confnb-vault-client", daemon=True).start()

    def _peer_allowed(self, connection: socket.socket) -> bool:
        credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        _, uid, _ = _PEERCRED.unpack(credentials)
        return bool(uid == self._allowed_uid)

    def _serve(self, connection: socket.socket) -> None:
        """The connection's reader: frames in, cancels applied at once, requests queued for :meth:`_answer`."""
        handler = self._connections()
        sending = threading.Lock()
        open_requests: dict[int, stoppable.CancelToken] = {}  # id -> token, for requests queued or running
        guard = threading.Lock()
        work: queue.Queue[_Request | None] = queue.Queue(MAX_QUEUED)
        answering = threading.Thread(
            target=self._answer,
            args=(connection, handler, work, open_requests, guard, sending),
            name="confnb-vault-work",
            daemon=True,
        )
        answering.start()
        try:
            while True:
                try:
                    header, buffers = recv_message(connection)
                    rid = request_id(header)
                except (EOFError, ConnectionError, OSError):
                    return
                except ProtocolError as exc:
                    with sending, contextlib.suppress(OSError):
                        send_message(connection, error_reply(exc))
                    return  # the stream is out of step; the client reconnects
                if header.get("op") == CANCEL:
                    with guard:
                        token = open_requests.get(rid) if rid is not None else None
                    if token is not None:
                        token.set()
                    continue  # a cancel has no reply of its own: the cancelled request's reply answers it
                token = stoppable.CancelToken()
                if rid is not None:
                    with guard:
                        if rid in open_requests:
                            duplicate = ProtocolError(f"request id {rid} is already in use on this connection")
                            with sending, contextlib.suppress(OSError):
                                send_message(connection, error_reply(duplicate))
                            return
                        open_requests[rid] = token
                work.put((header, buffers, rid, token))
        finally:
            with guard:  # the executor is gone (or out of step): nobody will read these replies
                for token in open_requests.values():
                    token.set()
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RD)
            work.put(None)

    @staticmethod
    def _answer(
        connection: socket.socket,
        handler: Connection,
        work: queue.Queue[_Request | None],
        open_requests: dict[int, stoppable.CancelToken],
        guard: threading.Lock,
        sending: threading.Lock,
    ) -> None:
        """The connection's worker: each request in turn, under its cancellation token; the reply names its id."""
        try:
            while (item := work.get()) is not None:
                header, buffers, rid, token = item
                out: list[bytes] = []
                if token.is_set():
                    reply = error_reply(Cancelled("cancelled before it started"))
                else:
                    with stoppable.cancellable(token):
                        reply, out = handler.handle(header, buffers)
                with guard:
                    if rid is not None:
                        open_requests.pop(rid, None)
                if rid is not None:
                    reply = {**reply, "id": rid}
                try:
                    with sending:
                        send_message(connection, reply, out)
                except (ConnectionError, OSError):
                    pass  # the reader sees the same and cancels what is left
        finally:
            handler.close()
            connection.close()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self._thread is not None:
            self._thread.join(timeout=5)
