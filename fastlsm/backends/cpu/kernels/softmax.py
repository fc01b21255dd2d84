"""log_softmax, softmax and logsumexp on the CPU, one kernel per layout (see
:class:`~fastlsm.backends.cpu.runtime.RowKernels`), and the bundles that gather them.

Every ``*_rows`` kernel takes 2-D arrays whose last axis is the class axis, with contiguous rows
(unit column stride: the CPU backend guarantees it), and loops over rows with ``prange``;
``*_short_rows`` take them a tile at a time (:func:`~.stats.tile_stats`), ``*_columns`` a
``(batch, classes, width)`` view whose rows are side by side in memory (:func:`~.stats.column_stats`).
"""

import math

import numpy as np
from numba import njit, prange

from fastlsm.backends.cpu.kernels._simd import contiguous_row, exp_nonpositive
from fastlsm.backends.cpu.kernels.stats import (add_block_shifts, block_maxima_rows, column_stats,
                                                column_strips, log_sums, rescale_stored_exps,
                                                row_log_sum, row_log_sum_exp, row_max_and_excess,
                                                row_stats_storing_exps, row_stats_storing_shifted,
                                                strip_bounds, task_tiles, tile_bounds,
                                                tile_scratch, tile_stats, tile_tasks)
from fastlsm.backends.cpu.runtime import RowKernels, rowwise
from fastlsm.backends.formulas import finite_or_zero


@njit(inline="always")
def write_log_softmax(row, dst, m, log_s):
    c = row.dtype.type(finite_or_zero(m))
    c_log_s = row.dtype.type(log_s)
    for j in range(row.shape[0]):
        dst[j] = (row[j] - c) - c_log_s


# From this many classes, log_softmax writes the shifted row as it sums the exps
# (row_stats_storing_shifted).  Measured, float32, 2 threads, cached kernels: 131072x1000 57 -> 49
# ms, 8192x2000 7.6 -> 6.6 ms, 200000x512 40 -> 34 ms; below, 1-4% slower (100 and 256 classes).
# Rows of several blocks, each block shifted by its running max: 8192x32000 134-140 -> 115-118 ms
# (in place 109-114 -> 83-87), 16384x5000 43-46 -> 34-35 ms.
SHIFTED_STORE_MIN_CLASSES = 512


@rowwise
def log_softmax_rows(x, out):
    block_maxima = block_maxima_rows(x)
    for i in prange(x.shape[0]):
        row, dst = contiguous_row(x, i), contiguous_row(out, i)
        if row.shape[0] >= SHIFTED_STORE_MIN_CLASSES:
            maxima = contiguous_row(block_maxima, i)
            m, e = row_stats_storing_shifted(row, dst, maxima)
            add_block_shifts(dst, maxima, m, row_log_sum(e))
        else:
            m, e = row_max_and_excess(row)
            write_log_softmax(row, dst, m, row_log_sum(e))


@rowwise
def log_softmax_short_rows(x, out):
    for task in prange(tile_tasks(x.shape[0])):
        scratch = tile_scratch(x)
        first_tile, stop_tile = task_tiles(x.shape[0], task)
        for tile in range(first_tile, stop_tile):
            first, last = tile_bounds(x.shape[0], tile)
            maxima, excesses = tile_stats(x, first, last, scratch)
            log_s = log_sums(excesses, scratch[7])
            for i in range(first, last):
                write_log_softmax(contiguous_row(x, i), contiguous_row(out, i),
                                  maxima[i - first], log_s[i - first])


@rowwise
def softmax_rows(x, out):
    # The stats pass stores the exps in `out`, and the second pass only rescales them.
    block_maxima = block_maxima_rows(x)
    for i in prange(x.shape[0]):
        row, dst = contiguous_row(x, i), contiguous_row(out, i)
        maxima = contiguous_row(block_maxima, i)
        m, e = row_stats_storing_exps(row, dst, maxima)
        if not math.isfinite(m):
            # SciPy's softmax shifts by the max even when it is not finite: such rows are nan.
            dst[:] = np.nan
            continue
        rescale_stored_exps(dst, maxima, m, 1.0 / (1.0 + e))


