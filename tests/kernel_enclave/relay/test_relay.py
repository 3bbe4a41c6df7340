"""The relay against a real confidential kernel: attestation endpoint, channel security, and a hostile executor.

Every test talks to a kernel started by kernelspec name through confnb-provisioner (launcher, relay, executor as
real processes, CurveZMQ on loopback). Analyst code is the adversary: whatever it does inside the executor must
not reach the client except through the gate, and must not reach the client's keys at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from jupyter_client.session import Session

from confnb.attest.evidence import Evidence
from confnb.provisioner import ConfidentialProvisioner
from kernel_enclave.relay.relay import ATTESTATION_COMM_TARGET, ATTESTATION_FEATURE

from .conftest import Kernel, start_kernel, stop_kernel

pytestmark = pytest.mark.slow


def _control_request(kernel: Kernel, msg_type: str, content: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
    message = kernel.client.session.msg(msg_type, content)
    kernel.client.control_channel.send(message)
    deadline = time.monotonic() + timeout
    while True:
        reply = kernel.client.control_channel.get_msg(timeout=max(0.1, deadline - time.monotonic()))
        kernel.seen.append(reply)
        if reply["parent_header"].get("msg_id") == message["header"]["msg_id"]:
            return reply


def _provisioner(kernel: Kernel) -> ConfidentialProvisioner:
    provisioner = kernel.manager.provisioner
    assert isinstance(provisioner, ConfidentialProvisioner)
    return provisioner


# -- attestation endpoint -------------------------------------------------------------------------------------


def test_kernel_info_advertises_attestation_and_no_debugger(kernel: Kernel) -> None:
    kernel.client.kernel_info()
    reply = kernel.client.get_shell_msg(timeout=10)
    features = reply["content"]["supported_features"]
    assert ATTESTATION_FEATURE in features
    assert "debugger" not in features


def test_attestation_reply_verifies_with_the_cli_and_carries_the_nonce(kernel: Kernel, tmp_path: Path) -> None:
    nonce = secrets.token_hex(32)
    reply = _control_request(kernel, "confnb_attestation_request", {"nonce": nonce})
    assert reply["msg_type"] == "confnb_attestation_reply"
    assert reply["content"]["status"] == "ok"
    evidence = Evidence.from_dict(reply["content"]["evidence"])
    assert evidence.claims["nonce"] == nonce
    # Bound to the channel the client actually uses.
    assert evidence.claims["curve_public_key"] == kernel.manager.curve_publickey.decode()
    bundle = tmp_path / "evidence.json"
    bundle.write_text(evidence.to_json())
    policy = kernel.manager.kernel_spec.resource_dir + "/attestation.toml"  # type: ignore[union-attr]
    command = [sys.executable, "-m", "confnb", "attest", "verify", str(bundle), "--policy", policy]
    accepted = subprocess.run([*command, "--nonce", nonce], capture_output=True, text=True, check=False)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    replayed = subprocess.run([*command, "--nonce", secrets.token_hex(32)], capture_output=True, text=True, check=False)
    assert replayed.returncode == 1
    assert "nonce" in replayed.stdout


def test_attestation_is_answered_while_a_cell_runs(kernel: Kernel) -> None:
    busy_id = kernel.client.execute("import time; time.sleep(6)")
    started = time.monotonic()
    reply = _control_request(kernel, "confnb_attestation_request", {"nonce": "ab" * 16})
    assert reply["content"]["status"] == "ok"
    assert time.monotonic() - started < 4  # answered by the relay, not queued behind the cell
    # Let the sleeping cell finish so later tests start from an idle kernel.
    while kernel.client.get_shell_msg(timeout=20)["parent_header"].get("msg_id") != busy_id:
        pass


def test_bad_attestation_requests_get_an_error_reply(kernel: Kernel) -> None:
    for content in ({}, {"nonce": "not hex"}, {"nonce": "00" * 65}):
        reply = _control_request(kernel, "confnb_attestation_request", content)
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "AttestationError"


def test_attestation_comm_target(kernel: Kernel) -> None:
    nonce = secrets.token_hex(16)
    comm_id = secrets.token_hex(16)
    message = kernel.client.session.msg(
        "comm_open", {"comm_id": comm_id, "target_name": ATTESTATION_COMM_TARGET, "data": {"nonce": nonce}}
    )
    kernel.client.shell_channel.send(message)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        reply = kernel.client.get_iopub_msg(timeout=10)
        if reply["msg_type"] == "comm_msg" and reply["content"]["comm_id"] == comm_id:
            evidence = Evidence.from_dict(reply["content"]["data"]["evidence"])
            assert evidence.claims["nonce"] == nonce
            return
    pytest.fail("no comm_msg with evidence")


def test_debug_requests_are_refused(kernel: Kernel) -> None:
    reply = _control_request(kernel, "debug_request", {"command": "initialize", "arguments": {}, "seq": 1})
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "DebuggerDisabled"


# -- the channel ----------------------------------------------------------------------------------------------


def _signed_kernel_info(key: bytes) -> list[bytes]:
    session = Session(key=key)
    return session.serialize(session.msg("kernel_info_request", {}))


def _nothing_arrives(sock: zmq.Socket[bytes], seconds: float = 2.0) -> bool:
    return sock.poll(int(seconds * 1000)) == 0


@pytest.mark.parametrize("client_keys", ["none", "other-pair"])
def test_a_client_with_the_hmac_key_but_not_the_curve_keys_gets_nothing(kernel: Kernel, client_keys: str) -> None:
    manager = kernel.manager
    context = zmq.Context()
    try:
        shell = context.socket(zmq.DEALER)
        iopub = context.socket(zmq.SUB)
        for sock in (shell, iopub):
            sock.linger = 0
            # Once the kernel has refused the handshake the socket has no peer, and a send would wait for one.
            sock.sndtimeo = 2000
            if client_keys == "other-pair":
                # The server key is public (it is in the evidence); a client pair of its own must still be refused.
                public, secret = zmq.curve_keypair()
                sock.curve_publickey, sock.curve_secretkey = public, secret
                sock.curve_serverkey = manager.curve_publickey
        iopub.setsockopt(zmq.SUBSCRIBE, b"")
        shell.connect(f"tcp://{manager.ip}:{manager.shell_port}")
        iopub.connect(f"tcp://{manager.ip}:{manager.iopub_port}")
        with contextlib.suppress(zmq.Again):  # refused before the request could even be queued
            shell.send_multipart(_signed_kernel_info(manager.session.key))
        kernel.execute("print('output the intruder must not see')")
        assert _nothing_arrives(shell)
        assert _nothing_arrives(iopub, 0.5)
    finally:
        context.destroy(linger=0)
    # The legitimate client is unaffected.
    assert kernel.stdout("print('still here')") == "still here\n"


class _LoopbackCapture:
    """Every TCP payload on the loopback interface, from a raw AF_PACKET socket (needs CAP_NET_RAW)."""

    def __init__(self, ports: set[int]) -> None:
        self.ports = ports
        self.payload = bytearray()
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame = self.sock.recv(65535)
            except TimeoutError:
                continue
            self._take(frame)

    def _take(self, frame: bytes) -> None:
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":  # Ethernet + IPv4 only (the kernel binds 127.0.0.1)
            return
        ip = frame[14:]
        header_length = (ip[0] & 0x0F) * 4
        if ip[9] != 6:  # TCP
            return
        tcp = ip[header_length:]
        source, destination = struct.unpack("!HH", tcp[:4])
        if source in self.ports or destination in self.ports:
            self.payload += tcp[(tcp[12] >> 4) * 4 :]

    def stop(self) -> bytes:
        self._stop.set()
        self._thread.join()
        self.sock.close()
        return bytes(self.payload)


@pytest.fixture
def capture(kernel: Kernel) -> Iterator[_LoopbackCapture]:
    try:
        capturing = _LoopbackCapture({kernel.manager.shell_port, kernel.manager.iopub_port})
    except PermissionError:
        pytest.skip("capturing loopback traffic needs CAP_NET_RAW (run as root)")
    yield capturing
    capturing.stop()


def test_captured_loopback_traffic_holds_no_plaintext(kernel: Kernel, capture: _LoopbackCapture) -> None:
    canary = "CANARY-" + secrets.token_hex(8)
    assert kernel.stdout(f"print('{canary}')") == canary + "\n"
    traffic = capture.stop()
    assert len(traffic) > 200, "the capture saw no kernel traffic; it would prove nothing"
    assert canary.encode() not in traffic
    assert b"print(" not in traffic  # the code the client sent is encrypted too
    assert b"execute_request" not in traffic and b"msg_type" not in traffic


# -- the executor is hostile ------------------------------------------------------------------------------------


def test_the_executor_holds_none_of_the_clients_keys(kernel: Kernel) -> None:
    manager = kernel.manager
    code = (
        "import json, os\n"
        "k = get_ipython().kernel\n"
        "cf = get_ipython().config['IPKernelApp']['connection_file']\n"
        "found = [k.session.key.decode(), open(cf).read(), json.dumps(dict(os.environ)),\n"
        "         open('/proc/self/cmdline','rb').read().decode(errors='replace')]\n"
        "for name in os.listdir(os.path.dirname(cf)):\n"
        "    path = os.path.join(os.path.dirname(cf), name)\n"
        "    if os.path.isfile(path): found.append(open(path, errors='replace').read())\n"
        "print(json.dumps(found))\n"
    )
    visible = kernel.stdout(code)
    for secret in (manager.session.key, manager.curve_secretkey):
        assert secret.decode() not in visible
    assert json.loads(visible)[0] != manager.session.key.decode()


def test_the_executor_cannot_read_or_write_the_relays_memory(kernel: Kernel) -> None:
    code = (
        "import os\n"
        "relay = os.getppid()\n"
        "results = []\n"
        "for name, mode in (('mem', 'rb'), ('mem', 'r+b'), ('environ', 'rb'), ('maps', 'rb')):\n"
        "    try:\n"
        "        with open(f'/proc/{relay}/{name}', mode) as handle:\n"
        "            handle.read(16)\n"
        "        results.append(f'{name}:{mode}:open')\n"
        "    except OSError as exc:\n"
        "        results.append(f'{name}:{mode}:{type(exc).__name__}')\n"
        "print(' '.join(results))\n"
        "print(open('/proc/self/status').read().split('CapEff:')[1].split()[0])\n"
    )
    results, capabilities = kernel.stdout(code).splitlines()
    assert results.split() == [
        "mem:rb:PermissionError",
        "mem:r+b:PermissionError",
        "environ:rb:PermissionError",
        "maps:rb:PermissionError",
    ]
    assert int(capabilities, 16) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="the executor switches users only when the kernel starts as root")
def test_a_root_kernel_runs_the_analysts_code_as_nobody(kernel: Kernel) -> None:
    """As root without capabilities it could still open the TEE device and have reports signed for its own keys."""
    code = (
        "import os\n"
        "print(os.getuid(), os.geteuid(), os.getgid(), os.getgroups())\n"
        "try:\n"
        "    os.setuid(0)\n"
        "except PermissionError:\n"
        "    print('setuid refused')\n"
    )
    nobody = pwd.getpwnam("nobody")
    identity, refused = kernel.stdout(code).splitlines()
    assert identity == f"{nobody.pw_uid} {nobody.pw_uid} {nobody.pw_gid} []"
    assert refused == "setuid refused"


FORGERY = """
import json, uuid, datetime
from jupyter_client.session import Session
k = get_ipython().kernel
canary = {reversed_canary!r}[::-1]  # the literal canary is not in the code the client sent
session = k.session
{setup}
def forge(msg_type, content, channel='iopub'):
    header = session.msg_header(msg_type)
    msg = dict(header=header, parent_header=k.get_parent('shell')['header'], metadata={{}}, content=content, buffers=[])
    socket = k.iopub_socket if channel == 'iopub' else k.shell_stream
    session.send(socket, msg, ident=b'kernel.forged')
{attack}
"""

ATTACKS = {
    "unknown message type": ("", "forge('confnb_attestation_reply', {'status': 'ok', 'evidence': canary})"),
    "disallowed mime via a forged display": (
        "",
        "forge('display_data', {'data': {'application/x-exfiltrate': canary}, 'metadata': {}, 'transient': {}})",
    ),
    "session class swapped back to stock": (
        "k.session.__class__ = Session",
        "forge('debug_event', {'event': 'stopped', 'body': canary})",
    ),
    "raw frames with a wrong signature": (
        "",
        "k.iopub_socket.send_multipart([b'kernel.x', b'<IDS|MSG>', b'0'*64, "
        "json.dumps(session.msg_header('stream'), default=str).encode(), b'{}', b'{}', "
        "json.dumps({'name': 'stdout', 'text': canary}).encode()])",
    ),
    "monkeypatched display publisher": (
        "import IPython.core.display_functions as d",
        "get_ipython().display_pub.publish = lambda data, metadata=None, **kw: forge("
        "'display_data', {'data': {'application/x-exfiltrate': canary}, 'metadata': {}, 'transient': {}}); "
        "from IPython.display import display; display({'text/plain': 'x'}, raw=True)",
    ),
    "forged execute_input with other code": ("", "forge('execute_input', {'code': canary, 'execution_count': 1})"),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_forged_output_from_the_executor_is_withheld(kernel: Kernel, attack: str) -> None:
    canary = "CANARY-" + secrets.token_hex(8)
    setup, action = ATTACKS[attack]
    before = len(kernel.seen)
    reply, _ = kernel.execute(FORGERY.format(reversed_canary=canary[::-1], setup=setup, attack=action))
    assert reply["content"]["status"] == "ok", reply["content"]
    kernel.stdout("print('sync')")  # anything still in flight from the attack arrives before this
    received = json.dumps(kernel.seen[before:], default=str)
    assert canary not in received


@pytest.fixture(scope="module")
def logged_kernel(install_variant: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Kernel, Path]]:
    """A kernel whose launcher's stdout and stderr are also appended to files: the host's logs."""
    logs = tmp_path_factory.mktemp("host-logs") / "launcher"
    wrapper = ["sh", "-c", '"$@" 2>>"$0.err" | tee -a "$0.out"', str(logs)]
    started = start_kernel(install_variant("confnb-snp-logged", config={"launcher_wrapper": wrapper}))
    yield started, logs
    stop_kernel(started)


def test_low_level_output_never_reaches_the_hosts_logs(logged_kernel: tuple[Kernel, Path]) -> None:
    kernel, logs = logged_kernel
    canary = "CANARY-" + secrets.token_hex(8)
    code = (
        "import os, subprocess, sys\n"
        f"os.write(1, b'{canary} fd1\\n'); os.write(2, b'{canary} fd2\\n')\n"
        f"subprocess.run(['echo', '{canary} child'])\n"
        f"sys.__stdout__.write('{canary} dunder\\n'); sys.__stdout__.flush()\n"
        f"sys.__stderr__.write('{canary} dunder\\n'); sys.__stderr__.flush()\n"
    )
    _, outputs = kernel.execute(code)
    assert canary in json.dumps(outputs, default=str)  # the analyst sees it (default policy): it went through the gate
    time.sleep(0.5)
    host_logs = Path(f"{logs}.out").read_bytes() + Path(f"{logs}.err").read_bytes()
    assert b"confnb-launch-response/1" in host_logs  # the wrapper did see the launcher's output
    assert canary.encode() not in host_logs


# -- a data owner's display policy tightens the gate ---------------------------------------------------------------


@pytest.fixture(scope="module")
def strict_kernel(install_variant: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kernel]:
    policy = tmp_path_factory.mktemp("display") / "display.toml"
    policy.write_text('[display]\nmime = ["text/plain"]\nmax_output_bytes = 4000\ntracebacks = "redacted"\n')
    name = install_variant("confnb-snp-strict", config={"display_policy": str(policy)})
    started = start_kernel(name)
    yield started
    stop_kernel(started)


def test_strict_display_policy_withholds_html_and_names_the_rule(strict_kernel: Kernel) -> None:
    canary = "CANARY-" + secrets.token_hex(8)
    code = f"from IPython.display import HTML, display; display(HTML('<b>' + {canary[::-1]!r}[::-1] + '</b>'))"
    _, outputs = strict_kernel.execute(code)
    assert canary not in json.dumps(outputs, default=str)
    notices = [m["content"]["text"] for m in outputs if m["msg_type"] == "stream"]
    assert any("display.mime" in text for text in notices), outputs


def test_strict_display_policy_redacts_tracebacks(strict_kernel: Kernel) -> None:
    canary = "CANARY-" + secrets.token_hex(8)
    reply, outputs = strict_kernel.execute(f"x = 1\nraise ValueError('{canary}')")
    assert reply["content"]["status"] == "error"
    errors = [m for m in outputs if m["msg_type"] == "error"]
    assert errors and canary not in json.dumps(errors, default=str) and canary not in json.dumps(reply, default=str)
    assert errors[0]["content"]["ename"] == "ValueError"
    assert "line 2" in errors[0]["content"]["traceback"][0]


def test_strict_display_policy_caps_a_cells_output(strict_kernel: Kernel) -> None:
    _, outputs = strict_kernel.execute("for _ in range(20): print('Z' * 1000, flush=True)")
    text = "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream")
    assert text.count("Z") <= 4000
    assert "display.max_output_bytes" in text or "display.max_message_bytes" in text
    gate = _control_request(strict_kernel, "confnb_gate_request", {})
    assert (
        gate["content"]["withheld"].get("display.max_output_bytes", 0)
        + gate["content"]["withheld"].get("display.max_message_bytes", 0)
        >= 1
    )


def test_input_requests_reach_the_client_and_its_answer_the_cell(kernel: Kernel) -> None:
    """stdin is relayed both ways: the executor's input_request finds the client that ran the cell."""
    msg_id = kernel.client.execute("answer = input('your name? ')\nprint('hello', answer)", allow_stdin=True)
    request = kernel.client.get_stdin_msg(timeout=20)
    assert request["msg_type"] == "input_request"
    assert request["content"]["prompt"] == "your name? "
    kernel.client.input("analyst")
    reply = kernel.client.get_shell_msg(timeout=20)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["status"] == "ok"
    assert kernel.stdout("print(answer)") == "analyst\n"


def test_user_expressions_pass_through_the_gate(kernel: Kernel) -> None:
    msg_id = kernel.client.execute("y = 6", user_expressions={"double": "y * 2", "bad": "1/0"})
    reply = kernel.client.get_shell_msg(timeout=20)
    assert reply["parent_header"]["msg_id"] == msg_id
    expressions = reply["content"]["user_expressions"]
    assert expressions["double"]["data"]["text/plain"] == "12"
    assert expressions["bad"]["ename"] == "ZeroDivisionError"
