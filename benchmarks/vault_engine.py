"""Benchmark: everyday queries through the vault's query engine against Polars and pandas on the plaintext, in one run.

Two sealed tables are encrypted with the data owner's tooling and registered with a real broker on loopback:
``people`` (``--rows`` rows: id, age, region with 50 values, income) and ``accounts`` (as many rows: id, balance,
kind with 8 values). A real vault process (``python -m kernel_enclave.vault`` on the simulated TEE, started as the
kernel's launcher starts it) releases the keys, decrypts both tables and serves the analyst API of this process.
Six operations, each timed through the vault (request, plan compilation, the Polars query, the output policy's
record counts and lone-extreme checks, the audit entry, the reply decoded into a DataFrame) against the same query
in Polars (lazy, in this process) and pandas (in this process) on the plaintext:

- **filter + group-by**: people aged over 40, mean and count of income per region;
- **join + group-by**: people joined to accounts on id, mean balance and count per region;
- **value_counts** of region;
- **group-by quantile**: the median and 90th percentile of income per region;
- **describe** of age and income;
- **window over groups**: each person's income rank within their region, then the mean income of those ranked
  above 1000 per region (pandas' ``groupby().rank()``, Polars' ``rank().over()``).

Each vault result is checked against Polars' before any timing (its medians and percentiles against the block means
the output policy releases instead of interpolated quantiles, computed from the plaintext; the timed Polars and pandas
queries still interpolate). Rounds interleave the three in a shuffled order with
the garbage collector off; each figure is the median over rounds of the per-round ratio (vault / Polars, vault /
pandas). Targets: every operation at most 1.5x Polars and at most 0.5x pandas.

Peak memory: the vault process's high-water mark (``VmHWM``) after opening both tables and running every operation
once, against a fresh process that reads the plaintext into Polars and runs the same six queries once. Target: at
most 1.3x.

Exit status 0 when every target holds, 1 otherwise. Run with::

    python benchmarks/vault_engine.py [--rows 1000000 | --large] [--rounds 11] [--json] [--out result.json]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd  # type: ignore[import-untyped]
import polars as pl
import pyarrow as pa  # type: ignore[import-untyped]
from pyarrow import feather
from vault_ops import vault_process, vm_status

TARGET_POLARS = 1.5
TARGET_PANDAS = 0.5
TARGET_MEMORY = 1.3
REGIONS = 50
KINDS = 8
RANK_ABOVE = 1000
MIN_GROUP_SIZE = 10
POLICY = f"""
[policy]
id = "bench-engine-v1"
[release]
allow = ["schema", "aggregate", "row_count", "window"]
min_group_size = {MIN_GROUP_SIZE}
"""
BASELINES = ("vs_polars", "vs_pandas")  # the per-operation ratios, each with its target
OPERATIONS = ("filter_group_by", "join_group_by", "value_counts", "group_by_quantile", "describe", "window")


def build_tables(rows: int, seed: int = 20261206) -> tuple[pa.Table, pa.Table]:
    rng = np.random.default_rng(seed)
    people = pa.table(
        {
            "id": np.arange(rows, dtype=np.int64),
            "age": rng.integers(18, 90, rows),
            "region": pa.array([f"region-{i:02d}" for i in rng.integers(0, REGIONS, rows)]),
            "income": np.round(rng.lognormal(10, 0.6, rows), 2),
        }
    )
    accounts = pa.table(
        {
            "id": rng.permutation(rows).astype(np.int64),
            "balance": np.round(rng.normal(5000, 2000, rows), 2),
            "kind": pa.array([f"kind-{i}" for i in rng.integers(0, KINDS, rows)]),
        }
    )
    return people, accounts


# -- the three ways of running each operation --------------------------------------------------------------------


def polars_queries(people: pl.LazyFrame, accounts: pl.LazyFrame) -> dict[str, Callable[[], pl.DataFrame]]:
    income, balance = pl.col("income"), pl.col("balance")

    def filter_group_by() -> pl.DataFrame:
        adults = people.filter(pl.col("age") > 40).group_by("region")
        return adults.agg(income.mean().alias("mean"), income.count().alias("n")).sort("region").collect()

    def join_group_by() -> pl.DataFrame:
        joined = people.join(accounts, on="id").group_by("region")
        return joined.agg(balance.mean().alias("mean"), balance.count().alias("n")).sort("region").collect()

    def value_counts() -> pl.DataFrame:
        return people.group_by("region").len().sort(["len", "region"], descending=[True, False]).collect()

    def group_by_quantile() -> pl.DataFrame:
        p90 = income.quantile(0.9, interpolation="linear").alias("p90")
        return people.group_by("region").agg(income.median().alias("median"), p90).sort("region").collect()

    def describe() -> pl.DataFrame:
        return people.select("age", "income").collect().describe(interpolation="linear")

    def window() -> pl.DataFrame:
        ranked = people.with_columns(income.rank("average").over("region").alias("r"))
        return ranked.filter(pl.col("r") > RANK_ABOVE).group_by("region").agg(income.mean()).sort("region").collect()

    defined = locals()
    return {name: defined[name] for name in OPERATIONS}


def pandas_queries(people: pd.DataFrame, accounts: pd.DataFrame) -> dict[str, Callable[[], Any]]:
    def filter_group_by() -> Any:
        return people[people["age"] > 40].groupby("region").agg(mean=("income", "mean"), n=("income", "count"))

    def join_group_by() -> Any:
        joined = people.merge(accounts, on="id")
        return joined.groupby("region").agg(mean=("balance", "mean"), n=("balance", "count"))

    def value_counts() -> Any:
        return people["region"].value_counts()

    def group_by_quantile() -> Any:
        grouped = people.groupby("region")["income"]
        return pd.DataFrame({"median": grouped.median(), "p90": grouped.quantile(0.9)})

    def describe() -> Any:
        return people[["age", "income"]].describe()

    def window() -> Any:
        ranked = people.assign(r=people.groupby("region")["income"].rank())
        return ranked[ranked["r"] > RANK_ABOVE].groupby("region")["income"].mean()

    defined = locals()
    return {name: defined[name] for name in OPERATIONS}


def vault_queries(people: Any, accounts: Any) -> dict[str, Callable[[], Any]]:
    def filter_group_by() -> Any:
        adults = people[people["age"] > 40].group_by("region")
        return adults.agg(mean=("income", "mean"), n=("income", "count")).release()

    def join_group_by() -> Any:
        joined = people.join(accounts, on="id").group_by("region")
        return joined.agg(mean=("balance", "mean"), n=("balance", "count")).release()

    def value_counts() -> Any:
        return people.value_counts("region").release()

    def group_by_quantile() -> Any:
        grouped = people.group_by("region")
        return grouped.agg(median=("income", "median"), p90=("income", "quantile", 0.9)).release()

    def describe() -> Any:
        return people.describe(["age", "income"]).release()

    def window() -> Any:
        ranked = people.assign(r=people["income"].rank().over("region"))
        return ranked[ranked["r"] > RANK_ABOVE].group_by("region").agg(mean=("income", "mean")).release()

    defined = locals()
    return {name: defined[name] for name in OPERATIONS}


def block_mean(values: np.ndarray, q: float, k: int = MIN_GROUP_SIZE) -> float:
    """The vault's quantile: the mean of the block of k ranks (of the sorted values) holding rank round(q * (n - 1)),
    where the blocks are ranks 0..k-1, k..2k-1, ... and a last partial block merges into the one before."""
    ordered = np.sort(values[~np.isnan(values)])
    blocks = max(len(ordered) // k, 1)
    block = min(round(q * (len(ordered) - 1)) // k, blocks - 1)
    end = len(ordered) if block == blocks - 1 else (block + 1) * k
    return float(ordered[block * k : end].mean())


def check_equal(name: str, vault: Any, polars: pl.DataFrame, people: pl.DataFrame) -> None:
    """The vault's released numbers equal Polars' on the plaintext (same groups, same values); its quantiles equal
    the block means the output policy releases instead of interpolated quantiles, computed here from the plaintext."""
    if name == "describe":
        got = vault.loc[["count", "mean", "50%"], ["age", "income"]].to_numpy(dtype=np.float64)
        stats = polars.to_pandas().set_index("statistic")
        expected = stats.loc[["count", "mean", "50%"], ["age", "income"]].to_numpy(dtype=np.float64).copy()
        for column, label in enumerate(("age", "income")):
            expected[2, column] = block_mean(people.get_column(label).cast(pl.Float64).to_numpy(), 0.5)
    elif name == "group_by_quantile":
        got = vault.sort_index().to_numpy(dtype=np.float64)
        regions = polars.get_column("region").to_list()
        incomes = {
            region: people.filter(pl.col("region") == region).get_column("income").cast(pl.Float64).to_numpy()
            for region in regions
        }
        expected = np.array([[block_mean(incomes[region], q) for q in (0.5, 0.9)] for region in regions])
    elif name == "value_counts":
        got = vault.to_numpy(dtype=np.float64)
        expected = polars.get_column("len").to_numpy().astype(np.float64)
    else:
        frame = vault.to_frame() if isinstance(vault, pd.Series) else vault
        got = frame.sort_index().to_numpy(dtype=np.float64)
        expected = polars.drop("region").to_numpy().astype(np.float64)
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-9, atol=1e-9, equal_nan=True):
        raise SystemExit(f"{name}: the vault's result differs from Polars' on the plaintext")


def timed(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def interleaved(modes: dict[str, Callable[[], object]], rounds: int, seed: int) -> dict[str, list[float]]:
    """Seconds per round of each mode, one call each per round in a shuffled order, collector off during a round."""
    for function in modes.values():
        function()
    times: dict[str, list[float]] = {name: [] for name in modes}
    shuffle = random.Random(seed)
    gc.disable()
    try:
        for _ in range(rounds):
            order = list(modes)
            shuffle.shuffle(order)
            for name in order:
                times[name].append(timed(modes[name]))
            gc.collect()
    finally:
        gc.enable()
    return times


# -- the plaintext Polars process (peak memory) ------------------------------------------------------------------


def child(people_path: Path, accounts_path: Path) -> None:
    """A fresh process reading the plaintext into Polars and running every query once; prints its memory."""
    gc.collect()
    after_imports = vm_status("self", "VmRSS")
    people = pl.read_ipc(people_path, memory_map=False).lazy()
    accounts = pl.read_ipc(accounts_path, memory_map=False).lazy()
    for query in polars_queries(people, accounts).values():
        query()
    print(json.dumps({"after_imports": after_imports, "peak": vm_status("self", "VmHWM")}))


@contextlib.contextmanager
def owner_broker(tables: dict[str, pa.Table], workdir: Path, log: Callable[[str], None]) -> Iterator[str]:
    """The owner's encrypted datasets in ``workdir/datasets`` and their broker on loopback; yields its URL."""
    from confnb.broker.local import serve_locally
    from confnb.broker.store import OwnerStore
    from confnb.datasets.owner import encrypt_dataset
    from confnb.policy.output import OutputPolicy
    from kernel_enclave.measurement import simulated_measurement
    from kernel_enclave.tee.simulated import SimulatedBackend

    os.environ["CONFNB_SIMULATED_TEE_DIR"] = str(workdir / "simulated-tee")
    SimulatedBackend()
    store = OwnerStore.create(workdir / "owner")
    attestation = (
        f'[attestation]\nallow_simulated = true\nmeasurements = ["{simulated_measurement().hex()}"]\n'
        "max_evidence_age_s = 300\n"
    )
    started = time.perf_counter()
    for name, table in tables.items():
        policy = OutputPolicy.from_toml(POLICY)
        encrypt_dataset(table, workdir / "datasets" / name, store, name, policy, attestation)
    log(f"encrypted the datasets in {time.perf_counter() - started:.1f} s")
    with serve_locally(store) as url:
        yield url


