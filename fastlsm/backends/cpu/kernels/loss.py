"""Fused cross-entropy and NLL kernels: the loss, log-sum-exp and gradient of each row in one sweep.

Each row is read once for its (max, sum of exps), as in :mod:`.stats`; the gradient pass reads it
a second time (from cache for rows up to ~1 MiB) and writes the gradient in place of
``log_softmax``, which is never materialised.  Per-row losses are float64; the backend reduces
them.  ``grad`` is a ``(0, 0)`` array when the caller wants no gradient, ``lse`` an empty one
when the caller wants no log-sum-exps (a fresh array of 8 bytes a row, its page faults and
writes, cost a 2000000x10 float32 loss ~12%: 24-25 -> 21-22 ms here).  The formulas (PyTorch's)
are :mod:`fastlsm.backends.formulas`'.  The class-index kernels take their arguments after the
targets in the order of :class:`~fastlsm.backends.base.ClassIndexTerms`, the probability-target
kernels in that of :class:`~fastlsm.backends.base.ProbabilityTerms`, then the soft-cap: None for
none, for which Numba prunes the capped branch (a kernel without it compiles in less time, and a
call with a cap compiles a specialisation of its own), as on CUDA.
"""

import math

import numpy as np
from numba import njit, prange

from fastlsm.backends.cpu.kernels._simd import contiguous_row, exp_nonpositive
from fastlsm.backends.cpu.kernels.stats import (block_maxima_rows, log_sums, rescale_stored_exps,
                                                row_log_sum, row_log_sum_exp,
                                                row_max_and_excess, row_stats_storing_exps,
                                                task_tiles, tile_bounds, tile_scratch,
                                                tile_stats, tile_tasks)
from fastlsm.backends.cpu.runtime import RowKernels, rowwise
from fastlsm.backends.formulas import (class_index_gradient, class_index_loss, finite_or_zero,
                                       gradient_at_max, probability_gradient, probability_loss,
                                       row_scale, smoothed_weight, soft_cap_slope, soft_capped,
                                       undefined_probability_row)


@njit(cache=True, nogil=True)
def check_class_indices(target, weight, ignore_index):
    """``(first, denominator)``: the position of the first target out of ``[0, C)`` that is not
    ``ignore_index`` (-1 if none), and the sum of ``weight[t]`` over the kept targets, in order.

    One pass over the targets; NumPy's masks and gather took ~10 us on 32 targets.
    """
    n_classes = weight.shape[0]
    denominator = 0.0
    for i in range(target.shape[0]):
        t = target[i]
        if t == ignore_index:
            continue
        if t < 0 or t >= n_classes:
            return i, denominator
        denominator += weight[t]
    return -1, denominator


@njit(fastmath={"reassoc"})
def row_weighted_sum(row, weight, shift):
    """``sum_c weight[c] * (row[c] - shift)`` in float64."""
    c_shift = row.dtype.type(shift)
    s = 0.0
    for j in range(row.shape[0]):
        s += weight[j] * (row[j] - c_shift)
    return s


@njit(fastmath={"reassoc"})
def row_smoothed_sums(row, y, weight, smoothing, n_classes, shift):
    """``(sum_c w_c * y'_c, sum_c w_c * y'_c * (row_c - shift))`` with ``y'`` smoothed over
    ``C = n_classes``, the whole row's class count (``row`` may be a block of it)."""
    keep = row.dtype.type(1.0 - smoothing)
    spread = row.dtype.type(smoothing / n_classes)
    c_shift = row.dtype.type(shift)
    wy_sum = 0.0
    wyx_sum = 0.0
    for j in range(row.shape[0]):
        wy = smoothed_weight(weight[j], y[j], keep, spread)
        wy_sum += wy
        wyx_sum += wy * (row[j] - c_shift)
    return wy_sum, wyx_sum


