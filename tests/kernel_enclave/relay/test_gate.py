"""The gate lets ordinary output through untouched and withholds, rewrites or refuses everything else, never raising.

The executor is treated as hostile throughout: messages here are forged, malformed, oversized or of types it has no
business sending, and every withheld part carries a canary that must not reach the client in any form.
"""

from __future__ import annotations

import ast
import copy
import json
import re
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kernel_enclave.relay import gate as gate_module
from kernel_enclave.relay.display import DEFAULT_MIME, DisplayPolicy
from kernel_enclave.relay.gate import ALLOWED_TYPES, REMEMBERED_REQUESTS, RULES, MessageGate

Message = dict[str, Any]
SESSION = uuid.uuid4().hex
CANARY = "CANARY-7f3a9e"  # any withheld part in these tests carries it; it must never come out
PARTLY_SHOWN = "[confnb] output withheld by the display policy (display.mime): some of its MIME types are not allowed\n"
NOTICE = re.compile(r"^\[confnb\] output withheld by the display policy \(([a-z_.]+)\): [^\n]+\n$")

# The traceback IPython 9 makes for `x = 1 / def f(): raise ValueError('SECRET') / f()`, colours and all.
IPYTHON_TRACEBACK = [
    "\x1b[31m---------------------------------------------------------------------------\x1b[39m",
    "\x1b[31mValueError\x1b[39m                                Traceback (most recent call last)",
    "\x1b[36mCell\x1b[39m\x1b[36m \x1b[39m\x1b[32mIn[1]\x1b[39m\x1b[32m, line 4\x1b[39m\n\x1b[32m      2\x1b[39m "
    "\x1b[38;5;28;01mdef\x1b[39;00m\x1b[38;5;250m \x1b[39m\x1b[34mf\x1b[39m():\n\x1b[32m      3\x1b[39m     "
    "\x1b[38;5;28;01mraise\x1b[39;00m \x1b[38;5;167;01mValueError\x1b[39;00m(\x1b[33m'\x1b[39m\x1b[33m"
    f"{CANARY}\x1b[39m\x1b[33m'\x1b[39m)\n\x1b[32m----> \x1b[39m\x1b[32m4\x1b[39m \x1b[30;43mf\x1b[39;49m\n",
    "\x1b[36mCell\x1b[39m\x1b[36m \x1b[39m\x1b[32mIn[1]\x1b[39m\x1b[32m, line 3\x1b[39m, in \x1b[36mf\x1b[39m\n"
    f"\x1b[32m----> \x1b[39m\x1b[32m3\x1b[39m     raise ValueError('{CANARY}')\n",
    f"\x1b[31mValueError\x1b[39m: {CANARY}",
]
SYNTAX_TRACEBACK = [
    "  \x1b[36mCell\x1b[39m\x1b[36m \x1b[39m\x1b[32mIn[7]\x1b[39m\x1b[32m, line 12\x1b[39m\n\x1b[31m    \x1b[39m"
    f"\x1b[31m{CANARY}/\x1b[39m\n      ^\n\x1b[31mSyntaxError\x1b[39m\x1b[31m:\x1b[39m invalid syntax\n"
]

# A well-formed example of every message the gate allows, as ipykernel 7 produces it.
IOPUB_SAMPLES: dict[str, dict[str, Any]] = {
    "status": {"execution_state": "busy"},
    "execute_input": {"code": "x = 1", "execution_count": 1},
    "stream": {"name": "stdout", "text": "hello\n"},
    "display_data": {
        "data": {"text/plain": "<Figure>", "image/png": "iVBORw0KGgo="},
        "metadata": {"image/png": {"width": 10, "height": 10}},
        "transient": {},
    },
    "update_display_data": {"data": {"text/plain": "y"}, "metadata": {}, "transient": {"display_id": "d1"}},
    "execute_result": {"execution_count": 1, "data": {"text/plain": "42", "text/html": "<b>42</b>"}, "metadata": {}},
    "clear_output": {"wait": False},
    "error": {"ename": "ValueError", "evalue": "bad value", "traceback": ["ValueError: bad value"]},
    "comm_open": {"comm_id": "c1", "target_name": "jupyter.widget", "data": {"state": {}}, "target_module": None},
    "comm_msg": {"comm_id": "c1", "data": {"method": "update", "state": {"value": 3}}},
    "comm_close": {"comm_id": "c1", "data": {}},
    "shutdown_reply": {"status": "ok", "restart": False},
}
REPLY_SAMPLES: dict[str, dict[str, Any]] = {
    "execute_reply": {"status": "ok", "execution_count": 1, "user_expressions": {}, "payload": []},
    "kernel_info_reply": {
        "status": "ok",
        "protocol_version": "5.3",
        "implementation": "ipython",
        "implementation_version": "9.0.0",
        "language_info": {"name": "python", "version": "3.11.7", "file_extension": ".py"},
        "banner": "Python 3.11.7",
        "help_links": [{"text": "Python Reference", "url": "https://docs.python.org/3.11"}],
        "supported_features": ["kernel subshells", "confnb-attestation"],
    },
    "complete_reply": {"status": "ok", "matches": ["zip"], "cursor_start": 0, "cursor_end": 2, "metadata": {}},
    "inspect_reply": {"status": "ok", "found": True, "data": {"text/plain": "zip(*iterables)"}, "metadata": {}},
    "history_reply": {"status": "ok", "history": [[1, 1, "x = 1"], [1, 2, "6*7"]]},
    "is_complete_reply": {"status": "incomplete", "indent": "    "},
    "comm_info_reply": {"status": "ok", "comms": {"c1": {"target_name": "jupyter.widget"}}},
    "interrupt_reply": {"status": "ok"},
    "shutdown_reply": {"status": "ok", "restart": True},
    "usage_reply": {"hostname": "cvm", "pid": 12, "kernel_cpu": 0.5, "kernel_memory": 1024, "cpu_count": 2},
    "create_subshell_reply": {"status": "ok", "subshell_id": "s1"},
    "list_subshell_reply": {"status": "ok", "subshell_id": ["s1"]},
    "delete_subshell_reply": {"status": "ok"},
}
STDIN_SAMPLES: dict[str, dict[str, Any]] = {"input_request": {"prompt": "name? ", "password": False}}
SAMPLES = {"iopub": IOPUB_SAMPLES, "shell": REPLY_SAMPLES, "control": REPLY_SAMPLES, "stdin": STDIN_SAMPLES}
ALL_TYPES = sorted(
    set(IOPUB_SAMPLES) | set(REPLY_SAMPLES) | set(STDIN_SAMPLES) | {"debug_reply", "debug_event", "iopub_welcome"}
)
OUTPUT_TYPES = ["stream", "display_data", "update_display_data", "execute_result", "error", "comm_open", "comm_msg"]


def new_header(msg_type: str) -> dict[str, Any]:
    return {
        "msg_id": uuid.uuid4().hex,
        "msg_type": msg_type,
        "username": "kernel",
        "session": SESSION,
        "date": datetime.now(UTC).isoformat(),
        "version": "5.3",
    }


def make_gate(**policy: Any) -> MessageGate:
    return MessageGate(DisplayPolicy(**policy), new_header)


def request(msg_type: str = "execute_request", content: dict[str, Any] | None = None) -> Message:
    header = new_header(msg_type)
    header["username"] = "analyst"
    return {"header": header, "parent_header": {}, "metadata": {}, "content": content or {}, "buffers": []}


def run_cell(gate: MessageGate, code: str = "x = 1", channel: str = "shell") -> Message:
    """The relay forwarding an execute_request: the gate remembers it."""
    sent = request("execute_request", {"code": code, "silent": False, "store_history": True})
    gate.observe_request(channel, sent)
    return sent


def message(
    msg_type: str,
    content: dict[str, Any],
    parent: Message | None = None,
    metadata: dict[str, Any] | None = None,
    buffers: list[Any] | None = None,
) -> Message:
    return {
        "header": new_header(msg_type),
        "parent_header": dict(parent["header"]) if parent else {},
        "metadata": metadata if metadata is not None else {},
        "content": content,
        "buffers": buffers if buffers is not None else [],
    }


def sample(channel: str, msg_type: str, parent: Message | None = None) -> Message:
    return message(msg_type, copy.deepcopy(SAMPLES[channel][msg_type]), parent)


def content_size(content: Any) -> int:
    """Written out here rather than imported: compact UTF-8 JSON, as the relay puts it on the wire."""
    return len(json.dumps(content, separators=(",", ":"), ensure_ascii=False).encode())


def notices(messages: list[Message]) -> list[str]:
    """The rules named by the notices among ``messages``."""
    found = []
    for sent in messages:
        if sent["header"]["msg_type"] == "stream" and sent["content"]["text"].startswith("[confnb]"):
            matched = NOTICE.match(sent["content"]["text"])
            assert matched, sent["content"]["text"]
            found.append(matched.group(1))
    return found


def assert_well_formed(messages: list[Message]) -> None:
    assert isinstance(messages, list)
    for sent in messages:
        assert isinstance(sent, dict)
        for part in ("header", "parent_header", "metadata", "content"):
            assert isinstance(sent[part], dict), part
        assert isinstance(sent["buffers"], list)
        assert isinstance(sent["header"].get("msg_type"), str)
        json.dumps({key: sent[key] for key in ("header", "parent_header", "metadata", "content")}, default=str)


def leaked(messages: list[Message], canary: str = CANARY) -> bool:
    return canary in json.dumps(messages, default=str)


