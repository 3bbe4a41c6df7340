"""The executor's connection to the vault, against scripted peers: greeting, errors, broken streams, reconnects."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import confnb.analyst as cn
from confnb.analyst.errors import ProtocolError
from confnb.analyst.session import VaultSession, current_session
from kernel_enclave.vault.protocol import (
    EXIT_STATUS_FILE,
    PROTOCOL,
    Cancelled,
    PolicyViolation,
    describe_exit,
    error_reply,
    recv_message,
    send_message,
)

Handler = Callable[[dict[str, Any]], dict[str, Any] | None]  # None: close the connection without replying


class Peer:
    """A Unix-socket peer that greets as ``protocol`` and answers each request with ``handler``."""

    def __init__(self, path: Path, handler: Handler, protocol: str = PROTOCOL) -> None:
        self.path, self.handler, self.protocol = path, handler, protocol
        self.connections = 0
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            with connection:
                try:
                    while True:
                        header, _ = recv_message(connection)
                        if header.get("op") == "hello":
                            reply: dict[str, Any] | None = {
                                "ok": True,
                                "protocol": self.protocol,
                                "kernel": {"tee": "x"},
                            }
                        else:
                            reply = self.handler(header)
                        if reply is None:
                            break
                        if "id" in header and "id" not in reply:
                            reply = {**reply, "id": header["id"]}
                        send_message(connection, reply)
                except (EOFError, OSError):
                    pass

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def peer() -> Iterator[Callable[..., Peer]]:
    directory = Path(tempfile.mkdtemp(prefix="cnb-"))
    peers: list[Peer] = []
    sessions: list[VaultSession] = []

    def make(handler: Handler, protocol: str = PROTOCOL) -> Peer:
        created = Peer(directory / f"p{len(peers)}.sock", handler, protocol)
        peers.append(created)
        return created

    make.sessions = sessions  # type: ignore[attr-defined]
    try:
        yield make
    finally:
        for session in sessions:
            session.close()
        for created in peers:
            created.close()
        shutil.rmtree(directory, ignore_errors=True)


def _session(peer_factory: Any, created: Peer) -> VaultSession:
    session = VaultSession(str(created.path))
    peer_factory.sessions.append(session)
    return session


def test_replies_and_the_kernel_greeting(peer: Any) -> None:
    session = _session(peer, peer(lambda header: {"ok": True, "echo": header["op"]}))
    first, _ = session.request({"op": "audit"})
    second, _ = session.request({"op": "audit"})
    assert first["echo"] == "audit" and first["ok"] is True
    assert second["id"] == first["id"] + 1  # every request has an id of its own, and its reply names it
    assert session.kernel() == {"tee": "x"}


def test_a_peer_speaking_another_protocol_is_refused(peer: Any) -> None:
    session = _session(peer, peer(lambda header: {"ok": True}, protocol="other/9"))
    with pytest.raises(ProtocolError, match="does not speak confnb-vault/1"):
        session.request({"op": "audit"})


def test_error_replies_become_the_vault_exceptions(peer: Any) -> None:
    violation = PolicyViolation("release.max_rows", ["claims"], "the result has more than 5 rows")
    session = _session(peer, peer(lambda header: error_reply(violation)))
    with pytest.raises(cn.PolicyViolation) as caught:
        session.request({"op": "release", "plan": {}})
    assert caught.value.rule == "release.max_rows" and caught.value.datasets == ("claims",)
    assert str(caught.value) == str(violation)


def test_a_broken_stream_is_reported_and_the_next_request_reconnects(peer: Any) -> None:
    calls: list[str] = []

    def flaky(header: dict[str, Any]) -> dict[str, Any] | None:
        calls.append(header["op"])
        return None if len(calls) == 1 else {"ok": True}

    created = peer(flaky)
    session = _session(peer, created)
    with pytest.raises(cn.VaultError, match="connection to the vault broke during 'release'"):
        session.request({"op": "release", "plan": {}})
    assert session.request({"op": "audit"})[0]["ok"] is True
    assert calls == ["release", "audit"]


def test_an_absent_vault_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(cn.VaultError, match=r"cannot reach the vault at .*is the kernel still running"):
        VaultSession(str(tmp_path / "missing.sock")).request({"op": "audit"})


def test_the_session_follows_the_socket_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONFNB_VAULT_SOCKET", str(tmp_path / "a.sock"))
    first = current_session()
    assert current_session() is first
    monkeypatch.setenv("CONFNB_VAULT_SOCKET", str(tmp_path / "b.sock"))
    assert current_session() is not first and current_session().path == str(tmp_path / "b.sock")
    monkeypatch.delenv("CONFNB_VAULT_SOCKET")
    with pytest.raises(cn.NotInKernelError, match="not inside a confidential kernel: CONFNB_VAULT_SOCKET is not set"):
        current_session()


# -- request ids, interrupts, a vault that dies -------------------------------------------------------------------


class Scripted:
    """A peer that plays ``script`` (a function of this peer) in a thread: the test says each frame it exchanges."""

    def __init__(self, path: Path, script: Callable[[Scripted], None]) -> None:
        self.path = path
        self.log: list[Any] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.failure: BaseException | None = None
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._play, args=(script,), daemon=True)
        self.thread.start()

    def _play(self, script: Callable[[Scripted], None]) -> None:
        try:
            script(self)
        except BaseException as exc:  # reported by finish(), in the test's thread
            self.failure = exc

    def accept(self) -> socket.socket:
        """The next connection, greeted."""
        connection, _ = self.listener.accept()
        self.connections.append(connection)
        connection.settimeout(20)
        hello, _ = recv_message(connection)
        assert hello["op"] == "hello"
        send_message(connection, {"ok": True, "protocol": PROTOCOL, "kernel": {}, "id": hello["id"]})
        return connection

    def finish(self) -> None:
        self.thread.join(20)
        self.listener.close()
        for connection in self.connections:
            connection.close()
        if self.failure is not None:
            raise self.failure


@pytest.fixture
def scripted() -> Iterator[Callable[[Callable[[Scripted], None]], tuple[Scripted, VaultSession]]]:
    directory = Path(tempfile.mkdtemp(prefix="cnb-"))
    made: list[tuple[Scripted, VaultSession]] = []

    def make(script: Callable[[Scripted], None]) -> tuple[Scripted, VaultSession]:
        created = Scripted(directory / f"s{len(made)}.sock", script)
        session = VaultSession(str(created.path))
        made.append((created, session))
        return created, session

    try:
        yield make
    finally:
        for created, session in made:
            session.close()
            created.thread.join(20)
            created.listener.close()
            for connection in created.connections:
                connection.close()
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def interrupt_after(seconds: float) -> Iterator[None]:
    """A real KeyboardInterrupt in this (the main) thread after ``seconds``, as the analyst's interrupt arrives."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_reply_to_an_abandoned_request_is_never_taken_for_the_next(scripted: Any) -> None:
    """The reported failure: the mean finished as the analyst interrupted it, and the next cell's count got it."""

    def vault(peer: Scripted) -> None:
        connection = peer.accept()
        mean, _ = recv_message(connection)  # not answered until the interrupt
        cancel, _ = recv_message(connection)
        peer.log.append((mean["id"], cancel))
        send_message(connection, {"ok": True, "id": mean["id"], "value": 56.54})  # finished before the cancel
        count, _ = recv_message(connection)
        send_message(connection, {"ok": True, "id": count["id"], "value": 2000})
        assert recv_message(connection)[0]["op"] == "audit"
        send_message(connection, {"ok": True, "id": count["id"] + 1, "value": "audit"})

    peer, session = scripted(vault)
    with pytest.raises(KeyboardInterrupt), interrupt_after(0.6):
        session.request({"op": "release", "plan": {"mean": "age"}})
    assert session.request({"op": "release", "plan": {"count": "age"}})[0]["value"] == 2000
    assert session.request({"op": "audit"})[0]["value"] == "audit"
    peer.finish()
    ((mean_id, cancel),) = peer.log
    assert cancel == {"op": "cancel", "id": mean_id}  # the vault was told to stop, on the same connection