@njit
def _nan_row(loss, grad, i):
    # PyTorch's log_softmax shifts by a non-finite max too: a +inf or all -inf row is all nan.
    loss[i] = np.nan
    if grad.shape[0] > 0:
        contiguous_row(grad, i)[:] = np.nan


@njit(inline="always")
def write_softmax_grad(row, dst, shift, e, p_coef, weight, w_coef):
    """``dst[j] = p_j * p_coef - weight[j] * w_coef`` with ``p = exp(row - shift) / s``,
    ``s = 1 + e``; without the weights where ``w_coef`` is 0
    (:func:`~fastlsm.backends.formulas.class_index_gradient`)."""
    c_shift = row.dtype.type(shift)
    a = row.dtype.type(p_coef / (1.0 + e))
    b = row.dtype.type(w_coef)
    if w_coef == 0.0:  # two loops rather than a test per class, as on CUDA
        for j in range(row.shape[0]):
            dst[j] = exp_nonpositive(row[j] - c_shift) * a
    else:
        for j in range(row.shape[0]):
            dst[j] = exp_nonpositive(row[j] - c_shift) * a - weight[j] * b


@njit(inline="always")
def write_target_gradient(dst, t, x_t, m, e, p_coef, w_coef, t_coef, w_t):
    """The target's term of a class-index gradient ``dst`` (written as ``p_j * p_coef -
    w_j * w_coef``): ``dst[t] -= t_coef``; or, for a target logit ``x_t`` equal to the row's max
    ``m``, ``dst[t]`` written anew, computed once in float64
    (:func:`~fastlsm.backends.formulas.gradient_at_max`)."""
    kind = dst.dtype.type
    if x_t == m:
        dst[t] = kind(gradient_at_max(p_coef, t_coef, e) - w_coef * w_t)
    else:
        dst[t] -= kind(t_coef)


@njit(inline="always")
def max_position(row, m):
    """The first ``j`` with ``row[j] == m``, -1 if none."""
    for j in range(row.shape[0]):
        if row[j] == m:
            return j
    return -1


@njit(inline="always")
def write_probability_grad(row, y, dst, shift, e, p_coef, weight, smoothing, n_classes, scale):
    """``dst[j] = p_j * p_coef - scale * w_j * y'_j`` with ``p = exp(row - shift) / s``,
    ``s = 1 + e``; at the max of a dominated row (``e < 1``, so one entry holds it) computed
    once in float64 (:func:`~fastlsm.backends.formulas.gradient_at_max`).  ``row`` may be a
    block of the row, which need not hold its max."""
    keep = row.dtype.type(1.0 - smoothing)
    spread = row.dtype.type(smoothing / n_classes)
    c_shift = row.dtype.type(shift)
    # Found before the loop writes dst, which may be the row itself; other rows pay nothing.
    at = max_position(row, c_shift) if e < 1.0 else -1
    a = row.dtype.type(p_coef / (1.0 + e))
    b = row.dtype.type(scale)
    for j in range(row.shape[0]):
        scaled_p = exp_nonpositive(row[j] - c_shift) * a
        dst[j] = scaled_p - smoothed_weight(weight[j], y[j], keep, spread) * b
    if at >= 0:
        c = scale * smoothed_weight(weight[at], y[at], keep, spread)
        dst[at] = row.dtype.type(gradient_at_max(p_coef, c, e))


