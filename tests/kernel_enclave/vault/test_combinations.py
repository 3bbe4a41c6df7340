"""The rule on combinations of a release's numbers, on vectors: planted combinations are found, data is not."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_enclave.vault.combinations import RecordValues, isolating, isolating_across, isolating_groups

K = 10


def _data(rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "ones": np.ones(rows),
        "age": rng.integers(18, 95, rows).astype(float),
        "cost": np.round(rng.normal(7000, 2000, rows), 2),
        "stay": rng.gamma(2.0, 2.5, rows),
    }


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(K + 4, 600),
    seed=st.integers(0, 2**32 - 1),
    planted=st.integers(1, K - 1),
    scale=st.floats(1e-3, 1e3),
)
def test_a_sum_that_differs_from_another_on_fewer_than_k_rows_is_found(
    rows: int, seed: int, planted: int, scale: float
) -> None:
    data = _data(rows, seed)
    rng = np.random.default_rng(seed + 1)
    crafted = data["age"].copy()
    at = rng.choice(rows, planted, replace=False)
    crafted[at] = data["cost"][at] * scale
    found = isolating([crafted, data["age"], data["stay"], data["ones"]], K)
    assert found[:2].all()  # the two agreeing numbers
    assert not found[2]  # stay takes no part (the ones may: the crafted rows of a mean are counted too)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(K, 600), seed=st.integers(0, 2**32 - 1), squares=st.booleans())
def test_the_numbers_of_data_in_general_position_are_never_withheld(rows: int, seed: int, squares: bool) -> None:
    data = _data(rows, seed)
    vectors = [data["ones"], data["age"], data["cost"], data["stay"]]
    if squares:
        vectors += [data["cost"] ** 2, data["stay"] ** 2]
    assert not isolating(vectors, K).any()


def test_a_number_dominated_by_a_few_rows_to_within_rounding_is_withheld_alone() -> None:
    """A sum whose rows but a few add up to less than a millionth of its size is those few rows' sum, to rounding;
    the plain column beside it is then released."""
    data = _data(4000, 6)
    crafted = data["age"].copy()
    crafted[:3] = data["cost"][:3] * 1e7
    assert isolating([crafted, data["age"], data["ones"]], K).tolist() == [True, False, False]


def test_an_expression_that_agrees_with_a_column_on_many_rows_differs_on_enough() -> None:
    data = _data(4000, 1)
    older = np.where(data["age"] > 50, data["cost"], data["age"])
    assert not isolating([older, data["age"], data["ones"]], K).any()
    # On exactly k rows it is a number over k records: released; on k - 1 rows it is not.
    for rows, withheld in ((K, False), (K - 1, True)):
        crafted = data["age"].copy()
        crafted[:rows] = data["cost"][:rows]
        assert isolating([crafted, data["age"]], K).all() == withheld


def test_a_combination_of_three_numbers_with_an_offset_is_found() -> None:
    """``sum(where(who, 2 * cost + 1, age + 3))``, ``sum(age)`` and the count: the offset is the count's."""
    data = _data(2000, 2)
    crafted = data["age"] + 3
    crafted[7] = 2 * data["cost"][7] + 1
    found = isolating([crafted, data["age"], data["ones"], data["stay"]], K)
    assert found.tolist() == [True, True, True, False]


def test_a_near_combination_is_found_where_rounding_decides_and_not_beyond() -> None:
    data = _data(4000, 3)
    for noise, withheld in ((1e-9, True), (1e-3, False)):
        crafted = data["age"] + noise * data["stay"]
        crafted[11] = data["cost"][11]
        assert isolating([crafted, data["age"]], K).all() == withheld


def test_a_group_no_larger_than_its_numbers_allow_is_left_alone() -> None:
    """With as many numbers as rows but k - 1, some combination vanishes on the others whatever the data: its
    coefficients are the data's, unknown to the analyst. A planted one among more rows is still found."""
    data = _data(K + 2, 4)
    assert not isolating([data["ones"], data["age"], data["cost"], data["stay"]], K).any()
    crafted = data["age"].copy()
    crafted[0] = data["cost"][0]
    assert isolating([crafted, data["age"]], K).all()


def test_zero_and_non_finite_vectors_and_tiny_groups() -> None:
    assert isolating([], K).tolist() == []
    assert isolating([np.zeros(50), np.ones(50)], K).tolist() == [False, False]
    assert isolating([np.array([1.0])], K).tolist() == [False]
    ones = np.ones(100)
    spike = np.zeros(100)
    spike[3] = np.inf  # a sum that is infinite says so itself; as a vector it is empty
    assert isolating([spike, ones], K).tolist() == [False, False]
    assert isolating([ones, ones], 1).tolist() == [False, False]  # k = 1 withholds nothing


