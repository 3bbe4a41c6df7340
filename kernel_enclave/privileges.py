"""Who may do what inside the VM: the keys' processes are not dumpable, the analyst's executor is nobody.

The relay and the vault hold every secret of the kernel, so they are made non-dumpable (no core dumps; ``ptrace``
and ``/proc/<pid>/mem`` need ``CAP_SYS_PTRACE``). The executor runs the analyst's code, so when the kernel starts as
root it runs as an unprivileged user (``nobody`` unless ``CONFNB_EXECUTOR_USER`` names another, never root): as
root, even without capabilities, it could open the TEE's device and have the firmware sign a report for keys of its
own choosing, which would let it ask a broker for dataset keys directly.

``python -m kernel_enclave.privileges [--fix]`` checks that the executor's user can run this Python; ``--fix`` makes
the directories in the way traversable (``o+x``, not readable), which a Python installed in ``/root`` needs.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import pwd
import stat
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

_PR_SET_DUMPABLE = 4
EXECUTOR_USER_VARIABLE = "CONFNB_EXECUTOR_USER"
DEFAULT_EXECUTOR_USER = "nobody"


class PrivilegeError(RuntimeError):
    """The kernel cannot set up its processes' privileges as it must; one line naming the cause and the fix."""


def make_undumpable() -> None:
    """No core dumps, no ``/proc/<pid>/mem`` or ``ptrace`` for processes without ``CAP_SYS_PTRACE``."""
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise PrivilegeError(f"prctl(PR_SET_DUMPABLE) failed: {os.strerror(ctypes.get_errno())}")


@dataclass(frozen=True)
class ExecutorIdentity:
    """The user the executor runs as; ``None`` fields mean "the launcher's own" (the launcher is not root)."""

    name: str
    uid: int
    gid: int

    @property
    def switches(self) -> bool:
        return self.uid != os.geteuid()


def executor_identity(environment: dict[str, str] | None = None) -> ExecutorIdentity:
    """The executor's user: unprivileged whenever the launcher is root; root is refused whatever is configured."""
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        return ExecutorIdentity(me.pw_name, me.pw_uid, me.pw_gid)
    name = (environment if environment is not None else os.environ).get(EXECUTOR_USER_VARIABLE) or DEFAULT_EXECUTOR_USER
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise PrivilegeError(f"{EXECUTOR_USER_VARIABLE}: no user {name!r} in this VM") from None
    if entry.pw_uid == 0:
        raise PrivilegeError(f"{EXECUTOR_USER_VARIABLE}: the executor never runs as root ({name!r} is uid 0)")
    return ExecutorIdentity(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _may_traverse(directory: Path, identity: ExecutorIdentity) -> bool:
    info = directory.stat()
    if info.st_uid == identity.uid:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid == identity.gid:
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


def blocked_directories(identity: ExecutorIdentity) -> list[Path]:
    """Directories the executor's user cannot pass through on the way to this interpreter and its library."""
    targets = {Path(sys.executable).resolve(), Path(sysconfig.get_paths()["stdlib"]).resolve(), Path(sys.prefix)}
    blocked: set[Path] = set()
    for target in targets:
        for directory in [*reversed(target.parents), *([target] if target.is_dir() else [])]:
            if not _may_traverse(directory, identity):
                blocked.add(directory)
    return sorted(blocked)


def check_executor_can_run(identity: ExecutorIdentity) -> None:
    if not identity.switches:
        return
    blocked = blocked_directories(identity)
    if blocked:
        shown = ", ".join(str(path) for path in blocked)
        raise PrivilegeError(
            f"the executor's user {identity.name!r} cannot reach this Python ({shown} not traversable): "
            f"run `{sys.executable} -m kernel_enclave.privileges --fix` as root, or set {EXECUTOR_USER_VARIABLE}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kernel_enclave.privileges",
        description="Check that the kernel's unprivileged executor user can run this Python installation.",
    )
    parser.add_argument("--fix", action="store_true", help="make blocking directories traversable (chmod o+x)")
    args = parser.parse_args(argv)
    try:
        identity = executor_identity()
    except PrivilegeError as exc:
        print(f"confnb: error: {exc}", file=sys.stderr)
        return 2
    blocked = blocked_directories(identity) if identity.switches else []
    for directory in blocked:
        if not args.fix:
            print(f"confnb: {identity.name} cannot traverse {directory}", file=sys.stderr)
            continue
        directory.chmod(directory.stat().st_mode | stat.S_IXOTH)
        print(f"confnb: made {directory} traversable (o+x) for the kernel's executor user {identity.name}")
    return 1 if blocked and not args.fix else 0


if __name__ == "__main__":
    sys.exit(main())
