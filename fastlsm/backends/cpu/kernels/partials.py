"""Kernels for rows split across blocks of classes: per-block partials, their merge, and the
finishing passes.

A Dask array chunked along its class axis holds each row in several blocks.  The Dask backend
(through :mod:`fastlsm.backends.cpu.split`) reduces every block to per-row partials with a
``partials`` kernel, merges the partials of a row chunk's blocks with a ``merge`` kernel, and hands
the merged statistics back to every block, whose ``finish`` kernel writes its part of the result;
:class:`SplitKernels` bundles the three of an operation.  Partials are float64 ``(rows, k)``
arrays a block, concatenated to ``(rows, blocks, k)`` for the merge; merged statistics are
float64 ``(rows, k)``, as each kernel's docstring says.

The partials of the softmax family are :func:`~.stats.row_max_and_excess`'s ``(m, e)``: the
block's max ``m`` (nan ignored) and the excess ``e = s - 1`` of ``s = sum(exp(x - shift))``,
``shift = finite_or_zero(m)``, so that blocks merge as semantics.md's ``(max, sum)`` pair
(:func:`merged_max_excess`) with a dominant entry's precision kept, and a row's non-finite
answers come out as in the unsplit kernels.  The merges and finishing passes use the
formulas of :mod:`fastlsm.backends.formulas` with the row's merged statistics in place of the ones
a single pass would find.
"""

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from fastlsm.backends.cpu.kernels._simd import contiguous_row, exp, exp_nonpositive
from fastlsm.backends.cpu.kernels.loss import (row_smoothed_sums, row_weighted_sum,
                                               write_probability_grad, write_softmax_grad,
                                               write_target_gradient)
from fastlsm.backends.cpu.kernels.softmax import write_log_softmax
from fastlsm.backends.cpu.kernels.stats import (row_dot, row_max_and_excess, row_sum,
                                                task_tiles, tile_bounds, tile_scratch,
                                                tile_stats, tile_tasks)
from fastlsm.backends.cpu.runtime import Kernel, RowKernels, rowwise
from fastlsm.backends.formulas import (class_index_gradient, class_index_loss, finite_or_zero,
                                       log_sum, merged_excess, probability_gradient,
                                       probability_loss, reshifted, row_scale)


@dataclass(frozen=True)
class SplitKernels:
    """An operation on rows split across blocks: ``partials`` of each block, their ``merge``
    for a chunk of rows, and the ``finish`` that writes each block's part of the result (None
    for a reduction, which the merge completes)."""
    partials: RowKernels
    merge: Kernel
    finish: Kernel | None


# --- partials ----------------------------------------------------------------------------------

@rowwise
def max_excess_partials_rows(x, partials):
    """``partials[i] = (m, e)`` of row ``i`` of the block ``x``."""
    for i in prange(x.shape[0]):
        m, e = row_max_and_excess(contiguous_row(x, i))
        partials[i, 0] = m
        partials[i, 1] = e


@rowwise
def max_excess_partials_short_rows(x, partials):
    for task in prange(tile_tasks(x.shape[0])):
        scratch = tile_scratch(x)
        first_tile, stop_tile = task_tiles(x.shape[0], task)
        for tile in range(first_tile, stop_tile):
            first, last = tile_bounds(x.shape[0], tile)
            maxima, excesses = tile_stats(x, first, last, scratch)
            for r in range(last - first):
                partials[first + r, 0] = maxima[r]
                partials[first + r, 1] = excesses[r]


@rowwise
def sum_partials_rows(x, partials):
    """``partials[i, 0] = sum(x[i])`` (log_softmax's backward pass needs the row's sum)."""
    for i in prange(x.shape[0]):
        partials[i, 0] = row_sum(contiguous_row(x, i))


@rowwise
def dot_partials_rows(a, b, partials):
    """``partials[i, 0] = sum(a[i] * b[i])`` (softmax's backward pass needs the row's dot)."""
    for i in prange(a.shape[0]):
        partials[i, 0] = row_dot(contiguous_row(a, i), contiguous_row(b, i))


