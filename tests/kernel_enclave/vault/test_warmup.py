"""The vault's heavy imports stay off the kernel's start path: a kernel runs cells before scikit-learn is loaded.

The kernel tests start a real ``confnb-snp`` kernel with ``CONFNB_VAULT_WARMUP=on-demand``, so the vault loads
nothing until a request needs it and the state it reports (and the packages it has imported) can be read from a
cell; in the default mode the same loading merely starts earlier, in the background.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confidential_fixtures import ConfidentialWorld, start_confidential_kernel, stop_confidential_kernel

from kernel_enclave.tee.simulated import SimulatedBackend
from kernel_enclave.vault import stoppable
from kernel_enclave.vault.process import WarmedConnection
from kernel_enclave.vault.vault import Vault, VaultKeys
from kernel_enclave.vault.warmup import (
    FAILED,
    HEAVY_MODULES,
    LOADING,
    MAX_WAIT_S,
    MODEL_MODULES,
    ON_DEMAND,
    PENDING,
    READY,
    VAULT_WARMUP,
    WARMUP_VARIABLE,
    Warmup,
    configured_mode,
)

TIMEOUT = 120  # a cell that waits for scikit-learn to load on a busy machine
VAULT_STATUS = (
    "import json\nfrom confnb.analyst.session import current_session\n"
    "print(json.dumps(current_session().request({'op': 'warmup'})[0]))\n"
)
NOTICE = "the vault is still loading its query engine"


def _vault_status(kernel: Any) -> dict[str, Any]:
    status = json.loads(kernel.stdout(VAULT_STATUS))
    assert isinstance(status, dict)
    return status


@pytest.fixture
def on_demand_kernel(
    confnb_kernel_env: Path, confidential_world: ConfidentialWorld, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    monkeypatch.setenv(WARMUP_VARIABLE, ON_DEMAND)
    kernel = start_confidential_kernel(confidential_world)
    yield kernel
    stop_confidential_kernel(kernel)


def test_a_kernel_runs_cells_before_the_vault_has_loaded_scikit_learn(
    on_demand_kernel: Any, confidential_world: ConfidentialWorld
) -> None:
    kernel = on_demand_kernel
    msg_id = kernel.client.kernel_info()
    info = kernel.client.get_shell_msg(timeout=TIMEOUT)
    while info["parent_header"].get("msg_id") != msg_id:
        info = kernel.client.get_shell_msg(timeout=TIMEOUT)
    assert info["content"]["status"] == "ok"
    assert "confnb-attestation" in info["content"]["supported_features"]
    assert kernel.stdout("print(6 * 7)") == "42\n"

    before = _vault_status(kernel)
    assert before["state"] == PENDING
    assert before["loaded"] == []  # neither Polars nor pandas nor scikit-learn nor skops is imported in the vault

    reply, outputs = kernel.execute(
        "import confnb as cn\nt = cn.open('patients')\nprint(t.columns)\nprint(t.count().release())\n",
        timeout=TIMEOUT,
    )
    assert reply["content"]["status"] == "ok", reply["content"]
    shown = "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream")
    assert str(list(confidential_world.frames["patients"].columns)) in shown
    assert str(len(confidential_world.frames["patients"])) in shown

    after = _vault_status(kernel)
    assert after["state"] == READY
    assert after["loaded"] == ["polars"]  # a query needs no scikit-learn: it loads with the first model
    # The progress line appears when, and only when, the wait lasted more than a second.
    if NOTICE in shown:
        assert after["seconds"] > 0.9
    else:
        assert after["seconds"] < 1.5

    reply, _ = kernel.execute(
        "from sklearn.linear_model import LogisticRegression\n"
        "m = cn.fit(LogisticRegression(), t, target='readmitted', features=['age', 'cost'])\n"
        "print(sorted(m.metrics()))\n",
        timeout=TIMEOUT,
    )
    assert reply["content"]["status"] == "ok", reply["content"]
    assert {"sklearn", "skops"} <= set(_vault_status(kernel)["loaded"])


def test_the_vault_process_starts_without_the_heavy_packages() -> None:
    """What the vault imports before it answers: none of the packages the warm-up loads."""
    code = (
        "import sys\n"
        "import kernel_enclave.vault.process, kernel_enclave.vault.service, kernel_enclave.vault.upload\n"
        "print(sorted(m for m in ('pandas', 'sklearn', 'skops', 'scipy', 'pyarrow.parquet') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


# -- the warm-up itself -------------------------------------------------------------------------------------------


def test_a_warmup_loads_its_modules_once_and_reports_ready() -> None:
    warmup = Warmup(["json", "email.message"])
    assert warmup.state == PENDING
    assert warmup.status()["state"] == PENDING
    assert warmup.wait(TIMEOUT)
    assert warmup.state == READY
    assert "email.message" in sys.modules
    status = warmup.status()
    assert status["state"] == READY and status["seconds"] >= 0 and "error" not in status
    warmup.start()  # idempotent: nothing starts again
    assert warmup.state == READY


def test_a_warmup_that_cannot_import_fails_naming_the_module() -> None:
    warmup = Warmup(["json", "confnb_no_such_module_anywhere"])
    assert warmup.wait(TIMEOUT)
    assert warmup.state == FAILED
    assert warmup.error == "ModuleNotFoundError while importing confnb_no_such_module_anywhere"
    assert warmup.status()["error"] == warmup.error


def test_waiters_block_until_the_modules_are_loaded() -> None:
    warmup = Warmup(["json"])
    results: list[bool] = []
    waiters = [threading.Thread(target=lambda: results.append(warmup.wait(TIMEOUT))) for _ in range(4)]
    for waiter in waiters:
        waiter.start()
    for waiter in waiters:
        waiter.join(TIMEOUT)
    assert results == [True] * 4
    assert warmup.state == READY


class HeldWarmup(Warmup):
    """A real warm-up whose loading thread waits until the test lets it import anything."""

    def __init__(self, modules: list[str]) -> None:
        super().__init__(modules)
        self.gate = threading.Event()

    def _load(self) -> None:
        self.gate.wait(TIMEOUT)
        super()._load()


def test_a_timed_out_wait_reports_loading() -> None:
    warmup = HeldWarmup(["json"])
    assert not warmup.wait(0.05)
    assert warmup.state == LOADING
    warmup.gate.set()
    assert warmup.wait(TIMEOUT)
    assert warmup.state == READY


def test_while_loading_only_the_immediate_requests_are_answered(simulated_backend: SimulatedBackend) -> None:
    warmup = HeldWarmup(["json"])
    connection = WarmedConnection(Vault(backend=simulated_backend, keys=VaultKeys.generate()), warmup)
    assert connection.handle({"op": "hello"}, [])[0]["ok"] is True
    assert connection.handle({"op": "audit"}, [])[0]["ok"] is True
    started = time.monotonic()
    status, _ = connection.handle({"op": "warmup", "wait": 0.05}, [])  # waits that long at most, then reports
    assert status["ok"] is True and time.monotonic() - started < TIMEOUT / 4
    assert warmup.state == LOADING

    answered: list[dict[str, Any]] = []
    waiting = threading.Thread(target=lambda: answered.append(connection.handle({"op": "schema"}, [])[0]))
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive() and answered == []  # the request waits for the libraries
    warmup.gate.set()
    waiting.join(TIMEOUT)
    assert answered[0]["ok"] is False  # then the vault answers it (here: a schema request without a plan)
    assert "plan" in answered[0]["error"]["message"]


def test_an_interrupt_ends_a_request_waiting_for_the_warmup(simulated_backend: SimulatedBackend) -> None:
    warmup = HeldWarmup(["json"])
    connection = WarmedConnection(Vault(backend=simulated_backend, keys=VaultKeys.generate()), warmup)
    token = threading.Event()
    timer = threading.Timer(0.2, token.set)
    timer.start()
    try:
        with stoppable.cancellable(token):
            reply, _ = connection.handle({"op": "fit"}, [])
    finally:
        warmup.gate.set()
        timer.join()
    assert reply["ok"] is False
    assert reply["error"]["type"] == "Cancelled"


def test_the_mode_is_one_of_two_names() -> None:
    assert configured_mode("") == "background"
    assert configured_mode(ON_DEMAND) == ON_DEMAND
    with pytest.raises(ValueError, match=f"{WARMUP_VARIABLE} is background or on-demand, not 'later'"):
        configured_mode("later")


def test_the_vault_warms_up_what_its_requests_need() -> None:
    assert "kernel_enclave.vault.models" in MODEL_MODULES  # scikit-learn, skops and the estimator allowlist
    assert "kernel_enclave.vault.models" not in HEAVY_MODULES  # queries never wait for scikit-learn
    assert "confnb.datasets.reader" in HEAVY_MODULES  # Parquet, for cn.open


@pytest.mark.parametrize("wait", ["1", True, -1, 1e9, [1]])
def test_a_warmup_request_with_a_malformed_wait_is_refused(simulated_backend: SimulatedBackend, wait: object) -> None:
    vault = Vault(backend=simulated_backend, keys=VaultKeys.generate())
    reply, _ = vault.handle({"op": "warmup", "wait": wait}, [])
    assert reply["ok"] is False
    assert reply["error"]["message"] == "warmup: wait is a number of seconds from 0 to 30"


def test_a_warmup_request_reports_the_state(simulated_backend: SimulatedBackend) -> None:
    vault = Vault(backend=simulated_backend, keys=VaultKeys.generate())
    reply, _ = vault.handle({"op": "warmup", "wait": MAX_WAIT_S}, [])  # loads them, in this process
    assert reply["ok"] is True
    assert reply["state"] == READY
    assert "polars" in reply["loaded"]
    VAULT_WARMUP.wait_for_models()  # then scikit-learn, with the first model operation
    reply, _ = vault.handle({"op": "warmup"}, [])
    assert {"pandas", "sklearn", "skops"} <= set(reply["loaded"])
