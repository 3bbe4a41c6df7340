"""The executor's connection to the vault, against scripted peers: greeting, errors, broken streams, reconnects."""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import confnb.analyst as cn
from confnb.analyst.errors import ProtocolError
from confnb.analyst.session import VaultSession, current_session
from kernel_enclave.vault.protocol import PROTOCOL, PolicyViolation, error_reply, recv_message, send_message

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
    assert session.request({"op": "audit"})[0] == {"ok": True, "echo": "audit"}
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
    assert session.request({"op": "audit"})[0] == {"ok": True}
    assert created.connections == 2 and calls == ["release", "audit"]


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