@pytest.mark.parametrize("rows", [2_000, 200_000])
def test_the_vectors_are_not_changed(rows: int) -> None:
    data = _data(rows, 5)
    before = {name: vector.copy() for name, vector in data.items()}
    isolating(list(data.values()), K)
    for name, vector in data.items():
        np.testing.assert_array_equal(vector, before[name])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), groups=st.integers(1, 12), planted_in=st.integers(-1, 11))
def test_many_groups_at_once_find_what_each_group_alone_finds(seed: int, groups: int, planted_in: int) -> None:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(K, 300, groups)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    data = _data(int(bounds[-1]), seed)
    crafted = data["age"].copy()
    if 0 <= planted_in < groups:
        crafted[bounds[planted_in] + int(rng.integers(0, sizes[planted_in]))] = 7528.24
    columns = [crafted, data["age"], data["stay"], data["ones"]]
    alone = np.zeros(len(columns), dtype=bool)
    for g in range(groups):
        alone |= isolating([c[bounds[g] : bounds[g + 1]] for c in columns], K)
    together = isolating_groups(columns, bounds, K)
    assert together.tolist() == alone.tolist()
    assert together[:2].all() == (0 <= planted_in < groups)


def test_values_near_the_float_range_neither_overflow_nor_hide_a_combination() -> None:
    data = _data(3000, 7)
    huge = data["cost"] * 1e300
    crafted = huge.copy()
    crafted[5] = 0.0
    assert isolating([huge, data["ones"]], K).tolist() == [False, False]
    assert isolating([crafted, huge], K).all()
    bounds = np.array([0, 1000, 2000, 3000] + [3000 + 20 * i for i in range(1, 20)])
    wide = [np.concatenate([v, v[: bounds[-1] - 3000]]) for v in (crafted, huge)]
    assert isolating_groups(wide, bounds, K).all()


