"""Fused cross-entropy and NLL kernels on NVIDIA GPUs, with the formulas of
:mod:`fastlsm.backends.formulas` (PyTorch's): per-row float64 losses, ``lse`` per row, and the
gradient of the reduced loss where ``grad`` is not a (0, 0) array.  The class-index kernels take
their arguments after the targets in the order of :class:`~fastlsm.backends.base.ClassIndexTerms`,
the probability-target kernels in that of :class:`~fastlsm.backends.base.ProbabilityTerms`, then
the soft cap, as the CPU's do: None for none, else every logit is read capped
(:func:`~.primitives.soft_cap`) and every gradient brought back to the raw logits in the same
pass.  Launched with None, the kernels compile to the code they had without the cap.
"""

import math

from numba import cuda, float64

from fastlsm.backends.cuda.kernels.primitives import (UNROLL, VALUES, WARP, RowKernels,
                                                      block_segment, fill_row, group_sum,
                                                      load_chunk, load_row, merged_stats,
                                                      row_group, row_in_range, row_stats,
                                                      soft_cap, soft_capped_gradient,
                                                      tail_chunks)
from fastlsm.backends.formulas import (class_index_gradient, class_index_loss,
                                       finite_or_zero, gradient_at_max, log_sum,
                                       probability_gradient, probability_loss, reshifted,
                                       smoothed_weight, undefined_probability_row)


@cuda.jit(device=True)
def row_scale(scale, row_scales, row):
    """:func:`fastlsm.backends.formulas.row_scale`, as a device function: the CUDA simulator
    cannot hand a device array to an ``njit`` function."""
    return scale * row_scales[row] if row_scales.shape[0] > 0 else scale


@cuda.jit(device=True)
def weighted_shifted_sum(x, row, start, n, size, cached, weight, shift, warp_rows, scratch,
                         softcap):
    """``sum_c weight[c] * (x[c] - shift)`` over the group's part of the row (float64), for
    label smoothing."""
    partial = 0.0
    for k in range(VALUES):
        j = start + k * size
        if j < n:
            partial += weight[j] * (cached[k] - shift)
    for j in range(start + VALUES * size, n, size):
        partial += weight[j] * (soft_cap(x[row, j], softcap, x.dtype.type) - shift)
    return group_sum(partial, warp_rows, scratch)


@cuda.jit(device=True)
def class_grad(x_j, w_j, is_target, shift, a, b, target_term, dominant, smoothed):
    """The class-index loss's gradient at one class: ``p * a``, less ``w_j * b`` with label
    smoothing, less ``target_term`` at the target; ``dominant`` at a target equal to the row's
    max (:func:`~fastlsm.backends.formulas.gradient_at_max`)."""
    if is_target and x_j == shift:
        return dominant
    g = math.exp(x_j - shift) * a
    if smoothed:
        g -= w_j * b
    return g - target_term if is_target else g


