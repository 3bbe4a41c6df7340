"""The launcher: the first confnb process in the VM. It makes the kernel's keys, proves them, and becomes the relay.

``python -m kernel_enclave.launcher`` reads one launch request line on stdin (see :mod:`kernel_enclave.handshake`),
then, all in memory of this one process:

1. generates the Jupyter session key, the CurveZMQ server key pair, the kernel's HPKE key pair and its Ed25519
   signing key;
2. binds the five client-facing sockets and starts the executor (a stock ipykernel with a key of its own, on IPC
   sockets in a private directory);
3. obtains evidence binding the request's nonce and the three public keys;
4. answers with one response line: the evidence, the ports, and the client's secrets HPKE-sealed to the
   provisioner;
5. points its own stdout and stderr at ``/dev/null`` (on a host those are logs the operator reads) and relays
   until the executor exits, the provisioner goes away (stdin closes) or it is told to stop.

The launcher *is* the relay afterwards: the client's keys never leave this process, never touch the disk, and the
process is made non-dumpable first, so neither the executor nor anything else without ``CAP_SYS_PTRACE`` can read
them through ``/proc``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kernel_enclave.executor import ENV_RELAY_PID
from kernel_enclave.handshake import (
    MAX_LINE_BYTES,
    HandshakeError,
    LaunchRequest,
    LaunchResponse,
    LaunchSecrets,
    error_line,
    secrets_info,
)
from kernel_enclave.privileges import (
    ExecutorIdentity,
    PrivilegeError,
    check_executor_can_run,
    executor_identity,
    make_undumpable,
)
from kernel_enclave.vault.protocol import EXIT_STATUS_FILE, describe_exit
from kernel_enclave.vault.warmup import WARMUP_VARIABLE

# What the launcher imports before the executor starts is on every kernel start's path: the rest (cryptography,
# ZeroMQ, the TEE backend, the relay) is imported while ipykernel starts.
if TYPE_CHECKING:
    from kernel_enclave.relay.datasets import DatasetPolicies
    from kernel_enclave.relay.gate import MessageGate
    from kernel_enclave.relay.relay import Relay
    from kernel_enclave.tee import TeeBackend

UPLOAD_SOCKET = "upload.sock"  # beside the vault's socket; the launcher's user only
# The executor's environment names these before it starts, which is before the modules that define them (and the
# cryptography they import) are loaded: kernel_enclave.vault.keys.SOCKET_VARIABLE and
# kernel_enclave.tee.simulated.ENV_FAULT (tests/kernel_enclave/test_launcher.py holds them equal).
SOCKET_VARIABLE = "CONFNB_VAULT_SOCKET"
FAULT_VARIABLE = "CONFNB_SIMULATED_FAULT"
EXECUTOR_READY_TIMEOUT_S = 60.0
EXECUTOR_STOP_GRACE_S = 3.0
VAULT_READY_TIMEOUT_S = 60.0
# Variables that would let the host change what the executor's interpreter loads before ipykernel starts.
_UNSAFE_ENV_PREFIXES = ("LD_",)


class LaunchError(RuntimeError):
    """The kernel cannot start; one line for the provisioner to show the analyst."""


class KernelKeys:
    """Every key the kernel holds, made fresh for this launch and kept only in memory."""

    def __init__(self) -> None:
        import zmq
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519

        from kernel_enclave.vault.keys import VaultKeys

        self.session_key = secrets.token_hex(32).encode("ascii")
        self.curve_publickey, self.curve_secretkey = zmq.curve_keypair()
        # The keys the evidence binds and the vault uses (key releases, receipts, the audit log).
        self.attested = VaultKeys(
            ec.generate_private_key(ec.SECP256R1()),
            ed25519.Ed25519PrivateKey.generate(),
            self.curve_publickey.decode("ascii"),
        )

    def evidence(self, backend: TeeBackend, nonce: bytes) -> dict[str, Any]:
        from kernel_enclave.attestation import issue_evidence

        return issue_evidence(
            backend,
            nonce,
            hpke_public_key=self.attested.hpke_public_key,
            signing_public_key=self.attested.signing_public_key,
            curve_public_key=self.curve_publickey.decode("ascii"),
        ).to_dict()


def executor_environment(requested: Mapping[str, str], home: Path, vault_socket: Path) -> dict[str, str]:
    merged = {**os.environ, **requested}
    environment = {name: value for name, value in merged.items() if not name.startswith(_UNSAFE_ENV_PREFIXES)}
    # IPython's profile (startup scripts, history) and every other per-user directory live in the executor's own
    # private directory: measured code, nothing inherited, and writable by the unprivileged executor.
    environment["HOME"] = str(home)
    environment["IPYTHONDIR"] = str(home / "ipython")
    environment["MPLCONFIGDIR"] = str(home / "matplotlib")
    environment["JUPYTER_RUNTIME_DIR"] = str(home / "runtime")
    environment[ENV_RELAY_PID] = str(os.getpid())
    environment[SOCKET_VARIABLE] = str(vault_socket)
    environment.pop("JPY_PARENT_PID", None)
    environment.pop(FAULT_VARIABLE, None)  # the TEE's business, not the analyst's code's
    return environment


def simulated_fault(request: LaunchRequest) -> str | None:
    """The fault to inject (simulated TEE only): from the kernelspec's environment, which reaches the launcher
    in the launch request (SSH) or in its own environment (local mode)."""
    from kernel_enclave.tee.simulated import ENV_FAULT

    if request.tee != "simulated":
        return None  # real hardware is never made to misbehave on request
    return request.env.get(ENV_FAULT) or os.environ.get(ENV_FAULT) or None


def private_directory(path: Path, identity: ExecutorIdentity | None = None, mode: int = 0o700) -> Path:
    path.mkdir(mode=mode)
    path.chmod(mode)
    if identity is not None and identity.switches:
        os.chown(path, identity.uid, identity.gid)
    return path


def write_executor_connection(
    home: Path, key: bytes, identity: ExecutorIdentity | None = None
) -> tuple[Path, dict[str, str]]:
    """The executor's own connection file: IPC sockets in its private directory, its own HMAC key."""
    base = home / "kernel"
    ports = {"shell": 1, "iopub": 2, "stdin": 3, "control": 4, "hb": 5}
    info: dict[str, str | int] = {f"{channel}_port": port for channel, port in ports.items()}
    info.update({"transport": "ipc", "ip": str(base), "key": key.decode("ascii"), "signature_scheme": "hmac-sha256"})
    path = home / "executor.json"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    if identity is not None and identity.switches:
        os.fchown(descriptor, identity.uid, identity.gid)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(info, handle)
    return path, {channel: f"ipc://{base}-{port}" for channel, port in ports.items()}