def withheld_error_reply(messages: list[Message], msg_type: str, parent: Message, rule: str) -> None:
    """A withheld reply is still answered: one error reply of the same type, for the same request."""
    assert len(messages) == 1
    (reply,) = messages
    assert reply["header"]["msg_type"] == msg_type
    assert reply["parent_header"] == parent["header"]
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "OutputWithheld"
    assert rule in reply["content"]["evalue"]
    assert reply["buffers"] == []


# -- the module stays inside the enclave's trusted computing base ---------------------------------------------------


@pytest.mark.parametrize("module", ["gate", "display"])
def test_the_gate_imports_only_the_standard_library(module: str) -> None:
    source = Path(gate_module.__file__).with_name(f"{module}.py").read_text()
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    outside = {
        name
        for name in imported
        if name.split(".")[0] not in sys.stdlib_module_names and name != "kernel_enclave.relay.display"
    }
    assert not outside


# -- ordinary output passes untouched -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channel", "msg_type"),
    [(channel, msg_type) for channel, samples in SAMPLES.items() for msg_type in samples],
)
def test_ordinary_messages_pass_as_the_same_object(channel: str, msg_type: str) -> None:
    gate = make_gate()
    cell = run_cell(gate)
    sent = sample(channel, msg_type, cell)
    before = copy.deepcopy(sent)
    assert gate.filter(channel, sent) == [sent]
    assert gate.filter(channel, sent)[0] is sent  # the relay then forwards the executor's frames byte for byte
    assert sent == before
    assert gate.withheld == {}


def test_messages_from_session_deserialize_pass() -> None:
    """jupyter_client turns header dates into datetimes; the gate takes its messages as they are."""
    from jupyter_client.session import Session

    session = Session(key=b"k" * 32)
    gate = make_gate()
    cell = run_cell(gate)
    for msg_type, sample_content in IOPUB_SAMPLES.items():
        content = sample_content
        if msg_type == "execute_input":
            content = {"code": cell["content"]["code"], "execution_count": 1}
        built = session.msg(msg_type, content, parent=cell["header"])
        frames = session.serialize(built)
        received = session.deserialize(frames[frames.index(b"<IDS|MSG>") + 1 :])
        assert isinstance(received["header"]["date"], datetime)
        assert gate.filter("iopub", received) == [received], msg_type


def test_rewritten_messages_serialize_with_jupyter_client() -> None:
    from jupyter_client.session import Session

    session = Session(key=b"k" * 32)
    gate = make_gate(mime=frozenset({"text/plain"}), tracebacks="redacted")
    cell = run_cell(gate)
    for msg_type in ("display_data", "execute_result", "error"):
        built = session.msg(msg_type, copy.deepcopy(IOPUB_SAMPLES[msg_type]), parent=cell["header"])
        frames = session.serialize(built)
        received = session.deserialize(frames[frames.index(b"<IDS|MSG>") + 1 :])
        for approved in gate.filter("iopub", received):
            session.serialize(approved)


def test_iopub_welcome_from_the_executor_is_dropped_silently() -> None:
    gate = make_gate()
    assert gate.filter("iopub", message("iopub_welcome", {"subscription": ""})) == []
    assert gate.withheld == {}


# -- message types and channels -------------------------------------------------------------------------------------


def test_the_allowlists_are_as_documented() -> None:
    assert ALLOWED_TYPES["iopub"] == set(IOPUB_SAMPLES)
    assert ALLOWED_TYPES["shell"] == set(REPLY_SAMPLES) | {"debug_reply"}
    assert ALLOWED_TYPES["control"] == ALLOWED_TYPES["shell"]
    assert ALLOWED_TYPES["stdin"] == {"input_request"}
    assert set(RULES) == {
        "display.mime",
        "display.max_message_bytes",
        "display.max_output_bytes",
        "display.tracebacks",
        "debugger",
        "comms",
        "message_type",
        "malformed",
        "execute_input",
    }


def test_the_allowlists_cannot_be_changed_at_run_time() -> None:
    with pytest.raises(TypeError):
        ALLOWED_TYPES["iopub"] = frozenset({"debug_event"})  # type: ignore[index]
    with pytest.raises(AttributeError):
        ALLOWED_TYPES["iopub"].add("debug_event")  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("channel", "msg_type"),
    [
        (channel, msg_type)
        for channel in SAMPLES
        for msg_type in ALL_TYPES
        if msg_type not in ALLOWED_TYPES[channel] and msg_type not in ("debug_event", "debug_reply", "iopub_welcome")
    ],
)
def test_a_message_on_the_wrong_channel_is_withheld(channel: str, msg_type: str) -> None:
    gate = make_gate()
    cell = run_cell(gate)
    samples = IOPUB_SAMPLES | REPLY_SAMPLES | STDIN_SAMPLES
    content = copy.deepcopy(samples[msg_type])
    content["smuggled"] = CANARY
    out = gate.filter(channel, message(msg_type, content, cell))
    assert_well_formed(out)
    assert not leaked(out)
    assert gate.withheld == {"message_type": 1}
    if channel in ("shell", "control") and msg_type.endswith("_reply"):
        withheld_error_reply(out, msg_type, cell, "message_type")  # an allowed reply type: still answered
    else:
        assert notices(out) == ["message_type"]
        assert out[0]["parent_header"] == cell["header"]


@pytest.mark.parametrize("channel", ["iopub", "shell", "control", "stdin"])
@pytest.mark.parametrize(
    "msg_type", ["confnb_attestation_reply", "confnb_gate_reply", "apply_reply", "x", "", "execute_request"]
)
def test_unknown_message_types_are_withheld(channel: str, msg_type: str) -> None:
    gate = make_gate()
    cell = run_cell(gate)
    out = gate.filter(channel, message(msg_type, {"status": "ok", "evidence": CANARY}, cell))
    assert_well_formed(out)
    assert not leaked(out)
    assert notices(out) == ["message_type"]
    assert gate.withheld == {"message_type": 1}


def test_an_unknown_reply_to_a_request_still_answers_it_with_an_error() -> None:
    gate = make_gate()
    asked = request("connect_request")
    out = gate.filter("shell", message("connect_reply", {"status": "ok", "shell_port": CANARY}, asked))
    withheld_error_reply(out, "connect_reply", asked, "message_type")
    assert not leaked(out)


def test_the_executor_cannot_even_fail_the_relays_own_requests() -> None:
    gate = make_gate()
    asked = request("confnb_attestation_request", {"nonce": "00"})
    out = gate.filter("control", message("confnb_attestation_reply", {"status": "ok", "evidence": CANARY}, asked))
    assert [sent["header"]["msg_type"] for sent in out] == ["stream"]
    assert not leaked(out)


def test_an_unknown_channel_gets_nothing() -> None:
    gate = make_gate()
    assert gate.filter("hb", sample("iopub", "stream")) == []
    assert gate.filter(None, sample("iopub", "stream")) == []  # type: ignore[arg-type]
    assert gate.withheld == {"message_type": 2}


# -- the debugger ---------------------------------------------------------------------------------------------------


def test_debug_events_are_withheld() -> None:
    gate = make_gate()
    cell = run_cell(gate)
    out = gate.filter("iopub", message("debug_event", {"event": "stopped", "body": {"variables": CANARY}}, cell))
    assert notices(out) == ["debugger"]
    assert not leaked(out)
    assert gate.filter("iopub", message("debug_event", {"event": "stopped", "body": {}}, cell)) == []
    assert gate.withheld == {"debugger": 2}


@pytest.mark.parametrize("channel", ["shell", "control"])
def test_debug_replies_become_refusals(channel: str) -> None:
    gate = make_gate()
    asked = request("debug_request", {"command": "variables"})
    content = {"status": "ok", "success": True, "body": {"variables": [{"value": CANARY}]}}
    out = gate.filter(channel, message("debug_reply", content, asked))
    assert len(out) == 1
    assert out[0]["header"]["msg_type"] == "debug_reply"
    assert out[0]["parent_header"] == asked["header"]
    assert out[0]["content"] == {
        "status": "error",
        "ename": "DebuggerDisabled",
        "evalue": "the debugger is disabled in confidential kernels",
        "traceback": [],
    }
    assert not leaked(out)
    assert gate.withheld == {"debugger": 1}


def test_kernel_info_advertises_attestation_and_no_debugger() -> None:
    gate = make_gate()
    asked = request("kernel_info_request")
    content = copy.deepcopy(REPLY_SAMPLES["kernel_info_reply"])
    content["supported_features"] = ["debugger", "kernel subshells"]
    content["debugger"] = True
    sent = message("kernel_info_reply", content, asked)
    before = copy.deepcopy(sent)
    (out,) = gate.filter("shell", sent)
    assert out["content"]["supported_features"] == ["kernel subshells", "confnb-attestation"]
    assert out["content"]["debugger"] is False
    assert out["content"]["language_info"] == content["language_info"]
    assert out["parent_header"] == asked["header"]
    assert sent == before  # the executor's message is not modified in place
    assert gate.withheld == {"debugger": 1}


def test_kernel_info_gets_the_attestation_feature_once() -> None:
    gate = make_gate()
    content = copy.deepcopy(REPLY_SAMPLES["kernel_info_reply"])
    content["supported_features"] = ["confnb-attestation", "confnb-attestation"]
    (out,) = gate.filter("control", message("kernel_info_reply", content, request("kernel_info_request")))
    assert out["content"]["supported_features"] == ["confnb-attestation"]
    del content["supported_features"]
    (out,) = gate.filter("control", message("kernel_info_reply", content, request("kernel_info_request")))
    assert out["content"]["supported_features"] == ["confnb-attestation"]
    assert gate.withheld == {}  # nothing was taken away


