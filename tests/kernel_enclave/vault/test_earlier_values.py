"""The rule on combinations across releases, as the vault keeps it: which earlier releases are compared, and how."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from kernel_enclave.vault.combinations import RecordValues
from kernel_enclave.vault.earlier_values import EarlierValues
from kernel_enclave.vault.protocol import PolicyViolation

K = {"admissions": 10, "accounts": 10}
AGES = np.random.default_rng(3).integers(18, 95, 500).astype(float)


def _values(column: np.ndarray, dataset: str = "admissions") -> list[tuple[str, RecordValues]]:
    return [(dataset, RecordValues(np.arange(len(column)), np.zeros(len(column), dtype=np.int64), (column,)))]


def _crafted() -> np.ndarray:
    crafted = AGES.copy()
    crafted[42] = 7528.24
    return crafted


class _Runs:
    """A release's values, run again on demand, counting the runs."""

    def __init__(self, found: Sequence[tuple[str, RecordValues]]) -> None:
        self.found = found
        self.runs = 0

    def __call__(self) -> Sequence[tuple[str, RecordValues]]:
        self.runs += 1
        return self.found


def _remembered(memory: EarlierValues, runs: _Runs, computed: bool, key: str, datasets: set[str] | None = None) -> None:
    memory.remember(memory.check(datasets or {"admissions"}, computed, runs, key, K), f"result {key}")


def test_a_computed_number_agreeing_with_an_earlier_one_but_on_one_record_is_refused() -> None:
    memory = EarlierValues()
    ages = _Runs(_values(AGES))
    _remembered(memory, ages, False, "ages")
    crafted = _Runs(_values(_crafted()))
    with pytest.raises(PolicyViolation) as caught:
        memory.check({"admissions"}, True, crafted, "crafted", K)
    assert caught.value.rule == "release.difference" and caught.value.datasets == ("admissions",)
    assert "7528" not in str(caught.value) and "with an earlier release (result ages)" in str(caught.value)
    assert (ages.runs, crafted.runs) == (1, 1)
    # A derived column that is an exact function of the age everywhere passes, and is remembered.
    _remembered(memory, _Runs(_values(2 * AGES + 1)), True, "linear")
    assert len(memory) == 2


def test_two_releases_over_columns_as_loaded_are_not_run_again() -> None:
    memory = EarlierValues()
    ages = _Runs(_values(AGES))
    _remembered(memory, ages, False, "ages")
    stays = _Runs(_values(_crafted()))  # (values that would be found, were they compared)
    _remembered(memory, stays, False, "stays")
    assert (ages.runs, stays.runs) == (0, 0) and len(memory) == 2


def test_the_same_release_again_is_compared_with_nothing_and_kept_once() -> None:
    memory = EarlierValues()
    crafted = _Runs(_values(_crafted()))
    _remembered(memory, crafted, True, "crafted")
    _remembered(memory, crafted, True, "crafted")
    assert crafted.runs == 0 and len(memory) == 1


def test_releases_over_other_datasets_or_without_the_checks_are_not_compared() -> None:
    memory = EarlierValues()
    ages = _Runs(_values(AGES))
    _remembered(memory, ages, False, "ages")
    accounts = _Runs(_values(_crafted(), "accounts"))
    _remembered(memory, accounts, True, "accounts", {"accounts"})
    unchecked = memory.check(set(), True, _Runs(_values(_crafted())), "unchecked", K)  # the owner turned them off
    memory.remember(unchecked)
    assert (ages.runs, accounts.runs) == (0, 0) and len(memory) == 2


def test_a_refused_release_is_not_remembered() -> None:
    """The caller remembers only what it released; what the check refused is compared with nothing later."""
    memory = EarlierValues()
    _remembered(memory, _Runs(_values(AGES)), False, "ages")
    with pytest.raises(PolicyViolation):
        memory.check({"admissions"}, True, _Runs(_values(_crafted())), "crafted", K)
    assert len(memory) == 1


def test_what_is_kept_is_how_to_run_a_release_again_not_its_values() -> None:
    """A release hands its values over for its own check and how to run it again for later ones: the memory keeps
    the second (a million records' values per release would not stay in the vault's memory)."""
    memory = EarlierValues()
    _remembered(memory, _Runs(_values(AGES)), False, "ages")
    now, again = _Runs(_values(2 * AGES + 1)), _Runs(_values(2 * AGES + 1))
    memory.remember(memory.check({"admissions"}, True, now, "linear", K, again=again), "result linear")
    assert (now.runs, again.runs) == (1, 0)
    memory.check({"admissions"}, False, _Runs(_values(AGES + 7)), "later", K)  # plain: compared with "linear" only
    assert (now.runs, again.runs) == (1, 1)
