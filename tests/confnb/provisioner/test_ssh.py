"""The SSH launcher transport against real processes: a fake ``ssh`` (fake_ssh.py) whose "remote" is this machine.

The fake runs the remote command with ``/bin/sh -c`` like a real login shell would, and its ``-N -L`` tunnels really
listen and pump bytes, so quoting, stdio round trips, forwarding, ssh failures, timeouts and tunnel shutdown are all
observed from the outside: through argv logs, TCP connections and process ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from confnb.provisioner import ssh as ssh_module
from confnb.provisioner.ssh import SshTransport
from confnb.provisioner.transport import CHANNELS, TransportError

FAKE_SSH = Path(__file__).with_name("fake_ssh.py")
FAKE = (sys.executable, str(FAKE_SSH))
HOST = "cvm.test"
PREFIX = ["-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes"]


@pytest.fixture
def ssh_log(monkeypatch, tmp_path):
    """The fake ssh resolves only HOST and logs every invocation's argv, one JSON list per line."""
    log = tmp_path / "ssh.log"
    monkeypatch.setenv("FAKE_SSH_HOST", HOST)
    monkeypatch.setenv("FAKE_SSH_LOG", str(log))
    return log


def logged(log):
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def transport(**kwargs):
    kwargs.setdefault("ssh_command", FAKE)
    kwargs.setdefault("connect_timeout", 5.0)
    return SshTransport(kwargs.pop("host", HOST), **kwargs)


def refuses(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@contextlib.asynccontextmanager
async def echo_servers(names):
    """One TCP server per channel on loopback; each answers ``name:`` + everything it received, then closes."""

    async def handle(name, reader, writer):
        with contextlib.suppress(OSError):
            data = await reader.read()
            writer.write(name.encode() + b":" + data)
            await writer.drain()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    servers = {}
    try:
        for name in names:
            servers[name] = await asyncio.start_server(
                lambda r, w, name=name: handle(name, r, w), "127.0.0.1", 0, reuse_address=True
            )
        yield {name: server.sockets[0].getsockname()[1] for name, server in servers.items()}
    finally:
        for server in servers.values():
            server.close()
            await server.wait_closed()


async def round_trip(port, payload):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), timeout=5)
    finally:
        writer.close()
        await writer.wait_closed()


# -- the launcher command -------------------------------------------------------------------------------------


def test_launcher_argv_shape_ignores_the_local_command():
    full = SshTransport(
        "vm.example",
        user="alice",
        port=2222,
        identity_file="/keys/id ed25519",
        options=("-o", "StrictHostKeyChecking=yes"),
        remote_argv=("/opt/venv/bin/python", "-m", "kernel_enclave.launcher"),
    )
    assert full.launcher_argv([sys.executable, "-m", "kernel_enclave.launcher", "--local"]) == [
        "ssh", "-T", *PREFIX, "-p", "2222", "-i", "/keys/id ed25519", "-l", "alice",
        "-o", "StrictHostKeyChecking=yes", "--", "vm.example", "/opt/venv/bin/python -m kernel_enclave.launcher",
    ]  # fmt: skip
    assert SshTransport("vm").launcher_argv([]) == [
        "ssh",
        "-T",
        *PREFIX,
        "--",
        "vm",
        "python3 -m kernel_enclave.launcher",
    ]
    assert SshTransport("vm").bind_ip() == "127.0.0.1"
    assert SshTransport("vm").name == "ssh"


def test_remote_command_survives_the_remote_shell(ssh_log):
    tricky = ["a b", "it's", '"quoted"', "$HOME", "`id`", "semi;colon && x", "back\\slash", "", "new\nline", "*"]
    remote = [sys.executable, "-c", "import json, sys; print(json.dumps(sys.argv[1:]))", *tricky]
    argv = transport(remote_argv=remote).launcher_argv(["ignored"])
    result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == tricky
    assert logged(ssh_log) == [argv[2:]]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("host", "-oProxyCommand=touch /tmp/pwned", "read it as an option"),
        ("host", "-oProxyCommand=x", "read it as an option"),
        ("host", "", "must not be empty"),
        ("host", "vm example", "whitespace or control"),
        ("host", "vm\n-oProxyCommand=x", "whitespace or control"),
        ("host", "vm\x00", "whitespace or control"),
        ("host", "vm\u2028", "whitespace or control"),
        ("user", "-oProxyCommand=x", "read it as an option"),
        ("user", "al ice", "whitespace or control"),
        ("user", "alice\t", "whitespace or control"),
        ("port", 0, "between 1 and 65535"),
        ("port", 70000, "between 1 and 65535"),
        ("remote_argv", (), "must not be empty"),
        ("ssh_command", (), "must not be empty"),
        ("connect_timeout", 0, "must be positive"),
    ],
)
def test_option_injection_and_nonsense_are_refused(field, value, message):
    kwargs = {"host": "vm", field: value}
    with pytest.raises(ValueError, match=message) as caught:
        SshTransport(kwargs.pop("host"), **kwargs)
    assert "\n" not in str(caught.value).replace(repr(value), "")


