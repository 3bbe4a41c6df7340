"""Benchmark: analysis through the vault against the same pandas/scikit-learn code on the plaintext, in one run.

A 1,000,000-row table (10 float64 features, an int64 group key with 50 groups, a binary target) is encrypted with the
data owner's tooling and registered with a real broker on loopback. A real vault process is started as the kernel's
launcher starts it (``python -m kernel_enclave.vault`` with its configuration line on stdin, on the simulated TEE);
it attests to the broker for the key, decrypts the dataset and serves the analyst API (``import confnb as cn``) of
this process over its Unix socket. Three figures, each a ratio measured in the same run:

1. **group-by aggregate**: ``t.group_by("g").agg(mean_x0=("x0", "mean"), ..., n=("x0", "count")).release()`` (the
   request, the vault's evaluation, the output policy's group-size checks, its audit entry and the reply decoded
   into a DataFrame) against ``frame.groupby("g").agg(...)`` with the same named aggregations on the plaintext
   DataFrame, held by one plaintext process of its own (see :func:`serve_baseline`). Target: at most 1.3x.
2. **LogisticRegression fit**: ``cn.fit(LogisticRegression(max_iter=200), t, target="y", features=[...])`` against
   ``LogisticRegression(max_iter=200).fit(frame[features], frame["y"])``. Target: at most 1.15x.
3. **peak memory**: the vault process's high-water mark (``VmHWM``) after opening the dataset and running every
   timed operation, against a fresh process that reads the plaintext (``pandas.read_feather``) and does the same
   aggregate and fit once. Both include their interpreter and libraries. Target: at most 1.5x.

Only the operations are timed, not process start, key release or decryption. Rounds interleave the vault and the
baseline in a shuffled order with the garbage collector off; the figures are medians. The released aggregate and
the fitted coefficients are checked against the baseline's before any timing, so both sides do the same work.
Exit status 0 when every target holds, 1 otherwise. Run with::

    python benchmarks/vault_ops.py [--rows 1000000] [--aggregate-rounds 21] [--fit-rounds 7] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd  # type: ignore[import-untyped]
import pyarrow as pa  # type: ignore[import-untyped]
from dataset_ipc_load import interleaved_medians  # the same interleaved timing as the dataset benchmarks
from pyarrow import feather

TARGET_AGGREGATE = 1.3
TARGET_FIT = 1.15
TARGET_MEMORY = 1.5
FEATURES = [f"x{i}" for i in range(10)]
GROUPS = 50
MAX_ITER = 200
POLICY = """
[policy]
id = "bench-v1"
[release]
allow = ["schema", "aggregate", "model_metrics", "model_parameters"]
min_group_size = 10
"""


def build_table(rows: int, seed: int = 20261128) -> pa.Table:
    """Synthetic features with a logistic target that depends on all of them (the fit has real work to do)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, len(FEATURES))) * rng.uniform(0.5, 3.0, len(FEATURES)) + rng.normal(size=len(FEATURES))
    weights = rng.normal(size=len(FEATURES))
    logit = (x - x.mean(axis=0)) @ weights / 3.0 + rng.logistic(size=rows)
    columns: dict[str, Any] = {"g": rng.integers(0, GROUPS, rows)}
    columns.update({name: x[:, i] for i, name in enumerate(FEATURES)})
    columns["y"] = (logit > 0).astype(np.int64)
    return pa.table(columns)


def named_aggregations() -> dict[str, tuple[str, str]]:
    return {**{f"mean_{name}": (name, "mean") for name in FEATURES}, "n": ("x0", "count")}


def vm_status(pid: int | str, field: str) -> int:
    """A memory field of ``/proc/<pid>/status``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


# -- the plaintext process (peak memory) ---------------------------------------------------------------------------


def child(path: Path) -> None:
    """A fresh process doing the baseline's work once: read the plaintext, aggregate, fit; prints its memory."""
    from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]

    gc.collect()
    after_imports = vm_status("self", "VmRSS")
    frame = feather.read_feather(path)
    frame.groupby("g").agg(**named_aggregations())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        LogisticRegression(max_iter=MAX_ITER).fit(frame[FEATURES], frame["y"])
    print(json.dumps({"after_imports": after_imports, "peak": vm_status("self", "VmHWM")}))


