"""The statistics pass of every CPU kernel: a row's max and sum of exps, read once.

A row is read from memory once for its statistics: it is walked in blocks that fit in L1, each
block's max is found first and the block's ``exp`` sum is then taken from cache, and the running
sum is rescaled when the max grows (the (max, sum) merge, :func:`~fastlsm.backends.formulas.rescaled`).
The kernels' write passes read the row a second time, from L2 for rows up to ~1 MiB.

The sum comes out as its excess ``e = s - 1`` (:mod:`fastlsm.backends.formulas`): the max's term,
exactly 1, is kept out of the small terms it would swamp.  Every block is summed as usual; only
if the row's sum is below 2 (one dominant entry: there ``log(s)`` would lose the small terms) is
the block holding its max summed again, with each term equal to 1 counted apart.  Below 2 ``log``
is ill-conditioned; from 2 up its condition number is at most 1.44, so the plain sum is as good as
the split one.  Rows without a dominant entry therefore pay nothing, and a dominated row one more
pass over one block.  The tiled and column kernels count the 1s apart in their one pass
(:func:`split_term`): a second pass over a dominated short row costs more than its first.

Rows of a few classes are handled a tile at a time: a loop over one short row is mostly vector
tails and horizontal reductions, so :func:`tile_stats` finds a tile's statistics with the rows
across SIMD lanes.  :func:`column_stats` does the same in place for arrays whose class axis is
strided and whose rows are side by side in memory.

Helpers take one row as a C-ordered 1-D array (see ``contiguous_row``), so their loops vectorise
whatever the matrix's row stride.  Loops that do not start at 0 count in uint64: Numba then
drops the negative-index wraparound select, which otherwise splits every vector load.
"""

import math

import numpy as np
from numba import njit
from numba.extending import overload

from fastlsm.backends.cpu.kernels._simd import (block_max, contiguous_row, exp, exp_nonpositive,
                                                exp_summand, log1p, max_ignoring_nan)
from fastlsm.backends.formulas import excess_of, finite_or_zero, rescaled

# Elements per block of the statistics pass: small enough to stay in L1 between its max and its
# sum of exps, large enough that the per-block rescale costs nothing.
BLOCK = 2048


# A block's sum of exps, in three forms that row_stats takes as arguments: each caller of
# row_stats compiles only its own loops (one row_stats choosing among them at run time took ~4 s
# to compile, float32, and its call cost ~40 ns a row, more than a 10-class row's work).  Each
# form goes with the second pass over a dominated block (_excess) that reads what it left.

@njit(inline="always")
def _block_sum_exp(row, exps, start, stop, m):
    """The block's plain sum of exps, as :func:`row_stats` shifts them; ``exps`` unused."""
    # Summed in the row's dtype over one block (16 lanes of 128 float32 terms at most), then
    # added to a float64 total by the caller: ~1e-8 relative on 300k-element float32 rows.
    s = row.dtype.type(0.0)
    if not math.isfinite(m):
        for j in range(np.uint64(start), np.uint64(stop)):
            s += exp(row[j])  # shifted by 0: inf, nan or 0 as SciPy has it
        return float(s)
    # Every term is exp(<= 0) and the row's max adds exactly 1: exp_summand's cheaper form holds.
    c = row.dtype.type(m)
    for j in range(np.uint64(start), np.uint64(stop)):
        s += exp_summand(row[j] - c)
    return float(s)


@njit(inline="always")
def _block_rest_and_ties(row, exps, start, stop, m):
    """The second pass over a dominated block: each term exactly 1 (the max's, and any tie)
    counted apart from the rest."""
    c = row.dtype.type(m)
    one, zero = row.dtype.type(1.0), row.dtype.type(0.0)
    rest, ties = zero, zero
    for j in range(np.uint64(start), np.uint64(stop)):
        t = exp_summand(row[j] - c)
        tie = t == one
        rest += zero if tie else t
        ties += one if tie else zero
    return float(rest), float(ties)


