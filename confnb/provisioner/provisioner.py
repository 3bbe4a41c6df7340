"""``confnb-provisioner``: starts a confidential kernel and hands it to Jupyter only once its evidence verifies.

Jupyter's own provisioner makes the kernel's keys on the host and writes them to a file the kernel reads; here the
host is not trusted, so the roles are reversed. The provisioner makes only a nonce and a one-launch HPKE key pair;
the launcher inside the VM makes every kernel key and answers with evidence that binds the nonce and the
CurveZMQ server key, plus the client's secrets sealed to the provisioner. The provisioner verifies the evidence
against the analyst's attestation policy, opens the secrets, checks that they belong to the attested key, and only
then returns the connection info. A kernel whose evidence fails never reaches Jupyter; the error names the checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hmac
import os
import signal
from pathlib import Path
from typing import Any, cast

import zmq
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import CaselessStrEnum, Float, Integer, List, Unicode

from confnb import hpke
from confnb.attest.errors import AttestInputError, KdsError
from confnb.attest.evidence import Evidence
from confnb.attest.policy import AttestationPolicy
from confnb.attest.result import VerificationResult
from confnb.provisioner.transport import LauncherTransport, LocalTransport, TransportError
from kernel_enclave.handshake import (
    HandshakeError,
    LaunchRequest,
    LaunchResponse,
    LaunchSecrets,
    launch_error,
    secrets_info,
)

ENV_ATTESTATION_POLICY = "CONFNB_ATTESTATION_POLICY"
NONCE_BYTES = 32
_STDERR_TAIL_BYTES = 4096


class KernelLaunchError(RuntimeError):
    """The confidential kernel did not start; the message says why (failing checks, launcher error, timeout)."""


class ConfidentialProvisioner(KernelProvisionerBase):
    """Launch ``kernel_enclave.launcher`` locally or in a remote confidential VM, verify it, then connect."""

    mode = CaselessStrEnum(
        ["local", "ssh"],
        default_value="local",
        config=True,
        help="Where the launcher runs: 'local' (this machine; the simulated TEE or a Jupyter server inside the "
        "CVM) or 'ssh' (a remote confidential VM reached with ssh; ports are tunnelled).",
    )
    attestation_policy = Unicode(
        "",
        config=True,
        help="The analyst's attestation policy (TOML with an [attestation] table). A relative path is taken "
        f"relative to the kernelspec's directory. ${ENV_ATTESTATION_POLICY} overrides it; without either, no "
        "kernel starts.",
    )
    display_policy = Unicode(
        "",
        config=True,
        help="Optional TOML file whose [display] table tightens the kernel's default display policy (it can "
        "never loosen it).",
    )
    tee = CaselessStrEnum(
        ["auto", "sev-snp", "simulated"],
        default_value="auto",
        config=True,
        help="TEE backend the launcher uses. 'auto' never falls back to the simulated TEE.",
    )
    launcher_wrapper = List(
        Unicode(),
        default_value=[],
        config=True,
        help="local mode: a command prepended to the launcher's argv (e.g. to start it in a sandbox or another "
        "cgroup). It sits where the host sits, so it can do nothing the verification would not catch.",
    )
    launch_timeout = Float(120.0, config=True, help="Seconds to wait for the launcher's response.")
    ssh_host = Unicode("", config=True, help="ssh mode: the confidential VM's host name or address.")
    ssh_user = Unicode("", config=True, help="ssh mode: the remote user (default: ssh's own choice).")
    ssh_port = Integer(0, config=True, help="ssh mode: the remote port (0: ssh's default).")
    ssh_identity_file = Unicode("", config=True, help="ssh mode: private key file for ssh -i.")
    ssh_command = List(Unicode(), default_value=["ssh"], config=True, help="ssh mode: the ssh client command.")
    ssh_options = List(Unicode(), default_value=[], config=True, help="ssh mode: extra ssh options.")
    remote_argv = List(
        Unicode(),
        default_value=["python3", "-m", "kernel_enclave.launcher"],
        config=True,
        help="ssh mode: the command that starts the launcher inside the VM.",
    )
    forward_env = List(
        Unicode(),
        default_value=["CONFNB_*", "JPY_SESSION_NAME"],
        config=True,
        help="ssh mode: shell patterns of environment variables sent to the remote kernel (local mode passes "
        "the whole environment, as Jupyter's own provisioner does).",
    )

    process: asyncio.subprocess.Process | None = None
    evidence: Evidence | None = None
    verification: VerificationResult | None = None
    _transport: LauncherTransport | None = None

    # -- process lifecycle ------------------------------------------------------------------------------------

    @property
    def has_process(self) -> bool:
        return self.process is not None

    async def poll(self) -> int | None:
        return None if self.process is None else self.process.returncode

    async def wait(self) -> int | None:
        if self.process is None:
            return 0
        status = await self.process.wait()
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process = None
        return status

    async def send_signal(self, signum: int) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            # The launcher leads its own process group; the executor dies with it (PR_SET_PDEATHSIG).
            os.killpg(self.process.pid, signum)

    async def kill(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGTERM)

    async def cleanup(self, restart: bool = False) -> None:
        if self._transport is not None:
            await self._transport.close()
            self._transport = None

    # -- launch -----------------------------------------------------------------------------------------------

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        manager = self.parent
        assert manager is not None  # the KernelManager that owns this provisioner
        command = manager.format_kernel_cmd(extra_arguments=kwargs.pop("extra_arguments", None))
        result: dict[str, Any] = await super().pre_launch(cmd=command, **kwargs)
        return result

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        policy = self._attestation_policy(kwargs.get("env") or os.environ)
        display = self._display_table()
        transport = self._make_transport()
        nonce = os.urandom(NONCE_BYTES)
        private_key = ec.generate_private_key(ec.SECP256R1())
        public_key = private_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        env = dict(kwargs.get("env") or os.environ)
        request = LaunchRequest(
            nonce=nonce,
            response_public_key=public_key,
            ip=transport.bind_ip(),
            env=self._forwarded_env(env),
            display=display,
            tee=self.tee,
        )
        spawn_env = env if self.mode == "local" else dict(os.environ)
        try:
            self.process = await transport.spawn(transport.launcher_argv(cmd), spawn_env, kwargs.get("cwd"))
        except TransportError as exc:
            raise KernelLaunchError(f"confnb kernel did not start: {exc}") from None
        self._transport = transport
        try:
            response = await self._handshake(request)
            evidence, result = await self._verify(response, policy, nonce)
            client_secrets = self._open_secrets(response, evidence, private_key)
            ip, ports = await transport.connect(response.ip, response.ports)
        except (KernelLaunchError, TransportError) as exc:
            await self._abandon()
            raise KernelLaunchError(str(exc)) from None
        self.evidence, self.verification = evidence, result
        info: dict[str, Any] = {f"{channel}_port": port for channel, port in ports.items()}
        info.update(
            {
                "transport": "tcp",
                "ip": ip,
                "key": client_secrets.key,
                "signature_scheme": "hmac-sha256",
                "curve_publickey": client_secrets.curve_publickey.decode("ascii"),
                "curve_secretkey": client_secrets.curve_secretkey.decode("ascii"),
            }
        )
        self.connection_info = cast(KernelConnectionInfo, info)
        kernel_name = getattr(self.parent, "kernel_name", None)
        if kernel_name:
            self.connection_info["kernel_name"] = kernel_name
        return self.connection_info

    async def _handshake(self, request: LaunchRequest) -> LaunchResponse:
        process = self.process
        assert process is not None
        assert process.stdin is not None
        assert process.stdout is not None
        try:
            process.stdin.write(request.to_line())
            await process.stdin.drain()
            line = await asyncio.wait_for(process.stdout.readline(), self.launch_timeout)
        except TimeoutError:
            raise KernelLaunchError(
                f"confnb kernel did not start: no answer from the launcher within {self.launch_timeout:g} s"
            ) from None
        except (BrokenPipeError, ConnectionResetError):
            line = b""
        error = launch_error(line) if line else None
        if error is not None:
            raise KernelLaunchError(f"confnb kernel did not start: {error}")
        if not line:
            raise KernelLaunchError(f"confnb kernel did not start: the launcher exited{await self._stderr_tail()}")
        try:
            return LaunchResponse.from_line(line)
        except HandshakeError as exc:
            raise KernelLaunchError(f"confnb kernel did not start: {exc}") from None

    async def _verify(
        self, response: LaunchResponse, policy: AttestationPolicy, nonce: bytes
    ) -> tuple[Evidence, VerificationResult]:
        from confnb.attest.verifier import default_verifier

        try:
            evidence = Evidence.from_dict(response.evidence)
            # Certificates may have to come from AMD KDS: network I/O, off the event loop.
            result = await asyncio.to_thread(default_verifier().verify_evidence, evidence, policy, nonce=nonce)
        except (AttestInputError, KdsError) as exc:
            raise KernelLaunchError(f"confnb kernel refused: its evidence is unusable: {exc}") from None
        if not result.ok:
            failures = "; ".join(f"{check.name}: {check.detail}" for check in result.failures)
            raise KernelLaunchError(f"confnb kernel refused: attestation failed ({failures})")
        return evidence, result

    def _open_secrets(
        self, response: LaunchResponse, evidence: Evidence, private_key: ec.EllipticCurvePrivateKey
    ) -> LaunchSecrets:
        try:
            plaintext = hpke.open_sealed(private_key, response.sealed_secrets, secrets_info(evidence.claims))
            client_secrets = LaunchSecrets.from_bytes(plaintext)
            derived = zmq.curve_public(client_secrets.curve_secretkey)
        except (hpke.HpkeError, HandshakeError, ValueError, zmq.ZMQError) as exc:
            raise KernelLaunchError(f"confnb kernel refused: its sealed channel secrets are unusable: {exc}") from None
        attested = evidence.claims.get("curve_public_key", "").encode("ascii", "replace")
        if not (
            hmac.compare_digest(derived, client_secrets.curve_publickey)
            and hmac.compare_digest(client_secrets.curve_publickey, attested)
        ):
            raise KernelLaunchError("confnb kernel refused: the channel key is not the attested curve_public_key")
        return client_secrets

    async def _abandon(self) -> None:
        await self.kill()
        if self.process is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wait(), 5)
        await self.cleanup()

    async def _stderr_tail(self) -> str:
        process = self.process
        if process is None or process.stderr is None:
            return ""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 5)
        try:
            tail = await asyncio.wait_for(process.stderr.read(), 1)
        except TimeoutError:
            return ""
        lines = tail[-_STDERR_TAIL_BYTES:].decode("utf-8", "replace").strip().splitlines()
        status = f" with status {process.returncode}" if process.returncode is not None else ""
        return f"{status}: {lines[-1]}" if lines else status

    # -- configuration ----------------------------------------------------------------------------------------

    def _attestation_policy(self, env: Any) -> AttestationPolicy:
        from confnb.attest.errors import PolicyError

        path_text = env.get(ENV_ATTESTATION_POLICY) or os.environ.get(ENV_ATTESTATION_POLICY) or self.attestation_policy
        if not path_text:
            raise KernelLaunchError(
                "confnb kernel refused: no attestation policy (set attestation_policy in the kernelspec's "
                f"provisioner config, or {ENV_ATTESTATION_POLICY})"
            )
        try:
            return AttestationPolicy.load(self._resolve(path_text))
        except PolicyError as exc:
            raise KernelLaunchError(f"confnb kernel refused: {exc}") from None

    def _display_table(self) -> dict[str, Any] | None:
        if not self.display_policy:
            return None
        import tomllib

        path = self._resolve(self.display_policy)
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise KernelLaunchError(f"confnb kernel refused: display policy {path}: {exc}") from None
        table = document.get("display")
        if not isinstance(table, dict):
            raise KernelLaunchError(f"confnb kernel refused: display policy {path} has no [display] table")
        return table

    def _resolve(self, path_text: str) -> Path:
        path = Path(path_text).expanduser()
        resource_dir = getattr(self.kernel_spec, "resource_dir", None)
        if not path.is_absolute() and resource_dir:
            path = Path(resource_dir) / path
        return path

    def _forwarded_env(self, env: dict[str, str]) -> dict[str, str]:
        if self.mode == "local":
            return {}  # the launcher inherits the whole environment from spawn
        return {
            name: value
            for name, value in env.items()
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.forward_env)
        }

    def _make_transport(self) -> LauncherTransport:
        if self.mode == "local":
            return LocalTransport(wrapper=self.launcher_wrapper)
        from confnb.provisioner.ssh import SshTransport

        if not self.ssh_host:
            raise KernelLaunchError("confnb kernel refused: ssh mode needs ssh_host in the provisioner config")
        try:
            return SshTransport(
                self.ssh_host,
                user=self.ssh_user or None,
                port=self.ssh_port or None,
                identity_file=self.ssh_identity_file or None,
                ssh_command=self.ssh_command,
                options=self.ssh_options,
                remote_argv=self.remote_argv,
            )
        except ValueError as exc:
            raise KernelLaunchError(f"confnb kernel refused: {exc}") from None
