"""Difference checks: no two released numbers may be computed from record sets that differ by only a few records.

``min_group_size`` protects one release: every released number comes from at least k records. Two releases can
still be subtracted: ``sum(cost)`` over everyone, then ``sum(cost)`` over everyone but one patient, and the
difference is that patient's cost. Google Ads Data Hub closes this with difference checks, and so does the vault:
for the kernel's lifetime it remembers, per dataset, the set of source records behind each number it released, and
refuses a release when one of its numbers' record sets differs from a remembered one (or from another number of
the same release) by between 1 and k - 1 records, where k is that dataset's ``min_group_size``. Identical sets are
fine (asking the same question twice reveals nothing new), and so is a difference of k or more records: the
difference of the two numbers is then itself a number over at least k records.

What is compared: only numbers that could be subtracted to isolate records. A difference describes the records
between two sets only when both numbers measure the same thing, so each number carries comparison keys, and two
numbers are compared when they share one: every dataset column its value derives from (``sum(cost)`` with any other
number computed from ``cost``, also through ``cost * 2`` or ``cost + age``), and ``count`` for the numbers that count
records (row counts, counts of a column, value counts, distinct counts, statistics of a flag). So a group's
``count(age)`` and ``mean(cost)`` may rest on record sets a few records apart (a few costs missing) without either
being refused, while ``sum(cost)`` over everyone and ``sum(cost)`` over everyone but one patient are. A caller
that gives no keys puts every set under one key (all compared).

The groups of a release added up are a number too (for counts and sums; a sum's keys appear twice, once with the
prefix ``sum:`` under which its groups' union is compared): the groups of ``sum(cost)`` by sex over everyone but one
patient add up to the sum over everyone but that patient, and ``sum(cost)`` over everyone minus the groups released
by age is the sum over the ages withheld as too small. So the union of a grouped release's record sets (per
dataset and comparison key, when it has more than one) is checked and remembered like the sets of its numbers. The
union covers every statistic under its key at once, so it is a little stricter than one union per statistic.

What this does not stop: numbers under different keys that an analyst makes measure the same thing (a sum of a
0/1 expression computed from a column, against a count over a filter on it: one bit per pair), other combinations
of three or more numbers (``A - B - C`` where each pair, and each
release taken whole, differs by k or more; some of a release's groups added up), and reconstruction from many
overlapping releases. The release limits (``max_releases``) bound how many releases an analyst can draw, and the
differential-privacy mode bounds what they reveal.

The sets are kept as Roaring bitmaps (pyroaring): two bytes per record where records are sparse, one bit per record
id of the dataset where they are dense, a few bytes per run of consecutive records. A new set is compared only with
the remembered sets that could be close to it, in two steps that are each a lower bound of the symmetric difference
|A Δ B|:

1. its size: |A Δ B| ≥ ||A| - |B||, so only sets whose size is within k - 1 of the new one's are looked at;
2. a signature, the number of records in each of 64 fixed ranges of record ids: every record in A Δ B changes one
   range's count by one, so |A Δ B| ≥ Σ |countᴬ - countᴮ| (equal to it when one set contains the other, the
   usual shape of an attack: "everyone" and "everyone but X").

Both are NumPy operations over all remembered sets at once; only the sets left after them are compared exactly
(``symmetric_difference_cardinality``). Record ids are the vault's hidden per-dataset row numbers, stable for the
kernel's lifetime (see :mod:`kernel_enclave.vault.plan`).

The memory is not thread-safe: the vault calls it under its request lock.
"""

from __future__ import annotations

import array
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from pyroaring import BitMap, BitMap64

from kernel_enclave.vault import stoppable
from kernel_enclave.vault.protocol import PolicyViolation

RULE = "release.difference"
# (dataset, label of the released number, sorted unique ids[, comparison keys]); see "What is compared" above
RecordSet = tuple[str, str, npt.NDArray[np.int64]] | tuple[str, str, npt.NDArray[np.int64], frozenset[str]]
COUNT_KEY = "count"  # counts of records (row counts, counts of a column, value counts, sums of flags)
SUM_PREFIX = "sum:"  # before a column key: the sums of that column, whose groups add up
ALL_KEY = ""  # the key of a record set given without keys: compared with every other such set

