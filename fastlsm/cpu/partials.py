"""Kernels for rows split across blocks of classes: per-block partials, and the finishing passes.

A Dask array chunked along its class axis holds each row in several blocks.  :mod:`fastlsm._dask`
reduces every block to per-row partials with the ``*_partials_rows`` kernels here, merges the
partials of a row in NumPy (small arrays: a few float64 numbers per row and block), and hands the
merged statistics back to every block, whose ``*_finish_rows`` kernel writes its part of the
result.  Partials and merged statistics are float64 ``(rows, k)`` arrays; the statistics of row
``i`` are ``stats[i, 0], stats[i, 1], ...`` as each kernel's docstring says.

The partials of the softmax family are :func:`~fastlsm.cpu.kernels.row_max_and_sum`'s
``(m, s)``: the block's max ``m`` (nan ignored) and ``s = sum(exp(x - shift))``, shifted by
``shift = m`` where finite and by 0 elsewhere, so that a block merges as semantics.md's
``(max, sum)`` pair and a row's non-finite answers come out as in the unsplit kernels.  The
finishing passes use the formulas of :mod:`fastlsm.cpu.kernels` and :mod:`fastlsm.cpu.loss` with
the row's merged max and sum in place of the ones a single pass would find.
"""

import math

import numpy as np
from numba import njit, prange

from fastlsm.cpu._simd import contiguous_row, exp
from fastlsm.cpu.kernels import (finite_or_zero, row_dot, row_max_and_sum, row_sum, rowwise,
                                 tile_bounds, tile_stats, write_log_softmax, TILE_ROWS)
from fastlsm.cpu.loss import _row_smoothed_sums, _row_weighted_sum, _write_softmax_grad


@rowwise
def max_sum_partials_rows(x, partials):
    """``partials[i] = (m, s)`` of row ``i`` of the block ``x``."""
    for i in prange(x.shape[0]):
        m, s = row_max_and_sum(contiguous_row(x, i))
        partials[i, 0] = m
        partials[i, 1] = s


