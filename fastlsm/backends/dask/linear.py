"""linear_cross_entropy as a lazy Dask graph: a task a block of rows, each the CPU's chunked loss
of its rows (:func:`fastlsm.backends.cpu.linear.block_terms`), the gradients of the weight and
bias summed over the blocks.

The features are taken in one chunk (rechunked if they are not), the targets chunked as the
rows and checked as :func:`fastlsm.cross_entropy` checks them on Dask (:mod:`.loss`): an
out-of-range target raises its IndexError, naming its position in the whole array, when the
graph is computed and before any block reads the targets.  ``mean`` divides by the whole call's
denominator, so the blocks never change the result beyond rounding.  The head's weight and bias
are NumPy arrays, each one key of the graph that every block reads.
"""

from __future__ import annotations

import numpy as np

from fastlsm import _spec
from fastlsm.backends.cpu import linear, split
from fastlsm.backends.dask import graph
from fastlsm.backends.dask.loss import (chunked_like, class_index_targets, gradient_scale,
                                        reduce_rows, row_grad_loss, target_weight_sum)


def _block_terms(x_block, target_block, grad_loss, scale, linear_weight, linear_bias, *,
                 weight, ignore_index, label_smoothing, z_loss, softcap, return_grad,
                 chunk_bytes):
    """:func:`~fastlsm.backends.cpu.linear.block_terms` of one block of rows."""
    linear_weight, target_block = graph.single_block(linear_weight), graph.single_block(
        target_block)
    linear_bias = None if linear_bias is None else graph.single_block(linear_bias)
    spec = _spec.linear_loss(x_block, linear_weight, target_block, linear_bias, weight,
                             ignore_index, "none", label_smoothing, z_loss, softcap, return_grad,
                             None, chunk_bytes)
    return linear.block_terms(spec, float(scale), grad_loss)


def _block_sum_term(results, *, position, n_rows_axes):
    """A block's share of a summed gradient, with a leading axis of 1 for each row axis."""
    return graph.single_block(results)[position][(None,) * n_rows_axes]


def _summed(results, position: int, rows: tuple[int, ...], shape: tuple[int, ...],
            dtype: np.dtype):
    """Item ``position`` of every block's terms, each of ``shape``, summed over the blocks."""
    import dask.array as da
    first = results.ndim
    new = tuple(range(first, first + len(shape)))
    shares = da.blockwise(_block_sum_term, rows + new, results, tuple(range(results.ndim)),
                          new_axes=dict(zip(new, shape)), adjust_chunks={i: 1 for i in rows},
                          meta=np.empty((0,) * (len(rows) + len(shape)), dtype),
                          position=position, n_rows_axes=len(rows))
    return shares.sum(axis=rows, dtype=dtype)


def _whole(array):
    """A NumPy array as a one-chunk Dask array: one key of the graph, read by every block."""
    import dask.array as da
    return da.from_array(array, chunks=array.shape)


def linear_cross_entropy(spec: _spec.LinearLoss):
    loss = spec.loss
    x = spec.input.data
    meta = getattr(x, "_meta", None)
    if meta is not None and type(meta) is not np.ndarray:
        raise split.not_numpy(meta)
    x = x.rechunk({x.ndim - 1: -1})
    logits = loss.input.data  # the stand-in: rows chunked as x's, classes in one chunk
    index = tuple(range(x.ndim))
    rows = index[:-1]
    weight = split.class_weights(loss)[0]
    if loss.probabilities:
        target = chunked_like(loss.target.data, logits.chunks)
        target_index = rows + (x.ndim,)  # the classes: one chunk, not an axis of x
        denominator = float(loss.n_rows)
    else:
        target = class_index_targets(loss, logits, weight)
        target_index = rows
        denominator = (target_weight_sum(target, weight, loss.ignore_index)
                       if loss.reduction == "mean" else None)
    scale = gradient_scale(loss, denominator) if loss.want_grad else 1.0
    head = (_whole(spec.linear_weight.data), (x.ndim + 1, x.ndim + 2))
    bias = ((None, None) if spec.linear_bias is None
            else (_whole(spec.linear_bias.data), (x.ndim + 1,)))
    results = graph.block_results(
        _block_terms, x, target, target_index,
        *(row_grad_loss(loss, logits, rows) if loss.want_grad else (None, None)),
        *graph.scalar_arg(scale), *head, *bias,
        weight=None if loss.weight is None else np.asarray(loss.weight.data),
        ignore_index=loss.ignore_index, label_smoothing=loss.label_smoothing, z_loss=loss.z_loss,
        softcap=loss.softcap or None, return_grad=loss.want_grad, chunk_bytes=spec.chunk_bytes)
    dtype = spec.result_dtype
    per_row = graph.result(results, 0, rows, np.empty((0,) * len(rows)))
    outputs = [reduce_rows(per_row, loss.reduction, denominator, dtype)]
    if loss.want_grad:
        outputs.append(graph.result(results, 1, index, np.empty((0,) * x.ndim, dtype)))
        outputs.append(_summed(results, 2, rows, spec.linear_weight.shape,
                               spec.compute_dtype).astype(dtype))
        if spec.linear_bias is not None:
            outputs.append(_summed(results, 3, rows, (spec.n_classes,),
                                   np.dtype(np.float64)).astype(dtype))
    return outputs[0] if len(outputs) == 1 else tuple(outputs)
