"""The executor ↔ vault wire: frames round-trip, and a hostile peer's malformed frames are refused, not trusted."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_enclave.vault.protocol import (
    MAX_BUFFERS,
    MAX_HEADER_BYTES,
    PolicyViolation,
    ProtocolError,
    VaultError,
    error_from_dict,
    error_reply,
    recv_message,
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
