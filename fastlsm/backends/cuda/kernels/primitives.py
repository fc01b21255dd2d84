"""What every CUDA kernel of fastlsm is made of: rows held by groups of threads, their reductions,
and rows split into segments.  The kernels themselves, the GPU twins of the CPU's, are in
:mod:`.softmax`, :mod:`.backward`, :mod:`.loss` and :mod:`.reduce`; :class:`RowKernels` bundles an
operation's.

Every row kernel takes C-ordered ``(rows, classes)`` device arrays and hands each row to a
*group* of threads: one warp for rows of up to ``WARP * VALUES`` classes (several rows to a
block), or a whole block for longer rows (``warp_rows`` says which).  Element ``j`` of a row
belongs to thread ``j % size`` of its group, which keeps its first ``VALUES`` elements in
registers (``cached``, fully unrolled: no local memory, checked on the PTX by the tests).  So a
row that fits is read from memory once and written once; the part of a longer row beyond
``VALUES * size`` elements is streamed with the online (max, sum) merge and read again to write.

When rows are long and too few to fill the GPU, a row is *split* into segments, one block each
(the ``*_segments`` kernels): a ``segment_stats`` kernel writes each segment's ``(m, e)``, and a
second kernel merges a row's pairs (semantics.md's (max, sum) merge, in a fixed order) and writes
its segment, which it reads again (from L2, where few rows fit).  The helpers here therefore take a
thread's first element ``start`` and the end ``n`` of its part of the row, and the write phases
are device functions shared by the one-pass and the split kernels.

Reductions inside a group are warp shuffles (``shfl_xor_sync``) and, across the warps of a
block, a fixed-order pass over shared memory: the result never depends on timing.  Sums of
exponentials are float64; the exponentials themselves are computed in the row's dtype.  A row's
sum ``s`` is carried as its excess ``e = s - 1`` (:mod:`fastlsm.backends.formulas`): the terms
exactly equal to 1 (the max's own) are counted apart from the rest, so that where one entry
dominates, the small terms are not lost in the 1 (``log_s = log1p(e)``).

Non-finite rows follow SciPy (log_softmax, softmax, logsumexp) or PyTorch (the losses), exactly
as the CPU kernels do (the shared formulas are :mod:`fastlsm.backends.formulas`'); see
:func:`row_stats`.
"""

import math
from dataclasses import dataclass

from numba import cuda, float64, int64

from fastlsm.backends.formulas import (excess_of, finite_or_zero, merged_excess, rescaled,
                                       soft_cap_slope, soft_capped)

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
def soft_cap(v, softcap, kind):
    """A logit as the losses read it: ``softcap * tanh(v / softcap)``
    (:func:`~fastlsm.backends.formulas.soft_capped`), or ``v`` itself where ``softcap`` is None.
    numba-cuda prunes the branch for a None argument, so a kernel launched without a soft cap
    compiles to the code it had before the cap was fused in (tests/cuda_compile.py checks)."""
    if softcap is None:
        return v
    a = abs(v) * kind(1.0 / softcap)
    return soft_capped(v, a, math.exp(a * kind(-2.0)), softcap, kind)


@cuda.jit(device=True)
def soft_capped_gradient(g, capped, softcap, kind):
    """A gradient ``g`` with respect to the capped logit ``capped`` brought to the raw logit
    (:func:`~fastlsm.backends.formulas.soft_cap_slope`); ``g`` itself without a soft cap."""
    if softcap is None:
        return g
    return g * soft_cap_slope(capped, 1.0 / softcap, kind)


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
def load_row(x, row, start, n, size, cached, softcap=None):
    """Fill ``cached`` with this thread's first ``VALUES`` elements, ``start`` and every
    ``size``-th after it (-inf from ``n`` on), soft-capped where ``softcap`` is a number
    (:func:`soft_cap`), and return their max."""
    low = x.dtype.type(-math.inf)
    m = low
    for k in range(VALUES):
        j = start + k * size
        v = soft_cap(x[row, j], softcap, x.dtype.type) if j < n else low
        cached[k] = v
        m = max_nan(m, v)
    return m


@cuda.jit(device=True)
def load_chunk(a, j, n, size, chunk, fill, softcap=None):
    """``chunk[u] = a[j + u * size]`` of a vector (a row, or a thread's view of one): ``UNROLL``
    loads issued together, one trip to memory; ``fill`` from ``n`` on.  Logits are soft-capped
    where ``softcap`` is a number (:func:`soft_cap`)."""
    for u in range(UNROLL):
        jj = j + u * size
        chunk[u] = soft_cap(a[jj], softcap, a.dtype.type) if jj < n else a.dtype.type(fill)


@cuda.jit(device=True)
def stream_stats(x, row, start, n, size, softcap=None):
    """``(m, rest, ties)`` of this thread's elements beyond the cached ones, up to ``n``: the
    max and ``sum(exp(x - m))`` as ``ties`` terms equal to 1 and the ``rest`` (both 0 while ``m``
    is -inf), merged online ``UNROLL`` loads at a time."""
    low = x.dtype.type(-math.inf)
    m = low
    rest = 0.0
    ties = 0.0
    chunk = cuda.local.array(UNROLL, x.dtype)
    for j in range(start + VALUES * size, n, UNROLL * size):
        load_chunk(x[row], j, n, size, chunk, low, softcap)
        top = chunk[0]
        for u in range(1, UNROLL):
            top = max_nan(top, chunk[u])
        # The (max, sum) merge inline, without formulas.rescaled's test: this is the long rows'
        # hot loop, and a row whose max is not finite is summed again by row_stats anyway.  Below
        # a new max the old 1s are 1s no longer.
        if top > m or top != top:
            rest = (rest + ties) * math.exp(m - top)  # 0 * 0 while m was -inf
            ties = 0.0
            m = top
        if m != low:  # all -inf so far: exp(-inf - -inf) would be nan
            for u in range(UNROLL):
                t = math.exp(chunk[u] - m)
                if t == 1.0:
                    ties += 1.0
                else:
                    rest += t
    return m, rest, ties


