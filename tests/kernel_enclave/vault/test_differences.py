"""The release memory: a number whose record set differs from an earlier one's by 1 to k - 1 records is refused.

Checked against a brute-force model (Python sets, every pair compared, a release's numbers also taken together) as
well as on the cases that matter: a difference of 0, 1, k - 1 and k records, sizes far apart, the groups of one
release added up, a refused release remembering nothing, several datasets.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroaring import BitMap

from kernel_enclave.vault.differences import (
    ALL_KEY,
    COUNT_KEY,
    MAX_SCREENED_K,
    RULE,
    Recipe,
    ReleaseMemory,
    Sketch,
    _apart,
    _bitmap32,
    _classes,
    sizes_of,
    sketch_of,
    weight_bits,
    weight_expression,
    weights_of,
)
from kernel_enclave.vault.protocol import PolicyViolation

K = 10


def ids(values: Iterable[int] | np.ndarray) -> np.ndarray:
    return np.unique(np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=np.int64))


def admit(memory: ReleaseMemory, *sets: tuple[str, np.ndarray], k: int = K, grouped: bool = False) -> None:
    memory.admit(
        [(dataset, f"number {i}", values) for i, (dataset, values) in enumerate(sets)],
        {"a": k, "b": k, "c": 1},
        grouped=grouped,
    )


def refused(memory: ReleaseMemory, *sets: tuple[str, np.ndarray], k: int = K, grouped: bool = False) -> PolicyViolation:
    with pytest.raises(PolicyViolation) as caught:
        admit(memory, *sets, k=k, grouped=grouped)
    return caught.value


EVERYONE = ids(range(1000, 5000))


@pytest.mark.parametrize(
    ("removed", "allowed"),
    [(0, True), (1, False), (K - 1, False), (K, True), (K + 1, True)],
)
def test_a_difference_of_1_to_k_minus_1_records_is_refused(removed: int, allowed: bool) -> None:
    memory = ReleaseMemory()
    admit(memory, ("a", EVERYONE))
    fewer = EVERYONE[removed:]  # "everyone but these"
    if allowed:
        admit(memory, ("a", fewer))
        assert memory.remembered("a") == (1 if removed == 0 else 2)  # an identical set is not kept twice
    else:
        violation = refused(memory, ("a", fewer))
        assert violation.rule == RULE and violation.datasets == ("a",)
        assert memory.remembered("a") == 1


def test_additions_and_swaps_count_like_removals() -> None:
    memory = ReleaseMemory()
    admit(memory, ("a", EVERYONE))
    refused(memory, ("a", ids([*EVERYONE, 7])))  # one more record
    swapped = EVERYONE.copy()
    swapped[17] = 999  # one record out, another in: the same size, a difference of 2
    refused(memory, ("a", ids(swapped)))
    far = ids([*EVERYONE[5:], *range(10**6, 10**6 + 4)])  # 5 out, 4 in, far apart in id: a difference of 9
    refused(memory, ("a", far))
    admit(memory, ("a", ids([*EVERYONE[5:], *range(10**6, 10**6 + 5)])))  # 5 out, 5 in: 10


def test_sizes_far_apart_are_released() -> None:
    memory = ReleaseMemory()
    admit(memory, ("a", EVERYONE))
    admit(memory, ("a", EVERYONE[:2000]), ("a", EVERYONE[2000:]))  # halves: each differs from the whole by 2000
    admit(memory, ("a", EVERYONE[:K]))  # a small group, far from everything else
    assert memory.remembered("a") == 4


def test_two_numbers_of_one_release_are_compared_too() -> None:
    memory = ReleaseMemory()
    violation = refused(memory, ("a", EVERYONE), ("a", EVERYONE[1:]))  # sum(cost) and sum(cost masked but one)
    assert violation.rule == RULE
    assert memory.remembered() == 0
    admit(memory, ("a", EVERYONE), ("a", EVERYONE))  # two statistics of one group: the same records
    assert memory.remembered("a") == 1


def test_a_refused_release_remembers_nothing() -> None:
    memory = ReleaseMemory()
    admit(memory, ("a", EVERYONE))
    first_half = EVERYONE[:2000]
    refused(memory, ("a", first_half), ("b", ids(range(50))), ("a", EVERYONE[3:]))
    assert memory.remembered() == 1
    # Had the refused release's other numbers been kept, these would now be refused.
    admit(memory, ("a", first_half[1:]), ("b", ids(range(49))))
    assert memory.remembered() == 3


def test_a_checked_release_counts_only_once_remembered() -> None:
    memory = ReleaseMemory()
    checked = memory.check([("a", "n", EVERYONE)], {"a": K})
    assert memory.remembered() == 0
    memory.check([("a", "n", EVERYONE[1:])], {"a": K})  # the first was never released: nothing to differ from
    with pytest.raises(RuntimeError):
        memory.remember(checked)  # checked against a memory that has moved on since
    later = memory.check([("a", "n", EVERYONE[1:])], {"a": K})
    memory.remember(later)
    assert memory.remembered("a") == 1
    refused(memory, ("a", EVERYONE))


def test_datasets_are_separate_and_use_their_own_k() -> None:
    memory = ReleaseMemory()
    admit(memory, ("a", EVERYONE), ("b", EVERYONE))
    refused(memory, ("b", EVERYONE[1:]))  # b's record 1000 is not a's record 1000, but b remembers its own set
    admit(memory, ("c", EVERYONE), ("c", EVERYONE[1:]))  # k = 1: nothing to protect
    memory.admit([("a", "n", EVERYONE[4:])], {"a": 4})  # a's owner asks for 4: a difference of 4 is enough
    violation = refused(memory, ("a", EVERYONE[2:]), ("b", EVERYONE[3:]))
    assert violation.datasets == ("a",)


def test_a_dataset_without_a_policy_is_refused() -> None:
    memory = ReleaseMemory()
    with pytest.raises(PolicyViolation) as caught:
        memory.admit([("unknown", "n", EVERYONE)], {"a": K})
    assert caught.value.rule == RULE
    assert memory.remembered() == 0


def test_the_refusal_names_the_rule_and_the_number_never_a_record() -> None:
    memory = ReleaseMemory()
    secret = 4_242_424
    admit(memory, ("a", ids([*EVERYONE, secret])))
    memory_before = memory.memory_bytes()
    with pytest.raises(PolicyViolation) as caught:
        memory.admit([("a", "sum of cost", EVERYONE)], {"a": K})
    text = str(caught.value)
    assert "fewer than 10 records" in text and RULE in text
    assert "sum of cost" not in text  # a label can hold a group's key: a data value the refusal must not quote
    assert str(secret) not in text and "1 record" not in text
    assert memory.memory_bytes() == memory_before


def test_record_ids_above_32_bits_and_widening_ranges() -> None:
    memory = ReleaseMemory()
    admit(memory, ("a", ids(range(20))))  # small ids first: the signature's ranges are narrow
    refused(memory, ("a", ids([*range(19), 2**20])))  # then far larger ones: the ranges widen, still exact
    admit(memory, ("a", ids(range(40))))
    big = ids([*range(39), 2**40])
    refused(memory, ("a", big))  # 64-bit record ids
    admit(memory, ("a", ids([*range(30), *range(2**40, 2**40 + 10)])))
    refused(memory, ("a", ids(range(1, 20))))
    assert memory.remembered("a") == 3


def test_ids_must_be_sorted_unique_and_non_negative() -> None:
    memory = ReleaseMemory()
    for bad in (np.array([3, 1, 2]), np.array([1, 1, 2]), np.array([-1, 2]), np.array([[1, 2]])):
        with pytest.raises(ValueError, match="record ids"):
            memory.admit([("a", "n", bad)], {"a": K})
    assert memory.remembered() == 0


def test_memory_is_reported_and_runs_are_compact() -> None:
    memory = ReleaseMemory()
    assert memory.memory_bytes() == 0
    admit(memory, ("a", ids(range(1_000_000))))
    contiguous = memory.memory_bytes()
    admit(memory, ("a", ids(range(0, 1_000_000, 2))))
    assert memory.memory_bytes() - contiguous > 100_000  # every other record: bitsets, 8 KiB per 65,536 ids
    assert contiguous < 20_000  # one run per container, plus the signature arrays


sets_strategy = st.lists(
    st.lists(
        st.tuples(st.sampled_from(["a", "b"]), st.frozensets(st.integers(0, 40), max_size=30)),
        min_size=1,
        max_size=3,
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    releases=sets_strategy,
    k=st.integers(1, 6) | st.just(MAX_SCREENED_K + 1),  # above it, screened by sizes alone
    grouping=st.lists(st.booleans(), min_size=12, max_size=12),
)
def test_agrees_with_comparing_every_pair(
    releases: list[list[tuple[str, frozenset[int]]]], k: int, grouping: list[bool]
) -> None:
    memory = ReleaseMemory()
    remembered: dict[str, list[frozenset[int]]] = {"a": [], "b": []}
    for numbers, grouped in zip(releases, grouping, strict=False):
        staged = {name: list(sets) for name, sets in remembered.items()}
        distinct: dict[str, list[frozenset[int]]] = {}
        ok = True
        for dataset, records in numbers:
            if any(1 <= len(records ^ other) < k for other in staged[dataset]):
                ok = False
                break
            staged[dataset].append(records)
            if records not in distinct.setdefault(dataset, []):
                distinct[dataset].append(records)
        for dataset, members in distinct.items() if ok and grouped else ():
            union = frozenset().union(*members)
            if len(members) > 1 and any(1 <= len(union ^ other) < k for other in staged[dataset]):
                ok = False
            elif len(members) > 1:
                staged[dataset].append(union)
        sets = [(d, "n", np.array(sorted(r), dtype=np.int64)) for d, r in numbers]
        if ok:
            memory.admit(sets, {"a": k, "b": k}, grouped=grouped)
            remembered = staged
        else:
            with pytest.raises(PolicyViolation):
                memory.admit(sets, {"a": k, "b": k}, grouped=grouped)
        for dataset, kept in remembered.items():
            assert memory.remembered(dataset) == len(set(kept))


@settings(max_examples=150, deadline=None)
@given(
    blocks=st.lists(
        st.tuples(st.integers(0, 2**32 - 70_000), st.integers(1, 70_000), st.integers(1, 3)), min_size=0, max_size=4
    )
)
def test_bitmaps_written_in_the_portable_format_equal_pyroaring_s_own(blocks: list[tuple[int, int, int]]) -> None:
    """Runs, strides and scattered ids, across container boundaries, sparse (arrays) and dense (bitsets)."""
    values = np.unique(
        np.concatenate(
            [np.arange(start, start + length * step, step) for start, length, step in blocks] or [np.zeros(0, np.int64)]
        )
    ).astype(np.int64)
    values = values[values < 2**32]
    built = _bitmap32(values)
    assert built == BitMap(values.tolist())
    assert len(built) == values.size


def test_the_groups_of_one_release_added_up_are_compared_too() -> None:
    """Everyone, then the groups of everyone but one record: the groups together differ from everyone by one."""
    memory = ReleaseMemory()
    admit(memory, ("a", EVERYONE))
    but_one = EVERYONE[1:]
    women, men = but_one[::2], but_one[1::2]
    violation = refused(memory, ("a", women), ("a", men), grouped=True)
    assert "added up" in str(violation)
    assert memory.remembered("a") == 1
    admit(memory, ("a", EVERYONE[::2]), ("a", EVERYONE[1::2]), grouped=True)  # the groups of everyone: its union
    assert memory.remembered("a") == 3
    # Not grouped (the columns of a describe): the sets of several columns add up to nothing.
    admit(memory, ("a", but_one[: 2000 - 1]), ("a", but_one[2000 - 1 :]))


def test_the_union_of_a_grouped_release_is_remembered() -> None:
    """The other order: the groups first (their union is remembered), then everyone but one."""
    memory = ReleaseMemory()
    admit(memory, ("a", EVERYONE[::2]), ("a", EVERYONE[1::2]), grouped=True)
    assert memory.remembered("a") == 3
    refused(memory, ("a", EVERYONE[1:]))
    admit(memory, ("a", EVERYONE[K:]))


# -- comparison keys: only numbers that measure the same thing are compared -----------------------------------------

EVERYONE_BUT_THREE = ids(range(3, 1000))
ALL_OF_THEM = ids(range(1000))


def keyed(memory: ReleaseMemory, *sets: tuple[np.ndarray, frozenset[str]], grouped: bool = False) -> None:
    memory.admit([("a", f"number {i}", v, keys) for i, (v, keys) in enumerate(sets)], {"a": K}, grouped=grouped)


def test_numbers_of_different_columns_are_not_compared_and_of_one_column_are() -> None:
    memory = ReleaseMemory()
    keyed(memory, (ALL_OF_THEM, frozenset({"a:age"})))
    keyed(memory, (EVERYONE_BUT_THREE, frozenset({"a:cost"})))  # the twin: a mean of another column, released
    with pytest.raises(PolicyViolation, match="differ"):
        keyed(memory, (EVERYONE_BUT_THREE, frozenset({"a:age", "sum:a:age"})))  # the same column: three costs out
    with pytest.raises(PolicyViolation, match="differ"):  # and within one result
        keyed(ReleaseMemory(), (ALL_OF_THEM, frozenset({"count"})), (EVERYONE_BUT_THREE, frozenset({"count"})))


def test_a_set_without_keys_is_counted_but_compared_with_nothing() -> None:
    memory = ReleaseMemory()
    keyed(memory, (ALL_OF_THEM, frozenset({"a:amount"})), (EVERYONE_BUT_THREE, frozenset()))
    assert memory.remembered("a") == 1


def test_groups_of_a_sum_add_up_and_are_compared_with_the_columns_other_numbers() -> None:
    halves = (ids(range(500)), ids(range(500, 997)))  # two groups: everyone but three, added up
    memory = ReleaseMemory()
    keyed(memory, (ALL_OF_THEM, frozenset({"a:cost"})))  # a mean over everyone (its count is public)
    with pytest.raises(PolicyViolation, match="added up"):
        keyed(memory, *((half, frozenset({"a:cost", "sum:a:cost"})) for half in halves), grouped=True)
    # The twin: the means of the same two groups add up to no number over their union, so they are released.
    keyed(memory, *((half, frozenset({"a:cost"})) for half in halves), grouped=True)


# -- sketches: sets screened without their records, listed only when near another --------------------------------

BITS = 20  # the count width of a dataset of up to a million records: five classes


class Releases:
    """Releases given to the memory as sketches, each with a recipe that lists its sets again (and counts it)."""

    def __init__(self, memory: ReleaseMemory) -> None:
        self.memory = memory
        self.listings: list[str] = []

    def give(
        self,
        name: str,
        *sets: np.ndarray,
        keys: frozenset[str] = frozenset({"a:cost"}),
        grouped: bool = False,
        listed_as: list[np.ndarray] | None = None,
        fingerprint: object = None,
        beside: list[tuple[np.ndarray, frozenset[str]]] = [],  # noqa: B006 (never changed)
    ) -> None:
        """Release ``sets`` (disjoint groups when ``grouped``); ``listed_as``: what the recipe lists instead;
        ``beside``: sets the release lists beside its sketches (the blocks of order statistics), with their keys."""
        found = [("a", f"{name} {i}", values, keys) for i, values in enumerate(listed_as or sets)]
        listed = [("a", f"{name} block {i}", values, block_keys) for i, (values, block_keys) in enumerate(beside)]
        found += listed

        def again() -> list[Any]:
            self.listings.append(name)
            return found

        sketches = [
            Sketch("a", f"{name} {i}", int(v.size), sketch_of(v, BITS), keys, i, BITS) for i, v in enumerate(sets)
        ]
        recipe = Recipe(again, fingerprint if fingerprint is not None else name)
        checked = self.memory.check_release(sketches, listed, {"a"}, {"a": K}, grouped=grouped, recipe=recipe)
        self.memory.remember(checked)


def test_a_sketch_is_a_lower_bound_that_never_hides_a_near_set() -> None:
    """A set a few records from a sketched one is refused (both listed to compare); far sets list nothing."""
    memory = ReleaseMemory()
    releases = Releases(memory)
    releases.give("everyone", EVERYONE)
    releases.give("women", EVERYONE[::2])
    releases.give("men", EVERYONE[1::2])
    assert releases.listings == [] and memory.listed() == 0  # far apart: screened by their sketches alone
    with pytest.raises(PolicyViolation, match="differ"):
        releases.give("everyone but one", EVERYONE[1:])
    assert "everyone" in releases.listings and "everyone but one" in releases.listings
    assert memory.remembered() == 3
    releases.give("everyone but ten", EVERYONE[K:])  # a difference of k records: released
    assert memory.remembered() == 4


def test_asking_the_same_question_again_lists_nothing() -> None:
    memory = ReleaseMemory()
    releases = Releases(memory)
    sums = frozenset({"a:cost", "sum:a:cost"})  # sums by age: their groups add up to a number too
    releases.give("ages", EVERYONE[:2000], EVERYONE[2000:], keys=sums, grouped=True, fingerprint="plan 1")
    releases.give("ages", EVERYONE[:2000], EVERYONE[2000:], keys=sums, grouped=True, fingerprint="plan 1")
    assert releases.listings == []
    assert memory.remembered() == 3  # two groups and their union, once
    # The same records under another plan: listed to be sure they are the same, then not kept twice.
    releases.give("ages", EVERYONE[:2000], EVERYONE[2000:], keys=sums, grouped=True, fingerprint="plan 2")
    assert releases.listings and memory.remembered() == 3


def swapped(base: np.ndarray, count: int) -> np.ndarray:
    """``base`` with ``count`` records exchanged for others of the same classes: its size and sketch unchanged."""
    outside = ids(range(int(base[-1]) + 1, int(base[-1]) + 1 + 20 * count))
    out: list[int] = []
    into: list[int] = []
    for record in base.tolist():
        same_class = [
            r for r in outside.tolist() if r not in into and sketch_of(ids([r]), BITS) == sketch_of(ids([record]), BITS)
        ]
        out.append(record)
        into.append(same_class[0])
        if len(out) == count:
            break
    return ids(sorted(set(base.tolist()) - set(out) | set(into)))


def test_sets_listed_beside_sketches_are_compared_exactly_with_both_kinds() -> None:
    """A release of sketched numbers whose order statistics' blocks come listed beside them (a describe): each block
    is compared record by record with the remembered sets and with the release's own sketched ones."""
    memory = ReleaseMemory()
    releases = Releases(memory)
    cost = frozenset({"a:cost"})
    releases.give("everyone", EVERYONE)
    releases.give("described", EVERYONE[::2], beside=[(EVERYONE[100 : 100 + K], cost)])
    assert releases.listings == [] and memory.remembered() == 3 and memory.listed() == 1
    # A block two records from the earlier block: refused, and nothing of that release is remembered.
    with pytest.raises(PolicyViolation, match="differ"):
        releases.give("again", EVERYONE[1::2], beside=[(EVERYONE[101 : 101 + K], cost)])
    assert memory.remembered() == 3 and memory.listed() == 1
    # Its twin, a block k records away: released, the block listed and the number sketched.
    releases.give("again", EVERYONE[1::2], beside=[(EVERYONE[100 + K : 100 + 2 * K], cost)])
    assert releases.listings == [] and memory.remembered() == 5 and memory.listed() == 2
    # A block one record from a sketched number of its own release: compared exactly (the release listed again).
    small = EVERYONE[3000 : 3000 + K + 1]
    with pytest.raises(PolicyViolation, match="differ"):
        releases.give("own", small, beside=[(small[1:], cost)])
    assert "own" in releases.listings and memory.remembered() == 5
    # A grouped release whose block is compared under a key that adds up over groups is listed whole.
    releases.give(
        "by age",
        EVERYONE[:2000],
        EVERYONE[2000:],
        grouped=True,
        beside=[(EVERYONE[4000 : 4000 + K], frozenset({COUNT_KEY}))],
    )
    assert releases.listings[-1] == "by age"