# -- spawn --------------------------------------------------------------------------------------------------------

ECHO_LINE = "import sys; line = sys.stdin.readline(); print('echo ' + line.strip(), flush=True); sys.exit(7)"


def test_spawn_runs_the_remote_command_with_piped_stdio(ssh_log, tmp_path):
    ssh = transport(remote_argv=(sys.executable, "-c", ECHO_LINE))

    async def scenario():
        process = await ssh.spawn(ssh.launcher_argv([]), os.environ, str(tmp_path))
        process.stdin.write(b"hello 'world'\n")
        await process.stdin.drain()
        line = await asyncio.wait_for(process.stdout.readline(), timeout=10)
        rest, errors = await asyncio.wait_for(process.communicate(), timeout=10)
        return line, rest, errors, process.returncode

    assert asyncio.run(scenario()) == (b"echo hello 'world'\n", b"", b"", 7)
    [argv] = logged(ssh_log)
    assert argv[0] == "-T"
    assert argv[-2] == HOST


def test_spawn_reports_ssh_failures_through_the_process(ssh_log):
    ssh = transport(host="elsewhere.test", remote_argv=(sys.executable, "-c", ECHO_LINE))

    async def scenario():
        process = await ssh.spawn(ssh.launcher_argv([]), os.environ, None)
        _, errors = await asyncio.wait_for(process.communicate(b"x\n"), timeout=10)
        return process.returncode, errors

    status, errors = asyncio.run(scenario())
    assert status == 255
    assert b"Could not resolve hostname elsewhere.test" in errors


def test_spawn_without_an_ssh_client_is_a_transport_error(tmp_path):
    ssh = transport(ssh_command=(str(tmp_path / "no-ssh"),))
    with pytest.raises(TransportError, match=r"cannot start ssh .*no-ssh") as caught:
        asyncio.run(ssh.spawn(ssh.launcher_argv([]), os.environ, None))
    assert "\n" not in str(caught.value)


# -- connect / close ------------------------------------------------------------------------------------------


def test_connect_forwards_every_channel_and_close_ends_the_tunnel(ssh_log):
    ssh = transport(user="alice", port=2222, identity_file="/keys/id", options=("-o", "ServerAliveInterval=5"))
    payloads = {name: os.urandom(200_000) for name in CHANNELS}

    async def scenario():
        async with echo_servers(CHANNELS) as remote:
            try:
                address, local = await ssh.connect(ssh.bind_ip(), remote)
                replies = {name: await round_trip(local[name], payloads[name]) for name in CHANNELS}
                # Several connections at once through one forward, as ZMQ reconnects may do.
                again = await asyncio.gather(*(round_trip(local["shell"], b"%d" % i) for i in range(5)))
            finally:
                await ssh.close()
            return address, local, remote, replies, again

    address, local, remote, replies, again = asyncio.run(scenario())
    assert address == "127.0.0.1"
    assert list(local) == list(CHANNELS)
    assert len(set(local.values())) == len(CHANNELS)
    assert not set(local.values()) & set(remote.values())
    assert replies == {name: name.encode() + b":" + payloads[name] for name in CHANNELS}
    assert again == [b"shell:%d" % i for i in range(5)]
    [tunnel] = logged(ssh_log)
    forwards = [arg for name in CHANNELS for arg in ("-L", f"127.0.0.1:{local[name]}:127.0.0.1:{remote[name]}")]
    assert tunnel == [
        "-N", *PREFIX, "-p", "2222", "-i", "/keys/id", "-l", "alice", "-o", "ServerAliveInterval=5",
        *forwards, "--", HOST,
    ]  # fmt: skip
    assert all(refuses(port) for port in local.values())


def test_close_is_idempotent_and_allows_a_new_tunnel(ssh_log):
    ssh = transport()

    async def scenario():
        await ssh.close()  # nothing to close yet
        async with echo_servers(["hb"]) as remote:
            _, first = await ssh.connect("127.0.0.1", remote)
            with pytest.raises(TransportError, match="already open"):
                await ssh.connect("127.0.0.1", remote)
            await ssh.close()
            closed = refuses(first["hb"])
            await ssh.close()
            _, second = await ssh.connect("127.0.0.1", remote)
            try:
                reply = await round_trip(second["hb"], b"ping")
            finally:
                await ssh.close()
            return closed, second, reply

    closed, second, reply = asyncio.run(scenario())
    assert closed
    assert reply == b"hb:ping"
    assert refuses(second["hb"])
    assert len(logged(ssh_log)) == 2  # two tunnels; the refused connect in between started no ssh


