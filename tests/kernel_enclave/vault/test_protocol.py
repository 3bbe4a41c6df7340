"""The executor ↔ vault wire: frames round-trip, and a hostile peer's malformed frames are refused, not trusted."""

from __future__ import annotations

import pickle
import socket
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_enclave.vault.protocol import (
    MAX_BUFFERS,
    MAX_HEADER_BYTES,
    MAX_REQUEST_ID,
    Cancelled,
    PolicyViolation,
    ProtocolError,
    VaultError,
    error_from_dict,
    error_reply,
    recv_message,
    request_id,
    send_message,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    yield left, right
    left.close()
    right.close()


@settings(max_examples=60, deadline=None)
@given(header=st.dictionaries(st.text(max_size=10), json_values, max_size=6), buffers=st.lists(st.binary(), max_size=4))
def test_messages_round_trip(header: dict[str, object], buffers: list[bytes]) -> None:
    left, right = socket.socketpair()
    with left, right:
        send_message(left, header, buffers)
        assert recv_message(right) == (header, buffers)


def test_a_closed_peer_is_end_of_stream(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    send_message(left, {"op": "hello"})
    left.close()
    assert recv_message(right)[0] == {"op": "hello"}
    with pytest.raises(EOFError):
        recv_message(right)


def test_a_truncated_frame_is_end_of_stream(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    left.sendall(struct.pack(">I", 100) + b'{"op"')
    left.close()
    with pytest.raises(EOFError):
        recv_message(right)


@pytest.mark.parametrize(
    ("frame", "problem"),
    [
        (struct.pack(">I", MAX_HEADER_BYTES + 1), "header is at most"),
        (struct.pack(">I", 3) + b"{{{", "not JSON"),
        (struct.pack(">I", 3) + b"NaN", "not JSON"),
        (struct.pack(">I", 2) + b"[]", "not a JSON object"),
        (struct.pack(">I", 2) + b"{}" + struct.pack(">I", MAX_BUFFERS + 1), "at most 16 buffers"),
        (struct.pack(">I", 2) + b"{}" + struct.pack(">I", 1) + struct.pack(">Q", 2**40), "buffer is at most"),
        (struct.pack(">I", 2) + b"\xff\xfe", "not JSON"),
        (struct.pack(">I", 200_000) + b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
def test_malformed_frames_are_protocol_errors(
    pair: tuple[socket.socket, socket.socket], frame: bytes, problem: str
) -> None:
    left, right = pair
    left.sendall(frame)
    with pytest.raises(ProtocolError, match=problem):
        recv_message(right)


def test_policy_violations_cross_the_wire_with_rule_and_datasets() -> None:
    violation = PolicyViolation("release.min_group_size", ["patients"], "a group has fewer than 10 records")
    received = error_from_dict(error_reply(violation)["error"])
    assert isinstance(received, PolicyViolation)
    assert received.rule == "release.min_group_size"
    assert received.datasets == ("patients",)
    assert str(received) == str(violation)
    assert "rule release.min_group_size of 'patients'" in str(received)


def test_other_errors_stay_plain_vault_errors() -> None:
    received = error_from_dict(error_reply(VaultError("no column 'x'"))["error"])
    assert type(received) is VaultError
    assert str(received) == "no column 'x'"
    assert isinstance(error_from_dict("garbage"), ProtocolError)


@pytest.mark.parametrize("good", [None, 1, 42, MAX_REQUEST_ID])
def test_request_ids_are_positive_integers_or_absent(good: int | None) -> None:
    header = {"op": "release"} if good is None else {"op": "release", "id": good}
    assert request_id(header) == good


@pytest.mark.parametrize("bad", [0, -3, MAX_REQUEST_ID + 1, True, 1.0, "1", [1]])
def test_other_request_ids_are_protocol_errors(bad: object) -> None:
    with pytest.raises(ProtocolError, match="a request id is an integer from 1 to"):
        request_id({"op": "release", "id": bad})


def test_a_cancelled_request_crosses_the_wire_as_cancelled() -> None:
    received = error_from_dict(error_reply(Cancelled())["error"])
    assert isinstance(received, Cancelled)
    assert str(received) == "cancelled: the request was interrupted"


def test_a_policy_violation_survives_the_way_back_from_a_vault_worker() -> None:
    """Workers return the vault's own refusals by pickle; the rule and datasets must arrive intact."""
    violation = PolicyViolation("release.max_rows", ["claims", "patients"], "the result has more than 20 rows")
    back = pickle.loads(pickle.dumps(violation))
    assert isinstance(back, PolicyViolation)
    assert (back.rule, back.datasets, str(back)) == (violation.rule, violation.datasets, str(violation))