def test_the_vaults_cancelled_reply_is_discarded_too(scripted: Any) -> None:
    def vault(peer: Scripted) -> None:
        connection = peer.accept()
        first, _ = recv_message(connection)
        recv_message(connection)  # the cancel
        second, _ = recv_message(connection)  # the next request arrives before the vault has stopped
        send_message(connection, {**error_reply(Cancelled()), "id": first["id"]})
        send_message(connection, {"ok": True, "id": second["id"], "value": 1})

    peer, session = scripted(vault)
    with pytest.raises(KeyboardInterrupt), interrupt_after(0.6):
        session.request({"op": "fit"})
    assert session.request({"op": "release"})[0]["value"] == 1
    peer.finish()


def test_an_interrupt_inside_a_frame_drops_the_connection_and_the_next_request_reconnects(scripted: Any) -> None:
    def vault(peer: Scripted) -> None:
        connection = peer.accept()
        recv_message(connection)
        connection.sendall(b'\x00\x00\x00\x40{"ok": tr')  # half a reply, then nothing
        peer.log.append(recv_message_or_eof(connection))
        again = peer.accept()
        request, _ = recv_message(again)
        send_message(again, {"ok": True, "id": request["id"], "value": 42})

    peer, session = scripted(vault)
    with pytest.raises(KeyboardInterrupt), interrupt_after(0.6):
        session.request({"op": "release"})
    assert session.request({"op": "release"})[0]["value"] == 42
    peer.finish()
    assert peer.log == ["eof"]  # the out-of-step stream was closed (which cancels in the vault), not reused