@cuda.jit(device=True)
def finish_cross_entropy(x, row, start, n, size, leader, cached, m, e, weighted, t, ignored, x_t,
                         weight, total_weight, smoothing, z_loss, scale, loss, lse, grad,
                         softcap):
    """The row's loss and lse (written by the ``leader`` thread) and the gradient over this
    thread's elements, from the row's ``(m, e)`` and ``weighted = sum_c weight[c] * (x[c] - m)``
    (used with label smoothing)."""
    n_classes = x.shape[1]
    log_s = log_sum(e)
    row_lse = finite_or_zero(m) + log_s
    if leader and lse.shape[0] > 0:
        lse[row] = row_lse
    want_grad = grad.shape[0] > 0
    if ignored:
        if leader:
            loss[row] = 0.0
        if want_grad:
            fill_row(grad, row, start, n, size, 0.0)
        return
    if not math.isfinite(m):  # PyTorch: a +inf, all -inf or nan row is all nan
        if leader:
            loss[row] = math.nan
        if want_grad:
            fill_row(grad, row, start, n, size, math.nan)
        return
    w_t = weight[t]
    shift = x.dtype.type(m)
    if leader:
        loss[row] = class_index_loss(x_t, shift, log_s, w_t, smoothing, n_classes, total_weight,
                                     weighted, z_loss, row_lse)
    if not want_grad:
        return
    p_coef, w_coef, t_coef = class_index_gradient(w_t, smoothing, n_classes, total_weight, z_loss,
                                                  row_lse, scale)
    a = x.dtype.type(p_coef / (1.0 + e))
    b = x.dtype.type(w_coef)
    target_term = x.dtype.type(t_coef)
    dominant = x.dtype.type(gradient_at_max(p_coef, t_coef, e) - w_coef * w_t)
    smoothed = smoothing > 0.0  # only then does the gradient read the weights
    kind = x.dtype.type
    mine, my_weights, count = grad[row, start:], weight[start:], n - start
    target_at = t - start
    if smoothed:  # two loops rather than a test per class: each is unrolled whole
        for k in range(VALUES):
            j = k * size
            if j < count:
                mine[j] = soft_capped_gradient(
                    class_grad(cached[k], my_weights[j], j == target_at, shift, a, b,
                               target_term, dominant, True), cached[k], softcap, kind)
    else:
        for k in range(VALUES):
            j = k * size
            if j < count:
                mine[j] = soft_capped_gradient(
                    class_grad(cached[k], 0, j == target_at, shift, a, b, target_term,
                               dominant, False),
                    cached[k], softcap, kind)
    w = cuda.local.array(UNROLL, weight.dtype)
    first = start + VALUES * size
    chunk = cuda.local.array(UNROLL, x.dtype)
    for q in range(tail_chunks(first, n, size) - 1, -1, -1):
        j = first + q * UNROLL * size
        load_chunk(x[row], j, n, size, chunk, 0, softcap)
        if smoothed:
            load_chunk(weight, j, n, size, w, 0)
        for u in range(UNROLL):
            ju = j + u * size
            if ju < n:
                grad[row, ju] = soft_capped_gradient(
                    class_grad(chunk[u], w[u], ju == t, shift, a, b, target_term, dominant,
                               smoothed),
                    chunk[u], softcap, kind)


@cuda.jit(cache=True)
def cross_entropy_rows(x, target, weight, total_weight, ignore_index, smoothing, z_loss, scale,
                       row_scales, softcap, loss, lse, grad, warp_rows):
    row, rank, size = row_group(warp_rows)
    if not row_in_range(x, row):
        return
    n = x.shape[1]
    t = target[row]
    cached = cuda.local.array(VALUES, x.dtype)
    scratch = cuda.shared.array(WARP, float64)
    m, e = row_stats(x, row, rank, n, size, cached, warp_rows, scratch, softcap)
    ignored = t == ignore_index
    weighted = 0.0
    if smoothing > 0.0 and math.isfinite(m) and not ignored:
        weighted = weighted_shifted_sum(x, row, rank, n, size, cached, weight, x.dtype.type(m),
                                        warp_rows, scratch, softcap)
    # The thread that holds the target's class reads its logit and writes the row's loss: it is
    # the only one to write the gradient there (grad may be x), and no load of the row waited on
    # the read, as they would at the start of the kernel.
    owns_target = not ignored and t % size == rank
    x_t = soft_cap(x[row, t], softcap, x.dtype.type) if owns_target else x.dtype.type(0.0)
    leader = owns_target or (ignored and rank == 0)
    finish_cross_entropy(x, row, rank, n, size, leader, cached, m, e, weighted, t, ignored, x_t,
                         weight, total_weight, smoothing, z_loss,
                         row_scale(scale, row_scales, row), loss, lse, grad, softcap)


# A split row's partials for the loss: ``(m, e, sum_c w_c (x_c - finite_or_zero(m)), sum_c w_c)``
# of each segment (the last two with label smoothing only), and in ``[row, 0, 4]`` the target's
# logit, read by its segment before any block writes a gradient over it (grad may be x).
CROSS_ENTROPY_PARTIALS = 5