def _categories(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each record's diagnosis (6), sex (2) and age: records of one category repeat a pattern of indicators."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 6, rows), rng.integers(0, 2, rows), rng.integers(18, 95, rows).astype(float)


def test_records_repeating_a_pattern_do_not_settle_the_search() -> None:
    """Per category, an indicator and a sum: the draws of rank - 1 records fall on records of one category that
    span less than the draw needs, and settle nothing; the search goes on and finds the planted record."""
    diagnosis, sex, age = _categories(4000, 11)
    crafted = age.copy()
    crafted[123] = 7528.24
    vectors = []
    for d in range(6):
        vectors += [(diagnosis == d).astype(float), np.where(diagnosis == d, crafted, 0.0)]
    for s in range(2):
        vectors += [(sex == s).astype(float), np.where(sex == s, age, 0.0)]
    found = isolating(vectors, K)
    assert found[1::2].all()  # every sum takes part (their totals differ on one record), no indicator need
    plain = [np.where(diagnosis == d, age, 0.0) for d in range(6)] + vectors[12:]
    assert not isolating(plain, K).any()  # the same sums over the age itself: every combination rests on 0 or many


def test_many_groups_of_records_repeating_a_pattern_find_the_planted_one() -> None:
    """The same structure in 20 groups at once (screened together, then searched alone): the planted group is
    found, and the same sums over the age itself are not."""
    diagnosis, sex, age = _categories(20 * 300, 16)
    diagnosis %= 3
    crafted = age.copy()
    crafted[7 * 300 + 45] = 7528.24
    vectors = []
    for d in range(3):
        vectors += [(diagnosis == d).astype(float), np.where(diagnosis == d, crafted, 0.0)]
    vectors += [np.where(sex == s, age, 0.0) for s in range(2)]  # of full rank: screened together first
    bounds = np.arange(0, 20 * 300 + 1, 300)
    assert isolating_groups(vectors, bounds, K)[1::2].all()
    plain = [np.where(diagnosis == j // 2, age, 0.0) if j % 2 else v for j, v in enumerate(vectors[:6])]
    assert not isolating_groups(plain + vectors[6:], bounds, K).any()


def _values(records: np.ndarray, groups: np.ndarray, *columns: np.ndarray) -> RecordValues:
    return RecordValues(records.astype(np.int64), groups.astype(np.int64), tuple(c.astype(float) for c in columns))


@pytest.mark.parametrize("later_groups", ["none", "sex", "diagnosis"])
@pytest.mark.parametrize("earlier_groups", ["none", "sex"])
def test_a_number_agreeing_with_an_earlier_release_on_all_records_but_one_is_found(
    later_groups: str, earlier_groups: str
) -> None:
    diagnosis, sex, age = _categories(3000, 12)
    crafted = age.copy()
    crafted[77] = 7528.24
    ids = np.arange(3000)
    grouping = {"none": np.zeros(3000, dtype=np.int64), "sex": sex, "diagnosis": diagnosis}
    earlier = _values(ids, grouping[earlier_groups], age)
    assert isolating_across(_values(ids, grouping[later_groups], crafted), earlier, K)
    assert not isolating_across(_values(ids, grouping[later_groups], 2 * age + 1), earlier, K)  # no record apart
    spread = np.where(age > 50, crafted + 1000.0, age)  # differs on hundreds of records
    assert not isolating_across(_values(ids, grouping[later_groups], spread), earlier, K)


def test_each_group_may_take_its_own_coefficient() -> None:
    """``where(who, cost, age * diagnosis_code)`` by diagnosis against ``sum(age)`` by sex: the sums by diagnosis
    divided by their codes add up to the ages but for the target. One coefficient per number and release would not
    see it; one per group does."""
    diagnosis, sex, age = _categories(3000, 13)
    ids = np.arange(3000)
    scaled = age * (diagnosis + 1)
    scaled[5] = 7528.24
    earlier = _values(ids, sex, age)
    assert isolating_across(_values(ids, diagnosis, scaled), earlier, K)


def test_records_apart_are_compared_where_the_values_say_so() -> None:
    """Sets made to differ (zeros on some records in one release, those records left out of the other): their
    values still agree on all but the target's. Records that one release holds and the other does not, with values
    there, leave no combination on few records."""
    _, _, age = _categories(2000, 14)
    ids = np.arange(2000)
    zeroed = np.where(ids < 50, 0.0, age)
    crafted = age.copy()
    crafted[1500] = 7528.24
    later = _values(ids[50:], np.zeros(1950), crafted[50:])
    assert isolating_across(later, _values(ids, np.zeros(2000), zeroed), K)
    assert not isolating_across(later, _values(ids, np.zeros(2000), age), K)  # the 50 ages stand in between
    half = _values(ids[:1000], np.zeros(1000), crafted[:1000])  # the other half's ages stand outside
    assert not isolating_across(half, _values(ids, np.zeros(2000), age), K)


def test_a_pair_of_k_records_apart_is_not_found_and_k_minus_one_is() -> None:
    _, _, age = _categories(500, 15)
    ids = np.arange(500)
    earlier = _values(ids, np.zeros(500), age)
    for apart, found in ((K - 1, True), (K, False)):
        crafted = age.copy()
        crafted[:apart] += np.arange(1, apart + 1) * 13.0
        assert isolating_across(_values(ids, np.zeros(500), crafted), earlier, K) is found


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(12 * K, 600), planted=st.integers(1, K - 1))
def test_planted_pairs_are_found_and_releases_of_other_columns_are_not(seed: int, rows: int, planted: int) -> None:
    data = _data(rows, seed)
    rng = np.random.default_rng(seed + 2)
    crafted = data["age"].copy()
    at = rng.choice(rows, planted, replace=False)
    crafted[at] = data["cost"][at]
    ids = np.sort(rng.choice(10 * rows, rows, replace=False))
    groups = rng.integers(0, 3, rows)
    earlier = _values(ids, groups, data["age"], data["ones"])
    assert isolating_across(_values(ids, groups, crafted), earlier, K)
    assert not isolating_across(_values(ids, groups, data["cost"], data["stay"]), earlier, K)


def test_a_record_in_several_groups_of_one_release_is_followed_through_each() -> None:
    """After a join a record's rows can fall into several groups (a patient with stays in two wards): it is listed
    once per group, and its groups are linked through it. The planted record is found; the plain twin is not."""
    diagnosis, sex, age = _categories(1200, 17)
    ids = np.arange(1200)
    twice = ids[ids % 5 == 0]  # every fifth record also has rows in a second ward, adding half its age there
    records = np.sort(np.concatenate([ids, twice]))
    first = np.searchsorted(records, records) == np.arange(len(records))  # the first entry of each record
    ward = np.where(first, diagnosis[records] % 3, 3)
    crafted = age.copy()
    crafted[601] = 7528.24
    later = np.where(first, crafted[records], crafted[records] / 2)
    plain = np.where(first, age[records], age[records] / 2)
    earlier = _values(ids, sex, age)
    assert isolating_across(_values(records, ward, later), earlier, K)
    assert not isolating_across(_values(records, ward, plain), earlier, K)
    assert isolating_across(earlier, _values(records, ward, later), K)  # either release may be the later one