async def _read_request(reader: asyncio.StreamReader) -> LaunchRequest:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError:
        raise LaunchError("no launch request on stdin") from None
    except asyncio.LimitOverrunError:
        raise LaunchError(f"the launch request is larger than {MAX_LINE_BYTES} bytes") from None
    try:
        return LaunchRequest.from_line(line)
    except HandshakeError as exc:
        raise LaunchError(str(exc)) from None


async def _stdin_reader() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE_BYTES + 1)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    return reader


def _silence_output() -> None:
    """From here on nothing this process or a library prints may reach the host's logs."""
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)


async def _stop_executor(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), EXECUTOR_STOP_GRACE_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


async def _start_vault(
    keys: KernelKeys, request: LaunchRequest, socket_path: Path, identity: ExecutorIdentity
) -> asyncio.subprocess.Process:
    from kernel_enclave.tee.simulated import ENV_FAULT
    from kernel_enclave.vault.broker_client import BROKER_URL_VARIABLE
    from kernel_enclave.vault.keys import DATASET_PATH_VARIABLE

    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(_UNSAFE_ENV_PREFIXES) and name != ENV_FAULT  # the fault comes in the config
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kernel_enclave.vault",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=environment,
        start_new_session=True,
        limit=MAX_LINE_BYTES,
    )
    config = {
        "keys": keys.attested.to_dict(),
        "tee": request.tee,
        "broker_url": request.env.get(BROKER_URL_VARIABLE) or os.environ.get(BROKER_URL_VARIABLE, ""),
        "dataset_path": request.env.get(DATASET_PATH_VARIABLE) or os.environ.get(DATASET_PATH_VARIABLE, ""),
        "socket": str(socket_path),
        "executor_uid": identity.uid,
        "upload_socket": str(socket_path.with_name(UPLOAD_SOCKET)),
        "launcher_uid": os.getuid(),
        "simulated_fault": simulated_fault(request) or "",
        "warmup": request.env.get(WARMUP_VARIABLE) or os.environ.get(WARMUP_VARIABLE, ""),
    }
    assert process.stdin is not None
    process.stdin.write(json.dumps(config).encode() + b"\n")
    await process.stdin.drain()
    return process


