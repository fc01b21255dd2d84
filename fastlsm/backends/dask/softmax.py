"""log_softmax, softmax, logsumexp and their backward passes as lazy Dask graphs.

With the class axes in one chunk every block holds whole rows and the backend of its data (CPU
or CUDA) runs the operation on it, one task a block.  With a class axis split across chunks:
the per-row partials of every block, their merge a row chunk, and (for outputs of the input's
shape) a finishing pass a block, all through the CPU backend's split-row kernels
(:mod:`fastlsm.backends.cpu.split`).
"""

from __future__ import annotations

from fastlsm import _spec
from fastlsm.backends import base
from fastlsm.backends.cpu import split
from fastlsm.backends.cpu.kernels import partials
from fastlsm.backends.cpu.kernels.partials import SplitKernels
from fastlsm.backends.dask import graph


# --- tasks -------------------------------------------------------------------------------------

def _log_softmax_block(block, *, axes):
    return base.for_block(block).log_softmax(_spec.rowwise(block, axes, None))


def _softmax_block(block, *, axes):
    return base.for_block(block).softmax(_spec.rowwise(block, axes, None))


def _logsumexp_block(blocks, *, axes, keepdims):
    block = graph.single_block(blocks)
    return base.for_block(block).logsumexp(_spec.rowwise(block, axes, None, reduce=True,
                                                         keepdims=keepdims))


def _log_softmax_backward_block(g_block, y_block, *, axes):
    return base.for_block(g_block).log_softmax_backward(_spec.backward(g_block, y_block, axes))


def _softmax_backward_block(g_block, y_block, *, axes):
    return base.for_block(g_block).softmax_backward(_spec.backward(g_block, y_block, axes))


def _partials_block(block, *others, axes, n_columns, kernels):
    """A block's partials, laid out as the block (its class axes of size 1, then the columns)."""
    return graph.block_partials(split.partials(kernels, n_columns, block, axes, *others),
                                block.shape, axes)


def _merge_block(stats, *, axes, kernels, columns, result_dtype=None):
    """A row chunk's partials merged into ``columns`` numbers a row (or one value a row)."""
    by_block, row_shape = graph.rows_by_block(stats, axes)
    merged = split.merge(kernels.merge, by_block, n_out=columns)
    if columns is None:
        lse = merged.astype(result_dtype).reshape(row_shape)
        return lse[()] if lse.ndim == 0 else lse  # a full reduction: a NumPy scalar, as on NumPy
    return merged.reshape(row_shape + (columns,))


def _finish_block(block, stats, *others, axes, kernels):
    matrices = [split.matrix_like(block, other, axes) for other in others]
    return split.finish(kernels.finish, block, axes, *matrices,
                        stats.reshape(-1, stats.shape[-1]))


# --- graphs ------------------------------------------------------------------------------------

def _merged(x, axes: tuple[int, ...], kernels: SplitKernels, n_columns: int, *others):
    """Every row's merged statistics: a ``(rows..., k)`` Dask array chunked as ``x``'s rows."""
    stats = graph.partials_layer(_partials_block, n_columns, axes, x, *others, kernels=kernels)
    return graph.merge_layer(_merge_block, stats, axes, n_columns, kernels=kernels,
                             columns=n_columns)


def elementwise(spec: _spec.Rowwise, block_task, kernels: SplitKernels):
    """log_softmax or softmax: ``block_task`` on whole rows, else ``kernels`` split."""
    x, axes, dtype = spec.x.data, spec.axes, spec.result_dtype
    if not graph.classes_split(x, axes):
        return x.map_blocks(block_task, axes=axes, dtype=dtype,
                            meta=graph.block_meta(x, x.ndim, dtype))
    return graph.finish_layer(_finish_block, x, _merged(x, axes, kernels, 2), axes, dtype,
                              kernels=kernels)


def log_softmax(spec: _spec.Rowwise):
    return elementwise(spec, _log_softmax_block, partials.LOG_SOFTMAX_SPLIT)


def softmax(spec: _spec.Rowwise):
    return elementwise(spec, _softmax_block, partials.SOFTMAX_SPLIT)


def logsumexp(spec: _spec.Rowwise):
    import dask.array as da
    x, axes, dtype, keepdims = spec.x.data, spec.axes, spec.result_dtype, spec.keepdims
    index = tuple(range(x.ndim))
    rows = tuple(i for i in index if i not in axes)
    if not graph.classes_split(x, axes):
        out_index = index if keepdims else rows
        return da.blockwise(_logsumexp_block, out_index, x, index,
                            adjust_chunks={a: 1 for a in axes} if keepdims else None,
                            meta=graph.block_meta(x, len(out_index), dtype), axes=axes,
                            keepdims=keepdims)
    stats = graph.partials_layer(_partials_block, 2, axes, x, kernels=partials.LOGSUMEXP_SPLIT)
    lse = graph.merge_layer(_merge_block, stats, axes, None, meta_dtype=dtype,
                            kernels=partials.LOGSUMEXP_SPLIT, columns=None, result_dtype=dtype)
    return da.expand_dims(lse, axes) if keepdims else lse


def backward(spec: _spec.Backward, block_task, kernels: SplitKernels, reads_output: bool):
    """A backward pass: ``block_task`` on whole rows, else the rows' sums (of ``g``, or of
    ``g * y`` where ``reads_output``) merged, then ``kernels.finish``."""
    import dask.array as da
    g, y = graph.as_dask(spec.grad_output.data), graph.as_dask(spec.output.data)
    axes, dtype = spec.axes, spec.result_dtype
    index = tuple(range(g.ndim))
    _, (g, y) = da.unify_chunks(g, index, y, index)
    if not graph.classes_split(g, axes):
        return da.map_blocks(block_task, g, y, axes=axes, dtype=dtype,
                             meta=graph.block_meta(g, g.ndim, dtype))
    g, y = g.astype(dtype), y.astype(dtype)
    sums = _merged(g, axes, kernels, 1, *((y, index) if reads_output else ()))
    return graph.finish_layer(_finish_block, g, sums, axes, dtype, y, index, kernels=kernels)


def log_softmax_backward(spec: _spec.Backward):
    # The rows' sums of grad_output, merged, then g - exp(y) * sum.
    return backward(spec, _log_softmax_backward_block, partials.LOG_SOFTMAX_BACKWARD_SPLIT, False)


def softmax_backward(spec: _spec.Backward):
    # The rows' dots of grad_output and output, merged, then y * (g - dot).
    return backward(spec, _softmax_backward_block, partials.SOFTMAX_BACKWARD_SPLIT, True)

