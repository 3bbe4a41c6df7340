"""Benchmark: a differentially private group-by against the exact group-by on the same engine, and the broker's
budget-charge round trip.

**Group-by.** One table of ``--rows`` rows (default 1,000,000): a group column ``g`` whose ``--groups`` values
(default 8) are the owner's public keys (``[privacy.keys]``), and a bounded column ``x`` (uniform in its public
bounds [0, 100], missing in about 5 % of the rows). One plan, ``g`` → ``mean(x)`` and ``count(x)``, goes through the
vault's release engine on the same :class:`~kernel_enclave.vault.plan.SourceTable` in three ways, interleaved in a
shuffled order over ``--rounds`` rounds:

1. **dp**: :func:`kernel_enclave.vault.dp.prepare` then :meth:`~kernel_enclave.vault.dp.PreparedDpRelease.run` at
   ``--epsilon`` (default 1.0), with the privacy table as ``Vault._dp_release`` passes it (the owner's
   ``[privacy]`` table in canonical form); prepare and run are also timed apart inside each call;
2. **exact**: :func:`kernel_enclave.vault.release.release` alone, the plain exact release (the baseline);
3. **exact, checked**: the exact release as ``Vault._release`` runs it for a policy with default settings: with the
   sketch of every released number's record set, checked against a fresh kernel's
   :class:`~kernel_enclave.vault.differences.ReleaseMemory` and remembered (reported; ``difference_checks.py``
   measures the check against many remembered releases).

The figure is the ratio of the medians, dp over exact. Target: at most 2. The budget charge between prepare and run
is not part of it (a vault charges every release at the owner's broker: measured below). Before any timing the DP
release is compared with the exact one: the same groups, and every noisy number within a few of its stated 95 %
intervals of the exact number, so both do the same work.

**Budget charge.** A real broker on loopback (:func:`confnb.broker.local.serve_locally`, in this process) with the
dataset registered under a DP policy whose budget is ε = 100; the dataset's key is released to a kernel key through a
simulated-TEE key release, which authorises that key to charge; then ``--charges`` (default 500) sequential
:meth:`kernel_enclave.vault.budget_client.BudgetClient.charge` calls of ε = ``--charge-epsilon`` (default 0.001), each
timed from the request's signature to the owner-signed acknowledgement verified (a few untimed calls first). Reported:
p50, p99 and max in milliseconds (no target). Every charge must be acknowledged and the broker's budget must show
each of them.

Exit status 0 when the group-by target holds, 1 otherwise. Nothing leaves loopback, every loop is bounded, and the
broker and its temporary directory go at the end. Run with::

    python benchmarks/dp_release.py [--rows 1000000] [--groups 8] [--rounds 21] [--charges 500] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
from dataset_ipc_load import interleaved_medians  # the same interleaved timing as the other benchmarks

if TYPE_CHECKING:
    from kernel_enclave.vault.dp import DpRelease

TARGET = 2.0
DATASET = "bench"
LOW, HIGH = 0.0, 100.0
BUDGET_EPSILON = 100.0  # the owner's total budget: large, so the charges never run out
WARMUP_CHARGES = 5
AGREEMENT_WIDTHS = 5.0  # a noisy number further than this many 95 % half-widths from the exact one is a bug


def public_keys(groups: int) -> list[str]:
    return [f"region_{i}" for i in range(groups)]


def exact_policy_toml() -> str:
    """The owner's policy with default settings, so the difference checks are on."""
    return '[policy]\nid = "bench-dp-exact-v1"\n[release]\nallow = ["schema", "aggregate"]\n'


def dp_policy_toml(groups: int) -> str:
    listed = ", ".join(f'"{key}"' for key in public_keys(groups))
    return (
        '[policy]\nid = "bench-dp-v1"\n[release]\nallow = ["schema", "aggregate"]\n'
        f'[privacy]\nmode = "dp"\nepsilon = {BUDGET_EPSILON}\n'
        f"[privacy.bounds]\nx = [{LOW}, {HIGH}]\n[privacy.keys]\ng = [{listed}]\n"
    )