@njit(inline="always")
def _finish_cross_entropy_row(i, row, x_t, t, m, e, log_s, stored_maxima, exps_stored,
                              weight, total_weight, ignore_index, smoothing, z_loss, scale, loss,
                              lse, grad):
    """Row ``i``'s loss, log-sum-exp and gradient from its ``(m, e)`` (:func:`row_stats`) and
    ``log_s = row_log_sum(e)``.

    ``x_t`` is the target's logit, read before ``grad`` (which may be ``x``) was written; where
    ``exps_stored``, the grad row holds the stats pass's exps, shifted per block by
    ``stored_maxima``.
    """
    n_classes = row.shape[0]
    want_grad = grad.shape[0] > 0
    row_lse = finite_or_zero(m) + log_s
    if lse.shape[0] > 0:
        lse[i] = row_lse
    if t == ignore_index:
        loss[i] = 0.0
        if want_grad:
            contiguous_row(grad, i)[:] = 0.0
        return
    if not math.isfinite(m):
        _nan_row(loss, grad, i)
        return
    w_t = weight[t]
    weighted = row_weighted_sum(row, weight, m) if smoothing > 0.0 else 0.0
    loss[i] = class_index_loss(x_t, row.dtype.type(m), log_s, w_t, smoothing, n_classes,
                               total_weight, weighted, z_loss, row_lse)
    if want_grad:
        dst = contiguous_row(grad, i)
        p_coef, w_coef, t_coef = class_index_gradient(w_t, smoothing, n_classes, total_weight,
                                                      z_loss, row_lse, scale)
        if exps_stored:
            rescale_stored_exps(dst, stored_maxima, m, p_coef / (1.0 + e))
        else:
            write_softmax_grad(row, dst, m, e, p_coef, weight, w_coef)
        write_target_gradient(dst, t, x_t, m, e, p_coef, w_coef, t_coef, w_t)


@njit(inline="always")
def _target_logit(row, t, ignore_index):
    return row[t] if t != ignore_index else row.dtype.type(0.0)


# Rows a task of the soft-capped kernels, each task with one scratch row for the capped copy.
CAPPED_ROWS = 16


@njit(inline="always")
def write_soft_capped(row, dst, softcap):
    """``dst = softcap * tanh(row / softcap)`` (:func:`~fastlsm.backends.formulas.soft_capped`)."""
    kind = row.dtype.type
    inverse_cap = kind(1.0 / softcap)
    for j in range(row.shape[0]):
        v = row[j]
        a = abs(v) * inverse_cap
        dst[j] = soft_capped(v, a, exp_nonpositive(a * kind(-2.0)), softcap, kind)


@njit(inline="always")
def apply_soft_cap_slope(capped, dst, softcap):
    """``dst *= 1 - (capped / softcap)**2``: a gradient with respect to the capped logits
    brought to the raw ones."""
    for j in range(capped.shape[0]):
        dst[j] *= soft_cap_slope(capped[j], 1.0 / softcap, capped.dtype.type)


@rowwise
def soft_cap_rows(x, softcap, out):
    """``out = softcap * tanh(x / softcap)``: a block of a row split across blocks, capped
    before its partials and its gradient (the rows of one block are not in cache together)."""
    for i in prange(x.shape[0]):
        write_soft_capped(contiguous_row(x, i), contiguous_row(out, i), softcap)


@rowwise
def soft_cap_slope_rows(capped, softcap, grad):
    """``grad *= 1 - (capped / softcap)**2`` (:func:`apply_soft_cap_slope`) row by row."""
    for i in prange(capped.shape[0]):
        apply_soft_cap_slope(contiguous_row(capped, i), contiguous_row(grad, i), softcap)


@njit(inline="always")
def _cross_entropy_row(row, i, target, weight, total_weight, ignore_index, smoothing, z_loss,
                       scale, row_scales, loss, lse, grad, store_exps, block_maxima):
    """Row ``i``'s loss and gradient, its logits ``row`` (``x[i]``, or its soft-capped copy)."""
    x_t = _target_logit(row, target[i], ignore_index)  # read first: grad may be x
    maxima = contiguous_row(block_maxima, i)
    if store_exps:
        m, e = row_stats_storing_exps(row, contiguous_row(grad, i), maxima)
    else:
        m, e = row_max_and_excess(row)
    _finish_cross_entropy_row(i, row, x_t, target[i], m, e, row_log_sum(e), maxima, store_exps,
                              weight, total_weight, ignore_index, smoothing, z_loss,
                              row_scale(scale, row_scales, i), loss, lse, grad)


