"""Benchmark: what the difference checks add to a release, and the memory the remembered record sets take.

A group-by release over a 1,000,000-row table (``--groups`` groups, default 4; two aggregations, ``sum`` of ``x``
and ``mean`` of ``y``, where ``y`` is null in about 5 % of the rows, so the two numbers of a group come from
different record sets) goes through the vault's release engine (:func:`kernel_enclave.vault.release.release`, the
code a vault request runs) in three ways, interleaved in a shuffled order over ``--rounds`` rounds:

1. **without**: the release alone, as before the checks existed;
2. **with**: the release with the sketch of every released number's record set (``record_sets=True,
   sketches=True``), checked against the kernel's :class:`~kernel_enclave.vault.differences.ReleaseMemory` and
   remembered, as ``Vault._release`` does (``ReleaseMemory.check_release`` with the vault's ``release_recipe``: a
   set the sketches cannot rule out would be listed and compared exactly, inside the timing), and the rule across
   releases (:class:`~kernel_enclave.vault.earlier_values.EarlierValues`, holding the earlier releases too: none of
   them, and no timed release, reads a computed column, so nothing is run again);
3. **record sets listed**: the release listing its record sets, with no check (reported: what a release costs when
   its sets must be listed, as one near an earlier set is; the check's own time is also taken inside each "with"
   call).

Every round releases new numbers: round i filters out the rows of one slot (``slot != i``, about 1/64 of them), so
no record set repeats an earlier one and nothing is answered from the memory's deduplication. Each way walks the
same sequence of plans. Before the rounds, the memory holds ``--remembered`` earlier releases (default 1,000):
distinct random subsets of the table's records, each of a size within ``min_group_size - 1`` of one of the timed
releases' record sets, so the size step of the check leaves them for the id-sum step to rule out. They are
remembered under every comparison key the timed numbers carry (``x``, ``y`` and ``count``), so every timed number
is compared with all of them, and as the vault remembers its releases: as sketches, each with a recipe that lists
it again (here, the subset itself). How many sets had to be listed during the rounds is reported (none is the
expected count: no timed set is near an earlier one).

The figure is the ratio of the medians, with over without. Target: at most 1.10. The remembered sets' memory
(``ReleaseMemory.memory_bytes``) is reported beside it, and what the same sets would take listed as bitmaps. The
released tables with and without the checks, and the sketches against the listed sets, are compared before any
timing, so both ways do the same work. Exit status 0 when the target holds, 1 otherwise. Run with::

    python benchmarks/difference_checks.py [--rows 1000000] [--groups 4] [--remembered 1000] [--rounds 61] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
from dataset_ipc_load import interleaved_medians  # the same interleaved timing as the other benchmarks

TARGET = 1.10
MIN_GROUP_SIZE = 10
DATASET = "bench"
POLICY = f"""
[policy]
id = "bench-differences-v1"
[release]
allow = ["schema", "aggregate"]
min_group_size = {MIN_GROUP_SIZE}
"""


SLOTS = 64  # round i releases the rows outside slot i % SLOTS
# The earlier sets are remembered under every comparison key the timed numbers carry (their columns and "count"),
# so that each timed number is compared with all 1,000 of them.
EARLIER_KEYS = frozenset({f"{DATASET}:x", f"{DATASET}:y", "count"})


def build_table(rows: int, groups: int, seed: int = 20261206) -> pa.Table:
    rng = np.random.default_rng(seed)
    y = rng.normal(size=rows)
    return pa.table(
        {
            "g": rng.integers(0, groups, rows),
            "slot": rng.integers(0, SLOTS, rows),
            "x": rng.normal(size=rows),
            "y": pa.array(y, mask=rng.random(rows) < 0.05),
        }
    )


def release_plan(round_number: int) -> dict[str, Any]:
    outside = {"fn": "ne", "args": [{"col": "slot"}, {"lit": round_number % SLOTS}]}
    return {
        "node": "aggregate",
        "input": {"node": "filter", "input": {"node": "source", "handle": "d1"}, "predicate": outside},
        "by": ["g"],
        "aggs": [
            {"name": "sum_x", "column": "x", "func": "sum"},
            {"name": "mean_y", "column": "y", "func": "mean"},
        ],
    }


def same_result(a: pa.Table | None, b: pa.Table | None) -> bool:
    """The same groups and, to rounding (a parallel sum adds in any order), the same numbers."""
    if a is None or b is None or a.column_names != b.column_names or a.num_rows != b.num_rows:
        return False
    for name in a.column_names:
        left, right = a.column(name).to_numpy(), b.column(name).to_numpy()
        same = np.allclose(left, right, rtol=1e-9, equal_nan=True) if left.dtype.kind == "f" else left == right
        if not np.all(same):
            return False
    return True


def record_set_sizes(table: pa.Table, groups: int, plans: int) -> list[int]:
    """The sizes of the timed releases' record sets (each group's rows, and those with ``y``), from the plaintext."""
    g = table.column("g").to_numpy()
    slot = table.column("slot").to_numpy()
    has_y = table.column("y").is_valid().to_numpy(zero_copy_only=False)
    sizes = set()
    for i in range(plans):
        kept = slot != i % SLOTS
        sizes.update(np.bincount(g[kept], minlength=groups).tolist())
        sizes.update(np.bincount(g[kept & has_y], minlength=groups).tolist())
    return sorted(sizes)


def earlier_sets(
    rows: int, sizes: list[int], count: int, rng: np.random.Generator, log: Callable[[str], None]
) -> list[np.ndarray]:
    """``count`` distinct random subsets of the records, each of a size within k - 1 of one of ``sizes``."""
    subsets = []
    started = time.perf_counter()
    for i in range(count):
        size = max(1, min(rows, sizes[i % len(sizes)] + int(rng.integers(-(MIN_GROUP_SIZE - 1), MIN_GROUP_SIZE))))
        margin = 5 * np.sqrt(size) + MIN_GROUP_SIZE  # draw a few too many, then drop the excess at random
        chosen = np.flatnonzero(rng.random(rows) < min(1.0, (size + margin) / rows))
        if chosen.size > size:
            chosen = np.delete(chosen, rng.choice(chosen.size, chosen.size - size, replace=False))
        subsets.append(chosen.astype(np.int64))
        if (i + 1) % 200 == 0:
            log(f"drew {i + 1} earlier record sets ({time.perf_counter() - started:.0f} s)")
    return subsets


def run(rows: int, groups: int, remembered: int, rounds: int, log: Callable[[str], None]) -> dict[str, Any]:
    from confnb.policy.output import OutputPolicy
    from kernel_enclave.vault import release
    from kernel_enclave.vault.differences import Recipe, ReleaseMemory, Sketch, sketch_of, weight_bits
    from kernel_enclave.vault.earlier_values import EarlierValues
    from kernel_enclave.vault.plan import SourceTable
    from kernel_enclave.vault.vault import release_recipe

    table = build_table(rows, groups)
    sources = {"d1": SourceTable.from_dataset(DATASET, table)}
    policies = {DATASET: OutputPolicy.from_toml(POLICY)}
    k = {DATASET: policies[DATASET].min_group_size}
    log(f"table: {rows:,} rows, {groups} groups, {table.nbytes / 1e6:.0f} MB")

    sizes = record_set_sizes(table, groups, rounds + 1)  # the warm-up call and the rounds
    dataset_rows = {DATASET: rows}  # fixes the field width of the record weights, as the vault gives it
    bits = weight_bits(rows)
    assert bits is not None
    memory = ReleaseMemory()
    earlier = EarlierValues()  # the rule across releases, as the vault keeps it beside the memory
    listed = ReleaseMemory()  # the same sets listed, for the memory they would take as bitmaps
    listings = [0]
    started = time.perf_counter()
    for i, subset in enumerate(earlier_sets(rows, sizes, remembered, np.random.default_rng(7), log)):
        label = f"earlier release {i}"
        found = (DATASET, label, subset, EARLIER_KEYS)

        def again(found: Any = found) -> list[Any]:
            listings[0] += 1
            return [found]

        recipe = Recipe(again, ("earlier", i))
        sketch = Sketch(DATASET, label, int(subset.size), sketch_of(subset, bits), EARLIER_KEYS, 0, bits)
        memory.remember(memory.check_release([sketch], [], {DATASET}, k, recipe=recipe, rows=dataset_rows))
        earlier.remember(earlier.check({DATASET}, False, lambda: [], recipe.fingerprint, k))
        listed.admit([found], k)
    log(f"remembered {memory.remembered():,} earlier record sets in {time.perf_counter() - started:.1f} s")
    remembered_bytes = memory.memory_bytes()
    listed_bytes = listed.memory_bytes()
    del listed
    listings_before = listings[0]

    # A plan no round uses, to compare the two ways' results before any timing.
    check_plan = release_plan(SLOTS - 1)
    checked = release.release(check_plan, sources, policies, record_sets=True)
    sketched = release.release(check_plan, sources, policies, record_sets=True, sketches=True)
    plain = release.release(check_plan, sources, policies)
    if not (same_result(checked.table, plain.table) and same_result(sketched.table, plain.table)):
        raise SystemExit("the release with record sets differs from the one without")
    if sketched.sketches is None or sorted((s.label, s.size, s.total) for s in sketched.sketches) != sorted(
        (label, ids.size, sketch_of(ids, bits)) for _, label, ids, _ in checked.record_sets
    ):
        raise SystemExit("the release's sketches do not describe its record sets")
    sets_per_release = len(checked.record_sets)
    log(f"the results agree ({sets_per_release} record sets per release, sketched alike); timing")

    counters = {"without": 0, "with": 0, "record_sets_only": 0}
    check_times: list[float] = []

    def next_plan(way: str) -> dict[str, Any]:
        counters[way] += 1
        return release_plan(counters[way] - 1)

    def without() -> Any:
        return release.release(next_plan("without"), sources, policies)

    def with_checks() -> Any:
        plan = next_plan("with")
        released = release.release(plan, sources, policies, record_sets=True, sketches=True)
        started = time.perf_counter()
        recipe = release_recipe(plan, sources, policies)
        # A group-by, as the vault passes it.
        checked = memory.check_release(
            released.sketches, released.record_sets, {DATASET}, k, grouped=True, recipe=recipe, rows=dataset_rows
        )
        combined = earlier.check({DATASET}, released.reads_computed, lambda: [], recipe.fingerprint, k)
        memory.remember(checked)
        earlier.remember(combined)
        check_times.append(time.perf_counter() - started)
        return released

    def record_sets_only() -> Any:
        return release.release(next_plan("record_sets_only"), sources, policies, record_sets=True)

    medians, times = interleaved_medians(
        {"without": without, "with": with_checks, "record_sets_only": record_sets_only}, rounds
    )
    ratio = medians["with"] / medians["without"]
    return {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "rows": rows,
        "groups": groups,
        "min_group_size": MIN_GROUP_SIZE,
        "record_sets_per_release": sets_per_release,
        "earlier_releases": remembered,
        "remembered_sets": memory.remembered(),
        "median_s": medians,
        "all_s": times,
        "rounds": rounds,
        "ratio": ratio,
        "record_sets_ratio": medians["record_sets_only"] / medians["without"],
        "check_s": {"median": statistics.median(check_times), "all": check_times},
        "check_ratio": statistics.median(check_times) / medians["without"],
        "memory_bytes": {
            "remembered_sets": remembered_bytes,
            "per_set": remembered_bytes / max(1, remembered),
            "after_rounds": memory.memory_bytes(),
            "same_sets_listed": listed_bytes,
        },
        "sets_listed_during_rounds": listings[0] - listings_before,
        "listed_sets_after_rounds": memory.listed(),
        "target": TARGET,
        "met": ratio <= TARGET,
    }


def main() -> int:
    from _provenance import TIMES, Provenance, add_output_argument, ratio

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="table rows (default 1,000,000)")
    parser.add_argument("--groups", type=int, default=4, help="groups of the release (default 4)")
    parser.add_argument("--remembered", type=int, default=1000, help="earlier releases remembered (default 1,000)")
    parser.add_argument("--rounds", type=int, default=61, help="interleaved rounds (default 61)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    add_output_argument(parser, "difference_checks")
    args = parser.parse_args()

    def log(message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    load = os.getloadavg()[0]
    if load > 0.5:
        log(f"warning: load average {load:.2f}; other processes compete for the CPUs")
    provenance = Provenance("difference_checks")
    figures = run(args.rows, args.groups, args.remembered, args.rounds, log)
    figures["load_average_at_start"] = load
    megabytes = figures["memory_bytes"]["remembered_sets"] / 1e6
    listed_megabytes = figures["memory_bytes"]["same_sets_listed"] / 1e6
    summary = {
        "figure": f"release with vs without difference checks ({figures['earlier_releases']:,} earlier releases "
        "remembered; their memory, reported)",
        "result": f"{ratio(figures['ratio'])} ({megabytes:.2f} MB)",
        "target": f"≤ {TARGET:g}{TIMES}",
        "met": figures["met"],
    }
    figures = provenance.record(figures, summary, args.out)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        medians = figures["median_s"]
        print(
            f"{figures['rows']:,} rows, {figures['groups']} groups, {figures['record_sets_per_release']} record sets "
            f"per release; medians of {figures['rounds']} interleaved rounds"
        )
        print(f"  without difference checks   {medians['without'] * 1000:8.1f} ms")
        print(f"  with record sets listed     {medians['record_sets_only'] * 1000:8.1f} ms")
        print(f"  with difference checks      {medians['with'] * 1000:8.1f} ms")
        print(f"    of which the check        {figures['check_s']['median'] * 1000:8.1f} ms")
        print(
            f"  ratio {figures['ratio']:.2f}x (target <= {TARGET}x)  {'MET' if figures['met'] else 'MISSED'}; "
            f"record sets alone {figures['record_sets_ratio']:.2f}x"
        )
        print(
            f"remembered: {figures['remembered_sets']:,} record sets in {megabytes:.2f} MB as sketches "
            f"({figures['memory_bytes']['per_set']:.0f} bytes each; {listed_megabytes:.0f} MB listed as bitmaps); "
            f"{figures['sets_listed_during_rounds']} listed again during the rounds"
        )
    return 0 if figures["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
