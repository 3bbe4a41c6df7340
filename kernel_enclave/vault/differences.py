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
that gives no keys puts every set under one key (all compared). A number over a self-join (one dataset on both
sides) rests on the records of both sides together, and on each side's records on their own, which are compared too:
a side of a few chosen records joined onto every row of the other carries their values onto thousands of rows, and
only that side's records show two of its numbers a record apart.

The groups of a release added up are a number too (for counts and sums; a sum's keys appear twice, once with the
prefix ``sum:`` under which its groups' union is compared): the groups of ``sum(cost)`` by sex over everyone but one
patient add up to the sum over everyone but that patient, and ``sum(cost)`` over everyone minus the groups released
by age is the sum over the ages withheld as too small. So the union of a grouped release's record sets (per
dataset and comparison key, when it has more than one) is checked and remembered like the sets of its numbers. The
union covers every statistic under its key at once, so it is a little stricter than one union per statistic.

What this does not stop by itself: numbers over the same records whose values differ on a few of them
(``sum(cn.where(who, t.cost, t.age))`` and ``sum(t.age)``; within one release :mod:`.combinations` withholds them,
across two :mod:`.earlier_values` refuses the later one); numbers under different keys that an analyst makes
measure the same thing (a sum of a 0/1 expression computed from a column, against a count over a filter on it: one
bit per pair), other combinations of three or more numbers (``A - B - C`` where each pair, and each release taken
whole, differs by k or more; some of a release's groups added up), and reconstruction from many overlapping
releases. The release limits (``max_releases``) bound how many releases an analyst can draw, and the
differential-privacy mode bounds what they reveal.

The sets are screened before anything is listed. The records of a dataset are split into classes by a hash of
their ids, and each record has a fixed 64-bit *weight*: 1, plus 1 in the 8-bit digit of its class. The 1s are the
low ``b`` bits (``b`` = the bit length of the dataset's row count); the digits take the top bits, as many as fit
above them (five classes up to 16 million records, four up to 4,000 million; a dataset of more than 2**48 records
has its sets listed). The sum of a set's weights modulo 2**64 is its *sketch*: its size in the low bits, which never
carry, and above them each class's count modulo 256, carries and all. It is a plain sum of a column, wrapping as
Polars' and NumPy's integer sums do. A release of the common kind (an in-memory dataset whose rows are distinct
records, or a join of such datasets on keys that meet each record at most once, or a dataset scanned from disk) hands
over only these sketches, per dataset, computed in the same group-by as its numbers from a hidden weight column
made once at load (by the reader as each row is read, for a scanned dataset; one sum per
group and contributing column, where listing the ids would gather and sort every one of them, and building their
bitmaps costs more again).

A sketch is linear: the difference of two sets' sketches, less that of their sizes, is the sum of d_c·256**c
modulo 2**(8·classes), where d_c is the first set's records of class c less the second's. Every record in A Δ B
changes one d_c by one, so the |d_c| add up to at most |A Δ B|; and when |A Δ B| < 128, every d_c lies between
-127 and 127 and is read back exactly: with 128 added in every digit, each byte is d_c + 128, with no carry. So
the digits read back, added up in absolute value, are at most |A Δ B| for every pair fewer than k records apart
(``MAX_SCREENED_K``: k up to 128), and a pair they put k or more apart is not near: a pair a few records apart is
never ruled out, and one far apart is ruled out without its records, but for chance (with five classes and k = 10:
about 1 pair in 150 of those 500 records apart, fewer than 1 in 10,000 of those 8,000 apart). A larger k is screened
by sizes alone: sets of sizes within k - 1 are then listed.

The bounds are NumPy operations over all remembered sets at once. Two sets of different groups of one release share
no record, so they differ by their sizes added up and are not compared. A pair no bound puts k or more records apart
needs the records themselves: the vault then lists the release's record sets (it runs the release again, listing
ids) and compares them exactly, as Roaring bitmaps (``symmetric_difference_cardinality``). A remembered set kept
only as a sketch is listed the same way when a later set comes near it: with each release the memory keeps how to
run it again (its plan, the source tables and the output policies it ran on, which never change: record ids are the
vault's hidden per-dataset row numbers, fixed for the kernel's lifetime, see :mod:`kernel_enclave.vault.plan`). A
set listed again must have the size and sketch remembered for it, or the release is refused: the records behind the
earlier number are no longer known, and the check fails closed. A set once listed stays listed. Asking the same
question again (a cell run twice) is recognised without listing anything: the same plan over the same tables under
the same policies gives the same record sets, so a set with the same label and sketch as one of such a release is a
repeat, whether that release's sets were kept as sketches or had to be listed (a listed set keeps its release's
recipe too). A repeat needs no comparison at all: the set it repeats was compared with everything remembered. So is
a set that, the first time its release ran, was found equal to one another release had given (not kept twice, but
remembered as that release's label and sketch): asked again, it lists nothing either.

Releases of other kinds (joins that can repeat a record, self-joins; after a join or over a scanned dataset, a
group whose set leaves out a value k records share) hand over their record sets listed, and are checked exactly from
the start; a listed set's sketch is computed from its ids when a sketched set comes near it. Order statistics,
whose blocks of ranks are their own record sets, hand over those blocks listed, beside the sketches of the
release's other numbers (a ``describe``): the sketches are screened, then the blocks compared exactly with
everything remembered and with the release's sketched sets.

Sets listed are kept as Roaring bitmaps (pyroaring): two bytes per record where records are sparse, one bit per
record id of the dataset where they are dense, a few bytes per run of consecutive records. A set kept as a sketch
costs two numbers and a reference to its release's plan.

The memory is not thread-safe: the vault calls it under its request lock.
"""

from __future__ import annotations

import array
import sys
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import polars as pl
from pyroaring import BitMap, BitMap64

from kernel_enclave.vault import stoppable
from kernel_enclave.vault.protocol import PolicyViolation

RULE = "release.difference"
# (dataset, label of the released number, sorted unique ids[, comparison keys]); see "What is compared" above
RecordSet = tuple[str, str, npt.NDArray[np.int64]] | tuple[str, str, npt.NDArray[np.int64], frozenset[str]]
COUNT_KEY = "count"  # counts of records (row counts, counts of a column, value counts, sums of flags)
SUM_PREFIX = "sum:"  # before a column key: the sums of that column, whose groups add up
ALL_KEY = ""  # the key of a record set given without keys: compared with every other such set

_U32 = 1 << 32
_CONTAINER = 1 << 16  # record ids per Roaring container
_ARRAY_LIMIT = 4096  # a container with more values is a bitset
_NO_RUN_COOKIE = 12346  # the portable format's cookie for a bitmap without run containers
_LITTLE_ENDIAN = sys.byteorder == "little"  # the portable format is written in the machine's byte order
_ONE_BY_ONE = 8  # a release's sets under one key screened one by one up to this many, together beyond
SMALL_SET = 4096  # listed sets up to this size are indexed by their records, to be compared only with those sharing one
_SKETCH_BYTES = 64  # what a set kept as a sketch costs beside its size and sketch: its entry and label reference
_WEIGHT_FACTOR = 0x9E3779B97F4A7C15  # SplitMix64's increment, added to an id before it is mixed
_WRAP = 1 << 64  # sketches are sums modulo 2**64
_WEIGHT_BLOCK = 1 << 17  # ids given their weights per pass (a megabyte a temporary)
DIGIT_BITS = 8  # a class's records are counted modulo 2**8 in a sketch: a byte
_DIGIT = 1 << DIGIT_BITS
_BIAS = int.from_bytes(bytes([_DIGIT // 2] * 8), "little")  # 128 in every byte
_OFF_BIAS = np.abs(np.arange(_DIGIT, dtype=np.int64) - _DIGIT // 2)  # a byte's digit |d_c|: |byte - 128|
MAX_SCREENED_K = _DIGIT // 2  # differences of fewer records than this are read back exactly from two sketches


# -- record weights ---------------------------------------------------------------------------------------------


def weight_bits(rows: int) -> int | None:
    """The width of the count in a dataset's sketches: a count of any set of its records (at most ``rows``) fits.
    None when fewer than two class digits fit above it (more than 2**48 records): its sets are listed."""
    bits = max(1, int(rows).bit_length())
    return bits if _class_count(bits) >= 2 else None


def _class_count(bits: int) -> int:
    """How many classes (digits of ``DIGIT_BITS``) fit in 64 bits above a count of ``bits`` bits."""
    return (64 - bits) // DIGIT_BITS


def _digits_at(bits: int) -> int:
    """Where the digits start: they take the top bits, so the last one's carries leave the 64 bits."""
    return 64 - DIGIT_BITS * _class_count(bits)


def _class_weights(bits: int) -> list[int]:
    """The weight of a record of each class: 1 (the count) plus 1 in the class's digit."""
    return [1 + (1 << (_digits_at(bits) + DIGIT_BITS * c)) for c in range(_class_count(bits))]


def _classes(ids: npt.NDArray[np.int64], bits: int) -> npt.NDArray[np.uint64]:
    """Each record's class: SplitMix64's finaliser of its id (neighbouring ids land in unrelated classes, so ranges
    of ids are split as unevenly as random sets), its upper half scaled to the number of classes. In place on one
    copy of the ids: a scan makes the weights of every row it reads, every query."""
    mixed = ids.astype(np.uint64)  # arithmetic wraps modulo 2**64 throughout
    mixed += np.uint64(_WEIGHT_FACTOR)
    shifted = mixed >> np.uint64(30)
    mixed ^= shifted
    mixed *= np.uint64(0xBF58476D1CE4E5B9)
    np.right_shift(mixed, np.uint64(27), out=shifted)
    mixed ^= shifted
    mixed *= np.uint64(0x94D049BB133111EB)
    np.right_shift(mixed, np.uint64(31), out=shifted)
    mixed ^= shifted
    mixed >>= np.uint64(32)
    mixed *= np.uint64(_class_count(bits))
    mixed >>= np.uint64(32)
    return mixed


def weights_of(ids: npt.NDArray[np.int64], bits: int) -> npt.NDArray[np.int64]:
    """The records' weights (see the module), as the vault stores them at load: 1 plus 1 in the class's digit,
    made by shifts in place (a lookup by class costs as much again), a block of ids at a time (the dozen passes
    over a block stay in the CPU's cache: twice as fast as over a whole scanned frame)."""
    weights = np.empty(ids.size, dtype=np.uint64)
    for start in range(0, ids.size, _WEIGHT_BLOCK):
        block = _classes(ids[start : start + _WEIGHT_BLOCK], bits)
        block *= np.uint64(DIGIT_BITS)
        block += np.uint64(_digits_at(bits))
        np.left_shift(np.uint64(1), block, out=block)
        block += np.uint64(1)
        weights[start : start + block.size] = block
    return weights.view(np.int64)


def weight_expression(ids: pl.Expr, bits: int) -> pl.Expr:
    """:func:`weights_of` as a Polars expression over a column of record ids, for a dataset scanned as queries run
    (its rows are numbered as they stream by, so their weights are made there too). UInt64 arithmetic wraps modulo
    2**64 in Polars as in NumPy, and a division by a power of two is the shift."""

    def shifted(value: pl.Expr, by: int) -> pl.Expr:
        return value // pl.lit(1 << by, pl.UInt64)

    mixed = ids.cast(pl.UInt64) + pl.lit(_WEIGHT_FACTOR, pl.UInt64)
    mixed = (mixed ^ shifted(mixed, 30)) * pl.lit(0xBF58476D1CE4E5B9, pl.UInt64)
    mixed = (mixed ^ shifted(mixed, 27)) * pl.lit(0x94D049BB133111EB, pl.UInt64)
    mixed = mixed ^ shifted(mixed, 31)
    classes = shifted(shifted(mixed, 32) * pl.lit(_class_count(bits), pl.UInt64), 32)
    by_class = pl.Series(_class_weights(bits), dtype=pl.Int64)
    return pl.lit(by_class).gather(classes)


def sketch_of(ids: npt.NDArray[np.int64], bits: int) -> int:
    """A listed set's sketch: the sum of its weights, modulo 2**64 (as a sum of the weight column wraps)."""
    return _packed(_classes(ids, bits), bits)


def _packed(classes: npt.NDArray[np.integer], bits: int) -> int:
    """The sketch of records of these classes: their count, plus each class's count in its digit."""
    if not classes.size:
        return 0
    counts = np.bincount(classes.astype(np.intp, copy=False), minlength=_class_count(bits))
    at = _digits_at(bits)
    return (int(classes.size) + sum(int(n) << (at + DIGIT_BITS * c) for c, n in enumerate(counts.tolist()))) % _WRAP


def sizes_of(sketches: npt.NDArray[np.int64], bits: int) -> npt.NDArray[np.int64]:
    """The records each sketch counts (a sum of weights as Polars gives it, wrapped to a signed integer)."""
    return sketches.astype(np.int64, copy=False) & np.int64((1 << bits) - 1)


def _apart(
    totals: npt.NDArray[np.uint64],
    sizes: npt.NDArray[np.int64],
    other_totals: npt.NDArray[np.uint64],
    other_sizes: npt.NDArray[np.int64],
    bits: int,
    k: int,
) -> npt.NDArray[np.int64]:
    """For each pair of sets, a number of records that is at most |A Δ B| whenever |A Δ B| < k (so a pair it puts
    k or more apart is not near): the classes' differences read back from the sketches, see the module."""
    by_size: npt.NDArray[np.int64] = np.abs(sizes - other_sizes)  # (arrays of one dimension, broadcast)
    if k > MAX_SCREENED_K:
        return by_size
    # The digits' part of the difference: the sketches' less the counts' (uint64 arithmetic wraps, as the sums did),
    # plus 128 in every digit: each byte is then d_c + 128 with no carry wherever every |d_c| < 128
    classes = _class_count(bits)
    rest = (totals - other_totals - (sizes - other_sizes).astype(np.uint64)) >> np.uint64(_digits_at(bits))
    biased = (rest + np.uint64(_BIAS & ((1 << (DIGIT_BITS * classes)) - 1))).astype("<u8")
    digits = biased.view(np.uint8).reshape(-1, 8)
    found = np.zeros(len(digits), dtype=np.int64)
    for c in range(classes):
        found += _OFF_BIAS[digits[:, c]]
    bound: npt.NDArray[np.int64] = np.maximum(found, by_size)
    return bound


class _Classes:
    """The class of each record id of one dataset, made once (a byte a record) so that listed sets are sketched by
    a lookup rather than by hashing every id again."""

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.known = np.zeros(0, np.uint8)

    def sketch(self, ids: npt.NDArray[np.int64]) -> int:
        if ids.size and int(ids[-1]) >= self.known.size:
            start, end = self.known.size, max(int(ids[-1]) + 1, 2 * self.known.size)
            fresh = _classes(np.arange(start, end, dtype=np.int64), self.bits).astype(np.uint8)
            self.known = np.concatenate([self.known, fresh])
        return _packed(self.known[ids], self.bits)


@dataclass(frozen=True)
class Sketch:
    """A released number's record set, not listed: the sum of its records' weights (see the module)."""

    dataset: str
    label: str
    size: int
    total: int
    keys: frozenset[str]
    group: int  # the group of the release it belongs to: sets of different groups share no record
    bits: int  # the width of the count in the weights summed

    def __post_init__(self) -> None:  # one form of a sum modulo 2**64 (Polars gives it as a signed integer)
        object.__setattr__(self, "total", int(self.total) % _WRAP)


@dataclass(frozen=True)
class Recipe:
    """How to list the record sets of a release again (run it again), and what makes two releases' sets equal."""

    rebuild: Callable[[], Sequence[RecordSet]]
    fingerprint: Hashable  # equal for releases that give the same record sets (same plan, tables and policies)


@dataclass(eq=False)
class _Entry:
    """A remembered record set: listed (its bitmap), or a sketch with the release that can list it again. One entry
    serves every comparison key the set is remembered under, so it is listed once."""

    label: str
    size: int
    total: int | None  # its sketch, in its dataset's count width; None for a listed set until one is needed
    bitmap: BitMap | BitMap64 | None = None
    recipe: Recipe | None = None
    union_key: str | None = None  # the union of its release's sets under this key (a grouped release added up)
    group: int | None = None  # while its release is checked: its group (sets of different groups share no record)
    nbytes: int = 0


@dataclass
class _Members:
    """The records of the small listed sets of one key, to find the sets a new small set shares a record with:
    (record id, row) pairs, most sorted by id, the latest in a short unsorted tail merged in as it grows."""

    ids: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    rows: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    tail_ids: list[npt.NDArray[np.int64]] = field(default_factory=list)
    tail_rows: list[npt.NDArray[np.int64]] = field(default_factory=list)
    tail_size: int = 0
    member: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(16, np.bool_))  # row is in the index

    def add(self, row: int, ids: npt.NDArray[np.int64]) -> None:
        if row >= self.member.size:
            self.member = np.concatenate([self.member, np.zeros(max(row + 1, self.member.size), np.bool_)])
        self.member[row] = True
        self.tail_ids.append(ids)
        self.tail_rows.append(np.full(ids.size, row, dtype=np.int64))
        self.tail_size += ids.size

    def indexed(self, rows: npt.NDArray[np.intp]) -> npt.NDArray[np.bool_]:
        inside = rows < self.member.size
        found = np.zeros(rows.size, dtype=np.bool_)
        found[inside] = self.member[rows[inside]]
        return found

    def rows_holding(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """The rows of the indexed sets holding any of ``ids`` (sorted, unique)."""
        if self.tail_size > max(4096, self.ids.size // 4):
            self._merge()
        low = np.searchsorted(self.ids, ids, side="left")
        high = np.searchsorted(self.ids, ids, side="right")
        hits = [self.rows[a:b] for a, b in zip(low.tolist(), high.tolist(), strict=True) if b > a]
        hits += [rows[np.isin(tail, ids)] for tail, rows in zip(self.tail_ids, self.tail_rows, strict=True)]
        return np.unique(np.concatenate(hits)) if hits else np.zeros(0, np.int64)

    def forget_from(self, row: int) -> None:
        """Drop the sets of rows ``row`` and later (a refused release's)."""
        self._merge()
        kept = self.rows < row
        self.ids, self.rows = self.ids[kept], self.rows[kept]
        self.member[row:] = False

    def nbytes(self) -> int:
        return self.ids.nbytes + self.rows.nbytes + 16 * self.tail_size + self.member.nbytes

    def _merge(self) -> None:
        if not self.tail_size:
            return
        ids = np.concatenate([self.ids, *self.tail_ids])
        rows = np.concatenate([self.rows, *self.tail_rows])
        order = np.argsort(ids, kind="stable")
        self.ids, self.rows = ids[order], rows[order]
        self.tail_ids, self.tail_rows, self.tail_size = [], [], 0


@dataclass
class _Dataset:
    """One dataset's remembered record sets under one comparison key: entry i with its size and sketch in row i.

    Rows from ``committed`` to ``count`` are the sets of the release being checked, tentatively: a later number of
    the same release is compared with them too, and a refusal drops them (see :meth:`ReleaseMemory.check`).
    """

    entries: list[_Entry] = field(default_factory=list)
    sizes: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(16, np.int64))
    totals: npt.NDArray[np.uint64] = field(default_factory=lambda: np.zeros(16, np.uint64))
    known: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(16, np.bool_))  # the sketch is in totals
    count: int = 0
    committed: int = 0
    small: _Members = field(default_factory=_Members)
    # Sets of a release found equal to a remembered set of another (so not kept again), as (fingerprint, label,
    # union key, size, sketch): asked again, they are repeats too. Those of the release being checked: pending.
    aliases: set[tuple[Hashable, str, str | None, int, int]] = field(default_factory=set)
    pending: list[tuple[Hashable, str, str | None, int, int]] = field(default_factory=list)

    def rollback(self) -> None:
        del self.entries[self.committed :]
        self.count = self.committed
        self.small.forget_from(self.committed)
        self.pending.clear()

    def commit(self) -> None:
        self.committed = self.count
        self.aliases.update(self.pending)
        self.pending.clear()

    def other_group(self, row: int, entry: _Entry, k: int) -> bool:
        """Whether row ``row`` is a set of another group of the release being checked than ``entry``'s: the two
        share no record, so they differ by their sizes added up (k or more, unless both are tiny)."""
        other = self.entries[row]
        return (
            row >= self.committed
            and other.group is not None
            and entry.group is not None
            and other.group != entry.group
            and other.size + entry.size >= max(k, 1)
        )

    def aliased(self, entry: _Entry) -> bool:
        """Whether ``entry`` is a set its release gave before, found then equal to a remembered set."""
        return entry.recipe is not None and entry.total is not None and _alias(entry, entry.total) in self.aliases

    def sharing_or_unknown(self, rows: npt.NDArray[np.intp], entry: _Entry, k: int) -> npt.NDArray[np.intp]:
        """Of ``rows`` (near ``entry``'s listed set by size), those that may be within k - 1 records of it: the sets
        sharing a record with it, any set not in the members index, and sets so small that even disjoint ones are
        near. Two sets with |A| + |B| >= k that share no record differ by |A| + |B| records: k or more."""
        if entry.bitmap is None or entry.size > SMALL_SET or rows.size < 2:
            return rows
        sharing = self.small.rows_holding(np.asarray(entry.bitmap.to_array(), dtype=np.int64))
        kept = ~self.small.indexed(rows) | np.isin(rows, sharing) | (self.sizes[rows] + entry.size < k)
        return rows[kept]

    def near(
        self, size: int, total: int | None, k: int, bits: int | None, fill: Callable[[_Entry], int] | None = None
    ) -> npt.NDArray[np.intp]:
        """The rows whose sets no bound puts k or more records away from a set of this size and sketch (of this
        size alone without a sketch). A listed set's sketch is made by ``fill`` when first needed."""
        rows = np.flatnonzero(np.abs(self.sizes[: self.count] - size) < max(k, 1))
        if rows.size and bits is not None and total is not None and fill is not None:
            for row in rows[~self.known[rows]].tolist():
                entry = self.entries[row]
                if entry.total is None:
                    entry.total = fill(entry)
                self.totals[row], self.known[row] = np.uint64(entry.total), True
            apart = _apart(
                self.totals[rows], self.sizes[rows], np.array([total], np.uint64), np.array([size], np.int64), bits, k
            )
            rows = rows[apart < max(k, 1)]
        return rows

    def near_each(
        self, entries: Sequence[_Entry], k: int, bits: int, fill: Callable[[_Entry], int]
    ) -> list[npt.NDArray[np.intp]]:
        """:meth:`near` for several sketched sets at once (the sets of one release under one key): the rows
        remembered so far near each, found by sorting the sizes once rather than scanning them per set."""
        count, limit = self.count, max(k, 1)
        sizes = np.array([entry.size for entry in entries], dtype=np.int64)
        order = np.argsort(self.sizes[:count], kind="stable")
        ordered = self.sizes[:count][order]
        low = np.searchsorted(ordered, sizes - (limit - 1), side="left")
        high = np.searchsorted(ordered, sizes + (limit - 1), side="right")
        spans = high - low
        which = np.repeat(np.arange(len(entries)), spans)
        rows = (
            order[np.concatenate([np.arange(a, b) for a, b in zip(low.tolist(), high.tolist(), strict=True)])]
            if spans.sum()
            else np.zeros(0, np.intp)
        )
        if rows.size:
            for row in np.unique(rows[~self.known[rows]]).tolist():
                entry = self.entries[row]
                if entry.total is None:
                    entry.total = fill(entry)
                self.totals[row], self.known[row] = np.uint64(entry.total), True
            totals = np.array([entries[i].total or 0 for i in which.tolist()], dtype=np.uint64)
            apart = _apart(self.totals[rows], self.sizes[rows], totals, sizes[which], bits, k)
            close = apart < limit
            rows, which = rows[close], which[close]
        return [rows[which == i] for i in range(len(entries))]

    def append(self, entry: _Entry) -> None:
        if self.count == len(self.sizes):
            self.sizes = np.concatenate([self.sizes, np.zeros_like(self.sizes)])
            self.totals = np.concatenate([self.totals, np.zeros_like(self.totals)])
            self.known = np.concatenate([self.known, np.zeros_like(self.known)])
        self.sizes[self.count] = entry.size
        self.totals[self.count] = np.uint64(entry.total or 0)
        self.known[self.count] = entry.total is not None
        self.entries.append(entry)
        if entry.bitmap is not None and entry.size <= SMALL_SET:
            self.small.add(self.count, np.asarray(entry.bitmap.to_array(), dtype=np.int64))
        self.count += 1