@rowwise
def softmax_short_rows(x, out):
    for task in prange(tile_tasks(x.shape[0])):
        scratch = tile_scratch(x)
        first_tile, stop_tile = task_tiles(x.shape[0], task)
        for tile in range(first_tile, stop_tile):
            first, last = tile_bounds(x.shape[0], tile)
            maxima, excesses = tile_stats(x, first, last, scratch)
            for i in range(first, last):
                row, dst = contiguous_row(x, i), contiguous_row(out, i)
                m = maxima[i - first]
                if not math.isfinite(m):
                    dst[:] = np.nan
                    continue
                scale = row.dtype.type(1.0 / (1.0 + excesses[i - first]))
                for j in range(row.shape[0]):
                    dst[j] = exp_nonpositive(row[j] - m) * scale


@rowwise
def logsumexp_rows(x, out):
    for i in prange(x.shape[0]):
        out[i] = row_log_sum_exp(contiguous_row(x, i))[3]


@rowwise
def logsumexp_short_rows(x, out):
    for task in prange(tile_tasks(x.shape[0])):
        scratch = tile_scratch(x)
        first_tile, stop_tile = task_tiles(x.shape[0], task)
        for tile in range(first_tile, stop_tile):
            first, last = tile_bounds(x.shape[0], tile)
            maxima, excesses = tile_stats(x, first, last, scratch)
            log_s = log_sums(excesses, scratch[7])
            for r in range(last - first):
                out[first + r] = finite_or_zero(float(maxima[r])) + log_s[r]


@rowwise
def log_softmax_columns(x, out):
    for task in prange(x.shape[0] * column_strips(x)):
        b, first, last = strip_bounds(x, task)
        slab, dst = x[b], out[b]
        maxima, shifts, excesses = column_stats(slab, first, last)
        log_s = log_sums(excesses, np.empty_like(excesses)).astype(x.dtype)
        for c in range(slab.shape[0]):
            column = contiguous_row(slab, c)[first:last]
            dst_column = contiguous_row(dst, c)[first:last]
            for w in range(last - first):
                dst_column[w] = (column[w] - shifts[w]) - log_s[w]


@rowwise
def softmax_columns(x, out):
    for task in prange(x.shape[0] * column_strips(x)):
        b, first, last = strip_bounds(x, task)
        slab, dst = x[b], out[b]
        maxima, shifts, excesses = column_stats(slab, first, last)
        # A column whose max is not finite is all nan (SciPy), as in softmax_rows.
        scales = np.where(np.isfinite(maxima), 1.0 / (1.0 + excesses), np.nan).astype(x.dtype)
        for c in range(slab.shape[0]):
            column = contiguous_row(slab, c)[first:last]
            dst_column = contiguous_row(dst, c)[first:last]
            for w in range(last - first):
                dst_column[w] = exp_nonpositive(column[w] - shifts[w]) * scales[w]


@rowwise
def logsumexp_columns(x, out):
    """``out[b, w]``: the log-sum-exp of ``x[b, :, w]``."""
    for task in prange(x.shape[0] * column_strips(x)):
        b, first, last = strip_bounds(x, task)
        maxima, shifts, excesses = column_stats(x[b], first, last)
        log_s = log_sums(excesses, np.empty_like(excesses))
        for w in range(last - first):
            out[b, first + w] = float(shifts[w]) + log_s[w]


LOG_SOFTMAX = RowKernels(rows=log_softmax_rows, short_rows=log_softmax_short_rows,
                         columns=log_softmax_columns)
SOFTMAX = RowKernels(rows=softmax_rows, short_rows=softmax_short_rows, columns=softmax_columns)
LOGSUMEXP = RowKernels(rows=logsumexp_rows, short_rows=logsumexp_short_rows,
                       columns=logsumexp_columns)
