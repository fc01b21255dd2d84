"""CUDA kernels (numba-cuda): the GPU twins of :mod:`fastlsm.cpu.kernels` and :mod:`fastlsm.cpu.loss`.

Every row kernel takes C-ordered ``(rows, classes)`` device arrays and hands each row to a
*group* of threads: one warp for rows of up to ``WARP * VALUES`` classes (several rows to a
block), or a whole block for longer rows (``warp_rows`` says which).  Element ``j`` of a row
belongs to thread ``j % size`` of its group, which keeps its first ``VALUES`` elements in
registers (``cached``, fully unrolled: no local memory, checked on the PTX by the tests).  So a
row that fits is read from memory once and written once; the part of a longer row beyond
``VALUES * size`` elements is streamed with the online (max, sum) merge and read again to write.

When rows are long and too few to fill the GPU, a row is *split* into segments, one block each
(the ``*_segments`` kernels): :func:`segment_stats` writes each segment's ``(m, s)``, and a second
kernel merges a row's pairs (semantics.md's (max, sum) merge, in a fixed order) and writes its
segment, which it reads again (from L2, where few rows fit).  The helpers below therefore take a
thread's first element ``start`` and the end ``n`` of its part of the row, and the write phases
are device functions shared by the one-pass and the split kernels.

Reductions inside a group are warp shuffles (``shfl_xor_sync``) and, across the warps of a
block, a fixed-order pass over shared memory: the result never depends on timing.  Sums of
exponentials are float64; the exponentials themselves are computed in the row's dtype.

Non-finite rows follow SciPy (log_softmax, softmax, logsumexp) or PyTorch (the losses), exactly
as the CPU kernels do; see :func:`row_stats`.
"""

import math

from numba import cuda, float64, int64

WARP = 32
# Row elements each thread holds in registers.  16 rather than 32: fewer registers a thread
# (log_softmax_rows 64 instead of 72 on sm_90, cross_entropy_rows 95 instead of 127), so more
# threads share a multiprocessor.  On an H100 (float32; log_softmax in blocks of up to 448
# threads, the loss in blocks as large as its registers allow), at 8192x32000 / 16384x131072 /
# 4096x262144: log_softmax took 1.31 / 9.71 / 5.36 ms against 1.41 / 9.90 / 5.31 with 32, the
# fused loss and gradient 2.18 / 13.0 / 6.78 ms against 2.25 / 14.2 / 7.42.
VALUES = 16
# Loads in flight a thread while streaming the rest of a long row.  On an H100 (float32, VALUES
# 32) 8 beat 4 by 2-11% at 16384x131072 and 4096x262144, log_softmax and the loss alike.
UNROLL = 8
FULL_MASK = 0xFFFFFFFF


@cuda.jit(device=True)
def max_nan(a, b):
    """The larger of ``a`` and ``b``, nan if either is nan (a nan row must stay nan)."""
    return a if a > b or a != a else b


@cuda.jit(device=True)
def row_group(warp_rows):
    """``(row, rank, size)``: this thread's row, its index in the row's group, the group size."""
    if warp_rows:
        rows_per_block = cuda.blockDim.x // WARP
        row = int64(cuda.blockIdx.x) * rows_per_block + cuda.threadIdx.x // WARP
        return row, cuda.threadIdx.x % WARP, WARP
    return int64(cuda.blockIdx.x), cuda.threadIdx.x, cuda.blockDim.x