def test_a_set_found_equal_to_another_release_s_is_a_repeat_when_asked_again() -> None:
    """A release whose set is the same as one another plan released (a value count's groups added up, and the count
    of everyone) is listed once to be sure, and not kept twice; asked again it lists nothing. A refused release
    teaches nothing of the kind: its sets are compared again."""
    memory = ReleaseMemory()
    releases = Releases(memory)
    releases.give("everyone", EVERYONE)
    releases.give("same records", EVERYONE, fingerprint="plan 2")
    assert sorted(releases.listings) == ["everyone", "same records"] and memory.remembered() == 1
    for _ in range(3):
        releases.give("same records", EVERYONE, fingerprint="plan 2")
    assert sorted(releases.listings) == ["everyone", "same records"] and memory.remembered() == 1
    with pytest.raises(PolicyViolation, match="differ"):  # the same set beside one a record away: refused whole
        releases.give("with one less", EVERYONE, EVERYONE[1:], fingerprint="plan 3")
    releases.give("women", EVERYONE[::2])  # another release remembered meanwhile
    listed_before = len(releases.listings)
    releases.give("with one less", EVERYONE, fingerprint="plan 3")
    assert len(releases.listings) > listed_before  # compared again: the refused release's equality was not kept


def twin(base: np.ndarray) -> np.ndarray:
    """Records outside ``base``, as many of each class as ``base`` holds: a disjoint set with the same sketch."""
    outside = iter(range(int(base[-1]) + 1, int(base[-1]) + 1 + 100 * base.size))
    chosen: list[int] = []
    for record in base.tolist():
        wanted = sketch_of(ids([record]), BITS)
        chosen.append(next(r for r in outside if sketch_of(ids([r]), BITS) == wanted))
    return ids(chosen)


