"""Reach a launcher in a confidential VM over OpenSSH: ``ssh -T`` carries the handshake, ``ssh -N -L`` the channels.

The launcher binds its five ports on the VM's loopback, so nothing but an SSH tunnel reaches them; this machine's
clients then talk to ``127.0.0.1`` and a local port per channel. SSH only moves bytes here: the launch request holds
a nonce and a public key, the response's secrets are HPKE-sealed and the kernel channels are CurveZMQ-encrypted, so
the transport never needs (and must never be given) a secret on a command line, where ``ps`` would show it.

Every ssh invocation runs with ``BatchMode=yes`` (a password prompt would hang a headless Jupyter server) and
``ExitOnForwardFailure=yes`` (a tunnel that silently lost a forward would look healthy until a kernel hung).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shlex
import signal
import socket
import unicodedata
from collections.abc import Mapping, Sequence
from typing import NoReturn

from confnb.provisioner.transport import LauncherTransport, TransportError, spawn_piped

LOOPBACK = "127.0.0.1"
_POLL_S = 0.05
_TERMINATE_GRACE_S = 2.0
_STDERR_TAIL_BYTES = 8192
_PORT_TAKEN = ("Address already in use", "cannot listen to port")


def _check_name(what: str, value: str) -> str:
    """Refuse values that ssh could parse as an option or that would split into several words anywhere."""
    if not value:
        raise ValueError(f"ssh {what} must not be empty")
    if value.startswith("-"):
        raise ValueError(f"ssh {what} {value!r} starts with '-', so ssh would read it as an option")
    if any(char.isspace() or unicodedata.category(char).startswith("C") for char in value):
        raise ValueError(f"ssh {what} {value!r} contains whitespace or control characters")
    return value


def _free_local_ports(count: int) -> list[int]:
    """Ports the kernel just handed out on loopback; all are held at once so that they are distinct.

    They are released before ssh binds them, so another process may take one meanwhile: :meth:`SshTransport.connect`
    notices (ssh exits, thanks to ExitOnForwardFailure) and tries once more with fresh ports.
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _port_in_use(port: int) -> bool:
    """Whether something listens on a loopback port (SO_REUSEADDR, so that TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return True
    return False


async def _accepts(port: int, timeout: float) -> bool:
    """Whether a loopback port takes a TCP connection now; the probe is closed at once, without sending a byte."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), timeout=max(timeout, 0.01))
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class _PortTakenError(TransportError):
    """A local forward could not listen because another process took the port after it was chosen."""


