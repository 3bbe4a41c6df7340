"""Combinations of one release's numbers: none may rest on fewer than k records.

The rules on a released number look at that number alone: it must have k contributing records, and those holding
the group's most common value do not count. Two numbers of one release can still be subtracted.
``sum(cn.where(who, t.cost, t.age))`` and ``sum(t.age)`` rest on the same 4,000 records and each passes every rule
on its own, yet their difference is one patient's cost less their age; a third number,
``sum(cn.where(who, 2 * t.age, t.age))``, gives the age. Any expression that agrees with another on all rows but a
few does the same: a ``where`` or a ``fillna`` with a column in both branches, a flag multiplied in, arithmetic that
underflows to zero everywhere but at one value.

So, within one group of a release, each number is taken for the vector of what every record adds to it: a sum is
the vector of the contributing values (0 elsewhere), a count the indicator of the records it counts, a row count the
vector of ones, a mean its values (with its count, a mean is a sum; without, a sum over a count the analyst may know),
a standard deviation or a variance its values and their squares. A combination of the numbers with coefficients the
analyst knows is the same combination of these vectors, added up over the records; it reveals a few records when it
is zero on every other one. The rule: no nonzero combination of a group's vectors is zero on all records but 1 to
k - 1 of them. The numbers such a combination uses are withheld, and the rest is checked again. A single vector
counts too: a number that a few records dominate to within rounding (the others add up to less than a millionth of
it) is theirs.

What counts as found. Any ``d`` vectors have a nonzero combination that vanishes on ``d - 1`` chosen records,
whatever the data, but its coefficients are then made of those records' values, which the analyst does not know. A
combination that vanishes on ``d`` records or more does not exist for data in general position: it exists because
the expressions were written to agree there. So only a combination vanishing on at least as many records as the
vectors' rank is looked for, on at most k - 1 records outside them.

How it is found, in two ways. A combination that is nonzero on a set T of records only lies in the vectors' span, so
the records of T carry a leverage (their share of the span's projection) of at least 1 together, one of them at
least 1 / |T|. The records of the largest leverage are the candidates (2 (k - 1) of them, then four times as many,
up to 128 (k - 1), always leaving the rank outside); the combinations whose share of squared size outside them is
below ``_OUTSIDE`` (a relative size where rounding, not data, decides) are the eigenvectors of a small matrix, and
the sparsest of them is kept when it is nonzero on fewer than k candidates. That finds a combination on one record
(its leverage is 1) and one spread over a few records of like size. Then by sampling: a combination that vanishes on
all records but k - 1 is the one that vanishes on any rank - 1 records drawn among those, so draws of rank - 1
records (from a fixed seed: the same request, the same answer) find it unless every draw touched one of the few, a
chance kept below ``_MISSED`` (at most ``_DRAWS`` draws: a tiny group with many numbers is searched less surely).
A release of many groups is screened for all of them at once (:func:`isolating_groups`): their leverages from their
Gram matrices by segment sums, their draws in batches; only a group where something is found is searched alone.

What it costs: it runs only where a number reads a computed column (see :mod:`.release`), and then takes a few
passes over the numbers' vectors; over a million records that is several times the release itself.

Across two releases (:func:`isolating_across`, which :mod:`.earlier_values` runs): the same search over the
records of both, the vectors of each release's groups apart, on each part of the records that the two releases'
groups link together, and found only where a combination uses numbers of both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

_OUTSIDE = 1e-12  # a combination with this share of its squared size (or less) outside a few rows is on them alone
_NONZERO = 1e-7  # an entry (or a coefficient) this small relative to the largest one is taken for rounding
_WIDEST = 128  # candidates tried, at most, per row such a combination may rest on
_MISSED = 1e-9  # the chance, at most, that sampling misses a combination it looks for (up to _DRAWS draws)
_DRAWS = 4096
_CELLS = 1 << 24  # draws times rows, at most: the sampled values' size
_FEW_GROUPS = 16  # up to this many groups are searched one by one, more are screened together first
_FEW_ROWS = 4096  # up to this many records, draws are made all at once (beyond, one by one)
_RANK = 1e-9  # an eigenvalue of the vectors' Gram matrix this small relative to the largest one adds no rank
_ACROSS_WIDEST = 32  # vectors per part of two releases searched group by group; beyond, one per number and release


def isolating(vectors: Sequence[npt.NDArray[np.float64]], k: int) -> npt.NDArray[np.bool_]:
    """The ``vectors`` (of one entry per record of a group, as floats) that a
    combination resting on 1 to ``k - 1`` rows uses, after withholding such combinations' vectors until none is left;
    False for all when none is found. Non-finite entries count as zeros (such a number is not finite either)."""
    count = len(vectors)
    rows = len(vectors[0]) if count else 0
    withheld = np.zeros(count, dtype=bool)
    if k < 2 or count == 0 or rows < 2:
        return withheld
    scaled = np.empty((rows, count), dtype=np.float64, order="F")
    norms = np.zeros(count)
    for j in range(count):
        column = scaled[:, j]
        np.copyto(column, vectors[j])
        column[~np.isfinite(column)] = 0.0
        largest = np.abs(column).max()
        if largest > 0:
            column /= largest  # first to at most 1: the squares of 1e300 would overflow
            norms[j] = np.sqrt(column @ column)
            column /= norms[j]
    columns = np.flatnonzero(norms > 0)
    scaled = scaled[:, columns] if columns.size < count else scaled
    while columns.size:
        found = _combination(scaled, k)
        if found is None:
            break
        withheld[columns[found]] = True
        scaled, columns = scaled[:, ~found], columns[~found]
    return withheld


def _combination(scaled: npt.NDArray[np.float64], k: int) -> npt.NDArray[np.bool_] | None:
    """The columns a combination resting on 1 to k - 1 rows uses, or None (columns of unit length)."""
    rows = scaled.shape[0]
    gram = scaled.T @ scaled
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    kept = eigenvalues > _RANK * max(float(eigenvalues[-1]), 0.0)
    rank = int(kept.sum())
    most = min(k - 1, rows - rank)  # the rows such a combination may rest on, leaving `rank` rows where it vanishes
    if rank == 0 or most < 1:
        return None
    whiten = eigenvectors[:, kept] / np.sqrt(eigenvalues[kept])  # scaled @ whiten: an orthonormal basis of the span
    transposed = whiten.T @ scaled.T  # the basis, one row per basis vector (each contiguous)
    basis = transposed.T
    leverage = np.einsum("ij,ij->j", transposed, transposed)
    if _below_one(leverage, most):
        return None  # no `most` records hold a leverage of one together: no combination rests on them alone
    found, sure = _by_sampling(basis, whiten, rank, most)
    if found is not None or sure:
        return found
    return _by_leverage(basis, whiten, leverage, rank, most)


def _below_one(leverage: npt.NDArray[np.float64], most: int) -> bool:
    """Whether the ``most`` largest leverages add up to less than one: then no combination rests on ``most``
    records or fewer (their leverages would add up to at least one, see the module)."""
    if leverage.size > most:
        leverage = np.partition(leverage, leverage.size - most)[leverage.size - most :]
    return bool(leverage.sum() < 1 - 1e-6)


def _by_leverage(
    basis: npt.NDArray[np.float64],
    whiten: npt.NDArray[np.float64],
    leverage: npt.NDArray[np.float64],
    rank: int,
    most: int,
) -> npt.NDArray[np.bool_] | None:
    """The search among the rows of the largest leverage (see the module)."""
    rows = basis.shape[0]
    largest = min(rows - rank, _WIDEST * most)
    ranked = np.argpartition(leverage, rows - largest)[rows - largest :]
    ranked = ranked[np.argsort(-leverage[ranked], kind="stable")]
    size = min(2 * most, largest)
    while True:
        candidates = ranked[:size]
        if leverage[candidates].sum() >= 1 - 1e-6:
            found = _resting_on(basis, whiten, candidates, most)
            if found is not None:
                return found
        if size == largest:
            return None
        size = min(4 * size, largest)


def _resting_on(
    basis: npt.NDArray[np.float64], whiten: npt.NDArray[np.float64], candidates: npt.NDArray[np.intp], most: int
) -> npt.NDArray[np.bool_] | None:
    """The columns used by a combination that is zero outside ``candidates`` (to rounding) and nonzero on 1 to
    ``most`` of them, or None."""
    on = basis[candidates]
    # A combination's share of squared size outside the candidates, relative to its whole size (the basis's Gram
    # matrix, the identity to rounding): the generalised eigenproblem, through the Cholesky factor of the whole.
    whole = basis.T @ basis
    inverse = np.linalg.inv(np.linalg.cholesky(whole))
    shares, turned = np.linalg.eigh(inverse @ (whole - on.T @ on) @ inverse.T)
    null = (inverse.T @ turned)[:, shares <= _OUTSIDE]
    if not null.shape[1]:
        return None
    # The sparsest of these combinations: each that is 1 on one of a few well-chosen rows and 0 on the others (a
    # basis of rows picked as a pivoted QR picks them), and their union less what d of them can cancel.
    values = on @ null
    pivots = _pivot_rows(values)
    combined = null @ np.linalg.inv(values[pivots])
    options = [combined[:, [j]] for j in range(combined.shape[1])] + [null]
    best: tuple[int, npt.NDArray[np.float64]] | None = None
    for option in options:
        entries = np.abs(on @ option)
        nonzero = int((entries > _NONZERO * entries.max(axis=0)).any(axis=1).sum()) - (option.shape[1] - 1)
        if best is None or nonzero < best[0]:
            best = (nonzero, option)
    assert best is not None
    if not 1 <= best[0] <= most:
        return None
    coefficients = np.abs(whiten @ best[1])
    return np.asarray((coefficients > _NONZERO * coefficients.max(axis=0)).any(axis=1))


def _by_sampling(
    basis: npt.NDArray[np.float64], whiten: npt.NDArray[np.float64], rank: int, most: int
) -> tuple[npt.NDArray[np.bool_] | None, bool]:
    """The search by sampling (see the module): rank - 1 rows drawn at random, the combination that vanishes on
    them, kept if it vanishes on all but 1 to ``most`` rows. A combination that vanishes on all rows but ``most``
    is the one drawn whenever the rows drawn are among those; draws are repeated until that has failed to happen
    with a chance below ``_MISSED``, from a fixed seed (the same request, the same answer). Also whether that
    chance was kept (False: one vector, or too few draws allowed; the search by leverage then runs too)."""
    rows = basis.shape[0]
    if rank < 2:
        return None, False
    within = float(np.prod([(rows - most - i) / (rows - i) for i in range(rank - 1)]))
    if within <= 0:
        return None, False
    needed = 1 if within >= 1 else int(np.ceil(np.log(_MISSED) / np.log1p(-within)))
    draws = max(1, min(needed, _DRAWS, _CELLS // rows))
    rng = np.random.default_rng(0)
    if rows <= _FEW_ROWS:
        drawn = np.argpartition(rng.random((draws, rows)), rank - 2, axis=1)[:, : rank - 1]
    else:  # few draws from many rows: a row drawn twice (rarely) makes a draw that finds nothing
        drawn = rng.integers(0, rows, (draws, rank - 1))
    rows_drawn = basis[drawn]
    normals = _normals(rows_drawn)  # a combination (in the basis) vanishing on each draw's rows
    values = np.abs(normals @ basis.T)  # draws x rows
    resting = (values > _NONZERO * values.max(axis=1, keepdims=True)).sum(axis=1)
    good = np.flatnonzero((resting >= 1) & (resting <= most))
    if not good.size:
        return None, int(_independent(rows_drawn, normals).sum()) >= needed
    best = good[np.argmin(resting[good])]
    coefficients = np.abs(whiten @ normals[best])
    return np.asarray(coefficients > _NONZERO * coefficients.max()), True


def _independent(rows: npt.NDArray[np.float64], normals: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """Which draws' rows are independent, so that their normal is the only combination vanishing on them (rows
    that repeat a pattern, as records of one category do, leave more, and the draw settles nothing). A normal's
    length is the volume the rows span, at most the product of their lengths."""
    volume = np.prod(np.sqrt(np.einsum("...ij,...ij->...i", rows, rows)), axis=-1)
    return np.asarray(np.sqrt(np.einsum("...i,...i->...", normals, normals)) > _NONZERO * volume)


def _normals(rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """For each stack of rank - 1 rows of length rank (``rows[..., rank - 1, rank]``), the vector orthogonal to them
    all: their signed minors (the cross product, in three dimensions); zero where the rows are dependent."""
    rank = rows.shape[-1]
    if rank == 2:
        return np.stack([rows[..., 0, 1], -rows[..., 0, 0]], axis=-1)
    if rank == 3:
        return np.cross(rows[..., 0, :], rows[..., 1, :])
    minors = [np.linalg.det(np.delete(rows, j, axis=-1)) * (-1.0) ** j for j in range(rank)]
    return np.stack(minors, axis=-1)


def _pivot_rows(values: npt.NDArray[np.float64]) -> list[int]:
    """As many rows of ``values`` as it has columns, each the largest left after projecting out those before (the
    row choice of a QR with column pivoting, on the transpose)."""
    rest = values.copy()
    chosen: list[int] = []
    for _ in range(values.shape[1]):
        norms = np.einsum("ij,ij->i", rest, rest)
        row = int(np.argmax(norms))
        chosen.append(row)
        direction = rest[row] / np.sqrt(norms[row])
        rest -= np.outer(rest @ direction, direction)
    return chosen


def isolating_groups(
    columns: Sequence[npt.NDArray[np.float64]], bounds: npt.NDArray[np.int64], k: int
) -> npt.NDArray[np.bool_]:
    """:func:`isolating` for many groups at once: ``columns`` hold the groups' records one group after another,
    group g at ``bounds[g]:bounds[g + 1]``; the vectors withheld in any group.

    Most groups are settled together, by NumPy over all their rows: a combination resting on at most ``most``
    records needs one of them to have a leverage of at least 1 / ``most`` (see the module), and the leverages of
    every group come from its vectors' Gram matrix, found for all groups by segment sums. Only a group where some
    record reaches that is searched on its own."""
    count = len(columns)
    withheld = np.zeros(count, dtype=bool)
    groups = len(bounds) - 1
    if k < 2 or count == 0 or groups < 1:
        return withheld
    if groups <= _FEW_GROUPS:  # large groups: each searched on its own costs no more
        for group in range(groups):
            start, end = bounds[group], bounds[group + 1]
            withheld |= isolating([column[start:end] for column in columns], k)
        return withheld
    sizes = np.diff(bounds)
    starts = bounds[:-1]
    group_of = np.repeat(np.arange(groups), sizes)
    finite = [np.where(np.isfinite(column), column, 0.0) for column in columns]
    finite = [column / largest if (largest := np.abs(column).max()) > 0 else column for column in finite]
    norms = np.sqrt(np.stack([np.add.reduceat(column * column, starts) for column in finite], axis=1))
    scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    scaled = [column * scale[group_of, j] for j, column in enumerate(finite)]
    gram = np.empty((groups, count, count))
    for a in range(count):
        for b in range(a, count):
            gram[:, a, b] = gram[:, b, a] = np.add.reduceat(scaled[a] * scaled[b], starts)
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    largest = np.maximum(eigenvalues[:, -1:], 0.0)
    kept = eigenvalues > _RANK * largest
    rank = kept.sum(axis=1)
    inverse = np.where(kept, 1.0 / np.where(kept, eigenvalues, 1.0), 0.0)
    projection = np.einsum("gik,gk,gjk->gij", eigenvectors, inverse, eigenvectors)  # the Gram's pseudo-inverse
    leverage = np.zeros(len(group_of))
    for a in range(count):
        for b in range(a, count):
            weight = projection[group_of, a, b] * (1.0 if a == b else 2.0)
            leverage += weight * scaled[a] * scaled[b]
    most = np.minimum(k - 1, sizes - rank)
    peak = np.maximum.reduceat(leverage, starts)
    open_ = (most >= 1) & (rank >= 1) & (peak >= 1 / np.maximum(most, 1) - 1e-9)
    for row in np.flatnonzero(open_):  # the exact bound, where the cheap one left the group open
        open_[row] = not _below_one(leverage[bounds[row] : bounds[row + 1]], int(most[row]))
    # Groups of full rank are sampled together (the search by sampling, see the module); a group where a draw finds
    # a combination, or of lower rank, is searched on its own, which also says which numbers it uses.
    alone = open_ & (rank < count)
    sampled = np.flatnonzero(open_ & (rank == count))
    if sampled.size and count >= 2:
        alone[sampled[_sampled_together(scaled, bounds, sampled, most[sampled], count)]] = True
    for searched in np.flatnonzero(alone):
        start, end = bounds[searched], bounds[searched + 1]
        withheld |= isolating([column[start:end] for column in columns], k)
    return withheld


def _sampled_together(
    scaled: Sequence[npt.NDArray[np.float64]],
    bounds: npt.NDArray[np.int64],
    groups: npt.NDArray[np.intp],
    most: npt.NDArray[np.int64],
    rank: int,
) -> npt.NDArray[np.bool_]:
    """Which of ``groups`` (each of full rank ``rank``) have a draw of rank - 1 of their records whose vanishing
    combination is nonzero on 1 to ``most`` records: :func:`_by_sampling` for many groups at once, the groups that
    need as many draws together."""
    sizes = (bounds[groups + 1] - bounds[groups]).astype(np.float64)
    within = np.prod([np.clip((sizes - most - i) / (sizes - i), 0.0, 1.0) for i in range(rank - 1)], axis=0)
    with np.errstate(divide="ignore"):
        needed = np.where(within >= 1, 1.0, np.ceil(np.log(_MISSED) / np.log1p(-np.minimum(within, 1 - 1e-16))))
    # a few sizes of batch, each a power of two
    draws = np.exp2(np.ceil(np.log2(np.clip(needed, 1, _DRAWS)))).astype(np.int64)
    # Where no draw can miss the few records, the group is searched alone (as _by_sampling leaves it).
    found: npt.NDArray[np.bool_] = np.asarray(within <= 0)
    rng = np.random.default_rng(0)
    for batch in np.unique(draws):
        chosen = np.flatnonzero((draws == batch) & (within > 0))
        if not chosen.size:
            continue
        starts, ends = bounds[groups[chosen]], bounds[groups[chosen] + 1]
        picked = rng.random((len(chosen), int(batch), rank - 1))
        rows = starts[:, None, None] + (picked * (ends - starts)[:, None, None]).astype(np.int64)
        drawn = np.stack([column[rows] for column in scaled], axis=-1)  # groups x draws x (rank - 1) x rank
        normals = _normals(drawn)  # groups x draws x rank
        lengths = ends - starts
        total = int(lengths.sum())
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        whole = len(chosen) == len(bounds) - 1  # every group, in order: the rows as they are
        taken = None if whole else np.repeat(starts - offsets, lengths) + np.arange(total)
        rows_of = [column if taken is None else column[taken] for column in scaled]
        limit = most[chosen]
        # A group where too few draws were of independent rows is searched alone (see _independent).
        hit = _independent(drawn, normals).sum(axis=1) < needed[chosen]
        step = max(1, _CELLS // 4 // max(total, 1))  # draws evaluated together: a few million values at a time
        for first in range(0, int(batch), step):
            share = normals[:, first : first + step, :]
            values = np.zeros((total, share.shape[1]))
            for j, column in enumerate(rows_of):
                values += column[:, None] * np.repeat(share[:, :, j], lengths, axis=0)
            values = np.abs(values)
            largest = np.repeat(np.maximum.reduceat(values, offsets, axis=0), lengths, axis=0)
            nonzero = np.add.reduceat(values > _NONZERO * largest, offsets, axis=0)
            hit |= ((nonzero >= 1) & (nonzero <= limit[:, None])).any(axis=1)
        found[chosen] = hit
    return found


# -- across two releases ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordValues:
    """What each record of one dataset adds to a release's numbers: the records (sorted ids; a record once per group
    it is in, as after a join its rows can be in several), the release's group of each entry (an index), and per
    vector (see the module) each entry's value, 0 where its group does not release the number."""

    records: npt.NDArray[np.int64]
    groups: npt.NDArray[np.int64]
    columns: tuple[npt.NDArray[np.float64], ...]


