"""The output policy's two routes release the same thing.

Where every row is a distinct record (no join repeated one) and the table is in memory, ``release`` computes the
numbers from plain column aggregations, bounded screens and selections; after a join (or on a scanned dataset) it
counts distinct records in one Polars query. Both must release the same numbers, withhold the same cells and name the
same record sets. These tests run the same requests through both routes of the real engine (the single-table route
is switched off for the second run) over tables built to reach every branch: nulls, NaN, masks from ``where``,
data-derived constant fills, ties, flags, groups of every size, large groups whose quantiles are bracketed from a
sample, and record sets.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa  # type: ignore[import-untyped]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confnb.policy.output import RELEASE_KINDS, OutputPolicy
from kernel_enclave.vault import release as engine
from kernel_enclave.vault.differences import sketch_of
from kernel_enclave.vault.plan import DatasetFacts, SourceTable
from kernel_enclave.vault.protocol import PolicyViolation, VaultError
from tests.kernel_enclave.vault._released import assert_same_rows

FUNCS = ("count", "sum", "mean", "std", "var", "min", "max", "nunique", "median", "quantile")


def policy(k: int) -> dict[str, OutputPolicy]:
    return {
        "d": OutputPolicy(
            id="d", allow=frozenset(RELEASE_KINDS), min_group_size=k, never_release=frozenset(), sources=("d",)
        )
    }


def outcome(plan: dict[str, Any], sources: dict[str, SourceTable], k: int, sets: bool) -> tuple[Any, ...]:
    try:
        released = engine.release(plan, sources, policy(k), record_sets=sets)
    except (PolicyViolation, VaultError) as exc:
        return ("refused", type(exc).__name__, str(exc))
    assert released.table is not None
    found = sorted(
        (d, label, tuple(int(i) for i in ids), tuple(sorted(keys))) for d, label, ids, keys in released.record_sets
    )
    return ("released", released.table.to_pylist(), released.withheld, found)


def same(direct: tuple[Any, ...], general: tuple[Any, ...]) -> None:
    assert direct[0] == general[0], (direct, general)
    if direct[0] == "refused":
        assert direct == general
        return
    assert direct[2:] == general[2:]  # withheld cells and record sets
    assert_same_rows(direct[1], general[1])


def table(rng: np.random.Generator, n: int) -> dict[str, SourceTable]:
    x = rng.normal(size=n).round(int(rng.choice([0, 1, 6])))
    xs = [None if rng.random() < 0.05 else float("nan") if rng.random() < 0.03 else float(v) for v in x]
    columns = {
        "g": pa.array([("a", "b", "c", None)[i] for i in rng.choice(4, n, p=[0.5, 0.3, 0.15, 0.05])], pa.string()),
        "x": pa.array([-0.0 if v == 0 else v for v in xs], pa.float64()),
        "i": pa.array(rng.integers(0, int(rng.choice([2, 5, 1000])), n), pa.int64()),
        "f": pa.array(rng.random(n) < rng.choice([0.01, 0.5, 0.97])),
        "cost": pa.array(np.arange(n, dtype=float)),
    }
    return {"t": SourceTable.from_dataset("d", pa.table(columns))}


def request(rng: np.random.Generator, n: int) -> dict[str, Any]:
    source: dict[str, Any] = {"node": "source", "handle": "t"}
    columns = ["x", "i", "f"]
    if rng.random() < 0.4:  # a mask: one kept by a predicate, the rest null, a literal, or a data-derived constant
        pick = {"fn": "lt", "args": [{"col": "cost"}, {"lit": float(rng.integers(0, max(n, 1)))}]}
        fills = [{"lit": None}, {"lit": 0.0}, {"fn": "mul", "args": [{"col": "i"}, {"lit": 0}]}]
        fill = fills[int(rng.integers(0, 3))]
        source = {
            "node": "assign",
            "input": source,
            "columns": [["m", {"fn": "where", "args": [pick, {"col": "x"}, fill]}]],
        }
        columns.append("m")
    if rng.random() < 0.15:
        return {"node": "describe", "input": source, "columns": [c for c in columns if c != "f"]}
    aggs: list[dict[str, Any]] = []
    for j in range(int(rng.integers(1, 5))):
        func, column = str(rng.choice(FUNCS)), str(rng.choice(columns))
        spec: dict[str, Any] = {"name": f"a{j}", "column": column, "func": func}
        if func == "quantile":
            spec["q"] = float(rng.choice([0.0, 0.1, 0.25, 0.5, 0.9, 1.0, rng.random()]))
        aggs.append(spec)
    if rng.random() < 0.2:
        aggs.append({"name": "n", "column": None, "func": "count"})
    return {"node": "aggregate", "input": source, "by": [] if rng.random() < 0.3 else ["g"], "aggs": aggs}


def both_routes(plan: dict[str, Any], sources: dict[str, SourceTable], k: int, sets: bool) -> None:
    direct = outcome(plan, sources, k, sets)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "_direct_route", lambda frame: False)
        general = outcome(plan, sources, k, sets)
    same(direct, general)


@pytest.mark.parametrize("seed", range(4))
def test_both_routes_release_the_same_numbers_cells_and_record_sets(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(40):
        n = int(rng.choice([0, 1, 5, 30, 200, 1500]))
        sources = table(rng, n)
        both_routes(request(rng, n), sources, int(rng.choice([1, 3, 5, 10])), bool(rng.random() < 0.5))


def test_large_groups_bracketed_from_a_sample_give_exact_blocks() -> None:
    """Groups past the sort and partition sizes: the block found inside a sample's bracket is the exact block."""
    rng = np.random.default_rng(7)
    n = 3 * engine._NUMPY_BELOW
    columns = {
        "g": pa.array(rng.choice(["a", "b"], n)),
        "tied": pa.array(rng.integers(0, 40, n).astype(float)),  # long runs of ties across block edges
        "smooth": pa.array(rng.lognormal(10, 1, n)),
    }
    sources = {"t": SourceTable.from_dataset("d", pa.table(columns))}
    quantiles = [(f"{c}{i}", c, q) for c in ("tied", "smooth") for i, q in enumerate((0.0, 0.25, 0.5, 0.9, 1.0))]
    aggs = [{"name": name, "column": c, "func": "quantile", "q": q} for name, c, q in quantiles]
    for by in ([], ["g"]):
        plan = {"node": "aggregate", "input": {"node": "source", "handle": "t"}, "by": by, "aggs": aggs}
        for sets in (False, True):
            both_routes(plan, sources, 10, sets)
    # And against the rule computed directly: the mean of the sorted values' block of k holding rank round(q(n-1)).
    released = engine.release(
        {"node": "aggregate", "input": {"node": "source", "handle": "t"}, "by": [], "aggs": aggs}, sources, policy(10)
    )
    assert released.table is not None
    for name, column, q in quantiles:
        ordered = np.sort(np.asarray(columns[column]))
        block = min(round(q * (n - 1)) // 10, n // 10 - 1)
        end = n if block == n // 10 - 1 else (block + 1) * 10
        expected = float(ordered[block * 10 : end].mean())
        assert released.table.column(name)[0].as_py() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("by", [[], ["g"]])
def test_a_bracket_that_misses_its_block_is_selected_exactly(by: list[str]) -> None:
    """A sample's bracket is checked, never assumed: when it misses the block (improbable), the block is selected
    exactly instead, with the same numbers and record sets as when every bracket holds."""
    rng = np.random.default_rng(5)
    n = 3 * engine._NUMPY_BELOW
    columns = {
        "g": pa.array(rng.choice(["a", "b"], n)),
        "tied": pa.array(rng.integers(0, 40, n).astype(float)),
        "smooth": pa.array([None if rng.random() < 0.1 else v for v in rng.lognormal(10, 1, n)], pa.float64()),
    }
    sources = {"t": SourceTable.from_dataset("d", pa.table(columns))}
    aggs = [
        {"name": f"{c}{i}", "column": c, "func": "quantile", "q": q}
        for c in ("tied", "smooth")
        for i, q in enumerate((0.0, 0.5, 0.9))
    ]
    plan = {"node": "aggregate", "input": {"node": "source", "handle": "t"}, "by": by, "aggs": aggs}
    held = outcome(plan, sources, 10, True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine._Sample, "block", lambda self, start, end, want_ids: None)
        missed = outcome(plan, sources, 10, True)
    assert held[0] == "released"
    same(missed, held)  # the same blocks; their means to rounding (summed in another order)


def sketches_and_sets(plan: dict[str, Any], sources: dict[str, SourceTable], k: int) -> tuple[Any, Any, Any] | None:
    """The same release asked for sketches (with the sets it lists beside them: its order statistics' blocks) and
    for listed record sets, or None where it is refused."""
    try:
        sketched = engine.release(plan, sources, policy(k), record_sets=True, sketches=True)
    except (PolicyViolation, VaultError):
        with pytest.raises((PolicyViolation, VaultError)):  # refused alike when its sets are listed
            engine.release(plan, sources, policy(k), record_sets=True)
        return None
    listed = engine.release(plan, sources, policy(k), record_sets=True)
    assert sketched.table is not None and listed.table is not None
    same(
        ("released", sketched.table.to_pylist(), sketched.withheld),
        ("released", listed.table.to_pylist(), listed.withheld),
    )
    return sketched.sketches, listed.record_sets, sketched.record_sets


@pytest.mark.parametrize("seed", range(4))
def test_sketches_describe_the_record_sets_the_release_lists(seed: int) -> None:
    """Each sketch is its listed set's size and weight sum, under the same label and keys (a set two numbers share
    is listed once, under the first number's label, and may be sketched once per column); the blocks of order
    statistics listed beside the sketches are the listed release's sets under the same labels."""
    rng = np.random.default_rng(100 + seed)
    sketched_releases = mixed_releases = 0
    for _ in range(40):
        n = int(rng.choice([0, 1, 5, 30, 200, 1500]))
        sources = table(rng, n)
        plan = (
            request(rng, n)
            if rng.random() < 0.8
            else {"node": "value_counts", "input": {"node": "source", "handle": "t"}, "column": "i", "dropna": True}
        )
        found = sketches_and_sets(plan, sources, int(rng.choice([1, 3, 5, 10])))
        if found is None or found[0] is None:
            continue
        sketched_releases += 1
        sketches, listed, beside = found
        mixed_releases += bool(beside)
        bits = next(iter(sources["t"].weights.values()))[1]
        by_label = {label: (ids.size, sketch_of(ids, bits), keys) for _, label, ids, keys in listed}
        shapes = {(ids.size, sketch_of(ids, bits)) for _, _, ids, _ in listed}
        for sketch in sketches:
            assert sketch.bits == bits
            if sketch.label in by_label:
                assert (sketch.size, sketch.total) == by_label[sketch.label][:2], sketch.label
                assert sketch.keys <= by_label[sketch.label][2] | {k for s in sketches for k in s.keys}
            else:
                assert (sketch.size, sketch.total) in shapes, sketch.label
        by_ids = {(label, tuple(ids.tolist())) for _, label, ids, _ in listed}
        shapes_listed = {tuple(ids.tolist()) for _, _, ids, _ in listed}
        for _, label, ids, _ in beside:  # a block, listed under its label (or as a set another number has)
            assert (label, tuple(ids.tolist())) in by_ids or tuple(ids.tolist()) in shapes_listed, label
        besides = {label for _, label, _, _ in beside}
        assert {label for _, label, _, _ in listed} <= {sketch.label for sketch in sketches} | besides
    assert sketched_releases >= 10  # most of these releases are sketched: the comparison is not vacuous
    assert mixed_releases >= 3  # and some have order statistics, whose blocks are listed beside the sketches


def joined_tables(rng: np.random.Generator, n: int) -> dict[str, SourceTable]:
    """People and their accounts, one account per person at most (a join meets each record once), some unmatched."""
    people = {
        "id": pa.array(np.arange(n), pa.int64()),
        "g": pa.array([("a", "b", "c")[i] for i in rng.choice(3, n, p=[0.6, 0.3, 0.1])], pa.string()),
        "x": pa.array([None if rng.random() < 0.1 else float(v) for v in rng.integers(0, 4, n)], pa.float64()),
    }
    holders = rng.permutation(n)[: int(0.8 * n)]
    accounts = {
        "id": pa.array(holders, pa.int64()),
        "balance": pa.array(rng.normal(size=holders.size), pa.float64()),
        "kind": pa.array([("s", "c")[i] for i in rng.integers(0, 2, holders.size)], pa.string()),
    }
    return {
        "p": SourceTable.from_dataset("d", pa.table(people)),
        "q": SourceTable.from_dataset("e", pa.table(accounts)),
    }


def joined_request(rng: np.random.Generator) -> dict[str, Any]:
    joined: dict[str, Any] = {
        "node": "join",
        "left": {"node": "source", "handle": "p"},
        "right": {"node": "source", "handle": "q"},
        "on": ["id"],
        "how": str(rng.choice(["inner", "left"])),
    }
    if rng.random() < 0.5:  # a mask: balances of one kind only
        kept = {"fn": "eq", "args": [{"col": "kind"}, {"lit": "s"}]}
        where = {"fn": "where", "args": [kept, {"col": "balance"}, {"lit": None}]}
        joined = {"node": "assign", "input": joined, "columns": [["balance", where]]}
    aggs = [{"name": "b", "column": "balance", "func": str(rng.choice(["mean", "sum", "count", "std"]))}]
    if rng.random() < 0.5:
        aggs.append({"name": "n", "column": None, "func": "count"})
    if rng.random() < 0.5:
        aggs.append({"name": "x", "column": "x", "func": str(rng.choice(["mean", "sum", "max"]))})
    return {"node": "aggregate", "input": joined, "by": [] if rng.random() < 0.3 else ["g"], "aggs": aggs}


@pytest.mark.parametrize("seed", range(3))
def test_sketches_of_a_join_describe_the_record_sets_it_lists(seed: int) -> None:
    """After a join that meets each record once, each dataset's sets are sketched from its own weights."""
    rng = np.random.default_rng(200 + seed)
    policies = {
        name: OutputPolicy(
            id=name, allow=frozenset(RELEASE_KINDS), min_group_size=5, never_release=frozenset(), sources=(name,)
        )
        for name in ("d", "e")
    }
    sketched_releases = 0
    for _ in range(15):
        sources = joined_tables(rng, int(rng.choice([40, 300, 2000])))
        bits = {
            table.records[0][0]: next(iter(table.weights.values()))[1] for table in sources.values() if table.records
        }
        plan = joined_request(rng)
        try:
            sketched = engine.release(plan, sources, policies, record_sets=True, sketches=True)
        except (PolicyViolation, VaultError):
            continue
        listed = engine.release(plan, sources, policies, record_sets=True)
        assert sketched.table is not None and listed.table is not None
        same(
            ("released", sketched.table.to_pylist(), sketched.withheld),
            ("released", listed.table.to_pylist(), listed.withheld),
        )
        if sketched.sketches is None:
            continue
        sketched_releases += 1
        shapes = {(d, ids.size, sketch_of(ids, bits[d])) for d, _, ids, _ in listed.record_sets}
        by_label = {(d, label): (ids.size, sketch_of(ids, bits[d])) for d, label, ids, _ in listed.record_sets}
        for sketch in sketched.sketches:
            assert sketch.bits == bits[sketch.dataset]
            if (sketch.dataset, sketch.label) in by_label:
                assert (sketch.size, sketch.total) == by_label[(sketch.dataset, sketch.label)], sketch.label
            else:
                assert (sketch.dataset, sketch.size, sketch.total) in shapes, sketch.label
        assert {(d, label) for d, label, _, _ in listed.record_sets} <= {
            (s.dataset, s.label) for s in sketched.sketches
        }
    assert sketched_releases >= 5


@pytest.mark.parametrize("repeats", [1, 2])
def test_no_value_held_k_times_is_decided_exactly_where_hash_bins_crowd(repeats: int) -> None:
    """With k = 2 many bins hold two pairs by chance: the pairs in them are counted by their whole hash instead, so
    distinct values are still found held once, and one value held twice in a group is still found."""
    rng = np.random.default_rng(11)
    values = rng.permutation(200_000).astype(float)
    if repeats == 2:
        values[1] = values[0]  # one value held by two records of group 0
    groups = np.zeros(values.size, dtype=np.int64)
    groups[values.size // 2 :] = 1
    table = pl.DataFrame({"k0": groups, "v0": values})
    spec = engine._Input("v0", floating=True, masked=False)
    slots_crowd = np.bincount(
        (
            table.select(pl.col("v0").hash(engine._SCREEN_SEED) ^ pl.col("k0").hash(engine._SCREEN_SEED + 1))
            .to_series()
            .to_numpy()
            >> np.uint64(64 - 19)
        ).astype(np.intp)
    ).max()
    assert slots_crowd >= 2  # the bins alone would not settle it
    assert engine._none_held_k_times(table, ["k0"], spec, 2, "aggregate", []) is (repeats == 1)


def scanned(sources: dict[str, SourceTable]) -> dict[str, SourceTable]:
    """The same datasets as scanned ones (Polars' streaming engine, rows numbered and weighted as they stream)."""
    twins = {}
    for handle, source in sources.items():
        visible = source.data.select(source.columns).collect()
        assert source.records is not None
        dataset = source.records[0][0]
        schema = visible.to_arrow().schema
        twins[handle] = SourceTable.from_scan(dataset, visible.lazy(), schema, rows=visible.height)
    return twins


@pytest.mark.parametrize("seed", range(3))
def test_a_scanned_dataset_sketches_the_record_sets_its_in_memory_twin_lists(seed: int) -> None:
    """A scanned dataset's releases go the streaming route: the same tables, and each sketch is that of the set the
    in-memory dataset lists under the same label (record ids are positions in both)."""
    rng = np.random.default_rng(300 + seed)
    sketched_releases = 0
    for _ in range(30):
        n = int(rng.choice([0, 5, 200, 1500]))
        sources = table(rng, n)
        twins = scanned(sources)
        assert twins["t"].streaming and twins["t"].weights
        plan = request(rng, n)
        if rng.random() < 0.7:  # order statistics and describe list their sets by design: fewer of them
            for spec in plan.get("aggs", []):
                if spec["func"] in ("median", "quantile"):
                    spec["func"] = "mean"
                    spec.pop("q", None)
        k = int(rng.choice([3, 5, 10]))
        found = sketches_and_sets(plan, twins, k)
        in_memory = outcome(plan, sources, k, True)
        if found is None:
            assert in_memory[0] == "refused"
            continue
        same(in_memory, outcome(plan, twins, k, True))
        sketches, listed, beside = found
        if sketches is None:
            continue
        assert not beside  # a scanned release lists its order statistics' blocks with every other set
        sketched_releases += 1
        bits = next(iter(twins["t"].weights.values()))[1]
        by_label = {label: (ids.size, sketch_of(ids, bits)) for _, label, ids, _ in listed}
        shapes = set(by_label.values())
        for sketch in sketches:
            assert (sketch.size, sketch.total) == by_label.get(sketch.label, (sketch.size, sketch.total))
            assert (sketch.size, sketch.total) in shapes, sketch.label
        assert {label for _, label, _, _ in listed} <= {sketch.label for sketch in sketches}
    assert sketched_releases >= 5


def test_a_value_k_records_share_is_found_in_a_scanned_group_and_its_sets_listed() -> None:
    """The values k records of the whole dataset share are counted per group: where a group holds one k times its
    sets leave those records out and are listed; where the dataset does but no group does, they are sketched."""
    k = 5
    values = np.concatenate([np.arange(100, 600, dtype=float), [7.0] * 8])  # 7.0: held by 8 records, 4 a group
    groups = np.array(["a"] * 250 + ["b"] * 250 + ["a"] * 4 + ["b"] * 4)
    for extra, listed_expected in (([], False), ([7.0], True)):  # one more 7.0 in group "a": held 5 times there
        columns = {
            "g": pa.array(list(groups) + ["a"] * len(extra)),
            "x": pa.array(list(values) + extra, pa.float64()),
        }
        sources = scanned({"t": SourceTable.from_dataset("d", pa.table(columns))})
        plan = {
            "node": "aggregate",
            "input": {"node": "source", "handle": "t"},
            "by": ["g"],
            "aggs": [{"name": "m", "column": "x", "func": "mean"}],
        }
        found = sketches_and_sets(plan, sources, k)
        assert found is not None
        sketches, listed, _ = found
        assert (sketches is None) is listed_expected
        if listed_expected:  # the group's records holding 7.0 are not in its set
            group_a = next(ids for _, label, ids, _ in listed if "'a'" in label)
            assert group_a.size == 250 + 4 + 1 - 5


@pytest.mark.parametrize(
    ("often", "per_group", "crowd", "listed_expected", "second_pass"),
    [
        (6, 4, 0, False, False),  # a value a bin: no group holds one k times, decided as the scan streams
        (6, 4, 1, True, False),  # one value held k times in group "a": its sets are listed
        (40, 4, 0, False, True),  # several values a bin crowd the bins past k: counted per value, none held k times
        (1, 4, 252, True, False),  # 256 rows of one value in a group: its packed bin carries, its rows decide
    ],
)
def test_a_scan_counts_the_values_k_records_hold_in_bins_as_it_streams(
    often: int, per_group: int, crowd: int, listed_expected: bool, second_pass: bool
) -> None:
    """On a scanned dataset the rows holding the values k records of the dataset hold are counted per group, in
    bins of those values packed into one sum, within the release's own pass: the release's numbers, withheld cells
    and record sets are its in-memory twin's, and a second pass over the dataset runs only where the bins crowd."""
    k = 5
    rng = np.random.default_rng(often + crowd)
    shared = [1000.5 + i for i in range(often)]  # each held by per_group records of both groups: 2 * per_group >= k
    values = [float(v) for v in range(600)] + shared * per_group * 2 + [shared[0]] * crowd
    groups = ["a"] * 300 + ["b"] * 300 + (["a"] * often + ["b"] * often) * per_group + ["a"] * crowd
    order = rng.permutation(len(values))
    columns = {
        "g": pa.array([groups[i] for i in order]),
        "x": pa.array([values[i] for i in order], pa.float64()),
    }
    in_memory = {"t": SourceTable.from_dataset("d", pa.table(columns))}
    sources = scanned(in_memory)
    plan = {
        "node": "aggregate",
        "input": {"node": "source", "handle": "t"},
        "by": ["g"],
        "aggs": [{"name": "m", "column": "x", "func": "mean"}, {"name": "n", "column": "x", "func": "count"}],
    }
    passes = []
    counted_per_value = engine._per_group_of_values

    def counting(*args: Any) -> Any:
        passes.append(args)
        return counted_per_value(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "_per_group_of_values", counting)
        found = sketches_and_sets(plan, sources, k)
    assert found is not None
    sketches, listed, _ = found
    assert (sketches is None) is listed_expected
    assert bool(passes) is second_pass or listed_expected
    same(outcome(plan, in_memory, k, True), outcome(plan, sources, k, True))
    if sketches is not None:
        bits = next(iter(sources["t"].weights.values()))[1]
        by_label = {label: (ids.size, sketch_of(ids, bits)) for _, label, ids, _ in listed}
        for sketch in sketches:  # each sketch is its listed set's (a set two numbers share is listed once)
            assert (sketch.size, sketch.total) in set(by_label.values()), sketch.label
            assert (sketch.size, sketch.total) == by_label.get(sketch.label, (sketch.size, sketch.total))
    else:  # the records holding group a's most common value are left out of its mean's set
        mean_a = next(ids for _, label, ids, _ in listed if "'a'" in label and "m" in label)
        assert mean_a.size == 300 + often * per_group + crowd - (per_group + crowd)


@settings(max_examples=80, deadline=None)
@given(
    held=st.lists(st.integers(-50, 50), min_size=1, max_size=45, unique=True),
    rows=st.lists(st.one_of(st.none(), st.integers(-60, 60)), max_size=80),
    kind=st.sampled_from(["Int64", "Float64", "String", "Categorical", "Boolean"]),
)
def test_the_bins_of_the_values_k_records_hold_are_compared_or_looked_up_alike(
    held: list[int], rows: list[int | None], kind: str
) -> None:
    """A row's field in the packed bins: value i of the held values adds 1 to bin i % 8, others 0. Up to 32 held
    values are compared one by one, more are looked up; both give the lookup's fields, for every type of key."""

    def typed(values: list[Any]) -> pl.Series:
        if kind == "Boolean":
            return pl.Series([None if v is None else v % 2 == 0 for v in values], dtype=pl.Boolean)
        if kind in ("String", "Categorical"):
            strings = pl.Series([None if v is None else f"v{v}" for v in values], dtype=pl.String)
            return strings.cast(pl.Categorical) if kind == "Categorical" else strings
        return pl.Series(values, dtype=getattr(pl, kind))

    often = typed(held).unique(maintain_order=True).alias("value")
    frame = pl.DataFrame({"x": typed(rows)})
    fields = [1 << (engine._BIN_BITS * (i % engine._BINS)) for i in range(often.len())]
    looked_up = pl.col("x").replace_strict(often, fields, default=0, return_dtype=pl.UInt64).fill_null(0)
    expected = frame.select(looked_up).to_series().to_list()
    binned = frame.select(engine._often_binned(pl.col("x"), often).fill_null(0).cast(pl.UInt64)).to_series()
    assert binned.to_list() == expected
    compared = "replace_strict" not in str(engine._often_binned(pl.col("x"), often))
    assert compared is (often.len() <= engine._COMPARED_OFTEN)


@settings(max_examples=100, deadline=None)
@given(
    lists=st.lists(st.lists(st.one_of(st.none(), st.integers(-5, 5)), max_size=6), min_size=1, max_size=12),
    kind=st.sampled_from(["Int64", "UInt32", "Float64", "Boolean", "String"]),
    cut=st.integers(0, 3),
    chunks=st.booleans(),
)
def test_a_gathered_column_is_read_flat_as_exploding_it_reads_it(
    lists: list[list[int | None]], kind: str, cut: int, chunks: bool
) -> None:
    """Groups' gathered values are read from their Arrow buffers (no copy for numbers without nulls): the same values
    and group bounds as Polars' explode, with nulls (NaN for floats), empty lists, a sliced or chunked column."""
    dtype = {"Int64": pl.Int64, "UInt32": pl.UInt32, "Float64": pl.Float64, "Boolean": pl.Boolean, "String": pl.String}
    if kind == "UInt32":
        lists = [[None if v is None else abs(v) for v in one] for one in lists]

    def typed(one: list[int | None]) -> list[Any]:
        return [None if v is None else (v > 0 if kind == "Boolean" else str(v) if kind == "String" else v) for v in one]

    series = pl.Series("g", [typed(one) for one in lists], dtype=pl.List(dtype[kind]))
    if chunks and len(lists) > 1:
        half = len(lists) // 2
        series = series.slice(0, half).append(series.slice(half))
    series = series.slice(min(cut, len(lists) - 1))
    flat, bounds = engine._flat_lists(series)
    expected = series.explode(empty_as_null=False).to_numpy()
    assert bounds.tolist() == [0, *np.cumsum(series.list.len().to_numpy()).tolist()]
    assert flat.dtype == expected.dtype and len(flat) == len(expected)
    assert [None if isinstance(v, float) and np.isnan(v) else v for v in flat.tolist()] == [
        None if isinstance(v, float) and np.isnan(v) else v for v in expected.tolist()
    ]


@settings(max_examples=80, deadline=None)
@given(
    values=st.lists(
        st.one_of(st.none(), st.sampled_from([0.0, -0.0, 1.5, 2.0, -3.0]), st.floats(allow_nan=True, width=64)),
        max_size=60,
    ),
    times=st.integers(1, 6),
    as_int=st.booleans(),
)
def test_the_values_k_records_hold_are_found_alike_in_memory_and_streaming(
    values: list[float | None], times: int, as_int: bool
) -> None:
    """The load-time fact that decides whether a group may hold a value k times: a sort of the values in memory, a
    hash table over a scan; both must name the same values (-0.0 is 0.0, NaN falls back to the hash table)."""
    if as_int:
        values = [None if v is None or v != v or abs(v) > 2**40 else float(int(v)) for v in values]
    arrow = pa.array(
        [None if v is None else (int(v) if as_int else v) for v in values], pa.int64() if as_int else pa.float64()
    )
    facts = []
    every = []
    for streaming in (False, True):
        frame = pl.DataFrame({"x": arrow}).lazy()
        dataset = DatasetFacts(frame, streaming, len(values))
        found = dataset.held_often("x", times)
        assert found is not None
        facts.append(sorted(repr(v + 0.0) for v in found.to_list()))  # either zero may stand for both; NaN is NaN
        every.append(dataset.every_value_held_often("x", times))
    assert facts[0] == facts[1]
    counts: dict[float, int] = {}
    for v in values:
        if v is not None and v == v:
            counts[v + 0.0] = counts.get(v + 0.0, 0) + 1
    assert {v for v in facts[0] if v != "nan"} == {repr(v) for v, n in counts.items() if n >= times}
    # Every value held often (what lets a count skip restricting itself to them): known from the sort, never assumed
    has_nan = any(v is not None and v != v for v in values)
    assert every[0] == (not has_nan and bool(counts) and all(n >= times for n in counts.values()))
    assert not every[1]


def test_an_integer_column_s_facts_decide_for_its_floats_only_within_2_to_the_53() -> None:
    """describe reads integers as floats: 2**53 and 2**53 + 1 are then one value. Neither integer is held by k
    records, their float by 2k, so the mean's record set must leave those records out, as for a column whose
    integers are exact as floats the load-time fact of the integers decides it."""
    k = 5
    assert DatasetFacts(pl.LazyFrame({"x": [1, -(2**53), 2**53]}), False).floats_exact("x")
    assert not DatasetFacts(pl.LazyFrame({"x": [1, 2**53 + 1]}), False).floats_exact("x")
    assert not DatasetFacts(pl.LazyFrame({"x": [-(2**53) - 1, 1]}), False).floats_exact("x")
    for big, merged in ((2**53, 2**53 + 1), (7, 7)):
        values = [big] * 3 + [merged] * 3 + list(range(100, 130))
        sources = {"t": SourceTable.from_dataset("d", pa.table({"x": pa.array(values, pa.int64())}))}
        plan = {"node": "describe", "input": {"node": "source", "handle": "t"}, "columns": ["x"]}
        for sketches in (False, True):
            released = engine.release(plan, sources, policy(k), record_sets=True, sketches=sketches)
            sizes = [ids.size for _, _, ids, _ in released.record_sets]
            sizes += [sketch.size for sketch in released.sketches or ()]
            assert len(values) - 6 in sizes and len(values) not in sizes, (big, sketches, sizes)


def repeating_joined_tables(rng: np.random.Generator, n: int) -> dict[str, SourceTable]:
    """:func:`joined_tables` whose balances are often one value (a default), or few, so that the split of the values
    leaves groups open and the exact count decides them."""
    sources = joined_tables(rng, n)
    accounts = sources["q"].data.select(sources["q"].columns).collect()
    holders = accounts.height
    balance = np.round(rng.normal(size=holders), int(rng.choice([0, 1, 6])))
    balance[rng.random(holders) < rng.choice([0.0, 0.5, 0.9])] = 0.0
    accounts = accounts.with_columns(pl.Series("balance", balance))
    sources["q"] = SourceTable.from_dataset("e", accounts.to_arrow())
    return sources


@pytest.mark.parametrize("facts", ["found", "unknown"])
@pytest.mark.parametrize("seed", range(3))
def test_a_join_meeting_each_record_once_screens_the_most_common_value_rule_as_the_exact_count_decides(
    seed: int, facts: str
) -> None:
    """After a join that meets each record at most once, the most-common-value rule is screened by a split of the
    values per dataset; the same requests with the exact count per group release the same numbers, withhold the
    same cells and list (or sketch) the same record sets. Also where no load-time fact says which values k records
    hold (a column with too many of them): sketches then ask each group's largest value count in the same pass."""
    rng = np.random.default_rng(400 + seed)
    policies = {
        name: OutputPolicy(
            id=name, allow=frozenset(RELEASE_KINDS), min_group_size=5, never_release=frozenset(), sources=(name,)
        )
        for name in ("d", "e")
    }
    screened = {"split": 0, "opened": 0, "largest count": 0}
    counting = engine._split_screened
    deciding = engine._held_k_times

    def held_k_times(*args: Any, **kwargs: Any) -> bool:
        screened["largest count"] += any(name.endswith("_fmax") for name in args[3].columns)
        return deciding(*args, **kwargs)

    def split_screened(*args: Any, **kwargs: Any) -> set[str]:
        found = counting(*args, **kwargs)
        screened["split"] += bool(found)
        return found

    def outcome_of(plan: dict[str, Any], sources: dict[str, SourceTable], sets: bool) -> tuple[Any, ...]:
        try:
            released = engine.release(plan, sources, policies, record_sets=sets, sketches=sets)
        except (PolicyViolation, VaultError) as exc:
            return ("refused", type(exc).__name__, str(exc))
        assert released.table is not None
        listed = sorted((d, label, tuple(ids.tolist())) for d, label, ids, _ in released.record_sets)
        sketches = sorted((s.dataset, s.label, s.size, s.total) for s in released.sketches or ())
        return ("released", released.table.to_pylist(), (released.withheld, listed, sketches))

    exact_mode = engine._count_exprs
    opened: list[str] = []  # the counts asked for in one release (the exact fallback asks for "v0_nm")

    def count_exprs(frame: SourceTable, prefix: str, mask: Any, present_in: str = "r") -> Any:
        opened.append(prefix)
        return exact_mode(frame, prefix, mask, present_in)

    for _ in range(20):
        sources = repeating_joined_tables(rng, int(rng.choice([40, 300, 2000])))
        plan = joined_request(rng)
        if rng.random() < 0.5:  # a constant fill derived from the data: one value held by many records
            derived = {"fn": "mul", "args": [{"col": "balance"}, {"lit": 0}]}
            kept = {"fn": "eq", "args": [{"col": "kind"}, {"lit": "s"}]}
            filled = {"fn": "where", "args": [kept, {"col": "balance"}, derived]}
            plan["input"] = {"node": "assign", "input": plan["input"], "columns": [["balance", filled]]}
        sets = bool(rng.random() < 0.5)
        with pytest.MonkeyPatch.context() as patch:
            if facts == "unknown":
                patch.setattr(engine, "_held_often", lambda *args, **kwargs: None)
            patch.setattr(engine, "_split_screened", split_screened)
            patch.setattr(engine, "_held_k_times", held_k_times)
            opened.clear()
            patch.setattr(engine, "_count_exprs", count_exprs)
            fast = outcome_of(plan, sources, sets)
            screened["opened"] += any(prefix.endswith("_nm") for prefix in opened)
        with pytest.MonkeyPatch.context() as patch:
            if facts == "unknown":
                patch.setattr(engine, "_held_often", lambda *args, **kwargs: None)
            patch.setattr(engine, "_split_screened", lambda *args, **kwargs: set())
            exact = outcome_of(plan, sources, sets)
        same(fast[:2] if fast[0] == "released" else fast, exact[:2] if exact[0] == "released" else exact)
        if fast[0] == "released":
            assert fast[2] == exact[2]
    assert screened["split"] >= 5 and screened["opened"] >= 1  # both the bound and its exact fallback were reached
    if facts == "unknown":  # sketched releases asked each group's largest value count alongside the split
        assert screened["largest count"] >= 3


def unique_table(rng: np.random.Generator, k: int) -> dict[str, SourceTable]:
    """Groups of every size around k and 2k, and columns no two records share a value of: costs (one -0.0 among
    them, nulls beside), and integer ids read as floats by ``mean`` and ``describe``."""
    sizes = [1, k - 1, k, k + 1, 2 * k - 1, 2 * k, 2 * k + 1, 40]
    n = sum(sizes)
    cost = rng.permutation(n).astype(float) * 1.25 - 3.0
    cost[int(rng.integers(0, n))] = -0.0
    columns = {
        "g": pa.array(np.repeat([f"g{i}" for i in range(len(sizes))], sizes)[rng.permutation(n)], pa.string()),
        "cost": pa.array([None if rng.random() < 0.1 else float(v) for v in cost], pa.float64()),
        "id": pa.array(rng.permutation(n) * 7 - 50, pa.int64()),
        "when": pa.array(rng.random(n)),
    }
    return {"t": SourceTable.from_dataset("d", pa.table(columns))}


def unique_request(rng: np.random.Generator) -> dict[str, Any]:
    source: dict[str, Any] = {"node": "source", "handle": "t"}
    if rng.random() < 0.4:  # a filter, and a copy of a unique column: both keep the fact
        kept = {"fn": "lt", "args": [{"col": "when"}, {"lit": float(rng.choice([0.5, 0.9]))}]}
        source = {"node": "filter", "input": source, "predicate": kept}
        source = {"node": "assign", "input": source, "columns": [["copy", {"col": "cost"}]]}
    columns = ["cost", "id", "copy"] if source["node"] == "assign" else ["cost", "id"]
    if rng.random() < 0.2:
        return {"node": "describe", "input": source, "columns": [str(rng.choice(columns))]}
    aggs: list[dict[str, Any]] = []
    for j in range(int(rng.integers(1, 4))):
        func = str(rng.choice(["sum", "mean", "std", "var", "nunique", "median", "quantile", "count", "max"]))
        spec: dict[str, Any] = {"name": f"a{j}", "column": str(rng.choice(columns)), "func": func}
        if func == "quantile":
            spec["q"] = float(rng.choice([0.1, 0.5, 0.9]))
        aggs.append(spec)
    return {"node": "aggregate", "input": source, "by": [] if rng.random() < 0.2 else ["g"], "aggs": aggs}


@pytest.mark.parametrize("seed", range(3))
def test_a_column_no_two_records_share_needs_no_screen_of_its_most_common_value(seed: int) -> None:
    """Where a load-time fact says no two records of the dataset hold one value of a column, each group's most
    common value of it is held by one record: the most-common-value rule's count is the group's contributing
    records less one, with nothing screened or counted. The same requests with the fact ignored (screened, then
    counted exactly where the screen leaves a group open) release the same numbers, withhold the same cells and
    list or sketch the same record sets, over groups of every size on both sides of the rule."""
    rng = np.random.default_rng(900 + seed)
    decided = [0]
    held_once = engine._held_once

    def noted(*args: Any) -> bool:
        found = held_once(*args)
        decided[0] += found
        return found

    def outcome_of(plan: dict[str, Any], sources: dict[str, SourceTable], k: int, sets: bool) -> tuple[Any, ...]:
        try:
            released = engine.release(plan, sources, policy(k), record_sets=sets, sketches=sets and k > 1)
        except (PolicyViolation, VaultError) as exc:
            return ("refused", type(exc).__name__, str(exc))
        assert released.table is not None
        listed = sorted((d, label, tuple(ids.tolist())) for d, label, ids, _ in released.record_sets)
        sketches = sorted((s.dataset, s.label, s.size, s.total) for s in released.sketches or ())
        return ("released", released.table.to_pylist(), released.withheld, listed, sketches)

    for _ in range(25):
        k = int(rng.choice([2, 5, 10]))
        sources = unique_table(rng, k)
        plan, sets = unique_request(rng), bool(rng.random() < 0.6)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(engine, "_held_once", noted)
            fast = outcome_of(plan, sources, k, sets)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(engine, "_held_once", lambda *args: False)
            screened = outcome_of(plan, sources, k, sets)
        same(fast[:2] if fast[0] == "released" else fast, screened[:2] if screened[0] == "released" else screened)
        assert fast[2:] == screened[2:]
    assert decided[0] >= 10  # the fact decided the rule in many of the requests