@pytest.mark.parametrize("features", ["debugger", [1], {"debugger": True}, None])
def test_kernel_info_with_malformed_features_is_refused(features: Any) -> None:
    gate = make_gate()
    asked = request("kernel_info_request")
    content = copy.deepcopy(REPLY_SAMPLES["kernel_info_reply"])
    content["supported_features"] = features
    out = gate.filter("shell", message("kernel_info_reply", content, asked))
    withheld_error_reply(out, "kernel_info_reply", asked, "malformed")


# -- malformed and forged messages ----------------------------------------------------------------------------------


def _mutate(channel: str, msg_type: str, change: Callable[[Message], None]) -> Message:
    sent = sample(channel, msg_type)
    change(sent)
    return sent


def _set(path: tuple[str, ...], value: Any) -> Callable[[Message], None]:
    def change(sent: Message) -> None:
        target = sent
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


def _drop(path: tuple[str, ...]) -> Callable[[Message], None]:
    def change(sent: Message) -> None:
        target = sent
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return change


MALFORMED_IOPUB = {
    "header is a list": ("stream", _set(("header",), [CANARY])),
    "header is missing": ("stream", _drop(("header",))),
    "parent is a string": ("stream", _set(("parent_header",), CANARY)),
    "content is a list": ("stream", _set(("content",), [CANARY])),
    "metadata is None": ("stream", _set(("metadata",), None)),
    "buffers missing": ("stream", _drop(("buffers",))),
    "buffers a string": ("comm_msg", _set(("buffers",), CANARY)),
    "buffer of the wrong type": ("comm_msg", _set(("buffers",), [CANARY])),
    "buffers on a stream": ("stream", _set(("buffers",), [CANARY.encode()])),
    "msg_type missing": ("stream", _drop(("header", "msg_type"))),
    "msg_type not a string": ("stream", _set(("header", "msg_type"), ["stream"])),
    "header value nested": ("stream", _set(("header", "extra"), {"x": CANARY})),
    "header value huge": ("stream", _set(("header", "msg_id"), CANARY * 1000)),
    "header with many keys": ("stream", _set(("header",), {**new_header("stream"), **{f"k{i}": i for i in range(40)}})),
    "parent value a list": ("stream", _set(("parent_header", "msg_id"), [CANARY])),
    "parent value a float": ("stream", _set(("parent_header", "x"), float("nan"))),
    "top-level msg_type disagrees": ("stream", _set(("msg_type",), "status")),
    "top-level msg_id disagrees": ("stream", _set(("msg_id",), CANARY)),
    "stream name": ("stream", _set(("content", "name"), CANARY)),
    "stream text": ("stream", _set(("content", "text"), [CANARY])),
    "stream text missing": ("stream", _drop(("content", "text"))),
    "status state": ("status", _set(("content", "execution_state"), CANARY)),
    "display data a list": ("display_data", _set(("content", "data"), [CANARY])),
    "display data missing": ("display_data", _drop(("content", "data"))),
    "display text not a string": ("display_data", _set(("content", "data", "text/plain"), {"x": CANARY})),
    "display metadata a list": ("display_data", _set(("content", "metadata"), [CANARY])),
    "display transient a list": ("display_data", _set(("content", "transient"), [CANARY])),
    "display id not a string": ("display_data", _set(("content", "transient"), {"display_id": 1})),
    "update without display id": ("update_display_data", _set(("content", "transient"), {})),
    "result count a string": ("execute_result", _set(("content", "execution_count"), "1")),
    "result count a bool": ("execute_result", _set(("content", "execution_count"), True)),
    "error traceback a string": ("error", _set(("content", "traceback"), CANARY)),
    "error traceback of numbers": ("error", _set(("content", "traceback"), [1, 2])),
    "error evalue a dict": ("error", _set(("content", "evalue"), {"v": CANARY})),
    "clear_output wait": ("clear_output", _set(("content", "wait"), CANARY)),
    "comm id missing": ("comm_msg", _drop(("content", "comm_id"))),
    "comm data a list": ("comm_msg", _set(("content", "data"), [CANARY])),
    "comm target a number": ("comm_open", _set(("content", "target_name"), 5)),
    "execute_input count": ("execute_input", _set(("content", "execution_count"), None)),
    "NaN in content": ("stream", _set(("content", "extra"), [float("nan"), CANARY])),
    "infinity in content": ("display_data", _set(("content", "data", "application/json"), {"x": float("inf")})),
    "non-string key": ("stream", _set(("content", "extra"), {(1, 2): CANARY})),
    "circular content": ("stream", lambda sent: sent["content"].update(loop=sent["content"])),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_IOPUB))
def test_malformed_output_is_withheld(case: str) -> None:
    msg_type, change = MALFORMED_IOPUB[case]
    gate = make_gate()
    cell = run_cell(gate)
    sent = sample("iopub", msg_type, cell)
    if msg_type == "execute_input":
        sent["content"]["code"] = cell["content"]["code"]
    change(sent)
    out = gate.filter("iopub", sent)
    assert_well_formed(out)
    assert not leaked(out)
    assert gate.withheld == {"malformed": 1}
    assert notices(out) in (["malformed"], [])  # no notice when there is no parent to address it to


def test_deeply_nested_content_is_withheld_not_a_crash() -> None:
    gate = make_gate()
    nested: Any = CANARY
    for _ in range(100_000):
        nested = [nested]
    sent = sample("iopub", "comm_msg", run_cell(gate))
    sent["content"]["data"] = {"deep": nested}
    out = gate.filter("iopub", sent)
    assert notices(out) == ["malformed"]
    assert not leaked(out)


@pytest.mark.parametrize("bad", [None, [], "stream", 42, b"bytes", {"header": None}])
@pytest.mark.parametrize("channel", ["iopub", "shell", "control", "stdin"])
def test_things_that_are_not_messages_get_nothing(bad: Any, channel: str) -> None:
    gate = make_gate()
    out = gate.filter(channel, bad)
    assert_well_formed(out)
    # Not even a reply type to answer with: at most a notice, addressed to no request.
    assert notices(out) == (["malformed"] if isinstance(bad, dict) else [])
    assert all(sent["parent_header"] == {} for sent in out)
    assert gate.withheld == {"malformed": 1}


MALFORMED_REPLIES = {
    "execute_reply": [
        _set(("content", "status"), "maybe"),
        _set(("content", "execution_count"), "1"),
        _set(("content", "payload"), {"source": "page"}),
        _set(("content", "payload"), [CANARY]),
        _set(("content", "payload"), [{"source": "page", "data": [CANARY]}]),
        _set(("content", "user_expressions"), [CANARY]),
        _set(("content", "user_expressions"), {"x": {"status": "maybe", "data": CANARY}}),
        _set(("content", "user_expressions"), {"x": {"status": "ok", "data": {"text/plain": [CANARY]}}}),
    ],
    "complete_reply": [_set(("content", "matches"), CANARY), _set(("content", "cursor_start"), None)],
    "inspect_reply": [_set(("content", "data"), CANARY), _set(("content", "found"), CANARY)],
    "history_reply": [
        _set(("content", "history"), CANARY),
        _set(("content", "history"), [[1, 1]]),
        _set(("content", "history"), [[1, 1, [CANARY]]]),
        _set(("content", "history"), [["1", 1, CANARY]]),
        _set(("content", "history"), [[1, 1, ["x", 5]]]),
    ],
    "is_complete_reply": [_set(("content", "status"), CANARY), _set(("content", "indent"), 4)],
    "comm_info_reply": [_set(("content", "comms"), [CANARY]), _set(("content", "comms"), {"c": CANARY})],
    "interrupt_reply": [_set(("content", "status"), [CANARY])],
    "usage_reply": [_set(("content", "status"), {"x": CANARY})],
    "shutdown_reply": [_set(("buffers",), [CANARY.encode()])],
    "create_subshell_reply": [_set(("content",), [CANARY])],
}


@pytest.mark.parametrize(
    ("msg_type", "index"),
    [(msg_type, index) for msg_type, changes in MALFORMED_REPLIES.items() for index in range(len(changes))],
)
@pytest.mark.parametrize("channel", ["shell", "control"])
def test_malformed_replies_are_answered_with_an_error(channel: str, msg_type: str, index: int) -> None:
    gate = make_gate()
    asked = request(msg_type.replace("_reply", "_request"))
    sent = sample(channel, msg_type, asked)
    MALFORMED_REPLIES[msg_type][index](sent)
    out = gate.filter(channel, sent)
    withheld_error_reply(out, msg_type, asked, "malformed")
    assert not leaked(out)
    assert gate.withheld == {"malformed": 1}


def test_a_withheld_execute_reply_keeps_its_execution_count() -> None:
    gate = make_gate(max_message_bytes=100)
    cell = run_cell(gate)
    page = {"source": "page", "data": {"text/plain": CANARY * 10}, "start": 0}
    content = {"status": "ok", "execution_count": 7, "user_expressions": {}, "payload": [page]}
    out = gate.filter("shell", message("execute_reply", content, cell))
    withheld_error_reply(out, "execute_reply", cell, "display.max_message_bytes")
    assert out[0]["content"]["execution_count"] == 7
    assert not leaked(out)