def test_the_groups_of_one_release_are_not_near_each_other_even_when_their_sketches_are() -> None:
    """Two groups of one release share no record: sets of the same size and sketch in different groups differ by
    both sizes added up, and nothing is listed; the same two sets as numbers of one group are compared exactly."""
    memory = ReleaseMemory()
    releases = Releases(memory)
    first = EVERYONE[:100]
    second = twin(first)
    assert second.size == first.size and sketch_of(second, BITS) == sketch_of(first, BITS)
    assert not set(first.tolist()) & set(second.tolist())
    releases.give("by region", first, second, grouped=True)  # two groups
    assert releases.listings == [] and memory.remembered() == 2
    base = ids(range(10**6, 10**6 + 100))
    others = [ids(range(2 * 10**6 + 1000 * i, 2 * 10**6 + 1000 * i + 100 + 7 * i)) for i in range(8)]
    releases.give("by age", base, *others, twin(base), keys=frozenset({"a:y"}), grouped=True)  # screened together
    assert releases.listings == [] and memory.remembered() == 12
    # Had both been one group's (two numbers of it), the sketches could not tell them apart: listed, and released.
    checked = memory.check_release(
        [
            Sketch("a", f"one group {i}", int(v.size), sketch_of(v, BITS), frozenset({"a:x"}), 0, BITS)
            for i, v in enumerate((first, second))
        ],
        [],
        {"a"},
        {"a": K},
        recipe=Recipe(
            lambda: [("a", "one group 0", first, frozenset({"a:x"})), ("a", "one group 1", second, frozenset({"a:x"}))],
            "one group",
        ),
    )
    memory.remember(checked)
    assert memory.listed() == 2


