"""Benchmark: a long session in one confidential kernel never gives a wrong answer, and the vault does not grow.

One real ``confnb-snp`` kernel (launcher, relay, executor, vault; simulated TEE) opens an encrypted dataset whose
key its vault obtains from a real broker on loopback (the dataset and broker of ``vault_ops.py``, the kernel as
``kernel_roundtrip.py`` starts it). The benchmark then runs ``--releases`` cells (2,000 by default), each one
release chosen at random (seeded): a column aggregate, a group-by, a ``LogisticRegression`` fit, or a join of the
table with a filtered copy of itself followed by a group-by. About 10 % of the cells are interrupted
(``KernelManager.interrupt_kernel()``) at a random moment after they start.

Every value a cell releases is compared with the same computation by pandas or scikit-learn on the plaintext, here,
outside the kernel: a cell that answers with another cell's value, a stale value or a wrong one is counted as a
**wrong answer** (target: none). A cell that ends in an error (``KeyboardInterrupt`` for an interrupt that landed,
or any other error the analyst sees) is a failure *correctly reported*: the analyst knows there is no answer; those
hit by an interrupt sent while the previous cell was already answering are counted apart. A cell that does not
answer (``execute_reply`` and ``idle``) within a minute is an **unreported failure** (target: none). Reported
besides: p50 and p99 latency of the answered cells, and the vault process's ``VmRSS`` (from ``/proc``) at the start,
once one release of each kind has run, and at the end (target: within 10 % of the start). Exit status 0 when every
target holds, 1 otherwise. Run with::

    python benchmarks/soak.py [--releases 2000] [--rows 20000] [--seed 20261206] [--json] [--out results/soak.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd  # type: ignore[import-untyped]
from kernel_roundtrip import CONFIDENTIAL, VAULT_WARM, _prepare, _start, _stop
from vault_engine import block_mean
from vault_ops import FEATURES, build_table, owner_broker, vm_status

TARGET_MEMORY_GROWTH = 0.10
INTERRUPT_SHARE = 0.10
CELL_TIMEOUT_S = 60.0
KINDS = ("aggregate", "group_by", "fit", "join")
# No min or max: the vault withholds a lone extreme (one record's value), which pandas would not; the statistics here
# are the ones whose every value the output policy releases for groups of this size. A median is released as the mean
# of the block of min_group_size sorted values around its rank (see kernel_enclave.vault.release), so that is what
# the plaintext twin computes.
STATS = ("count", "sum", "mean", "std", "median")
RTOL, ATOL = 1e-9, 1e-9  # Polars and pandas sum in different orders
FIT_RTOL, FIT_ATOL = 1e-4, 1e-6  # as vault_ops.py: lbfgs on the same rows
SETUP = 'import json\nimport confnb as cn\nfrom sklearn.linear_model import LogisticRegression\nt = cn.open("bench")\n'


@dataclass(frozen=True)
class Release:
    """One cell: the code run in the kernel and the plaintext computation its printed JSON must equal."""

    kind: str
    code: str
    expected: Callable[[], Any]
    tolerance: tuple[float, float] = (RTOL, ATOL)


def plan(rng: random.Random, frame: pd.DataFrame) -> Release:
    """A random release and its plaintext twin."""
    kind = rng.choice(KINDS)
    column = rng.choice(FEATURES)
    stat = rng.choice(STATS)
    if kind == "aggregate":
        return Release(
            kind,
            f"print(json.dumps(float(t[{column!r}].{stat}().release())))",
            lambda: _statistic(frame[column], stat),
        )
    if kind == "group_by":
        return Release(
            kind,
            f"r = t.group_by('g').agg(v=({column!r}, {stat!r})).release()\n"
            "print(json.dumps({str(k): float(v) for k, v in r['v'].items()}))",
            lambda: {str(k): _statistic(values, stat) for k, values in frame.groupby("g")[column]},
        )
    if kind == "fit":
        features = sorted(rng.sample(FEATURES, rng.randint(2, 4)))
        return Release(
            kind,
            f"m = cn.fit(LogisticRegression(max_iter=200), t, target='y', features={features!r})\n"
            "p = m.params()\n"
            f"print(json.dumps([float(p['intercept_'])] + [float(p['coef_'][f]) for f in {features!r}]))",
            lambda: _fit(frame, features),
            (FIT_RTOL, FIT_ATOL),
        )
    # At least 40 % of the rows stay: with --rows >= 5,000 every group keeps far more than the policy's 10 records
    # (fewer would be withheld, a median near the ends too, which pandas would not do).
    threshold = float(frame[column].quantile(rng.uniform(0.2, 0.6)))
    other = rng.choice([name for name in FEATURES if name != column])
    return Release(
        kind,
        f"right = t.filter(t[{column!r}] > {threshold!r}).select(['id', {other!r}]).rename({{{other!r}: 'o'}})\n"
        f"r = t.join(right, on='id').group_by('g').agg(v=('o', {stat!r})).release()\n"
        "print(json.dumps({str(k): float(v) for k, v in r['v'].items()}))",
        lambda: _join(frame, column, threshold, other, stat),
    )


def _fit(frame: pd.DataFrame, features: list[str]) -> list[float]:
    from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LogisticRegression(max_iter=200).fit(frame[features], frame["y"])
    return [float(model.intercept_[0]), *(float(value) for value in model.coef_[0])]


def _join(frame: pd.DataFrame, column: str, threshold: float, other: str, stat: str) -> dict[str, float]:
    right = frame.loc[frame[column] > threshold, ["id", other]].rename(columns={other: "o"})
    joined = frame.merge(right, on="id")
    return {str(k): _statistic(values, stat) for k, values in joined.groupby("g")["o"]}


def _statistic(values: pd.Series, stat: str) -> float:
    """What the vault releases for ``stat`` of these values (pandas' own, but a median is a block mean)."""
    if stat == "median":
        return block_mean(values.to_numpy(dtype="float64"), 0.5)
    return float(getattr(values, stat)())


def same(got: Any, expected: Any, tolerance: tuple[float, float]) -> bool:
    """Equal within ``tolerance`` (relative, absolute), with the same shape and keys."""
    rtol, atol = tolerance
    if isinstance(expected, dict):
        return (
            isinstance(got, dict)
            and got.keys() == expected.keys()
            and all(same(got[key], value, tolerance) for key, value in expected.items())
        )
    if isinstance(expected, list):
        return (
            isinstance(got, list)
            and len(got) == len(expected)
            and all(same(g, e, tolerance) for g, e in zip(got, expected, strict=True))
        )
    return isinstance(got, int | float) and math.isclose(float(got), float(expected), rel_tol=rtol, abs_tol=atol)


# -- the kernel ----------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    status: str  # "ok", "error" or "timeout"
    ename: str
    stdout: str
    seconds: float


def execute(client: Any, code: str, interrupt_after: float | None, manager: Any) -> Outcome:
    """Run one cell as Jupyter does, interrupting it ``interrupt_after`` seconds in; its reply, outputs and time."""
    started = time.perf_counter()
    msg_id = client.execute(code, store_history=False, allow_stdin=False)
    if interrupt_after is not None:
        time.sleep(interrupt_after)
        manager.interrupt_kernel()
    deadline = time.monotonic() + CELL_TIMEOUT_S
    missing = "no execute_reply"  # what a cell that times out never sent: said in the log and the result
    try:
        reply = client.get_shell_msg(timeout=CELL_TIMEOUT_S)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = client.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        seconds = time.perf_counter() - started
        missing = f"no idle status after a {reply['content']['status']} reply"
        text = []
        while True:
            message = client.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            if message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
                break
            if message["msg_type"] == "stream" and message["content"].get("name") == "stdout":
                text.append(message["content"]["text"])
    except Exception:  # queue.Empty: no reply within the limit
        return Outcome("timeout", missing, "", time.perf_counter() - started)
    content = reply["content"]
    return Outcome(str(content["status"]), str(content.get("ename", "")), "".join(text), seconds)


def vault_pid(manager: Any) -> int:
    """The kernel's vault: the launcher's child running ``kernel_enclave.vault``."""
    launcher = manager.provisioner.process.pid
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{launcher}/task").glob("*"):
            try:
                found = (task / "children").read_text().split()
            except OSError:
                continue
            for child in found:
                try:
                    command = Path(f"/proc/{child}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"kernel_enclave.vault" in command:
                    return int(child)
        time.sleep(0.05)
    raise SystemExit("the kernel's vault process was not found")


# -- the run -------------------------------------------------------------------------------------------------------


def run(releases: int, rows: int, seed: int, log: Callable[[str], None]) -> dict[str, Any]:
    table = build_table(rows)
    table = table.append_column("id", _ids(rows))
    frame = table.to_pandas()
    rng = random.Random(seed)
    counts = {"answered": 0, "wrong": 0, "interrupted": 0, "late_interrupt": 0, "errors": 0, "unreported": 0}
    by_kind: dict[str, dict[str, int]] = {kind: dict.fromkeys(counts, 0) for kind in KINDS}
    errors: dict[str, int] = {}
    wrong: list[dict[str, Any]] = []
    unreported: list[dict[str, Any]] = []
    latencies: list[float] = []
    interrupts_sent = 0
    with tempfile.TemporaryDirectory(prefix="confnb-bench-soak-") as directory:
        root = Path(directory)
        _prepare(root)
        with owner_broker(table, root, log) as url:
            os.environ.update({"CONFNB_BROKER_URL": url, "CONFNB_DATASET_PATH": str(root / "datasets")})
            manager, client, _ = _start(CONFIDENTIAL)
            try:
                vault = vault_pid(manager)
                ready = execute(client, VAULT_WARM + SETUP, None, manager)
                if ready.status != "ok":
                    raise SystemExit(f"the kernel could not open the dataset: {ready.ename}")
                typical: dict[str, list[float]] = {kind: [] for kind in KINDS}
                for kind in KINDS:  # one of each first: libraries and caches loaded before the start figure
                    warm = _plan_kind(rng, frame, kind)
                    outcome = execute(client, warm.code, None, manager)
                    if outcome.status != "ok" or not _right(outcome.stdout, warm.expected(), warm.tolerance):
                        raise SystemExit(f"the first {kind} release failed or was wrong: {outcome.ename}")
                    typical[kind].append(outcome.seconds)
                memory_start = vm_status(vault, "VmRSS")
                log(f"vault VmRSS at the start: {memory_start / 1e6:.0f} MB; {releases} releases")
                for number in range(releases):
                    release = plan(rng, frame)
                    # An interrupt at a random moment of the cell's life: up to 1.2 times its kind's median time.
                    interrupt_after = (
                        rng.uniform(0.0, 1.2) * statistics.median(typical[release.kind][-50:])
                        if rng.random() < INTERRUPT_SHARE
                        else None
                    )
                    interrupts_sent += interrupt_after is not None
                    outcome = execute(client, release.code, interrupt_after, manager)
                    tally = by_kind[release.kind]
                    if outcome.status == "timeout":
                        key = "unreported"
                        unreported.append({"release": number, "kind": release.kind, "missing": outcome.ename})
                    elif outcome.status != "ok":
                        key = "errors"
                        if outcome.ename == "KeyboardInterrupt":
                            # An interrupt sent while the previous cell was already answering can land in this one.
                            key = "interrupted" if interrupt_after is not None else "late_interrupt"
                        if key == "errors":
                            errors[outcome.ename] = errors.get(outcome.ename, 0) + 1
                    else:
                        latencies.append(outcome.seconds)
                        if interrupt_after is None:
                            typical[release.kind].append(outcome.seconds)
                        key = "answered"
                        expected = release.expected()
                        if not _right(outcome.stdout, expected, release.tolerance):
                            counts["wrong"] += 1
                            tally["wrong"] += 1
                            wrong.append(
                                {
                                    "release": number,
                                    "kind": release.kind,
                                    "code": release.code,
                                    "interrupted": interrupt_after is not None,
                                    "printed": outcome.stdout[:2000],
                                    "expected": expected,
                                }
                            )
                    counts[key] += 1
                    tally[key] += 1
                    if key != "answered" or interrupt_after is not None:
                        log(f"release {number} ({release.kind}): {key} {outcome.ename} after {outcome.seconds:.2f} s")
                    if (number + 1) % 20 == 0:
                        log(f"{number + 1}/{releases}: {counts}")
                memory_end = vm_status(vault, "VmRSS")
            finally:
                _stop(manager, client)
    growth = (memory_end - memory_start) / memory_start
    latency = _percentiles(latencies)
    met = {
        "wrong_answers": counts["wrong"] == 0,
        "unreported_failures": counts["unreported"] == 0,
        "memory": abs(growth) <= TARGET_MEMORY_GROWTH,
    }
    return {
        "releases": releases,
        "rows": rows,
        "seed": seed,
        "interrupts_sent": interrupts_sent,
        "wrong_answers": counts["wrong"],
        "failed_correctly_reported": {
            "interrupted": counts["interrupted"],
            "hit_by_the_previous_cells_interrupt": counts["late_interrupt"],
            "errors": counts["errors"],
            "error_names": errors,
        },
        "unreported_failures": counts["unreported"],
        "unreported": unreported[:20],
        "answered": counts["answered"],
        "by_kind": by_kind,
        "wrong": wrong[:20],
        "latency_ms": latency,
        "vault_rss_bytes": {"start": memory_start, "end": memory_end, "growth": growth},
        "targets": {"wrong_answers": 0, "unreported_failures": 0, "memory_growth": TARGET_MEMORY_GROWTH},
        "met": met,
    }


def _ids(rows: int) -> Any:
    import pyarrow as pa  # type: ignore[import-untyped]

    return pa.array(np.arange(rows, dtype=np.int64))


def _plan_kind(rng: random.Random, frame: pd.DataFrame, kind: str) -> Release:
    while True:
        release = plan(rng, frame)
        if release.kind == kind:
            return release


def _right(stdout: str, expected: Any, tolerance: tuple[float, float]) -> bool:
    try:
        got = json.loads(stdout)
    except ValueError:
        return False
    return same(got, expected, tolerance)


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if len(values) < 2:
        only = 1000 * values[0] if values else None
        return {"p50": only, "p99": only, "max": only}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": 1000 * statistics.median(values), "p99": 1000 * cuts[98], "max": 1000 * max(values)}


def main() -> int:
    from _provenance import Provenance, add_output_argument

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--releases", type=int, default=2000, help="releases to run (default 2,000)")
    parser.add_argument("--rows", type=int, default=20_000, help="table rows (default 20,000)")
    parser.add_argument("--seed", type=int, default=20261206, help="seed of the releases and interrupts")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    add_output_argument(parser, "soak")
    args = parser.parse_args()
    if args.releases < 1 or args.rows < 5000:
        parser.error("--releases must be at least 1 and --rows at least 5,000 (every group released whole)")
    provenance = Provenance("soak")

    def log(message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    figures = run(args.releases, args.rows, args.seed, log)
    latency, memory = figures["latency_ms"], figures["vault_rss_bytes"]
    failed = figures["failed_correctly_reported"]
    p50 = "—" if latency["p50"] is None else f"{latency['p50']:.0f}"
    p99 = "—" if latency["p99"] is None else f"{latency['p99']:.0f}"
    summary = {
        "figure": "wrong answers / unreported failures / vault VmRSS end vs start (p50 / p99 ms, reported)",
        "result": (
            f"{figures['wrong_answers']} / {figures['unreported_failures']} / {memory['growth']:+.1%} "
            f"({p50} / {p99} ms)"
        ),
        "target": f"0 / 0 / within ±{TARGET_MEMORY_GROWTH:.0%}",
        "met": all(figures["met"].values()),
    }
    figures = provenance.record(figures, summary, args.out)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        met = {name: "MET" if value else "MISSED" for name, value in figures["met"].items()}
        print(f"{figures['releases']} releases on {figures['rows']:,} rows, {figures['interrupts_sent']} interrupts")
        print(f"  wrong answers                {figures['wrong_answers']:6d}   (target 0)  {met['wrong_answers']}")
        print(
            f"  unreported failures          {figures['unreported_failures']:6d}   (target 0)  "
            f"{met['unreported_failures']}"
        )
        print(f"  interrupted, reported        {failed['interrupted']:6d}")
        print(f"  late interrupt, reported     {failed['hit_by_the_previous_cells_interrupt']:6d}")
        print(f"  other errors, reported       {failed['errors']:6d}")
        print(f"  latency of answered cells    p50 {p50} ms, p99 {p99} ms")
        print(
            f"  vault VmRSS                  {memory['start'] / 1e6:.0f} MB -> {memory['end'] / 1e6:.0f} MB "
            f"({memory['growth']:+.1%}, target within ±{TARGET_MEMORY_GROWTH:.0%})  {met['memory']}"
        )
        print(f"Written to {args.out} (commit {figures['provenance']['commit']})")
    return 0 if all(figures["met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