def test_a_reply_without_a_usable_header_cannot_be_answered() -> None:
    gate = make_gate()
    sent = sample("shell", "execute_reply", request())
    sent["header"] = CANARY
    out = gate.filter("shell", sent)
    assert notices(out) == ["malformed"]  # no reply type to answer with, only a notice
    assert not leaked(out)


def test_an_internal_failure_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = make_gate()
    cell = run_cell(gate)

    def broken(*args: Any) -> Any:
        raise RuntimeError(CANARY)

    monkeypatch.setattr(gate, "_handlers", dict.fromkeys(ALL_TYPES, broken))
    out = gate.filter("iopub", sample("iopub", "stream", cell))
    assert notices(out) == ["malformed"]
    out = gate.filter("shell", sample("shell", "execute_reply", cell))
    withheld_error_reply(out, "execute_reply", cell, "malformed")
    assert not leaked(out)


def test_a_failing_withhold_still_does_not_raise() -> None:
    def header_factory(msg_type: str) -> dict[str, Any]:
        raise RuntimeError("no headers today")

    gate = MessageGate(DisplayPolicy(), header_factory)
    assert gate.filter("iopub", message("debug_event", {})) == []


# -- status-like messages pass, still within the size cap -----------------------------------------------------------


@pytest.mark.parametrize(
    ("channel", "msg_type"),
    [
        ("iopub", "status"),
        ("iopub", "clear_output"),
        ("iopub", "shutdown_reply"),
        ("control", "shutdown_reply"),
        ("control", "interrupt_reply"),
        ("shell", "is_complete_reply"),
        ("shell", "comm_info_reply"),
        ("shell", "usage_reply"),
        ("control", "usage_reply"),
        ("shell", "create_subshell_reply"),
        ("shell", "list_subshell_reply"),
        ("shell", "delete_subshell_reply"),
    ],
)
def test_plain_messages_are_subject_to_the_message_cap(channel: str, msg_type: str) -> None:
    cell = request("x_request")
    sent = sample(channel, msg_type, cell)
    gate = make_gate(max_message_bytes=content_size(sent["content"]))
    assert gate.filter(channel, sent) == [sent]
    gate = make_gate(max_message_bytes=content_size(sent["content"]) - 1)
    out = gate.filter(channel, sent)
    if channel == "iopub":
        assert notices(out) == ["display.max_message_bytes"]
    else:
        withheld_error_reply(out, msg_type, cell, "display.max_message_bytes")
    assert gate.withheld == {"display.max_message_bytes": 1}


# -- execute_input echoes what the client sent, never what the executor says -------------------------------------


def test_execute_input_shows_the_code_the_client_sent() -> None:
    gate = make_gate()
    cell = run_cell(gate, "print('hello')")
    forged = message("execute_input", {"code": CANARY, "execution_count": 3, "extra": CANARY}, cell)
    (out,) = gate.filter("iopub", forged)
    assert out["content"] == {"code": "print('hello')", "execution_count": 3}
    assert out["parent_header"] == cell["header"]
    assert not leaked([out])
    assert gate.withheld == {"execute_input": 1}


def test_execute_input_for_a_request_never_sent_is_withheld() -> None:
    gate = make_gate()
    run_cell(gate)
    invented = request("execute_request", {"code": CANARY})
    out = gate.filter("iopub", message("execute_input", {"code": CANARY, "execution_count": 1}, invented))
    assert notices(out) == ["execute_input"]
    assert not leaked(out)
    out = gate.filter("iopub", message("execute_input", {"code": CANARY, "execution_count": 1}))
    assert notices(out) == ["execute_input"]
    assert gate.withheld == {"execute_input": 2}


def test_only_execute_requests_are_remembered() -> None:
    gate = make_gate()
    asked = request("inspect_request", {"code": CANARY})
    gate.observe_request("shell", asked)
    out = gate.filter("iopub", message("execute_input", {"code": CANARY, "execution_count": 1}, asked))
    assert notices(out) == ["execute_input"]


def test_the_most_recent_requests_are_remembered() -> None:
    gate = make_gate()
    cells = [run_cell(gate, f"x = {index}") for index in range(REMEMBERED_REQUESTS + 1)]
    assert REMEMBERED_REQUESTS == 1024
    oldest, newest = cells[0], cells[-1]
    out = gate.filter("iopub", message("execute_input", {"code": "x = 0", "execution_count": 1}, oldest))
    assert notices(out) == ["execute_input"]
    echo = message("execute_input", {"code": f"x = {REMEMBERED_REQUESTS}", "execution_count": 1}, newest)
    assert gate.filter("iopub", echo) == [echo]
    second = cells[1]
    echo = message("execute_input", {"code": "x = 1", "execution_count": 1}, second)
    assert gate.filter("iopub", echo) == [echo]


@pytest.mark.parametrize(
    "bad",
    [
        None,
        "x",
        {"header": "x"},
        {"header": {"msg_type": "execute_request", "msg_id": 5}, "content": {}},
        {"header": {"msg_type": "execute_request", "msg_id": "m"}, "content": [1]},
        {"header": {"msg_type": "execute_request", "msg_id": "m"}, "content": {"code": 5}},
    ],
)
def test_observing_odd_requests_never_raises(bad: Any) -> None:
    gate = make_gate()
    gate.observe_request("shell", bad)
    if isinstance(bad, dict) and isinstance(bad.get("content"), dict) and "code" in bad["content"]:
        # A non-string code is recorded as empty: the executor's echo cannot fill it in.
        parent = {"header": {"msg_id": "m", "msg_type": "execute_request"}}
        (out,) = gate.filter("iopub", message("execute_input", {"code": CANARY, "execution_count": 1}, parent))
        assert out["content"]["code"] == ""


# -- MIME bundles ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("msg_type", ["display_data", "update_display_data", "execute_result"])
def test_disallowed_mime_types_are_dropped_from_display_output(msg_type: str) -> None:
    gate = make_gate()
    cell = run_cell(gate)
    sent = sample("iopub", msg_type, cell)
    sent["content"]["data"] = {"text/plain": "ok", "application/javascript": CANARY, "text/x-exfil": CANARY}
    sent["content"]["metadata"] = {"text/plain": {"a": 1}, "application/javascript": CANARY, "isolated": CANARY}
    before = copy.deepcopy(sent)
    notice, out = gate.filter("iopub", sent)
    assert out["content"]["data"] == {"text/plain": "ok"}
    assert out["content"]["metadata"] == {"text/plain": {"a": 1}}
    assert out["header"] == sent["header"] and out["parent_header"] == cell["header"]
    assert notice["content"]["text"] == PARTLY_SHOWN  # the analyst sees less than their code made, and why
    assert notice["parent_header"] == cell["header"]
    assert not leaked([notice, out])
    assert sent == before
    assert gate.withheld == {"display.mime": 1}
    again = gate.filter("iopub", copy.deepcopy(before))
    assert len(again) == 1 and again[0]["content"]["data"] == {"text/plain": "ok"}  # noticed once per cell
    assert gate.withheld == {"display.mime": 2}


def test_partly_shown_and_withheld_output_share_one_notice_per_cell() -> None:
    gate = make_gate(mime=frozenset({"text/plain"}))
    cell = run_cell(gate)
    partly = message("display_data", {"data": {"text/plain": "df", "text/html": CANARY}, "metadata": {}}, cell)
    assert notices(gate.filter("iopub", partly)) == ["display.mime"]
    withheld = message("display_data", {"data": {"text/html": CANARY}, "metadata": {}}, cell)
    assert gate.filter("iopub", withheld) == []
    assert notices(gate.filter("iopub", message("display_data", withheld["content"], run_cell(gate)))) == [
        "display.mime"
    ]


@pytest.mark.parametrize("msg_type", ["display_data", "update_display_data", "execute_result"])
def test_display_output_with_nothing_allowed_is_withheld(msg_type: str) -> None:
    gate = make_gate(mime=frozenset({"text/plain"}))
    cell = run_cell(gate)
    sent = sample("iopub", msg_type, cell)
    sent["content"]["data"] = {"text/html": f"<b>{CANARY}</b>"}
    out = gate.filter("iopub", sent)
    assert notices(out) == ["display.mime"]
    assert out[0]["parent_header"] == cell["header"]
    assert not leaked(out)
    assert gate.withheld == {"display.mime": 1}


def test_only_metadata_of_disallowed_types_is_also_a_rewrite() -> None:
    gate = make_gate()
    sent = sample("iopub", "display_data", run_cell(gate))
    sent["content"]["metadata"]["text/x-canary"] = CANARY
    (out,) = gate.filter("iopub", sent)
    assert out["content"]["data"] == IOPUB_SAMPLES["display_data"]["data"]
    assert not leaked([out])
    assert gate.withheld == {"display.mime": 1}


def test_structured_json_types_may_carry_objects() -> None:
    gate = make_gate()
    sent = sample("iopub", "display_data", run_cell(gate))
    sent["content"]["data"] = {
        "application/json": {"a": [1, 2]},
        "application/vnd.jupyter.widget-view+json": {"model_id": "m1", "version_major": 2},
        "text/plain": "widget",
    }
    assert gate.filter("iopub", sent) == [sent]


def test_an_empty_mime_policy_shows_no_display_output_but_streams() -> None:
    gate = make_gate(mime=frozenset())
    cell = run_cell(gate)
    assert notices(gate.filter("iopub", sample("iopub", "display_data", cell))) == ["display.mime"]
    stream = sample("iopub", "stream", cell)
    assert gate.filter("iopub", stream) == [stream]


