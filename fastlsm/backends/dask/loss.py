"""cross_entropy and nll_loss as lazy Dask graphs.

Class-index targets are rechunked to the logits' rows and checked a row chunk at a task (the
CPU backend's check, naming a bad target's position in the whole array), before any task reads
them; Dask knows their values only when the graph is computed, so an out-of-range target raises
its IndexError then.  ``mean`` divides the sum of all the rows' losses by one denominator for
the whole array (``sum(weight[target])`` over the kept targets, or the row count for probability
targets), so chunking never changes the result beyond rounding.

With the class axis in one chunk, every block runs the loss of its data's backend on whole rows,
with ``reduction='none'`` and, for the gradient, a ``grad_loss`` of each row's factor (the mean's
``1 / denominator`` times the caller's ``grad_loss``): the gradient is the one the whole array's
call computes, and the loss is reduced from the rows' own.  With the class axis split: partials a
block, a merge a row chunk and the gradient a block, through the CPU backend's split-row kernels
(:mod:`fastlsm.backends.cpu.split`).
"""

from __future__ import annotations


import numpy as np

from fastlsm import _spec
from fastlsm.backends import base
from fastlsm.backends.cpu import split
from fastlsm.backends.cpu.kernels.partials import (CROSS_ENTROPY_PARTIALS, CROSS_ENTROPY_SPLIT,
                                                   LOSS_STATS, PROBABILITIES_SPLIT,
                                                   PROBABILITY_PARTIALS)
from fastlsm.backends.dask import graph


# --- targets, weights and the mean's denominator -------------------------------------------------

def chunked_like(array, chunks: tuple):
    """``array`` (Dask or NumPy) as a Dask array of ``chunks``."""
    import dask.array as da
    if _spec.is_dask_array(array):
        return array.rechunk(chunks)
    return da.from_array(np.asarray(array), chunks=chunks)


def _bad_target_block(target_block, *, weight, ignore_index, block_info=None):
    """A block's first target out of range, ``(position in the whole array, IndexError)``, or
    None, as a one-element object array."""
    offsets = tuple(start for start, _ in block_info[0]["array-location"])
    found = np.empty((1,) * target_block.ndim, dtype=object)
    found.flat[0] = split.class_index_error(target_block, weight, ignore_index, offsets)
    return found


def _first_bad_target(found):
    """Raises the error of the first target out of range in the whole array (positions compare
    in C order), as a call on the whole NumPy array would; else a token to depend on."""
    bad = [item for item in found.flat if item is not None]
    if bad:
        raise min(bad, key=lambda item: item[0])[1]
    return np.zeros((), np.int8)


def _checked_block(target_block, verdict):
    return target_block


def class_index_targets(spec: _spec.Loss, x, weight: np.ndarray):
    """The targets chunked as the logits' rows, used only once every block is checked: the
    error is the first bad target's whatever the chunks, or the order their checks run in."""
    import dask.array as da
    rows = tuple(c for i, c in enumerate(x.chunks) if i != spec.class_axis)
    target = chunked_like(spec.target.data, rows)
    index = tuple(range(target.ndim))
    found = target.map_blocks(_bad_target_block, weight=weight, ignore_index=spec.ignore_index,
                              chunks=tuple((1,) * len(c) for c in target.chunks), dtype=object,
                              meta=np.empty((0,) * target.ndim, object))
    verdict = da.blockwise(_first_bad_target, (), found, index, concatenate=True,
                           meta=np.empty((), np.int8))
    return target.map_blocks(_checked_block, verdict, dtype=target.dtype, meta=target._meta)


def _weight_sum_block(target_block, *, weight, ignore_index):
    total = split.class_indices(target_block, weight, ignore_index, ())[1]
    return np.full((1,) * target_block.ndim, total)


def target_weight_sum(target, weight: np.ndarray, ignore_index: int):
    """``mean``'s denominator: ``sum(weight[t])`` over the kept (checked) targets, 0-d Dask."""
    import dask.array as da
    rows = tuple(range(target.ndim))
    block_sums = da.blockwise(_weight_sum_block, rows, target, rows,
                              adjust_chunks={i: 1 for i in rows},
                              meta=np.empty((0,) * target.ndim), weight=weight,
                              ignore_index=ignore_index)
    return block_sums.sum()


def _first_class(class_ids: np.ndarray) -> int:
    """The first class of a block, from its block of ``arange(C)`` (none for an empty block)."""
    return int(class_ids[0]) if class_ids.size else 0


def _by_class(x, class_axis: int, values):
    """``values`` (one a class) as a Dask array chunked as the classes."""
    import dask.array as da
    return da.from_array(values, chunks=(x.chunks[class_axis],))