# A row's cross-entropy partials: CROSS_ENTROPY_PARTIALS columns, PROBABILITY_PARTIALS with
# probability targets.  With a row split over blocks, the target's logit and weight come from the
# one block holding the target, and the sums over classes that label smoothing and probability
# targets need are summed per block, each shifted by its block's `shift`; the merge re-shifts
# them to the row's.
CROSS_ENTROPY_PARTIALS = 6
PROBABILITY_PARTIALS = 4


@rowwise
def cross_entropy_partials_rows(x, target, first_class, weight, smoothing, partials):
    """``partials[i] = (m, e, x_t, w_t, ws, W_b)`` for classes ``first_class:first_class + C_b``.

    ``x_t`` and ``w_t`` are the target's logit and weight where the target falls in this block,
    0 elsewhere; ``ws = sum_c weight[c] * (x[i, c] - shift)`` where ``smoothing`` is set, else 0;
    ``W_b`` the block's weight total.  ``weight`` holds this block's classes only.
    """
    n_classes = x.shape[1]
    block_weight = 0.0
    for c in range(n_classes):
        block_weight += weight[c]
    for i in prange(x.shape[0]):
        row = contiguous_row(x, i)
        m, e = row_max_and_excess(row)
        partials[i, 0] = m
        partials[i, 1] = e
        local = target[i] - first_class
        if 0 <= local < n_classes:
            partials[i, 2] = row[local]
            partials[i, 3] = weight[local]
        else:
            partials[i, 2] = 0.0
            partials[i, 3] = 0.0
        partials[i, 4] = row_weighted_sum(row, weight, finite_or_zero(m)) if smoothing else 0.0
        partials[i, 5] = block_weight


@rowwise
def cross_entropy_probs_partials_rows(x, y, weight, smoothing, n_classes, partials):
    """``partials[i] = (m, e, wy, wyx)``: :func:`~.loss.row_smoothed_sums` of the block, shifted
    by its ``shift``; ``n_classes`` is the whole row's class count (the smoothing spreads over
    it)."""
    for i in prange(x.shape[0]):
        row = contiguous_row(x, i)
        m, e = row_max_and_excess(row)
        wy, wyx = row_smoothed_sums(row, contiguous_row(y, i), weight, smoothing, n_classes,
                                    finite_or_zero(m))
        partials[i, 0] = m
        partials[i, 1] = e
        partials[i, 2] = wy
        partials[i, 3] = wyx


# --- merges ------------------------------------------------------------------------------------

@njit(inline="always")
def merged_max_excess(blocks):
    """``(m, shift, e)`` of a row from its blocks' ``(m_b, e_b)`` in ``blocks[:, :2]``, merged in
    block order (:func:`~fastlsm.backends.formulas.merged_excess`): ``m = max(m_b)`` (nan
    ignored, as in a block's own max), ``e`` the excess of ``sum(s_b * exp(shift_b - shift))``;
    a block that is all ``-inf`` (``e_b = -1``) adds nothing."""
    m, e = -np.inf, -1.0
    for b in range(blocks.shape[0]):
        m, e = merged_excess(m, e, blocks[b, 0], blocks[b, 1])
    return m, finite_or_zero(m), e


@njit(inline="always")
def shifted_sum(blocks, column, weights_column, shift):
    """``sum_b blocks[b, column]``, each block's sum (relative to its own shift, with weights
    ``blocks[b, weights_column]``) brought to ``shift`` (:func:`~fastlsm.backends.formulas.reshifted`)."""
    total = 0.0
    for b in range(blocks.shape[0]):
        total += reshifted(blocks[b, column], blocks[b, weights_column],
                           finite_or_zero(blocks[b, 0]), shift)
    return total


@njit(inline="always")
def column_sum(blocks, column):
    total = 0.0
    for b in range(blocks.shape[0]):
        total += blocks[b, column]
    return total


@rowwise
def merge_max_excess_rows(partials, stats):
    """``stats[i] = (m, e)`` of row ``i`` from its blocks' ``partials[i, b] = (m_b, e_b)``."""
    for i in prange(partials.shape[0]):
        m, shift, e = merged_max_excess(partials[i])
        stats[i, 0] = m
        stats[i, 1] = e


@rowwise
def logsumexp_merge_rows(partials, lse):
    """``lse[i]`` of row ``i`` from its blocks' ``(m_b, e_b)``."""
    for i in prange(partials.shape[0]):
        m, shift, e = merged_max_excess(partials[i])
        lse[i] = shift + log_sum(e)


