"""The backward passes of log_softmax and softmax on NVIDIA GPUs."""

import math

from numba import cuda, float64

from fastlsm.backends.cuda.kernels.primitives import (UNROLL, VALUES, WARP, RowKernels,
                                                      block_segment, group_sum, load_chunk,
                                                      merged_sum, row_group, row_in_range,
                                                      tail_chunks)


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



LOG_SOFTMAX_BACKWARD = RowKernels(log_softmax_backward_rows, backward_segment_sums,
                                  log_softmax_backward_segments, partials=1)
SOFTMAX_BACKWARD = RowKernels(softmax_backward_rows, backward_segment_sums,
                              softmax_backward_segments, partials=1)