def isolating_across(later: RecordValues, earlier: RecordValues, k: int) -> bool:
    """Whether a combination of a later release's numbers with an earlier release's, over one dataset, rests on 1 to
    ``k - 1`` records and uses numbers of both (each release alone was searched when it ran).

    ``sum(t.age)`` released once and ``sum(cn.where(who, t.cost, t.age))`` later rest on the same records; their
    difference rests on one. Each group's number may take its own coefficient, as each is released on its own, but
    a combination is zero on a record only through the groups the record is in: so the search runs on each part of
    the records that the releases' groups link together (two groups sharing a record are linked, of one release or
    of both), with every group's vectors apart and each group's indicator beside them (its size, which a count
    gives). A part with more than ``_ACROSS_WIDEST`` such vectors is searched with one vector per number and release
    instead (the same coefficient in all of its groups). A record may be in several groups of one release (after a
    join, through rows of different groups): each of its groups then holds what its rows there add."""
    if not later.columns or not earlier.columns or k < 2:
        return False
    if np.array_equal(later.records, earlier.records):  # the same records (the usual case): nothing to merge
        records = later.records
    else:
        records = np.sort(np.concatenate([later.records, earlier.records]))
        records = records[np.diff(records, prepend=-1) != 0] if len(records) else records
    sides = [_layers(values, records) for values in (later, earlier)]
    part = _linked_parts(sides)
    parts = int(part.max(initial=-1)) + 1
    # Labels sorted as 16-bit integers where they fit: NumPy's stable sort is then a radix sort.
    order = np.argsort(part.astype(np.uint16) if parts <= 1 << 16 else part, kind="stable")
    starts = np.flatnonzero(np.diff(part[order], prepend=-1))
    ends = np.append(starts[1:], len(order))
    # Parts of one group of each release at most (the same groups twice, or one release ungrouped within the
    # other's groups) have the same vectors in the same places: searched together.
    single = np.ones(parts, dtype=bool)
    for layers in sides:
        width = 1 + max(int(group.max(initial=-1)) for group, _ in layers)
        held_pairs = [part[group >= 0] * width + group[group >= 0] for group, _ in layers]
        pairs = _present(np.concatenate(held_pairs))
        single &= np.bincount(pairs // max(width, 1), minlength=parts) <= 1
    at_start = part[order[starts]]
    together = single[at_start] & (ends - starts >= 2)
    if together.any():
        rows = np.concatenate([order[a:b] for a, b in zip(starts[together], ends[together], strict=True)])
        bounds = np.concatenate([[0], np.cumsum(ends[together] - starts[together])])
        together_vectors, together_owners = _part_vectors(sides, rows, merged=True)
        used = isolating_groups(together_vectors, bounds, k)
        owner = np.asarray(together_owners)
        if used[owner == 0].any() and used[owner == 1].any():
            return True
    for start, end in zip(starts[~together], ends[~together], strict=True):
        rows = order[start:end]
        if len(rows) < 2:
            continue
        vectors: list[npt.NDArray[np.float64]] = []
        owners: list[int] = []  # 0 the later release, 1 the earlier one, -1 a group's indicator
        for merged in (False, True):
            vectors, owners = _part_vectors(sides, rows, merged)
            if merged or len(vectors) <= _ACROSS_WIDEST:
                break
        used = isolating(vectors, k)
        owner = np.asarray(owners)
        if used[owner == 0].any() and used[owner == 1].any():
            return True
    return False


# One release's entries laid over all records: per layer, each record's group (-1: none) and entries; a record in
# several groups of the release has its second group in the second layer, and so on.
_Layers = list[tuple[npt.NDArray[np.int64], list[npt.NDArray[np.float64]]]]


def _layers(values: RecordValues, records: npt.NDArray[np.int64]) -> _Layers:
    """``values`` (sorted by record, a record once per group it is in) over ``records`` (sorted, distinct)."""
    count = len(values.records)
    same = values.records is records or np.array_equal(values.records, records)
    at = np.arange(count) if same else np.searchsorted(records, values.records)
    if same or bool(np.all(values.records[1:] > values.records[:-1])):  # each record in one group (the usual case)
        layer = np.zeros(count, dtype=np.int64)
    else:  # the entry's rank within its record's entries
        first = np.flatnonzero(np.diff(values.records, prepend=values.records[0] - 1))
        layer = np.arange(count) - np.repeat(first, np.diff(np.append(first, count)))
    layers: _Layers = []
    for depth in range(int(layer.max(initial=0)) + 1):
        chosen = layer == depth
        group = np.full(len(records), -1, dtype=np.int64)
        group[at[chosen]] = values.groups[chosen]
        entries = []
        for column in values.columns:
            entry = np.zeros(len(records))
            entry[at[chosen]] = column[chosen]
            entries.append(entry)
        layers.append((group, entries))
    return layers


def _part_vectors(
    sides: Sequence[_Layers], rows: npt.NDArray[np.intp], merged: bool
) -> tuple[list[npt.NDArray[np.float64]], list[int]]:
    """The vectors of one part of the records: per release, every group's vectors and indicator apart, or (merged)
    each number's vector over all of the part's groups and one indicator of the release's records."""
    vectors: list[npt.NDArray[np.float64]] = []
    owners: list[int] = []
    for side, layers in enumerate(sides):
        within = [group[rows] for group, _ in layers]
        if merged:
            chosen: list[int | None] = [None]
        else:
            chosen = [int(g) for g in _present(np.concatenate([w[w >= 0] for w in within]))]
        for g in chosen:
            members = [w >= 0 if g is None else w == g for w in within]
            vectors.append((members[0] if len(members) == 1 else np.logical_or.reduce(members)).astype(np.float64))
            owners.append(-1)
            for j in range(len(layers[0][1])):
                held = [np.where(m, entries[j][rows], 0.0) for m, (_, entries) in zip(members, layers, strict=True)]
                vectors.append(held[0] if len(held) == 1 else np.sum(held, axis=0))
                owners.append(side)
    return vectors, owners


def _present(values: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The distinct values among non-negative ``values``, in order: counted where they are few enough."""
    if not len(values):
        return values
    if int(values.max()) < max(1 << 20, 4 * len(values)):
        return np.flatnonzero(np.bincount(values))
    return np.unique(values)


def _linked_parts(sides: Sequence[_Layers]) -> npt.NDArray[np.int64]:
    """Each record's part: the groups of the releases are linked where they share a record (across releases, or
    within one where a record is in several of its groups), and the records of linked groups form one part
    (connected components, found by propagating the least label along the links)."""
    offsets, nodes = [], 0
    for layers in sides:
        offsets.append(nodes)
        nodes += 1 + max(int(group.max(initial=-1)) for group, _ in layers)
    placed = [
        np.where(group >= 0, group + offset, -1)
        for layers, offset in zip(sides, offsets, strict=True)
        for group, _ in layers
    ]
    anchor = placed[0].copy()  # each record's first group: every other group it is in links to it
    for node in placed[1:]:
        anchor = np.where(anchor >= 0, anchor, node)
    linked = [(anchor[node >= 0], node[node >= 0]) for node in placed[1:]]
    width = max(nodes, 1)
    pairs = _present(np.concatenate([a * width + b for a, b in linked])) if linked else np.zeros(0, np.int64)
    links = np.stack([pairs // width, pairs % width], axis=1)
    label = np.arange(nodes)
    while links.size:
        least = np.minimum(label[links[:, 0]], label[links[:, 1]])
        updated = label.copy()
        np.minimum.at(updated, links[:, 0], least)
        np.minimum.at(updated, links[:, 1], least)
        updated = updated[updated]  # follow the labels' own labels: long chains settle in few rounds
        if np.array_equal(updated, label):
            break
        label = updated
    return np.asarray(label[anchor], dtype=np.int64)