async def _vault_ready(vault: asyncio.subprocess.Process) -> None:
    assert vault.stdout is not None
    try:
        line = await asyncio.wait_for(vault.stdout.readline(), VAULT_READY_TIMEOUT_S)
    except TimeoutError:
        raise LaunchError(f"the vault did not start within {VAULT_READY_TIMEOUT_S:g} s") from None
    try:
        answer = json.loads(line) if line else {"error": f"the vault exited with status {await vault.wait()}"}
    except ValueError:
        answer = {"error": "the vault's first line is not JSON"}
    if answer.get("ready") is not True:
        raise LaunchError(str(answer.get("error", "the vault did not start")))


async def _serve_gate_requests(vault: asyncio.subprocess.Process, gate: MessageGate, datasets: DatasetPolicies) -> None:
    """The vault asks for the owner's ``[display]`` table to be enforced before a dataset opens; tighten, record
    the dataset's output policy for ``confnb_gate_request``, confirm."""
    from confnb.attest.errors import PolicyError
    from confnb.policy.output import OutputPolicy
    from kernel_enclave.relay.display import DisplayPolicy, DisplayPolicyError

    assert vault.stdout is not None
    assert vault.stdin is not None
    while line := await vault.stdout.readline():
        try:
            request = json.loads(line)
            dataset = request["dataset"]
            policy = OutputPolicy.from_dict(dataset["policy"], source="the vault's dataset policy")
            if policy.id != dataset["policy_id"] or not isinstance(dataset["id"], str):
                continue
            seq = int(request["seq"])
            gate.tighten(DisplayPolicy.from_mapping(request["display"]))
            broker = dataset.get("broker")
            datasets.record(dataset["id"], str(dataset["source"]), policy, broker if isinstance(broker, str) else None)
        except (ValueError, KeyError, TypeError, DisplayPolicyError, PolicyError):
            continue  # no acknowledgement: the vault refuses to open the dataset
        vault.stdin.write(json.dumps({"ack": seq}).encode() + b"\n")
        await vault.stdin.drain()


async def _record_vault_exit(vault: asyncio.subprocess.Process, path: Path) -> None:
    """When the vault ends, write why beside its socket: the executor tells the analyst (the vault stopped: ...)."""
    status = await vault.wait()
    with contextlib.suppress(OSError):
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.fchmod(descriptor, 0o644)  # the executor's user reads it, whatever the umask
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(describe_exit(status) + "\n")


async def _stop_vault(vault: asyncio.subprocess.Process) -> None:
    if vault.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            vault.kill()
        await vault.wait()