@njit(inline="always")
def _store_exp_sum(row, exps, start, stop, c):
    # Every value less a finite max is <= 0 (or nan): exp_nonpositive, exp's bits at ~6
    # instructions fewer (float32 softmax 131072x1000 47-49 -> 43-44 ms).
    s = row.dtype.type(0.0)
    for j in range(np.uint64(start), np.uint64(stop)):
        t = exp_nonpositive(row[j] - c)
        exps[j] = t
        s += t
    return float(s)


@njit(inline="always")
def _block_store_exp(row, exps, start, stop, m):
    """:func:`_block_sum_exp`, storing each exp in ``exps``."""
    if not math.isfinite(m):
        # Shifted by 0: inf, nan or 0 as SciPy has it.  Rare rows, so one loop for in place
        # and not (each entry is read before it is written).
        s = row.dtype.type(0.0)
        for j in range(np.uint64(start), np.uint64(stop)):
            t = exp(row[j])
            exps[j] = t
            s += t
        return float(s)
    c = row.dtype.type(m)
    if exps.ctypes.data == row.ctypes.data:
        # In place (the front end hands a kernel the input itself or memory apart from it): a
        # loop over one array vectorises, where the two-array loop would fail LLVM's overlap
        # check and run scalar, ~5x slower.
        return _store_exp_sum(exps, exps, start, stop, c)
    return _store_exp_sum(row, exps, start, stop, c)


@njit(inline="always")
def _stored_rest_and_ties(row, exps, start, stop, m):
    """:func:`_block_rest_and_ties` from the exps :func:`_block_store_exp` stored."""
    one, zero = exps.dtype.type(1.0), exps.dtype.type(0.0)
    rest, ties = zero, zero
    for j in range(np.uint64(start), np.uint64(stop)):
        t = exps[j]
        tie = t == one
        rest += zero if tie else t
        ties += one if tie else zero
    return float(rest), float(ties)


@njit(inline="always")
def _store_shifted_sum_exp(row, shifted, start, stop, c):
    s = row.dtype.type(0.0)
    for j in range(np.uint64(start), np.uint64(stop)):
        t = row[j] - c
        shifted[j] = t
        s += exp_summand(t)
    return float(s)


@njit(inline="always")
def _block_store_shifted(row, shifted, start, stop, m):
    """:func:`_block_sum_exp`, writing ``row - shift`` to ``shifted`` as it goes."""
    c = row.dtype.type(finite_or_zero(m))
    if not math.isfinite(m):
        s = row.dtype.type(0.0)
        for j in range(np.uint64(start), np.uint64(stop)):
            t = row[j] - c
            shifted[j] = t
            s += exp(t)  # shifted by 0: inf, nan or 0 as SciPy has it
        return float(s)
    if shifted.ctypes.data == row.ctypes.data:
        return _store_shifted_sum_exp(shifted, shifted, start, stop, c)  # see above
    return _store_shifted_sum_exp(row, shifted, start, stop, c)


@njit(inline="always")
def _shifted_rest_and_ties(row, shifted, start, stop, m):
    """:func:`_block_rest_and_ties` from the values :func:`_block_store_shifted` wrote (the row
    itself may be gone)."""
    return _block_rest_and_ties(shifted, shifted, start, stop, 0.0)


@njit(inline="always")
def _excess(row, exps, start, stop, m, others, block_sum, rest_and_ties):
    """The excess ``e = s - 1`` of a row whose max ``m`` is in block ``start:stop``, from that
    block's plain sum of exps and the ``others`` (rescaled to ``m``).  Only a dominated row (a
    sum below 2) has that block summed again with its 1s counted apart (``rest_and_ties``): no
    other row pays for the precision."""
    s = others + block_sum
    if not (s < 2.0 and math.isfinite(m)):
        return s - 1.0  # exact for the 0, inf and nan of a row whose max is not finite
    rest, ties = rest_and_ties(row, exps, start, stop, m)
    return others + excess_of(rest, ties)


