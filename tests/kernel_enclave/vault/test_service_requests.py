"""Requests carry ids, and a cancel stops the vault's work: a real vault behind its real socket, real worker processes.

The client here is the wire itself (frames on a Unix socket), so each test says exactly what the executor sent and
checks exactly what came back: every reply names the request it answers; a ``cancel`` (or the connection closing)
kills the running computation's worker process within moments, the request is answered as cancelled and recorded
so, and what was queued behind it is answered in order, correctly.
"""

from __future__ import annotations

import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped]
import pytest
from sklearn.ensemble import RandomForestRegressor  # type: ignore[import-untyped]

from confnb.analyst.estimators import encode_estimator
from confnb.policy.output import OutputPolicy
from kernel_enclave.tee.simulated import SimulatedBackend
from kernel_enclave.vault.keys import VaultKeys
from kernel_enclave.vault.protocol import recv_message, send_message
from kernel_enclave.vault.service import VaultServer
from kernel_enclave.vault.vault import Vault

ROWS = 4000
POLICY = OutputPolicy(
    id="requests-test",
    allow=frozenset({"schema", "row_count", "aggregate", "model_metrics"}),
    min_group_size=10,
)
SOURCE = {"node": "source", "handle": "d1"}
COUNT = {"op": "release", "plan": {"node": "count", "input": SOURCE}}
# Minutes of training uninterrupted: long enough that only a cancel can end it within the tests' bounds.
LONG_FIT = {
    "op": "fit",
    "plan": SOURCE,
    "estimator": encode_estimator(RandomForestRegressor(n_estimators=50_000, random_state=0)),
    "target": "y",
    "features": ["x"],
    "test_size": None,
    "random_state": None,
}
PROMPT_S = 5.0


def _workers() -> list[int]:
    """This process's live forks (same command line): the vault, in this process, forks its workers from here."""
    ours = Path("/proc/self/cmdline").read_bytes()
    found: list[int] = []
    for task in Path("/proc/self/task").glob("*"):
        try:
            found += [int(pid) for pid in (task / "children").read_text().split()]
        except OSError:
            continue  # a thread that has just ended
    live = []
    for pid in found:
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes() == ours and " Z " not in Path(f"/proc/{pid}/stat").read_text():
                live.append(pid)
        except OSError:
            continue
    return live


def _wait(condition: Any, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - started


@pytest.fixture
def served(simulated_backend: SimulatedBackend) -> Iterator[tuple[Vault, Path]]:
    directory = Path(tempfile.mkdtemp(prefix="confnb-req-"))
    vault = Vault(backend=simulated_backend, keys=VaultKeys.generate(), audit_path=directory / "audit.jsonl")
    vault.add_table("numbers", pa.table({"x": [float(i % 97) for i in range(ROWS)], "y": list(range(ROWS))}), POLICY)
    server = VaultServer(vault, directory / "vault.sock")
    server.start()
    try:
        yield vault, directory / "vault.sock"
    finally:
        server.close()
        for child in directory.iterdir():
            child.unlink()
        directory.rmdir()
    assert not _workers()


def _connect(path: Path) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(path))
    client.settimeout(30)
    return client


def _events(vault: Vault) -> list[tuple[str, Any]]:
    return [(entry["event"], entry["fields"].get("op")) for entry in vault.audit.entries()]


def test_every_reply_names_the_request_it_answers(served: tuple[Vault, Path]) -> None:
    _, path = served
    with _connect(path) as client:
        for rid in (7, 8, 9_007_199_254_740_991):
            send_message(client, {**COUNT, "id": rid})
            reply, _ = recv_message(client)
            assert (reply["id"], reply["value"]) == (rid, ROWS)
        send_message(client, COUNT)  # a request without an id (the relay's upload socket speaks so) gets none back
        reply, _ = recv_message(client)
        assert "id" not in reply and reply["value"] == ROWS


def test_a_cancel_stops_a_fit_and_the_next_request_is_answered_at_once(served: tuple[Vault, Path]) -> None:
    vault, path = served
    with _connect(path) as client:
        send_message(client, {**LONG_FIT, "id": 1})
        _wait(_workers, 30, "the fit's worker process")
        worker = _workers()[0]
        time.sleep(0.3)
        send_message(client, {"op": "cancel", "id": 1})
        send_message(client, {**COUNT, "id": 2})
        started = time.monotonic()
        cancelled, _ = recv_message(client)
        counted, _ = recv_message(client)
        assert time.monotonic() - started < PROMPT_S
    assert cancelled["id"] == 1 and cancelled["ok"] is False
    assert cancelled["error"]["type"] == "Cancelled"
    assert (counted["id"], counted["ok"], counted["value"]) == (2, True, ROWS)
    _wait(lambda: worker not in _workers(), PROMPT_S, "the worker to be killed")
    events = _events(vault)
    assert ("cancelled", "fit") in events and not [e for e in events if e[0] == "fit"]


