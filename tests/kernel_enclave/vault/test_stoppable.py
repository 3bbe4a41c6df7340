"""Work in a fork of the vault: stoppable at once, and unable to reach anything but the vault thread that asked.

Real forks of this process: a cancel kills the worker within moments; a worker killed from outside (as under memory
pressure) is an error, not a hang; the worker cannot write to the sockets it inherited (the executor's connection,
in the vault) nor keep them open; it is never dumpable when the vault is not; and it trains OpenMP estimators even
after this process has used OpenMP (libgomp's thread pool does not survive fork; used as is, the child crashes).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from kernel_enclave.vault import stoppable
from kernel_enclave.vault.protocol import Cancelled, PolicyViolation, VaultError


def _sleep_then(value: object, seconds: float) -> object:
    time.sleep(seconds)
    return value


def test_a_result_comes_back_as_computed() -> None:
    assert stoppable.run(np.arange, 5).tolist() == [0, 1, 2, 3, 4]
    assert stoppable.run(_sleep_then, {"a": [1, 2.5]}, 0.0) == {"a": [1, 2.5]}


def test_a_cancel_kills_the_worker_at_once() -> None:
    token = threading.Event()
    timer = threading.Timer(0.3, token.set)
    timer.start()
    started = time.monotonic()
    with stoppable.cancellable(token), pytest.raises(Cancelled):
        stoppable.run(_sleep_then, 1, 60)
    assert time.monotonic() - started < 3
    timer.join()


def test_a_request_cancelled_before_it_starts_forks_nothing() -> None:
    token = threading.Event()
    token.set()
    with stoppable.cancellable(token), pytest.raises(Cancelled):
        stoppable.run(os.getpid)


def _raise(error: Exception) -> None:
    raise error


def test_the_vaults_errors_come_back_as_raised_and_others_by_type_only() -> None:
    violation = PolicyViolation("release.min_group_size", ["patients"], "a group has fewer than 10 records")
    with pytest.raises(PolicyViolation) as caught:
        stoppable.run(_raise, violation)
    assert caught.value.rule == "release.min_group_size" and str(caught.value) == str(violation)
    with pytest.raises(VaultError) as other:
        stoppable.run(_raise, ValueError("secret value 7777777.77"))
    assert str(other.value) == "the computation failed inside the vault (ValueError)"  # no text: it may quote data


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_killed_from_outside_is_an_error_not_a_hang() -> None:
    with pytest.raises(VaultError, match=r"worker process was killed by SIGKILL \(out of memory\?\); the vault is"):
        stoppable.run(_kill_self)


def _write_to(descriptor: int) -> str:
    os.write(descriptor, b"rows the policy never saw")
    return os.readlink(f"/proc/self/fd/{descriptor}")


def test_a_worker_cannot_answer_on_inherited_sockets_nor_hold_them_open() -> None:
    executor, vault_side = socket.socketpair()
    with executor, vault_side:
        assert stoppable.run(_write_to, vault_side.fileno()) == os.devnull
        vault_side.close()  # the vault's end closes (as when the vault dies): the executor sees EOF, nothing else
        executor.settimeout(5)
        assert executor.recv(100) == b""


def test_the_legitimate_twin_the_result_pipe_still_reaches_the_vault() -> None:
    assert stoppable.run(_sleep_then, "released under policy", 0.0) == "released under policy"


def test_a_worker_of_an_undumpable_vault_is_undumpable() -> None:
    code = (
        "import ctypes\n"
        "from kernel_enclave.privileges import make_undumpable\n"
        "from kernel_enclave.vault import stoppable\n"
        "make_undumpable()\n"
        "print(stoppable.run(lambda: ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)))\n"  # PR_GET_DUMPABLE
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "0"


def _fit_openmp() -> float:
    from sklearn.ensemble import HistGradientBoostingRegressor  # type: ignore[import-untyped]

    rng = np.random.default_rng(0)
    x = rng.random((4000, 6))
    return float(HistGradientBoostingRegressor(max_iter=15).fit(x, x.sum(axis=1)).score(x, x.sum(axis=1)))


def test_a_worker_trains_with_openmp_after_the_vault_has_used_it() -> None:
    assert _fit_openmp() > 0.5  # this process's OpenMP thread pool now exists
    assert stoppable.run(_fit_openmp, openmp=True) > 0.5