def _class_ids(x, class_axis: int):
    """``arange(C)`` chunked as the classes: a block's first class is its first element."""
    import dask.array as da
    return da.arange(x.shape[class_axis], chunks=(x.chunks[class_axis],))


def _scale_block(denominator):
    return np.float64(base.mean_scale("mean", float(denominator)))


def _mean_scale(denominator):
    """``mean``'s factor ``1 / denominator`` (inf for 0, as the kernels take it)."""
    import dask.array as da
    if not _spec.is_dask_array(denominator):
        return base.mean_scale("mean", denominator)
    return da.blockwise(_scale_block, (), denominator, (), meta=np.empty(()))


# The reduced loss is a NumPy scalar whatever the blocks (float() also takes a CuPy 0-d array).

def _divide_block(total, denominator, *, result_dtype):
    with np.errstate(invalid="ignore", divide="ignore"):
        return result_dtype.type(np.float64(float(total)) / np.float64(float(denominator)))


def reduce_rows(loss_rows, reduction: str, denominator, dtype: np.dtype):
    """The per-row losses reduced as asked: cast for ``none``, summed in float64 otherwise, and
    for ``mean`` divided by ``denominator`` (a float or a 0-d Dask array), as the CPU does."""
    import dask.array as da
    if reduction == "none":
        return loss_rows.astype(dtype)
    total = loss_rows.sum(dtype=np.float64)
    if reduction == "sum":
        return total.astype(dtype)
    return da.blockwise(_divide_block, (), total, (), *graph.scalar_arg(denominator),
                        meta=np.empty((), dtype), result_dtype=dtype)


def gradient_scale(spec: _spec.Loss, denominator):
    """The gradient's factor for every row (a float, or a 0-d Dask array for ``mean``)."""
    if spec.reduction != "mean":
        return spec.grad_scale
    scale = _mean_scale(denominator)
    return scale * spec.grad_scale if spec.grad_scale != 1.0 else scale


def row_grad_loss(spec: _spec.Loss, x, rows: tuple[int, ...]) -> tuple:
    """The blockwise argument pair of the caller's per-row ``grad_loss`` (``none``), chunked as
    the logits' rows; ``(None, None)`` without one."""
    if spec.grad_loss is None:
        return None, None
    chunks = tuple(x.chunks[i] for i in rows)
    return chunked_like(spec.grad_loss.data, chunks), rows


def _block_grad_loss(row_shape: tuple[int, ...], grad_loss, scale):
    """A block's per-row ``grad_loss``: the caller's (``none``) times ``scale``, or ``scale``
    (None for 1: the block's own gradient)."""
    scale = float(scale)
    if grad_loss is None:
        return None if scale == 1.0 else np.full(row_shape, scale)
    return np.asarray(grad_loss, dtype=np.float64) * scale if scale != 1.0 else grad_loss


def _row_scales(grad_loss) -> np.ndarray:
    """The split kernels' per-row factors from a block of the caller's ``grad_loss`` (none:
    empty, every row's factor is ``scale``)."""
    if grad_loss is None:
        return np.empty(0)
    return np.ascontiguousarray(np.asarray(grad_loss).reshape(-1), dtype=np.float64)


# --- whole rows ----------------------------------------------------------------------------------

def _cross_entropy_rows_block(x_block, target_block, weight, grad_loss, scale, *, class_axis,
                              ignore_index, label_smoothing, z_loss, softcap, return_grad,
                              return_lse):
    """The loss of a block of whole rows: per-row losses, then grad (each row's scaled by
    ``scale`` and the caller's ``grad_loss``) and lse as asked."""
    row_shape = x_block.shape[:class_axis] + x_block.shape[class_axis + 1:]
    spec = _spec.loss(x_block, target_block, weight, ignore_index, "none", label_smoothing,
                      z_loss, class_axis, return_grad, None, return_lse,
                      grad_loss=_block_grad_loss(row_shape, grad_loss, scale) if return_grad
                      else None, softcap=softcap or None, loss_dtype=np.float64)
    results = base.for_block(x_block).cross_entropy(spec)
    return results if isinstance(results, tuple) else (results,)


