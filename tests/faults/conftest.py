"""Faults injected into real confidential kernels: the kernel's processes, found and watched through ``/proc``.

A ``confnb-snp`` kernel is the launcher (which becomes the relay), the executor and the vault, and, while the vault
computes something long, a worker process forked from the vault. :class:`FaultKernel` names each one by its command
line and parentage, so a test can interrupt or kill the right process at the right moment, runs cells the way
Jupyter does (execute, wait for the reply, read the outputs) and, when the kernel is shut down, checks that none of
the processes it saw is left.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # registered by tests/conftest.py when pytest is configured, after this file is loaded
    from confidential_fixtures import ConfidentialWorld

WAIT_S = 60.0

# Every fault test opens the clinic's patients and loads scikit-learn in the executor first.
SETUP = (
    "import confnb as cn\n"
    "from sklearn.ensemble import RandomForestClassifier\n"
    't = cn.open("patients")\n'
    'print(t["age"].count().release())'
)


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (of every thread), empty once it is gone."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return [child for child in found if alive(child)]


def alive(pid: int) -> bool:
    """Running (a zombie nobody has reaped yet is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def wait_until(condition: Callable[[], bool], timeout: float = WAIT_S, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


@dataclass
class Cell:
    """One executed cell: its reply, its outputs, and how long it took from ``since`` (the start or an interrupt)."""

    reply: dict[str, Any]
    outputs: list[dict[str, Any]]
    seconds: float

    @property
    def status(self) -> str:
        return str(self.reply["content"]["status"])

    @property
    def error(self) -> tuple[str, str]:
        return str(self.reply["content"].get("ename")), str(self.reply["content"].get("evalue"))

    @property
    def stdout(self) -> str:
        return "".join(m["content"]["text"] for m in self.outputs if m["msg_type"] == "stream")


@dataclass
class FaultKernel:
    """A running kernel, its processes, and every process id seen (checked gone once the kernel is shut down)."""

    kernel: Any
    launcher: int
    vault: int
    executor: int
    seen: set[int] = field(default_factory=set)

    @classmethod
    def of(cls, kernel: Any) -> FaultKernel:
        launcher = kernel.manager.provisioner.process.pid
        roles: dict[str, int] = {}

        def found() -> bool:
            for child in children(launcher):
                for role in ("vault", "executor"):
                    if f"kernel_enclave.{role}" in command_line(child):
                        roles[role] = child
            return len(roles) == 2

        wait_until(found, what="the kernel's vault and executor")
        faulty = cls(kernel, launcher, roles["vault"], roles["executor"])
        faulty.seen = {launcher, roles["vault"], roles["executor"]}
        return faulty

    def workers(self) -> list[int]:
        found = children(self.vault)
        self.seen.update(found)
        return found

    def worker(self, timeout: float = WAIT_S) -> int:
        """The vault's worker process, once the long computation has started in it."""
        wait_until(lambda: bool(self.workers()), timeout, "the vault's worker process")
        return self.workers()[0]

    def vault_cpu_seconds(self) -> float:
        """CPU time the vault process has used (all its threads, Polars' pool among them)."""
        fields = Path(f"/proc/{self.vault}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def vault_busy(self, window: float = 0.2) -> bool:
        """Whether the vault is computing: it used at least a third of a core over ``window`` seconds."""
        before = self.vault_cpu_seconds()
        time.sleep(window)
        return self.vault_cpu_seconds() - before >= window / 3

    def wait_idle(self, timeout: float) -> None:
        wait_until(lambda: not self.vault_busy(), timeout, "the vault to stop computing")

    def interrupt_while_busy(self, code: str, settle: float = 0.5) -> Cell:
        """Run ``code``, interrupt it while the vault computes it in its own threads (Polars); the cell, timed from
        the interrupt."""
        msg_id = self.start(code)
        wait_until(self.vault_busy, WAIT_S, "the vault to start computing")
        time.sleep(settle)  # well inside the computation
        assert self.vault_busy(), "the computation ended before the interrupt: make it longer"
        interrupted = time.monotonic()
        self.kernel.manager.interrupt_kernel()
        return self.finish(msg_id, interrupted)

    def wait_gone(self, pid: int, timeout: float = 10.0) -> None:
        wait_until(lambda: not alive(pid), timeout, f"process {pid} to end")

    def audit_events(self) -> list[tuple[str, str | None]]:
        """(event, op) of every entry of the kernel's audit log, as ``cn.audit()`` returns it in the kernel."""
        cell = self.run("import json\nprint(json.dumps([[e['event'], e['fields'].get('op')] for e in cn.audit()]))")
        assert cell.status == "ok", cell.reply["content"]
        return [(str(event), op) for event, op in json.loads(cell.stdout)]

    def start(self, code: str) -> str:
        return str(self.kernel.client.execute(code, allow_stdin=False))

    def finish(self, msg_id: str, since: float, timeout: float = WAIT_S) -> Cell:
        client = self.kernel.client
        reply = client.get_shell_msg(timeout=timeout)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = client.get_shell_msg(timeout=timeout)
        seconds = time.monotonic() - since
        outputs = []
        while True:
            message = client.get_iopub_msg(timeout=timeout)
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            if message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
                return Cell(reply, outputs, seconds)
            outputs.append(message)

    def run(self, code: str, timeout: float = WAIT_S) -> Cell:
        started = time.monotonic()
        return self.finish(self.start(code), started, timeout)

    def interrupt_during(self, code: str, settle: float = 0.5) -> tuple[Cell, int]:
        """Run ``code``, interrupt it once the vault computes it in a worker; the cell, timed from the interrupt."""
        msg_id = self.start(code)
        worker = self.worker()
        time.sleep(settle)  # well inside the computation
        assert alive(worker), "the computation ended before the interrupt: make it longer"
        interrupted = time.monotonic()
        self.kernel.manager.interrupt_kernel()
        return self.finish(msg_id, interrupted), worker


def _started(world: ConfidentialWorld) -> tuple[Any, FaultKernel]:
    from confidential_fixtures import start_confidential_kernel, stop_confidential_kernel

    kernel = start_confidential_kernel(world)
    try:
        faulty = FaultKernel.of(kernel)
        cell = faulty.run(SETUP)
        assert cell.status == "ok", cell.reply["content"]
    except BaseException:
        stop_confidential_kernel(kernel)
        raise
    return kernel, faulty


def _stopped(kernel: Any, faulty: FaultKernel) -> None:
    from confidential_fixtures import stop_confidential_kernel

    stop_confidential_kernel(kernel)
    wait_until(lambda: not any(alive(pid) for pid in faulty.seen), 20, "the kernel's processes to end")


@pytest.fixture(scope="module")
def shared_kernel(confnb_kernel_env: Path, confidential_world: ConfidentialWorld) -> Iterator[FaultKernel]:
    """One kernel for a module's tests, with ``t`` (the clinic's patients) open; no process of it outlives it."""
    kernel, faulty = _started(confidential_world)
    try:
        yield faulty
        faulty.workers()
    finally:
        _stopped(kernel, faulty)


@pytest.fixture
def fresh_kernel(confnb_kernel_env: Path, confidential_world: ConfidentialWorld) -> Iterator[FaultKernel]:
    """A kernel of its own, for a test that breaks it; no process of it (nor a worker) outlives it."""
    kernel, faulty = _started(confidential_world)
    try:
        yield faulty
    finally:
        _stopped(kernel, faulty)


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``: children, their children, and so on."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


@pytest.fixture(scope="module")
def no_process_left_behind() -> Iterator[None]:
    """A module that uses this ends with no process it started still running below the test process (kernels and
    their workers, brokers, Jupyter servers, CLI runs); set up before, and so torn down after, its other fixtures."""
    import os

    before = descendants(os.getpid())
    yield
    wait_until(
        lambda: not (descendants(os.getpid()) - before), 30, "every process the module started to end (none left)"
    )