def test_inspect_reply_keeps_only_allowed_types_and_is_answered_even_when_empty() -> None:
    gate = make_gate(mime=frozenset({"text/plain"}))
    asked = request("inspect_request")
    content = {
        "status": "ok",
        "found": True,
        "data": {"text/plain": "doc", "text/html": CANARY},
        "metadata": {"text/html": CANARY},
    }
    first = gate.filter("shell", message("inspect_reply", content, asked))
    assert notices(first) == ["display.mime"]
    assert first[-1]["content"] == {"status": "ok", "found": True, "data": {"text/plain": "doc"}, "metadata": {}}
    content = {"status": "ok", "found": True, "data": {"text/html": CANARY}, "metadata": {}}
    (out,) = gate.filter("shell", message("inspect_reply", content, asked))
    assert out["content"]["data"] == {}
    assert out["parent_header"] == asked["header"]
    assert not leaked([*first, out])
    assert gate.withheld == {"display.mime": 2}


def test_page_payloads_are_filtered() -> None:
    gate = make_gate(mime=frozenset({"text/plain"}))
    cell = run_cell(gate)
    content = {
        "status": "ok",
        "execution_count": 2,
        "user_expressions": {},
        "payload": [
            {"source": "page", "data": {"text/plain": "help", "text/html": CANARY}, "start": 0},
            {"source": "page", "data": {"text/html": CANARY}, "start": 0},
            {"source": "ask_exit", "keepkernel": False},
        ],
    }
    sent = message("execute_reply", content, cell)
    before = copy.deepcopy(sent)
    notice, out = gate.filter("shell", sent)
    assert notice["content"]["text"] == PARTLY_SHOWN
    assert out["content"]["payload"] == [
        {"source": "page", "data": {"text/plain": "help"}, "start": 0},
        {"source": "page", "data": {}, "start": 0},
        {"source": "ask_exit", "keepkernel": False},
    ]
    assert not leaked([out])
    assert sent == before
    assert gate.withheld == {"display.mime": 1}


def test_set_next_input_needs_text_to_be_allowed() -> None:
    content = {
        "status": "ok",
        "execution_count": 2,
        "payload": [{"source": "set_next_input", "text": CANARY, "replace": False}],
    }
    gate = make_gate()
    sent = message("execute_reply", content, run_cell(gate))
    assert gate.filter("shell", sent) == [sent]
    gate = make_gate(mime=frozenset({"image/png"}))
    notice, out = gate.filter("shell", message("execute_reply", content, run_cell(gate)))
    assert out["content"]["payload"] == []
    assert notice["content"]["text"] == PARTLY_SHOWN
    assert not leaked([notice, out])
    assert gate.withheld == {"display.mime": 1}


def test_unknown_payloads_are_dropped() -> None:
    gate = make_gate()
    content = {"status": "ok", "execution_count": 2, "payload": [{"source": "exfiltrate", "data": CANARY}]}
    (out,) = gate.filter("shell", message("execute_reply", content, run_cell(gate)))
    assert out["content"]["payload"] == []
    assert gate.withheld == {"malformed": 1}


def test_user_expressions_are_filtered() -> None:
    gate = make_gate(mime=frozenset({"text/plain"}))
    content = {
        "status": "ok",
        "execution_count": 2,
        "user_expressions": {
            "a": {"status": "ok", "data": {"text/plain": "1", "text/html": CANARY}, "metadata": {"text/html": CANARY}},
            "b": {"status": "ok", "data": {"text/html": CANARY}, "metadata": {}},
        },
        "payload": [],
    }
    notice, out = gate.filter("shell", message("execute_reply", content, run_cell(gate)))
    assert notice["content"]["text"] == PARTLY_SHOWN
    assert out["content"]["user_expressions"] == {
        "a": {"status": "ok", "data": {"text/plain": "1"}, "metadata": {}},
        "b": {"status": "ok", "data": {}, "metadata": {}},
    }
    assert not leaked([out])
    assert gate.withheld == {"display.mime": 1}


# -- tracebacks -----------------------------------------------------------------------------------------------------


def test_full_tracebacks_pass_by_default() -> None:
    gate = make_gate()
    sent = sample("iopub", "error", run_cell(gate))
    sent["content"]["traceback"] = IPYTHON_TRACEBACK
    assert gate.filter("iopub", sent) == [sent]


def test_redacted_errors_keep_the_type_and_the_cell_line() -> None:
    gate = make_gate(tracebacks="redacted")
    cell = run_cell(gate)
    sent = message("error", {"ename": "ValueError", "evalue": CANARY, "traceback": IPYTHON_TRACEBACK}, cell)
    (out,) = gate.filter("iopub", sent)
    assert out["content"] == {
        "ename": "ValueError",
        "evalue": "",
        "traceback": ["ValueError at line 4 of the cell (details withheld by the display policy)"],
    }
    assert out["parent_header"] == cell["header"]
    assert gate.withheld == {"display.tracebacks": 1}


def test_a_syntax_error_keeps_its_line() -> None:
    gate = make_gate(tracebacks="redacted")
    sent = message("error", {"ename": "SyntaxError", "evalue": CANARY, "traceback": SYNTAX_TRACEBACK})
    (out,) = gate.filter("iopub", sent)
    assert out["content"]["traceback"] == [
        "SyntaxError at line 12 of the cell (details withheld by the display policy)"
    ]


@pytest.mark.parametrize(
    ("ename", "traceback", "expected"),
    [
        ("KeyError", [CANARY], "KeyError (details withheld by the display policy)"),
        ("KeyError", [], "KeyError (details withheld by the display policy)"),
        ("pandas.errors.ParserError", ["Cell In[2], line 9"], "pandas.errors.ParserError at line 9 of the cell"),
        (f"<script>{CANARY}</script>", ["Cell In[2], line 9"], "Exception at line 9 of the cell"),
        ("Bad Name", [], "Exception (details withheld by the display policy)"),
        ("E" * 128, [], "E" * 128 + " (details withheld"),
        ("E" * 129, [], "Exception (details withheld"),
        ("9Lives", [], "Exception (details withheld"),
        ("Erreur\u00e9", [], "Exception (details withheld"),
        ("", [], "Exception (details withheld"),
        ("ValueError", ["Cell In[1], line \u0663\u0663"], "ValueError (details withheld"),  # Arabic-Indic digits
        ("ValueError", ["Cell In[1], line 12345678901"], "ValueError (details withheld"),
        ("ValueError", ["Cell In[1], line 5" + CANARY], "ValueError at line 5 of the cell"),
        (
            "ValueError",
            ["File x.py, line 3", "Cell In[4], line 8", "Cell In[4], line 2"],
            "ValueError at line 8 of the cell",
        ),
        ("ValueError", ["\x1b]8;;http://x\x07Cell In[4], line 6\x1b]8;;\x07"], "ValueError at line 6 of the cell"),
        ("ValueError", [f"Cell In[1], line 3\n{CANARY}"], "ValueError at line 3 of the cell"),
    ],
)
def test_redaction_keeps_only_a_safe_name_and_a_number(ename: str, traceback: list[str], expected: str) -> None:
    gate = make_gate(tracebacks="redacted")
    (out,) = gate.filter("iopub", message("error", {"ename": ename, "evalue": CANARY, "traceback": traceback}))
    (line,) = out["content"]["traceback"]
    assert line.startswith(expected)
    assert line.endswith("(details withheld by the display policy)")
    assert out["content"]["evalue"] == ""
    assert not leaked([out])


def test_a_redacted_error_is_not_redacted_twice() -> None:
    gate = make_gate(tracebacks="redacted")
    content = {"ename": "KeyError", "evalue": "", "traceback": ["KeyError (details withheld by the display policy)"]}
    sent = message("error", content)
    assert gate.filter("iopub", sent) == [sent]
    assert gate.withheld == {}


def test_extra_fields_of_a_redacted_error_are_dropped() -> None:
    gate = make_gate(tracebacks="redacted")
    content = {"ename": "KeyError", "evalue": "", "traceback": [], "traceback2": CANARY}
    (out,) = gate.filter("iopub", message("error", content))
    assert set(out["content"]) == {"ename", "evalue", "traceback"}


def test_a_failed_execute_reply_is_redacted() -> None:
    gate = make_gate(tracebacks="redacted")
    cell = run_cell(gate)
    content = {
        "status": "error",
        "execution_count": 4,
        "ename": "ValueError",
        "evalue": CANARY,
        "traceback": IPYTHON_TRACEBACK,
        "engine_info": {"engine_uuid": CANARY, "engine_id": -1, "method": "execute"},
        "user_expressions": {},
        "payload": [],
    }
    (out,) = gate.filter("shell", message("execute_reply", content, cell))
    assert out["content"] == {
        "status": "error",
        "execution_count": 4,
        "ename": "ValueError",
        "evalue": "",
        "traceback": ["ValueError at line 4 of the cell (details withheld by the display policy)"],
        "user_expressions": {},
        "payload": [],
    }
    assert out["parent_header"] == cell["header"]
    assert not leaked([out])
    assert gate.withheld == {"display.tracebacks": 1}


def test_failed_user_expressions_are_redacted_and_counted_once() -> None:
    gate = make_gate(tracebacks="redacted")
    failed = {"status": "error", "ename": "NameError", "evalue": CANARY, "traceback": [CANARY]}
    content = {"status": "ok", "execution_count": 4, "user_expressions": {"a": failed, "b": dict(failed)}}
    (out,) = gate.filter("shell", message("execute_reply", content, run_cell(gate)))
    expected = {
        "status": "error",
        "ename": "NameError",
        "evalue": "",
        "traceback": ["NameError (details withheld by the display policy)"],
    }
    assert out["content"]["user_expressions"] == {"a": expected, "b": expected}
    assert gate.withheld == {"display.tracebacks": 1}


