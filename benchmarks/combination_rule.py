"""Benchmark: what the rule on combinations of a release's numbers costs a release that reads a computed column.

A group-by release over a 1,000,000-row table (``mean`` of ``x / y``, a computed column, ``sum`` and ``count`` of
``x``; ``y`` is gamma-distributed, so the ratio has the far outliers real ratios have, which open most groups to the
full search) goes through the vault's release engine (:func:`kernel_enclave.vault.release.release`, the code a vault
request runs) with the rule (:mod:`kernel_enclave.vault.combinations`) and without it, interleaved over
``--rounds`` rounds, for 4 groups and for 1,000. Releases that read only the dataset's columns as loaded do not run
the rule (every other benchmark's figures are of such releases). The released tables with and without the rule are
compared before any timing: the data is in general position, so the rule withholds nothing.

A third way (**after an earlier release**) is the release as the vault makes it in a kernel that has released
``sum`` of ``x`` by the same groups before: with the rule, and then the rule across releases
(:mod:`kernel_enclave.vault.earlier_values`), which runs the earlier release again gathering its records' values
(the later one kept its own, the rule having run) and searches the two together. It withholds nothing either
(checked before the timing).

The figures are the ratios of the medians, with (and after an earlier release) over without; there is no target
(reported). Run with::

    python benchmarks/combination_rule.py [--rows 1000000] [--rounds 21] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
from dataset_ipc_load import interleaved_medians  # the same interleaved timing as the other benchmarks
from difference_checks import same_result  # equal to rounding: a parallel sum adds in any order

GROUPINGS = (4, 1000)
POLICY = """
[policy]
id = "bench-combinations-v1"
[release]
allow = ["schema", "aggregate"]
min_group_size = 10
"""


def build_table(rows: int, groups: int, seed: int = 20261207) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({"g": rng.integers(0, groups, rows), "x": rng.normal(size=rows), "y": rng.gamma(2.0, 2.0, rows)})


PLAN: dict[str, Any] = {
    "node": "aggregate",
    "input": {
        "node": "assign",
        "input": {"node": "source", "handle": "d1"},
        "columns": [["ratio", {"fn": "truediv", "args": [{"col": "x"}, {"col": "y"}]}]],
    },
    "by": ["g"],
    "aggs": [
        {"name": "mean_ratio", "column": "ratio", "func": "mean"},
        {"name": "sum_x", "column": "x", "func": "sum"},
        {"name": "n", "column": "x", "func": "count"},
    ],
}
EARLIER_PLAN: dict[str, Any] = {
    "node": "aggregate",
    "input": {"node": "source", "handle": "d1"},
    "by": ["g"],
    "aggs": [{"name": "sum_x", "column": "x", "func": "sum"}],
}


@contextlib.contextmanager
def without_the_rule() -> Iterator[None]:
    """The release engine with the rule taken out, for the baseline (restored afterwards)."""
    from kernel_enclave.vault import release

    kept = release._combined
    release._combined = lambda *args, **kwargs: {}  # type: ignore[assignment]
    try:
        yield
    finally:
        release._combined = kept  # type: ignore[assignment]


def run(rows: int, rounds: int, log: Callable[[str], None]) -> dict[str, Any]:
    from confnb.policy.output import OutputPolicy
    from kernel_enclave.vault import release
    from kernel_enclave.vault.earlier_values import EarlierValues
    from kernel_enclave.vault.plan import SourceTable

    policies = {"bench": OutputPolicy.from_toml(POLICY)}
    k = {"bench": policies["bench"].min_group_size}
    figures: dict[str, Any] = {}
    for groups in GROUPINGS:
        sources = {"d1": SourceTable.from_dataset("bench", build_table(rows, groups))}

        def with_rule(sources: Any = sources) -> Any:
            return release.release(PLAN, sources, policies)

        def without(sources: Any = sources) -> Any:
            with without_the_rule():
                return release.release(PLAN, sources, policies)

        # A kernel that released the sums of x by the same groups before (as Vault._release remembers it).
        earlier = EarlierValues()
        earlier.remember(
            earlier.check(
                {"bench"},
                False,
                lambda sources=sources: release.release(EARLIER_PLAN, sources, policies, values=True).values,
                "earlier",
                k,
            )
        )

        def after_an_earlier_release(sources: Any = sources, earlier: EarlierValues = earlier) -> Any:
            released = release.release(PLAN, sources, policies)  # (it keeps its records' values: the rule ran)
            # (raises if it refuses; kept for later releases, were it remembered: how to run it again)
            again = lambda: release.release(PLAN, sources, policies, values=True).values  # noqa: E731
            earlier.check({"bench"}, released.reads_computed, lambda: released.values, "later", k, again=again)
            return released

        checked, plain, later = with_rule(), without(), after_an_earlier_release()
        if not same_result(checked.table, plain.table) or checked.withheld != plain.withheld:
            raise SystemExit(f"{groups} groups: the rule withheld numbers of data in general position")
        if not same_result(later.table, plain.table):
            raise SystemExit(f"{groups} groups: the release after an earlier one differs")
        log(f"{groups} groups: the results agree; timing")
        ways = {"with": with_rule, "without": without, "after_an_earlier_release": after_an_earlier_release}
        medians, times = interleaved_medians(ways, rounds)
        figures[str(groups)] = {
            "median_s": medians,
            "all_s": times,
            "ratio": medians["with"] / medians["without"],
            "after_an_earlier_release_ratio": medians["after_an_earlier_release"] / medians["without"],
        }
    return {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "rows": rows,
        "rounds": rounds,
        "groupings": figures,
    }


def main() -> int:
    from _provenance import Provenance, add_output_argument, ratio

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="table rows (default 1,000,000)")
    parser.add_argument("--rounds", type=int, default=21, help="interleaved rounds per grouping (default 21)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    add_output_argument(parser, "combination_rule")
    args = parser.parse_args()

    def log(message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    load = os.getloadavg()[0]
    if load > 0.5:
        log(f"warning: load average {load:.2f}; other processes compete for the CPUs")
    provenance = Provenance("combination_rule")
    figures = run(args.rows, args.rounds, log)
    figures["load_average_at_start"] = load
    found = figures["groupings"]
    summary = {
        "figure": "release over a computed column with vs without the rule on combinations: 4 / 1,000 groups "
        "(after an earlier release, with the rule across releases)",
        "result": " / ".join(
            f"{ratio(found[str(groups)]['ratio'])} ({ratio(found[str(groups)]['after_an_earlier_release_ratio'])})"
            for groups in GROUPINGS
        ),
        "target": "reported",
        "met": None,
    }
    figures = provenance.record(figures, summary, args.out)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"{figures['rows']:,} rows; medians of {figures['rounds']} interleaved rounds")
        for groups in GROUPINGS:
            medians = found[str(groups)]["median_s"]
            print(
                f"  {groups:>5} groups: without the rule {medians['without'] * 1000:7.1f} ms, with it "
                f"{medians['with'] * 1000:7.1f} ms: {found[str(groups)]['ratio']:.2f}x; after an earlier release "
                f"{medians['after_an_earlier_release'] * 1000:7.1f} ms: "
                f"{found[str(groups)]['after_an_earlier_release_ratio']:.2f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
