"""The vault as a process of its own: started by the launcher, keyed over a pipe, serving the executor.

``python -m kernel_enclave.vault`` is started by the launcher with pipes on stdin and stdout, and nothing on
stderr (on a host, that is a log the operator reads). The conversation on those pipes, one JSON line each:

1. launcher → vault: the configuration, with the kernel's HPKE and signing keys (memory to memory: the keys
   never touch a file). The vault is non-dumpable before it reads them.
2. vault → launcher: ``{"ready": true}`` once the socket accepts connections (or ``{"error": ...}``); later
   launcher → vault: ``{"started": true}`` once the client has the kernel, the moment the warm-up begins (below).
3. vault → launcher: ``{"display": {...}, "seq": n, "dataset": {"id", "source", "policy_id", "policy", "broker"}}``
   whenever a dataset opens (``source`` "broker" or "upload"; "sealed" when unsealing a table brings a dataset's
   policy into force): the owner's ``[display]`` table, which the relay's gate must enforce before the analyst
   gets a handle, and the whole output policy, which the relay shows to whoever asks what binds this kernel. The
   launcher tightens the gate, records the policy and answers ``{"ack": n}``; without the answer the dataset does
   not open (fail closed).

The vault is ready (step 2) before scikit-learn, pandas and the estimator allowlist are loaded: those take seconds
and most cells never reach the vault, so a thread loads them once the kernel has started, while it already runs
cells (see :mod:`~kernel_enclave.vault.warmup`). Until it is done the executor's requests that need them wait for
it; ``hello``, ``warmup``, ``audit`` and ``drop`` are answered at once.

Besides the executor's socket, the vault serves ``upload.sock`` beside it: the upload operations only, for the
launcher's own user only (the relay answers the ``confnb.upload`` comm and passes the ciphertext on; the executor
never sees it).

The vault exits when its stdin closes (the launcher is gone) and dies with the launcher in any case.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from confnb.policy.output import OutputPolicy
from kernel_enclave.privileges import make_undumpable
from kernel_enclave.tee import get_backend
from kernel_enclave.vault import stoppable
from kernel_enclave.vault.protocol import Cancelled, VaultError, error_reply
from kernel_enclave.vault.warmup import BACKGROUND, IMMEDIATE_OPS, VAULT_WARMUP, Warmup, configured_mode, valid_wait

if TYPE_CHECKING:
    from kernel_enclave.vault.keys import VaultKeys
    from kernel_enclave.vault.service import Connection
    from kernel_enclave.vault.upload import Uploads
    from kernel_enclave.vault.vault import Reply, Vault

_PR_SET_PDEATHSIG = 1
WAIT_SLICE_S = 0.1  # how soon a request waiting for the warm-up notices an interrupt
GATE_ACK_TIMEOUT_S = 10.0


class GateChannel:
    """Asks the launcher to tighten the relay's gate and waits for its confirmation."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._lock = threading.Lock()
        self._acked = threading.Condition()
        self._seq = 0
        self._last_ack = 0

    def tighten(self, dataset_id: str, source: str, policy: OutputPolicy, broker: str | None = None) -> None:
        display = {
            "mime": list(policy.mime),
            "max_output_bytes": policy.max_output_bytes,
            "tracebacks": policy.tracebacks,
        }
        dataset = {
            "id": dataset_id,
            "source": source,
            "policy_id": policy.id,
            "policy": policy.to_dict(),
            "broker": broker,
        }
        with self._lock:
            self._seq += 1
            seq = self._seq
            self._out.write(json.dumps({"display": display, "seq": seq, "dataset": dataset}).encode() + b"\n")
            self._out.flush()
        with self._acked:
            if not self._acked.wait_for(lambda: self._last_ack >= seq, GATE_ACK_TIMEOUT_S):
                raise VaultError("the kernel's message gate did not confirm the owner's display policy; not opened")

    def acknowledge(self, seq: int) -> None:
        with self._acked:
            self._last_ack = max(self._last_ack, seq)
            self._acked.notify_all()


class WarmedConnection:
    """The executor's connection: each request that needs the heavy modules first waits for the warm-up.

    The waiting happens here, outside the vault's lock, so a request waiting for scikit-learn holds up nothing
    else; a ``warmup`` request's ``wait`` is spent here too, and the vault then only reports the state. An interrupt
    ends a waiting request at once (:class:`~kernel_enclave.vault.protocol.Cancelled`), as it would a running one.
    """

    def __init__(self, vault: Vault, warmup: Warmup) -> None:
        self._vault = vault
        self._warmup = warmup

    def handle(self, header: dict[str, Any], buffers: list[bytes]) -> Reply:
        op = header.get("op")
        try:
            if op == "warmup":
                wait = header.get("wait")
                if valid_wait(wait):
                    self._wait(wait)
                    header = {**header, "wait": 0}
            elif op not in IMMEDIATE_OPS:
                self._wait(None)
        except Cancelled as exc:
            return error_reply(exc), []
        return self._vault.handle(header, buffers)

    def _wait(self, seconds: float | None) -> None:
        deadline = None if seconds is None else time.monotonic() + seconds
        while True:
            left = WAIT_SLICE_S if deadline is None else min(WAIT_SLICE_S, deadline - time.monotonic())
            if self._warmup.wait(max(left, 0.0)) or (deadline is not None and time.monotonic() >= deadline):
                return
            stoppable.check()

    def close(self) -> None:
        pass