async def launch(out: Any) -> int:
    from kernel_enclave.relay.display import DisplayPolicy, DisplayPolicyError

    try:
        make_undumpable()
    except PrivilegeError as exc:
        raise LaunchError(str(exc)) from None
    reader = await _stdin_reader()
    request = await _read_request(reader)
    policy = DisplayPolicy()
    if request.display is not None:
        try:
            policy = policy.tighten(DisplayPolicy.from_mapping(request.display))
        except DisplayPolicyError as exc:
            raise LaunchError(f"launch request: {exc}") from None
    try:
        identity = executor_identity()
        check_executor_can_run(identity)
    except PrivilegeError as exc:
        raise LaunchError(str(exc)) from None
    run_dir = Path(tempfile.mkdtemp(prefix="confnb-kernel-"))
    run_dir.chmod(0o711)  # the executor's user passes through to its own directory and the vault's socket
    process: asyncio.subprocess.Process | None = None
    vault: asyncio.subprocess.Process | None = None
    vault_exit: asyncio.Task[None] | None = None
    gate_task: asyncio.Task[None] | None = None
    relay: Relay | None = None
    relay_thread: threading.Thread | None = None
    try:
        vault_socket = private_directory(run_dir / "vault", mode=0o711) / "vault.sock"
        home = private_directory(run_dir / "executor", identity)
        executor_key = secrets.token_hex(32).encode("ascii")
        connection_file, executor_urls = write_executor_connection(home, executor_key, identity)
        # The executor starts first: ipykernel's start is the longest step of a launch and needs nothing but its
        # connection file, so the keys, the vault, the relay and the evidence are made while it starts. It runs no
        # code until the relay passes it a request, and only the attested client can send one.
        switch = {"user": identity.uid, "group": identity.gid, "extra_groups": []} if identity.switches else {}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "kernel_enclave.executor",
            "-f",
            str(connection_file),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env=executor_environment(request.env, home, vault_socket),
            start_new_session=True,  # its own group: interrupts and ipykernel's killpg stay inside the executor
            **switch,  # type: ignore[arg-type]
        )
        keys = KernelKeys()  # the vault's start is the next longest: it comes next, the relay after it
        vault = await _start_vault(keys, request, vault_socket, identity)
        vault_exit = asyncio.create_task(_record_vault_exit(vault, vault_socket.with_name(EXIT_STATUS_FILE)))
        from confnb import hpke
        from kernel_enclave.relay.datasets import DatasetPolicies
        from kernel_enclave.relay.gate import MessageGate
        from kernel_enclave.relay.relay import Relay
        from kernel_enclave.relay.upload import UploadRelay
        from kernel_enclave.relay.wire import new_header
        from kernel_enclave.tee import get_backend
        from kernel_enclave.tee.base import TeeError
        from kernel_enclave.tee.simulated import SimulatedBackend

        try:
            fault = simulated_fault(request)
            backend = get_backend(request.tee, fault=fault, fault_armed=False) if fault else get_backend(request.tee)
        except TeeError as exc:
            raise LaunchError(str(exc)) from None
        session_id = secrets.token_hex(16)
        gate = MessageGate(policy, lambda msg_type: new_header(msg_type, session_id))
        datasets = DatasetPolicies()
        relay = Relay(
            client_key=keys.session_key,
            curve_publickey=keys.curve_publickey,
            curve_secretkey=keys.curve_secretkey,
            executor_key=executor_key,
            executor_urls=executor_urls,
            gate=gate,
            attest=lambda nonce: keys.evidence(backend, nonce),
            session_id=session_id,
            uploads=UploadRelay(vault_socket.with_name(UPLOAD_SOCKET)),
            datasets=datasets,
        )
        ports = relay.bind(request.ip)
        relay.connect_executor()
        relay_thread = threading.Thread(target=relay.run, name="confnb-relay", daemon=True)
        relay_thread.start()
        evidence_task = asyncio.create_task(asyncio.to_thread(keys.evidence, backend, request.nonce))
        await _vault_ready(vault)
        gate_task = asyncio.create_task(_serve_gate_requests(vault, gate, datasets))
        exited = asyncio.create_task(process.wait())
        ready = asyncio.create_task(asyncio.to_thread(relay.ready.wait, EXECUTOR_READY_TIMEOUT_S))
        await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            raise LaunchError(f"the executor exited with status {process.returncode} before it was ready")
        if not ready.result():
            raise LaunchError(f"the executor did not answer within {EXECUTOR_READY_TIMEOUT_S:g} s")
        try:
            evidence = await evidence_task
        except (TeeError, ValueError) as exc:
            raise LaunchError(f"attestation failed: {exc}") from None
        if isinstance(backend, SimulatedBackend):
            backend.arm_fault()  # an injected fault spares the launch evidence only

        client_secrets = LaunchSecrets(keys.session_key, keys.curve_publickey, keys.curve_secretkey)
        try:
            sealed = hpke.seal(request.response_public_key, client_secrets.to_bytes(), secrets_info(evidence["claims"]))
        except hpke.HpkeError as exc:
            raise LaunchError(f"launch request: {exc}") from None
        response = LaunchResponse(evidence=evidence, ip=request.ip, ports=ports, sealed_secrets=sealed)
        out.write(response.to_line())
        out.flush()
        _silence_output()
        assert vault.stdin is not None
        vault.stdin.write(b'{"started": true}\n')  # the vault's heavy imports begin now, off the start path
        await vault.stdin.drain()

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGHUP, stop.set)
        exited.add_done_callback(lambda _: stop.set())
        watcher = asyncio.create_task(_until_eof(reader, stop))
        await stop.wait()
        watcher.cancel()
        return 0
    finally:
        if process is not None:
            await _stop_executor(process)
        if gate_task is not None:
            gate_task.cancel()
        if vault_exit is not None:
            vault_exit.cancel()  # stopping the kernel is no vault failure
        if vault is not None:
            await _stop_vault(vault)
        if relay is not None:
            relay.stop()
            if relay_thread is not None:
                await asyncio.to_thread(relay_thread.join, 5)
            relay.close()
        shutil.rmtree(run_dir, ignore_errors=True)


async def _until_eof(reader: asyncio.StreamReader, stop: asyncio.Event) -> None:
    """The provisioner (or the SSH session) keeps stdin open for the kernel's lifetime; EOF means it is gone."""
    while await reader.read(4096):
        pass
    stop.set()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # interrupts go to the executor, by message
    out = sys.stdout.buffer
    try:
        status = asyncio.run(launch(out))
    except LaunchError as exc:
        out.write(error_line(str(exc)))
        out.flush()
        status = 1
    sys.exit(status)


if __name__ == "__main__":
    main()
