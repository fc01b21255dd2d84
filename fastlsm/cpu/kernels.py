"""Row-wise log_softmax / softmax / logsumexp kernels and their backward passes.

Every ``*_rows`` kernel takes 2-D arrays whose last axis is the class axis, with contiguous rows
(unit column stride: the dispatcher guarantees it), and loops over rows with ``prange``;
:func:`rowwise` compiles each kernel twice, as a parallel and as a serial kernel, so the
dispatcher can skip thread start-up on small inputs.

A row is read from memory once for its statistics: it is walked in blocks that fit in L1, each
block's max is found first and the block's ``exp`` sum is then taken from cache, and the running
sum is rescaled when the max grows (the online (max, sum) merge).  The write pass reads the row a
second time, from L2 for rows up to ~1 MiB.

Rows of a few classes have a ``*_short_rows`` twin: a loop over one short row is mostly vector
tails and horizontal reductions, so those kernels take rows a tile at a time and find the tile's
statistics with the rows across SIMD lanes (:func:`tile_stats`).  The ``*_columns`` kernels do
the same in place for arrays whose class axis is strided and whose rows are side by side in
memory (:func:`column_stats`).
"""

import math
from types import FunctionType
from typing import NamedTuple

import numpy as np
from numba import njit, prange
from numba.extending import overload

from fastlsm.cpu._simd import contiguous_row, exp, exp_summand, max_ignoring_nan

# Elements per block of the statistics pass: small enough to stay in L1 between its max and its
# sum of exps, large enough that the per-block rescale costs nothing.
BLOCK = 2048


class RowKernel(NamedTuple):
    parallel: object
    serial: object


def rowwise(py_func):
    """Compile ``py_func`` (a loop over ``prange``) as a parallel and as a serial kernel."""
    # Numba's cache keys on the function's qualified name and bytecode, not on ``parallel``:
    # the serial twin gets a name of its own so the two never share a cache entry.
    serial_func = FunctionType(py_func.__code__, py_func.__globals__, py_func.__name__ + "_serial")
    serial_func.__qualname__ = py_func.__qualname__ + "_serial"
    return RowKernel(
        parallel=njit(parallel=True, cache=True, nogil=True)(py_func),
        serial=njit(cache=True, nogil=True)(serial_func),
    )


@njit(inline="always")
def finite_or_zero(m):
    # SciPy shifts by the max only where it is finite: a +inf or all -inf row is shifted by 0,
    # which gives its documented nan / -inf answers instead of inf - inf everywhere.
    return m if math.isfinite(m) else 0.0


# Helpers take one row as a C-ordered 1-D array (see ``contiguous_row``), so their loops vectorise
# whatever the matrix's row stride.  Loops that do not start at 0 count in uint64: Numba then
# drops the negative-index wraparound select, which otherwise splits every vector load.

@njit(inline="always")
def _block_max(row, start, stop):
    m = row.dtype.type(-np.inf)
    for j in range(np.uint64(start), np.uint64(stop)):
        m = max_ignoring_nan(m, row[j])
    return m


@njit(inline="always")
def _block_sum_exp(row, start, stop, m):
    # Summed in the row's dtype over one block (16 lanes of 128 float32 terms at most), then
    # added to a float64 total by the caller: ~1e-8 relative on 300k-element float32 rows.
    s = row.dtype.type(0.0)
    if not math.isfinite(m):
        for j in range(np.uint64(start), np.uint64(stop)):
            s += exp(row[j])  # shifted by 0: inf, nan or 0 as SciPy has it
        return s
    # Every term is exp(<= 0) and the row's max adds exactly 1: exp_summand's cheaper form holds.
    c = row.dtype.type(m)
    for j in range(np.uint64(start), np.uint64(stop)):
        s += exp_summand(row[j] - c)
    return s


@njit(inline="always")
def _block_store_exp(row, exps, start, stop, shift):
    c = row.dtype.type(shift)
    for j in range(np.uint64(start), np.uint64(stop)):
        exps[j] = exp(row[j] - c)
    # Summed in a loop of its own, over the stored block in L1: when `exps` is the row itself the
    # loop above runs scalar (LLVM's overlap check), and this keeps the summation order, hence
    # the result, the same as out of place.
    s = row.dtype.type(0.0)
    for j in range(np.uint64(start), np.uint64(stop)):
        s += exps[j]
    return s


