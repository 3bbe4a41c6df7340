"""Benchmark: loading a PME (AES_GCM_V1) Parquet file against the same read of the plaintext Parquet file.

Target (issue "Encrypted Arrow datasets and the data owner's key broker"): ``read_encrypted_parquet`` loads at
>= 0.9x the speed of the same read of the plaintext file (encrypted time <= plaintext time / 0.9).

One run builds the synthetic table of ``dataset_ipc_load.py`` (float64, int64, a 1,000-category string column and
a unique string column; 4M rows is about 0.27 GB), writes it once as plaintext Parquet and once encrypted, with the
same compression and the same row groups, and reads each right away so both sit in the page cache. Then, in
interleaved rounds in a shuffled order with the garbage collector off, it times:

- ``plaintext``: the baseline the target refers to. The same ``pyarrow.dataset`` scan that confnb's reader runs
  (a fragment made from an open ``pa.OSFile``, the same scan options, ``FileSystemDataset.to_table``), without
  decryption;
- ``plaintext pq.read_table``: the everyday way of reading a Parquet file, for reference;
- ``encrypted``: ``confnb.datasets.parquet.read_encrypted_parquet`` as a caller uses it, given the raw dataset
  key, so each load also pays for a new keyring and ``CryptoFactory``, the layout check, the footer binding check
  and the KMS unwrap of the file's data key;
- ``encrypted, pyarrow only``: ``pq.read_table`` with the keyring's decryption properties, for reference (what
  the checks confnb adds cost on top of plain pyarrow PME).

The speed ratio is the median over rounds of plaintext time / encrypted time within the same round: a paired
comparison, so the speed drift of a shared virtual machine (tens of per cent within seconds) cancels instead of
landing on whichever mode a slow moment hit; the ratio of the two medians is reported beside it. So is the CPU time
of each load (all threads), whose ratio shows what decryption costs regardless of the wall clock. Decryption
happens inside Arrow's own (multi-threaded) Parquet decoding, so both sides use the same threads; run it on an
otherwise idle machine anyway. The load average at the start is reported, with a warning when it is high. Run
with::

    python benchmarks/dataset_parquet_load.py [--rows N] [--rounds R] [--compression C] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from dataset_ipc_load import (  # the colleague's table and timer, so the two benchmarks compare
    build_table,
    interleaved_medians,
)

from confnb.datasets.parquet import (
    ROW_GROUP_ROWS,
    SCAN_OPTIONS,
    DatasetKeyring,
    read_encrypted_parquet,
    write_encrypted_parquet,
)

TARGET_SPEED = 0.9
DATASET_ID, KEY_ID = "benchmark", "k1"


def plaintext_scan(path: Path) -> pa.Table:
    """What ``read_encrypted_parquet`` does (same file object, same scan options), minus decryption and checks."""
    with pa.OSFile(str(path)) as source:
        options = ds.ParquetFragmentScanOptions(**SCAN_OPTIONS)
        parquet_format = ds.ParquetFileFormat(default_fragment_scan_options=options)
        fragment = parquet_format.make_fragment(source)
        fragment.ensure_complete_metadata()
        return ds.FileSystemDataset([fragment], schema=fragment.physical_schema, format=parquet_format).to_table()


def _recording_cpu(function: Callable[[], object], into: list[float]) -> Callable[[], object]:
    """``function``, appending the CPU time of each call (every thread of this process) to ``into``."""

    def call() -> object:
        start = time.process_time()
        try:
            return function()
        finally:
            into.append(time.process_time() - start)

    return call


def main() -> int:
    from _provenance import TIMES, Provenance, add_output_argument, ratio

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4_000_000, help="table rows (4M is about 0.27 GB)")
    parser.add_argument("--rounds", type=int, default=25, help="interleaved timing rounds")
    parser.add_argument("--compression", default="snappy", help="Parquet compression for both files (or 'none')")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the files (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    add_output_argument(parser, "dataset_parquet_load")
    args = parser.parse_args()
    provenance = Provenance("dataset_parquet_load")
    compression = None if args.compression == "none" else args.compression

    load = os.getloadavg()[0]
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    if load > 0.5:
        log(f"warning: load average {load:.2f}; other processes compete for the CPUs Parquet decoding uses")
    directory = args.dir or Path(tempfile.mkdtemp(prefix="confnb-bench-"))
    directory.mkdir(parents=True, exist_ok=True)
    plain_path, encrypted_path = directory / "table.parquet", directory / "table.pme.parquet"
    key = os.urandom(32)
    try:
        start = time.perf_counter()
        table = build_table(args.rows)
        nbytes = table.nbytes
        log(f"table: {args.rows:,} rows, {nbytes / 1e9:.3f} GB ({time.perf_counter() - start:.1f} s to build)")

        start = time.perf_counter()
        with pq.ParquetWriter(str(plain_path), table.schema, compression=compression) as writer:
            writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        plain_write = time.perf_counter() - start
        start = time.perf_counter()
        info = write_encrypted_parquet(
            table, encrypted_path, key, KEY_ID, DATASET_ID, compression=compression, row_group_rows=ROW_GROUP_ROWS
        )
        encrypted_write = time.perf_counter() - start
        plain_size = plain_path.stat().st_size
        if pq.ParquetFile(plain_path).metadata.num_row_groups != info.row_groups:
            raise SystemExit("the two files do not have the same row groups")
        log(f"files: plaintext {plain_size / 1e6:.1f} MB, encrypted {info.size / 1e6:.1f} MB "
            f"(written in {plain_write:.2f} s and {encrypted_write:.2f} s)")  # fmt: skip

        counting = DatasetKeyring()
        counting.add(DATASET_ID, KEY_ID, key)
        if not read_encrypted_parquet(encrypted_path, counting, KEY_ID, DATASET_ID).equals(table):
            raise SystemExit("the encrypted round trip changed the table")
        if not plaintext_scan(plain_path).equals(table):
            raise SystemExit("the plaintext round trip changed the table")
        unwraps_per_load = counting.calls.unwraps
        del table
        gc.collect()

        decryption = counting.decryption_properties()
        modes: dict[str, Callable[[], object]] = {
            "plaintext": lambda: plaintext_scan(plain_path),
            "plaintext pq.read_table": lambda: pq.read_table(plain_path),
            "encrypted": lambda: read_encrypted_parquet(encrypted_path, key, KEY_ID, DATASET_ID),
            "encrypted, pyarrow only": lambda: pq.read_table(encrypted_path, decryption_properties=decryption),
        }
        cpu_seconds: dict[str, list[float]] = {name: [] for name in modes}
        medians, times = interleaved_medians(
            {name: _recording_cpu(function, cpu_seconds[name]) for name, function in modes.items()}, args.rounds
        )
        paired = [plain / encrypted for plain, encrypted in zip(times["plaintext"], times["encrypted"], strict=True)]
        speed = statistics.median(paired)
        cpu = {name: statistics.median(values[1:]) for name, values in cpu_seconds.items()}  # [0] is the warm-up
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)

    results = {
        "rows": args.rows,
        "table_nbytes": nbytes,
        "compression": args.compression,
        "row_groups": info.row_groups,
        "file_bytes": {"plaintext": plain_size, "encrypted": info.size},
        "cpus": len(os.sched_getaffinity(0)),
        "load_average_at_start": load,
        "rounds": args.rounds,
        "write_seconds": {"plaintext": plain_write, "encrypted": encrypted_write},
        "warm_median_seconds": medians,
        "warm_all_seconds": times,
        "speed_vs_plaintext": speed,
        "speed_vs_plaintext_per_round": paired,
        "speed_vs_plaintext_of_medians": medians["plaintext"] / medians["encrypted"],
        "speed_vs_plaintext_read_table": medians["plaintext pq.read_table"] / medians["encrypted"],
        "cpu_median_seconds": cpu,
        "cpu_vs_plaintext": cpu["encrypted"] / cpu["plaintext"],
        "kms_unwraps_per_load": unwraps_per_load,
        "target": {"speed_vs_plaintext": TARGET_SPEED},
        "met": {"speed": speed >= TARGET_SPEED},
        "versions": {"python": sys.version.split()[0], "pyarrow": pa.__version__},
    }
    summary = {
        "figure": f"PME load vs plaintext Parquet scan ({args.compression}; median of per-round ratios)",
        "result": ratio(speed),
        "target": f"≥ {TARGET_SPEED:g}{TIMES}",
        "met": all(results["met"].values()),
    }
    results = provenance.record(results, summary, args.out)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"\nwarm, page cache, median of {args.rounds} interleaved rounds ({results['cpus']} CPUs):")
        for name, seconds in medians.items():
            print(f"  {name:<24} {seconds * 1000:8.1f} ms   {nbytes / seconds / 1e9:6.2f} GB/s"
                  f"   CPU {cpu[name] * 1000:6.1f} ms")  # fmt: skip
        low, high = statistics.quantiles(paired, n=4)[0], statistics.quantiles(paired, n=4)[2]
        print(f"speed: encrypted at {speed:.3f}x the same plaintext read, median of the rounds' ratios "
              f"(quartiles {low:.3f}-{high:.3f}; target >= {TARGET_SPEED}x)")  # fmt: skip
        print(f"       {results['speed_vs_plaintext_of_medians']:.3f}x as a ratio of medians; "
              f"{results['speed_vs_plaintext_read_table']:.3f}x pq.read_table of the plaintext file")  # fmt: skip
        print(f"CPU: an encrypted load takes {results['cpu_vs_plaintext']:.3f}x the CPU time of the plaintext read")
        print(f"KMS: {unwraps_per_load} unwrap(s) per encrypted load")
    return 0 if all(results["met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