@cuda.jit(cache=True)
def cross_entropy_segment_stats(x, target, weight, smoothing, softcap, partials):
    row, segment, lo, hi = block_segment(x.shape[1], partials.shape[1])
    start, size = lo + cuda.threadIdx.x, cuda.blockDim.x
    cached = cuda.local.array(VALUES, x.dtype)
    scratch = cuda.shared.array(WARP, float64)
    m, e = row_stats(x, row, start, hi, size, cached, False, scratch, softcap)
    weighted = 0.0
    total = 0.0
    if smoothing > 0.0:
        weighted = weighted_shifted_sum(x, row, start, hi, size, cached, weight,
                                        x.dtype.type(finite_or_zero(m)), False, scratch, softcap)
        for j in range(start, hi, size):
            total += weight[j]
        total = group_sum(total, False, scratch)
    if cuda.threadIdx.x == 0:
        partials[row, segment, 0] = m
        partials[row, segment, 1] = e
        partials[row, segment, 2] = weighted
        partials[row, segment, 3] = total
        t = target[row]
        if lo <= t < hi:
            partials[row, 0, 4] = soft_cap(x[row, t], softcap, x.dtype.type)


@cuda.jit(cache=True)
def cross_entropy_segments(x, target, weight, total_weight, ignore_index, smoothing, z_loss, scale,
                           row_scales, softcap, partials, loss, lse, grad):
    row, segment, lo, hi = block_segment(x.shape[1], partials.shape[1])
    if segment > 0 and grad.shape[0] == 0:
        return  # the first segment's block writes the loss; without a gradient, nothing else
    cached = cuda.local.array(VALUES, x.dtype)
    scratch = cuda.shared.array(WARP, float64)
    m, e = merged_stats(partials, row, scratch)
    t = target[row]
    ignored = t == ignore_index
    x_t = x.dtype.type(partials[row, 0, 4]) if not ignored else x.dtype.type(0.0)
    weighted = 0.0
    if smoothing > 0.0 and math.isfinite(m) and not ignored:
        for k in range(cuda.threadIdx.x, partials.shape[1], cuda.blockDim.x):
            weighted += reshifted(partials[row, k, 2], partials[row, k, 3],
                                  finite_or_zero(partials[row, k, 0]), m)
        weighted = group_sum(weighted, False, scratch)
    start, size = lo + cuda.threadIdx.x, cuda.blockDim.x
    if grad.shape[0] > 0:
        load_row(x, row, start, hi, size, cached, softcap)
    finish_cross_entropy(x, row, start, hi, size, segment == 0 and cuda.threadIdx.x == 0, cached,
                         m, e, weighted, t, ignored, x_t, weight, total_weight, smoothing, z_loss,
                         row_scale(scale, row_scales, row), loss, lse, grad, softcap)


@cuda.jit(device=True)
def probability_sums(x, y, weight, row, start, n, size, cached, shift, smoothing, softcap):
    """This thread's float64 ``(sum wy, sum wy * (x - shift))`` over its elements, where
    ``wy = weight * y`` with ``y`` smoothed."""
    keep = x.dtype.type(1.0 - smoothing)
    spread = x.dtype.type(smoothing / x.shape[1])
    wy_partial = 0.0
    wyx_partial = 0.0
    for k in range(VALUES):
        j = start + k * size
        if j < n:
            wy = smoothed_weight(weight[j], y[row, j], keep, spread)
            wy_partial += wy
            wyx_partial += wy * (cached[k] - shift)
    for j in range(start + VALUES * size, n, size):
        wy = smoothed_weight(weight[j], y[row, j], keep, spread)
        wy_partial += wy
        wyx_partial += wy * (soft_cap(x[row, j], softcap, x.dtype.type) - shift)
    return wy_partial, wyx_partial