def serve_baseline(path: Path) -> None:
    """The timed baseline: one process holding the plaintext DataFrame, doing the work on request.

    The baseline runs in a process of its own, like the vault: run in the benchmark's process, its BLAS and OpenMP
    worker pools (which spin for a while after each call) would compete with the vault's on a two-core machine
    whenever the vault's turn follows the baseline's, which is the benchmark's artefact, not the vault's cost.
    """
    from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]

    frame = feather.read_feather(path)
    aggs = named_aggregations()
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "aggregate":
            frame.groupby("g").agg(**aggs)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                LogisticRegression(max_iter=MAX_ITER).fit(frame[FEATURES], frame["y"])
        print("done", flush=True)


class BaselineProcess:
    def __init__(self, path: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve-baseline", str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self._stdin, self._stdout = self.process.stdin, self.process.stdout
        if self._stdout.readline().strip() != "ready":
            raise SystemExit("the baseline process did not start")

    def run(self, work: str) -> None:
        self._stdin.write(work + "\n")
        self._stdin.flush()
        if self._stdout.readline().strip() != "done":
            raise SystemExit(f"the baseline process failed its {work}")

    def close(self) -> None:
        self._stdin.close()
        self.process.wait(timeout=30)


# -- the vault process ---------------------------------------------------------------------------------------------


class VaultProcess:
    """``python -m kernel_enclave.vault``, configured and answered on its pipes as the kernel's launcher does."""

    def __init__(self, socket_path: Path, broker_url: str, dataset_path: Path) -> None:
        from kernel_enclave.vault.keys import VaultKeys

        self.process = subprocess.Popen(
            [sys.executable, "-m", "kernel_enclave.vault"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self._stdin: IO[bytes] = self.process.stdin
        config = {
            "keys": VaultKeys.generate().to_dict(),
            "tee": "simulated",
            "broker_url": broker_url,
            "dataset_path": str(dataset_path),
            "socket": str(socket_path),
            "executor_uid": os.getuid(),
        }
        self._stdin.write(json.dumps(config).encode() + b"\n")
        self._stdin.flush()
        ready = json.loads(self.process.stdout.readline() or b'{"error": "the vault exited"}')
        if ready.get("ready") is not True:
            raise SystemExit(f"the vault did not start: {ready.get('error')}")
        self.after_start = vm_status(self.process.pid, "VmRSS")
        threading.Thread(target=self._acknowledge, args=(self.process.stdout,), daemon=True).start()

    def _acknowledge(self, stdout: IO[bytes]) -> None:
        """The vault asks for the owner's display policy to be enforced before a dataset opens: confirm it."""
        for line in stdout:
            with contextlib.suppress(ValueError, KeyError, OSError):
                self._stdin.write(json.dumps({"ack": int(json.loads(line)["seq"])}).encode() + b"\n")
                self._stdin.flush()

    def peak(self) -> int:
        return vm_status(self.process.pid, "VmHWM")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._stdin.close()  # the vault exits when its launcher's pipe closes
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def owner_broker(table: pa.Table, workdir: Path, log: Callable[[str], None]) -> Iterator[str]:
    """The owner's encrypted dataset in ``workdir/datasets`` and their broker on loopback; yields its URL."""
    from confnb.broker.local import serve_locally
    from confnb.broker.store import OwnerStore
    from confnb.datasets.owner import encrypt_dataset
    from confnb.policy.output import OutputPolicy
    from kernel_enclave.measurement import simulated_measurement
    from kernel_enclave.tee.simulated import SimulatedBackend

    os.environ["CONFNB_SIMULATED_TEE_DIR"] = str(workdir / "simulated-tee")
    SimulatedBackend()  # the simulated chip's RSA keys are made here, outside any timing
    store = OwnerStore.create(workdir / "owner")
    attestation = (
        f'[attestation]\nallow_simulated = true\nmeasurements = ["{simulated_measurement().hex()}"]\n'
        "max_evidence_age_s = 300\n"
    )
    started = time.perf_counter()
    encrypt_dataset(table, workdir / "datasets" / "bench", store, "bench", OutputPolicy.from_toml(POLICY), attestation)
    log(f"encrypted the dataset in {time.perf_counter() - started:.1f} s")
    with serve_locally(store) as url:
        yield url


@contextlib.contextmanager
def vault_process(broker_url: str, workdir: Path) -> Iterator[VaultProcess]:
    """A fresh vault, with the analyst API of this process pointed at its socket."""
    from confnb.analyst.session import current_session

    socket_dir = Path(tempfile.mkdtemp(prefix="cnb-"))  # a Unix socket's path is limited to about 100 bytes
    vault = VaultProcess(socket_dir / "vault.sock", broker_url, workdir / "datasets")
    os.environ["CONFNB_VAULT_SOCKET"] = str(socket_dir / "vault.sock")
    try:
        yield vault
    finally:
        current_session().close()
        vault.close()
        shutil.rmtree(socket_dir, ignore_errors=True)


# -- timing --------------------------------------------------------------------------------------------------------


def run(rows: int, aggregate_rounds: int, fit_rounds: int, log: Callable[[str], None]) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression

    import confnb as cn

    table = build_table(rows)
    frame = table.to_pandas()
    log(f"table: {rows:,} rows, {table.nbytes / 1e6:.0f} MB")
    workdir = Path(tempfile.mkdtemp(prefix="confnb-bench-vault-"))
    try:
        plaintext = workdir / "plaintext.feather"
        feather.write_feather(table, plaintext, compression="uncompressed")
        aggs = named_aggregations()

        def pandas_aggregate() -> Any:
            return frame.groupby("g").agg(**aggs)

        def sklearn_fit() -> Any:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return LogisticRegression(max_iter=MAX_ITER).fit(frame[FEATURES], frame["y"])

        with owner_broker(table, workdir, log) as url:
            with vault_process(url, workdir) as timing_vault:
                started = time.perf_counter()
                sealed = cn.open("bench")
                log(f"opened through the vault (key release, decryption) in {time.perf_counter() - started:.2f} s")

                def vault_aggregate() -> Any:
                    return sealed.group_by("g").agg(**aggs).release()

                def vault_fit() -> Any:
                    return cn.fit(LogisticRegression(max_iter=MAX_ITER), sealed, target="y", features=FEATURES)

                released, expected = vault_aggregate(), pandas_aggregate()
                if not np.allclose(released.to_numpy(dtype=np.float64), expected.to_numpy(dtype=np.float64)):
                    raise SystemExit("the vault's aggregate differs from pandas' on the plaintext")
                coefficients = vault_fit().params()["coef_"]
                reference = sklearn_fit().coef_[0]
                if not np.allclose([coefficients[name] for name in FEATURES], reference, rtol=1e-4, atol=1e-8):
                    raise SystemExit("the vault's fitted coefficients differ from scikit-learn's on the plaintext")
                log("the vault's results equal the baseline's; timing")
                baseline_process = BaselineProcess(plaintext)
                try:
                    _, aggregate_times = interleaved_medians(
                        {"vault": vault_aggregate, "pandas": lambda: baseline_process.run("aggregate")},
                        aggregate_rounds,
                    )
                    log(f"aggregate: {aggregate_rounds} rounds done")
                    _, fit_times = interleaved_medians(
                        {"vault": vault_fit, "scikit-learn": lambda: baseline_process.run("fit")}, fit_rounds
                    )
                    log(f"fit: {fit_rounds} rounds done")
                finally:
                    baseline_process.close()
                peak_after_rounds = timing_vault.peak()  # every model fitted above is still held by the vault
            # Peak memory of the same work as the plaintext process: a fresh vault, one aggregate, one fit.
            with vault_process(url, workdir) as vault:
                vault_start = vault.after_start
                sealed = cn.open("bench")
                sealed.group_by("g").agg(**aggs).release()
                cn.fit(LogisticRegression(max_iter=MAX_ITER), sealed, target="y", features=FEATURES)
                vault_peak = vault.peak()
        done = subprocess.run(
            [sys.executable, __file__, "--child", str(plaintext)], capture_output=True, text=True, check=True
        )
        baseline = json.loads(done.stdout)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    aggregate = {name: statistics.median(values) for name, values in aggregate_times.items()}
    fit = {name: statistics.median(values) for name, values in fit_times.items()}
    ratios = {
        "aggregate": aggregate["vault"] / aggregate["pandas"],
        "fit": fit["vault"] / fit["scikit-learn"],
        "memory": vault_peak / baseline["peak"],
    }
    targets = {"aggregate": TARGET_AGGREGATE, "fit": TARGET_FIT, "memory": TARGET_MEMORY}
    return {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": {"pyarrow": pa.__version__, "pandas": pd.__version__, "numpy": np.__version__},
        "rows": rows,
        "table_bytes": table.nbytes,
        "aggregate_s": {"median": aggregate, "all": aggregate_times, "rounds": aggregate_rounds},
        "fit_s": {"median": fit, "all": fit_times, "rounds": fit_rounds},
        "memory_bytes": {
            "vault_peak": vault_peak,
            "vault_after_start": vault_start,
            "vault_peak_after_timed_rounds": peak_after_rounds,
            "plaintext_peak": baseline["peak"],
            "plaintext_after_imports": baseline["after_imports"],
        },
        "ratios": ratios,
        "targets": targets,
        "met": {name: ratios[name] <= targets[name] for name in targets},
    }


def main() -> int:
    from _provenance import TIMES, Provenance, add_output_argument, ratio

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="table rows (default 1,000,000)")
    parser.add_argument("--aggregate-rounds", type=int, default=21, help="interleaved aggregate rounds (default 21)")
    parser.add_argument("--fit-rounds", type=int, default=7, help="interleaved fit rounds (default 7)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--serve-baseline", type=Path, help=argparse.SUPPRESS)
    add_output_argument(parser, "vault_ops")
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return 0
    if args.serve_baseline is not None:
        serve_baseline(args.serve_baseline)
        return 0

    def log(message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    load = os.getloadavg()[0]
    if load > 0.5:
        log(f"warning: load average {load:.2f}; other processes compete for the CPUs")
    provenance = Provenance("vault_ops")
    figures = run(args.rows, args.aggregate_rounds, args.fit_rounds, log)
    figures["load_average_at_start"] = load
    ratios, targets = figures["ratios"], figures["targets"]
    summary = {
        "figure": "vault vs plaintext: group-by / fit / peak memory",
        "result": " / ".join(ratio(ratios[name]) for name in ("aggregate", "fit", "memory")),
        "target": " / ".join(f"≤ {targets[name]:g}{TIMES}" for name in ("aggregate", "fit", "memory")),
        "met": all(figures["met"].values()),
    }
    figures = provenance.record(figures, summary, args.out)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        ratios, targets = figures["ratios"], figures["targets"]
        met = {name: "MET" if figures["met"][name] else "MISSED" for name in targets}
        aggregate, fit, memory = figures["aggregate_s"]["median"], figures["fit_s"]["median"], figures["memory_bytes"]
        print(f"{figures['rows']:,} rows, {figures['table_bytes'] / 1e6:.0f} MB; medians of interleaved rounds")
        print(f"group-by aggregate ({figures['aggregate_s']['rounds']} rounds):")
        print(f"  pandas on the plaintext   {aggregate['pandas'] * 1000:8.1f} ms")
        print(f"  through the vault         {aggregate['vault'] * 1000:8.1f} ms")
        print(f"  ratio {ratios['aggregate']:.2f}x (target <= {targets['aggregate']}x)  {met['aggregate']}")
        print(f"LogisticRegression(max_iter={MAX_ITER}) fit ({figures['fit_s']['rounds']} rounds):")
        print(f"  scikit-learn on the plaintext {fit['scikit-learn']:8.3f} s")
        print(f"  through the vault             {fit['vault']:8.3f} s")
        print(f"  ratio {ratios['fit']:.2f}x (target <= {targets['fit']}x)  {met['fit']}")
        print("peak memory (VmHWM, whole process):")
        print(
            f"  plaintext process  {memory['plaintext_peak'] / 1e6:7.0f} MB "
            f"({memory['plaintext_after_imports'] / 1e6:.0f} MB after imports)"
        )
        print(
            f"  vault process      {memory['vault_peak'] / 1e6:7.0f} MB "
            f"({memory['vault_after_start'] / 1e6:.0f} MB once started)"
        )
        print(f"  ratio {ratios['memory']:.2f}x (target <= {targets['memory']}x)  {met['memory']}")
    return 0 if all(figures["met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
