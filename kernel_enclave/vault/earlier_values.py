"""The rule on combinations across releases: no number combines with an earlier release's to rest on a few records.

Within one release, :mod:`.combinations` withholds numbers whose combination rests on 1 to k - 1 records. Across
releases the difference checks (:mod:`.differences`) compare record sets, not values: ``sum(t.age)`` in one request
and ``sum(cn.where(who, t.cost, t.age))`` in the next rest on the same records, so both pass, and their difference
is one patient's cost less their age. So the vault keeps, for each release of sums, means, counts, standard
deviations or variances, how to run it again (its plan over the same source tables under the same policies, as the
difference checks keep it) and whether one of those numbers reads a computed column. A later release over a
dataset they share is compared with each such earlier release where either of the two reads a computed column:
the earlier one is run again, gathering what each record adds to its released numbers (the later one gathered its
own where the rule on combinations searched them, else it is run again too), and
:func:`~kernel_enclave.vault.combinations.isolating_across` looks for a combination using numbers of both that
rests on 1 to k - 1 records. One is found: the later release is refused whole (``release.difference``). Two releases
over columns as loaded are left to the difference checks: such columns agree on few rows only by the data's own
doing, and where they do, the record sets say so. A regression counts as a release of the sums of its target (and
of its target times each feature, :func:`~kernel_enclave.vault.models.target_values`): its coefficients are those
sums. It is checked when it is fitted, before anything of it is released, and remembered for later releases.

For the datasets whose owners turned the difference checks on (``[release] difference_checks``), for the kernel's
lifetime, like them. What it costs: nothing for releases over columns as loaded with none remembered that read a
computed column; otherwise running every earlier one over its datasets again (and the release itself, where it
reads no computed column), and a search over their values. What it does not stop: three releases or more
(``A - B - C``, each pair apart), which the release limits bound and the differential-privacy mode covers.

Not thread-safe: the vault calls it under its request lock.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence, Set
from dataclasses import dataclass, replace

from kernel_enclave.vault import stoppable
from kernel_enclave.vault.combinations import RecordValues, isolating_across
from kernel_enclave.vault.protocol import PolicyViolation

RULE = "release.difference"
Values = Callable[[], Sequence[tuple[str, RecordValues]]]  # runs a release again, gathering its records' values


@dataclass(frozen=True)
class _Earlier:
    datasets: frozenset[str]
    reads_computed: bool
    values: Values
    fingerprint: Hashable
    label: str = "release"  # how a refusal names it: the vault's id of its result or model


@dataclass(frozen=True)
class Checked:
    """A release that passed :meth:`EarlierValues.check`, to remember once it is released."""

    entry: _Earlier | None


class EarlierValues:
    """The releases a later release's numbers are combined with (see the module)."""

    def __init__(self) -> None:
        self._earlier: list[_Earlier] = []
        self._fingerprints: set[Hashable] = set()

    def __len__(self) -> int:
        return len(self._earlier)

    def check(
        self,
        datasets: Set[str],
        reads_computed: bool,
        values: Values,
        fingerprint: Hashable,
        min_group_size: Mapping[str, int],
        *,
        again: Values | None = None,
    ) -> Checked:
        """Refuse a release (raise :class:`PolicyViolation`) whose numbers combine with an earlier release's to rest
        on 1 to k - 1 records of a dataset in ``datasets`` (those it reads whose owners turned the checks on).
        ``values`` gives its records' values now; ``again`` (``values`` if not given) runs it again for them, which
        is what is kept for later releases (never the values themselves); ``fingerprint`` names its plan, tables and
        policies (the same question asked again is compared with nothing new)."""
        if not datasets:
            return Checked(None)
        entry = _Earlier(frozenset(datasets), reads_computed, values if again is None else again, fingerprint)
        if fingerprint in self._fingerprints:
            return Checked(None)
        compared = [
            earlier
            for earlier in self._earlier
            if (earlier.reads_computed or reads_computed) and earlier.datasets & entry.datasets
        ]
        if not compared:
            return Checked(entry)
        later = [(dataset, found) for dataset, found in values() if dataset in entry.datasets]
        for earlier in compared:
            stoppable.check()
            for dataset, theirs in earlier.values():
                for mine_dataset, mine in later:
                    k = min_group_size.get(dataset, 1)
                    if mine_dataset == dataset and isolating_across(mine, theirs, k):
                        raise PolicyViolation(
                            RULE,
                            [dataset],
                            f"release: with an earlier release ({earlier.label}), numbers of this result agree on "
                            f"all but fewer than {k} records of the dataset; their difference would describe those "
                            "records",
                        )
        return Checked(entry)

    def remember(self, checked: Checked, label: str = "release") -> None:
        """Keep a release that was let through, for the releases after it; ``label`` names it in their refusals."""
        if checked.entry is not None and checked.entry.fingerprint not in self._fingerprints:
            self._fingerprints.add(checked.entry.fingerprint)
            self._earlier.append(replace(checked.entry, label=label))