def test_unknown_host_is_a_transport_error_with_ssh_reason(ssh_log):
    ssh = transport(host="elsewhere.test")
    with pytest.raises(TransportError, match=r"Could not resolve hostname elsewhere\.test") as caught:
        asyncio.run(ssh.connect("127.0.0.1", {"hb": 9}))
    assert "exited with status 255" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert len(logged(ssh_log)) == 1  # not a port problem: no retry
    asyncio.run(ssh.close())


@pytest.fixture
def taken_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def hand_out_taken_port(monkeypatch, taken, times):
    """The first ``times`` port choices include a port another process already listens on."""
    real = ssh_module._free_local_ports
    calls = []

    def choose(count):
        calls.append(count)
        ports = real(count)
        return [taken, *ports[1:]] if len(calls) <= times else ports

    monkeypatch.setattr(ssh_module, "_free_local_ports", choose)
    return calls


def test_a_port_taken_meanwhile_is_retried_with_new_ports(ssh_log, monkeypatch, taken_port):
    calls = hand_out_taken_port(monkeypatch, taken_port, times=1)
    ssh = transport()

    async def scenario():
        async with echo_servers(["shell", "hb"]) as remote:
            try:
                _, local = await ssh.connect("127.0.0.1", remote)
                return local, await round_trip(local["shell"], b"again")
            finally:
                await ssh.close()

    local, reply = asyncio.run(scenario())
    assert taken_port not in local.values()
    assert reply == b"shell:again"
    assert calls == [2, 2]
    first, second = logged(ssh_log)
    assert f"127.0.0.1:{taken_port}:" in " ".join(first)
    assert f"127.0.0.1:{taken_port}:" not in " ".join(second)


def test_a_port_taken_twice_is_a_transport_error(ssh_log, monkeypatch, taken_port):
    calls = hand_out_taken_port(monkeypatch, taken_port, times=2)
    ssh = transport()
    with pytest.raises(TransportError, match=rf"could not listen locally: bind \[127.0.0.1\]:{taken_port}: Address"):
        asyncio.run(ssh.connect("127.0.0.1", {"shell": 9, "hb": 10}))
    assert calls == [2, 2]
    assert len(logged(ssh_log)) == 2


# An "ssh" that never forwards anything: it records its pid and sleeps.
SLEEPER = "import os, pathlib, sys, time; pathlib.Path(sys.argv[1]).write_text(str(os.getpid())); time.sleep(60)"


def test_connect_timeout_is_honoured_and_the_stuck_ssh_killed(tmp_path):
    pid_file = tmp_path / "ssh.pid"
    ssh = transport(ssh_command=(sys.executable, "-c", SLEEPER, str(pid_file)), connect_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(TransportError, match=r"was not listening within 0\.5 s") as caught:
        asyncio.run(ssh.connect("127.0.0.1", {"hb": 9}))
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 3, elapsed
    assert "\n" not in str(caught.value)
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_an_ssh_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path):
    pid_file = tmp_path / "ssh.pid"
    stubborn = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); " + SLEEPER
    ssh = transport(ssh_command=(sys.executable, "-c", stubborn, str(pid_file)), connect_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(TransportError, match=r"not listening within 0\.3 s"):
        asyncio.run(ssh.connect("127.0.0.1", {"hb": 9}))
    assert 2.3 <= time.monotonic() - started < 5  # SIGTERM, 2 s grace, then SIGKILL
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_a_cancelled_connect_leaves_no_ssh_behind(tmp_path):
    pid_file = tmp_path / "ssh.pid"
    ssh = transport(ssh_command=(sys.executable, "-c", SLEEPER, str(pid_file)), connect_timeout=30)

    async def scenario():
        connecting = asyncio.create_task(ssh.connect("127.0.0.1", {"hb": 9}))
        for _ in range(200):  # until the stuck "ssh" is surely running
            if pid_file.exists() and pid_file.read_text():
                break
            await asyncio.sleep(0.05)
        connecting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await connecting

    asyncio.run(scenario())
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_tunnel_without_an_ssh_client_is_a_transport_error(tmp_path):
    ssh = transport(ssh_command=(str(tmp_path / "no-ssh"),))
    with pytest.raises(TransportError, match=r"cannot start ssh .*no-ssh"):
        asyncio.run(ssh.connect("127.0.0.1", {"hb": 9}))


@pytest.mark.parametrize(
    ("ip", "ports", "message"),
    [
        ("127.0.0.1:22:evil", {"hb": 9}, "not an IP address"),
        ("-oProxyCommand=x", {"hb": 9}, "not an IP address"),
        ("127.0.0.1", {"hb": 0}, "hb port 0"),
        ("127.0.0.1", {"hb": "9"}, "hb port '9'"),
        ("127.0.0.1", {}, "no ports"),
    ],
)
def test_launcher_addresses_are_checked_before_reaching_ssh(ssh_log, ip, ports, message):
    with pytest.raises(TransportError, match=message):
        asyncio.run(transport().connect(ip, ports))
    assert logged(ssh_log) == []
