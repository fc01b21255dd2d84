"""Row-wise log_softmax / softmax / logsumexp kernels and their backward passes.

Every kernel takes 2-D arrays whose last axis is the class axis, with contiguous rows (unit column
stride: the dispatcher guarantees it), and loops over rows with ``prange``; :func:`rowwise` compiles each one twice, as a parallel and as a serial kernel, so the
dispatcher can skip thread start-up on small inputs.

A row is read from memory once for its statistics: it is walked in blocks that fit in L1, each
block's max is found first and the block's ``exp`` sum is then taken from cache, and the running
sum is rescaled when the max grows (the online (max, sum) merge).  The write pass reads the row a
second time, from L2 for rows up to ~1 MiB.
"""

import math
from types import FunctionType
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from fastlsm.cpu._simd import contiguous_row, exp, max_ignoring_nan

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
def _finite_or_zero(m):
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
def _block_sum_exp(row, start, stop, shift):
    # Summed in the row's dtype over one block (16 lanes of 128 float32 terms at most), then
    # added to a float64 total by the caller: ~1e-8 relative on 300k-element float32 rows.
    c = row.dtype.type(shift)
    s = row.dtype.type(0.0)
    for j in range(np.uint64(start), np.uint64(stop)):
        s += exp(row[j] - c)
    return s


# The block loops are inlined here, so this function's `reassoc` (which lets LLVM split a sum
# across SIMD lanes and assumes nothing about inf or nan) is what vectorises the sum of exps.
@njit(fastmath={"reassoc"})
def row_max_and_sum(row):
    """``(m, s)``: the row's max (nan ignored) and ``s = sum(exp(row - shift))``,
    ``shift = m`` if finite else 0.

    A nan anywhere makes ``s`` nan; ``s`` is 0 for an all ``-inf`` or empty row and ``inf`` for a
    row holding ``+inf``.
    """
    n = row.shape[0]
    if n <= BLOCK:
        # One block needs no merge; skipping the loop cut 10-class rows by about a third.
        m = _block_max(row, 0, n)
        return m, float(_block_sum_exp(row, 0, n, _finite_or_zero(m)))
    m = -np.inf
    s = 0.0
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        block_m = _block_max(row, start, stop)
        if block_m > m:
            # s == 0 guards the -inf -> finite step, where exp(0 - m) can overflow and 0 * inf is nan.
            if s != 0.0:
                s *= math.exp(_finite_or_zero(m) - _finite_or_zero(block_m))
            m = block_m
        s += _block_sum_exp(row, start, stop, _finite_or_zero(m))
    return m, s


@njit
def row_log_sum_exp(row):
    """``(m, s, log(s), lse)``: :func:`row_max_and_sum` and the row's log-sum-exp."""
    m, s = row_max_and_sum(row)
    log_s = math.log(s)
    return m, s, log_s, _finite_or_zero(m) + log_s


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


@rowwise
def log_softmax_rows(x, out):
    for i in prange(x.shape[0]):
        row, dst = contiguous_row(x, i), contiguous_row(out, i)
        m, s = row_max_and_sum(row)
        c = row.dtype.type(_finite_or_zero(m))
        log_s = row.dtype.type(math.log(s))
        for j in range(row.shape[0]):
            dst[j] = (row[j] - c) - log_s


@rowwise
def softmax_rows(x, out):
    for i in prange(x.shape[0]):
        row, dst = contiguous_row(x, i), contiguous_row(out, i)
        m, s = row_max_and_sum(row)
        if not math.isfinite(m):
            # SciPy's softmax shifts by the max even when it is not finite: such rows are nan.
            dst[:] = np.nan
            continue
        c = row.dtype.type(m)
        inv_s = row.dtype.type(1.0 / s)
        for j in range(row.shape[0]):
            dst[j] = exp(row[j] - c) * inv_s


@rowwise
def logsumexp_rows(x, out):
    for i in prange(x.shape[0]):
        out[i] = row_log_sum_exp(contiguous_row(x, i))[3]


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


# Square tiles of a 2-D copy: both the source's rows and the destination's stay in cache while a
# tile is transposed, whatever the two layouts.
COPY_TILE = 64


@rowwise
def copy_tiles(src, dst):
    rows, columns = src.shape
    for tile in prange((rows + COPY_TILE - 1) // COPY_TILE):
        first = tile * COPY_TILE
        last = min(rows, first + COPY_TILE)
        for column in range(0, columns, COPY_TILE):
            for i in range(first, last):
                for j in range(column, min(columns, column + COPY_TILE)):
                    dst[i, j] = src[i, j]