@rowwise
def merge_sums_rows(partials, stats):
    """``stats[i, 0]``: the sum of row ``i``'s blocks' ``partials[i, b, 0]``."""
    for i in prange(partials.shape[0]):
        stats[i, 0] = column_sum(partials[i], 0)


# Merged statistics of a row's loss: (loss, lse, m, e, w) with `w` the target's weight (class
# indices) or sum_c w_c y'_c (probabilities), from which a block's gradient is finished.
LOSS_STATS = 5


@rowwise
def cross_entropy_merge_rows(partials, target, total_weight, ignore_index, smoothing, n_classes,
                             z_loss, stats):
    """``stats[i] = (loss, lse, m, e, w_t)`` of row ``i`` from its blocks'
    :func:`cross_entropy_partials_rows`."""
    for i in prange(partials.shape[0]):
        blocks = partials[i]
        m, shift, e = merged_max_excess(blocks)
        log_s = log_sum(e)
        lse = shift + log_s
        w_t = column_sum(blocks, 3)  # one block holds the target, the others add 0
        if target[i] == ignore_index:
            loss = 0.0
        elif not math.isfinite(m):
            loss = np.nan
        else:
            weighted = shifted_sum(blocks, 4, 5, shift) if smoothing > 0.0 else 0.0
            loss = class_index_loss(column_sum(blocks, 2), shift, log_s, w_t, smoothing,
                                    n_classes, total_weight, weighted, z_loss, lse)
        stats[i, 0] = loss
        stats[i, 1] = lse
        stats[i, 2] = m
        stats[i, 3] = e
        stats[i, 4] = w_t


@rowwise
def cross_entropy_probs_merge_rows(partials, z_loss, stats):
    """``stats[i] = (loss, lse, m, e, wy)`` of row ``i`` from its blocks'
    :func:`cross_entropy_probs_partials_rows`."""
    for i in prange(partials.shape[0]):
        blocks = partials[i]
        m, shift, e = merged_max_excess(blocks)
        log_s = log_sum(e)
        lse = shift + log_s
        wy = column_sum(blocks, 2)
        loss = np.nan
        if math.isfinite(m):
            loss = probability_loss(wy, shifted_sum(blocks, 3, 2, shift), log_s, z_loss, lse)
        stats[i, 0] = loss
        stats[i, 1] = lse
        stats[i, 2] = m
        stats[i, 3] = e
        stats[i, 4] = wy


# --- finishing passes --------------------------------------------------------------------------

@rowwise
def log_softmax_finish_rows(x, stats, out):
    """``out = (x - shift) - log(s)`` from the row's merged ``stats[i] = (m, e)``."""
    for i in prange(x.shape[0]):
        write_log_softmax(contiguous_row(x, i), contiguous_row(out, i), stats[i, 0],
                          log_sum(stats[i, 1]))


@rowwise
def softmax_finish_rows(x, stats, out):
    """``out = exp(x - m) / s`` from the row's merged ``stats[i] = (m, e)``, ``s = 1 + e``."""
    for i in prange(x.shape[0]):
        row, dst = contiguous_row(x, i), contiguous_row(out, i)
        m = stats[i, 0]
        if not math.isfinite(m):
            dst[:] = np.nan  # as softmax_rows: SciPy shifts by a non-finite max too
            continue
        shift = row.dtype.type(m)
        scale = row.dtype.type(1.0 / (1.0 + stats[i, 1]))
        for j in range(row.shape[0]):
            dst[j] = exp_nonpositive(row[j] - shift) * scale


@rowwise
def log_softmax_backward_finish_rows(grad_output, output, stats, grad_input):
    """``grad_input = g - exp(y) * total``, ``stats[i, 0]`` the total of ``g`` over row ``i``."""
    for i in prange(grad_output.shape[0]):
        g, y = contiguous_row(grad_output, i), contiguous_row(output, i)
        dst = contiguous_row(grad_input, i)
        total = g.dtype.type(stats[i, 0])
        for j in range(g.shape[0]):
            dst[j] = g[j] - exp(y[j]) * total