def test_a_release_listed_once_is_recognised_when_asked_again() -> None:
    """A release whose sets had to be listed (near another by their sketches) keeps its plan's fingerprint with
    them: asking it again lists nothing, as for a release that was never listed."""
    memory = ReleaseMemory()
    releases = Releases(memory)
    releases.give("everyone", EVERYONE)
    other = swapped(EVERYONE, K)  # k records exchanged: the sketches cannot tell it from everyone, the records can
    assert other.size == EVERYONE.size and sketch_of(other, BITS) == sketch_of(EVERYONE, BITS)
    releases.give("ten exchanged", other, fingerprint="plan t")
    assert "ten exchanged" in releases.listings and memory.listed() == 2  # compared record by record: released
    listed_before = len(releases.listings)
    for _ in range(3):
        releases.give("ten exchanged", other, fingerprint="plan t")
    assert len(releases.listings) == listed_before and memory.remembered() == 2
    with pytest.raises(PolicyViolation, match="differ"):  # and a set near both is still refused
        releases.give("nine exchanged", swapped(EVERYONE, K - 1), fingerprint="plan n")


def test_a_set_that_cannot_be_listed_as_it_was_fails_closed() -> None:
    for listed_as in ([EVERYONE[3:]], None):
        memory = ReleaseMemory()
        releases = Releases(memory)
        releases.give("everyone", EVERYONE, listed_as=listed_as)  # remembered from its sketch alone
        if listed_as is None:  # a recipe that raises: the earlier records are unknown
            memory._entries(None)[0].recipe = Recipe(lambda: 1 / 0, "broken")  # type: ignore[misc]
        with pytest.raises(PolicyViolation, match="could not be listed again"):
            releases.give("everyone but two", EVERYONE[2:])
        assert memory.remembered() == 1