@cuda.jit(device=True)
def finish_cross_entropy_probs(x, y, weight, row, start, n, size, leader, cached, m, e, wy_sum,
                               wyx_sum, smoothing, z_loss, scale, loss, lse, grad, softcap):
    """The row's loss and lse (by the ``leader``) and the gradient over this thread's elements,
    from the row's ``(m, e)`` and sums ``wy_sum``, ``wyx_sum`` (:func:`probability_sums` with
    ``shift = m``)."""
    log_s = log_sum(e)
    row_lse = finite_or_zero(m) + log_s
    if leader and lse.shape[0] > 0:
        lse[row] = row_lse
    want_grad = grad.size > 0  # none asked, or rows of no classes (whose eps / C is 0 / 0)
    if undefined_probability_row(m, x.shape[1]):
        if leader:
            loss[row] = math.nan
        if want_grad:
            fill_row(grad, row, start, n, size, math.nan)
        return
    if leader:
        loss[row] = probability_loss(wy_sum, wyx_sum, log_s, z_loss, row_lse)
    if not want_grad:
        return
    kind = x.dtype.type
    shift = kind(m)
    keep = kind(1.0 - smoothing)
    spread = kind(smoothing / x.shape[1])
    p_coef = probability_gradient(wy_sum, z_loss, row_lse, scale)
    a = kind(p_coef / (1.0 + e))
    b = kind(scale)
    mine, my_weights, my_y, count = grad[row, start:], weight[start:], y[row, start:], n - start
    capped = cuda.local.array(VALUES, x.dtype)  # the capped logits, for the slope: soft cap only
    if softcap is not None:
        for k in range(VALUES):
            capped[k] = cached[k]
    # The column of this thread's entry that holds the max of a dominated row (e < 1: one
    # entry does), if it has it: its gradient is written again below, from gradient_at_max.
    at_max = -1
    for k in range(VALUES):  # two loops: one would be too long to unroll whole in float64
        if cached[k] == shift and k * size < count:
            at_max = start + k * size
        cached[k] = math.exp(cached[k] - shift) * a
    for k in range(VALUES):  # a load before each store: see primitives' "the losses' cached part"
        j = k * size
        if j < count:
            mine[j] = soft_capped_gradient(
                cached[k] - smoothed_weight(my_weights[j], my_y[j], keep, spread) * b, capped[k],
                softcap, kind)
    w = cuda.local.array(UNROLL, weight.dtype)
    p = cuda.local.array(UNROLL, y.dtype)
    first = start + VALUES * size
    chunk = cuda.local.array(UNROLL, x.dtype)
    for q in range(tail_chunks(first, n, size) - 1, -1, -1):
        j = first + q * UNROLL * size
        load_chunk(x[row], j, n, size, chunk, 0, softcap)
        load_chunk(weight, j, n, size, w, 0)
        load_chunk(y[row], j, n, size, p, 0)
        for u in range(UNROLL):
            if j + u * size < n:
                if chunk[u] == shift:
                    at_max = j + u * size
                grad[row, j + u * size] = soft_capped_gradient(
                    math.exp(chunk[u] - shift) * a - smoothed_weight(w[u], p[u], keep, spread) * b,
                    chunk[u], softcap, kind)
    if at_max >= 0 and e < 1.0:
        c = scale * smoothed_weight(weight[at_max], y[row, at_max], keep, spread)
        grad[row, at_max] = soft_capped_gradient(kind(gradient_at_max(p_coef, c, e)), shift,
                                                 softcap, kind)


@cuda.jit(cache=True)
def cross_entropy_probs_rows(x, y, weight, smoothing, z_loss, scale, row_scales, softcap, loss,
                             lse, grad, warp_rows):
    row, rank, size = row_group(warp_rows)
    if not row_in_range(x, row):
        return
    n = x.shape[1]
    cached = cuda.local.array(VALUES, x.dtype)
    scratch = cuda.shared.array(WARP, float64)
    m, e = row_stats(x, row, rank, n, size, cached, warp_rows, scratch, softcap)
    wy_sum = 0.0
    wyx_sum = 0.0
    if math.isfinite(m):
        wy_partial, wyx_partial = probability_sums(x, y, weight, row, rank, n, size, cached,
                                                   x.dtype.type(m), smoothing, softcap)
        wy_sum = group_sum(wy_partial, warp_rows, scratch)
        wyx_sum = group_sum(wyx_partial, warp_rows, scratch)
    finish_cross_entropy_probs(x, y, weight, row, rank, n, size, rank == 0, cached, m, e, wy_sum,
                               wyx_sum, smoothing, z_loss, row_scale(scale, row_scales, row), loss,
                               lse, grad, softcap)