def recv_message_or_eof(connection: socket.socket) -> object:
    try:
        return recv_message(connection)
    except EOFError:
        return "eof"


def test_a_reply_naming_another_request_is_refused(scripted: Any) -> None:
    def vault(peer: Scripted) -> None:
        connection = peer.accept()
        request, _ = recv_message(connection)
        send_message(connection, {"ok": True, "id": request["id"] + 1, "value": 56.54})
        peer.log.append(recv_message_or_eof(connection))
        again = peer.accept()
        request, _ = recv_message(again)
        send_message(again, {"ok": True, "id": request["id"], "value": 2000})

    peer, session = scripted(vault)
    with pytest.raises(ProtocolError, match=r"a reply names request \d+, not the request \d+ waiting for it"):
        session.request({"op": "release"})
    assert session.request({"op": "release"})[0]["value"] == 2000
    peer.finish()
    assert peer.log == ["eof"]


def test_a_reply_without_an_id_is_refused(scripted: Any) -> None:
    peer, session = scripted(_answer_without_id)
    with pytest.raises(ProtocolError, match="a reply names request None"):
        session.request({"op": "release"})
    peer.finish()


def _answer_without_id(peer: Scripted) -> None:
    connection = peer.accept()
    recv_message(connection)
    send_message(connection, {"ok": True, "value": 1})
    recv_message_or_eof(connection)


def test_a_vault_that_died_is_reported_with_the_reason_the_launcher_recorded(scripted: Any) -> None:
    def vault(peer: Scripted) -> None:
        connection = peer.accept()
        recv_message(connection)
        peer.listener.close()  # the process is gone: nothing listens, and the launcher says why
        peer.path.with_name(EXIT_STATUS_FILE).write_text(describe_exit(-signal.SIGKILL) + "\n")
        connection.close()

    peer, session = scripted(vault)
    stopped = "the vault stopped: it was killed by SIGKILL (out of memory, or stopped from outside); restart the kernel"
    started = time.monotonic()
    with pytest.raises(cn.VaultError) as caught:
        session.request({"op": "fit"})
    assert str(caught.value) == stopped
    assert time.monotonic() - started < 5
    with pytest.raises(cn.VaultError) as again:  # every later request says the same
        session.request({"op": "release"})
    assert str(again.value) == stopped
    peer.finish()


def test_a_vault_gone_without_a_recorded_reason_is_still_reported(scripted: Any) -> None:
    def vault(peer: Scripted) -> None:
        connection = peer.accept()
        recv_message(connection)
        peer.listener.close()
        connection.close()

    peer, session = scripted(vault)
    with pytest.raises(
        cn.VaultError,
        match=r"^the vault stopped: it closed its connection during 'fit' and no longer"
        r" answers; restart the kernel$",
    ):
        session.request({"op": "fit"})
    peer.finish()


@pytest.mark.parametrize(
    ("returncode", "reason"),
    [
        (-signal.SIGKILL, "it was killed by SIGKILL (out of memory, or stopped from outside)"),
        (-signal.SIGSEGV, "it was killed by SIGSEGV"),
        (1, "it exited with status 1"),
    ],
)
def test_exit_reasons_read_plainly(returncode: int, reason: str) -> None:
    assert describe_exit(returncode) == reason