@cuda.jit(device=True)
def group_max(v, warp_rows, scratch):
    """The max of ``v`` over the row's group (float64), nan if any is nan."""
    for offset in (16, 8, 4, 2, 1):
        v = max_nan(v, cuda.shfl_xor_sync(FULL_MASK, v, offset))
    if warp_rows:
        return float64(v)
    if cuda.threadIdx.x % WARP == 0:
        scratch[cuda.threadIdx.x // WARP] = v
    cuda.syncthreads()
    total = scratch[0]
    for w in range(1, cuda.blockDim.x // WARP):
        total = max_nan(total, scratch[w])
    cuda.syncthreads()  # every thread has read `scratch` before a later call writes it
    return total


@cuda.jit(device=True)
def group_sum(v, warp_rows, scratch):
    """The float64 sum of ``v`` over the row's group, in a fixed order."""
    v = float64(v)
    for offset in (16, 8, 4, 2, 1):
        v += cuda.shfl_xor_sync(FULL_MASK, v, offset)
    if warp_rows:
        return v
    if cuda.threadIdx.x % WARP == 0:
        scratch[cuda.threadIdx.x // WARP] = v
    cuda.syncthreads()
    total = scratch[0]
    for w in range(1, cuda.blockDim.x // WARP):
        total += scratch[w]
    cuda.syncthreads()
    return total


@cuda.jit(device=True)
def finite_or_zero(m):
    # SciPy shifts by the max only where it is finite: a +inf or all -inf row is shifted by 0.
    return m if math.isfinite(m) else 0.0


@cuda.jit(device=True)
def log_of_sum(s):
    """``log(s)``, -inf for an empty or all -inf row's 0 (spelt out: Python's log raises there,
    and the CUDA simulator runs these kernels as Python)."""
    return math.log(s) if s > 0.0 else (-math.inf if s == 0.0 else math.nan)


@cuda.jit(device=True)
def load_row(x, row, start, n, size, cached):
    """Fill ``cached`` with this thread's first ``VALUES`` elements, ``start`` and every
    ``size``-th after it (-inf from ``n`` on), and return their max."""
    low = x.dtype.type(-math.inf)
    m = low
    for k in range(VALUES):
        j = start + k * size
        v = x[row, j] if j < n else low
        cached[k] = v
        m = max_nan(m, v)
    return m


@cuda.jit(device=True)
def load_chunk(a, j, n, size, chunk, fill):
    """``chunk[u] = a[j + u * size]`` of a vector (a row, or a thread's view of one): ``UNROLL``
    loads issued together, one trip to memory; ``fill`` from ``n`` on."""
    for u in range(UNROLL):
        jj = j + u * size
        chunk[u] = a[jj] if jj < n else a.dtype.type(fill)


@cuda.jit(device=True)
def stream_stats(x, row, start, n, size):
    """``(m, s)`` of this thread's elements beyond the cached ones, up to ``n``: the max and
    ``sum(exp(x - m))`` (0 while ``m`` is -inf), merged online ``UNROLL`` loads at a time."""
    low = x.dtype.type(-math.inf)
    m = low
    s = 0.0
    chunk = cuda.local.array(UNROLL, x.dtype)
    for j in range(start + VALUES * size, n, UNROLL * size):
        load_chunk(x[row], j, n, size, chunk, low)
        top = chunk[0]
        for u in range(1, UNROLL):
            top = max_nan(top, chunk[u])
        if top > m or top != top:
            s *= math.exp(m - top)  # 0 * 0 while m was -inf
            m = top
        if m != low:  # all -inf so far: exp(-inf - -inf) would be nan
            for u in range(UNROLL):
                s += math.exp(chunk[u] - m)
    return m, s


@cuda.jit(device=True)
def row_stats(x, row, start, n, size, cached, warp_rows, scratch):
    """``(m, s)`` of the group's part of the row (its elements from ``start - rank`` to ``n``):
    its max (float64, nan if it holds a nan) and ``s = sum(exp(x - finite_or_zero(m)))``
    (float64), the same in every thread of the group.

    Fills ``cached`` (:func:`load_row`).  A part whose max is not finite sums ``exp(x)`` again
    from memory: SciPy's answers for it (inf, nan) come from that unshifted sum.
    """
    m_cached = load_row(x, row, start, n, size, cached)
    m_stream, s_stream = stream_stats(x, row, start, n, size)
    m = group_max(max_nan(m_cached, m_stream), warp_rows, scratch)
    s = 0.0
    if math.isfinite(m):
        shift = x.dtype.type(m)
        for k in range(VALUES):
            s += math.exp(cached[k] - shift)
        if m_stream != x.dtype.type(-math.inf):
            s += s_stream * math.exp(m_stream - shift)
    else:  # rare: no need to stream well
        for k in range(VALUES):
            s += math.exp(cached[k])
        for j in range(start + VALUES * size, n, size):
            s += math.exp(x[row, j])
    return m, group_sum(s, warp_rows, scratch)


@cuda.jit(device=True)
def row_in_range(x, row):
    return row < x.shape[0]


# A row's streamed part is read again to write it: in chunks of UNROLL loads (one trip to memory
# for all of them), and from the end backwards, since the end was read last and is likeliest
# still in L2.  The output may alias an input, so the compiler may not move a load above an
# earlier store: a load just before each store waits a trip to memory per element.  So whatever a
# write phase reads (the streamed part, the backward pass's second input) it reads a chunk ahead
# of the chunk's stores.  The losses' cached part is the exception: there a chunk of weights or
# targets would take registers from the cache (and, in float64, push it to local memory), so the
# gradient reads the weights only where label smoothing needs them.
#
# The write phases index the thread's own view of a row, ``a[row, start:]``, where the load phase
# indexed the row: the compiler would otherwise keep the load phase's VALUES indices live in
# registers all the way to the write (log_softmax_rows: 86 registers on sm_90 that way, 72 with
# the views), and registers are what bound a block's threads and so its cached part of a row.

@cuda.jit(device=True)
def tail_chunks(first, n, size):
    """How many chunks (``UNROLL`` elements ``size`` apart) a thread's streamed elements, from
    ``first`` to the row's end ``n``, make."""
    step = UNROLL * size
    return (n - first + step - 1) // step if n > first else 0


@cuda.jit(device=True)
def write_log_softmax(x, out, row, start, n, size, cached, m, s):
    """``out = (x - shift) - log(s)`` over this thread's elements (``shift`` kept apart from the
    log for float32 accuracy where ``|m|`` is large)."""
    shift = x.dtype.type(finite_or_zero(m))
    log_s = x.dtype.type(log_of_sum(s))
    mine, count = out[row, start:], n - start
    for k in range(VALUES):
        if k * size < count:
            mine[k * size] = (cached[k] - shift) - log_s
    first = start + VALUES * size
    chunk = cuda.local.array(UNROLL, x.dtype)
    for q in range(tail_chunks(first, n, size) - 1, -1, -1):
        j = first + q * UNROLL * size
        load_chunk(x[row], j, n, size, chunk, 0)
        for u in range(UNROLL):
            if j + u * size < n:
                out[row, j + u * size] = (chunk[u] - shift) - log_s


@cuda.jit(device=True)
def write_softmax(x, out, row, start, n, size, cached, m, s):
    if not math.isfinite(m):  # SciPy: exp(x - max) / sum is nan throughout
        for j in range(start, n, size):
            out[row, j] = math.nan
        return
    shift = x.dtype.type(m)
    inverse = x.dtype.type(1.0 / s)
    mine, count = out[row, start:], n - start
    for k in range(VALUES):
        if k * size < count:
            mine[k * size] = math.exp(cached[k] - shift) * inverse
    first = start + VALUES * size
    chunk = cuda.local.array(UNROLL, x.dtype)
    for q in range(tail_chunks(first, n, size) - 1, -1, -1):
        j = first + q * UNROLL * size
        load_chunk(x[row], j, n, size, chunk, 0)
        for u in range(UNROLL):
            if j + u * size < n:
                out[row, j + u * size] = math.exp(chunk[u] - shift) * inverse


@cuda.jit(cache=True)
def log_softmax_rows(x, out, warp_rows):
    row, rank, size = row_group(warp_rows)
    if not row_in_range(x, row):
        return
    cached = cuda.local.array(VALUES, x.dtype)
    scratch = cuda.shared.array(WARP, float64)
    n = x.shape[1]
    m, s = row_stats(x, row, rank, n, size, cached, warp_rows, scratch)
    write_log_softmax(x, out, row, rank, n, size, cached, m, s)


@cuda.jit(cache=True)
def softmax_rows(x, out, warp_rows):
    row, rank, size = row_group(warp_rows)
    if not row_in_range(x, row):
        return
    cached = cuda.local.array(VALUES, x.dtype)
    scratch = cuda.shared.array(WARP, float64)
    n = x.shape[1]
    m, s = row_stats(x, row, rank, n, size, cached, warp_rows, scratch)
    write_softmax(x, out, row, rank, n, size, cached, m, s)


@cuda.jit(cache=True)
def logsumexp_rows(x, out, warp_rows):
    row, rank, size = row_group(warp_rows)
    if not row_in_range(x, row):
        return
    cached = cuda.local.array(VALUES, x.dtype)
    scratch = cuda.shared.array(WARP, float64)
    m, s = row_stats(x, row, rank, x.shape[1], size, cached, warp_rows, scratch)
    if rank == 0:
        out[row] = finite_or_zero(m) + log_of_sum(s)


# --- split rows ----------------------------------------------------------------------------------
# Block b holds segment b % segments of row b // segments, where ``segments`` is
# ``partials.shape[1]``; ``partials[row, segment] = (m, s)`` as row_stats gives them for the segment.

@cuda.jit(device=True)
def block_segment(n_classes, segments):
    """``(row, segment, lo, hi)``: this block's row, its segment, and the segment's classes."""
    row = int64(cuda.blockIdx.x) // segments
    segment = int64(cuda.blockIdx.x) % segments
    length = (n_classes + segments - 1) // segments
    lo = segment * length
    return row, segment, lo, min(lo + length, n_classes)


@cuda.jit(device=True)
def merged_stats(partials, row, scratch):
    """The row's ``(m, s)`` from its segments' pairs, in the block's fixed order: ``m`` the max,
    ``s`` each segment's sum rescaled to ``finite_or_zero(m)``.  An all -inf segment adds
    nothing (its ``s`` is 0, and ``exp(-inf - -inf)`` would be nan)."""
    segments = partials.shape[1]
    m = -math.inf
    for k in range(cuda.threadIdx.x, segments, cuda.blockDim.x):
        m = max_nan(m, partials[row, k, 0])
    m = group_max(m, False, scratch)
    shift = finite_or_zero(m)
    s = 0.0
    for k in range(cuda.threadIdx.x, segments, cuda.blockDim.x):
        m_k = partials[row, k, 0]
        if m_k != -math.inf:
            s += partials[row, k, 1] * math.exp(finite_or_zero(m_k) - shift)
    return m, group_sum(s, False, scratch)


@cuda.jit(cache=True)
def segment_stats(x, partials):
    row, segment, lo, hi = block_segment(x.shape[1], partials.shape[1])
    cached = cuda.local.array(VALUES, x.dtype)
    scratch = cuda.shared.array(WARP, float64)
    m, s = row_stats(x, row, lo + cuda.threadIdx.x, hi, cuda.blockDim.x, cached, False, scratch)
    if cuda.threadIdx.x == 0:
        partials[row, segment, 0] = m
        partials[row, segment, 1] = s


@cuda.jit(cache=True)
def log_softmax_segments(x, partials, out):
    row, segment, lo, hi = block_segment(x.shape[1], partials.shape[1])
    cached = cuda.local.array(VALUES, x.dtype)
    scratch = cuda.shared.array(WARP, float64)
    m, s = merged_stats(partials, row, scratch)
    start, size = lo + cuda.threadIdx.x, cuda.blockDim.x
    load_row(x, row, start, hi, size, cached)
    write_log_softmax(x, out, row, start, hi, size, cached, m, s)


@cuda.jit(cache=True)
def softmax_segments(x, partials, out):
    row, segment, lo, hi = block_segment(x.shape[1], partials.shape[1])
    cached = cuda.local.array(VALUES, x.dtype)
    scratch = cuda.shared.array(WARP, float64)
    m, s = merged_stats(partials, row, scratch)
    start, size = lo + cuda.threadIdx.x, cuda.blockDim.x
    load_row(x, row, start, hi, size, cached)
    write_softmax(x, out, row, start, hi, size, cached, m, s)


@cuda.jit(cache=True)
def logsumexp_segments(partials, out):
    """One block a row: ``out[row]`` from the row's merged segments."""
    scratch = cuda.shared.array(WARP, float64)
    row = int64(cuda.blockIdx.x)
    m, s = merged_stats(partials, row, scratch)
    if cuda.threadIdx.x == 0:
        out[row] = finite_or_zero(m) + log_of_sum(s)


@cuda.jit(device=True)
def load_grad(grad_output, output, row, start, n, size, g, product):
    """Fill ``g`` with this thread's first ``VALUES`` elements of ``grad_output`` (0 from ``n``
    on) and return the float64 sum over its elements of ``grad_output``, or of
    ``grad_output * output`` where ``product``."""
    partial = 0.0
    for k in range(VALUES):
        j = start + k * size
        g[k] = grad_output[row, j] if j < n else 0.0
        if not product:
            partial += g[k]
        elif j < n:
            partial += g[k] * output[row, j]
    for j in range(start + VALUES * size, n, size):
        partial += grad_output[row, j] * output[row, j] if product else grad_output[row, j]
    return partial


@cuda.jit(device=True)
def backward_value(g, y, total, log_softmax):
    """log_softmax's gradient ``g - exp(y) * sum(g)``, or softmax's ``y * (g - sum(g * y))``."""
    return g - math.exp(y) * total if log_softmax else y * (g - total)


@cuda.jit(device=True)
def write_backward(grad_output, output, grad_input, row, start, n, size, g, total, log_softmax):
    """:func:`backward_value` over this thread's elements, ``g`` its first ``VALUES`` of
    ``grad_output`` and ``total`` the row's sum from :func:`load_grad`."""
    mine, outputs, count = grad_input[row, start:], output[row, start:], n - start
    y = cuda.local.array(UNROLL, output.dtype)
    for c in range(0, VALUES, UNROLL):
        load_chunk(outputs, c * size, count, size, y, 0)
        for u in range(UNROLL):
            j = (c + u) * size
            if j < count:
                mine[j] = backward_value(g[c + u], y[u], total, log_softmax)
    first = start + VALUES * size
    chunk = cuda.local.array(UNROLL, grad_output.dtype)
    for q in range(tail_chunks(first, n, size) - 1, -1, -1):
        j = first + q * UNROLL * size
        load_chunk(grad_output[row], j, n, size, chunk, 0)
        load_chunk(output[row], j, n, size, y, 0)
        for u in range(UNROLL):
            if j + u * size < n:
                grad_input[row, j + u * size] = backward_value(chunk[u], y[u], total,
                                                               log_softmax)


@cuda.jit(cache=True)
def log_softmax_backward_rows(grad_output, output, grad_input, warp_rows):
    row, rank, size = row_group(warp_rows)
    if not row_in_range(grad_output, row):
        return
    g = cuda.local.array(VALUES, grad_output.dtype)
    scratch = cuda.shared.array(WARP, float64)
    n = grad_output.shape[1]
    partial = load_grad(grad_output, output, row, rank, n, size, g, False)
    total = grad_output.dtype.type(group_sum(partial, warp_rows, scratch))
    write_backward(grad_output, output, grad_input, row, rank, n, size, g, total, True)


@cuda.jit(cache=True)
def softmax_backward_rows(grad_output, output, grad_input, warp_rows):
    row, rank, size = row_group(warp_rows)
    if not row_in_range(grad_output, row):
        return
    g = cuda.local.array(VALUES, grad_output.dtype)
    scratch = cuda.shared.array(WARP, float64)
    n = grad_output.shape[1]
    partial = load_grad(grad_output, output, row, rank, n, size, g, True)
    dot = grad_output.dtype.type(group_sum(partial, warp_rows, scratch))
    write_backward(grad_output, output, grad_input, row, rank, n, size, g, dot, False)


# A split row's backward pass: each segment's sum (of grad_output, or of grad_output * output
# where ``product``) in ``partials[row, segment, 0]``, then their sum, in a fixed order, and the
# write over each segment.

@cuda.jit(cache=True)
def backward_segment_sums(grad_output, output, product, partials):
    row, segment, lo, hi = block_segment(grad_output.shape[1], partials.shape[1])
    g = cuda.local.array(VALUES, grad_output.dtype)
    scratch = cuda.shared.array(WARP, float64)
    partial = load_grad(grad_output, output, row, lo + cuda.threadIdx.x, hi, cuda.blockDim.x, g,
                        product)
    total = group_sum(partial, False, scratch)
    if cuda.threadIdx.x == 0:
        partials[row, segment, 0] = total


@cuda.jit(device=True)
def merged_sum(partials, row, scratch):
    partial = 0.0
    for k in range(cuda.threadIdx.x, partials.shape[1], cuda.blockDim.x):
        partial += partials[row, k, 0]
    return group_sum(partial, False, scratch)


@cuda.jit(cache=True)
def log_softmax_backward_segments(grad_output, output, partials, grad_input):
    row, segment, lo, hi = block_segment(grad_output.shape[1], partials.shape[1])
    g = cuda.local.array(VALUES, grad_output.dtype)
    scratch = cuda.shared.array(WARP, float64)
    total = grad_output.dtype.type(merged_sum(partials, row, scratch))
    start, size = lo + cuda.threadIdx.x, cuda.blockDim.x
    load_grad(grad_output, output, row, start, hi, size, g, False)
    write_backward(grad_output, output, grad_input, row, start, hi, size, g, total, True)


@cuda.jit(cache=True)
def softmax_backward_segments(grad_output, output, partials, grad_input):
    row, segment, lo, hi = block_segment(grad_output.shape[1], partials.shape[1])
    g = cuda.local.array(VALUES, grad_output.dtype)
    scratch = cuda.shared.array(WARP, float64)
    dot = grad_output.dtype.type(merged_sum(partials, row, scratch))
    start, size = lo + cuda.threadIdx.x, cuda.blockDim.x
    load_grad(grad_output, output, row, start, hi, size, g, False)
    write_backward(grad_output, output, grad_input, row, start, hi, size, g, dot, False)


# --- losses ------------------------------------------------------------------------------------
# Formulas as in fastlsm.cpu.loss (PyTorch's): per-row float64 losses, ``lse`` per row, and the
# gradient of the reduced loss where ``grad`` is not a (0, 0) array.

@cuda.jit(device=True)
def fill_row(grad, row, start, n, size, value):
    for j in range(start, n, size):
        grad[row, j] = value


@cuda.jit(device=True)
def weighted_shifted_sum(x, row, start, n, size, cached, weight, shift, warp_rows, scratch):
    """``sum_c weight[c] * (x[c] - shift)`` over the group's part of the row (float64), for
    label smoothing."""
    partial = 0.0
    for k in range(VALUES):
        j = start + k * size
        if j < n:
            partial += weight[j] * (cached[k] - shift)
    for j in range(start + VALUES * size, n, size):
        partial += weight[j] * (x[row, j] - shift)
    return group_sum(partial, warp_rows, scratch)


@cuda.jit(device=True)
def class_grad(x_j, w_j, is_target, shift, a, b, target_term, smoothed):
    """The class-index loss's gradient at one class: ``p * a``, less ``w_j * b`` with label
    smoothing, less ``target_term`` at the target."""
    g = math.exp(x_j - shift) * a
    if smoothed:
        g -= w_j * b
    return g - target_term if is_target else g


@cuda.jit(device=True)
def finish_cross_entropy(x, row, start, n, size, leader, cached, m, s, weighted, t, ignored, x_t,
                         weight, total_weight, smoothing, z_loss, scale, loss, lse, grad):
    """The row's loss and lse (written by the ``leader`` thread) and the gradient over this
    thread's elements, from the row's ``(m, s)`` and ``weighted = sum_c weight[c] * (x[c] - m)``
    (used with label smoothing)."""
    n_classes = x.shape[1]
    log_s = log_of_sum(s)
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
    if leader:
        nll = -w_t * ((x_t - x.dtype.type(m)) - log_s)
        smooth = total_weight * log_s - weighted if smoothing > 0.0 else 0.0
        loss[row] = ((1.0 - smoothing) * nll + smoothing / n_classes * smooth
                     + z_loss * row_lse * row_lse)
    if not want_grad:
        return
    shift = x.dtype.type(m)
    p_coef = scale * ((1.0 - smoothing) * w_t + smoothing / n_classes * total_weight
                      + 2.0 * z_loss * row_lse)
    a = x.dtype.type(p_coef / s)
    b = x.dtype.type(scale * smoothing / n_classes)
    target_term = x.dtype.type(scale * (1.0 - smoothing) * w_t)
    smoothed = smoothing > 0.0  # only then does the gradient read the weights
    mine, my_weights, count = grad[row, start:], weight[start:], n - start
    target_at = t - start
    if smoothed:  # two loops rather than a test per class: each is unrolled whole
        for k in range(VALUES):
            j = k * size
            if j < count:
                mine[j] = class_grad(cached[k], my_weights[j], j == target_at, shift, a, b,
                                     target_term, True)
    else:
        for k in range(VALUES):
            j = k * size
            if j < count:
                mine[j] = class_grad(cached[k], 0, j == target_at, shift, a, b, target_term,
                                     False)
    w = cuda.local.array(UNROLL, weight.dtype)
    first = start + VALUES * size
    chunk = cuda.local.array(UNROLL, x.dtype)
    for q in range(tail_chunks(first, n, size) - 1, -1, -1):
        j = first + q * UNROLL * size
        load_chunk(x[row], j, n, size, chunk, 0)
        if smoothed:
            load_chunk(weight, j, n, size, w, 0)
        for u in range(UNROLL):
            ju = j + u * size
            if ju < n:
                grad[row, ju] = class_grad(chunk[u], w[u], ju == t, shift, a, b, target_term,
                                           smoothed)


@cuda.jit(cache=True)
def cross_entropy_rows(x, target, weight, total_weight, ignore_index, smoothing, z_loss, scale,
                       loss, lse, grad, warp_rows):
    row, rank, size = row_group(warp_rows)
    if not row_in_range(x, row):
        return
    n = x.shape[1]
    t = target[row]
    cached = cuda.local.array(VALUES, x.dtype)
    scratch = cuda.shared.array(WARP, float64)
    m, s = row_stats(x, row, rank, n, size, cached, warp_rows, scratch)
    ignored = t == ignore_index
    weighted = 0.0
    if smoothing > 0.0 and math.isfinite(m) and not ignored:
        weighted = weighted_shifted_sum(x, row, rank, n, size, cached, weight, x.dtype.type(m),
                                        warp_rows, scratch)
    # The thread that holds the target's class reads its logit and writes the row's loss: it is
    # the only one to write the gradient there (grad may be x), and no load of the row waited on
    # the read, as they would at the start of the kernel.
    owns_target = not ignored and t % size == rank
    x_t = x[row, t] if owns_target else x.dtype.type(0.0)
    leader = owns_target or (ignored and rank == 0)
    finish_cross_entropy(x, row, rank, n, size, leader, cached, m, s, weighted, t, ignored, x_t,
                         weight, total_weight, smoothing, z_loss, scale, loss, lse, grad)


# A split row's partials for the loss: ``(m, s, sum_c w_c (x_c - finite_or_zero(m)), sum_c w_c)``
# of each segment (the last two with label smoothing only), and in ``[row, 0, 4]`` the target's
# logit, read by its segment before any block writes a gradient over it (grad may be x).
CROSS_ENTROPY_PARTIALS = 5


@cuda.jit(cache=True)
def cross_entropy_segment_stats(x, target, weight, smoothing, partials):
    row, segment, lo, hi = block_segment(x.shape[1], partials.shape[1])
    start, size = lo + cuda.threadIdx.x, cuda.blockDim.x
    cached = cuda.local.array(VALUES, x.dtype)
    scratch = cuda.shared.array(WARP, float64)
    m, s = row_stats(x, row, start, hi, size, cached, False, scratch)
    weighted = 0.0
    total = 0.0
    if smoothing > 0.0:
        weighted = weighted_shifted_sum(x, row, start, hi, size, cached, weight,
                                        x.dtype.type(finite_or_zero(m)), False, scratch)
        for j in range(start, hi, size):
            total += weight[j]
        total = group_sum(total, False, scratch)
    if cuda.threadIdx.x == 0:
        partials[row, segment, 0] = m
        partials[row, segment, 1] = s
        partials[row, segment, 2] = weighted
        partials[row, segment, 3] = total
        t = target[row]
        if lo <= t < hi:
            partials[row, 0, 4] = x[row, t]


@cuda.jit(cache=True)
def cross_entropy_segments(x, target, weight, total_weight, ignore_index, smoothing, z_loss, scale,
                           partials, loss, lse, grad):
    row, segment, lo, hi = block_segment(x.shape[1], partials.shape[1])
    if segment > 0 and grad.shape[0] == 0:
        return  # the first segment's block writes the loss; without a gradient, nothing else
    cached = cuda.local.array(VALUES, x.dtype)
    scratch = cuda.shared.array(WARP, float64)
    m, s = merged_stats(partials, row, scratch)
    t = target[row]
    ignored = t == ignore_index
    x_t = x.dtype.type(partials[row, 0, 4]) if not ignored else x.dtype.type(0.0)
    weighted = 0.0
    if smoothing > 0.0 and math.isfinite(m) and not ignored:
        for k in range(cuda.threadIdx.x, partials.shape[1], cuda.blockDim.x):
            weighted += (partials[row, k, 2]
                         + (finite_or_zero(partials[row, k, 0]) - m) * partials[row, k, 3])
        weighted = group_sum(weighted, False, scratch)
    start, size = lo + cuda.threadIdx.x, cuda.blockDim.x
    if grad.shape[0] > 0:
        load_row(x, row, start, hi, size, cached)
    finish_cross_entropy(x, row, start, hi, size, segment == 0 and cuda.threadIdx.x == 0, cached,
                         m, s, weighted, t, ignored, x_t, weight, total_weight, smoothing, z_loss,
                         scale, loss, lse, grad)


@cuda.jit(device=True)
def probability_sums(x, y, weight, row, start, n, size, cached, shift, smoothing):
    """This thread's float64 ``(sum wy, sum wy * (x - shift))`` over its elements, where
    ``wy = weight * y`` with ``y`` smoothed."""
    keep = 1.0 - smoothing
    spread = smoothing / x.shape[1]
    wy_partial = 0.0
    wyx_partial = 0.0
    for k in range(VALUES):
        j = start + k * size
        if j < n:
            wy = weight[j] * (y[row, j] * keep + spread)
            wy_partial += wy
            wyx_partial += wy * (cached[k] - shift)
    for j in range(start + VALUES * size, n, size):
        wy = weight[j] * (y[row, j] * keep + spread)
        wy_partial += wy
        wyx_partial += wy * (x[row, j] - shift)
    return wy_partial, wyx_partial


@cuda.jit(device=True)
def finish_cross_entropy_probs(x, y, weight, row, start, n, size, leader, cached, m, s, wy_sum,
                               wyx_sum, smoothing, z_loss, scale, loss, lse, grad):
    """The row's loss and lse (by the ``leader``) and the gradient over this thread's elements,
    from the row's ``(m, s)`` and sums ``wy_sum``, ``wyx_sum`` (:func:`probability_sums` with
    ``shift = m``)."""
    log_s = log_of_sum(s)
    row_lse = finite_or_zero(m) + log_s
    if leader and lse.shape[0] > 0:
        lse[row] = row_lse
    want_grad = grad.shape[0] > 0
    if not math.isfinite(m):
        if leader:
            loss[row] = math.nan
        if want_grad:
            fill_row(grad, row, start, n, size, math.nan)
        return
    if leader:
        loss[row] = wy_sum * log_s - wyx_sum + z_loss * row_lse * row_lse
    if not want_grad:
        return
    shift = x.dtype.type(m)
    keep = 1.0 - smoothing
    spread = smoothing / x.shape[1]
    a = x.dtype.type(scale * (wy_sum + 2.0 * z_loss * row_lse) / s)
    mine, my_weights, my_y, count = grad[row, start:], weight[start:], y[row, start:], n - start
    for k in range(VALUES):  # two loops: one would be too long to unroll whole in float64
        cached[k] = math.exp(cached[k] - shift) * a
    for k in range(VALUES):  # a load before each store: see "the losses' cached part" above
        j = k * size
        if j < count:
            mine[j] = cached[k] - scale * my_weights[j] * (my_y[j] * keep + spread)
    w = cuda.local.array(UNROLL, weight.dtype)
    p = cuda.local.array(UNROLL, y.dtype)
    first = start + VALUES * size
    chunk = cuda.local.array(UNROLL, x.dtype)
    for q in range(tail_chunks(first, n, size) - 1, -1, -1):
        j = first + q * UNROLL * size
        load_chunk(x[row], j, n, size, chunk, 0)
        load_chunk(weight, j, n, size, w, 0)
        load_chunk(y[row], j, n, size, p, 0)
        for u in range(UNROLL):
            if j + u * size < n:
                grad[row, j + u * size] = (math.exp(chunk[u] - shift) * a
                                           - scale * w[u] * (p[u] * keep + spread))


@cuda.jit(cache=True)
def cross_entropy_probs_rows(x, y, weight, smoothing, z_loss, scale, loss, lse, grad, warp_rows):
    row, rank, size = row_group(warp_rows)
    if not row_in_range(x, row):
        return
    n = x.shape[1]
    cached = cuda.local.array(VALUES, x.dtype)
    scratch = cuda.shared.array(WARP, float64)
    m, s = row_stats(x, row, rank, n, size, cached, warp_rows, scratch)
    wy_sum = 0.0
    wyx_sum = 0.0
    if math.isfinite(m):
        wy_partial, wyx_partial = probability_sums(x, y, weight, row, rank, n, size, cached,
                                                   x.dtype.type(m), smoothing)
        wy_sum = group_sum(wy_partial, warp_rows, scratch)
        wyx_sum = group_sum(wyx_partial, warp_rows, scratch)
    finish_cross_entropy_probs(x, y, weight, row, rank, n, size, rank == 0, cached, m, s, wy_sum,
                               wyx_sum, smoothing, z_loss, scale, loss, lse, grad)


# A split row's partials for probability targets: ``(m, s, sum wy, sum wy * (x - finite_or_zero(m)))``
# of each segment.
PROBABILITY_PARTIALS = 4


@cuda.jit(cache=True)
def cross_entropy_probs_segment_stats(x, y, weight, smoothing, partials):
    row, segment, lo, hi = block_segment(x.shape[1], partials.shape[1])
    start, size = lo + cuda.threadIdx.x, cuda.blockDim.x
    cached = cuda.local.array(VALUES, x.dtype)
    scratch = cuda.shared.array(WARP, float64)
    m, s = row_stats(x, row, start, hi, size, cached, False, scratch)
    wy_partial, wyx_partial = probability_sums(x, y, weight, row, start, hi, size, cached,
                                               x.dtype.type(finite_or_zero(m)), smoothing)
    wy = group_sum(wy_partial, False, scratch)
    wyx = group_sum(wyx_partial, False, scratch)
    if cuda.threadIdx.x == 0:
        partials[row, segment, 0] = m
        partials[row, segment, 1] = s
        partials[row, segment, 2] = wy
        partials[row, segment, 3] = wyx


@cuda.jit(cache=True)
def cross_entropy_probs_segments(x, y, weight, smoothing, z_loss, scale, partials, loss, lse,
                                 grad):
    row, segment, lo, hi = block_segment(x.shape[1], partials.shape[1])
    if segment > 0 and grad.shape[0] == 0:
        return  # the first segment's block writes the loss; without a gradient, nothing else
    cached = cuda.local.array(VALUES, x.dtype)
    scratch = cuda.shared.array(WARP, float64)
    m, s = merged_stats(partials, row, scratch)
    wy_sum = 0.0
    wyx_sum = 0.0
    if math.isfinite(m):
        for k in range(cuda.threadIdx.x, partials.shape[1], cuda.blockDim.x):
            wy_sum += partials[row, k, 2]
            wyx_sum += (partials[row, k, 3]
                        + (finite_or_zero(partials[row, k, 0]) - m) * partials[row, k, 2])
        wy_sum = group_sum(wy_sum, False, scratch)
        wyx_sum = group_sum(wyx_sum, False, scratch)
    start, size = lo + cuda.threadIdx.x, cuda.blockDim.x
    if grad.shape[0] > 0:
        load_row(x, row, start, hi, size, cached)
    finish_cross_entropy_probs(x, y, weight, row, start, hi, size,
                               segment == 0 and cuda.threadIdx.x == 0, cached, m, s, wy_sum,
                               wyx_sum, smoothing, z_loss, scale, loss, lse, grad)


@cuda.jit(cache=True)
def nll_loss_rows(x, target, weight, ignore_index, scale, loss, grad, warp_rows):
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
        for j in range(rank, grad.shape[1], size):
            grad[row, j] = -scale * weight[t] if j == t and not ignored else 0.0


@cuda.jit(cache=True)
def check_targets(target, weight, ignore_index, out):
    """``out[0]``: the first position of a target outside ``[0, C)`` that is not
    ``ignore_index`` (the target count where there is none); ``out[1]``: the sum of
    ``weight[t]`` over the kept targets.  One block, in a fixed order (as :func:`sum_rows`), so
    the caller learns both with one copy to the host.  Targets are read ``UNROLL`` at a time, and
    their weights after them: a block has few loads in flight otherwise."""
    scratch = cuda.shared.array(WARP, float64)
    n = target.shape[0]
    size = cuda.blockDim.x
    first = float64(n)
    denominator = float64(0.0)
    n_classes = weight.shape[0]
    chunk = cuda.local.array(UNROLL, int64)
    weights = cuda.local.array(UNROLL, weight.dtype)
    for i in range(cuda.threadIdx.x, n, UNROLL * size):
        load_chunk(target, i, n, size, chunk, ignore_index)
        for u in range(UNROLL):  # clamped, so that the loads need no test and go together
            weights[u] = weight[min(max(chunk[u], 0), n_classes - 1)] if n_classes > 0 else 0
        for u in range(UNROLL):
            t = chunk[u]
            if t == ignore_index:
                continue
            if 0 <= t < n_classes:
                denominator += weights[u]
            else:  # this thread walks up: its first bad target is its smallest
                first = min(first, float64(i + u * size))
    first = -group_max(-first, False, scratch)
    denominator = group_sum(denominator, False, scratch)
    if cuda.threadIdx.x == 0:
        out[0] = first
        out[1] = denominator


@cuda.jit(cache=True)
def sum_rows(values, divisor, out):
    """``out[0] = sum(values) / divisor``: one block, each thread a fixed stride, then a fixed
    tree, so the same input always gives the same bits (no float atomics)."""
    scratch = cuda.shared.array(WARP, float64)
    n = values.shape[0]
    partial = float64(0.0)
    chunk = cuda.local.array(UNROLL, float64)
    for i in range(cuda.threadIdx.x, n, UNROLL * cuda.blockDim.x):
        load_chunk(values, i, n, cuda.blockDim.x, chunk, 0)
        for u in range(UNROLL):
            partial += chunk[u]
    total = group_sum(partial, False, scratch)
    if cuda.threadIdx.x == 0:
        out[0] = total / divisor


# --- layout ------------------------------------------------------------------------------------

TILE = 32
TILE_PAD = TILE + 1  # a padded tile row: no shared-memory bank conflicts


@cuda.jit(cache=True)
def swap_last_axes(src, dst):
    """``dst[b, j, i] = src[b, i, j]`` through a shared-memory tile, so both sides are coalesced."""
    tile = cuda.shared.array((TILE, TILE_PAD), float64)
    i0 = cuda.blockIdx.y * TILE
    j0 = cuda.blockIdx.x * TILE
    tx = cuda.threadIdx.x
    for b in range(cuda.blockIdx.z, src.shape[0], cuda.gridDim.z):
        for ty in range(cuda.threadIdx.y, TILE, cuda.blockDim.y):
            i, j = i0 + ty, j0 + tx
            if i < src.shape[1] and j < src.shape[2]:
                tile[ty, tx] = src[b, i, j]
        cuda.syncthreads()
        for ty in range(cuda.threadIdx.y, TILE, cuda.blockDim.y):
            j, i = j0 + ty, i0 + tx
            if j < src.shape[2] and i < src.shape[1]:
                dst[b, j, i] = tile[tx, ty]
        cuda.syncthreads()  # the tile is read out before the next batch overwrites it


@cuda.jit(cache=True)
def cast(src, dst):
    """``dst[i] = src[i]`` in ``dst``'s dtype (float16 in and out of float32 computation)."""
    for i in range(cuda.grid(1), src.shape[0], cuda.gridsize(1)):
        dst[i] = src[i]
