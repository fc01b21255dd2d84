"""log_softmax, softmax and logsumexp on NVIDIA GPUs: a row in one pass, or split into segments."""

import math

from numba import cuda, float64, int64

from fastlsm.backends.cuda.kernels.primitives import (UNROLL, VALUES, WARP, RowKernels,
                                                      block_segment, load_chunk, load_row,
                                                      merged_stats, row_group, row_in_range,
                                                      row_stats, tail_chunks)
from fastlsm.backends.formulas import finite_or_zero, log_sum


@cuda.jit(device=True)
def write_log_softmax(x, out, row, start, n, size, cached, m, e):
    """``out = (x - shift) - log(s)`` over this thread's elements, from the row's ``(m, e)``
    (``shift`` kept apart from the log for float32 accuracy where ``|m|`` is large)."""
    shift = x.dtype.type(finite_or_zero(m))
    log_s = x.dtype.type(log_sum(e))
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
def write_softmax(x, out, row, start, n, size, cached, m, e):
    if not math.isfinite(m):  # SciPy: exp(x - max) / sum is nan throughout
        for j in range(start, n, size):
            out[row, j] = math.nan
        return
    shift = x.dtype.type(m)
    inverse = x.dtype.type(1.0 / (1.0 + e))
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
    m, e = row_stats(x, row, rank, n, size, cached, warp_rows, scratch)
    write_log_softmax(x, out, row, rank, n, size, cached, m, e)


@cuda.jit(cache=True)
def softmax_rows(x, out, warp_rows):
    row, rank, size = row_group(warp_rows)
    if not row_in_range(x, row):
        return
    cached = cuda.local.array(VALUES, x.dtype)
    scratch = cuda.shared.array(WARP, float64)
    n = x.shape[1]
    m, e = row_stats(x, row, rank, n, size, cached, warp_rows, scratch)
    write_softmax(x, out, row, rank, n, size, cached, m, e)


@cuda.jit(cache=True)
def logsumexp_rows(x, out, warp_rows):
    row, rank, size = row_group(warp_rows)
    if not row_in_range(x, row):
        return
    cached = cuda.local.array(VALUES, x.dtype)
    scratch = cuda.shared.array(WARP, float64)
    m, e = row_stats(x, row, rank, x.shape[1], size, cached, warp_rows, scratch)
    if rank == 0:
        out[row] = finite_or_zero(m) + log_sum(e)



@cuda.jit(cache=True)
def segment_stats(x, partials):
    row, segment, lo, hi = block_segment(x.shape[1], partials.shape[1])
    cached = cuda.local.array(VALUES, x.dtype)
    scratch = cuda.shared.array(WARP, float64)
    m, e = row_stats(x, row, lo + cuda.threadIdx.x, hi, cuda.blockDim.x, cached, False, scratch)
    if cuda.threadIdx.x == 0:
        partials[row, segment, 0] = m
        partials[row, segment, 1] = e


@cuda.jit(cache=True)
def log_softmax_segments(x, partials, out):
    row, segment, lo, hi = block_segment(x.shape[1], partials.shape[1])
    cached = cuda.local.array(VALUES, x.dtype)
    scratch = cuda.shared.array(WARP, float64)
    m, e = merged_stats(partials, row, scratch)
    start, size = lo + cuda.threadIdx.x, cuda.blockDim.x
    load_row(x, row, start, hi, size, cached)
    write_log_softmax(x, out, row, start, hi, size, cached, m, e)


@cuda.jit(cache=True)
def softmax_segments(x, partials, out):
    row, segment, lo, hi = block_segment(x.shape[1], partials.shape[1])
    cached = cuda.local.array(VALUES, x.dtype)
    scratch = cuda.shared.array(WARP, float64)
    m, e = merged_stats(partials, row, scratch)
    start, size = lo + cuda.threadIdx.x, cuda.blockDim.x
    load_row(x, row, start, hi, size, cached)
    write_softmax(x, out, row, start, hi, size, cached, m, e)


@cuda.jit(cache=True)
def logsumexp_segments(partials, out):
    """One block a row: ``out[row]`` from the row's merged segments."""
    scratch = cuda.shared.array(WARP, float64)
    row = int64(cuda.blockIdx.x)
    m, e = merged_stats(partials, row, scratch)
    if cuda.threadIdx.x == 0:
        out[row] = finite_or_zero(m) + log_sum(e)



LOG_SOFTMAX = RowKernels(log_softmax_rows, segment_stats, log_softmax_segments)
SOFTMAX = RowKernels(softmax_rows, segment_stats, softmax_segments)
LOGSUMEXP = RowKernels(logsumexp_rows, segment_stats, logsumexp_segments)