def run(rows: int, rounds: int, log: Callable[[str], None]) -> dict[str, Any]:
    import confnb as cn

    people_table, accounts_table = build_tables(rows)
    log(f"tables: 2 x {rows:,} rows, {(people_table.nbytes + accounts_table.nbytes) / 1e6:.0f} MB")
    people_pl = pl.from_arrow(people_table)
    accounts_pl = pl.from_arrow(accounts_table)
    assert isinstance(people_pl, pl.DataFrame)
    assert isinstance(accounts_pl, pl.DataFrame)
    polars = polars_queries(people_pl.lazy(), accounts_pl.lazy())
    pandas = pandas_queries(people_table.to_pandas(), accounts_table.to_pandas())
    workdir = Path(tempfile.mkdtemp(prefix="confnb-bench-engine-"))
    times: dict[str, dict[str, list[float]]] = {}
    try:
        people_path, accounts_path = workdir / "people.arrow", workdir / "accounts.arrow"
        feather.write_feather(people_table, people_path, compression="uncompressed")
        feather.write_feather(accounts_table, accounts_path, compression="uncompressed")
        with owner_broker({"people": people_table, "accounts": accounts_table}, workdir, log) as url:
            with vault_process(url, workdir):
                vault = vault_queries(cn.open("people"), cn.open("accounts"))
                for name in OPERATIONS:
                    check_equal(name, vault[name](), polars[name](), people_pl)
                log("the vault's results equal Polars' on the plaintext; timing")
                for seed, name in enumerate(OPERATIONS):
                    modes = {"vault": vault[name], "polars": polars[name], "pandas": pandas[name]}
                    times[name] = interleaved(modes, rounds, seed)
                    log(f"{name}: {rounds} rounds done")
            with vault_process(url, workdir) as fresh:
                vault_start = fresh.after_start
                for query in vault_queries(cn.open("people"), cn.open("accounts")).values():
                    query()
                vault_peak = fresh.peak()
        done = subprocess.run(
            [sys.executable, __file__, "--child", str(people_path), str(accounts_path)],
            capture_output=True,
            text=True,
            check=True,
        )
        baseline = json.loads(done.stdout)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    operations: dict[str, Any] = {}
    for name, measured in times.items():
        vs_polars = [v / p for v, p in zip(measured["vault"], measured["polars"], strict=True)]
        vs_pandas = [v / p for v, p in zip(measured["vault"], measured["pandas"], strict=True)]
        operations[name] = {
            "median_s": {mode: statistics.median(values) for mode, values in measured.items()},
            "vs_polars": statistics.median(vs_polars),
            "vs_pandas": statistics.median(vs_pandas),
        }
    memory_ratio = vault_peak / baseline["peak"]
    met = {f"{name}_vs_polars": op["vs_polars"] <= TARGET_POLARS for name, op in operations.items()}
    met.update({f"{name}_vs_pandas": op["vs_pandas"] <= TARGET_PANDAS for name, op in operations.items()})
    met["memory"] = memory_ratio <= TARGET_MEMORY
    return {
        "versions": {"polars": pl.__version__, "pyarrow": pa.__version__, "pandas": pd.__version__},
        "rows": rows,
        "rounds": rounds,
        "operations": operations,
        "memory_bytes": {
            "vault_peak": vault_peak,
            "vault_after_start": vault_start,
            "plaintext_polars_peak": baseline["peak"],
            "plaintext_after_imports": baseline["after_imports"],
        },
        "memory_ratio": memory_ratio,
        "targets": {"vs_polars": TARGET_POLARS, "vs_pandas": TARGET_PANDAS, "memory": TARGET_MEMORY},
        "met": met,
    }


