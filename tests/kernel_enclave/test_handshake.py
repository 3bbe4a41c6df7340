"""The launch handshake's formats: round trips, and nothing but HandshakeError on anything a host could send."""

from __future__ import annotations

import base64
import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel_enclave.handshake import (
    CHANNELS,
    HandshakeError,
    LaunchRequest,
    LaunchResponse,
    LaunchSecrets,
    error_line,
    launch_error,
    secrets_info,
)

PORTS = {channel: 40000 + index for index, channel in enumerate(CHANNELS)}


def test_request_round_trip() -> None:
    request = LaunchRequest(
        nonce=os.urandom(32),
        response_public_key=b"\x04" + os.urandom(64),
        env={"CONFNB_BROKER_URL": "http://x"},
        display={"mime": ["text/plain"]},
        tee="simulated",
    )
    assert LaunchRequest.from_line(request.to_line()) == request


def test_response_and_secrets_round_trip() -> None:
    response = LaunchResponse(evidence={"format": "x"}, ip="127.0.0.1", ports=PORTS, sealed_secrets=os.urandom(100))
    assert LaunchResponse.from_line(response.to_line()) == response
    secrets = LaunchSecrets(key=b"k" * 64, curve_publickey=b"p" * 40, curve_secretkey=b"s" * 40)
    assert LaunchSecrets.from_bytes(secrets.to_bytes()) == secrets


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"nonce": "zz"}, "nonce"),
        ({"nonce": ""}, "nonce"),
        ({"nonce": "00" * 65}, "nonce"),
        ({"response_public_key": "***"}, "response_public_key"),
        ({"ip": "a b"}, "ip"),
        ({"env": {"A B": "x"}}, "env"),
        ({"env": {"A": 1}}, "env"),
        ({"env": {"A": "nul\x00"}}, "env"),
        ({"display": []}, "display"),
        ({"format": "confnb-launch/0"}, "format"),
    ],
)
def test_bad_requests_name_the_field(change: dict[str, object], field: str) -> None:
    document = {"format": "confnb-launch/1", "nonce": "00" * 8, "response_public_key": base64.b64encode(b"k").decode()}
    document.update(change)
    with pytest.raises(HandshakeError, match=field):
        LaunchRequest.from_line(json.dumps(document).encode())


@pytest.mark.parametrize(
    "change",
    [
        {"ports": {**PORTS, "hb": 0}},
        {"ports": {**PORTS, "hb": True}},
        {"ports": {k: v for k, v in PORTS.items() if k != "hb"}},
        {"transport": "ipc"},
        {"signature_scheme": "hmac-md5"},
        {"sealed_secrets": "!"},
        {"evidence": "x"},
    ],
)
def test_bad_responses_are_refused(change: dict[str, object]) -> None:
    document = json.loads(LaunchResponse(evidence={}, ip="127.0.0.1", ports=PORTS, sealed_secrets=b"s").to_line())
    document.update(change)
    with pytest.raises(HandshakeError):
        LaunchResponse.from_line(json.dumps(document).encode())


@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_ever_raise_handshake_error(data: bytes) -> None:
    for parse in (LaunchRequest.from_line, LaunchResponse.from_line, LaunchSecrets.from_bytes):
        try:
            parse(data)
        except HandshakeError:
            pass


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
        max_leaves=20,
    )
)
def test_arbitrary_json_only_ever_raises_handshake_error(value: object) -> None:
    for fmt in ("confnb-launch/1", "confnb-launch-response/1", "confnb-launch-secrets/1"):
        document = {"format": fmt, "nonce": value, "response_public_key": value, "ip": value, "env": value}
        document.update({"ports": value, "evidence": value, "sealed_secrets": value, "key": value, "display": value})
        line = json.dumps(document).encode()
        for parse in (LaunchRequest.from_line, LaunchResponse.from_line, LaunchSecrets.from_bytes):
            try:
                parse(line)
            except HandshakeError:
                pass


def test_error_lines_are_one_line_and_recognised() -> None:
    line = error_line("the executor exited\nwith status 1")
    assert line.count(b"\n") == 1
    assert launch_error(line) == "the executor exited with status 1"
    assert launch_error(b"not json") is None


def test_secrets_are_bound_to_the_exact_claims() -> None:
    claims = {"nonce": "00", "curve_public_key": "a" * 40}
    assert secrets_info(claims) != secrets_info({**claims, "curve_public_key": "b" * 40})
