"""A real kernel at work executes no project file outside its measurement.

The kernel starts as an analyst starts it (``confnb-snp`` through confnb-provisioner, the simulated TEE, two owners'
brokers on loopback) with one addition: a ``sitecustomize`` on ``PYTHONPATH`` installs an audit hook that writes
down, for every process of the kernel, each project file whose code it executes (the ``exec`` audit event that
importlib raises for every module it runs). A notebook's worth of work then goes through the launcher, the relay and
the vault: both owners' datasets opened, aggregates and a join released, a refusal, a model fitted, a table sealed
and unsealed, an export and the kernel's audit log. Every file the launcher (the relay) and the vault executed must
be in ``kernel_enclave.measurement.code_files()``. The executor is the analyst's process and is not held to it.
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from pathlib import Path

import pytest
from confidential_fixtures import ConfidentialWorld, start_confidential_kernel, stop_confidential_kernel

import kernel_enclave
from kernel_enclave import measurement

pytestmark = pytest.mark.slow  # a kernel, two datasets and a fit: about 20 s

ROOT = Path(kernel_enclave.__file__).resolve().parent.parent
LOG_VARIABLE = "CONFNB_TEST_EXEC_LOG"

# Observes only: it never raises (an exception in an audit hook would abort the import it watches), and a process
# that cannot write the log (the executor as another user) is simply not recorded.
SITECUSTOMIZE = """
import os
import sys

_LOG = os.environ.get("CONFNB_TEST_EXEC_LOG")
_ROOTS = tuple(os.path.join(os.environ.get("CONFNB_TEST_EXEC_ROOT", "/nonexistent"), name) + os.sep
               for name in ("confnb", "kernel_enclave"))


def _record(event, args):
    if event != "exec" or not _LOG:
        return
    try:
        filename = os.path.realpath(getattr(args[0], "co_filename", "") or "")
        if filename.startswith(_ROOTS):
            line = f"{os.getpid()}\\t{' '.join(sys.orig_argv)}\\t{filename}\\n"
            fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
    except Exception:
        pass


sys.addaudithook(_record)
"""

WORKLOAD = [
    "import os\nimport confnb as cn\nfrom sklearn.linear_model import LogisticRegression\n"
    't = cn.open("patients")\nclaims = cn.open("claims", broker=os.environ["INSURER_BROKER"])',
    'by_sex = t.group_by("sex").agg(n=("age", "count"), mean_cost=("cost", "mean")).release()\nprint(len(by_sex))',
    't.join(claims, on="patient_id").group_by("tier").agg(n=("amount", "count")).release()',
    'try:\n    t[t["zip"] == "Z-20001"]["cost"].mean().release()\nexcept cn.PolicyViolation:\n    print(\'refused\')',
    'm = cn.fit(LogisticRegression(max_iter=200), t, target="readmitted", features=["age", "cost"],'
    " test_size=0.25, random_state=0)\nprint(m.metrics())",
    't.seal(os.path.expanduser("~/t.sealed"))\nprint(cn.unseal(os.path.expanduser("~/t.sealed")))',
    'cn.export(by_sex, os.path.expanduser("~/by_sex.csv"))\nprint(len(cn.audit()))',
]


@dataclasses.dataclass(frozen=True)
class _ObservedWorld(ConfidentialWorld):
    """The session's world, with kernels started under the recording hook."""

    extra_env: dict[str, str] = dataclasses.field(default_factory=dict)

    def kernel_env(self) -> dict[str, str]:
        return {**super().kernel_env(), **self.extra_env}


def _executed(log: Path) -> dict[str, tuple[str, set[str]]]:
    """Per process id: its command line and the project files (relative to the tree) whose code it executed."""
    processes: dict[str, tuple[str, set[str]]] = defaultdict(lambda: ("", set()))
    for line in log.read_text().splitlines():
        pid, argv, filename = line.split("\t")
        files = processes[pid][1]
        files.add(Path(filename).relative_to(ROOT).as_posix())
        processes[pid] = (argv, files)
    return dict(processes)


def test_the_launcher_relay_and_vault_execute_only_measured_files(
    confnb_kernel_env: Path, confidential_world: ConfidentialWorld, tmp_path: Path
) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / "exec.log"
    paths = [str(hook), *filter(None, [os.environ.get("PYTHONPATH")])]
    observed = _ObservedWorld(
        **{field.name: getattr(confidential_world, field.name) for field in dataclasses.fields(confidential_world)},
        extra_env={
            "PYTHONPATH": os.pathsep.join(paths),
            LOG_VARIABLE: str(log),
            "CONFNB_TEST_EXEC_ROOT": str(ROOT),
            "INSURER_BROKER": confidential_world.insurer.broker_url,
        },
    )
    kernel = start_confidential_kernel(observed)
    try:
        printed = []
        for cell in WORKLOAD:
            reply, outputs = kernel.execute(cell, timeout=120)
            assert reply["content"]["status"] == "ok", (cell, reply["content"])
            printed += [message["content"]["text"] for message in outputs if message["msg_type"] == "stream"]
        assert "refused\n" in printed
    finally:
        stop_confidential_kernel(kernel)

    processes = _executed(log)
    launchers = [files for argv, files in processes.values() if "kernel_enclave.launcher" in argv.split()]
    vaults = [files for argv, files in processes.values() if "kernel_enclave.vault" in argv.split()]
    assert len(launchers) == 1 and len(vaults) == 1, {pid: argv for pid, (argv, _) in processes.items()}
    # The hook saw the work: the relay's gate, and the vault's datasets, output policy, models and sealing.
    assert {"kernel_enclave/launcher.py", "kernel_enclave/relay/gate.py", "confnb/hpke.py"} <= launchers[0]
    assert {
        "kernel_enclave/vault/vault.py",
        "kernel_enclave/vault/models.py",
        "kernel_enclave/vault/sealing.py",
        "confnb/datasets/reader.py",
        "confnb/policy/output.py",
        "confnb/receipt_format.py",
    } <= vaults[0]

    measured = {path.relative_to(ROOT).as_posix() for path in measurement.code_files()}
    for argv, files in processes.values():
        if "kernel_enclave.executor" in argv.split():
            continue  # the analyst's process: confnb.analyst runs there, outside the measurement by design
        outside = files - measured
        assert not outside, f"{argv} executed project files outside the measurement: {sorted(outside)}"
