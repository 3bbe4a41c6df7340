"""Synthetic credit data: a bank's loan book and its customers' card transactions, the same on every run.

Drawn from fixed seeds with NumPy; nobody's real data. Default depends on credit utilisation, late payments,
income and the share of spending on gambling and cash withdrawals, so a scoring model has something to learn and
the transactions explain part of it. A handful of very high earners (``income`` above 400,000) exist to show that
a statistic about a few people is withheld.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

SEED = 20260602
CUSTOMERS = 3000
FIRST_CUSTOMER_ID = 700_000
HIGH_EARNERS = 4  # income above HIGH_INCOME: fewer than the bank's minimum group size of 20
HIGH_INCOME = 400_000
REGIONS = {"north": 0.25, "south": 0.3, "east": 0.2, "west": 0.25}
CATEGORIES = {
    "groceries": 0.32,
    "fuel": 0.12,
    "restaurants": 0.14,
    "online": 0.2,
    "travel": 0.07,
    "cash withdrawal": 0.1,
    "gambling": 0.05,
}
RISKY = ("cash withdrawal", "gambling")


def loans_and_transactions(customers: int = CUSTOMERS, seed: int = SEED) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The loan book (one row per customer) and the card transactions of the last 12 months."""
    rng = np.random.default_rng(seed)
    customer_id = np.arange(FIRST_CUSTOMER_ID, FIRST_CUSTOMER_ID + customers, dtype=np.int64)
    age = rng.integers(21, 80, customers)
    income = np.round(rng.lognormal(10.6, 0.45, customers), -2)
    income = np.minimum(income, HIGH_INCOME - 100)
    income[rng.choice(customers, HIGH_EARNERS, replace=False)] = rng.integers(450_000, 900_000, HIGH_EARNERS)
    credit_limit = np.round(np.clip(income * rng.uniform(0.1, 0.4, customers), 1000, 50_000), -2)
    utilization = np.round(np.clip(rng.beta(2.0, 3.5, customers) * 1.3, 0, 1.25), 3)
    late_payments = rng.poisson(0.3 + 1.5 * utilization, customers).astype(np.int64)
    tenure_years = rng.integers(0, 30, customers).astype(np.int64)
    # Each customer's propensity to spend on risky categories shows both in the transactions and in the default.
    risky_taste = rng.beta(1.2, 8.0, customers)

    counts = rng.poisson(14, customers)
    owner = np.repeat(np.arange(customers), counts)
    n = owner.size
    categories = np.array(list(CATEGORIES), dtype=object)
    safe = categories[[c not in RISKY for c in categories]]
    safe_p = np.array([CATEGORIES[c] for c in safe]) / sum(CATEGORIES[c] for c in safe)
    category = rng.choice(safe, n, p=safe_p).astype(object)
    is_risky = rng.random(n) < risky_taste[owner]
    category[is_risky] = rng.choice(list(RISKY), int(is_risky.sum()))
    amount = np.round(rng.gamma(2.0, 35.0, n) * np.where(category == "travel", 6.0, 1.0), 2)
    risky_share = np.bincount(owner, weights=is_risky, minlength=customers) / np.maximum(counts, 1)

    logit = (
        -3.4
        + 2.6 * utilization
        + 0.45 * late_payments
        - 0.9 * (np.log(income) - 10.6)
        + 3.0 * risky_share
        - 0.02 * tenure_years
        + rng.normal(0, 0.4, customers)
    )
    defaulted = (rng.random(customers) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    loans = pd.DataFrame(
        {
            "customer_id": customer_id,
            "age": age.astype(np.int64),
            "region": rng.choice(list(REGIONS), customers, p=list(REGIONS.values())),
            "income": income,
            "credit_limit": credit_limit,
            "utilization": utilization,
            "late_payments_12m": late_payments,
            "tenure_years": tenure_years,
            "defaulted": defaulted,
        }
    )
    transactions = pd.DataFrame(
        {
            "transaction_id": np.arange(90_000_000, 90_000_000 + n, dtype=np.int64),
            "customer_id": customer_id[owner],
            "month": rng.integers(1, 13, n).astype(np.int64),
            "category": category.astype(str),
            "amount": amount,
        }
    )
    return loans, transactions


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic loan book and transactions as Parquet files.")
    parser.add_argument("out", type=Path, help="folder for loans.parquet and card_transactions.parquet")
    args = parser.parse_args()
    loans, transactions = loans_and_transactions()
    args.out.mkdir(parents=True, exist_ok=True)
    loans.to_parquet(args.out / "loans.parquet", index=False)
    transactions.to_parquet(args.out / "card_transactions.parquet", index=False)
    print(f"wrote {len(loans)} loans and {len(transactions)} transactions to {args.out}")


if __name__ == "__main__":
    main()
