"""The bank, as a data owner: encrypt the loan book and card transactions, set their policies, serve the broker.

What this script does, with the command a data owner would type for each step:

1. make the synthetic tables (``python credit_data.py tables/``);
2. create the owner's store: owner key, key database, audit log (``confnb broker init --dir OWNER_DIR``);
3. write ``OWNER_DIR/attestation.toml``: which kernels may receive the keys (here: this machine's simulated TEE
   running exactly this installation's kernel code);
4. encrypt both tables under the output policy ``policy.toml`` (``confnb dataset encrypt tables/loans.parquet
   --broker-dir OWNER_DIR --id loans --policy policy.toml --out DATA_DIR/loans``, and the same for
   ``card_transactions``);
5. serve the key broker on loopback until Ctrl-C (``confnb broker serve --dir OWNER_DIR --port 8732``).

Analysts then open the datasets in a confidential kernel whose ``CONFNB_DATASET_PATH`` includes DATA_DIR, with
``cn.open("loans", broker="http://127.0.0.1:8732")`` (the notebook reads the URL from BANK_BROKER_URL).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from credit_data import loans_and_transactions  # noqa: E402 - a sibling file, found through the line above

OWNER = "bank"
BROKER_URL_VARIABLE = "BANK_BROKER_URL"
DEFAULT_PORT = 8732
POLICY = HERE / "policy.toml"


def prepare(owner_dir: Path, data_dir: Path) -> Any:
    """Steps 1-4: the owner's store in ``owner_dir``, the ``loans`` and ``card_transactions`` datasets in
    ``data_dir``."""
    from confnb.demo.owner import set_up_owner

    loans, transactions = loans_and_transactions()
    return set_up_owner(owner_dir, data_dir, {"loans": (loans, POLICY), "card_transactions": (transactions, POLICY)})


def main(argv: Sequence[str] | None = None) -> int:
    from confnb.demo.owner import owner_command

    return owner_command(
        argv,
        owner="bank",
        description="The bank's data owner: generate the synthetic loan book and card transactions, create the "
        "owner's key store, encrypt both under policy.toml (aggregates, model metrics and coefficients allowed; "
        "customer rows never) and serve the key broker on loopback until Ctrl-C.",
        datasets=["loans", "card_transactions"],
        default_port=DEFAULT_PORT,
        prepare=prepare,
    )


if __name__ == "__main__":
    sys.exit(main())
