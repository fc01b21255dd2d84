"""Row-wise log_softmax / softmax / logsumexp kernels and their backward passes.

Every kernel takes 2-D arrays whose last axis is the class axis and loops over rows with
``prange``; :func:`rowwise` compiles each one twice, as a parallel and as a serial kernel, so the
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
from numba import njit, prange, types
from numba.extending import overload

from fastlsm.cpu._simd import exp, max_ignoring_nan

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


# Helpers index the 2-D arrays as ``x[i, j]`` rather than slicing (a view costs an atomic
# reference-count update).  Loops that do not start at 0 count in uint64: Numba then drops the
# negative-index wraparound select, which otherwise turns every vector load into 8 scalar ones.

@njit
def _block_max(x, i, start, stop):
    m = x.dtype.type(-np.inf)
    for j in range(np.uint64(start), np.uint64(stop)):
        m = max_ignoring_nan(m, x[i, j])
    return m


def _block_sum_zero(x):
    """The zero a block's sum of exps starts from (typed by the overload below)."""


@overload(_block_sum_zero)
def _block_sum_zero_overload(x):
    # A C-ordered float32 block is summed 16 lanes wide in float32 (128 terms a lane) and then
    # added to a float64 total: ~1e-8 relative on 300k-element rows, at float32 SIMD speed.
    # Strided rows do not vectorise, and one float32 chain of 2048 terms loses up to ~10 ulps,
    # so they sum in float64, which costs them nothing.
    if x.layout == "C" and x.dtype == types.float32:
        return lambda x: np.float32(0.0)
    return lambda x: 0.0


# `reassoc` lets LLVM split a sum across SIMD lanes; it assumes nothing about inf or nan.
@njit(fastmath={"reassoc"})
def _block_sum_exp(x, i, start, stop, shift):
    c = x.dtype.type(shift)
    s = _block_sum_zero(x)
    for j in range(np.uint64(start), np.uint64(stop)):
        s += exp(x[i, j] - c)
    return s


@njit
def row_max_and_sum(x, i):
    """``(m, s)`` of row ``i``: its max (nan ignored) and ``s = sum(exp(x[i] - shift))``,
    ``shift = m`` if finite else 0.

    A nan anywhere makes ``s`` nan; ``s`` is 0 for an all ``-inf`` or empty row and ``inf`` for a
    row holding ``+inf``.
    """
    m = -np.inf
    s = 0.0
    n = x.shape[1]
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        block_m = _block_max(x, i, start, stop)
        if block_m > m:
            # s == 0 guards the -inf -> finite step, where exp(0 - m) can overflow and 0 * inf is nan.
            if s != 0.0:
                s *= math.exp(_finite_or_zero(m) - _finite_or_zero(block_m))
            m = block_m
        s += _block_sum_exp(x, i, start, stop, _finite_or_zero(m))
    return m, s


@njit
def row_log_sum_exp(x, i):
    """``(m, s, log(s), lse)`` of row ``i``: :func:`row_max_and_sum` and the log-sum-exp."""
    m, s = row_max_and_sum(x, i)
    log_s = math.log(s)
    return m, s, log_s, _finite_or_zero(m) + log_s


@njit(fastmath={"reassoc"})
def row_sum(x, i):
    s = 0.0
    for j in range(x.shape[1]):
        s += x[i, j]
    return s


@njit(fastmath={"reassoc"})
def row_dot(a, b, i):
    s = 0.0
    for j in range(a.shape[1]):
        s += a[i, j] * b[i, j]
    return s


@rowwise
def log_softmax_rows(x, out):
    for i in prange(x.shape[0]):
        m, s = row_max_and_sum(x, i)
        c = x.dtype.type(_finite_or_zero(m))
        log_s = x.dtype.type(math.log(s))
        for j in range(x.shape[1]):
            out[i, j] = (x[i, j] - c) - log_s


@rowwise
def softmax_rows(x, out):
    for i in prange(x.shape[0]):
        m, s = row_max_and_sum(x, i)
        if not math.isfinite(m):
            # SciPy's softmax shifts by the max even when it is not finite: such rows are nan.
            for j in range(x.shape[1]):
                out[i, j] = np.nan
            continue
        c = x.dtype.type(m)
        inv_s = x.dtype.type(1.0 / s)
        for j in range(x.shape[1]):
            out[i, j] = exp(x[i, j] - c) * inv_s


@rowwise
def logsumexp_rows(x, out):
    for i in prange(x.shape[0]):
        out[i] = row_log_sum_exp(x, i)[3]


@rowwise
def log_softmax_backward_rows(grad_output, output, grad_input):
    for i in prange(grad_output.shape[0]):
        total = grad_output.dtype.type(row_sum(grad_output, i))
        for j in range(grad_output.shape[1]):
            grad_input[i, j] = grad_output[i, j] - exp(output[i, j]) * total


@rowwise
def softmax_backward_rows(grad_output, output, grad_input):
    for i in prange(grad_output.shape[0]):
        dot = grad_output.dtype.type(row_dot(grad_output, output, i))
        for j in range(grad_output.shape[1]):
            grad_input[i, j] = output[i, j] * (grad_output[i, j] - dot)