@pytest.mark.parametrize("msg_type", ["inspect_reply", "complete_reply", "history_reply", "comm_info_reply"])
def test_other_error_replies_are_redacted_too(msg_type: str) -> None:
    gate = make_gate(tracebacks="redacted")
    asked = request()
    content = {"status": "error", "ename": "RuntimeError", "evalue": CANARY, "traceback": [CANARY]}
    (out,) = gate.filter("shell", message(msg_type, content, asked))
    assert out["content"]["evalue"] == ""
    assert out["header"]["msg_type"] == msg_type
    assert not leaked([out])
    assert gate.withheld == {"display.tracebacks": 1}


def test_an_aborted_reply_passes() -> None:
    gate = make_gate(tracebacks="redacted")
    sent = message("execute_reply", {"status": "aborted"}, run_cell(gate))
    assert gate.filter("shell", sent) == [sent]


# -- history --------------------------------------------------------------------------------------------------------


def test_history_outputs_need_text_to_be_allowed() -> None:
    content = {"status": "ok", "history": [[1, 1, ["6*7", CANARY]], [1, 2, ["x = 1", None]], [1, 3, "y"]]}
    gate = make_gate()
    sent = message("history_reply", copy.deepcopy(content), request("history_request"))
    assert gate.filter("shell", sent) == [sent]

    gate = make_gate(mime=frozenset({"image/png"}))
    asked = request("history_request")
    out = gate.filter("shell", message("history_reply", copy.deepcopy(content), asked))
    assert notices(out) == ["display.mime"]
    notice, reply = out
    assert notice["parent_header"] == asked["header"]
    assert reply["content"]["history"] == [[1, 1, ["6*7", ""]], [1, 2, ["x = 1", None]], [1, 3, "y"]]
    assert not leaked(out)
    again = gate.filter("shell", message("history_reply", copy.deepcopy(content), asked))
    assert notices(again) == []  # once per request
    assert gate.withheld == {"display.mime": 2}


def test_history_without_outputs_is_untouched_even_without_text() -> None:
    gate = make_gate(mime=frozenset())
    sent = sample("shell", "history_reply", request("history_request"))
    assert gate.filter("shell", sent) == [sent]


# -- stdin ----------------------------------------------------------------------------------------------------------


def test_an_input_request_over_the_budget_still_asks_but_without_the_prompt() -> None:
    gate = make_gate(max_output_bytes=100)
    cell = run_cell(gate)
    sent = message("input_request", {"prompt": CANARY * 20, "password": True}, cell)
    out = gate.filter("stdin", sent)
    assert [m["header"]["msg_type"] for m in out] == ["stream", "input_request"]
    assert notices(out) == ["display.max_output_bytes"]
    notice, asked = out
    assert notice["parent_header"] == cell["header"]
    assert asked["content"] == {"prompt": "", "password": True}
    assert asked["header"]["msg_type"] == "input_request"
    assert asked["header"]["msg_id"] != sent["header"]["msg_id"]  # nothing of the withheld message but its parent
    assert asked["parent_header"] == cell["header"]
    assert not leaked(out)


def test_an_input_request_over_the_message_cap_still_asks() -> None:
    gate = make_gate(max_message_bytes=50)
    sent = message("input_request", {"prompt": CANARY * 20, "password": False}, run_cell(gate))
    out = gate.filter("stdin", sent)
    assert notices(out) == ["display.max_message_bytes"]
    assert out[-1]["content"] == {"prompt": "", "password": False}


def test_a_malformed_input_request_still_asks() -> None:
    gate = make_gate()
    cell = run_cell(gate)
    out = gate.filter("stdin", message("input_request", {"prompt": [CANARY], "password": CANARY}, cell))
    assert out[-1]["content"] == {"prompt": "", "password": False}
    assert notices(out) == ["malformed"]
    sent = message("input_request", {"prompt": "ok"}, cell)
    sent["header"]["extra"] = {"nested": CANARY}
    out = gate.filter("stdin", sent)
    assert out[-1]["content"] == {"prompt": "", "password": False}
    assert out[-1]["header"]["msg_type"] == "input_request"
    assert not leaked(out)


def test_prompts_count_against_the_cells_budget() -> None:
    gate = make_gate(max_output_bytes=1000)
    cell = run_cell(gate)
    prompt = message("input_request", {"prompt": "p" * 600, "password": False}, cell)
    assert gate.filter("stdin", prompt) == [prompt]
    stream = message("stream", {"name": "stdout", "text": "s" * 600}, cell)
    assert notices(gate.filter("iopub", stream)) == ["display.max_output_bytes"]


# -- comms ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("msg_type", ["comm_open", "comm_msg", "comm_close"])
def test_comms_can_be_switched_off(msg_type: str) -> None:
    gate = make_gate(comms=False)
    cell = run_cell(gate)
    sent = sample("iopub", msg_type, cell)
    sent["content"]["data"] = {"value": CANARY}
    out = gate.filter("iopub", sent)
    assert notices(out) == ["comms"]
    assert not leaked(out)
    assert gate.withheld == {"comms": 1}


def test_comm_buffers_pass_and_count_toward_the_size() -> None:
    cell = request()
    sent = message("comm_msg", {"comm_id": "c1", "data": {}}, cell, buffers=[b"\0" * 100, memoryview(b"\1" * 50)])
    limit = content_size(sent["content"]) + 150
    assert make_gate(max_message_bytes=limit).filter("iopub", sent) == [sent]
    out = make_gate(max_message_bytes=limit - 1).filter("iopub", sent)
    assert notices(out) == ["display.max_message_bytes"]


# -- sizes and budgets ----------------------------------------------------------------------------------------------


def test_the_message_cap_is_exact_and_counts_utf8_bytes() -> None:
    sent = message("stream", {"name": "stdout", "text": "\u00e9\u4e2d\U0001f600"})
    size = content_size(sent["content"])
    assert size == len('{"name":"stdout","text":""}') + 2 + 3 + 4
    assert make_gate(max_message_bytes=size).filter("iopub", sent) == [sent]
    assert notices(make_gate(max_message_bytes=size - 1).filter("iopub", sent)) == ["display.max_message_bytes"]


awkward_text = st.lists(
    st.sampled_from(['"', "\\", "\n", "\t", "\x00", "\x1f", "\x7f", "/", "a", "\u00e9", "\u4e2d", "\U0001f600"])
    | st.text(max_size=40),
    max_size=400,
).map("".join)
json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | awkward_text,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(awkward_text, inner, max_size=5),
    max_leaves=12,
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(awkward_text, json_like, max_size=4), st.integers(0, 4))
def test_the_message_cap_is_exact_for_any_content(extra: dict[str, Any], repeat: int) -> None:
    """Long strings are measured without encoding them; the boundary must still be exactly the encoded size."""
    content = {"comm_id": "c", "data": {"long": 'x"\n\u00e9' * (300 * repeat), **extra}}
    sent = message("comm_msg", content)
    size = content_size(content)
    assert make_gate(max_message_bytes=size).filter("iopub", sent) == [sent]
    assert notices(make_gate(max_message_bytes=size - 1).filter("iopub", sent)) == ["display.max_message_bytes"]


@pytest.mark.parametrize("where", ["short", "long", "key", "deep", "header", "parent"])
def test_lone_surrogates_are_malformed(where: str) -> None:
    """Not text: the client could not decode it, and the relay could not encode a notice quoting its parent."""
    gate = make_gate()
    cell = run_cell(gate)
    sent = message("comm_msg", {"comm_id": "c", "data": {}}, cell)
    bad = CANARY + "\ud800"
    if where == "short":
        sent["content"]["data"]["x"] = bad
    elif where == "long":
        sent["content"]["data"]["x"] = bad * 1000
    elif where == "key":
        sent["content"]["data"][bad] = 1
    elif where == "deep":
        sent["content"]["data"]["x"] = [[[[[[bad]]]]]]
    elif where == "header":
        sent["header"]["session"] = bad
    else:
        sent["parent_header"]["session"] = bad
    out = gate.filter("iopub", sent)
    assert notices(out) == ["malformed"]
    assert not leaked(out)
    assert json.dumps(out, ensure_ascii=False, default=str).encode("utf-8")


def test_message_metadata_counts_toward_the_size() -> None:
    sent = message("stream", {"name": "stdout", "text": "x"}, metadata={"padding": "m" * 100})
    gate = make_gate(max_message_bytes=content_size(sent["content"]) + 50)
    assert notices(gate.filter("iopub", sent)) == ["display.max_message_bytes"]


def test_the_size_is_measured_after_disallowed_types_are_dropped() -> None:
    sent = message("display_data", {"data": {"text/plain": "x", "application/javascript": "j" * 10_000}})
    gate = make_gate(max_message_bytes=1000)
    assert notices(gate.filter("iopub", sent)) == ["display.mime"]
    assert gate.filter("iopub", sent)[0]["content"]["data"] == {"text/plain": "x"}


@pytest.mark.parametrize("msg_type", OUTPUT_TYPES)
def test_each_kind_of_output_is_paid_for_by_its_cell(msg_type: str) -> None:
    gate = make_gate(max_output_bytes=0)
    cell = run_cell(gate)
    out = gate.filter("iopub", sample("iopub", msg_type, cell))
    assert notices(out) == ["display.max_output_bytes"]
    assert gate.withheld == {"display.max_output_bytes": 1}