# The block loops are inlined here, so this function's `reassoc` (which lets LLVM split a sum
# across SIMD lanes and assumes nothing about inf or nan) is what vectorises the sum of exps.
@njit(fastmath={"reassoc"})
def row_stats(row, exps, block_maxima):
    """``(m, s)``: the row's max (nan ignored) and ``s = sum(exp(row - shift))``,
    ``shift = m`` if finite else 0.

    A nan anywhere makes ``s`` nan; ``s`` is 0 for an all ``-inf`` or empty row and ``inf`` for a
    row holding ``+inf``.  Where ``exps`` has the row's length (it may be the row itself) it
    also receives each ``exp``, block ``b`` shifted by its running max, which goes to
    ``block_maxima[b]`` for :func:`rescale_stored_exps`; pass empty arrays to store nothing.
    """
    store = exps.shape[0] > 0
    n = row.shape[0]
    if n <= BLOCK:
        # One block needs no merge; skipping the loop cut 10-class rows by about a third.
        m = _block_max(row, 0, n)
        shift = finite_or_zero(m)
        s = _block_store_exp(row, exps, 0, n, shift) if store else _block_sum_exp(row, 0, n, m)
        return m, float(s)
    m = -np.inf
    s = 0.0
    for block, start in enumerate(range(0, n, BLOCK)):
        stop = min(start + BLOCK, n)
        block_m = _block_max(row, start, stop)
        if block_m > m:
            # s == 0 guards the -inf -> finite step, where exp(0 - m) can overflow and 0 * inf is nan.
            if s != 0.0:
                s *= math.exp(finite_or_zero(m) - finite_or_zero(block_m))
            m = block_m
        if store:
            block_maxima[block] = m
            s += _block_store_exp(row, exps, start, stop, finite_or_zero(m))
        else:
            s += _block_sum_exp(row, start, stop, m)
    return m, s


@njit(fastmath={"reassoc"})
def row_max_and_sum(row):
    """:func:`row_stats` without storing the exps."""
    n = row.shape[0]
    if n <= BLOCK:
        # The one-block case spelled out: going through row_stats cost ~40 ns a row (more than
        # the whole work of a 10-class row).
        m = _block_max(row, 0, n)
        return m, float(_block_sum_exp(row, 0, n, m))
    return row_stats(row, row[:0], row[:0])


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


@njit(inline="always")
def tile_bounds(n_rows, tile):
    first = tile * TILE_ROWS
    return first, min(first + TILE_ROWS, n_rows)


@njit(fastmath={"reassoc"})
def tile_stats(x, first, last):
    """``(maxima, sums)``: :func:`row_max_and_sum` of rows ``first:last`` of ``x``; the maxima
    in ``x``'s dtype, the sums in float64 (a float32 sum of 32 terms, one after the other, can
    be off by more than float32's own rounding of the result).

    The rows are copied into a transposed tile, so every loop below runs over the rows, as many
    per instruction as SIMD lanes, whatever the number of classes.
    """
    n_rows = last - first
    n_classes = x.shape[1]
    columns = np.empty((n_classes, n_rows), x.dtype)
    for r in range(n_rows):
        row = contiguous_row(x, first + r)
        for j in range(n_classes):
            columns[j, r] = row[j]
    maxima = np.full(n_rows, -np.inf, x.dtype)
    for j in range(n_classes):
        column = contiguous_row(columns, j)
        for r in range(n_rows):
            maxima[r] = max_ignoring_nan(maxima[r], column[r])
    shifts = np.empty(n_rows, x.dtype)
    for r in range(n_rows):
        shifts[r] = finite_or_zero(maxima[r])
    # Summed in the rows' dtype over SUM_COLUMNS classes at a time, then in float64: adding
    # every float32 term to a float64 sum costs ~40% of the kernel's time.
    sums = np.zeros(n_rows)
    partial = np.empty(n_rows, x.dtype)
    for start in range(0, n_classes, SUM_COLUMNS):
        partial[:] = 0.0
        for j in range(start, min(start + SUM_COLUMNS, n_classes)):
            column = contiguous_row(columns, j)
            for r in range(n_rows):
                partial[r] += exp(column[r] - shifts[r])
        for r in range(n_rows):
            sums[r] += partial[r]
    return maxima, sums


