"""The insurer, the second data owner: encrypt the claims table, set its policies, and serve its own key broker.

The hospital (``examples/hospital/hospital_owner.py``) is the first owner; the two never exchange data. Each
runs its own broker and decides on its own which kernels get its key and what may leave them. An analyst who
joins the two tables in one computation is bound by both policies at once: the stricter value of each rule.

What this script does, with the command a data owner would type for each step:

1. make the synthetic claims table (``python insurer_data.py claims.parquet``);
2. create the owner's store: owner key, key database, audit log (``confnb broker init --dir OWNER_DIR``);
3. write ``OWNER_DIR/attestation.toml``: which kernels may receive the key (here: this machine's simulated TEE
   running exactly this installation's kernel code);
4. encrypt the table under ``insurer_policy.toml`` (``confnb dataset encrypt claims.parquet --broker-dir OWNER_DIR
   --id claims --policy insurer_policy.toml --out DATA_DIR/claims``);
5. serve the key broker on loopback until Ctrl-C (``confnb broker serve --dir OWNER_DIR --port 8733``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from insurer_data import claims  # noqa: E402 - a sibling file, found through the line above

OWNER = "insurer"
BROKER_URL_VARIABLE = "INSURER_BROKER_URL"
DEFAULT_PORT = 8733
POLICY = HERE / "insurer_policy.toml"


def prepare(owner_dir: Path, data_dir: Path) -> Any:
    """Steps 1-4: the owner's store in ``owner_dir``, the encrypted ``claims`` dataset in ``data_dir``."""
    from confnb.demo.owner import set_up_owner

    return set_up_owner(owner_dir, data_dir, {"claims": (claims(), POLICY)})


def main(argv: Sequence[str] | None = None) -> int:
    from confnb.demo.owner import owner_command

    return owner_command(
        argv,
        owner="insurer",
        description="The insurer's data owner: generate the synthetic claims of the hospital's patients, create "
        "the owner's key store, encrypt the table under insurer_policy.toml (min group size 25, claim and policy "
        "numbers never released) and serve the key broker on loopback until Ctrl-C.",
        datasets=["claims"],
        default_port=DEFAULT_PORT,
        prepare=prepare,
    )


if __name__ == "__main__":
    sys.exit(main())
