"""A data owner's set-up, as the example owner scripts and ``confnb demo`` perform it.

Each step is what a CLI command does (named in the docstrings), done through the same Python API so that the demo
prepares three owners in one process in a few seconds instead of starting a dozen interpreters.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

ATTESTATION_FILE = "attestation.toml"


def simulated_attestation_policy() -> str:
    """Which kernels may receive this owner's keys: this machine's simulated TEE running exactly this code.

    On real hardware the owner pins the CVM image's launch measurement and leaves ``allow_simulated`` false (see
    ``examples/attestation/production-policy.toml``); anyone can make a simulated chip, so the simulated one is
    pinned by its root's fingerprint.
    """
    from kernel_enclave.measurement import simulated_measurement
    from kernel_enclave.tee.simulated import SimulatedBackend

    return (
        "# Which kernels may receive this owner's dataset keys (the local, simulated TEE only).\n"
        "# Real deployments set allow_simulated = false and pin the CVM image's launch measurement.\n"
        "[attestation]\n"
        "allow_simulated = true\n"
        f'simulated_roots = ["{SimulatedBackend().ark_sha256()}"]\n'
        f'measurements = ["{simulated_measurement().hex()}"]\n'
        "reject_debug = true\n"
        "max_vmpl = 0\n"
        "max_evidence_age_s = 300\n"
    )


def set_up_owner(
    owner_dir: Path, data_dir: Path, datasets: Mapping[str, tuple[Any, Path]], attestation: str | None = None
) -> Any:
    """Create the owner's store, write its attestation policy, encrypt each dataset under its output policy.

    ``datasets`` maps a dataset id to (table or DataFrame, output policy TOML file). The steps are
    ``confnb broker init --dir OWNER_DIR``, writing ``OWNER_DIR/attestation.toml``, and
    ``confnb dataset encrypt INPUT --broker-dir OWNER_DIR --id ID --policy POLICY --out DATA_DIR/ID`` per dataset.
    Returns the :class:`~confnb.broker.store.OwnerStore`.
    """
    from confnb.broker.store import OwnerStore
    from confnb.datasets.owner import encrypt_dataset
    from confnb.fileio import write_atomically
    from confnb.policy.output import OutputPolicy

    store = OwnerStore.create(owner_dir)
    write_atomically(
        store.directory / ATTESTATION_FILE, (attestation or simulated_attestation_policy()).encode(), mode=0o644
    )
    data_dir.mkdir(parents=True, exist_ok=True)
    # Ciphertext may be world-readable, as on a VM's shared disk: without the key released to an attested kernel,
    # nobody can read it.
    data_dir.chmod(0o755)
    for dataset_id, (table, policy_path) in datasets.items():
        encrypt_dataset(table, data_dir / dataset_id, store, dataset_id, OutputPolicy.load(policy_path))
    return store


def serve(owner_dir: Path, port: int, host: str = "127.0.0.1") -> int:
    """``confnb broker serve --dir OWNER_DIR --port PORT``: the owner's key broker, until Ctrl-C."""
    from confnb.cli import main

    return main(["broker", "serve", "--dir", os.fspath(owner_dir), "--host", host, "--port", str(port)])


def owner_command(
    argv: Sequence[str] | None,
    *,
    owner: str,
    description: str,
    datasets: Sequence[str],
    default_port: int,
    prepare: Callable[[Path, Path], object],
) -> int:
    """The command line every example owner's script shares: prepare the store and datasets, then serve."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--dir", type=Path, default=Path(f"{owner}-owner"), help="owner store (default %(default)s)")
    parser.add_argument(
        "--data", type=Path, default=Path("datasets"), help="where encrypted datasets go (default %(default)s)"
    )
    parser.add_argument("--port", type=int, default=default_port, help="broker port (default %(default)s)")
    parser.add_argument("--no-serve", action="store_true", help="prepare the store and datasets, then exit")
    args = parser.parse_args(argv)
    prepare(args.dir, args.data)
    print(f"encrypted {' and '.join(str(args.data / name) for name in datasets)}; owner store {args.dir}")
    if args.no_serve:
        return 0
    return serve(args.dir, args.port)