@cuda.jit(device=True)
def row_stats(x, row, start, n, size, cached, warp_rows, scratch, softcap=None):
    """``(m, e)`` of the group's part of the row (its elements from ``start - rank`` to ``n``):
    its max (float64, nan if it holds a nan) and the excess ``e = s - 1`` of
    ``s = sum(exp(x - finite_or_zero(m)))`` (float64), the same in every thread of the group.

    Each thread counts its terms equal to 1 (``ties``) apart from the ``rest``, and the group sums
    both: ``e = (ties - 1) + rest`` never adds the max's 1 to the small terms.  Fills ``cached``
    (:func:`load_row`).  A part whose max is not finite sums ``exp(x)`` again from memory, all of
    it into ``rest`` (``e = s - 1`` is exact there: ``s`` is 0, inf or nan): SciPy's answers for
    it (-inf, inf, nan) come from that unshifted sum.  The row is soft-capped where ``softcap``
    is a number (:func:`soft_cap`).
    """
    m_cached = load_row(x, row, start, n, size, cached, softcap)
    m_stream, rest_stream, ties_stream = stream_stats(x, row, start, n, size, softcap)
    m = group_max(max_nan(m_cached, m_stream), warp_rows, scratch)
    rest = 0.0
    ties = 0.0
    if math.isfinite(m):
        shift = x.dtype.type(m)
        for k in range(VALUES):
            t = math.exp(cached[k] - shift)
            if t == 1.0:
                ties += 1.0
            else:
                rest += t
        if m_stream == shift:  # the stream's 1s are the row's
            rest += rest_stream
            ties += ties_stream
        else:  # below the row's max, its 1s are small terms like the others
            rest += rescaled(rest_stream + ties_stream, m_stream, shift)
    else:  # rare: no need to stream well
        for k in range(VALUES):
            rest += math.exp(cached[k])
        for j in range(start + VALUES * size, n, size):
            rest += math.exp(soft_cap(x[row, j], softcap, x.dtype.type))
    return m, excess_of(group_sum(rest, warp_rows, scratch), group_sum(ties, warp_rows, scratch))


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



# --- split rows ----------------------------------------------------------------------------------
# Block b holds segment b % segments of row b // segments, where ``segments`` is
# ``partials.shape[1]``; ``partials[row, segment]`` holds the segment's statistics, ``(m, e)`` as
# row_stats gives them first.

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
    """The row's ``(m, e)`` from its segments' pairs, in the block's fixed order: ``m`` the max
    (nan if a segment's is) and ``e`` the excess of the segments' sums rescaled to
    ``finite_or_zero(m)`` (the (max, sum) merge).

    Each thread merges its segments in turn (:func:`~fastlsm.backends.formulas.merged_excess`),
    then the block sums the threads' as :func:`row_stats` sums terms: a thread that holds the
    row's max adds its 1 to ``ties`` and its excess to ``rest``, any other its whole sum, rescaled,
    to ``rest`` (nothing for a thread without segments, or with all -inf ones: a sum of 0).
    Where every segment is all -inf, each thread adds 1 and -1: ``e`` is -1.
    """
    segments = partials.shape[1]
    m, e = -math.inf, -1.0
    row_m = -math.inf
    for k in range(cuda.threadIdx.x, segments, cuda.blockDim.x):
        m, e = merged_excess(m, e, partials[row, k, 0], partials[row, k, 1])
        # merged_excess keeps a nan max out of m (it makes e nan): the row's max is the
        # segments', nan if one holds a nan, as row_stats finds for the whole row.
        row_m = max_nan(row_m, partials[row, k, 0])
    row_m = group_max(row_m, False, scratch)
    if m == row_m:
        rest, ties = e, 1.0
    else:
        rest, ties = rescaled(1.0 + e, finite_or_zero(m), finite_or_zero(row_m)), 0.0
    return row_m, excess_of(group_sum(rest, False, scratch), group_sum(ties, False, scratch))



@cuda.jit(device=True)
def merged_sum(partials, row, scratch):
    """The sum of the row's segments' ``partials[row, :, 0]``, in the block's fixed order."""
    partial = 0.0
    for k in range(cuda.threadIdx.x, partials.shape[1], cuda.blockDim.x):
        partial += partials[row, k, 0]
    return group_sum(partial, False, scratch)



@cuda.jit(device=True)
def fill_row(grad, row, start, n, size, value):
    for j in range(start, n, size):
        grad[row, j] = value



@dataclass(frozen=True)
class RowKernels:
    """One operation's CUDA kernels: ``rows`` reads each row in one pass (a group of threads a
    row); for a row split into segments, ``segment_stats`` writes each segment's ``partials``
    (that many float64 numbers) and ``segments`` merges them and writes the segment's part of the
    result (or, for a reduction, one block a row writes the row's)."""
    rows: object
    segment_stats: object | None = None
    segments: object | None = None
    partials: int = 2

