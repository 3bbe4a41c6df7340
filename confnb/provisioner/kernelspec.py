"""The ``confnb-snp`` kernelspec: "Confidential Python (SEV-SNP)" in JupyterLab's launcher.

The spec names ``confnb-provisioner``, so Jupyter never starts the launcher itself; interrupts travel as control
messages (a signal from the host would need the host's trust), and ``supported_encryption`` tells Jupyter that
the channel is CurveZMQ. Installed next to it is the attestation policy the provisioner enforces: for the local
simulated TEE a policy that accepts simulated hardware but pins this installation's exact enclave code.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

KERNEL_NAME = "confnb-snp"
DISPLAY_NAME = "Confidential Python (SEV-SNP)"
PROVISIONER_NAME = "confnb-provisioner"
POLICY_FILE = "attestation.toml"


def private_jupyter_environment(root: Path) -> dict[str, str]:
    """Environment variables that give Jupyter a private data, runtime and config folder under ``root``, so a
    demo, a benchmark or a test suite installs kernelspecs there and touches nothing of the user's."""
    return {
        "JUPYTER_PATH": str(root / "share" / "jupyter"),
        "JUPYTER_DATA_DIR": str(root / "data"),
        "JUPYTER_RUNTIME_DIR": str(root / "runtime"),
        "JUPYTER_CONFIG_DIR": str(root / "config"),
        "IPYTHONDIR": str(root / "ipython"),
    }


def kernel_spec(*, mode: str = "local", tee: str = "simulated", config: dict[str, Any] | None = None) -> dict[str, Any]:
    provisioner_config: dict[str, Any] = {"mode": mode, "tee": tee, "attestation_policy": POLICY_FILE}
    provisioner_config.update(config or {})
    return {
        "argv": [sys.executable, "-m", "kernel_enclave.launcher"],
        "display_name": DISPLAY_NAME,
        "language": "python",
        "interrupt_mode": "message",
        "env": {},
        "metadata": {
            "debugger": False,
            "supported_encryption": ["curve"],
            "kernel_provisioner": {"provisioner_name": PROVISIONER_NAME, "config": provisioner_config},
        },
    }


def local_policy() -> str:
    """Accept the simulated TEE, but only running exactly the enclave code installed here."""
    from kernel_enclave.measurement import simulated_measurement
    from kernel_enclave.tee.simulated import SimulatedBackend

    return (
        "# Written by `confnb kernel install` for the local, simulated TEE.\n"
        "# Real deployments set allow_simulated = false and pin the CVM image's launch measurement.\n"
        "[attestation]\n"
        "allow_simulated = true\n"
        "# This machine's simulated chip only: anyone can make a simulated chip of their own.\n"
        f'simulated_roots = ["{SimulatedBackend().ark_sha256()}"]\n'
        f'measurements = ["{simulated_measurement().hex()}"]\n'
        "reject_debug = true\n"
        "reject_migration_agent = true\n"
        "max_vmpl = 0\n"
        "max_evidence_age_s = 300\n"
    )


def install(
    *,
    user: bool = False,
    prefix: str | None = None,
    mode: str = "local",
    tee: str = "simulated",
    policy_text: str | None = None,
    config: dict[str, Any] | None = None,
    name: str = KERNEL_NAME,
) -> Path:
    """Install the kernelspec (and its attestation policy) with Jupyter's own installer; return its directory."""
    from jupyter_client.kernelspec import KernelSpecManager

    if policy_text is None:
        if tee != "simulated":
            raise ValueError("a kernel for real hardware needs an attestation policy (--policy FILE)")
        policy_text = local_policy()
    with tempfile.TemporaryDirectory() as staging:
        source = Path(staging) / name
        source.mkdir()
        spec = kernel_spec(mode=mode, tee=tee, config=config)
        (source / "kernel.json").write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
        (source / POLICY_FILE).write_text(policy_text, encoding="utf-8")
        destination = KernelSpecManager().install_kernel_spec(str(source), name, user=user, prefix=prefix)
    return Path(destination)