def main() -> int:
    from _provenance import TIMES, Provenance, add_output_argument, ratio

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows per table (default 1,000,000)")
    parser.add_argument("--large", action="store_true", help="10,000,000 rows per table")
    parser.add_argument("--rounds", type=int, default=11, help="interleaved rounds per operation (default 11)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--child", type=Path, nargs=2, help=argparse.SUPPRESS)
    add_output_argument(parser, "vault_engine")
    args = parser.parse_args()
    if args.child is not None:
        child(*args.child)
        return 0

    def log(message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    load = os.getloadavg()[0]
    if load > 0.5:
        log(f"warning: load average {load:.2f}; other processes compete for the CPUs")
    provenance = Provenance("vault_engine")
    figures = run(10_000_000 if args.large else args.rows, args.rounds, log)
    figures["load_average_at_start"] = load
    operations, targets = figures["operations"], figures["targets"]
    slowest = {baseline: max(operations, key=lambda name: operations[name][baseline]) for baseline in BASELINES}
    summary = {
        "figure": "vault vs plaintext, slowest of six queries: vs Polars / vs pandas; peak memory vs Polars",
        "result": " / ".join(
            [f"{ratio(operations[name][baseline])} ({name})" for baseline, name in slowest.items()]
            + [ratio(figures["memory_ratio"])]
        ),
        "target": " / ".join(f"≤ {targets[name]:g}{TIMES}" for name in (*BASELINES, "memory")),
        "met": all(figures["met"].values()),
    }
    figures = provenance.record(figures, summary, args.out)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"2 x {figures['rows']:,} rows; median per-round ratios of {figures['rounds']} interleaved rounds")
        print(f"{'operation':<20} {'vault ms':>9} {'polars ms':>9} {'pandas ms':>9} {'/polars':>8} {'/pandas':>8}")
        for name, op in figures["operations"].items():
            ms = op["median_s"]
            print(
                f"{name:<20} {ms['vault'] * 1e3:9.1f} {ms['polars'] * 1e3:9.1f} {ms['pandas'] * 1e3:9.1f} "
                f"{op['vs_polars']:7.2f}x {op['vs_pandas']:7.2f}x"
            )
        memory = figures["memory_bytes"]
        print(
            f"peak memory: vault {memory['vault_peak'] / 1e6:.0f} MB, plaintext Polars process "
            f"{memory['plaintext_polars_peak'] / 1e6:.0f} MB: {figures['memory_ratio']:.2f}x"
        )
        missed = [name for name, ok in figures["met"].items() if not ok]
        print("targets: all met" if not missed else f"targets missed: {', '.join(missed)}")
    return 0 if all(figures["met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