@njit(inline="always")
def row_stats(row, exps, block_maxima, block_sum, rest_and_ties):
    """``(m, e)``: the row's max (nan ignored) and the excess ``e = s - 1`` of
    ``s = sum(exp(row - shift))``, ``shift = m`` if finite else 0.

    A nan anywhere makes ``e`` nan; ``e`` is -1 for an all ``-inf`` or empty row and ``inf`` for a
    row holding ``+inf``.  ``block_sum`` sums a block's exps, storing in ``exps`` what it stores;
    on a row of more than one block, block ``b`` is shifted by its running max, which goes to
    ``block_maxima[b]`` (:func:`rescale_stored_exps`, :func:`add_block_shifts`).
    """
    n = row.shape[0]
    if n <= BLOCK:
        # One block needs no merge; skipping the loop cut 10-class rows by about a third.
        m = block_max(row, 0, n)
        return m, _excess(row, exps, 0, n, m, 0.0, block_sum(row, exps, 0, n, m), rest_and_ties)
    # The block holding the running max keeps its sum apart from the others' until the end, so
    # that a dominated row can have that block summed again with its 1s counted apart: doing so
    # for every block that held a new max cost 8192x32000 float32 logsumexp ~30% (standard
    # normal logits * 3, where a block's own sum is often below 2 but the row's is not).
    store = block_maxima.shape[0] > 0
    m = -np.inf
    others = 0.0
    max_sum = 0.0
    max_start = 0
    for block, start in enumerate(range(0, n, BLOCK)):
        stop = min(start + BLOCK, n)
        block_m = block_max(row, start, stop)
        if block_m > m:
            others = rescaled(others + max_sum, finite_or_zero(m), finite_or_zero(block_m))
            m = block_m
            max_start = start
            if store:
                block_maxima[block] = m
            max_sum = block_sum(row, exps, start, stop, m)
            continue
        # Every term of the block is one of the others: below the max, or a second term equal
        # to it.
        if store:
            block_maxima[block] = m
        others += block_sum(row, exps, start, stop, m)
    return m, _excess(row, exps, max_start, min(max_start + BLOCK, n), m, others, max_sum,
                      rest_and_ties)


# The block loops are inlined in these three, so their `reassoc` (which lets LLVM split a sum
# across SIMD lanes and assumes nothing about inf or nan) is what vectorises the sum of exps.
@njit(fastmath={"reassoc"})
def row_max_and_excess(row):
    """:func:`row_stats`, storing nothing."""
    return row_stats(row, row[:0], row[:0], _block_sum_exp, _block_rest_and_ties)


@njit(fastmath={"reassoc"})
def row_stats_storing_exps(row, exps, block_maxima):
    """:func:`row_stats` storing the exps in ``exps`` (the row's length; it may be the row)."""
    return row_stats(row, exps, block_maxima, _block_store_exp, _stored_rest_and_ties)


@njit(fastmath={"reassoc"})
def row_stats_storing_shifted(row, shifted, block_maxima):
    """:func:`row_stats` writing ``row - shift`` to ``shifted`` (the row's length; it may be the
    row) as it sums the exps: the row's shift for a row of one block, block ``b``'s running max
    (in ``block_maxima[b]``) for a longer one.

    For log_softmax, whose last pass then adds ``-log(s)`` and each block's own shift in cache
    (:func:`add_block_shifts`): the write stream hides behind the exps, where a last pass that
    reads the row and writes ``row - shift - log(s)`` has nothing to hide it behind (the rows
    where it pays: :data:`~fastlsm.backends.cpu.kernels.softmax.SHIFTED_STORE_MIN_CLASSES`).
    """
    return row_stats(row, shifted, block_maxima, _block_store_shifted, _shifted_rest_and_ties)