class _LazyUploads:
    """The upload socket's handlers, made on its first connection: uploads need Arrow, which the warm-up loads."""

    def __init__(self, vault: Vault, keys: VaultKeys, warmup: Warmup) -> None:
        self._vault, self._keys, self._warmup = vault, keys, warmup
        self._lock = threading.Lock()
        self._uploads: Uploads | None = None

    def connection(self) -> Connection:
        self._warmup.wait()  # the imports stay in the warm-up's thread, never two threads in the same package
        with self._lock:
            if self._uploads is None:
                from kernel_enclave.vault.upload import Uploads

                self._uploads = Uploads(self._vault, self._keys.hpke_private_key)
            return self._uploads.connection()


def _listen(stdin: IO[bytes], gate: GateChannel, warm_up: bool) -> None:
    """Acknowledgements until EOF; EOF means the launcher is gone, and so is the kernel.

    ``{"started": true}`` says the kernel is in the client's hands: the warm-up begins then (in the background
    mode), so that it does not compete for the CPU with the kernel's own start.
    """
    for line in stdin:
        with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
            message = json.loads(line)
            if message.get("started") is True:
                if warm_up:
                    VAULT_WARMUP.start()
                continue
            gate.acknowledge(int(message["ack"]))
    spill = os.environ.get("POLARS_TEMP_DIR")
    if spill and spill.startswith("/dev/shm/confnb-vault-"):  # noqa: S108  # the directory main() made
        shutil.rmtree(spill, ignore_errors=True)
    os._exit(0)


def run(config: dict[str, Any], stdin: IO[bytes], stdout: IO[bytes]) -> None:
    from kernel_enclave.vault.keys import VaultKeys
    from kernel_enclave.vault.service import VaultServer
    from kernel_enclave.vault.vault import Vault

    mode = configured_mode(str(config.get("warmup") or ""))
    gate = GateChannel(stdout)
    keys = VaultKeys.from_dict(config["keys"])
    tee = str(config["tee"])
    fault = config.get("simulated_fault") or None
    vault = Vault(
        backend=get_backend(tee, fault=fault) if tee == "simulated" and fault else get_backend(tee),
        keys=keys,
        broker_url=config.get("broker_url") or None,
        on_policy=gate.tighten,
        dataset_path=config.get("dataset_path") or "",
    )
    server = VaultServer(
        vault,
        Path(config["socket"]),
        allowed_uid=int(config["executor_uid"]),
        owner_uid=int(config["executor_uid"]),
        connections=lambda: WarmedConnection(vault, VAULT_WARMUP),
    )
    server.start()
    if config.get("upload_socket"):
        launcher_uid = int(config["launcher_uid"])
        uploads = _LazyUploads(vault, keys, VAULT_WARMUP)
        upload_server = VaultServer(
            vault,
            Path(config["upload_socket"]),
            allowed_uid=launcher_uid,
            owner_uid=launcher_uid,
            connections=uploads.connection,
        )
        upload_server.start()
    stdout.write(b'{"ready": true}\n')
    stdout.flush()
    _listen(stdin, gate, warm_up=mode == BACKGROUND)


def private_spill_directory() -> Path:
    """A directory only this process can use, in memory (``/dev/shm``), for whatever Polars writes out of core.

    Without a memory-backed directory it names one that cannot be created, so a spill fails rather than land on a
    disk the host can read.
    """
    shared_memory = Path("/dev/shm")  # noqa: S108  # a private 0700 directory is made inside
    if shared_memory.is_dir() and os.access(shared_memory, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="confnb-vault-", dir=shared_memory))
    return Path("/proc/self/confnb-no-spill")


def main() -> None:
    make_undumpable()
    # Before Polars loads: whatever its streaming engine might write out of core goes to the vault's own memory.
    os.environ["POLARS_TEMP_DIR"] = str(private_spill_directory())
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the analyst's interrupts are the executor's
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    try:
        config = json.loads(stdin.readline())
        run(config, stdin, stdout)
    except Exception as exc:
        with contextlib.suppress(OSError):
            stdout.write(json.dumps({"error": f"vault: {type(exc).__name__}: {exc}"}).encode() + b"\n")
            stdout.flush()
        os._exit(1)