def test_the_groups_of_a_sketched_release_added_up_are_compared() -> None:
    memory = ReleaseMemory()
    releases = Releases(memory)
    releases.give("everyone", EVERYONE)
    but_one = EVERYONE[1:]
    with pytest.raises(PolicyViolation, match="added up"):
        releases.give("by sex", but_one[::2], but_one[1::2], keys=frozenset({"a:cost", "sum:a:cost"}), grouped=True)
    # The means of the two groups add up to nothing: released, and their union is not remembered.
    releases.give("means by sex", but_one[::2], but_one[1::2], grouped=True)
    assert memory.remembered() == 3


def bound(a: np.ndarray, b: np.ndarray, bits: int, k: int) -> int:
    """What the screen takes as the least difference of two listed sets, from their sizes and sketches."""
    sketches = [np.array([sketch_of(s, bits)], dtype=np.uint64) for s in (a, b)]
    return int(_apart(sketches[0], np.array([a.size]), sketches[1], np.array([b.size]), bits, k)[0])


# Sets small and scattered, or long runs whose class counts pass 256 (a digit's carry) and wrap the 64 bits.
record_sets = st.frozensets(st.integers(0, 2000), max_size=300) | st.builds(
    lambda start, length: frozenset(range(start, start + length)), st.integers(0, 2**40), st.integers(0, 40_000)
)