@pytest.mark.parametrize("msg_type", ["status", "clear_output", "execute_input", "shutdown_reply"])
def test_status_messages_are_not_paid_for(msg_type: str) -> None:
    gate = make_gate(max_output_bytes=0)
    cell = run_cell(gate)
    sent = sample("iopub", msg_type, cell)
    assert gate.filter("iopub", sent) == [sent]


def test_a_cells_output_is_cumulative_and_noticed_once() -> None:
    gate = make_gate(max_output_bytes=1000)
    cell = run_cell(gate)

    def chunk(count: int) -> Message:
        return message("stream", {"name": "stdout", "text": "Z" * count}, cell)

    size = content_size(chunk(400)["content"])
    first, second, third, fourth = chunk(400), chunk(400), chunk(400), chunk(400)
    assert gate.filter("iopub", first) == [first]
    assert gate.filter("iopub", second) == [second]
    assert notices(gate.filter("iopub", third)) == ["display.max_output_bytes"]
    assert gate.filter("iopub", fourth) == []  # counted, but not noticed again
    assert gate.withheld == {"display.max_output_bytes": 2}
    small = chunk(1000 - 2 * size - content_size({"name": "stdout", "text": ""}))
    assert gate.filter("iopub", small) == [small]  # what still fits, passes
    assert gate.filter("iopub", chunk(0)) == []
    other_rule = message("display_data", {"data": {"text/x": CANARY}, "metadata": {}}, cell)
    assert notices(gate.filter("iopub", other_rule)) == ["display.mime"]  # each rule is noticed once


def test_each_cell_has_its_own_budget() -> None:
    gate = make_gate(max_output_bytes=1000)
    first, second = run_cell(gate), run_cell(gate)
    assert notices(gate.filter("iopub", message("stream", {"name": "stdout", "text": "a" * 2000}, first)))
    sent = message("stream", {"name": "stdout", "text": "b" * 900}, second)
    assert gate.filter("iopub", sent) == [sent]
    assert notices(gate.filter("iopub", message("stream", {"name": "stdout", "text": "c" * 900}, second))) == [
        "display.max_output_bytes"
    ]


def test_a_request_seen_again_starts_a_fresh_budget() -> None:
    gate = make_gate(max_output_bytes=1000)
    cell = run_cell(gate)
    big = message("stream", {"name": "stdout", "text": "a" * 900}, cell)
    assert gate.filter("iopub", big) == [big]
    assert gate.filter("iopub", big) != [big]
    gate.observe_request("shell", cell)
    assert gate.filter("iopub", big) == [big]


def test_output_of_other_requests_is_only_capped_per_message() -> None:
    gate = make_gate(max_output_bytes=10, max_message_bytes=1000)
    callback = request("comm_msg")
    gate.observe_request("shell", callback)
    sent = message("stream", {"name": "stdout", "text": "widget callback output"}, callback)
    assert gate.filter("iopub", sent) == [sent]
    assert gate.filter("iopub", sent) == [sent]


@settings(max_examples=60)
@given(st.lists(st.integers(0, 700), max_size=30), st.integers(0, 3000))
def test_passed_output_never_exceeds_the_budget(lengths: list[int], budget: int) -> None:
    gate = make_gate(max_output_bytes=budget)
    cell = run_cell(gate)
    passed = 0
    noticed = 0
    for length in lengths:
        sent = message("stream", {"name": "stdout", "text": "x" * length}, cell)
        out = gate.filter("iopub", sent)
        if out == [sent]:
            passed += content_size(sent["content"])
        else:
            noticed += len(notices(out))
    assert passed <= budget
    assert noticed <= 1


# -- notices --------------------------------------------------------------------------------------------------------


def test_a_notice_is_a_fresh_stderr_stream_for_the_same_parent() -> None:
    gate = make_gate(mime=frozenset({"text/plain"}))
    cell = run_cell(gate)
    withheld = message("display_data", {"data": {"image/png": CANARY}, "metadata": {"image/png": CANARY}}, cell)
    withheld["metadata"] = {"smuggled": CANARY}
    (notice,) = gate.filter("iopub", withheld)
    assert notice["header"]["msg_type"] == "stream"
    assert notice["header"]["session"] == SESSION
    assert uuid.UUID(notice["header"]["msg_id"])
    assert notice["header"]["msg_id"] != withheld["header"]["msg_id"]
    assert notice["parent_header"] == cell["header"]
    assert notice["parent_header"] is not withheld["parent_header"]
    assert notice["metadata"] == {}
    assert notice["buffers"] == []
    assert notice["content"] == {
        "name": "stderr",
        "text": "[confnb] output withheld by the display policy (display.mime): none of its MIME types is allowed\n",
    }


@pytest.mark.parametrize(
    ("policy", "rule", "reason"),
    [
        ({"max_message_bytes": 10}, "display.max_message_bytes", "larger than the 10-byte limit for one message"),
        ({"max_output_bytes": 10}, "display.max_output_bytes", "the cell's output would exceed its 10-byte limit"),
    ],
)
def test_size_notices_name_the_limit(policy: dict[str, int], rule: str, reason: str) -> None:
    gate = make_gate(**policy)
    (notice,) = gate.filter("iopub", message("stream", {"name": "stdout", "text": CANARY * 5}, run_cell(gate)))
    assert notice["content"]["text"] == f"[confnb] output withheld by the display policy ({rule}): {reason}\n"


def test_notices_for_parentless_messages_are_also_sent_once() -> None:
    gate = make_gate(comms=False)
    assert notices(gate.filter("iopub", message("comm_msg", {"comm_id": "c", "data": {}}))) == ["comms"]
    assert gate.filter("iopub", message("comm_msg", {"comm_id": "c", "data": {}})) == []
    assert gate.withheld == {"comms": 2}


# -- the gate's own state -------------------------------------------------------------------------------------------


def test_withheld_is_a_copy() -> None:
    gate = make_gate(comms=False)
    gate.filter("iopub", sample("iopub", "comm_msg", run_cell(gate)))
    counts = gate.withheld
    counts["comms"] = 0  # type: ignore[index]
    assert gate.withheld == {"comms": 1}


def test_the_gate_can_be_tightened_but_never_loosened() -> None:
    gate = make_gate(mime=frozenset({"text/plain", "text/html"}), max_output_bytes=5000)
    gate.tighten(DisplayPolicy())
    assert gate.policy == DisplayPolicy(mime=frozenset({"text/plain", "text/html"}), max_output_bytes=5000)
    gate.tighten(DisplayPolicy(mime=frozenset({"text/plain"}), tracebacks="redacted", comms=False))
    assert gate.policy.mime == {"text/plain"}
    assert gate.policy.tracebacks == "redacted" and gate.policy.comms is False
    assert gate.policy.max_output_bytes == 5000
    cell = run_cell(gate)
    html = message("display_data", {"data": {"text/html": CANARY}, "metadata": {}}, cell)
    assert notices(gate.filter("iopub", html)) == ["display.mime"]
    with pytest.raises(AttributeError):
        gate.policy = DisplayPolicy()  # type: ignore[misc]


def test_the_gate_refuses_anything_but_a_policy() -> None:
    with pytest.raises(TypeError):
        MessageGate({"mime": []}, new_header)  # type: ignore[arg-type]