@njit(inline="always")
def add_block_shifts(shifted, block_maxima, m, log_s):
    """``shifted[j] += (shift_b - shift) - log_s``: log_softmax from the shifted row of
    :func:`row_stats_storing_shifted` (``shift_b`` block ``b``'s shift, ``shift`` the row's).
    Every term is at most 0, so the sum has no cancellation: ~3 roundings of relative error."""
    n = shifted.shape[0]
    if n <= BLOCK:
        c = shifted.dtype.type(-log_s)
        for j in range(n):
            shifted[j] += c
        return
    shift = finite_or_zero(m)
    for block, start in enumerate(range(0, n, BLOCK)):
        c = shifted.dtype.type((finite_or_zero(block_maxima[block]) - shift) - log_s)
        for j in range(np.uint64(start), np.uint64(min(start + BLOCK, n))):
            shifted[j] += c


@njit(inline="always")
def rescale_stored_exps(exps, block_maxima, m, factor):
    """``exps[j] *= exp(shift_b - m) * factor``: the stored exps of :func:`row_stats`, each block
    brought to the row's final (finite) max ``m`` and scaled, e.g. by ``1 / s`` for softmax."""
    n = exps.shape[0]
    if n <= BLOCK:
        f = exps.dtype.type(factor)
        for j in range(n):
            exps[j] *= f
        return
    for block, start in enumerate(range(0, n, BLOCK)):
        # A block whose running max was -inf stored zeros, and exp(-inf - m) = 0 keeps them 0.
        f = exps.dtype.type(math.exp(block_maxima[block] - m) * factor)
        for j in range(np.uint64(start), np.uint64(min(start + BLOCK, n))):
            exps[j] *= f


def block_maxima_rows(x):
    """Scratch for :func:`row_stats`: one running max per block of each row (none for 1 block)."""


@overload(block_maxima_rows)
def _block_maxima_rows_overload(x):
    def impl(x):
        blocks = (x.shape[1] + BLOCK - 1) // BLOCK
        return np.empty((x.shape[0], blocks if blocks > 1 else 0), x.dtype)
    return impl


# Rows per tile of the short-row kernels: a float64 tile of 32 classes (64 KiB, transposed copy
# included) still sits in L2, and the loop over tiles has enough iterations to share out.
TILE_ROWS = 256
SUM_COLUMNS = 8


# The short-row kernels share their tiles out as at most this many tasks, each with one set of
# scratch arrays (:func:`tile_scratch`) for all its tiles, not a set a tile: 2000000x10 float32
# logsumexp and log_softmax 2-5% faster (one thread: 24.7-25.3 -> 22.9-25.3 ms, 33.5-34.4 ->
# 32.5-33.2 ms; two runs, noisy).
MAX_TILE_TASKS = 256