SIGNATURE_RANGES = 64  # ranges of record ids per signature: a power of two, so coarsening merges neighbours
_U32 = 1 << 32
_CONTAINER = 1 << 16  # record ids per Roaring container
_ARRAY_LIMIT = 4096  # a container with more values is a bitset
_NO_RUN_COOKIE = 12346  # the portable format's cookie for a bitmap without run containers
_LITTLE_ENDIAN = sys.byteorder == "little"  # the portable format is written in the machine's byte order


@dataclass
class _Dataset:
    """One dataset's remembered record sets: bitmaps, their sizes and signatures, row i for set i.

    Rows from ``committed`` to ``count`` are the sets of the release being checked, tentatively: a later number of
    the same release is compared with them too, and a refusal drops them (see :meth:`ReleaseMemory.check`).
    """

    bitmaps: list[BitMap | BitMap64] = field(default_factory=list)
    nbytes: list[int] = field(default_factory=list)
    sizes: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(16, np.int64))
    signatures: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros((16, SIGNATURE_RANGES), np.int64))
    count: int = 0
    committed: int = 0
    shift: int = 0  # a signature range is 2**shift record ids wide
    wide: bool = False  # some record id is 2**32 or more: 64-bit bitmaps

    def rollback(self) -> None:
        del self.bitmaps[self.committed :], self.nbytes[self.committed :]
        self.count = self.committed

    def cover(self, largest: int) -> None:
        """Widen the ranges (merging neighbours: exact) until the signature covers record id ``largest``."""
        while largest >= SIGNATURE_RANGES << self.shift:
            half = SIGNATURE_RANGES // 2
            merged = self.signatures[:, 0::2] + self.signatures[:, 1::2]
            self.signatures[:, :half] = merged
            self.signatures[:, half:] = 0
            self.shift += 1

    def signature(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        edges = np.arange(1, SIGNATURE_RANGES + 1, dtype=np.int64) << self.shift
        return np.diff(np.searchsorted(ids, edges), prepend=0).astype(np.int64)

    def bitmap_signature(self, bitmap: BitMap | BitMap64) -> npt.NDArray[np.int64]:
        width = 1 << self.shift
        return np.array(
            [bitmap.range_cardinality(i * width, (i + 1) * width) for i in range(SIGNATURE_RANGES)], np.int64
        )

    def widen(self) -> None:
        """From here on 64-bit bitmaps (record ids of 2**32 and more): the remembered ones are converted once."""
        self.bitmaps = [_bitmap64(np.asarray(b.to_array(), dtype=np.int64)) for b in self.bitmaps]
        self.wide = True

    def append(self, bitmap: BitMap | BitMap64, size: int, signature: npt.NDArray[np.int64]) -> None:
        if self.count == len(self.sizes):
            self.sizes = np.concatenate([self.sizes, np.zeros_like(self.sizes)])
            self.signatures = np.concatenate([self.signatures, np.zeros_like(self.signatures)])
        self.sizes[self.count] = size
        self.signatures[self.count] = signature
        self.bitmaps.append(bitmap)
        self.nbytes.append(_bitmap_bytes(bitmap))
        self.count += 1


@dataclass
class _Seen:
    """A distinct record set of the release being checked: its ids, its bitmaps, the comparison keys done."""

    ids: npt.NDArray[np.int64]
    keys: set[str] = field(default_factory=set)
    narrow: BitMap | None = None
    wide: BitMap64 | None = None

    def bitmap(self, wide: bool) -> BitMap | BitMap64:
        """One bitmap object per set and width, shared by every key it is remembered under."""
        if wide:
            if self.wide is None:
                self.wide = _bitmap64(self.ids)
            return self.wide
        if self.narrow is None:
            self.narrow = _bitmap32(self.ids)
        return self.narrow


@dataclass(frozen=True)
class Checked:
    """A release whose record sets passed the check, to be remembered once it is released."""

    generation: int


class ReleaseMemory:
    """The record sets behind every number released in this kernel, per dataset, and the check against them.

    Use: ``checked = memory.check(record_sets, min_group_size)`` (raises :class:`PolicyViolation`, remembering
    nothing), then ``memory.remember(checked)`` once the release goes out. Nothing of a refused release is kept.
    """

    def __init__(self) -> None:
        self._datasets: dict[tuple[str, str], _Dataset] = {}  # (dataset, comparison key) -> its remembered sets
        self._generation = 0

    def check(
        self, record_sets: Iterable[RecordSet], min_group_size: Mapping[str, int], *, grouped: bool = False
    ) -> Checked:
        """Compare every number's record set with the remembered ones and with the release's other numbers.

        ``min_group_size`` is each dataset's k (its owner's current policy); a dataset without one is refused, as
        the output policy refuses it. ``grouped``: the numbers are of disjoint groups (a group-by, value counts),
        so their union is checked and remembered too; the columns of a ``describe`` add up to nothing. Sets equal
        to one already remembered are not kept twice. A refusal does not quote the number's label: a label can hold
        a group's key, a data value the refused release never gave.
        """
        self._generation += 1
        for remembered in self._datasets.values():
            remembered.rollback()  # a release checked earlier and never remembered
        touched: dict[tuple[str, str], list[BitMap | BitMap64]] = {}  # this release's distinct sets, per partition
        seen: dict[tuple[str, int], list[_Seen]] = {}  # the same, by dataset and size, with the keys checked
        try:
            for record in record_sets:
                stoppable.check()  # the release is interrupted: nothing of it is remembered (see the rollback)
                dataset, ids = record[0], record[2]
                keys = record[3] if len(record) > 3 else frozenset({ALL_KEY})
                k = min_group_size.get(dataset)
                if k is None:
                    raise PolicyViolation(RULE, [dataset], "no output policy is known for this dataset")
                values = _checked_ids(ids)
                same_size = seen.setdefault((dataset, int(values.size)), [])
                entry = next((e for e in same_size if e.ids is values or np.array_equal(e.ids, values)), None)
                if entry is None:
                    entry = _Seen(values)
                    same_size.append(entry)
                for key in sorted(set(keys) - entry.keys):  # the same records as another number: once per key
                    entry.keys.add(key)
                    memory = self._datasets.get((dataset, key))
                    if memory is None:
                        memory = self._datasets[(dataset, key)] = _Dataset()
                    if values.size:
                        memory.cover(int(values[-1]))
                        if not memory.wide and int(values[-1]) >= _U32:
                            memory.widen()
                            touched[(dataset, key)] = [
                                _bitmap64(np.asarray(b.to_array(), np.int64)) for b in touched.get((dataset, key), [])
                            ]
                    bitmap = entry.bitmap(memory.wide)
                    touched.setdefault((dataset, key), []).append(bitmap)
                    _compare(memory, dataset, bitmap, memory.signature(values), k, _ONE_NUMBER)
            for (dataset, key), bitmaps in touched.items() if grouped else ():
                if len(bitmaps) > 1 and _additive(key):  # the groups added up are a number too
                    union = _union(bitmaps)
                    # A sum of groups compares with the column's other numbers too (a mean times its count).
                    for under in (key, key.removeprefix(SUM_PREFIX)) if key.startswith(SUM_PREFIX) else (key,):
                        memory = self._datasets.setdefault((dataset, under), _Dataset())
                        if len(union):
                            memory.cover(int(union.max()))
                        if isinstance(union, BitMap64) and not memory.wide:
                            memory.widen()
                        same_width = _bitmap64(np.asarray(union.to_array(), np.int64)) if memory.wide else union
                        signature = memory.bitmap_signature(same_width)
                        _compare(memory, dataset, same_width, signature, min_group_size[dataset], _ALL)
        except BaseException:
            for name in touched:
                self._datasets[name].rollback()
            raise
        return Checked(self._generation)

    def remember(self, checked: Checked) -> None:
        """Keep the record sets of the release that passed :meth:`check` (the latest check only)."""
        if checked.generation != self._generation:
            raise RuntimeError("the release memory changed since this release was checked; check it again")
        for memory in self._datasets.values():
            for bitmap in memory.bitmaps[memory.committed : memory.count]:
                bitmap.run_optimize()  # consecutive records (a range filter, "everyone") become runs
            memory.nbytes[memory.committed : memory.count] = map(_bitmap_bytes, memory.bitmaps[memory.committed :])
            memory.committed = memory.count
        self._generation += 1

    def admit(
        self, record_sets: Iterable[RecordSet], min_group_size: Mapping[str, int], *, grouped: bool = False
    ) -> None:
        """:meth:`check`, then :meth:`remember`."""
        self.remember(self.check(record_sets, min_group_size, grouped=grouped))

    def remembered(self, dataset: str | None = None) -> int:
        """How many distinct record sets are remembered (for one dataset, or all); a set kept under several
        comparison keys counts once."""
        chosen = [m for (name, _), m in self._datasets.items() if dataset is None or name == dataset]
        return len({id(bitmap) for memory in chosen for bitmap in memory.bitmaps[: memory.committed]})

    def memory_bytes(self) -> int:
        """Bytes held for the remembered sets: the bitmaps' containers (each once) and the size and signature
        arrays of every comparison key."""
        sizes: dict[int, int] = {}
        for memory in self._datasets.values():
            for bitmap, nbytes in zip(memory.bitmaps[: memory.committed], memory.nbytes, strict=False):
                sizes[id(bitmap)] = nbytes
        arrays = sum(memory.sizes.nbytes + memory.signatures.nbytes for memory in self._datasets.values())
        return sum(sizes.values()) + arrays


_ONE_NUMBER = "a number of this result is computed from records that differ from those behind"
_ALL = "the numbers of this result, added up, are computed from records that differ from those behind"


def _compare(
    memory: _Dataset, dataset: str, bitmap: BitMap | BitMap64, signature: npt.NDArray[np.int64], k: int, what: str
) -> None:
    """Refuse ``bitmap`` if it differs from a remembered set (or one of this release) by 1 to k - 1 records; else
    add it to the release's tentative sets, unless the same set is there already."""
    size = len(bitmap)
    duplicate = False
    if memory.count:
        near = np.flatnonzero(np.abs(memory.sizes[: memory.count] - size) < max(k, 1))
        if near.size:
            bound = np.abs(memory.signatures[near] - signature).sum(axis=1)
            near = near[bound < max(k, 1)]
        for row in near.tolist():
            difference = _difference(bitmap, memory.bitmaps[row])
            if difference == 0:
                duplicate = True
            elif difference < k:
                raise PolicyViolation(
                    RULE,
                    [dataset],
                    f"{what} a number released earlier (or another number of this result) by fewer than {k} "
                    "records; the difference of the two would describe those records alone",
                )
    if not duplicate:
        memory.append(bitmap, size, signature)


def _additive(key: str) -> bool:
    """Whether the numbers under ``key`` add up over groups (counts, sums): only theirs make a number of the union.
    Means, spreads and order statistics of disjoint groups combine into no number of their union's records."""
    return key in (COUNT_KEY, ALL_KEY) or key.startswith(SUM_PREFIX)


def _union(bitmaps: list[BitMap | BitMap64]) -> BitMap | BitMap64:
    if all(isinstance(b, BitMap) for b in bitmaps):
        return BitMap.union(*(b for b in bitmaps if isinstance(b, BitMap)))
    return BitMap64.union(*(b for b in bitmaps if isinstance(b, BitMap64)))


def _difference(a: BitMap | BitMap64, b: BitMap | BitMap64) -> int:
    """|a Δ b|; both are of one kind (a dataset's bitmaps are all 32-bit or all 64-bit)."""
    if isinstance(a, BitMap) and isinstance(b, BitMap):
        return a.symmetric_difference_cardinality(b)
    if isinstance(a, BitMap64) and isinstance(b, BitMap64):
        return a.symmetric_difference_cardinality(b)
    raise TypeError("record-set bitmaps of one dataset are of one kind")


def _checked_ids(ids: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """The record ids as sorted unique non-negative int64: the signatures and bitmaps rely on it, so it is checked."""
    values = np.asarray(ids)
    if values.ndim != 1 or (values.size and values.dtype.kind not in "iu"):
        raise ValueError("record ids are a one-dimensional array of integers")
    values = values.astype(np.int64, copy=False)
    if values.size and (values[0] < 0 or not bool(np.all(values[1:] > values[:-1]))):
        raise ValueError("record ids must be sorted, unique and non-negative")
    return values


def _bitmap64(ids: npt.NDArray[np.int64]) -> BitMap64:
    return BitMap64(array.array("Q", ids.astype(np.uint64).tobytes()))


def _bitmap32(ids: npt.NDArray[np.int64]) -> BitMap:
    """A bitmap of sorted unique ids below 2**32, written in Roaring's portable format by NumPy and read back.

    Several times faster than adding the ids one by one (``BitMap(array)``), because the containers are laid out
    with vector operations; pyroaring validates what it reads (sorted arrays, bitset cardinalities), and the tests
    compare the result with ``BitMap(ids)`` on many shapes.
    """
    if not ids.size:
        return BitMap()
    if int(ids[-1]) - int(ids[0]) == ids.size - 1:  # one run of consecutive records ("everyone"): runs
        return BitMap(range(int(ids[0]), int(ids[-1]) + 1))
    if not _LITTLE_ENDIAN:
        return BitMap(array.array("I", ids.astype(np.uint32).tobytes()))
    first, last = int(ids[0]) >> 16, int(ids[-1]) >> 16
    bounds = np.searchsorted(ids, np.arange(first, last + 2, dtype=np.int64) << 16)
    counts = np.diff(bounds)
    present = np.flatnonzero(counts)
    keys = present + first
    cards = counts[present]
    starts = bounds[present]
    dense = cards > _ARRAY_LIMIT
    sizes = np.where(dense, _CONTAINER // 8, 2 * cards)
    n = int(keys.size)
    header = 8 + 8 * n
    offsets = header + np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    buffer = np.empty(header + int(sizes.sum()), np.uint8)
    buffer[:8] = np.array([_NO_RUN_COOKIE, n], "<u4").view(np.uint8)
    descriptions = np.empty((n, 2), "<u2")
    descriptions[:, 0] = keys
    descriptions[:, 1] = cards - 1
    buffer[8 : 8 + 4 * n] = descriptions.reshape(-1).view(np.uint8)
    buffer[8 + 4 * n : header] = offsets.astype("<u4").view(np.uint8)
    if not dense.all():  # array containers: the low 16 bits, in place (every offset is even)
        low = (ids & (_CONTAINER - 1)).astype("<u2")
        positions = np.repeat(offsets // 2 - starts, cards) + np.arange(ids.size, dtype=np.int64)
        words = buffer.view("<u2")
        if dense.any():
            sparse_ids = np.repeat(~dense, cards)
            words[positions[sparse_ids]] = low[sparse_ids]
        else:
            words[positions] = low
    if dense.any():  # bitsets: one mask over the dense containers, packed, then copied to each one's place
        slots = np.flatnonzero(dense)
        if slots.size == n and int(keys[-1] - keys[0]) == n - 1:  # consecutive bitsets: the ids index the mask
            at = ids - (int(keys[0]) << 16)
        else:
            slot_of = np.cumsum(dense) - 1
            at = np.repeat(slot_of * _CONTAINER - (keys << 16), cards) + ids
            if slots.size != n:
                at = at[np.repeat(dense, cards)]
        bits = np.zeros(slots.size * _CONTAINER, bool)
        bits[at] = True
        packed = np.packbits(bits, bitorder="little")
        width = _CONTAINER // 8
        for slot, container in enumerate(slots.tolist()):
            offset = int(offsets[container])
            buffer[offset : offset + width] = packed[slot * width : (slot + 1) * width]
    return BitMap.deserialize(buffer.tobytes())


def _bitmap_bytes(bitmap: BitMap | BitMap64) -> int:
    """Bytes of a bitmap's containers, plus its per-container index (key, type and pointer)."""
    stats = bitmap.get_statistics()
    containers = (
        stats["n_bytes_array_containers"] + stats["n_bytes_bitset_containers"] + stats["n_bytes_run_containers"]
    )
    return int(containers + 16 * stats["n_containers"])