# -- properties over arbitrary input --------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from([CANARY, "text/plain", "stdout", "ok", "error", "Cell In[1], line 3"])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=16,
)
msg_types = st.sampled_from([*ALL_TYPES, "confnb_attestation_reply", "connect_reply", "debug_event"]) | st.text(
    max_size=12
)
headers = st.fixed_dictionaries(
    {"msg_type": msg_types},
    optional={"msg_id": json_scalars, "session": json_scalars, "date": json_scalars, "extra": json_values},
)
contents = st.sampled_from([content for samples in SAMPLES.values() for content in samples.values()]).flatmap(
    lambda base: st.dictionaries(st.sampled_from([*base, "data", "metadata", "status"]), json_values, max_size=4).map(
        lambda changes: {**copy.deepcopy(base), **changes}
    )
)
messages = st.fixed_dictionaries(
    {},
    optional={
        "header": headers | json_values,
        "parent_header": headers | st.just({}) | json_values,
        "metadata": st.just({}) | json_values,
        "content": contents | json_values,
        "buffers": st.lists(st.binary(max_size=8), max_size=2) | json_values,
        "msg_type": msg_types,
    },
)
channels = st.sampled_from(["iopub", "shell", "control", "stdin"])
policies = st.builds(
    DisplayPolicy,
    mime=st.frozensets(st.sampled_from(sorted(DEFAULT_MIME))),
    max_message_bytes=st.integers(0, 2000),
    max_output_bytes=st.integers(0, 2000),
    tracebacks=st.sampled_from(["full", "redacted"]),
    comms=st.booleans(),
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(policies, channels, st.lists(messages | json_values, min_size=1, max_size=4), st.booleans())
def test_filter_never_raises_and_returns_well_formed_messages(
    policy: DisplayPolicy, channel: str, stream: list[Any], observe: bool
) -> None:
    gate = MessageGate(policy, new_header)
    for sent in stream:
        if observe and isinstance(sent, dict) and isinstance(sent.get("parent_header"), dict):
            gate.observe_request("shell", {"header": sent["parent_header"], "content": {"code": "x"}})
        before = copy.deepcopy(sent)
        out = gate.filter(channel, sent)
        assert_well_formed(out)
        assert json.dumps(sent, default=str, sort_keys=True) == json.dumps(before, default=str, sort_keys=True)
    assert all(rule in RULES for rule in gate.withheld)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(policies, channels, messages)
def test_a_message_passes_unchanged_or_as_a_copy(policy: DisplayPolicy, channel: str, sent: Message) -> None:
    gate = MessageGate(policy, new_header)
    for out in gate.filter(channel, sent):
        if out is not sent:
            for part in ("header", "parent_header", "metadata", "content", "buffers"):
                assert out[part] is not sent.get(part)


# Where a canary can sit in a message that the gate must not let it out of.
def _canary_in_disallowed_mime(data: dict[str, str], channel_hint: str) -> tuple[str, Message, DisplayPolicy]:
    content = {"data": {**data, "application/x-exfil": CANARY}, "metadata": {"application/x-exfil": CANARY}}
    return "iopub", message("display_data", content, request()), DisplayPolicy()


def _canary_in_traceback(data: dict[str, str], channel_hint: str) -> tuple[str, Message, DisplayPolicy]:
    content = {"ename": "ValueError", "evalue": CANARY, "traceback": [*data.values(), CANARY, *IPYTHON_TRACEBACK]}
    return "iopub", message("error", content, request()), DisplayPolicy(tracebacks="redacted")


def _canary_in_failed_reply(data: dict[str, str], channel_hint: str) -> tuple[str, Message, DisplayPolicy]:
    content = {"status": "error", "execution_count": 1, "ename": CANARY, "evalue": CANARY, "traceback": [CANARY]}
    content["user_expressions"] = {"e": {"status": "error", "ename": "E", "evalue": CANARY, "traceback": [CANARY]}}
    return channel_hint, message("execute_reply", content, request()), DisplayPolicy(tracebacks="redacted")


def _canary_in_forbidden_type(data: dict[str, str], channel_hint: str) -> tuple[str, Message, DisplayPolicy]:
    return channel_hint, message("debug_event", {"body": {**data, "v": CANARY}}, request()), DisplayPolicy()


def _canary_in_oversize(data: dict[str, str], channel_hint: str) -> tuple[str, Message, DisplayPolicy]:
    sent = message("execute_result", {"execution_count": 1, "data": {**data, "text/plain": CANARY}}, request())
    return "iopub", sent, DisplayPolicy(max_message_bytes=len(CANARY))


def _canary_in_malformed(data: dict[str, str], channel_hint: str) -> tuple[str, Message, DisplayPolicy]:
    return channel_hint, message("execute_reply", {"status": CANARY, **data}, request()), DisplayPolicy()


def _canary_in_closed_comms(data: dict[str, str], channel_hint: str) -> tuple[str, Message, DisplayPolicy]:
    sent = message("comm_msg", {"comm_id": "c", "data": {**data, "x": CANARY}}, request(), buffers=[CANARY.encode()])
    return "iopub", sent, DisplayPolicy(comms=False)


def _canary_in_prompt(data: dict[str, str], channel_hint: str) -> tuple[str, Message, DisplayPolicy]:
    return "stdin", message("input_request", {"prompt": CANARY * 3}, request()), DisplayPolicy(max_message_bytes=20)


def _canary_in_history(data: dict[str, str], channel_hint: str) -> tuple[str, Message, DisplayPolicy]:
    content = {"status": "ok", "history": [[1, 1, ["x", CANARY]]]}
    return channel_hint, message("history_reply", content, request()), DisplayPolicy(mime=frozenset({"image/png"}))


def _canary_in_debug_reply(data: dict[str, str], channel_hint: str) -> tuple[str, Message, DisplayPolicy]:
    return channel_hint, message("debug_reply", {"status": "ok", "body": CANARY}, request()), DisplayPolicy()


def _canary_in_forged_echo(data: dict[str, str], channel_hint: str) -> tuple[str, Message, DisplayPolicy]:
    return "iopub", message("execute_input", {"code": CANARY, "execution_count": 1}, request()), DisplayPolicy()


CANARY_CASES = [
    _canary_in_disallowed_mime,
    _canary_in_traceback,
    _canary_in_failed_reply,
    _canary_in_forbidden_type,
    _canary_in_oversize,
    _canary_in_malformed,
    _canary_in_closed_comms,
    _canary_in_prompt,
    _canary_in_history,
    _canary_in_debug_reply,
    _canary_in_forged_echo,
]


@settings(max_examples=300)
@given(
    st.sampled_from(CANARY_CASES),
    st.dictionaries(st.sampled_from(["text/plain", "image/png", "text/markdown"]), st.text(max_size=20), max_size=3),
    st.sampled_from(["shell", "control"]),
    st.integers(0, 3),
)
def test_a_canary_in_a_withheld_part_never_comes_out(
    case: Callable[[dict[str, str], str], tuple[str, Message, DisplayPolicy]],
    data: dict[str, str],
    channel_hint: str,
    repeat: int,
) -> None:
    assume(all(CANARY not in value for value in data.values()))
    channel, sent, policy = case(data, channel_hint)
    gate = MessageGate(policy, new_header)
    for _ in range(repeat + 1):
        out = gate.filter(channel, copy.deepcopy(sent))
        assert_well_formed(out)
        assert not leaked(out)
    assert sum(gate.withheld.values()) >= repeat + 1


# -- vault refusals under redaction: the rule survives, nothing else does ----------------------------------------------


def test_an_uncaught_refusal_keeps_the_rule_and_the_datasets() -> None:
    gate = make_gate(tracebacks="redacted")
    evalue = "a mean is computed from fewer than 10 records of the dataset [rule release.min_group_size of 'patients']"
    (out,) = gate.filter(
        "iopub", message("error", {"ename": "PolicyViolation", "evalue": evalue, "traceback": IPYTHON_TRACEBACK})
    )
    assert out["content"] == {
        "ename": "PolicyViolation",
        "evalue": "[rule release.min_group_size of 'patients']",
        "traceback": [
            "PolicyViolation at line 4 of the cell: withheld by the data owner's output policy "
            "[rule release.min_group_size of 'patients'] (details withheld by the display policy)"
        ],
    }


def test_a_refusal_of_several_datasets_names_them_all() -> None:
    gate = make_gate(tracebacks="redacted")
    evalue = "x [rule release.never_release of 'claims', 'patients.v2']"
    (out,) = gate.filter("iopub", message("error", {"ename": "PolicyViolation", "evalue": evalue, "traceback": []}))
    assert out["content"]["evalue"] == "[rule release.never_release of 'claims', 'patients.v2']"
    assert "of 'claims', 'patients.v2'] (details withheld" in out["content"]["traceback"][0]


@pytest.mark.parametrize(
    ("ename", "evalue"),
    [
        ("ValueError", "[rule release.allow of 'patients']"),  # only a PolicyViolation is a refusal
        ("PolicyViolation", f"[rule {CANARY} of 'patients']"),  # not even a rule's shape
        # well-formed, but not one of the vault's rules: only the allowlist stops the analyst's words
        ("PolicyViolation", "[rule release.canary.is_forty_two of 'patients']"),
        ("PolicyViolation", "[rule display.mime of 'patients']"),
        ("PolicyViolation", f"[rule release.allow of '{CANARY} x']"),  # not a dataset id
        ("PolicyViolation", f"[rule release.allow of 'patients', {CANARY}]"),
        ("PolicyViolation", "[rule release.allow of " + ", ".join(f"'d{i}'" for i in range(9)) + "]"),  # too many
        ("PolicyViolation", f"[rule release.allow of 'patients'] {CANARY}"),  # not at the end
        ("PolicyViolation", f"{CANARY}[rule release.allow of 'patients']"),  # glued to other text
        ("PolicyViolation", "[rule release.allow of 'patients']\n"),
        ("PolicyViolation", CANARY),
    ],
)
def test_anything_but_a_well_formed_refusal_is_redacted_as_before(ename: str, evalue: str) -> None:
    gate = make_gate(tracebacks="redacted")
    (out,) = gate.filter("iopub", message("error", {"ename": ename, "evalue": evalue, "traceback": []}))
    assert out["content"]["evalue"] == ""
    assert out["content"]["traceback"] == [f"{ename} (details withheld by the display policy)"]
    assert not leaked([out])


def test_the_refusal_in_a_redacted_error_reply_keeps_its_rule() -> None:
    gate = make_gate(tracebacks="redacted")
    cell = run_cell(gate)
    content = {
        "status": "error",
        "execution_count": 1,
        "ename": "PolicyViolation",
        "evalue": f"{CANARY} [rule release.max_rows of 'loans']",
        "traceback": IPYTHON_TRACEBACK,
    }
    (out,) = gate.filter("shell", message("execute_reply", content, cell))
    assert out["content"]["evalue"] == "[rule release.max_rows of 'loans']"
    assert not leaked([out])


@pytest.mark.parametrize(
    "rule",
    [
        "release.max_releases",
        "release.difference",
        "release.order_statistics",
        "privacy.mode",
        "privacy.budget",
    ],
)
def test_every_rule_the_vault_names_survives_redaction(rule: str) -> None:
    gate = make_gate(tracebacks="redacted")
    evalue = f"{CANARY} [rule {rule} of 'admissions']"
    (out,) = gate.filter("iopub", message("error", {"ename": "PolicyViolation", "evalue": evalue, "traceback": []}))
    assert out["content"]["evalue"] == f"[rule {rule} of 'admissions']"
    assert not leaked([out])
