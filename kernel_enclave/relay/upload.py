"""The relay's side of the ``confnb.upload`` comm: the browser's encrypted file goes to the vault, never the executor.

The comm is answered here, like ``confnb.attestation``, because the executor runs the analyst's code: it must not
see the ciphertext's framing, decide what an upload is called, or fake a "done". The relay only moves bytes: every
check that matters (descriptor, policy, HPKE, Tink, the name, validation of the parsed table) happens in the vault,
reached over ``upload.sock``, which serves the launcher's user and nothing but the upload operations; the file
itself is parsed by a confined process the vault starts (:mod:`kernel_enclave.vault.upload_parser`).

Protocol (``data`` of comm messages; replies are ``comm_msg`` on iopub, framed by busy/idle):

- ``comm_open`` ``{"action": "begin", "descriptor": {...}, "sealed_key": b64, "ciphertext_size": n}`` →
  ``{"action": "ready"}``
- ``{"action": "chunk", "seq": n}`` + one binary buffer → ``{"action": "progress", "seq": n, "received": total}``
- ``{"action": "end"}`` → ``{"action": "done", "dataset", "rows", "columns", "policy_id"}``
- ``{"action": "cancel"}`` → ``{"action": "cancelled"}``; ``comm_close`` discards silently
- any failure → ``{"action": "error", "message": "one line"}``, and the upload is gone (a new comm starts again).

Vault round trips run on a worker thread of their own, in arrival order, so the relay's thread never waits for
the vault (parsing a large file at ``end`` takes seconds); results come back through an inproc socket the relay
polls with the rest.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import queue
import socket
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import zmq

from kernel_enclave.relay.wire import Message
from kernel_enclave.vault.protocol import MAX_BUFFERS, ProtocolError, recv_message, send_message

UPLOAD_COMM_TARGET: Final = "confnb.upload"
# A round trip covers at most one chunk, or the parse of the whole file at "end" (up to 4 GiB of ciphertext).
VAULT_TIMEOUT_S: Final = 900.0
_MAX_SEALED_KEY_CHARS: Final = 4096


class _RelayUploadError(Exception):
    """A request refused before it reached the vault, or a vault failure; the message goes to the browser."""


@dataclass
class _Job:
    kind: str  # "open", "msg" or "close"
    parent: Message
    comm_id: str
    data: Any
    buffers: list[bytes] = field(default_factory=list)


Reply = tuple[Message, str, dict[str, Any] | None]  # parent, comm id, comm data (None: only "idle" is due)


class _VaultLink:
    """One connection to ``upload.sock``, made on first use; the vault drops its uploads when it closes."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._socket: socket.socket | None = None

    def call(self, header: dict[str, Any], buffers: list[bytes] | None = None) -> dict[str, Any]:
        if self._path is None:
            raise _RelayUploadError("uploads are not available in this kernel (no vault upload socket)")
        try:
            if self._socket is None:
                connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                connection.settimeout(VAULT_TIMEOUT_S)
                connection.connect(str(self._path))
                self._socket = connection
            send_message(self._socket, header, buffers or [])
            answer, _ = recv_message(self._socket)
        except (OSError, EOFError, ProtocolError) as exc:
            self.close()
            raise ConnectionError(f"the vault's upload socket failed ({type(exc).__name__})") from None
        if answer.get("ok") is True:
            return answer
        error = answer.get("error")
        message = error.get("message") if isinstance(error, dict) else None
        raise _RelayUploadError(" ".join(str(message or "the vault refused the upload").split())[:500])

    def close(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.close()
            self._socket = None

    def interrupt(self) -> None:
        """From another thread: end a round trip in progress (the vault then discards this link's uploads)."""
        connection = self._socket
        if connection is not None:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class UploadRelay:
    """Owns the upload comms of one relay. :meth:`submit` and :meth:`take_replies` run on the relay's thread."""

    def __init__(self, socket_path: str | Path | None) -> None:
        self._path = Path(socket_path) if socket_path is not None else None
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._results: deque[Reply] = deque()
        self._comms: set[str] = set()
        self._address = f"inproc://confnb-upload-{uuid.uuid4().hex}"
        self._notes: zmq.Socket[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._context: zmq.Context[zmq.Socket[bytes]] | None = None
        self._link = _VaultLink(self._path)

    def start(self, context: zmq.Context[zmq.Socket[bytes]]) -> zmq.Socket[bytes]:
        """Start the worker; returns the socket the relay polls: readable when replies are due."""
        self._context = context
        self._notes = context.socket(zmq.PAIR)
        self._notes.linger = 0
        self._notes.bind(self._address)
        self._thread = threading.Thread(target=self._work, name="confnb-upload-relay", daemon=True)
        self._thread.start()
        return self._notes

    def stop(self) -> None:
        self._jobs.put(None)
        self._link.interrupt()  # the worker's sockets must close before the relay's context can end
        if self._thread is not None:
            self._thread.join(5)
        if self._notes is not None:
            self._notes.close(linger=0)
            self._notes = None

    # -- relay thread -----------------------------------------------------------------------------------------

    def owns(self, comm_id: object) -> bool:
        return isinstance(comm_id, str) and comm_id in self._comms

    def submit(self, kind: str, parent: Message, comm_id: str, data: Any, buffers: list[bytes]) -> None:
        if kind == "open":
            self._comms.add(comm_id)
        elif kind == "close":
            self._comms.discard(comm_id)
        self._jobs.put(_Job(kind, parent, comm_id, data, list(buffers)))

    def take_replies(self) -> list[Reply]:
        assert self._notes is not None
        with contextlib.suppress(zmq.Again):
            while True:
                self._notes.recv(zmq.NOBLOCK)
        replies = []
        while self._results:
            replies.append(self._results.popleft())
        return replies

    # -- worker thread ----------------------------------------------------------------------------------------

    def _work(self) -> None:
        assert self._context is not None
        notify = self._context.socket(zmq.PAIR)
        notify.linger = 0
        notify.connect(self._address)
        vault = self._link
        uploads: dict[str, str] = {}  # comm id -> the vault's upload id
        try:
            while (job := self._jobs.get()) is not None:
                try:
                    data = self._run(job, vault, uploads)
                except _RelayUploadError as exc:
                    # A failure ends the upload; the vault has dropped it already if the failure was its own.
                    upload = uploads.pop(job.comm_id, None)
                    if upload is not None:
                        with contextlib.suppress(_RelayUploadError, ConnectionError):
                            vault.call({"op": "upload_cancel", "upload": upload})
                    data = {"action": "error", "message": str(exc)}
                except ConnectionError as exc:
                    uploads.clear()  # the vault discards every upload of a connection that is gone
                    data = {"action": "error", "message": str(exc)}
                self._results.append((job.parent, job.comm_id, data))
                notify.send(b"")
        finally:
            vault.close()
            notify.close(linger=0)

    def _run(self, job: _Job, vault: _VaultLink, uploads: dict[str, str]) -> dict[str, Any] | None:
        if job.kind == "close":
            upload = uploads.pop(job.comm_id, None)
            if upload is not None:
                with contextlib.suppress(_RelayUploadError, ConnectionError):
                    vault.call({"op": "upload_cancel", "upload": upload})
            return None
        data = job.data if isinstance(job.data, dict) else {}
        action = data.get("action")
        if job.kind == "open" and action != "begin":
            raise _RelayUploadError('the comm must open with {"action": "begin", ...}')
        if action == "begin":
            return self._begin(job.comm_id, data, vault, uploads)
        if action == "cancel":
            upload = uploads.pop(job.comm_id, None)
            if upload is not None:
                vault.call({"op": "upload_cancel", "upload": upload})
            return {"action": "cancelled"}
        if action not in ("chunk", "end"):
            shown = action if isinstance(action, str) and len(action) <= 20 else "?"
            raise _RelayUploadError(f"unknown action {shown!r} (begin, chunk, end or cancel)")
        upload = uploads.get(job.comm_id)
        if upload is None:
            raise _RelayUploadError("no upload in progress on this comm (it ended, failed or was cancelled)")
        if action == "chunk":
            seq = data.get("seq")
            if not 1 <= len(job.buffers) <= MAX_BUFFERS:
                raise _RelayUploadError(f"chunk: send the ciphertext as one binary buffer (got {len(job.buffers)})")
            answer = vault.call({"op": "upload_chunk", "upload": upload, "seq": seq}, job.buffers)
            return {"action": "progress", "seq": seq, "received": answer["received"]}
        answer = vault.call({"op": "upload_end", "upload": upload})
        uploads.pop(job.comm_id, None)
        return {
            "action": "done",
            "dataset": answer["dataset"],
            "rows": answer["rows"],
            "columns": answer["columns"],
            "policy_id": answer["policy_id"],
        }

    @staticmethod
    def _begin(comm_id: str, data: dict[str, Any], vault: _VaultLink, uploads: dict[str, str]) -> dict[str, Any]:
        if comm_id in uploads:
            raise _RelayUploadError("an upload is already in progress on this comm")
        sealed_text = data.get("sealed_key")
        if not isinstance(sealed_text, str) or len(sealed_text) > _MAX_SEALED_KEY_CHARS:
            raise _RelayUploadError("sealed_key: must be base64 text")
        try:
            sealed = base64.b64decode(sealed_text, validate=True)
        except (binascii.Error, ValueError):
            raise _RelayUploadError("sealed_key: must be base64 text") from None
        header = {
            "op": "upload_begin",
            "descriptor": data.get("descriptor"),
            "ciphertext_size": data.get("ciphertext_size"),
        }
        answer = vault.call(header, [sealed])
        uploads[comm_id] = str(answer["upload"])
        return {"action": "ready"}