@rowwise
def max_sum_partials_short_rows(x, partials):
    for tile in prange((x.shape[0] + TILE_ROWS - 1) // TILE_ROWS):
        first, last = tile_bounds(x.shape[0], tile)
        maxima, sums = tile_stats(x, first, last)
        for r in range(last - first):
            partials[first + r, 0] = maxima[r]
            partials[first + r, 1] = sums[r]


@rowwise
def log_softmax_finish_rows(x, stats, out):
    """``out = (x - shift) - log(s)`` from the row's merged ``stats[i] = (m, s)``."""
    for i in prange(x.shape[0]):
        write_log_softmax(contiguous_row(x, i), contiguous_row(out, i), stats[i, 0], stats[i, 1])


@rowwise
def softmax_finish_rows(x, stats, out):
    """``out = exp(x - m) / s`` from the row's merged ``stats[i] = (m, s)``."""
    for i in prange(x.shape[0]):
        row, dst = contiguous_row(x, i), contiguous_row(out, i)
        m = stats[i, 0]
        if not math.isfinite(m):
            dst[:] = np.nan  # as softmax_rows: SciPy shifts by a non-finite max too
            continue
        shift = row.dtype.type(m)
        scale = row.dtype.type(1.0 / stats[i, 1])
        for j in range(row.shape[0]):
            dst[j] = exp(row[j] - shift) * scale


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


# --- cross-entropy ---------------------------------------------------------------------------
# The loss formulas are cpu/loss.py's.  With a row split over blocks, the target's logit and
# weight come from the one block holding the target, and the sums over classes that label
# smoothing and probability targets need are summed per block, each shifted by its block's
# `shift`; the merge re-shifts them to the row's.

@rowwise
def cross_entropy_partials_rows(x, target, first_class, weight, smoothing, partials):
    """``partials[i] = (m, s, x_t, w_t, ws)`` for classes ``first_class:first_class + C_b``.

    ``x_t`` and ``w_t`` are the target's logit and weight where the target falls in this block,
    0 elsewhere; ``ws = sum_c weight[c] * (x[i, c] - shift)`` where ``smoothing`` is set, else 0.
    ``weight`` holds this block's classes only.
    """
    n_classes = x.shape[1]
    for i in prange(x.shape[0]):
        row = contiguous_row(x, i)
        m, s = row_max_and_sum(row)
        partials[i, 0] = m
        partials[i, 1] = s
        local = target[i] - first_class
        if 0 <= local < n_classes:
            partials[i, 2] = row[local]
            partials[i, 3] = weight[local]
        else:
            partials[i, 2] = 0.0
            partials[i, 3] = 0.0
        partials[i, 4] = _row_weighted_sum(row, weight, finite_or_zero(m)) if smoothing else 0.0


@rowwise
def cross_entropy_probs_partials_rows(x, y, weight, smoothing, n_classes, partials):
    """``partials[i] = (m, s, wy, wyx)``: :func:`_row_smoothed_sums` of the block, shifted by
    ``shift``; ``n_classes`` is the whole row's class count (the smoothing spreads over it)."""
    for i in prange(x.shape[0]):
        row = contiguous_row(x, i)
        m, s = row_max_and_sum(row)
        wy, wyx = _row_smoothed_sums(row, contiguous_row(y, i), weight, smoothing, n_classes,
                                     finite_or_zero(m))
        partials[i, 0] = m
        partials[i, 1] = s
        partials[i, 2] = wy
        partials[i, 3] = wyx


@rowwise
def cross_entropy_grad_finish_rows(x, target, first_class, weight, ignore_index, maxima, sums,
                                   coefs, smoothing, n_classes, scale, grad):
    """The gradient of class-index cross-entropy over one block of classes, as
    ``cross_entropy_rows`` writes it, from the row's merged max, sum and ``coefs[i] =
    (1 - eps) * w_t + eps / C * W + 2 * z * lse`` (``n_classes`` is the whole row's ``C``)."""
    target_coef = scale * (1.0 - smoothing)
    weight_coef = scale * smoothing / n_classes
    for i in prange(x.shape[0]):
        dst = contiguous_row(grad, i)
        t = target[i]
        if t == ignore_index:
            dst[:] = 0.0
            continue
        m = maxima[i]
        if not math.isfinite(m):
            dst[:] = np.nan  # PyTorch: a +inf or all -inf row is nan
            continue
        row = contiguous_row(x, i)
        _write_softmax_grad(row, dst, m, sums[i], scale * coefs[i], weight, weight_coef)
        local = t - first_class
        if 0 <= local < row.shape[0]:
            dst[local] -= dst.dtype.type(target_coef * weight[local])


@rowwise
def cross_entropy_probs_grad_finish_rows(x, y, weight, maxima, sums, coefs, smoothing, n_classes,
                                         scale, grad):
    """The gradient of probability-target cross-entropy over one block of classes, as
    ``cross_entropy_probs_rows`` writes it, from the row's merged max, sum and ``coefs[i] =
    sum_c w_c * y'_c + 2 * z * lse`` (``n_classes`` is the whole row's ``C``)."""
    for i in prange(x.shape[0]):
        dst = contiguous_row(grad, i)
        m = maxima[i]
        if not math.isfinite(m):
            dst[:] = np.nan
            continue
        row, probs = contiguous_row(x, i), contiguous_row(y, i)
        keep = row.dtype.type(1.0 - smoothing)
        spread = row.dtype.type(smoothing / n_classes)
        shift = row.dtype.type(m)
        a = row.dtype.type(scale * coefs[i] / sums[i])
        b = row.dtype.type(scale)
        for j in range(row.shape[0]):
            wy = weight[j] * (probs[j] * keep + spread)
            dst[j] = exp(row[j] - shift) * a - wy * b
