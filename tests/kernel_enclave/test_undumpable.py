"""The relay and the vault of a real kernel are not dumpable, as each process reports it itself.

Run as root (as in a CVM), the executor's own user already keeps it out of ``/proc/<pid>/mem`` of the relay and
the vault, so the tests that try to read them cannot tell whether ``prctl(PR_SET_DUMPABLE, 0)`` ran. Here each
process of the kernel asks the kernel directly: a ``sitecustomize`` on ``PYTHONPATH`` starts a thread that writes
down ``prctl(PR_GET_DUMPABLE)`` whenever it changes. A freshly executed interpreter is dumpable (the first record,
which shows the probe sees the flag); the launcher (which becomes the relay) and the vault must then turn it off.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path

from jupyter_client.manager import KernelManager

from confnb.provisioner.kernelspec import KERNEL_NAME

LOG_VARIABLE = "CONFNB_TEST_DUMPABLE_LOG"

# Observes only: every failure is swallowed, and a process that cannot write the log is not recorded.
SITECUSTOMIZE = """
import ctypes
import os
import sys
import threading
import time

_LOG = os.environ.get("CONFNB_TEST_DUMPABLE_LOG")
_PR_GET_DUMPABLE = 3


def _write(value):
    try:
        fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{os.getpid()}\\t{' '.join(sys.orig_argv)}\\t{value}\\n".encode())
        finally:
            os.close(fd)
    except Exception:
        pass


def _watch(prctl, last):
    while True:
        value = prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0)
        if value != last:
            _write(value)
            last = value
        time.sleep(0.05)


if _LOG:
    try:
        _prctl = ctypes.CDLL(None).prctl
        _first = _prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0)
        _write(_first)
        threading.Thread(target=_watch, args=(_prctl, _first), daemon=True, name="dumpable-probe").start()
    except Exception:
        pass
"""


def _records(log: Path) -> dict[str, tuple[str, list[int]]]:
    """Per process id: its command line and the PR_GET_DUMPABLE values it went through, in order."""
    processes: dict[str, tuple[str, list[int]]] = defaultdict(lambda: ("", []))
    if log.exists():
        for line in log.read_text().splitlines():
            pid, argv, value = line.split("\t")
            values = processes[pid][1]
            values.append(int(value))
            processes[pid] = (argv, values)
    return dict(processes)


def _values_of(records: dict[str, tuple[str, list[int]]], module: str) -> list[list[int]]:
    return [values for argv, values in records.values() if module in argv.split()]


def test_the_relay_and_the_vault_turn_dumpability_off(confnb_kernel_env: Path, tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / "dumpable.log"
    paths = [str(hook), *filter(None, [os.environ.get("PYTHONPATH")])]
    manager = KernelManager(kernel_name=KERNEL_NAME)
    manager.start_kernel(env={**os.environ, "PYTHONPATH": os.pathsep.join(paths), LOG_VARIABLE: str(log)})
    try:
        client = manager.client()
        client.start_channels()
        try:
            client.wait_for_ready(timeout=60)
            assert client.execute_interactive("1 + 1", timeout=30)["content"]["status"] == "ok"
        finally:
            client.stop_channels()
        deadline = time.monotonic() + 10
        while True:  # the probe's thread records a change within 50 ms; allow for a loaded machine
            records = _records(log)
            relays = _values_of(records, "kernel_enclave.launcher")
            vaults = _values_of(records, "kernel_enclave.vault")
            settled = len(relays) == 1 and len(vaults) == 1 and relays[0][-1] == 0 and vaults[0][-1] == 0
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        manager.shutdown_kernel(now=False)
    assert len(relays) == 1 and len(vaults) == 1, records
    for name, values in (("relay", relays[0]), ("vault", vaults[0])):
        assert values[0] == 1, f"the {name}'s interpreter started non-dumpable already, so the probe proves nothing"
        assert values[-1] == 0, f"the {name} is still dumpable (PR_GET_DUMPABLE went {values})"
