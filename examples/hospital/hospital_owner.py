"""The hospital, as a data owner: encrypt the admissions table, set its policies, and serve its key broker.

The same admissions are offered twice, under two output policies: ``admissions`` under ``policy.toml`` (exact
aggregates of at least 10 patients) and ``admissions_dp`` under ``policy_dp.toml`` (differential privacy: only noisy
numbers, each charged to a total privacy budget that this owner's broker keeps). An analyst chooses by dataset id.

What this script does, with the command a data owner would type for each step:

1. make the synthetic admissions table (``python hospital_data.py admissions.parquet``);
2. create the owner's store: owner key, key database, audit log (``confnb broker init --dir OWNER_DIR``);
3. write ``OWNER_DIR/attestation.toml``: which kernels may receive the key (here: this machine's simulated TEE
   running exactly this installation's kernel code);
4. encrypt the table under the output policy ``policy.toml`` (``confnb dataset encrypt admissions.parquet
   --broker-dir OWNER_DIR --id admissions --policy policy.toml --out DATA_DIR/admissions``), and again under
   ``policy_dp.toml`` (``... --id admissions_dp --policy policy_dp.toml --out DATA_DIR/admissions_dp``);
5. serve the key broker on loopback until Ctrl-C (``confnb broker serve --dir OWNER_DIR --port 8731``).

Analysts then open the dataset in a confidential kernel whose ``CONFNB_DATASET_PATH`` includes DATA_DIR, with
``cn.open("admissions", broker="http://127.0.0.1:8731")`` or ``cn.open("admissions_dp", ...)`` (the notebooks read
the URL from HOSPITAL_BROKER_URL).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from hospital_data import admissions  # noqa: E402 - a sibling file, found through the line above

OWNER = "hospital"
BROKER_URL_VARIABLE = "HOSPITAL_BROKER_URL"
DEFAULT_PORT = 8731
POLICY = HERE / "policy.toml"
DP_POLICY = HERE / "policy_dp.toml"
DATASETS = ("admissions", "admissions_dp")


def prepare(owner_dir: Path, data_dir: Path) -> Any:
    """Steps 1-4: the owner's store in ``owner_dir``; ``admissions`` and ``admissions_dp`` encrypted in ``data_dir``."""
    from confnb.demo.owner import set_up_owner

    table = admissions()
    return set_up_owner(owner_dir, data_dir, {"admissions": (table, POLICY), "admissions_dp": (table, DP_POLICY)})


def main(argv: Sequence[str] | None = None) -> int:
    from confnb.demo.owner import owner_command

    return owner_command(
        argv,
        owner="hospital",
        description="The hospital's data owner: generate the synthetic admissions table, create the owner's key "
        "store, encrypt the table under policy.toml (min group size 10, patient_id never released) as admissions "
        "and under policy_dp.toml (differential privacy, total budget epsilon 3) as admissions_dp, and serve the "
        "key broker on loopback until Ctrl-C.",
        datasets=list(DATASETS),
        default_port=DEFAULT_PORT,
        prepare=prepare,
    )


if __name__ == "__main__":
    sys.exit(main())
