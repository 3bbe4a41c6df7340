"""Synthetic hospital admissions: one row per patient, the same on every run, nobody's real data.

The numbers are drawn from fixed seeds with NumPy, so a notebook's released results can be checked against known
values. Readmission within 30 days depends on age, previous admissions, length of stay and medications (plus noise),
so a model trained on it has something to learn. Two features of the data exist to show the output policy at work:

- ``diagnosis`` E84 (cystic fibrosis) has only 7 patients: fewer than the hospital's minimum group size of 10;
- ``ward`` "private" has exactly 15 patients: enough for the hospital's rule, but they are also the insurer's
  15 platinum members, too few for the insurer's (see ``examples/two_owners``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

SEED = 20260601
PATIENTS = 4000
FIRST_PATIENT_ID = 100_000  # patient numbers are shared with the insurer: the two_owners example joins on them
RARE_DIAGNOSIS = "E84"
RARE_DIAGNOSIS_PATIENTS = 7
PRIVATE_WARD_PATIENTS = 15
DIAGNOSES = {"I50": 0.22, "J44": 0.20, "E11": 0.24, "N18": 0.14, "S72": 0.20}  # heart failure, COPD, diabetes, ...
WARDS = {"cardiology": 0.3, "general medicine": 0.35, "orthopaedics": 0.2, "respiratory": 0.15}
DISCHARGE = {"home": 0.7, "care home": 0.15, "rehabilitation": 0.15}


def admissions(rows: int = PATIENTS, seed: int = SEED) -> pd.DataFrame:
    """The hospital's admissions table (``patient_id`` identifies a person; the policy never releases it)."""
    rng = np.random.default_rng(seed)
    age = rng.integers(18, 96, rows)
    diagnosis = rng.choice(list(DIAGNOSES), rows, p=list(DIAGNOSES.values())).astype(object)
    ward = rng.choice(list(WARDS), rows, p=list(WARDS.values())).astype(object)
    special = rng.choice(rows, RARE_DIAGNOSIS_PATIENTS + PRIVATE_WARD_PATIENTS, replace=False)
    diagnosis[special[:RARE_DIAGNOSIS_PATIENTS]] = RARE_DIAGNOSIS
    ward[special[RARE_DIAGNOSIS_PATIENTS:]] = "private"
    length_of_stay = np.clip(rng.gamma(2.0, 2.5, rows) + (age - 18) / 25, 1, 45).round().astype(np.int64)
    prior_admissions = rng.poisson(0.4 + (age - 18) / 60, rows).astype(np.int64)
    medications = rng.poisson(2 + (age - 18) / 20, rows).astype(np.int64)
    logit = (
        -4.2
        + 0.025 * (age - 18)
        + 0.55 * prior_admissions
        + 0.06 * length_of_stay
        + 0.12 * medications
        + np.where(diagnosis == "I50", 0.6, 0.0)
        + rng.normal(0.0, 0.5, rows)
    )
    readmitted = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    return pd.DataFrame(
        {
            "patient_id": np.arange(FIRST_PATIENT_ID, FIRST_PATIENT_ID + rows, dtype=np.int64),
            "age": age.astype(np.int64),
            "sex": rng.choice(["F", "M"], rows),
            "ward": ward.astype(str),
            "diagnosis": diagnosis.astype(str),
            "length_of_stay": length_of_stay,
            "prior_admissions": prior_admissions,
            "medications": medications,
            "discharged_to": rng.choice(list(DISCHARGE), rows, p=list(DISCHARGE.values())),
            "readmitted_30d": readmitted,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic hospital admissions as a Parquet file.")
    parser.add_argument("out", type=Path, help="the Parquet file to write, e.g. admissions.parquet")
    args = parser.parse_args()
    admissions().to_parquet(args.out, index=False)
    print(f"wrote {PATIENTS} synthetic admissions to {args.out}")


if __name__ == "__main__":
    main()
