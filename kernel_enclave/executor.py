"""The analyst's executor: a stock ipykernel behind the relay, with what the relay cannot take away from outside.

It speaks only to the relay, over IPC sockets with its own HMAC key, and never sees the keys the analyst's client
uses. Everything the analyst's code can do to it (swap its session, read its key, write to its fds) therefore
stays on the relay's side of the gate. What this module adds is what must hold *inside* the process before any
analyst code runs: no privileges (when started as root, every capability is dropped, so ``/proc`` of the relay and
the vault, which are not dumpable, stays closed), no debugger, and death with the relay.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path

# linux/prctl.h and linux/capability.h
_PR_SET_PDEATHSIG = 1
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
ENV_RELAY_PID = "CONFNB_RELAY_PID"


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32))


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def drop_privileges() -> None:
    """Give up every capability for good, so root inside the VM is an ordinary user for the analyst's code.

    The bounding set is emptied (nothing can be regained across ``execve``, not even by setuid programs, with
    ``no_new_privs`` set), then the effective, permitted and inheritable sets are cleared. Raises ``OSError`` if
    any step fails: an executor that kept ``CAP_SYS_PTRACE`` could read the relay's memory.
    """
    libc = _libc()
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    if os.geteuid() != 0 and _effective_capabilities() == 0:
        return
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for capability in range(last + 1):
        if libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {capability}) failed")
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)  # absent before Linux 4.3: nothing to clear
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset() failed")
    if _effective_capabilities() != 0:
        raise OSError("capabilities are still effective after dropping them")


def _effective_capabilities() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise OSError("/proc/self/status has no CapEff line")


def die_with_relay() -> None:
    """Exit when the relay does: an orphaned executor would keep running analyst code nobody can reach."""
    relay_pid = int(os.environ.pop(ENV_RELAY_PID, "0"))
    _libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if relay_pid and os.getppid() != relay_pid:  # the relay died before the line above took effect
        os._exit(1)


def main(argv: list[str] | None = None) -> None:
    die_with_relay()
    drop_privileges()

    # No debugger: debugpy would hand the analyst's client raw variables and a second code path into the
    # process. The relay also refuses debug requests; this keeps ipykernel from advertising or starting one, and
    # from importing debugpy at all (which stock ipykernel does at every start).
    sys.modules["debugpy"] = None  # type: ignore[assignment]
    import ipykernel.debugger

    ipykernel.debugger._is_debugpy_available = False
    from ipykernel.kernelapp import IPKernelApp

    # quiet: nothing the analyst prints is echoed to this process's stdout/stderr, which the launcher points at
    # /dev/null anyway (on a real host those would end up in host-visible logs).
    # The kernel class: stock, except that an interrupt stops only the analyst's code (never ipykernel's own
    # handling around a cell, which would lose the cell's reply).
    IPKernelApp.launch_instance(
        argv=[
            *(sys.argv[1:] if argv is None else argv),
            "--IPKernelApp.quiet=True",
            "--IPKernelApp.kernel_class=kernel_enclave.executor_kernel.ConfidentialKernel",
        ]
    )


if __name__ == "__main__":
    main()
