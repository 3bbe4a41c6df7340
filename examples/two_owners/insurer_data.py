"""Synthetic insurance claims for the hospital's patients, the same on every run, nobody's real data.

The insurer covers 2,600 of the hospital's 4,000 patients (the two share patient numbers, so the tables join).
Each insured patient has one claim for their admission. Members are on the basic, standard or premium plan, except
the 15 patients of the hospital's private ward: they are the insurer's platinum members. Fifteen is enough for the
hospital's minimum group size (10) but not for the insurer's (25), which is what this example shows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hospital"))

from hospital_data import admissions

SEED = 20260603
INSURED = 2600
PLANS = {"basic": 0.45, "standard": 0.35, "premium": 0.2}


def claims(seed: int = SEED) -> pd.DataFrame:
    """The insurer's claims table (``claim_id`` and ``policy_number`` are never released)."""
    rng = np.random.default_rng(seed)
    patients = admissions()
    private = patients.index[patients["ward"] == "private"].to_numpy()
    others = rng.choice(patients.index[patients["ward"] != "private"].to_numpy(), INSURED - private.size, replace=False)
    insured = np.sort(np.concatenate([private, others]))
    plan = rng.choice(list(PLANS), insured.size, p=list(PLANS.values())).astype(object)
    plan[np.isin(insured, private)] = "platinum"
    stay = patients["length_of_stay"].to_numpy()[insured]
    daily = np.select([plan == "platinum", plan == "premium"], [2400.0, 1500.0], 1100.0)
    amount = np.round(stay * daily * rng.uniform(0.8, 1.2, insured.size) + rng.gamma(2.0, 250.0, insured.size), 2)
    return pd.DataFrame(
        {
            "claim_id": np.arange(5_000_000, 5_000_000 + insured.size, dtype=np.int64),
            "policy_number": [f"POL-{n:07d}" for n in rng.permutation(9_000_000)[: insured.size]],
            "patient_id": patients["patient_id"].to_numpy()[insured],
            "plan": plan.astype(str),
            "claim_amount": amount,
            "approved": (rng.random(insured.size) < 0.93).astype(np.int64),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic insurance claims as a Parquet file.")
    parser.add_argument("out", type=Path, help="the Parquet file to write, e.g. claims.parquet")
    args = parser.parse_args()
    claims().to_parquet(args.out, index=False)
    print(f"wrote {INSURED} synthetic claims to {args.out}")


if __name__ == "__main__":
    main()