@rowwise
def softmax_backward_finish_rows(grad_output, output, stats, grad_input):
    """``grad_input = y * (g - dot)``, ``stats[i, 0]`` the dot of ``g`` and ``y`` over row
    ``i``."""
    for i in prange(grad_output.shape[0]):
        g, y = contiguous_row(grad_output, i), contiguous_row(output, i)
        dst = contiguous_row(grad_input, i)
        dot = g.dtype.type(stats[i, 0])
        for j in range(g.shape[0]):
            dst[j] = y[j] * (g[j] - dot)


@rowwise
def cross_entropy_grad_finish_rows(x, target, first_class, weight, ignore_index, stats,
                                   total_weight, smoothing, n_classes, z_loss, scale, row_scales,
                                   grad):
    """The gradient of class-index cross-entropy over one block of classes, as
    ``cross_entropy_rows`` writes it, from :func:`cross_entropy_merge_rows`'s ``stats``
    (``n_classes`` is the whole row's ``C``)."""
    for i in prange(x.shape[0]):
        dst = contiguous_row(grad, i)
        t = target[i]
        if t == ignore_index:
            dst[:] = 0.0
            continue
        m = stats[i, 2]
        if not math.isfinite(m):
            dst[:] = np.nan  # PyTorch: a +inf or all -inf row is nan
            continue
        row = contiguous_row(x, i)
        p_coef, w_coef, t_coef = class_index_gradient(stats[i, 4], smoothing, n_classes,
                                                      total_weight, z_loss, stats[i, 1],
                                                      row_scale(scale, row_scales, i))
        local = t - first_class
        x_t = row[local] if 0 <= local < row.shape[0] else row.dtype.type(0.0)  # grad may be x
        write_softmax_grad(row, dst, m, stats[i, 3], p_coef, weight, w_coef)
        if 0 <= local < row.shape[0]:
            write_target_gradient(dst, local, x_t, m, stats[i, 3], p_coef, w_coef, t_coef,
                                 stats[i, 4])


@rowwise
def cross_entropy_probs_grad_finish_rows(x, y, weight, stats, smoothing, n_classes, z_loss,
                                         scale, row_scales, grad):
    """The gradient of probability-target cross-entropy over one block of classes, as
    ``cross_entropy_probs_rows`` writes it, from :func:`cross_entropy_probs_merge_rows`'s
    ``stats`` (``n_classes`` is the whole row's ``C``)."""
    for i in prange(x.shape[0]):
        dst = contiguous_row(grad, i)
        m = stats[i, 2]
        if not math.isfinite(m):
            dst[:] = np.nan
            continue
        scale_i = row_scale(scale, row_scales, i)
        p_coef = probability_gradient(stats[i, 4], z_loss, stats[i, 1], scale_i)
        write_probability_grad(contiguous_row(x, i), contiguous_row(y, i), dst, m, stats[i, 3],
                               p_coef, weight, smoothing, n_classes, scale_i)


MAX_EXCESS = RowKernels(rows=max_excess_partials_rows, short_rows=max_excess_partials_short_rows)
LOG_SOFTMAX_SPLIT = SplitKernels(MAX_EXCESS, merge_max_excess_rows, log_softmax_finish_rows)
SOFTMAX_SPLIT = SplitKernels(MAX_EXCESS, merge_max_excess_rows, softmax_finish_rows)
LOGSUMEXP_SPLIT = SplitKernels(MAX_EXCESS, logsumexp_merge_rows, None)
LOG_SOFTMAX_BACKWARD_SPLIT = SplitKernels(RowKernels(rows=sum_partials_rows), merge_sums_rows,
                                          log_softmax_backward_finish_rows)
SOFTMAX_BACKWARD_SPLIT = SplitKernels(RowKernels(rows=dot_partials_rows), merge_sums_rows,
                                      softmax_backward_finish_rows)
CROSS_ENTROPY_SPLIT = SplitKernels(RowKernels(rows=cross_entropy_partials_rows),
                                   cross_entropy_merge_rows, cross_entropy_grad_finish_rows)
PROBABILITIES_SPLIT = SplitKernels(RowKernels(rows=cross_entropy_probs_partials_rows),
                                   cross_entropy_probs_merge_rows,
                                   cross_entropy_probs_grad_finish_rows)
