"""The backward passes of log_softmax and softmax on the CPU."""

from numba import prange

from fastlsm.backends.cpu.kernels._simd import contiguous_row, exp
from fastlsm.backends.cpu.kernels.stats import row_dot, row_sum
from fastlsm.backends.cpu.runtime import RowKernels, rowwise


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



LOG_SOFTMAX_BACKWARD = RowKernels(rows=log_softmax_backward_rows)
SOFTMAX_BACKWARD = RowKernels(rows=softmax_backward_rows)