class _Tunnel:
    """One ``ssh -N`` process and the tail of its stderr, drained continuously so that a chatty ssh never blocks."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self._tail = bytearray()
        assert process.stderr is not None
        self._reader = asyncio.create_task(self._drain(process.stderr))

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(4096):
            self._tail += chunk
            del self._tail[:-_STDERR_TAIL_BYTES]

    async def stderr_lines(self) -> list[str]:
        """What ssh said, once it has exited; bounded, since a proxy command may still hold the pipe open."""
        if not self._reader.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reader), timeout=1.0)
        text = self._tail.decode("utf-8", errors="replace")
        return [line.strip() for line in text.splitlines() if line.strip()]

    async def stop(self) -> None:
        """SIGTERM lets ssh kill its own proxy command; SIGKILL to its session is for an ssh that ignores it."""
        process = self.process
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), timeout=_TERMINATE_GRACE_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    if os.name == "posix":
                        os.killpg(process.pid, signal.SIGKILL)
                    else:  # pragma: no cover - the provisioner runs on POSIX
                        process.kill()
                await process.wait()
        if not self._reader.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reader), timeout=1.0)
        if not self._reader.done():  # a proxy command that outlived ssh still holds stderr open
            self._reader.cancel()
            await asyncio.wait({self._reader})
        if not self._reader.cancelled():
            self._reader.exception()  # retrieved, so that asyncio does not log it


class SshTransport(LauncherTransport):
    """The launcher runs in a confidential VM that this machine reaches with the system's OpenSSH client.

    Authentication is ssh's business (agent, ``identity_file``, ``~/.ssh/config``); host keys are checked as the
    user's ssh configuration says. ``options`` are extra ssh arguments placed before the host (``["-o", "X=y"]``);
    they come from the operator's configuration, never from the launcher.
    """

    name = "ssh"

    def __init__(
        self,
        host: str,
        *,
        user: str | None = None,
        port: int | None = None,
        identity_file: str | None = None,
        ssh_command: Sequence[str] = ("ssh",),
        options: Sequence[str] = (),
        remote_argv: Sequence[str] = ("python3", "-m", "kernel_enclave.launcher"),
        connect_timeout: float = 20.0,
    ) -> None:
        self.host = _check_name("host", host)
        self.user = None if user is None else _check_name("user", user)
        if port is not None and (isinstance(port, bool) or not 0 < port < 65536):
            raise ValueError(f"ssh port {port!r} is not between 1 and 65535")
        self.port = port
        if identity_file is not None and not identity_file:
            raise ValueError("ssh identity file must not be empty")
        self.identity_file = identity_file
        if not ssh_command:
            raise ValueError("ssh command must not be empty")
        self.ssh_command = tuple(ssh_command)
        self.options = tuple(options)
        if not remote_argv:
            raise ValueError("remote launcher command must not be empty")
        self.remote_argv = tuple(remote_argv)
        if not connect_timeout > 0:
            raise ValueError(f"connect timeout must be positive, not {connect_timeout!r}")
        self.connect_timeout = connect_timeout
        self._tunnel: _Tunnel | None = None

    def _common_options(self) -> list[str]:
        """Options every invocation shares; the host comes after ``--`` so that nothing past it is an option."""
        args = ["-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes"]
        if self.port:
            args += ["-p", str(self.port)]
        if self.identity_file:
            args += ["-i", self.identity_file]
        if self.user:
            args += ["-l", self.user]
        return args + list(self.options)

    def launcher_argv(self, local_argv: Sequence[str]) -> list[str]:
        """The kernelspec's local command is for this machine; the VM runs ``remote_argv`` instead.

        ssh joins its remaining arguments with spaces and hands them to the remote login shell, so the command is
        passed as one POSIX-shell-quoted word (the VM's login shell must be POSIX: sh, bash, dash, zsh).
        """
        return [*self.ssh_command, "-T", *self._common_options(), "--", self.host, shlex.join(self.remote_argv)]

    def bind_ip(self) -> str:
        return LOOPBACK

    async def spawn(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None) -> asyncio.subprocess.Process:
        """``env`` is for the local ssh client (agent socket, HOME); the kernel's environment is in the request."""
        return await spawn_piped(argv, env, cwd, "ssh")

    async def connect(self, ip: str, ports: Mapping[str, int]) -> tuple[str, dict[str, int]]:
        """Forward a fresh local loopback port to each of the launcher's ports and wait until all of them listen.

        ``connect_timeout`` bounds each tunnel attempt; a second attempt happens only when a chosen local port was
        taken by another process before ssh could bind it.
        """
        if self._tunnel is not None:
            raise TransportError(f"the ssh tunnel to {self.host} is already open; close() it first")
        target = self._forward_target(ip, ports)
        for attempt in range(2):
            local = dict(zip(ports, _free_local_ports(len(ports)), strict=True))
            try:
                self._tunnel = await self._open_tunnel(target, ports, local)
            except _PortTakenError as exc:
                if attempt == 1:
                    raise TransportError(str(exc)) from None
            else:
                return LOOPBACK, local
        raise AssertionError("unreachable")  # pragma: no cover

    def _forward_target(self, ip: str, ports: Mapping[str, int]) -> str:
        """The address and ports come from the launcher's response, so they are checked before reaching ``-L``."""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            raise TransportError(f"the launcher's address {ip!r} is not an IP address") from None
        for channel, port in ports.items():
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                raise TransportError(f"the launcher's {channel} port {port!r} is not between 1 and 65535")
        if not ports:
            raise TransportError("the launcher reported no ports to forward")
        return f"[{address}]" if address.version == 6 else str(address)

    async def _open_tunnel(self, target: str, ports: Mapping[str, int], local: Mapping[str, int]) -> _Tunnel:
        forwards: list[str] = []
        for channel, remote in ports.items():
            forwards += ["-L", f"{LOOPBACK}:{local[channel]}:{target}:{remote}"]
        argv = [*self.ssh_command, "-N", *self._common_options(), *forwards, "--", self.host]
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                # Not in this server's process group: a Ctrl-C answered with "shutdown? n" must not drop tunnels.
                start_new_session=os.name == "posix",
            )
        except OSError as exc:
            raise TransportError(f"cannot start ssh {argv[0]!r}: {exc.strerror or exc}") from None
        tunnel = _Tunnel(process)
        try:
            await self._wait_until_listening(tunnel, list(local.values()))
        except BaseException:
            await tunnel.stop()
            raise
        return tunnel

    async def _wait_until_listening(self, tunnel: _Tunnel, local_ports: list[int]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        pending = list(local_ports)
        while True:
            if tunnel.process.returncode is not None:
                await self._tunnel_exited(tunnel, local_ports)
            pending = [port for port in pending if not await _accepts(port, deadline - loop.time())]
            if not pending and tunnel.process.returncode is None:
                return
            if loop.time() >= deadline:
                await tunnel.stop()
                lines = await tunnel.stderr_lines()
                said = f": {lines[-1]}" if lines else ""
                raise TransportError(
                    f"the ssh tunnel to {self.host} was not listening within {self.connect_timeout:g} s{said}"
                )
            await asyncio.sleep(_POLL_S)

    async def _tunnel_exited(self, tunnel: _Tunnel, local_ports: list[int]) -> NoReturn:
        """Turn ssh's exit into one line: its last stderr line, or the bind failure when a port was taken."""
        await tunnel.process.wait()
        lines = await tunnel.stderr_lines()
        status = tunnel.process.returncode
        taken = [line for line in lines if any(marker in line for marker in _PORT_TAKEN)]
        if taken or any(_port_in_use(port) for port in local_ports):
            reason = taken[0] if taken else "a local port was taken before ssh could bind it"
            raise _PortTakenError(f"the ssh tunnel to {self.host} could not listen locally: {reason}")
        said = lines[-1] if lines else "no message"
        raise TransportError(f"the ssh tunnel to {self.host} exited with status {status}: {said}")

    async def close(self) -> None:
        tunnel, self._tunnel = self._tunnel, None
        if tunnel is not None:
            await tunnel.stop()
