"""A string column held coded releases exactly what it would release held as strings.

A dataset in memory keeps each string column that repeats its values as Polars categoricals (four bytes a row, group
keys hashed as numbers; :func:`kernel_enclave.vault.plan._repeated_strings_coded`). Which columns are coded depends
on the data, so nothing an analyst can see may depend on it: not a released number, key, type, withheld cell or
record set, and not whether a request fails or what its error says. These tests run the same requests over the same
tables loaded twice by the real engine, once with the coding switched off, and compare everything that comes back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa  # type: ignore[import-untyped]
import pytest

from confnb.policy.output import RELEASE_KINDS, OutputPolicy
from kernel_enclave.tee.simulated import SimulatedBackend
from kernel_enclave.vault import plan as plans
from kernel_enclave.vault import release as engine
from kernel_enclave.vault.keys import VaultKeys
from kernel_enclave.vault.plan import SourceTable
from kernel_enclave.vault.protocol import PolicyViolation, VaultError
from kernel_enclave.vault.vault import Vault
from tests.kernel_enclave.vault._released import assert_same_rows

FUNCS = ("count", "sum", "mean", "min", "max", "nunique", "median", "quantile")
WORDS = ("north", "south", "east", "west", "Ñorth", "")  # "" and a non-ASCII value sort and compare as strings


def policies(k: int) -> dict[str, OutputPolicy]:
    return {
        name: OutputPolicy(
            id=name, allow=frozenset(RELEASE_KINDS), min_group_size=k, never_release=frozenset(), sources=(name,)
        )
        for name in ("d", "e")
    }


def tables(rng: np.random.Generator, n: int) -> dict[str, pa.Table]:
    def words(count: int, values: int) -> pa.Array:
        chosen = rng.integers(0, values, count)
        return pa.array([None if rng.random() < 0.05 else WORDS[i] for i in chosen], pa.string())

    people = pa.table(
        {
            "g": words(n, int(rng.choice([2, 4, 6]))),
            "h": pa.array([f"kind-{i}" for i in rng.integers(0, 3, n)], pa.large_string()),
            "name": pa.array([f"person-{i}" for i in range(n)], pa.string()),  # distinct: never coded
            "x": pa.array(rng.normal(size=n).round(1)),
            "i": pa.array(rng.integers(0, 5, n)),
        }
    )
    repeats = int(rng.choice([1, 4]))  # each region once (its keys not coded) or four times (coded)
    regions = pa.table(
        {"g": pa.array(list(WORDS[:4]) * repeats, pa.string()), "rate": pa.array(np.arange(4.0 * repeats))}
    )
    return {"d": people, "e": regions}


def loaded(found: dict[str, pa.Table], coded: bool) -> dict[str, SourceTable]:
    with pytest.MonkeyPatch.context() as patch:
        if not coded:
            patch.setattr(plans, "_CODED_SHARE", 1 << 62)
        return {"t": SourceTable.from_dataset("d", found["d"]), "r": SourceTable.from_dataset("e", found["e"])}


def text_literal(rng: np.random.Generator) -> dict[str, Any]:
    return {"lit": str(rng.choice([*WORDS, "nowhere"]))}


def request(rng: np.random.Generator) -> dict[str, Any]:
    source: dict[str, Any] = {"node": "source", "handle": "t"}
    shape = rng.random()
    if shape < 0.5:  # a filter on the string column, in each form an analyst can write
        column = {"col": str(rng.choice(["g", "h"]))}
        predicates = [
            {"fn": "eq", "args": [column, text_literal(rng)]},
            {"fn": "ne", "args": [text_literal(rng), column]},
            {"fn": "lt", "args": [column, text_literal(rng)]},
            {"fn": "isin", "args": [column], "values": [str(rng.choice(WORDS)), None][: int(rng.integers(1, 3))]},
            {"fn": "isin", "args": [column], "values": [*WORDS, *(f"kind-{i}" for i in range(20))]},  # read as strings
            {"fn": "startswith", "args": [column], "prefix": str(rng.choice(["n", "s", "kind-1", ""]))},
            {"fn": "eq", "args": [{"fn": "upper", "args": [column]}, {"lit": "NORTH"}]},
            {"fn": "eq", "args": [column, {"col": "name"}]},
            {"fn": "eq", "args": [column, {"lit": 3}]},  # a type error, named alike
        ]
        predicate = predicates[int(rng.integers(0, len(predicates)))]
        if rng.random() < 0.3:  # or a flag column, counted and summed
            source = {"node": "assign", "input": source, "columns": [["i", predicate]]}
        else:
            source = {"node": "filter", "input": source, "predicate": predicate}
    elif shape < 0.65:  # a window over the string column
        over = {"fn": "over", "args": [{"col": "x"}], "func": str(rng.choice(["rank", "mean", "count"])), "by": ["g"]}
        source = {"node": "assign", "input": source, "columns": [["w", over]]}
        source = {"node": "filter", "input": source, "predicate": {"fn": "gt", "args": [{"col": "w"}, {"lit": 2}]}}
    elif shape < 0.8:  # a join on the string column (coded on both sides, or on one)
        right, how = {"node": "source", "handle": "r"}, str(rng.choice(["inner", "left"]))
        source = {"node": "join", "left": source, "right": right, "on": ["g"], "how": how}
    kind = rng.random()
    if kind < 0.2:
        return {"node": "value_counts", "input": source, "column": str(rng.choice(["g", "h"])), "dropna": True}
    if kind < 0.3:
        return {"node": "describe", "input": source, "columns": None}
    aggs: list[dict[str, Any]] = []
    for j in range(int(rng.integers(1, 4))):
        func, column = str(rng.choice(FUNCS)), str(rng.choice(["x", "i", "g", "h"]))
        spec: dict[str, Any] = {"name": f"a{j}", "column": column, "func": func}
        if func == "quantile":
            spec["q"] = float(rng.choice([0.1, 0.5, 0.9]))
        aggs.append(spec)
    by = [[], ["g"], ["h"], ["g", "h"]][int(rng.integers(0, 4))]
    return {"node": "aggregate", "input": source, "by": by, "aggs": aggs}


def outcome(plan: dict[str, Any], sources: dict[str, SourceTable], k: int, sketches: bool) -> tuple[Any, ...]:
    try:
        released = engine.release(plan, sources, policies(k), record_sets=True, sketches=sketches)
    except (PolicyViolation, VaultError) as exc:
        return ("refused", type(exc).__name__, str(exc))
    assert released.table is not None
    sets = sorted((d, label, ids.tolist(), sorted(keys)) for d, label, ids, keys in released.record_sets)
    sketched = sorted((s.dataset, s.label, s.size, s.total) for s in released.sketches or ())
    return ("released", released.table.schema, released.table.to_pylist(), released.withheld, sets, sketched)


def same(coded: tuple[Any, ...], plain: tuple[Any, ...]) -> None:
    assert coded[0] == plain[0], (coded, plain)
    if coded[0] == "refused":
        assert coded == plain
        return
    assert coded[1] == plain[1]  # the same Arrow types: a released key is a string either way
    assert coded[3:] == plain[3:]  # withheld cells, record sets, sketches
    assert_same_rows(coded[2], plain[2])


def test_repeated_strings_are_coded_and_distinct_ones_are_not() -> None:
    found = tables(np.random.default_rng(0), 400)
    coded, plain = loaded(found, True)["t"], loaded(found, False)["t"]
    assert isinstance(coded.dtype("g"), pl.Categorical) and isinstance(coded.dtype("h"), pl.Categorical)
    assert coded.dtype("name") == pl.String and plain.dtype("g") == pl.String
    # What a plan sees is the owner's schema either way
    assert plans.schema_of(coded) == plans.schema_of(plain)
    assert coded.table.equals(plain.table)


@pytest.mark.parametrize("seed", range(6))
def test_coded_and_plain_strings_release_the_same(seed: int) -> None:
    rng = np.random.default_rng(seed)
    released = refused = 0
    for _ in range(40):
        found = tables(rng, int(rng.choice([40, 300, 1200])))
        coded, plain = loaded(found, True), loaded(found, False)
        assert isinstance(coded["t"].dtype("h"), pl.Categorical)
        plan = request(rng)
        k, sketches = int(rng.choice([1, 3, 10])), bool(rng.random() < 0.5)
        mine = outcome(plan, coded, k, sketches)
        same(mine, outcome(plan, plain, k, sketches))
        released += mine[0] == "released"
        refused += mine[0] == "refused"
    assert released >= 10 and refused >= 1  # both outcomes were compared


def categories_known() -> int:
    """How many strings Polars' process-wide categories hold (they never shrink)."""
    return len(pl.Series([WORDS[0]]).cast(pl.Categorical).cat.get_categories())