@njit(inline="always")
def tile_tasks(n_rows):
    """How many tasks the tiles of ``n_rows`` rows make (a ``prange`` over them)."""
    return min((n_rows + TILE_ROWS - 1) // TILE_ROWS, MAX_TILE_TASKS)


@njit(inline="always")
def task_tiles(n_rows, task):
    """``(first, stop)``: the tiles of task number ``task``, as even a share as can be.  The
    kernels spell their loop over a task's tiles out: a generator yielding each tile's stats made
    2000000x10 logsumexp ~10% slower."""
    n_tiles = (n_rows + TILE_ROWS - 1) // TILE_ROWS
    tasks = tile_tasks(n_rows)
    return task * n_tiles // tasks, (task + 1) * n_tiles // tasks


@njit(inline="always")
def tile_bounds(n_rows, tile):
    first = tile * TILE_ROWS
    return first, min(first + TILE_ROWS, n_rows)


@njit(inline="always")
def tile_scratch(x):
    """A task's scratch for :func:`tile_stats` and :func:`log_sums`: the transposed tile, then
    per row its max and shift, its excess's rest and ties (float64), their partial sums in
    ``x``'s dtype, and the logs."""
    return (np.empty((x.shape[1], TILE_ROWS), x.dtype), np.empty(TILE_ROWS, x.dtype),
            np.empty(TILE_ROWS, x.dtype), np.empty(TILE_ROWS), np.empty(TILE_ROWS),
            np.empty(TILE_ROWS, x.dtype), np.empty(TILE_ROWS, x.dtype), np.empty(TILE_ROWS))


@njit(inline="always")
def row_log_sum(excess):
    """:func:`~fastlsm.backends.formulas.log_sum` with the branch-free ``log1p`` of
    :mod:`._simd` (the same answers, special values included: tests/test_simd): libm's scalar
    call took ~14 ns a row, ~10% of a 128-class row's log_softmax (256x128, one thread: 22.2
    -> 19.9 us)."""
    return log1p(excess)


@njit(inline="always")
def log_sums(excesses, out):
    """``out``: :func:`row_log_sum` of each excess of a tile or strip, in one vectorised loop
    (libm's scalar ``log1p`` a row cost as much as a 10-class row's exps); ``out`` may be longer
    than ``excesses``.  Returns the part written."""
    for r in range(excesses.shape[0]):
        out[r] = row_log_sum(excesses[r])
    return out[:excesses.shape[0]]


@njit(fastmath={"reassoc"})
def tile_stats(x, first, last, scratch):
    """``(maxima, excesses)``: :func:`row_max_and_excess` of rows ``first:last`` of ``x``; the
    maxima in ``x``'s dtype, the excesses in float64 (a float32 sum of 32 terms, one after the
    other, can be off by more than float32's own rounding of the result).  Both are views of
    ``scratch`` (:func:`tile_scratch`), good until its next tile.

    The rows are copied into a transposed tile, so every loop below runs over the rows, as many
    per instruction as SIMD lanes, whatever the number of classes.
    """
    n_rows = last - first
    n_classes = x.shape[1]
    columns, maxima, shifts, rests, ties, partial, partial_ties = scratch[:7]
    maxima, shifts, rests, ties = maxima[:n_rows], shifts[:n_rows], rests[:n_rows], ties[:n_rows]
    partial, partial_ties = partial[:n_rows], partial_ties[:n_rows]
    # Column by column: the strided reads compile to AVX-512 gathers, the writes to vector
    # stores, where the row by row copy ran scalar.  One thread, the tiles of 1M rows: 10
    # float32 classes 6.6 -> 2.8 ms, 32 classes 21 -> 16 ms (float64: 7.9 -> 6.4, 66 -> 50).
    # Unsigned indices drop Numba's wraparound select.
    for j in range(np.uint64(0), np.uint64(n_classes)):
        column = contiguous_row(columns, j)
        for r in range(np.uint64(0), np.uint64(n_rows)):
            column[r] = x[np.uint64(first) + r, j]
    maxima[:] = -np.inf
    for j in range(n_classes):
        column = contiguous_row(columns, j)
        for r in range(n_rows):
            maxima[r] = max_ignoring_nan(maxima[r], column[r])
    for r in range(n_rows):
        shifts[r] = finite_or_zero(maxima[r])
    # Summed in the rows' dtype over SUM_COLUMNS classes at a time, then in float64: adding
    # every float32 term to a float64 sum costs ~40% of the kernel's time.  The 1s are counted
    # apart in the same pass: summing a dominated row again instead made 10-class rows of
    # standard normals * 3 (half of them dominated) 3.5x slower.
    rests[:] = 0.0
    ties[:] = 0.0
    for start in range(0, n_classes, SUM_COLUMNS):
        partial[:] = 0.0
        partial_ties[:] = 0.0
        for j in range(start, min(start + SUM_COLUMNS, n_classes)):
            column = contiguous_row(columns, j)
            for r in range(n_rows):
                split_term(exp(column[r] - shifts[r]), partial, partial_ties, r)
        for r in range(n_rows):
            rests[r] += partial[r]
            ties[r] += partial_ties[r]
    for r in range(n_rows):
        rests[r] = excess_of(rests[r], ties[r])
    return maxima, rests


@njit(inline="always")
def split_term(t, rest, ties, i):
    """``t`` added to ``ties[i]`` as a count where it is exactly 1 (the max's own term), else to
    ``rest[i]``: the tiled and column kernels' sums, in one order, so they give the same bits."""
    one, zero = rest.dtype.type(1.0), rest.dtype.type(0.0)
    tie = t == one
    rest[i] += zero if tie else t
    ties[i] += one if tie else zero


@njit
def row_log_sum_exp(row):
    """``(m, e, log(s), lse)``: :func:`row_max_and_excess` and the row's log-sum-exp."""
    m, e = row_max_and_excess(row)
    log_s = row_log_sum(e)
    return m, e, log_s, finite_or_zero(m) + log_s


@njit(fastmath={"reassoc"})
def row_sum(row):
    s = 0.0
    for j in range(row.shape[0]):
        s += row[j]
    return s


@njit(fastmath={"reassoc"})
def row_dot(a, b):
    s = 0.0
    for j in range(a.shape[0]):
        s += a[j] * b[j]
    return s


# --- classes along a strided axis ------------------------------------------------------------
# A ``(batch, classes, width)`` array whose width axis is contiguous: ``axis=0`` of a C-ordered
# array, the last axis of a Fortran-ordered one, PyTorch's ``(N, C, d)``.  Each row of the
# softmax problem is a column here; a strip of COLUMN_TILE neighbouring columns is read class by
# class, every load a contiguous run, with the columns across SIMD lanes -- no transposed copy.

COLUMN_TILE = 64   # columns per strip: 256 B of float32 per class, so a class block stays in L1
CLASS_BLOCK = 32   # classes per step of the online (max, sum) merge


@njit(inline="always")
def column_strips(x):
    """Strips per batch entry of a ``(batch, classes, width)`` array."""
    return (x.shape[2] + COLUMN_TILE - 1) // COLUMN_TILE


@njit
def column_stats(slab, first, last):
    """``(maxima, shifts, excesses)`` of columns ``first:last`` of the ``(classes, width)``
    ``slab``: :func:`row_stats` of each column, ``shifts = finite_or_zero(maxima)``, in one read
    (the 1s counted apart as in :func:`tile_stats`)."""
    width = last - first
    n_classes = slab.shape[0]
    maxima = np.full(width, -np.inf, slab.dtype)
    shifts = np.zeros(width, slab.dtype)
    rests = np.zeros(width)
    ties = np.zeros(width)
    partial = np.empty(width, slab.dtype)
    partial_ties = np.empty(width, slab.dtype)
    for start in range(0, n_classes, CLASS_BLOCK):
        stop = min(start + CLASS_BLOCK, n_classes)
        for c in range(start, stop):
            column = contiguous_row(slab, c)[first:last]
            for w in range(width):
                maxima[w] = max_ignoring_nan(maxima[w], column[w])
        for w in range(width):
            shift = finite_or_zero(maxima[w])
            if shift != shifts[w]:
                # formulas.rescaled, in float64, with the vectorised exp (math.exp would run
                # this loop one column at a time); the old max's 1s join the rest, scaled.
                total = rests[w] + ties[w]
                brought = total * exp(float(shifts[w]) - float(shift))
                rests[w] = brought if total != 0.0 else 0.0
                ties[w] = 0.0
                shifts[w] = shift
        for group in range(start, stop, SUM_COLUMNS):
            partial[:] = 0.0
            partial_ties[:] = 0.0
            for c in range(group, min(group + SUM_COLUMNS, stop)):
                column = contiguous_row(slab, c)[first:last]
                for w in range(width):
                    split_term(exp(column[w] - shifts[w]), partial, partial_ties, w)
            for w in range(width):
                rests[w] += partial[w]
                ties[w] += partial_ties[w]
    for w in range(width):
        rests[w] = excess_of(rests[w], ties[w])
    return maxima, shifts, rests


@njit(inline="always")
def strip_bounds(x, task):
    """``(b, first, last)``: the batch entry and columns of task number ``task``."""
    strips = column_strips(x)
    b = task // strips
    first = (task % strips) * COLUMN_TILE
    return b, first, min(first + COLUMN_TILE, x.shape[2])

