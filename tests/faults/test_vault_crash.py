"""Crashes are loud: a vault that dies is reported in the notebook, and no process of the kernel lingers.

The vault is killed with ``SIGKILL`` (what the kernel's out-of-memory killer sends) in a real ``confnb-snp`` kernel,
during a long fit and while idle. The cell says so in one line, "the vault stopped: ...; restart the kernel",
within seconds instead of hanging; every later cell says the same; the worker process dies with the vault; and once
the kernel is shut down none of its processes is left (checked by the ``fresh_kernel`` fixture). The legitimate
twin: when only the vault's worker dies (as under memory pressure), the vault survives, says what happened, and
the next cell is answered correctly.
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Any

import pytest

pytestmark = pytest.mark.slow

PROMPT_S = 8.0
STOPPED = "the vault stopped: it was killed by SIGKILL (out of memory, or stopped from outside); restart the kernel"
LONG_FIT = (
    "model = cn.fit(RandomForestClassifier(n_estimators=20000, random_state=0), t, target='readmitted',"
    " features=['age', 'cost'])"
)


def _assert_stopped(cell: Any) -> None:
    print(f"the cell reported the dead vault after {cell.seconds:.2f} s")  # shown with -rP
    assert cell.status == "error"
    assert cell.error == ("VaultError", STOPPED), cell.error
    assert cell.seconds < PROMPT_S, f"the cell took {cell.seconds:.1f} s to report the dead vault"


def test_a_vault_killed_during_a_fit_is_reported_and_leaves_nothing_behind(fresh_kernel: Any) -> None:
    msg_id = fresh_kernel.start(LONG_FIT)
    worker = fresh_kernel.worker()
    time.sleep(0.3)
    killed = time.monotonic()
    os.kill(fresh_kernel.vault, signal.SIGKILL)
    _assert_stopped(fresh_kernel.finish(msg_id, killed))
    fresh_kernel.wait_gone(worker, PROMPT_S)  # the worker dies with the vault
    fresh_kernel.wait_gone(fresh_kernel.vault, PROMPT_S)
    _assert_stopped(fresh_kernel.run("t['age'].mean().release()"))  # and every later cell says the same
    _assert_stopped(fresh_kernel.run("cn.open('patients')"))


def test_a_vault_killed_between_cells_is_reported_at_the_next_one(fresh_kernel: Any) -> None:
    os.kill(fresh_kernel.vault, signal.SIGKILL)
    fresh_kernel.wait_gone(fresh_kernel.vault, PROMPT_S)
    _assert_stopped(fresh_kernel.run("t['age'].mean().release()"))
    assert fresh_kernel.run("print(1 + 1)").stdout == "2\n"  # the kernel itself still runs plain Python


def test_a_killed_worker_is_reported_and_the_vault_answers_on(fresh_kernel: Any, confidential_world: Any) -> None:
    msg_id = fresh_kernel.start(LONG_FIT)
    worker = fresh_kernel.worker()
    time.sleep(0.3)
    killed = time.monotonic()
    os.kill(worker, signal.SIGKILL)
    cell = fresh_kernel.finish(msg_id, killed)
    assert cell.status == "error"
    assert cell.error == (
        "VaultError",
        "the computation's worker process was killed by SIGKILL (out of memory?); the vault is intact",
    )
    assert cell.seconds < PROMPT_S
    after = fresh_kernel.run("print(repr(t['age'].mean().release()))")
    assert after.status == "ok", after.reply["content"]
    assert math.isclose(float(after.stdout), float(confidential_world.frames["patients"]["age"].mean()), rel_tol=1e-12)
    assert ("error", "fit") in fresh_kernel.audit_events()