@dataclass
class _Seen:
    """A distinct record set of the release being checked: its ids, its entry, the comparison keys done."""

    ids: npt.NDArray[np.int64]
    keys: set[str] = field(default_factory=set)
    entry: _Entry | None = None

    def listed(self, label: str, recipe: Recipe | None) -> _Entry:
        """One entry (and bitmap) per set, shared by every key it is remembered under (sketched when needed)."""
        if self.entry is None:
            self.entry = _Entry(label, int(self.ids.size), None, _bitmap(self.ids), recipe=recipe)
        return self.entry


@dataclass(frozen=True)
class Checked:
    """A release whose record sets passed the check, to be remembered once it is released."""

    generation: int


class ReleaseMemory:
    """The record sets behind every number released in this kernel, per dataset, and the check against them.

    Use: ``checked = memory.check(record_sets, min_group_size)`` (raises :class:`PolicyViolation`, remembering
    nothing), then ``memory.remember(checked)`` once the release goes out; or ``memory.check_release(...)``, which
    screens a release's sketches first and lists its sets only when it must. Nothing of a refused release is kept.
    """

    def __init__(self) -> None:
        self._datasets: dict[tuple[str, str], _Dataset] = {}  # (dataset, comparison key) -> its remembered sets
        self._bits: dict[str, int] = {}  # dataset -> the count width of its sketches, once known
        self._classes: dict[str, _Classes] = {}  # dataset -> its records' classes, for listed sets
        self._generation = 0
        self._listed_again: dict[int, Sequence[RecordSet]] = {}  # a check's releases run again, by recipe

    def _begin(self) -> None:
        self._generation += 1
        self._listed_again.clear()
        for remembered in self._datasets.values():
            remembered.rollback()  # a release checked earlier and never remembered

    def _memory(self, dataset: str, key: str) -> _Dataset:
        memory = self._datasets.get((dataset, key))
        if memory is None:
            memory = self._datasets[(dataset, key)] = _Dataset()
        return memory

    def _adopt(self, dataset: str, bits: int | None) -> bool:
        """Fix the count width of ``dataset``'s sketches (computing those of its listed sets), or say whether
        ``bits`` is the one fixed."""
        if bits is None or dataset in self._bits:
            return bits is not None and self._bits.get(dataset) == bits
        self._bits[dataset] = bits
        self._classes[dataset] = _Classes(bits)
        return True

    def _sketch(self, dataset: str, ids: npt.NDArray[np.int64]) -> int:
        """A listed set's sketch in its dataset's count width (0 while that is unknown: screened by size alone)."""
        classes = self._classes.get(dataset)
        return 0 if classes is None else classes.sketch(ids)

    def _sketcher(self, dataset: str) -> Callable[[_Entry], int]:
        """A listed set's sketch, made when a sketched set first comes near it."""

        def sketch(entry: _Entry) -> int:
            assert entry.bitmap is not None
            return self._sketch(dataset, np.asarray(entry.bitmap.to_array(), dtype=np.int64))

        return sketch

    def check_release(
        self,
        sketches: Sequence[Sketch] | None,
        record_sets: Iterable[RecordSet],
        checking: Set[str],
        min_group_size: Mapping[str, int],
        *,
        grouped: bool = False,
        recipe: Recipe,
        rows: Mapping[str, int] | None = None,
    ) -> Checked:
        """The checks of one release, for the datasets in ``checking``: from its sketches where it gave them
        (listing its record sets with ``recipe`` only when a set comes near another), else from ``record_sets``.
        A release may give both: sketches, and the sets it lists anyway (the blocks of its order statistics).
        ``rows``: each dataset's row count, which fixes its sketches' count width."""
        if sketches is not None:
            chosen = [sketch for sketch in sketches if sketch.dataset in checking]
            beside = [s for s in record_sets if s[0] in checking]
            checked = self.screen(chosen, min_group_size, grouped=grouped, recipe=recipe, listed=beside, rows=rows)
            if checked is not None:
                return checked
            record_sets = recipe.rebuild()
        chosen_sets = (s for s in record_sets if s[0] in checking)
        return self.check(chosen_sets, min_group_size, grouped=grouped, rows=rows, recipe=recipe)

    def screen(
        self,
        sketches: Iterable[Sketch],
        min_group_size: Mapping[str, int],
        *,
        grouped: bool = False,
        recipe: Recipe,
        listed: Sequence[RecordSet] = (),
        rows: Mapping[str, int] | None = None,
    ) -> Checked | None:
        """Check a release from its sketches alone, or return None: some set may be closer than k records to another
        (or be the same as one), and the release's sets must be listed and :meth:`check`-ed.

        ``recipe`` lists the release's sets again; it is kept with the sketches for a later release that comes near
        them. Sketches of different groups must share no record (the groups of one table whose rows are records).
        ``listed``: the release's other sets, listed (its order statistics' blocks), checked exactly after the
        sketches, against them too. None of them may be compared under a key whose numbers add up over groups in a
        grouped release (their union would be split between the two kinds): such a release is listed whole.
        """
        if grouped and any(_additive(key) for record in listed for key in _keys_of(record)):
            return None
        self._begin()
        try:
            if self._screen_all(sketches, min_group_size, grouped, recipe):
                if listed:
                    self._check_sets(listed, min_group_size, grouped, rows, recipe)
                return Checked(self._generation)
        except BaseException:
            self._abandon()
            raise
        self._abandon()
        return None

    def _screen_all(
        self, sketches: Iterable[Sketch], min_group_size: Mapping[str, int], grouped: bool, recipe: Recipe
    ) -> bool:
        touched: dict[tuple[str, str], dict[int, Sketch]] = {}
        keyed: dict[tuple[str, str], list[_Entry]] = {}  # the release's sets under each key, screened together
        for sketch in sketches:
            stoppable.check()
            if not self._adopt(sketch.dataset, sketch.bits):
                return False  # sketches of another width cannot be compared: list
            entry = _Entry(sketch.label, sketch.size, sketch.total, recipe=recipe, group=sketch.group)
            for key in sorted(sketch.keys):
                members = touched.setdefault((sketch.dataset, key), {})
                if sketch.group in members and grouped and _additive(key):
                    return False  # two sets of one group: their union is not the sum of their sketches
                members[sketch.group] = sketch
                keyed.setdefault((sketch.dataset, key), []).append(entry)
        for (dataset, key), entries in keyed.items():
            stoppable.check()
            memory, k = self._memory(dataset, key), _k_of(min_group_size, dataset)
            if len(entries) > _ONE_BY_ONE:
                if not self._screened_together(dataset, memory, entries, k):
                    return False
            elif not all(self._screened(dataset, memory, entry, self._bits[dataset], k) for entry in entries):
                return False
        for (dataset, key), members in touched.items() if grouped else ():
            if len(members) < 2 or not _additive(key):
                continue
            bits = self._bits[dataset]
            union = _Entry(
                _union_label(key),
                sum(s.size for s in members.values()),
                sum(s.total for s in members.values()) % _WRAP,  # disjoint groups: their weights add up
                recipe=recipe,
                union_key=key,
            )
            for under in (key, key.removeprefix(SUM_PREFIX)) if key.startswith(SUM_PREFIX) else (key,):
                memory = self._memory(dataset, under)
                if not self._screened(dataset, memory, union, bits, min_group_size[dataset]):
                    return False
        return True

    def _abandon(self) -> None:
        for remembered in self._datasets.values():
            remembered.rollback()
        self._generation += 1  # a Checked of the abandoned screen is never valid

    def _screened_together(self, dataset: str, memory: _Dataset, entries: list[_Entry], k: int) -> bool:
        """:meth:`_screened` for each of ``entries`` in turn, with the remembered rows near each found at once and
        the entries compared with each other by NumPy (an entry is compared with those before it that were added)."""
        bits = self._bits[dataset]
        limit = max(k, 1)
        near = memory.near_each(entries, k, bits, self._sketcher(dataset))
        sizes = np.array([entry.size for entry in entries], dtype=np.int64)
        totals = np.array([entry.total or 0 for entry in entries], dtype=np.uint64)
        within = np.abs(sizes[:, None] - sizes[None, :]) < limit
        groups = np.array([-1 if entry.group is None else entry.group for entry in entries], dtype=np.int64)
        # Sets of two groups share no record: they differ by both sizes added up, k or more unless both are tiny.
        within &= ~(
            (groups[:, None] != groups[None, :])
            & (groups[:, None] >= 0)
            & (groups[None, :] >= 0)
            & (sizes[:, None] + sizes[None, :] >= limit)
        )
        pairs = np.nonzero(within)
        apart = _apart(totals[pairs[0]], sizes[pairs[0]], totals[pairs[1]], sizes[pairs[1]], bits, k)
        within[pairs[0][apart >= limit], pairs[1][apart >= limit]] = False
        added = np.zeros(len(entries), dtype=bool)
        for i, (entry, rows) in enumerate(zip(entries, near, strict=True)):
            if memory.aliased(entry) or any(self._repeats(memory, row, entry) for row in rows.tolist()):
                continue  # a repeat: compared with everything already, and not added again
            if rows.size or (within[i, :i] & added[:i]).any():
                return False
            memory.append(entry)
            added[i] = True
        return True

    @staticmethod
    def _repeats(memory: _Dataset, row: int, entry: _Entry) -> bool:
        """Whether remembered row ``row`` is ``entry``'s set, by the same release run before (see :meth:`_screened`)."""
        other = memory.entries[row]
        return (
            row < memory.committed
            and other.recipe is not None
            and entry.recipe is not None
            and other.recipe.fingerprint == entry.recipe.fingerprint
            and (other.label, other.union_key, other.size, other.total)
            == (entry.label, entry.union_key, entry.size, entry.total)
        )

    def _screened(self, dataset: str, memory: _Dataset, entry: _Entry, bits: int, k: int) -> bool:
        """Add a sketched set tentatively, unless a remembered (or this release's) set may be within k - 1 records
        of it: then False.

        A repeat of a set of the same release run before is no concern (see the module), and nor is anything near
        it: that set was compared with every set remembered before it, and every set remembered since was compared
        with it, so the repeat's differences are all known to be 0 or at least k.
        """
        if memory.aliased(entry):
            return True
        near = memory.near(entry.size, entry.total, k, bits, self._sketcher(dataset)).tolist()
        if any(self._repeats(memory, row, entry) for row in near):
            return True
        near = [row for row in near if not memory.other_group(row, entry, k)]
        if near:
            return False
        memory.append(entry)
        return True

    def check(
        self,
        record_sets: Iterable[RecordSet],
        min_group_size: Mapping[str, int],
        *,
        grouped: bool = False,
        rows: Mapping[str, int] | None = None,
        recipe: Recipe | None = None,
    ) -> Checked:
        """Compare every number's record set with the remembered ones and with the release's other numbers.

        ``min_group_size`` is each dataset's k (its owner's current policy); a dataset without one is refused, as
        the output policy refuses it. ``grouped``: the numbers are of disjoint groups (a group-by, value counts),
        so their union is checked and remembered too; the columns of a ``describe`` add up to nothing. Sets equal
        to one already remembered are not kept twice. A refusal does not quote the number's label: a label can hold
        a group's key, a data value the refused release never gave. ``rows`` (each dataset's row count) fixes the
        count width of a dataset's sketches, so that the sets are screened by them too. ``recipe``, the release's
        (when it has one), is kept with its sets: a repeat of the release is then recognised from its sketches.
        """
        self._begin()
        try:
            self._check_sets(record_sets, min_group_size, grouped, rows, recipe)
        except BaseException:
            for remembered in self._datasets.values():
                remembered.rollback()
            raise
        return Checked(self._generation)

    def _check_sets(
        self,
        record_sets: Iterable[RecordSet],
        min_group_size: Mapping[str, int],
        grouped: bool,
        rows: Mapping[str, int] | None,
        recipe: Recipe | None,
    ) -> None:
        """:meth:`check`'s comparisons, adding the sets tentatively (the caller rolls back on a refusal)."""
        touched: dict[tuple[str, str], list[BitMap | BitMap64]] = {}  # this release's distinct sets, per partition
        seen: dict[tuple[str, int, bytes], list[_Seen]] = {}  # the same, by dataset, size and a sample of the ids
        for record in record_sets:
            stoppable.check()  # the release is interrupted: nothing of it is remembered (see the rollback)
            dataset, label, ids = record[0], record[1], record[2]
            keys = _keys_of(record)
            k = _k_of(min_group_size, dataset)
            if rows is not None and dataset in rows and dataset not in self._bits:
                self._adopt(dataset, weight_bits(rows[dataset]))
            values = _checked_ids(ids)
            sample = values[:: max(1, values.size // 32)].tobytes()  # equal sets have equal samples
            same_size = seen.setdefault((dataset, int(values.size), sample), [])
            found = next((e for e in same_size if e.ids is values or np.array_equal(e.ids, values)), None)
            if found is None:
                found = _Seen(values)
                same_size.append(found)
            for key in sorted(set(keys) - found.keys):  # the same records as another number: once per key
                found.keys.add(key)
                entry = found.listed(label, recipe)
                assert entry.bitmap is not None
                touched.setdefault((dataset, key), []).append(entry.bitmap)
                memory = self._memory(dataset, key)
                if not self._listed_repeat(memory, dataset, entry, values):
                    self._compare(memory, dataset, entry, k, _ONE_NUMBER)
        for (dataset, key), bitmaps in touched.items() if grouped else ():
            if len(bitmaps) > 1 and _additive(key):  # the groups added up are a number too
                union_bitmap = _union(bitmaps)
                union_ids = np.asarray(union_bitmap.to_array(), dtype=np.int64)
                union = _Entry(_union_label(key), union_ids.size, None, union_bitmap, recipe, union_key=key)
                # A sum of groups compares with the column's other numbers too (a mean times its count).
                for under in (key, key.removeprefix(SUM_PREFIX)) if key.startswith(SUM_PREFIX) else (key,):
                    self._compare(self._memory(dataset, under), dataset, union, min_group_size[dataset], _ALL)

    def _listed_repeat(self, memory: _Dataset, dataset: str, entry: _Entry, ids: npt.NDArray[np.int64]) -> bool:
        """Whether a small listed set is one its release gave before under this key (the blocks of a quantile asked
        again): a repeat, compared with everything then, as for sketched sets (see :meth:`_screened`)."""
        if entry.recipe is None or entry.size > SMALL_SET or dataset not in self._classes:
            return False
        if entry.total is None:
            entry.total = self._sketch(dataset, ids)
        return memory.aliased(entry)

    def _compare(self, memory: _Dataset, dataset: str, entry: _Entry, k: int, what: str) -> None:
        """Refuse ``entry``'s set if it differs from a remembered set (or one of this release) by 1 to k - 1
        records; else add it to the release's tentative sets, unless the same set is there already."""
        assert entry.bitmap is not None
        duplicate = False
        bits = self._bits.get(dataset)
        rows = memory.near(entry.size, None, k, bits)  # listed sets compare exactly, at little cost
        rows = memory.sharing_or_unknown(rows, entry, k)  # a small set: only those sharing a record with it
        if bits is not None and any(memory.entries[row].bitmap is None for row in rows.tolist()):
            # A sketched set is listed only when the sketches too leave it near: this set is sketched first.
            if entry.total is None:
                entry.total = self._sketch(dataset, np.asarray(entry.bitmap.to_array(), dtype=np.int64))
            rows = memory.near(entry.size, entry.total, k, bits, self._sketcher(dataset))
        for row in rows.tolist():
            difference = _difference(entry.bitmap, self._listed(memory, dataset, row))
            if difference == 0:
                duplicate = True
                if entry.recipe is not None and bits is not None:  # asked again, a repeat (see _screened)
                    if entry.total is None:
                        entry.total = self._sketch(dataset, np.asarray(entry.bitmap.to_array(), dtype=np.int64))
                    memory.pending.append(_alias(entry, entry.total))
            elif difference < k:
                raise PolicyViolation(
                    RULE,
                    [dataset],
                    f"{what} a number released earlier (or another number of this result) by fewer than {k} "
                    "records; the difference of the two would describe those records alone",
                )
        if not duplicate:
            memory.append(entry)

    def _listed(self, memory: _Dataset, dataset: str, row: int) -> BitMap | BitMap64:
        """The bitmap of remembered set ``row``, listing a sketched one by running its release again (once)."""
        entry = memory.entries[row]
        if entry.bitmap is None:
            if entry.recipe is None:
                raise RuntimeError("a remembered record set has neither its records nor a way to list them")
            key = id(entry.recipe)
            if key not in self._listed_again:
                try:
                    self._listed_again[key] = entry.recipe.rebuild()
                except PolicyViolation:
                    raise
                except Exception as failed:  # fail closed: the earlier number's records are unknown
                    raise _unlisted(dataset) from failed
            bitmap = _bitmap(_pick(self._listed_again[key], dataset, entry, self._classes[dataset].sketch))
            bitmap.run_optimize()
            entry.bitmap, entry.nbytes = bitmap, _bitmap_bytes(bitmap)
        return entry.bitmap

    def remember(self, checked: Checked) -> None:
        """Keep the record sets of the release that passed :meth:`check` or :meth:`screen` (the latest only)."""
        if checked.generation != self._generation:
            raise RuntimeError("the release memory changed since this release was checked; check it again")
        for (dataset, _), memory in self._datasets.items():
            for entry in memory.entries[memory.committed : memory.count]:
                if entry.bitmap is not None and not entry.nbytes:
                    entry.bitmap.run_optimize()  # consecutive records (a range filter, "everyone") become runs
                    entry.nbytes = _bitmap_bytes(entry.bitmap)
                if entry.bitmap is not None and entry.recipe is not None and entry.size <= SMALL_SET:
                    if entry.total is None and dataset in self._classes:
                        entry.total = self._sketch(dataset, np.asarray(entry.bitmap.to_array(), dtype=np.int64))
                    if entry.total is not None:  # asked again, a repeat (see _listed_repeat)
                        memory.pending.append(_alias(entry, entry.total))
            memory.commit()
        self._generation += 1
        self._listed_again.clear()

    def admit(
        self, record_sets: Iterable[RecordSet], min_group_size: Mapping[str, int], *, grouped: bool = False
    ) -> None:
        """:meth:`check`, then :meth:`remember`."""
        self.remember(self.check(record_sets, min_group_size, grouped=grouped))

    def remembered(self, dataset: str | None = None) -> int:
        """How many distinct record sets are remembered (for one dataset, or all); a set kept under several
        comparison keys counts once."""
        return len(self._entries(dataset))

    def listed(self, dataset: str | None = None) -> int:
        """How many of the remembered sets are held listed (as bitmaps) rather than as sketches."""
        return sum(1 for entry in self._entries(dataset) if entry.bitmap is not None)

    def memory_bytes(self) -> int:
        """Bytes held for the remembered sets: the listed sets' containers, a sketch's entry, and the size and
        sketch arrays of every comparison key (each entry once)."""
        entries = self._entries(None)
        held = sum(entry.nbytes if entry.bitmap is not None else _SKETCH_BYTES for entry in entries)
        arrays = sum(
            memory.sizes.nbytes + memory.totals.nbytes + memory.small.nbytes() + _SKETCH_BYTES * len(memory.aliases)
            for memory in self._datasets.values()
        )
        return held + arrays

    def _entries(self, dataset: str | None) -> list[_Entry]:
        chosen = [m for (name, _), m in self._datasets.items() if dataset is None or name == dataset]
        return list({id(entry): entry for memory in chosen for entry in memory.entries[: memory.committed]}.values())


_ONE_NUMBER = "a number of this result is computed from records that differ from those behind"
_ALL = "the numbers of this result, added up, are computed from records that differ from those behind"


def _k_of(min_group_size: Mapping[str, int], dataset: str) -> int:
    k = min_group_size.get(dataset)
    if k is None:
        raise PolicyViolation(RULE, [dataset], "no output policy is known for this dataset")
    return k


def _unlisted(dataset: str) -> PolicyViolation:
    return PolicyViolation(
        RULE,
        [dataset],
        "the records behind a number released earlier could not be listed again as they were, so this result "
        "cannot be compared with it",
    )


def _pick(
    found: Sequence[RecordSet], dataset: str, entry: _Entry, sketch: Callable[[npt.NDArray[np.int64]], int]
) -> npt.NDArray[np.int64]:
    """The ids of a sketched set among its release's sets listed again; they must have its size and sketch."""
    mine = [record for record in found if record[0] == dataset]
    if entry.union_key is not None:
        parts = [r[2] for r in mine if entry.union_key in (r[3] if len(r) > 3 else frozenset({ALL_KEY}))]
        chosen = [np.unique(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)]
    else:
        same = [_checked_ids(r[2]) for r in mine if r[1] == entry.label]
        same = same or [_checked_ids(r[2]) for r in mine]  # listed, an equal set is named after another number
        chosen = [ids for ids in same if ids.size == entry.size and sketch(ids) == entry.total]
    if not chosen or any(not np.array_equal(ids, chosen[0]) for ids in chosen[1:]):
        raise _unlisted(dataset)
    ids = chosen[0]
    if ids.size != entry.size or sketch(ids) != entry.total:
        raise _unlisted(dataset)
    return ids


def _union_label(key: str) -> str:
    return f"the groups added up under {key!r}"


def _alias(entry: _Entry, total: int) -> tuple[Hashable, str, str | None, int, int]:
    assert entry.recipe is not None
    return (entry.recipe.fingerprint, entry.label, entry.union_key, entry.size, total)


def _keys_of(record: RecordSet) -> frozenset[str]:
    """A record set's comparison keys (a set given without keys is compared with every other such set)."""
    return record[3] if len(record) > 3 else frozenset({ALL_KEY})


def _additive(key: str) -> bool:
    """Whether the numbers under ``key`` add up over groups (counts, sums): only theirs make a number of the union.
    Means, spreads and order statistics of disjoint groups combine into no number of their union's records."""
    return key in (COUNT_KEY, ALL_KEY) or key.startswith(SUM_PREFIX)


def _union(bitmaps: list[BitMap | BitMap64]) -> BitMap | BitMap64:
    narrow = [b for b in bitmaps if isinstance(b, BitMap)]
    if len(narrow) == len(bitmaps):
        return BitMap.union(*narrow)
    return BitMap64.union(*(_as_wide(b) for b in bitmaps))


def _difference(a: BitMap | BitMap64, b: BitMap | BitMap64) -> int:
    """|a Δ b|, converting a 32-bit bitmap when the other is 64-bit (a dataset of more than 2**32 records)."""
    if isinstance(a, BitMap) and isinstance(b, BitMap):
        return a.symmetric_difference_cardinality(b)
    return _as_wide(a).symmetric_difference_cardinality(_as_wide(b))


def _as_wide(bitmap: BitMap | BitMap64) -> BitMap64:
    if isinstance(bitmap, BitMap64):
        return bitmap
    return _bitmap64(np.asarray(bitmap.to_array(), dtype=np.int64))


def _bitmap(ids: npt.NDArray[np.int64]) -> BitMap | BitMap64:
    """A set's bitmap: 32-bit unless a record id needs more."""
    return _bitmap64(ids) if ids.size and int(ids[-1]) >= _U32 else _bitmap32(ids)


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

    Several times faster than adding the ids one by one (``BitMap(array)``) for large sets, because the containers
    are laid out with vector operations (below a few thousand ids adding them is faster); pyroaring validates what
    it reads (sorted arrays, bitset cardinalities), and the tests compare the result with ``BitMap(ids)`` on many
    shapes.
    """
    if not ids.size:
        return BitMap()
    if int(ids[-1]) - int(ids[0]) == ids.size - 1:  # one run of consecutive records ("everyone"): runs
        return BitMap(range(int(ids[0]), int(ids[-1]) + 1))
    if not _LITTLE_ENDIAN or ids.size <= SMALL_SET:  # a few ids: adding them costs less than laying out containers
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
