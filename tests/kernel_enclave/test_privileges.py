"""Who the kernel's processes run as: never root for the analyst's code, and a clear error when that cannot be."""

from __future__ import annotations

import os
import pwd
import sys
from pathlib import Path

import pytest

from kernel_enclave.privileges import (
    EXECUTOR_USER_VARIABLE,
    ExecutorIdentity,
    PrivilegeError,
    _may_traverse,
    check_executor_can_run,
    executor_identity,
    main,
)

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="user switching applies only to a kernel started as root")
NOBODY = pwd.getpwnam("nobody")
STRANGER = ExecutorIdentity("stranger", 54321, 54321)


@as_root
def test_root_hands_the_analyst_to_nobody_by_default() -> None:
    identity = executor_identity({})
    assert (identity.name, identity.uid, identity.gid) == ("nobody", NOBODY.pw_uid, NOBODY.pw_gid)
    assert identity.switches


@as_root
def test_another_unprivileged_user_can_be_chosen() -> None:
    other = next(entry for entry in pwd.getpwall() if entry.pw_uid not in (0, NOBODY.pw_uid))
    assert executor_identity({EXECUTOR_USER_VARIABLE: other.pw_name}).uid == other.pw_uid


@as_root
@pytest.mark.parametrize(("user", "problem"), [("root", "never runs as root"), ("no-such-user-x", "no user")])
def test_root_or_unknown_users_are_refused(user: str, problem: str) -> None:
    with pytest.raises(PrivilegeError, match=problem):
        executor_identity({EXECUTOR_USER_VARIABLE: user})


def test_directories_are_traversable_only_with_the_right_execute_bit(tmp_path: Path) -> None:
    closed, passable = tmp_path / "closed", tmp_path / "passable"
    closed.mkdir(mode=0o700)
    passable.mkdir()
    passable.chmod(0o711)
    assert not _may_traverse(closed, STRANGER)
    assert _may_traverse(passable, STRANGER)
    mine = ExecutorIdentity("me", os.geteuid(), os.getegid())
    assert _may_traverse(closed, mine)


def test_a_python_the_executor_cannot_reach_is_named_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kernel_enclave.privileges.blocked_directories", lambda identity: [Path("/hidden")])
    with pytest.raises(PrivilegeError) as caught:
        check_executor_can_run(STRANGER)
    assert "/hidden not traversable" in str(caught.value)
    assert f"{sys.executable} -m kernel_enclave.privileges --fix" in str(caught.value)


def test_the_check_passes_on_this_installation(capsys: pytest.CaptureFixture[str]) -> None:
    """The test command makes this Python reachable for the executor's user; the kernel suites rely on it."""
    assert main([]) == 0
    assert capsys.readouterr().err == ""