@settings(max_examples=300, deadline=None)
@given(
    first=record_sets,
    out=st.integers(0, 200),
    added=st.frozensets(st.integers(0, 2**41), max_size=150),
    k=st.integers(1, 300),
)
def test_the_bound_of_two_sketches_never_exceeds_a_difference_under_k(
    first: frozenset[int], out: int, added: frozenset[int], k: int
) -> None:
    """Whenever two sets are fewer than k records apart, the bound is at most their difference: a near pair is
    never ruled out (for any k; above 128 the bound is the sizes' difference)."""
    a = ids(sorted(first))
    b = ids(sorted((set(first) - set(sorted(first)[:out])) | set(added)))
    difference = len(set(a.tolist()) ^ set(b.tolist()))
    for bits in (width for width in (7, BITS, 31, 48) if max(a.size, b.size) < 1 << width):  # counts fit
        assert sizes_of(np.array([sketch_of(a, bits)], dtype=np.uint64).astype(np.int64), bits)[0] == a.size
        if difference < k:
            assert bound(a, b, bits, k) <= difference
        assert bound(a, b, bits, k) >= abs(a.size - b.size)


def test_the_bound_rules_out_sets_far_apart_and_keeps_those_close() -> None:
    """Pairs of the same size 8,000 records apart are ruled out (all but a few in 10,000 by chance); pairs up to
    127 records apart are read back exactly, so the bound is their difference when no class gains what another
    loses."""
    rng = np.random.default_rng(5)
    everyone = ids(range(1_000_000))
    base = everyone[:300_000]
    ruled_out = 0
    for _ in range(100):
        gone = rng.choice(base.size, 4_000, replace=False)
        kept = np.delete(base, gone)
        other = np.union1d(kept, rng.choice(everyone[300_000:], 4_000, replace=False))
        ruled_out += bound(base, other, BITS, K) >= K
    assert ruled_out == 100
    for removed in (1, 5, 9, 60, 127):
        assert bound(base, base[removed:], BITS, K) == removed
    assert bound(base, base[1:], BITS, 200) == 1  # a k above 128: the sizes alone


