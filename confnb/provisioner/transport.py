"""How the provisioner reaches a launcher: start it with piped stdio, then make its ports reachable.

The launch handshake itself (request on the launcher's stdin, one response line on its stdout) is the same for
every transport, so a transport only answers two questions: how to start a process in the confidential VM, and how
a client on this machine reaches the ports the launcher bound there. Nothing secret crosses a transport in the
clear: the launch request holds only a nonce and a public key, and the response's secrets are HPKE-sealed.
"""

from __future__ import annotations

import asyncio
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")


class TransportError(RuntimeError):
    """The launcher could not be started or reached; the message is one line naming the cause."""


async def spawn_piped(
    argv: Sequence[str], env: Mapping[str, str], cwd: str | None, what: str
) -> asyncio.subprocess.Process:
    """Start ``argv`` with piped stdio in a session of its own, so that Jupyter's signals reach its process group
    and not the Jupyter server's."""
    try:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env),
            cwd=cwd,
            start_new_session=os.name == "posix",
        )
    except OSError as exc:
        raise TransportError(f"cannot start {what} {argv[0]!r}: {exc.strerror or exc}") from None


class LauncherTransport(ABC):
    """Starts ``python -m kernel_enclave.launcher`` somewhere and connects this machine to its ports."""

    name = "abstract"

    @abstractmethod
    def launcher_argv(self, local_argv: Sequence[str]) -> list[str]:
        """The command that starts the launcher; ``local_argv`` is the kernelspec's command for this machine."""

    @abstractmethod
    def bind_ip(self) -> str:
        """The address the launcher binds inside the VM."""

    @abstractmethod
    async def spawn(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None) -> asyncio.subprocess.Process:
        """Start ``argv`` with stdin, stdout and stderr piped; ``env`` is this machine's process environment."""

    @abstractmethod
    async def connect(self, ip: str, ports: Mapping[str, int]) -> tuple[str, dict[str, int]]:
        """Make the launcher's ``ports`` (keyed by channel) reachable; return the address and ports clients use."""

    @abstractmethod
    async def close(self) -> None:
        """Release whatever :meth:`connect` set up (tunnels); safe to call more than once."""


class LocalTransport(LauncherTransport):
    """The launcher runs on this machine (the simulated TEE, or a provisioner already inside the CVM)."""

    name = "local"

    def __init__(self, wrapper: Sequence[str] = ()) -> None:
        self._wrapper = list(wrapper)

    def launcher_argv(self, local_argv: Sequence[str]) -> list[str]:
        return [*self._wrapper, *local_argv]

    def bind_ip(self) -> str:
        return "127.0.0.1"

    async def spawn(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None) -> asyncio.subprocess.Process:
        return await spawn_piped(argv, env, cwd, "the launcher")

    async def connect(self, ip: str, ports: Mapping[str, int]) -> tuple[str, dict[str, int]]:
        return ip, dict(ports)

    async def close(self) -> None:
        return None