def _cross_entropy_rows(spec: _spec.Loss, x, target, weight, denominator):
    class_axis, dtype = spec.class_axis, spec.result_dtype
    index = tuple(range(x.ndim))
    rows = tuple(i for i in index if i != class_axis)
    target_index = index if target.ndim == x.ndim else rows
    weight_arg = ((_by_class(x, class_axis, weight), (class_axis,)) if spec.weight is not None
                  else (None, None))
    scale = gradient_scale(spec, denominator) if spec.want_grad else 1.0
    results = graph.block_results(_cross_entropy_rows_block, x, target, target_index, *weight_arg,
                                  *row_grad_loss(spec, x, rows), *graph.scalar_arg(scale),
                                  class_axis=class_axis,
                                  ignore_index=spec.ignore_index,
                                  label_smoothing=spec.label_smoothing, z_loss=spec.z_loss,
                                  softcap=spec.softcap, return_grad=spec.want_grad,
                                  return_lse=spec.return_lse)
    row_meta = graph.block_meta(x, len(rows), dtype)
    losses = graph.result(results, 0, rows, graph.block_meta(x, len(rows), np.float64))
    outputs = [reduce_rows(losses, spec.reduction, denominator, dtype)]
    if spec.want_grad:
        outputs.append(graph.result(results, 1, index, graph.block_meta(x, x.ndim, dtype)))
    if spec.return_lse:
        outputs.append(graph.result(results, -1, rows, row_meta))
    return outputs


# --- a class axis split across chunks ------------------------------------------------------------

def _flat(target_block) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(target_block).reshape(-1), dtype=np.int64)


def _cross_entropy_partials_block(x_block, target_block, weight, class_ids, *, axes, n_columns,
                                  label_smoothing, softcap):
    partials = split.cross_entropy_partials(x_block, axes[0], _flat(target_block),
                                            _first_class(class_ids), weight, label_smoothing,
                                            softcap)
    return graph.block_partials(partials, x_block.shape, axes)


def _cross_entropy_merge_block(partials, target_block, *, axes, n_classes, total_weight,
                               ignore_index, label_smoothing, z_loss):
    by_block, row_shape = graph.rows_by_block(partials, axes)
    stats = split.merge(CROSS_ENTROPY_SPLIT.merge, by_block, _flat(target_block), total_weight,
                        ignore_index, label_smoothing, n_classes, z_loss, n_out=LOSS_STATS)
    return stats.reshape(row_shape + (LOSS_STATS,))


def _cross_entropy_grad_block(x_block, stats, target_block, weight, class_ids, grad_loss, scale,
                              *, axes, n_classes, ignore_index, label_smoothing, total_weight,
                              z_loss, softcap):
    return split.finish(CROSS_ENTROPY_SPLIT.finish, x_block, axes, _flat(target_block),
                        _first_class(class_ids), weight, ignore_index,
                        stats.reshape(-1, stats.shape[-1]), total_weight, label_smoothing,
                        n_classes, z_loss, float(scale), _row_scales(grad_loss), softcap=softcap)


def _probs_partials_block(x_block, y_block, weight, *, axes, n_columns, n_classes,
                          label_smoothing, softcap):
    partials = split.probability_partials(x_block, axes[0], y_block, weight, label_smoothing,
                                          n_classes, softcap)
    return graph.block_partials(partials, x_block.shape, axes)


def _probs_merge_block(partials, *, axes, z_loss):
    by_block, row_shape = graph.rows_by_block(partials, axes)
    stats = split.merge(PROBABILITIES_SPLIT.merge, by_block, z_loss, n_out=LOSS_STATS)
    return stats.reshape(row_shape + (LOSS_STATS,))


def _probs_grad_block(x_block, stats, y_block, weight, grad_loss, scale, *, axes, n_classes,
                      z_loss, label_smoothing, softcap):
    return split.finish(PROBABILITIES_SPLIT.finish, x_block, axes,
                        split.matrix_like(x_block, y_block, axes), weight,
                        stats.reshape(-1, stats.shape[-1]), label_smoothing, n_classes, z_loss,
                        float(scale), _row_scales(grad_loss), softcap=softcap)


def _cross_entropy_split(spec: _spec.Loss, x, target, weight, total_weight, denominator):
    class_axis, dtype = spec.class_axis, spec.result_dtype
    axes = (class_axis,)
    index = tuple(range(x.ndim))
    rows = tuple(i for i in index if i != class_axis)
    weights, class_ids = _by_class(x, class_axis, weight), _class_ids(x, class_axis)
    options = dict(n_classes=spec.n_classes, label_smoothing=spec.label_smoothing,
                   softcap=spec.softcap)
    if spec.probabilities:
        partials = graph.partials_layer(_probs_partials_block, PROBABILITY_PARTIALS, axes, x,
                                        target, index, weights, axes, **options)
        stats = graph.merge_layer(_probs_merge_block, partials, axes, LOSS_STATS,
                                  z_loss=spec.z_loss)
        grad_block, grad_args = _probs_grad_block, (target, index, weights, axes)
    else:
        partials = graph.partials_layer(_cross_entropy_partials_block, CROSS_ENTROPY_PARTIALS,
                                        axes, x, target, rows, weights, axes, class_ids, axes,
                                        label_smoothing=spec.label_smoothing,
                                        softcap=spec.softcap)
        stats = graph.merge_layer(_cross_entropy_merge_block, partials, axes, LOSS_STATS, target,
                                  rows, total_weight=total_weight, ignore_index=spec.ignore_index,
                                  z_loss=spec.z_loss, n_classes=spec.n_classes,
                                  label_smoothing=spec.label_smoothing)
        grad_block = _cross_entropy_grad_block
        grad_args = (target, rows, weights, axes, class_ids, axes)
        options.update(ignore_index=spec.ignore_index, total_weight=total_weight)
    outputs = [reduce_rows(stats[..., 0], spec.reduction, denominator, dtype)]
    if spec.want_grad:
        outputs.append(graph.finish_layer(grad_block, x, stats, axes, dtype, *grad_args,
                                          *row_grad_loss(spec, x, rows),
                                          *graph.scalar_arg(gradient_scale(spec, denominator)),
                                          z_loss=spec.z_loss, **options))
    if spec.return_lse:
        outputs.append(stats[..., 1].astype(dtype))
    return outputs