@njit(inline="always")
def _soft_capped_cross_entropy(x, target, weight, total_weight, ignore_index, smoothing, z_loss,
                               softcap, scale, row_scales, loss, lse, grad):
    # Each row is capped into a scratch row that stays in cache, which the stats and gradient
    # passes read in place of the row; the gradient is then brought to the raw logits.
    store_exps = grad.shape[0] > 0 and smoothing == 0.0
    block_maxima = block_maxima_rows(x)
    for task in prange((x.shape[0] + CAPPED_ROWS - 1) // CAPPED_ROWS):
        capped = np.empty(x.shape[1], x.dtype)
        for i in range(task * CAPPED_ROWS, min((task + 1) * CAPPED_ROWS, x.shape[0])):
            write_soft_capped(contiguous_row(x, i), capped, softcap)
            _cross_entropy_row(capped, i, target, weight, total_weight, ignore_index, smoothing,
                               z_loss, scale, row_scales, loss, lse, grad, store_exps,
                               block_maxima)
            if grad.shape[0] > 0:
                apply_soft_cap_slope(capped, contiguous_row(grad, i), softcap)


@rowwise
def cross_entropy_rows(x, target, weight, total_weight, ignore_index, smoothing, z_loss, scale,
                       row_scales, softcap, loss, lse, grad):
    if softcap is not None:
        _soft_capped_cross_entropy(x, target, weight, total_weight, ignore_index, smoothing,
                                   z_loss, softcap, scale, row_scales, loss, lse, grad)
        return
    # Without smoothing the gradient is softmax times a per-row coefficient (minus the target's
    # term): the stats pass stores the exps in `grad` and the second pass only rescales them.
    store_exps = grad.shape[0] > 0 and smoothing == 0.0
    block_maxima = block_maxima_rows(x)
    for i in prange(x.shape[0]):
        _cross_entropy_row(contiguous_row(x, i), i, target, weight, total_weight, ignore_index,
                           smoothing, z_loss, scale, row_scales, loss, lse, grad, store_exps,
                           block_maxima)


@rowwise
def cross_entropy_short_rows(x, target, weight, total_weight, ignore_index, smoothing, z_loss,
                             scale, row_scales, softcap, loss, lse, grad):
    if softcap is not None:
        # The tile kernel reads x itself: capped rows go one at a time.
        _soft_capped_cross_entropy(x, target, weight, total_weight, ignore_index, smoothing,
                                   z_loss, softcap, scale, row_scales, loss, lse, grad)
        return
    for task in prange(tile_tasks(x.shape[0])):
        scratch = tile_scratch(x)
        first_tile, stop_tile = task_tiles(x.shape[0], task)
        for tile in range(first_tile, stop_tile):
            first, last = tile_bounds(x.shape[0], tile)
            maxima, excesses = tile_stats(x, first, last, scratch)
            log_s = log_sums(excesses, scratch[7])
            if grad.shape[0] == 0 and smoothing == 0.0:
                _tile_losses(x, target, first, last, maxima, log_s, weight, ignore_index, z_loss,
                             loss, lse)
                continue
            for i in range(first, last):
                row, r = contiguous_row(x, i), i - first
                _finish_cross_entropy_row(i, row, _target_logit(row, target[i], ignore_index),
                                          target[i], maxima[r], excesses[r], log_s[r], row[:0],
                                          False, weight, total_weight, ignore_index, smoothing,
                                          z_loss, row_scale(scale, row_scales, i), loss, lse, grad)


@njit(inline="always")
def _tile_losses(x, target, first, last, maxima, log_s, weight, ignore_index, z_loss, loss, lse):
    """The losses (and log-sum-exps) of rows ``first:last`` without smoothing or a gradient, as
    :func:`_finish_cross_entropy_row` has them, in a loop without its per-row branches: a
    2000000x10 cross_entropy took 16-18 ms instead of 20.5 (float32, 2 threads; float64 29-30
    instead of 31-32).  (LLVM keeps the target gather scalar on an Intel host.)"""
    kind = x.dtype.type
    for r in range(np.uint64(0), np.uint64(last - first)):
        i = np.uint64(first) + r
        t = target[i]
        kept = t != ignore_index
        read = np.uint64(t) if kept else np.uint64(0)  # an ignored row's reads: a class, unused
        m = maxima[r]
        row_lse = finite_or_zero(m) + log_s[r]
        value = class_index_loss(x[i, read], kind(m), log_s[r], weight[read], 0.0, x.shape[1],
                                 0.0, 0.0, z_loss, row_lse)
        loss[i] = (value if math.isfinite(m) else math.nan) if kept else 0.0
    if lse.shape[0] > 0:
        for r in range(last - first):
            lse[first + r] = finite_or_zero(maxima[r]) + log_s[r]


@njit(inline="always")
def _probability_row(row, probs, i, weight, smoothing, z_loss, scale, row_scales, loss, lse, grad):
    """Row ``i``'s probability-target loss and gradient, its logits ``row``."""
    m, e, log_s, row_lse = row_log_sum_exp(row)
    if lse.shape[0] > 0:
        lse[i] = row_lse
    if undefined_probability_row(m, row.shape[0]):
        _nan_row(loss, grad, i)
        return
    wy_sum, wyx_sum = row_smoothed_sums(row, probs, weight, smoothing, row.shape[0], m)
    loss[i] = probability_loss(wy_sum, wyx_sum, log_s, z_loss, row_lse)
    if grad.shape[0] > 0:
        scale_i = row_scale(scale, row_scales, i)
        write_probability_grad(row, probs, contiguous_row(grad, i), m, e,
                               probability_gradient(wy_sum, z_loss, row_lse, scale_i), weight,
                               smoothing, row.shape[0], scale_i)


@rowwise
def cross_entropy_probs_rows(x, y, weight, smoothing, z_loss, scale, row_scales, softcap, loss,
                             lse, grad):
    if softcap is not None:
        for task in prange((x.shape[0] + CAPPED_ROWS - 1) // CAPPED_ROWS):
            capped = np.empty(x.shape[1], x.dtype)
            for i in range(task * CAPPED_ROWS, min((task + 1) * CAPPED_ROWS, x.shape[0])):
                write_soft_capped(contiguous_row(x, i), capped, softcap)
                _probability_row(capped, contiguous_row(y, i), i, weight, smoothing, z_loss,
                                 scale, row_scales, loss, lse, grad)
                if grad.shape[0] > 0:
                    apply_soft_cap_slope(capped, contiguous_row(grad, i), softcap)
        return
    for i in prange(x.shape[0]):
        _probability_row(contiguous_row(x, i), contiguous_row(y, i), i, weight, smoothing,
                         z_loss, scale, row_scales, loss, lse, grad)


@rowwise
def nll_loss_rows(x, target, weight, ignore_index, scale, row_scales, loss, grad):
    want_grad = grad.shape[0] > 0
    for i in prange(x.shape[0]):
        t = target[i]
        ignored = t == ignore_index
        loss[i] = 0.0 if ignored else -weight[t] * x[i, t]
        if want_grad:
            # Written after x[i, t] is read: grad may be x itself.
            dst = contiguous_row(grad, i)
            dst[:] = 0.0
            if not ignored:
                dst[t] = dst.dtype.type(-row_scale(scale, row_scales, i) * weight[t])


CROSS_ENTROPY = RowKernels(rows=cross_entropy_rows, short_rows=cross_entropy_short_rows)
CROSS_ENTROPY_PROBABILITIES = RowKernels(rows=cross_entropy_probs_rows)
NLL_LOSS = RowKernels(rows=nll_loss_rows)
