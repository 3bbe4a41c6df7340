"""The rule on combinations of a release's numbers, on vectors: planted combinations are found, data is not."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_enclave.vault.combinations import isolating, isolating_groups

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