def cross_entropy(spec: _spec.Loss):
    x = spec.input.data
    weight, total_weight = split.class_weights(spec)
    if spec.probabilities:
        target = chunked_like(spec.target.data, x.chunks)
        denominator = spec.probability_rows
    else:
        target = class_index_targets(spec, x, weight)
        denominator = (target_weight_sum(target, weight, spec.ignore_index)
                       if spec.reduction == "mean" else None)
    if graph.classes_split(x, (spec.class_axis,)):
        outputs = _cross_entropy_split(spec, x, target, weight, total_weight, denominator)
    else:
        outputs = _cross_entropy_rows(spec, x, target, weight, denominator)
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


# --- nll_loss --------------------------------------------------------------------------------

def _nll_block(x_block, target_block, weight, class_ids, grad_loss, scale, *, class_axis,
               ignore_index, return_grad):
    """nll_loss of one block of classes: each row's share of the loss (its target's term where
    the target lies in the block, else 0), with the class axis kept as size 1, and the gradient
    as asked (``grad_loss`` and ``scale`` as in :func:`_cross_entropy_rows_block`)."""
    target = _flat(target_block.get() if _spec.is_cuda_array(target_block) else target_block)
    local = target - _first_class(class_ids)
    inside = (target != ignore_index) & (local >= 0) & (local < x_block.shape[class_axis])
    # -1 marks the rows this block adds nothing to: it is never a class of the block.
    local = np.where(inside, local, -1).reshape(target_block.shape)
    spec = _spec.loss(x_block, local, weight, -1, "none", 0.0, 0.0, class_axis, return_grad,
                      None, False, probabilities_allowed=False,
                      grad_loss=_block_grad_loss(target_block.shape, grad_loss, scale)
                      if return_grad else None, loss_dtype=np.float64)
    results = base.for_block(x_block).nll_loss(spec)
    loss, *grad = results if return_grad else (results,)
    return (np.expand_dims(loss, class_axis), *grad)


def _sum_over_classes_block(shares, *, class_axis):
    return shares.sum(axis=class_axis)


def nll_loss(spec: _spec.Loss):
    import dask.array as da
    x = spec.input.data
    class_axis, dtype = spec.class_axis, spec.result_dtype
    weight = split.class_weights(spec)[0]
    target = class_index_targets(spec, x, weight)
    index = tuple(range(x.ndim))
    rows = tuple(i for i in index if i != class_axis)
    mean = spec.reduction == "mean"
    denominator = target_weight_sum(target, weight, spec.ignore_index) if mean else None
    scale = gradient_scale(spec, denominator) if spec.want_grad else 1.0
    results = graph.block_results(_nll_block, x, target, rows, _by_class(x, class_axis, weight),
                                  (class_axis,), _class_ids(x, class_axis), (class_axis,),
                                  *row_grad_loss(spec, x, rows), *graph.scalar_arg(scale),
                                  class_axis=class_axis,
                                  ignore_index=spec.ignore_index, return_grad=spec.want_grad)
    shares = graph.result(results, 0, index, graph.block_meta(x, x.ndim, np.float64),
                          adjust_chunks={class_axis: 1})
    if spec.reduction == "none":
        loss = da.blockwise(_sum_over_classes_block, rows, shares, index, concatenate=True,
                            meta=graph.block_meta(x, len(rows), np.float64),
                            class_axis=class_axis).astype(dtype)
    else:
        loss = reduce_rows(shares, spec.reduction, denominator, dtype)
    if not spec.want_grad:
        return loss
    return loss, graph.result(results, 1, index, graph.block_meta(x, x.ndim, dtype))