def test_the_legitimate_twin_a_fit_nobody_cancels_completes(served: tuple[Vault, Path]) -> None:
    vault, path = served
    quick = {**LONG_FIT, "estimator": encode_estimator(RandomForestRegressor(n_estimators=5, random_state=0))}
    with _connect(path) as client:
        send_message(client, {**quick, "id": 1})
        reply, _ = recv_message(client)
    assert reply["ok"] is True and reply["id"] == 1 and reply["model"].startswith("m")
    assert ("fit", None) in _events(vault)


def test_closing_the_connection_cancels_its_work(served: tuple[Vault, Path]) -> None:
    vault, path = served
    client = _connect(path)
    send_message(client, {**LONG_FIT, "id": 1})
    _wait(_workers, 30, "the fit's worker process")
    client.close()
    assert _wait(lambda: not _workers(), PROMPT_S, "the worker to be killed") < PROMPT_S
    with _connect(path) as again:
        send_message(again, {**COUNT, "id": 1})  # ids belong to a connection: a new one may start over
        reply, _ = recv_message(again)
    assert reply["value"] == ROWS
    assert ("cancelled", "fit") in _events(vault)


def test_a_queued_request_can_be_cancelled_before_it_starts(served: tuple[Vault, Path]) -> None:
    _, path = served
    with _connect(path) as client:
        send_message(client, {**LONG_FIT, "id": 1})
        send_message(client, {**COUNT, "id": 2})
        _wait(_workers, 30, "the fit's worker process")
        send_message(client, {"op": "cancel", "id": 2})
        send_message(client, {"op": "cancel", "id": 1})
        send_message(client, {"op": "cancel", "id": 99})  # nothing open under that id: ignored
        send_message(client, {**COUNT, "id": 3})
        replies = [recv_message(client)[0] for _ in range(3)]
    assert [reply["id"] for reply in replies] == [1, 2, 3]
    assert [reply["ok"] for reply in replies] == [False, False, True]
    assert replies[1]["error"] == {"type": "Cancelled", "message": "cancelled before it started"}
    assert replies[2]["value"] == ROWS


@pytest.mark.parametrize("bad", ["7", 0, -1, True, 2**53, 1.5])
def test_a_malformed_id_is_a_protocol_error_and_ends_the_connection(served: tuple[Vault, Path], bad: object) -> None:
    _, path = served
    with _connect(path) as client:
        send_message(client, {**COUNT, "id": bad})
        reply, _ = recv_message(client)
        assert reply["ok"] is False and reply["error"]["type"] == "ProtocolError"
        assert "request id" in reply["error"]["message"]
        with pytest.raises(EOFError):
            recv_message(client)


def test_an_id_already_open_is_refused_and_its_work_cancelled(served: tuple[Vault, Path]) -> None:
    vault, path = served
    with _connect(path) as client:
        send_message(client, {**LONG_FIT, "id": 4})
        _wait(_workers, 30, "the fit's worker process")
        send_message(client, {**COUNT, "id": 4})
        replies = [recv_message(client)[0] for _ in range(2)]
    refusal = next(reply for reply in replies if "id" not in reply)
    assert refusal["error"]["type"] == "ProtocolError" and "already in use" in refusal["error"]["message"]
    assert _wait(lambda: not _workers(), PROMPT_S, "the worker to be killed") < PROMPT_S
    assert ("cancelled", "fit") in _events(vault)


def test_another_connection_waits_only_until_the_cancel(served: tuple[Vault, Path]) -> None:
    """The vault answers one request at a time: a cancelled fit must give the vault back at once, to everyone."""
    _, path = served
    with _connect(path) as fitting, _connect(path) as other:
        send_message(fitting, {**LONG_FIT, "id": 1})
        _wait(_workers, 30, "the fit's worker process")
        send_message(other, {**COUNT, "id": 1})
        send_message(other, {"op": "cancel", "id": 1})  # given up while it waits for its turn: it never starts
        send_message(other, {**COUNT, "id": 2})
        time.sleep(0.5)
        send_message(fitting, {"op": "cancel", "id": 1})
        started = time.monotonic()
        waited, _ = recv_message(other)
        counted, _ = recv_message(other)
        assert time.monotonic() - started < PROMPT_S
        assert recv_message(fitting)[0]["error"]["type"] == "Cancelled"
    assert waited["id"] == 1 and waited["error"]["type"] == "Cancelled"
    assert (counted["id"], counted["value"]) == (2, ROWS)