def test_weights_give_every_class_its_share() -> None:
    """About a fifth of the records in each class at a million records (a skewed hash would weaken the bound, never
    break it), four classes up to 4,000 million, and sets listed beyond 2**48 records."""
    counts = np.bincount(_classes(ids(range(300_000)), BITS).astype(np.intp))
    assert counts.size == 5 and all(abs(c - 60_000) < 1_500 for c in counts.tolist()), counts
    assert weight_bits(10**6) == BITS and weight_bits(2**32 - 1) == 32 and weight_bits(2**48) is None
    assert np.bincount(_classes(ids(range(1000)), 32).astype(np.intp)).size == 4


def test_a_sum_of_the_weight_column_in_polars_is_the_sketch() -> None:
    """Polars' sums wrap modulo 2**64, in a group-by, a select and the streaming engine alike: each is the sketch of
    its rows (and a Sketch takes a negative sum as the same number modulo 2**64)."""
    rows = 200_000
    bits = weight_bits(rows)
    assert bits is not None
    record = np.arange(rows, dtype=np.int64)
    frame = pl.DataFrame({"g": record % 3, "w": weights_of(record, bits)})
    grouped = frame.group_by("g").agg(pl.col("w").sum()).sort("g")
    streamed = frame.lazy().group_by("g").agg(pl.col("w").sum()).sort("g").collect(engine="streaming")
    assert streamed.equals(grouped)
    wholly = frame.lazy().select(pl.col("w").sum()).collect(engine="streaming").item()
    for g, total in grouped.iter_rows():
        group = record[record % 3 == g]
        assert Sketch("a", "n", group.size, total, frozenset(), 0, bits).total == sketch_of(group, bits)
    assert Sketch("a", "n", rows, wholly, frozenset(), 0, bits).total == sketch_of(record, bits)
    assert any(total < 0 for total in grouped.get_column("w").to_list()) or wholly < 0  # the sums did wrap


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    releases=sets_strategy,
    k=st.integers(1, 6) | st.just(MAX_SCREENED_K + 1),  # above it, screened by sizes alone
    grouping=st.lists(st.booleans(), min_size=12, max_size=12),
)
def test_sketched_releases_agree_with_listed_ones(
    releases: list[list[tuple[str, frozenset[int]]]], k: int, grouping: list[bool]
) -> None:
    """The same releases, once listed and once as sketches with recipes: the same refusals, the same memory."""
    listed_and_sketched_agree(releases, k, grouping)


