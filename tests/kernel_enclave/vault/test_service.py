"""The vault's socket answers the executor's user only, and keeps answering whatever a client sends it."""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa  # type: ignore[import-untyped]
import pytest

from confnb.policy.output import OutputPolicy
from kernel_enclave.tee.simulated import SimulatedBackend
from kernel_enclave.vault.keys import VaultKeys
from kernel_enclave.vault.protocol import PROTOCOL, recv_message, send_message
from kernel_enclave.vault.service import VaultServer
from kernel_enclave.vault.vault import Vault

POLICY = OutputPolicy(id="service-test", allow=frozenset({"schema", "row_count"}))


def _vault(backend: SimulatedBackend) -> Vault:
    vault = Vault(backend=backend, keys=VaultKeys.generate())
    vault.add_table("numbers", pa.table({"x": list(range(50))}), POLICY)
    return vault


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Short and traversable for another user: a Unix socket path has a 108-byte limit, tmp_path can be deeper.
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="confnb-vault-test-"))
    directory.chmod(0o711)
    yield directory
    for child in directory.iterdir():
        child.unlink()
    directory.rmdir()


def _ask(path: Path, header: dict[str, object]) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(path))
        send_message(client, header)
        return recv_message(client)[0]


def test_the_allowed_user_gets_answers(simulated_backend: SimulatedBackend, socket_dir: Path) -> None:
    server = VaultServer(_vault(simulated_backend), socket_dir / "vault.sock")
    server.start()
    try:
        reply = _ask(socket_dir / "vault.sock", {"op": "hello"})
        assert reply["ok"] is True
        assert reply["protocol"] == PROTOCOL
        count = _ask(
            socket_dir / "vault.sock",
            {"op": "release", "plan": {"node": "count", "input": {"node": "source", "handle": "d1"}}},
        )
        assert count["value"] == 50
        opened = _ask(socket_dir / "vault.sock", {"op": "open", "source": "numbers"})
        assert (opened["handle"], opened["datasets"]) == ("d1", ["numbers"])  # uploaded tables open by id
        unknown = _ask(socket_dir / "vault.sock", {"op": "__import__"})
        assert unknown["ok"] is False
        assert "unknown vault operation" in str(unknown["error"])
    finally:
        server.close()
    assert not (socket_dir / "vault.sock").exists()


def test_a_connection_from_another_user_is_closed_unanswered(
    simulated_backend: SimulatedBackend, socket_dir: Path
) -> None:
    """Even when the socket file is reachable, SO_PEERCRED decides; here the allowed user is someone else."""
    server = VaultServer(_vault(simulated_backend), socket_dir / "vault.sock", allowed_uid=os.getuid() + 4242)
    server.start()
    try:
        with pytest.raises((EOFError, ConnectionError)):
            _ask(socket_dir / "vault.sock", {"op": "hello"})
    finally:
        server.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as the executor's unprivileged user")
def test_only_the_executors_user_can_connect(simulated_backend: SimulatedBackend, socket_dir: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    path = socket_dir / "vault.sock"
    server = VaultServer(_vault(simulated_backend), path, allowed_uid=nobody.pw_uid, owner_uid=nobody.pw_uid)
    server.start()
    probe = (
        "import socket, sys\n"
        "from kernel_enclave.vault.protocol import recv_message, send_message\n"
        "c = socket.socket(socket.AF_UNIX); c.connect(sys.argv[1]); send_message(c, {'op': 'hello'})\n"
        "print(recv_message(c)[0]['ok'])\n"
    )
    try:
        as_nobody = subprocess.run(
            [sys.executable, "-c", probe, str(path)],
            user=nobody.pw_uid,
            group=nobody.pw_gid,
            extra_groups=[],
            capture_output=True,
            text=True,
            check=False,
            cwd="/",
        )
        assert as_nobody.stdout.strip() == "True", as_nobody.stderr
        with pytest.raises((EOFError, ConnectionError)):  # root itself is not the executor
            _ask(path, {"op": "hello"})
    finally:
        server.close()