def build_table(rows: int, groups: int, seed: int = 20261206) -> pa.Table:
    rng = np.random.default_rng(seed)
    names = np.array(public_keys(groups))
    return pa.table(
        {
            "g": pa.array(names[rng.integers(0, groups, rows)]),
            "x": pa.array(rng.uniform(LOW, HIGH, rows), mask=rng.random(rows) < 0.05),
        }
    )


PLAN: dict[str, Any] = {
    "node": "aggregate",
    "input": {"node": "source", "handle": "d1"},
    "by": ["g"],
    "aggs": [
        {"name": "mean_x", "column": "x", "func": "mean"},
        {"name": "count_x", "column": "x", "func": "count"},
    ],
}


def agreement(noisy: DpRelease, exact: pa.Table | None) -> str | None:
    """Why the DP release does not answer the exact release's question, or None when it does."""
    if exact is None or noisy.table.column_names != exact.column_names:
        return f"columns {noisy.table.column_names} against {None if exact is None else exact.column_names}"
    if noisy.table.column("g").to_pylist() != exact.column("g").to_pylist():
        return "the groups differ"
    for accuracy in noisy.accuracy:
        values = noisy.table.column(accuracy.column).to_pylist()
        truth = exact.column(accuracy.column).to_pylist()
        for value, true, width in zip(values, truth, accuracy.half_width, strict=True):
            if value is None or width is None or abs(value - true) > AGREEMENT_WIDTHS * width:
                return f"{accuracy.column}: {value} is not within {AGREEMENT_WIDTHS:g} x {width} of {true}"
    return None


def group_by(rows: int, groups: int, rounds: int, epsilon: float, log: Callable[[str], None]) -> dict[str, Any]:
    from confnb.policy.output import OutputPolicy
    from kernel_enclave.vault import dp, release
    from kernel_enclave.vault.differences import ReleaseMemory
    from kernel_enclave.vault.plan import SourceTable
    from kernel_enclave.vault.vault import release_recipe

    table = build_table(rows, groups)
    sources = {"d1": SourceTable.from_dataset(DATASET, table)}
    exact_policies = {DATASET: OutputPolicy.from_toml(exact_policy_toml())}
    assert exact_policies[DATASET].checks_differences  # the default the "checked" way stands for
    dp_policy = OutputPolicy.from_toml(dp_policy_toml(groups))
    assert dp_policy.privacy is not None
    assert dp_policy.is_dp
    privacy = {DATASET: dp_policy.privacy.to_dict()}  # what Vault._dp_release passes
    never = {DATASET: dp_policy.never_release}
    k = {DATASET: exact_policies[DATASET].min_group_size}
    log(f"table: {rows:,} rows, {groups} public keys, {table.nbytes / 1e6:.0f} MB")

    exact = release.release(PLAN, sources, exact_policies)
    noisy = dp.prepare(PLAN, sources, privacy, epsilon, never_release=never).run()
    problem = agreement(noisy, exact.table)
    if problem is not None:
        raise SystemExit(f"the DP release does not answer the exact release's question: {problem}")
    log("the DP release agrees with the exact one; timing")

    prepare_times: list[float] = []
    run_times: list[float] = []
    check_times: list[float] = []

    def private() -> Any:
        started = time.perf_counter()
        prepared = dp.prepare(PLAN, sources, privacy, epsilon, never_release=never)
        prepared_at = time.perf_counter()
        released = prepared.run()
        prepare_times.append(prepared_at - started)
        run_times.append(time.perf_counter() - prepared_at)
        return released

    def plain() -> Any:
        return release.release(PLAN, sources, exact_policies)

    def checked() -> Any:
        released = release.release(PLAN, sources, exact_policies, record_sets=True, sketches=True)
        started = time.perf_counter()
        memory = ReleaseMemory()
        recipe = release_recipe(PLAN, sources, exact_policies)
        rows = {DATASET: sources["d1"].row_bound().rows()}
        checked = memory.check_release(  # a group-by, as the vault passes it
            released.sketches, released.record_sets, set(k), k, grouped=True, recipe=recipe, rows=rows
        )
        memory.remember(checked)
        check_times.append(time.perf_counter() - started)
        return released

    medians, times = interleaved_medians({"dp": private, "exact": plain, "exact_checked": checked}, rounds)
    # interleaved_medians warms each way once before the rounds: drop the warm-up's inner timings
    prepare_times, run_times, check_times = prepare_times[1:], run_times[1:], check_times[1:]
    ratio = medians["dp"] / medians["exact"]
    return {
        "rows": rows,
        "groups": groups,
        "epsilon": epsilon,
        "plan": PLAN,
        "median_s": medians,
        "all_s": times,
        "rounds": rounds,
        "dp_prepare_s": {"median": statistics.median(prepare_times), "all": prepare_times},
        "dp_run_s": {"median": statistics.median(run_times), "all": run_times},
        "check_s": {"median": statistics.median(check_times), "all": check_times},
        "ratio": ratio,
        "ratio_vs_checked": medians["dp"] / medians["exact_checked"],
        "run_ratio": statistics.median(run_times) / medians["exact"],
        "checked_ratio": medians["exact_checked"] / medians["exact"],
        "noise": [
            {"column": a.column, "distribution": a.distribution, "scale": a.scale, "half_width_95": a.half_width}
            for a in noisy.accuracy
        ],
        "target": TARGET,
        "met": ratio <= TARGET,
    }