def test_a_plans_strings_are_not_added_to_the_process_wide_categories() -> None:
    """Comparing a coded column with a plan's strings must not intern them: the categories never shrink, so an
    analyst sending fresh strings request after request would grow the vault without bound."""
    sources = loaded(tables(np.random.default_rng(1), 400), True)
    source = {"node": "source", "handle": "t"}
    fresh = [f"never-seen-{i}" for i in range(40)]
    before = categories_known()
    for predicate in (
        {"fn": "isin", "args": [{"col": "g"}], "values": fresh[:3]},  # compared on the codes
        {"fn": "isin", "args": [{"col": "g"}], "values": fresh},  # past the codes' limit: read as strings
        {"fn": "eq", "args": [{"col": "h"}, {"lit": fresh[5]}]},
        {"fn": "eq", "args": [{"lit": fresh[6]}, {"col": "h"}]},
    ):
        plan = {
            "node": "aggregate",
            "input": {"node": "filter", "input": source, "predicate": {"fn": "not", "args": [predicate]}},
            "by": [],
            "aggs": [{"name": "n", "column": None, "func": "count"}],
        }
        assert outcome(plan, sources, 1, False)[0] == "released"
    assert categories_known() == before


def test_an_analysts_upload_keeps_its_strings_plain(simulated_backend: SimulatedBackend) -> None:
    """An upload's strings are not coded: they would join the process-wide categories for the kernel's life, and
    an analyst can upload as often as they like. A dataset the vault opened is coded."""
    vault = Vault(backend=simulated_backend, keys=VaultKeys.generate())
    found = tables(np.random.default_rng(2), 400)
    policy = policies(10)["d"]
    uploaded = vault.add_table("mine", found["d"], policy)
    opened = vault.add_table("theirs", found["d"], policy, source="broker")
    assert vault._sources[uploaded].dtype("g") == pl.String
    assert isinstance(vault._sources[opened].dtype("g"), pl.Categorical)