# A split row's partials for probability targets: ``(m, e, sum wy,
# sum wy * (x - finite_or_zero(m)))`` of each segment.
PROBABILITY_PARTIALS = 4


@cuda.jit(cache=True)
def cross_entropy_probs_segment_stats(x, y, weight, smoothing, softcap, partials):
    row, segment, lo, hi = block_segment(x.shape[1], partials.shape[1])
    start, size = lo + cuda.threadIdx.x, cuda.blockDim.x
    cached = cuda.local.array(VALUES, x.dtype)
    scratch = cuda.shared.array(WARP, float64)
    m, e = row_stats(x, row, start, hi, size, cached, False, scratch, softcap)
    wy_partial, wyx_partial = probability_sums(x, y, weight, row, start, hi, size, cached,
                                               x.dtype.type(finite_or_zero(m)), smoothing,
                                               softcap)
    wy = group_sum(wy_partial, False, scratch)
    wyx = group_sum(wyx_partial, False, scratch)
    if cuda.threadIdx.x == 0:
        partials[row, segment, 0] = m
        partials[row, segment, 1] = e
        partials[row, segment, 2] = wy
        partials[row, segment, 3] = wyx


@cuda.jit(cache=True)
def cross_entropy_probs_segments(x, y, weight, smoothing, z_loss, scale, row_scales, softcap,
                                 partials, loss, lse, grad):
    row, segment, lo, hi = block_segment(x.shape[1], partials.shape[1])
    if segment > 0 and grad.shape[0] == 0:
        return  # the first segment's block writes the loss; without a gradient, nothing else
    cached = cuda.local.array(VALUES, x.dtype)
    scratch = cuda.shared.array(WARP, float64)
    m, e = merged_stats(partials, row, scratch)
    wy_sum = 0.0
    wyx_sum = 0.0
    if math.isfinite(m):
        for k in range(cuda.threadIdx.x, partials.shape[1], cuda.blockDim.x):
            wy_sum += partials[row, k, 2]
            wyx_sum += reshifted(partials[row, k, 3], partials[row, k, 2],
                                 finite_or_zero(partials[row, k, 0]), m)
        wy_sum = group_sum(wy_sum, False, scratch)
        wyx_sum = group_sum(wyx_sum, False, scratch)
    start, size = lo + cuda.threadIdx.x, cuda.blockDim.x
    if grad.shape[0] > 0:
        load_row(x, row, start, hi, size, cached, softcap)
    finish_cross_entropy_probs(x, y, weight, row, start, hi, size,
                               segment == 0 and cuda.threadIdx.x == 0, cached, m, e, wy_sum,
                               wyx_sum, smoothing, z_loss, row_scale(scale, row_scales, row), loss,
                               lse, grad, softcap)


@cuda.jit(cache=True)
def nll_loss_rows(x, target, weight, ignore_index, scale, row_scales, loss, grad, warp_rows):
    row, rank, size = row_group(warp_rows)
    if not row_in_range(x, row):
        return
    t = target[row]
    ignored = t == ignore_index
    # As in cross_entropy_rows, the thread that holds the target's class reads its logit (before
    # it writes the gradient there: grad may be x) and writes the loss; no barrier is needed.
    if not ignored and t % size == rank:
        loss[row] = -weight[t] * x[row, t]
    elif ignored and rank == 0:
        loss[row] = 0.0
    if grad.shape[0] > 0:
        target_grad = 0.0 if ignored else -row_scale(scale, row_scales, row) * weight[t]
        for j in range(rank, grad.shape[1], size):
            grad[row, j] = target_grad if j == t else 0.0


CROSS_ENTROPY = RowKernels(cross_entropy_rows, cross_entropy_segment_stats, cross_entropy_segments,
                           partials=CROSS_ENTROPY_PARTIALS)
CROSS_ENTROPY_PROBABILITIES = RowKernels(cross_entropy_probs_rows,
                                         cross_entropy_probs_segment_stats,
                                         cross_entropy_probs_segments,
                                         partials=PROBABILITY_PARTIALS)
NLL_LOSS = RowKernels(nll_loss_rows)