# Releases of many numbers, whose sketches under one key are screened together rather than one by one.
many_sets_strategy = st.lists(
    st.lists(
        st.tuples(st.sampled_from(["a", "b"]), st.frozensets(st.integers(0, 60), max_size=25)),
        min_size=9,
        max_size=20,
    ),
    min_size=1,
    max_size=5,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(releases=many_sets_strategy, k=st.integers(1, 6), grouping=st.lists(st.booleans(), min_size=5, max_size=5))
def test_releases_of_many_sketched_numbers_agree_with_listed_ones(
    releases: list[list[tuple[str, frozenset[int]]]], k: int, grouping: list[bool]
) -> None:
    listed_and_sketched_agree(releases, k, grouping)


def listed_and_sketched_agree(releases: list[list[tuple[str, frozenset[int]]]], k: int, grouping: list[bool]) -> None:
    listed, sketched = ReleaseMemory(), ReleaseMemory()
    for n, (numbers, grouped) in enumerate(zip(releases, grouping, strict=False)):
        sets = [(d, f"n{i}", np.array(sorted(r), dtype=np.int64)) for i, (d, r) in enumerate(numbers)]
        # Sketches of one release add up to its union only for disjoint groups; else they share a group (listed).
        disjoint = all(not (a & b) for i, (_, a) in enumerate(numbers) for _, b in numbers[i + 1 :])
        sketches = [
            Sketch(d, label, int(v.size), sketch_of(v, 7), frozenset({ALL_KEY}), i if disjoint else 0, 7)
            for i, (d, label, v) in enumerate(sets)
        ]
        recipe = Recipe(lambda sets=sets: sets, n)
        outcomes = []
        for memory in (listed, sketched):
            try:
                if memory is listed:
                    checked = memory.check(sets, {"a": k, "b": k}, grouped=grouped)
                else:
                    checked = memory.check_release(
                        sketches, [], {"a", "b"}, {"a": k, "b": k}, grouped=grouped, recipe=recipe
                    )
                memory.remember(checked)
                outcomes.append("released")
            except PolicyViolation:
                outcomes.append("refused")
        assert outcomes[0] == outcomes[1]
        for dataset in ("a", "b"):
            assert listed.remembered(dataset) == sketched.remembered(dataset)


def test_a_listed_set_lists_a_sketched_one_only_when_their_sketches_are_near() -> None:
    """A release whose sets come listed (a join, a quantile) meets sketched ones: only a near one is listed again."""
    memory = ReleaseMemory()
    releases = Releases(memory)
    releases.give("women", EVERYONE[::2])
    releases.give("men", EVERYONE[1::2])  # the same size as the women
    memory.admit([("a", "middle", EVERYONE[1000:3000], frozenset({"a:cost"}))], {"a": K})  # same size, far apart
    assert releases.listings == []
    with pytest.raises(PolicyViolation, match="differ"):
        memory.admit([("a", "women but one", EVERYONE[::2][1:], frozenset({"a:cost"}))], {"a": K})
    assert releases.listings == ["women"]


@settings(max_examples=60, deadline=None)
@given(
    ids=st.lists(st.integers(0, 2**63 - 1), max_size=50) | st.just(list(range(5000))),
    rows=st.sampled_from([2, 1_000, 2**20, 2**31 - 1]),
)
def test_weights_made_by_polars_as_rows_stream_are_the_numpy_ones(ids: list[int], rows: int) -> None:
    """A dataset scanned without a reader that numbers its rows has its weights made by Polars from the row index;
    they must be exactly the weights NumPy gives the same ids (UInt64 arithmetic wraps alike in both)."""
    bits = weight_bits(rows)
    assert bits is not None
    values = np.asarray(ids, dtype=np.int64)
    made = pl.DataFrame({"id": values}).select(weight_expression(pl.col("id"), bits)).to_series().to_numpy()
    assert np.array_equal(made, weights_of(values, bits))


@pytest.fixture
def compared(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many pairs of listed sets are compared record by record (a one-item list, reset at will)."""
    from kernel_enclave.vault import differences

    counted = [0]
    exact = differences._difference

    def counting(a: Any, b: Any) -> int:
        counted[0] += 1
        return exact(a, b)

    monkeypatch.setattr(differences, "_difference", counting)
    return counted


def test_small_sets_are_compared_only_with_those_sharing_a_record(compared: list[int]) -> None:
    """Blocks of k records (an order statistic's) all have the same size: each new one is compared record by record
    only with the remembered blocks it shares a record with, and still refused when near one."""
    memory = ReleaseMemory()
    blocks = [ids(range(start, start + K)) for start in range(0, 500 * K, K)]
    admit(memory, *(("a", block) for block in blocks))
    assert memory.remembered("a") == len(blocks)
    compared[0] = 0
    admit(memory, ("a", ids(range(500 * K, 501 * K))))  # a new block sharing no record: compared with none
    assert compared[0] == 0
    near = ids([*range(3, K), *range(10**6, 10**6 + 3)])  # block 0 with three records exchanged
    assert "differ" in str(refused(memory, ("a", near)))
    assert compared[0] == 1
    straddling = ids(range(K // 2, K // 2 + K))  # half of block 0, half of block 1: k records from each
    admit(memory, ("a", straddling))
    assert compared[0] == 3
    # A refused release's sets leave the index too: a set near only the refused one is then released.
    assert "differ" in str(
        refused(memory, ("a", ids(range(10**7, 10**7 + K))), ("a", ids(range(10**7 + 1, 10**7 + K + 1))))
    )
    admit(memory, ("a", ids(range(10**7 + 2, 10**7 + K + 2))))


def test_the_blocks_of_a_release_asked_again_are_not_compared(compared: list[int]) -> None:
    """A release's small listed sets (the blocks of its quantiles) asked again by the same release are repeats: not
    compared record by record. The same blocks from another release are compared (and kept once), and a block of
    the same release a record away is still refused."""
    memory = ReleaseMemory()
    blocks = [("a", f"block {i}", ids(range(i * K, (i + 1) * K)), frozenset({"a:cost"})) for i in range(50)]

    def release(sets: list[Any], fingerprint: str) -> None:
        recipe = Recipe(lambda: sets, fingerprint)
        memory.remember(memory.check(sets, {"a": K}, rows={"a": 10_000}, recipe=recipe))

    release(blocks, "quantiles")
    compared[0] = 0
    for _ in range(3):
        release(blocks, "quantiles")
    assert compared[0] == 0 and memory.remembered("a") == len(blocks)
    release(blocks, "other quantiles")  # the same records from another plan: compared, found equal, kept once
    assert compared[0] == len(blocks) and memory.remembered("a") == len(blocks)
    moved = [*blocks[:-1], ("a", "block 49", ids(range(49 * K + 1, 50 * K + 1)), frozenset({"a:cost"}))]
    with pytest.raises(PolicyViolation, match="differ"):
        release(moved, "quantiles")  # the same release's label, other records: compared, and a record away