def percentiles_ms(values: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": 1000 * statistics.median(values), "p99": 1000 * cuts[98], "max": 1000 * max(values)}


def charges(
    count: int, epsilon: float, groups: int, tee_dir: Path | None, log: Callable[[str], None]
) -> dict[str, Any]:
    from confnb.attest import Verifier
    from confnb.broker.local import serve_locally
    from confnb.broker.store import OwnerStore
    from confnb.policy.output import OutputPolicy
    from kernel_enclave.tee.simulated import SimulatedBackend
    from kernel_enclave.vault.broker_client import BrokerClient
    from kernel_enclave.vault.budget_client import BudgetClient
    from kernel_enclave.vault.keys import VaultKeys

    if count < 2:
        raise SystemExit("--charges must be at least 2 for percentiles")
    if not 0 < epsilon * (count + WARMUP_CHARGES) <= BUDGET_EPSILON:
        raise SystemExit(f"--charges x --charge-epsilon must stay within the budget of {BUDGET_EPSILON:g}")
    plan_digest = "sha256:" + "ab" * 32
    with tempfile.TemporaryDirectory(prefix="confnb-dp-bench-") as scratch:
        root = Path(scratch)
        log("simulated TEE: " + ("using " + str(tee_dir) if tee_dir else "generating a chip in a temporary directory"))
        backend = SimulatedBackend(state_dir=tee_dir or root / "tee")
        attestation = f'[attestation]\nallow_simulated = true\nmeasurements = ["{backend.measurement.hex()}"]\n'
        store = OwnerStore.create(root / "owner")
        store.register_dataset(DATASET, OutputPolicy.from_toml(dp_policy_toml(groups)), attestation)
        owner_key = store.owner_public_key.public_bytes_raw()
        vault_keys = VaultKeys.generate()
        with serve_locally(store, Verifier(kds=None)) as url:
            BrokerClient(
                backend,
                vault_keys.hpke_private_key,
                vault_keys.signing_public_key,
                vault_keys.curve_public_key,
                url=url,
            ).release(DATASET, owner_key)  # the key release that lets this kernel key charge the budget
            client = BudgetClient(url, vault_keys.signing_key, {DATASET: owner_key})
            for _ in range(WARMUP_CHARGES):
                client.charge(DATASET, epsilon, 0.0, plan_digest)
            log(f"{count} sequential charges of epsilon {epsilon:g}")
            latencies: list[float] = []
            for _ in range(count):
                started = time.perf_counter()
                client.charge(DATASET, epsilon, 0.0, plan_digest)
                latencies.append(time.perf_counter() - started)
            state = client.budget(DATASET)
    made = count + WARMUP_CHARGES
    if state.get("charges") != made or abs(float(state["epsilon_spent"]) - made * epsilon) > 1e-9:
        raise SystemExit(f"the broker's budget does not show the {made} charges made: {state}")
    return {
        "charges": count,
        "warmup_charges": WARMUP_CHARGES,
        "epsilon_per_charge": epsilon,
        "latency_ms": percentiles_ms(latencies),
        "mean_ms": 1000 * statistics.fmean(latencies),
        "all_s": latencies,
        "budget_after": {key: state[key] for key in ("charges", "epsilon_spent", "epsilon_remaining") if key in state},
    }


def summary_row(figures: Mapping[str, Any]) -> dict[str, Any]:
    from _provenance import TIMES, ratio

    latency = figures["charge"]["latency_ms"]
    return {
        "figure": f"DP group-by ({figures['groups']} public keys, mean and count) vs the plain exact release; "
        "the broker's budget-charge round trip p50 / p99 (reported)",
        "result": f"{ratio(figures['ratio'])} ({latency['p50']:.1f} / {latency['p99']:.1f} ms)",
        "target": f"≤ {TARGET:g}{TIMES}",
        "met": figures["met"],
    }


def main() -> int:
    from _provenance import Provenance, add_output_argument

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="table rows (default 1,000,000)")
    parser.add_argument("--groups", type=int, default=8, help="public keys of the group column (default 8)")
    parser.add_argument("--rounds", type=int, default=21, help="interleaved rounds (default 21)")
    parser.add_argument("--epsilon", type=float, default=1.0, help="the DP release's epsilon (default 1.0)")
    parser.add_argument("--charges", type=int, default=500, help="sequential budget charges timed (default 500)")
    parser.add_argument("--charge-epsilon", type=float, default=0.001, help="epsilon of each charge (default 0.001)")
    parser.add_argument("--tee-dir", type=Path, help="reuse this simulated TEE state (default: a fresh temporary one)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    add_output_argument(parser, "dp_release")
    args = parser.parse_args()
    os.environ.setdefault("CONFNB_OFFLINE", "1")  # nothing leaves loopback

    def log(message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    load = os.getloadavg()[0]
    if load > 0.5:
        log(f"warning: load average {load:.2f}; other processes compete for the CPUs")
    provenance = Provenance("dp_release")
    figures = group_by(args.rows, args.groups, args.rounds, args.epsilon, log)
    figures["charge"] = charges(args.charges, args.charge_epsilon, args.groups, args.tee_dir, log)
    figures["load_average_at_start"] = load
    figures["load_average_at_end"] = os.getloadavg()[0]
    figures = provenance.record(figures, summary_row(figures), args.out)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        medians = figures["median_s"]
        print(
            f"{figures['rows']:,} rows, {figures['groups']} public keys, epsilon {figures['epsilon']:g}; "
            f"medians of {figures['rounds']} interleaved rounds"
        )
        print(f"  exact release                 {medians['exact'] * 1000:8.1f} ms")
        print(f"  exact, with difference checks {medians['exact_checked'] * 1000:8.1f} ms")
        print(f"  DP release (prepare + run)    {medians['dp'] * 1000:8.1f} ms")
        print(f"    of which prepare            {figures['dp_prepare_s']['median'] * 1000:8.1f} ms")
        print(f"    of which run                {figures['dp_run_s']['median'] * 1000:8.1f} ms")
        print(
            f"  ratio {figures['ratio']:.2f}x (target <= {TARGET:g}x)  {'MET' if figures['met'] else 'MISSED'}; "
            f"vs the checked release {figures['ratio_vs_checked']:.2f}x; run alone {figures['run_ratio']:.2f}x"
        )
        charge = figures["charge"]
        latency = charge["latency_ms"]
        print(
            f"budget charge round trip ({charge['charges']} sequential, loopback): p50 {latency['p50']:.2f} ms, "
            f"p99 {latency['p99']:.2f} ms, max {latency['max']:.2f} ms"
        )
    return 0 if figures["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