@njit
def row_log_sum_exp(row):
    """``(m, s, log(s), lse)``: :func:`row_max_and_sum` and the row's log-sum-exp."""
    m, s = row_max_and_sum(row)
    log_s = math.log(s)
    return m, s, log_s, finite_or_zero(m) + log_s


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


@njit(inline="always")
def write_log_softmax(row, dst, m, s):
    c = row.dtype.type(finite_or_zero(m))
    log_s = row.dtype.type(math.log(s))
    for j in range(row.shape[0]):
        dst[j] = (row[j] - c) - log_s


@rowwise
def log_softmax_rows(x, out):
    for i in prange(x.shape[0]):
        row = contiguous_row(x, i)
        m, s = row_max_and_sum(row)
        write_log_softmax(row, contiguous_row(out, i), m, s)


@rowwise
def log_softmax_short_rows(x, out):
    for tile in prange((x.shape[0] + TILE_ROWS - 1) // TILE_ROWS):
        first, last = tile_bounds(x.shape[0], tile)
        maxima, sums = tile_stats(x, first, last)
        for i in range(first, last):
            write_log_softmax(contiguous_row(x, i), contiguous_row(out, i),
                              maxima[i - first], sums[i - first])


@rowwise
def softmax_rows(x, out):
    # The stats pass stores the exps in `out`, and the second pass only rescales them.
    block_maxima = block_maxima_rows(x)
    for i in prange(x.shape[0]):
        row, dst = contiguous_row(x, i), contiguous_row(out, i)
        maxima = contiguous_row(block_maxima, i)
        m, s = row_stats(row, dst, maxima)
        if not math.isfinite(m):
            # SciPy's softmax shifts by the max even when it is not finite: such rows are nan.
            dst[:] = np.nan
            continue
        rescale_stored_exps(dst, maxima, m, 1.0 / s)


@rowwise
def softmax_short_rows(x, out):
    for tile in prange((x.shape[0] + TILE_ROWS - 1) // TILE_ROWS):
        first, last = tile_bounds(x.shape[0], tile)
        maxima, sums = tile_stats(x, first, last)
        for i in range(first, last):
            row, dst = contiguous_row(x, i), contiguous_row(out, i)
            m = maxima[i - first]
            if not math.isfinite(m):
                dst[:] = np.nan
                continue
            scale = row.dtype.type(1.0 / sums[i - first])
            for j in range(row.shape[0]):
                dst[j] = exp(row[j] - m) * scale


@rowwise
def logsumexp_rows(x, out):
    for i in prange(x.shape[0]):
        out[i] = row_log_sum_exp(contiguous_row(x, i))[3]


@rowwise
def logsumexp_short_rows(x, out):
    for tile in prange((x.shape[0] + TILE_ROWS - 1) // TILE_ROWS):
        first, last = tile_bounds(x.shape[0], tile)
        maxima, sums = tile_stats(x, first, last)
        for r in range(last - first):
            out[first + r] = finite_or_zero(float(maxima[r])) + math.log(sums[r])


@rowwise
def log_softmax_backward_rows(grad_output, output, grad_input):
    for i in prange(grad_output.shape[0]):
        g, y = contiguous_row(grad_output, i), contiguous_row(output, i)
        dst = contiguous_row(grad_input, i)
        total = g.dtype.type(row_sum(g))
        for j in range(g.shape[0]):
            dst[j] = g[j] - exp(y[j]) * total


@rowwise
def softmax_backward_rows(grad_output, output, grad_input):
    for i in prange(grad_output.shape[0]):
        g, y = contiguous_row(grad_output, i), contiguous_row(output, i)
        dst = contiguous_row(grad_input, i)
        dot = g.dtype.type(row_dot(g, y))
        for j in range(g.shape[0]):
            dst[j] = y[j] * (g[j] - dot)


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
    """``(maxima, shifts, sums)`` of columns ``first:last`` of the ``(classes, width)`` ``slab``:
    :func:`row_stats` of each column, ``shifts = finite_or_zero(maxima)``, in one read."""
    width = last - first
    n_classes = slab.shape[0]
    maxima = np.full(width, -np.inf, slab.dtype)
    shifts = np.zeros(width, slab.dtype)
    sums = np.zeros(width)
    partial = np.empty(width, slab.dtype)
    for start in range(0, n_classes, CLASS_BLOCK):
        stop = min(start + CLASS_BLOCK, n_classes)
        for c in range(start, stop):
            column = contiguous_row(slab, c)[first:last]
            for w in range(width):
                maxima[w] = max_ignoring_nan(maxima[w], column[w])
        for w in range(width):
            shift = finite_or_zero(maxima[w])
            # In float64: a column's sum may be rescaled once per block.  s == 0 guards the
            # -inf -> finite step, where exp(0 - shift) can overflow and 0 * inf is nan.
            rescaled = sums[w] * exp(float(shifts[w]) - float(shift))
            sums[w] = rescaled if sums[w] != 0.0 else 0.0
            shifts[w] = shift
        for group in range(start, stop, SUM_COLUMNS):
            partial[:] = 0.0
            for c in range(group, min(group + SUM_COLUMNS, stop)):
                column = contiguous_row(slab, c)[first:last]
                for w in range(width):
                    partial[w] += exp(column[w] - shifts[w])
            for w in range(width):
                sums[w] += partial[w]
    return maxima, shifts, sums


@njit(inline="always")
def strip_bounds(x, task):
    """``(b, first, last)``: the batch entry and columns of task number ``task``."""
    strips = column_strips(x)
    b = task // strips
    first = (task % strips) * COLUMN_TILE
    return b, first, min(first + COLUMN_TILE, x.shape[2])


@rowwise
def log_softmax_columns(x, out):
    for task in prange(x.shape[0] * column_strips(x)):
        b, first, last = strip_bounds(x, task)
        slab, dst = x[b], out[b]
        maxima, shifts, sums = column_stats(slab, first, last)
        log_sums = np.log(sums).astype(x.dtype)
        for c in range(slab.shape[0]):
            column = contiguous_row(slab, c)[first:last]
            dst_column = contiguous_row(dst, c)[first:last]
            for w in range(last - first):
                dst_column[w] = (column[w] - shifts[w]) - log_sums[w]


@rowwise
def softmax_columns(x, out):
    for task in prange(x.shape[0] * column_strips(x)):
        b, first, last = strip_bounds(x, task)
        slab, dst = x[b], out[b]
        maxima, shifts, sums = column_stats(slab, first, last)
        # A column whose max is not finite is all nan (SciPy), as in softmax_rows.
        scales = np.where(np.isfinite(maxima), 1.0 / sums, np.nan).astype(x.dtype)
        for c in range(slab.shape[0]):
            column = contiguous_row(slab, c)[first:last]
            dst_column = contiguous_row(dst, c)[first:last]
            for w in range(last - first):
                dst_column[w] = exp(column[w] - shifts[w]) * scales[w]


@rowwise
def logsumexp_columns(x, out):
    """``out[b, w]``: the log-sum-exp of ``x[b, :, w]``."""
    for task in prange(x.shape[0] * column_strips(x)):
        b, first, last = strip_bounds(x, task)
        maxima, shifts, sums = column_stats(x[b], first, last)
        for w in range(last - first):
            out[b, first + w] = float(shifts[w]) + math.log(sums[w])


# Square tiles of a 2-D copy: both the source's rows and the destination's stay in cache while a
# tile is transposed, whatever the two layouts.
COPY_TILE = 64


@rowwise
def copy_tiles(src, dst):
    """``dst[...] = src`` for ``(batch, rows, columns)`` arrays of any layouts."""
    batches, rows, columns = src.shape
    row_tiles = (rows + COPY_TILE - 1) // COPY_TILE
    for task in prange(batches * row_tiles):
        b = task // row_tiles
        first = (task % row_tiles) * COPY_TILE
        last = min(rows, first + COPY_TILE)
        for column in range(0, columns, COPY_TILE):
            for i in range(first, last):
                for j in range(column, min(columns, column + COPY_TILE)):
                    dst[b, i, j] = src[b, i, j]
