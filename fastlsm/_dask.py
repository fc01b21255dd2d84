"""fastlsm's functions on Dask arrays: lazy graphs of fastlsm kernels, for any Dask scheduler.

Every function here takes the arguments of its namesake in :mod:`fastlsm` (the public functions
route ``dask.array.Array`` inputs here) and returns a lazy Dask array: of the input's shape, of
its shape without the class axes, or 0-d for a reduced loss.  Nothing is computed until the
caller computes it, on the threaded scheduler or a ``dask.distributed`` cluster alike.  Dask is
an optional dependency (``pip install "fastlsm[dask]"``): it is imported inside these functions
only, never when fastlsm is imported.

The graph depends on how the class axes are chunked.

* **Class axes in one chunk** (rows chunked only): every block holds whole rows, and the public
  fastlsm function runs on it, one task a block, without communication.  Blocks are passed on as
  they are, so CuPy-backed arrays reach fastlsm's CUDA path.  A reduced loss adds a sum of the
  per-row losses; ``mean``'s denominator comes from the targets alone.
* **A class axis split across chunks** (a vocabulary over several chunks): a two-stage reduction.

  1. *partials*, one task a block: the block's per-row ``(max, sum of exps)``, plus what the loss
     needs from it (the target's logit where the target lies in the block's classes, the sums
     that label smoothing and probability targets take over the classes), in float64;
  2. *merge*, one task a row chunk: the partials of its blocks, concatenated, merged as
     semantics.md's ``(max, sum)`` pair (a block whose row is all ``-inf`` adds nothing) into the
     row's max ``m`` and sum ``s``; for the losses also the per-row loss, log-sum-exp and the
     gradient's coefficient;
  3. *finish*, one task a block, for outputs of the input's shape: ``x - shift - log(s)``,
     ``exp(x - m) / s`` or the gradient, from the row chunk's merged statistics.

  That is two tasks a block plus one a row chunk; the partials and merged statistics are a few
  float64 numbers a row.  The merge takes all of a row chunk's partials in one task: the merge
  is associative and could run as a tree (as Dask's reductions do with ``split_every``), but
  with partials this small a tree would only add tasks.  Results equal the unsplit computation up to rounding, non-finite rows
  included (the merge keeps SciPy's and PyTorch's answers).  Both passes run fastlsm's Numba
  kernels (:mod:`fastlsm.cpu.partials`) and need NumPy blocks: a CuPy-backed array must keep its
  class axis in one chunk.

``out=`` and ``grad_out=`` (NumPy arrays to write into) make no sense for a lazy result and raise
TypeError.  Out-of-range class-index targets raise IndexError when the graph is computed, not when
it is built (Dask knows the targets' values only then).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from fastlsm import _devices
from fastlsm import _dispatch as d
from fastlsm import _loss
from fastlsm import _softmax

if TYPE_CHECKING:
    import dask.array as da

Axis = int | tuple[int, ...] | None


# --- graph building blocks -------------------------------------------------------------------
# Blockwise indices: dimension k of the input is index k; the statistics of a row (one float64
# column each) run along one more index, `ndim`, that is always in a single chunk.

def _reject_output_array(name: str, value: Any) -> None:
    if value is not None:
        raise TypeError(f"{name}= is not supported for Dask arrays: the result is a lazy Dask "
                        "array, computed when asked; leave it out and store or compute the result")


def _as_dask(x: Any):
    import dask.array as da
    return x if _devices.is_dask_array(x) else da.asarray(x)


def _classes_split(x, axes: tuple[int, ...]) -> bool:
    """Whether any class axis of ``x`` spans several chunks."""
    return x.ndim > 0 and any(x.numblocks[axis] > 1 for axis in axes)


def _meta(x, ndim: int, dtype: np.dtype):
    """An empty array of ``x``'s block type (NumPy, CuPy, ...) for Dask's metadata."""
    from dask.array.utils import meta_from_array
    return meta_from_array(x, ndim=ndim, dtype=dtype)


def _host_rows(block, axes: tuple[int, ...], name: str) -> d.Rows:
    """A block seen as ``(rows, classes)``, for the Numba kernels of a split class axis."""
    if type(block) is not np.ndarray:
        raise TypeError(f"fastlsm splits a row across chunks for NumPy blocks only, got "
                        f"{type(block).__module__}.{type(block).__name__} blocks; keep the class "
                        f"axis in one chunk (x.rechunk({{axis: -1}})) to run on other arrays")
    return d.to_rows(block, axes, name)


def _block_partials(partials: np.ndarray, block_shape: tuple[int, ...],
                    axes: tuple[int, ...]) -> np.ndarray:
    """``(rows, k)`` partials laid out as their block: the class axes of size 1, then ``k``."""
    row_shape = tuple(n for i, n in enumerate(block_shape) if i not in axes)
    return np.expand_dims(partials.reshape(row_shape + partials.shape[1:]), axes)


def _rows_by_block(partials: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, tuple]:
    """Concatenated partials of a row chunk as ``(rows, blocks, k)``, and the chunk's row shape."""
    ndim = partials.ndim - 1
    first_class = ndim - len(axes)
    moved = np.moveaxis(partials, axes, range(first_class, ndim))
    row_shape = moved.shape[:first_class]
    blocks = math.prod(moved.shape[first_class:ndim])
    return moved.reshape(math.prod(row_shape), blocks, partials.shape[-1]), row_shape


def _partials(block_function, n_columns: int, axes: tuple[int, ...], x, *args, **kwargs):
    """Stage 1: ``block_function(x_block, *arg_blocks, axes=axes, n_columns=n_columns,
    **kwargs)``, one task a block, returning :func:`_block_partials` of ``n_columns`` columns."""
    import dask.array as da
    index = tuple(range(x.ndim))
    return da.blockwise(block_function, index + (x.ndim,), x, index, *args,
                        new_axes={x.ndim: n_columns}, adjust_chunks={axis: 1 for axis in axes},
                        meta=np.empty((0,) * (x.ndim + 1)), axes=axes, n_columns=n_columns,
                        **kwargs)


def _merge(merge_function, partials, axes: tuple[int, ...], n_out: int | None, *args,
           meta_dtype: np.dtype = np.dtype(np.float64), **kwargs):
    """Stage 2: ``merge_function(partials_of_row_chunk, *arg_blocks, axes=axes, **kwargs)``, one
    task a row chunk, returning ``n_out`` float64 columns a row, or one ``meta_dtype`` value a
    row where ``n_out`` is None."""
    import dask.array as da
    ndim = partials.ndim - 1
    rows = tuple(i for i in range(ndim) if i not in axes)
    out_index = rows if n_out is None else rows + (ndim,)
    return da.blockwise(merge_function, out_index, partials, tuple(range(ndim + 1)), *args,
                        concatenate=True,
                        adjust_chunks=None if n_out is None else {ndim: n_out},
                        meta=np.empty((0,) * len(out_index), meta_dtype), axes=axes, **kwargs)


def _finish(finish_function, x, stats, axes: tuple[int, ...], dtype: np.dtype, *args, **kwargs):
    """Stage 3: ``finish_function(x_block, row_chunk_stats, *arg_blocks, axes=axes, **kwargs)``,
    one task a block of ``x``, returning an array of the block's shape and ``dtype``."""
    import dask.array as da
    index = tuple(range(x.ndim))
    rows = tuple(i for i in index if i not in axes)
    return da.blockwise(finish_function, index, x, index, stats, rows + (x.ndim,), *args,
                        concatenate=True, meta=_meta(x, x.ndim, dtype), axes=axes, **kwargs)


def _finite_or_zero(values: np.ndarray) -> np.ndarray:
    # The kernels' shift: the max where finite, else 0 (SciPy's rule).
    return np.where(np.isfinite(values), values, 0.0)


def _merge_max_sum(by_block: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(m, shift, s)`` of every row from its blocks' ``(m_b, s_b)`` in ``by_block[..., :2]``.

    semantics.md's merge, with each ``s_b`` shifted by its block's own ``shift_b``: ``m =
    max(m_b)``, ``s = sum(s_b * exp(shift_b - shift))``.  A block with ``s_b = 0`` (all ``-inf``)
    adds nothing: its ``exp(shift_b - shift)`` may overflow, and ``0 * inf`` is nan.  Non-finite
    rows keep the unsplit kernels' answers: a ``+inf`` row (``shift = 0``) sums to ``inf``, an
    all ``-inf`` row to 0, a nan makes the sum nan.
    """
    block_max, block_sum = by_block[..., 0], by_block[..., 1]
    row_max = np.fmax.reduce(block_max, axis=1)
    shift = _finite_or_zero(row_max)
    with np.errstate(over="ignore", invalid="ignore"):
        rescaled = block_sum * np.exp(_finite_or_zero(block_max) - shift[:, None])
    return row_max, shift, np.where(block_sum == 0.0, 0.0, rescaled).sum(axis=1)


# --- log_softmax, softmax, logsumexp and the backward passes ------------------------------------

def _partials_block(x_block, *args, axes, kernel, n_columns):
    """``kernel(rows, *arg_rows, partials)`` over a block; ``args`` are blocks of its shape."""
    rows = _host_rows(x_block, axes, "x")
    arg_rows = [d.to_rows(a.astype(rows.compute_dtype, copy=False), axes, "x").matrix
                for a in args]
    partials = np.empty((rows.matrix.shape[0], n_columns))
    if partials.size:
        d.run(kernel, rows.matrix, *arg_rows, partials)
    return _block_partials(partials, x_block.shape, axes)


def _max_sum_merge_block(partials, *, axes):
    by_block, row_shape = _rows_by_block(partials, axes)
    row_max, _, row_sum = _merge_max_sum(by_block)
    return np.stack([row_max, row_sum], axis=-1).reshape(row_shape + (2,))


def _logsumexp_merge_block(partials, *, axes, result_dtype):
    by_block, row_shape = _rows_by_block(partials, axes)
    _, shift, row_sum = _merge_max_sum(by_block)
    with np.errstate(divide="ignore"):
        return (shift + np.log(row_sum)).astype(result_dtype).reshape(row_shape)


def _sum_merge_block(partials, *, axes):
    by_block, row_shape = _rows_by_block(partials, axes)
    return by_block.sum(axis=1).reshape(row_shape + (1,))


def _finish_block(x_block, stats, *args, axes, kernel):
    """``kernel(rows, *arg_rows, stats, out)`` over a block; ``args`` are blocks of its shape."""
    rows = _host_rows(x_block, axes, "x")
    arg_rows = [d.to_rows(a.astype(rows.compute_dtype, copy=False), axes, "x").matrix
                for a in args]
    result, target, scratch = d.elementwise_target(rows, None)
    if target.size:
        d.run(kernel, rows.matrix, *arg_rows, stats.reshape(-1, stats.shape[-1]), target)
    return d.finish_elementwise(rows, result, target, scratch, None)


def _merged_max_sum(x, axes: tuple[int, ...]):
    """Every row's merged ``(m, s)``: a ``(rows..., 2)`` Dask array chunked as ``x``'s rows."""
    partials = _partials(_partials_block, 2, axes, x, kernel="max_sum_partials_rows")
    return _merge(_max_sum_merge_block, partials, axes, 2)


def _elementwise(public, finish_kernel: str, x, axis: Axis, out):
    _reject_output_array("out", out)
    x = _as_dask(x)
    dtype = d.result_dtype(x.dtype, "x")
    axes = d.normalize_axes(axis, x.ndim)
    if not _classes_split(x, axes):
        return x.map_blocks(public, axis=axis, dtype=dtype, meta=_meta(x, x.ndim, dtype))
    return _finish(_finish_block, x, _merged_max_sum(x, axes), axes, dtype, kernel=finish_kernel)


def log_softmax(x: da.Array | ArrayLike, axis: Axis = -1, *, out: None = None) -> da.Array:
    """:func:`fastlsm.log_softmax` of a Dask array, lazily; ``out`` must be None.

    With a class axis split across chunks, the rows' ``(max, sum)`` are merged across chunks and
    every block is finished as ``x - shift - log(s)``: the shift and ``log(s)`` are subtracted
    apart, so float32 keeps its accuracy where ``|max|`` is large.  Returns a Dask array of
    ``x``'s shape and chunks.
    """
    return _elementwise(_softmax.log_softmax, "log_softmax_finish_rows", x, axis, out)


def softmax(x: da.Array | ArrayLike, axis: Axis = -1, *, out: None = None) -> da.Array:
    """:func:`fastlsm.softmax` of a Dask array, lazily; ``out`` must be None.

    Returns a Dask array of ``x``'s shape and chunks.
    """
    return _elementwise(_softmax.softmax, "softmax_finish_rows", x, axis, out)


def _single_block(blocks):
    """The block inside the nested one-element lists that blockwise (without ``concatenate``,
    which would copy) passes for the single-chunk axes an output drops."""
    while isinstance(blocks, list):
        (blocks,) = blocks
    return blocks


def _logsumexp_block(x_blocks, *, axis, keepdims):
    return _softmax.logsumexp(_single_block(x_blocks), axis, keepdims=keepdims)


def logsumexp(x: da.Array | ArrayLike, axis: Axis = -1, *, keepdims: bool = False,
              out: None = None) -> da.Array:
    """:func:`fastlsm.logsumexp` of a Dask array, lazily; ``out`` must be None.

    Returns a Dask array of ``x``'s shape without the reduced axes (of size 1 with
    ``keepdims``), 0-d when every axis is reduced.
    """
    import dask.array as da
    _reject_output_array("out", out)
    x = _as_dask(x)
    dtype = d.result_dtype(x.dtype, "x")
    axes = d.normalize_axes(axis, x.ndim)
    index = tuple(range(x.ndim))
    rows = tuple(i for i in index if i not in axes)
    if not _classes_split(x, axes):
        out_index = index if keepdims else rows
        return da.blockwise(_logsumexp_block, out_index, x, index,
                            adjust_chunks={a: 1 for a in axes} if keepdims else None,
                            meta=_meta(x, len(out_index), dtype), axis=axis, keepdims=keepdims)
    partials = _partials(_partials_block, 2, axes, x, kernel="max_sum_partials_rows")
    lse = _merge(_logsumexp_merge_block, partials, axes, None, meta_dtype=dtype,
                 result_dtype=dtype)
    return da.expand_dims(lse, axes) if keepdims else lse


def _backward(public, partials_kernel: str, finish_kernel: str, grad_output, output, axis: Axis,
              *, partials_read_output: bool):
    import dask.array as da
    g, y = _as_dask(grad_output), _as_dask(output)
    dtype = d.backward_dtype(g, y)
    axes = d.normalize_axes(axis, g.ndim)
    index = tuple(range(g.ndim))
    _, (g, y) = da.unify_chunks(g, index, y, index)
    if not _classes_split(g, axes):
        return da.map_blocks(public, g, y, axis=axis, dtype=dtype, meta=_meta(g, g.ndim, dtype))
    g, y = g.astype(dtype), y.astype(dtype)
    partials_args = (y, index) if partials_read_output else ()
    partials = _partials(_partials_block, 1, axes, g, *partials_args, kernel=partials_kernel)
    totals = _merge(_sum_merge_block, partials, axes, 1)
    return _finish(_finish_block, g, totals, axes, dtype, y, index, kernel=finish_kernel)


def log_softmax_backward(grad_output: da.Array | ArrayLike, output: da.Array | ArrayLike,
                         axis: Axis = -1) -> da.Array:
    """:func:`fastlsm.log_softmax_backward` of Dask arrays (either may be a NumPy array), lazily.

    Returns a Dask array of ``grad_output``'s shape, chunked as the two inputs' common chunks.
    """
    # The rows' sums of grad_output, merged, then g - exp(y) * sum.
    return _backward(_softmax.log_softmax_backward, "sum_partials_rows",
                     "log_softmax_backward_finish_rows", grad_output, output, axis,
                     partials_read_output=False)


def softmax_backward(grad_output: da.Array | ArrayLike, output: da.Array | ArrayLike,
                     axis: Axis = -1) -> da.Array:
    """:func:`fastlsm.softmax_backward` of Dask arrays (either may be a NumPy array), lazily.

    Returns a Dask array of ``grad_output``'s shape, chunked as the two inputs' common chunks.
    """
    # The rows' dots of grad_output and output, merged, then y * (g - dot).
    return _backward(_softmax.softmax_backward, "dot_partials_rows",
                     "softmax_backward_finish_rows", grad_output, output, axis,
                     partials_read_output=True)


# --- cross_entropy and nll_loss --------------------------------------------------------------

def _logits(input, weight, axis) -> _loss._Logits:
    """The validated logits (a Dask array) and their weights, as fastlsm's CPU path has them."""
    x = _as_dask(input)
    class_axis = _loss._class_axis(x, axis)
    row_shape = x.shape[:class_axis] + x.shape[class_axis + 1:]
    dtype = d.result_dtype(x.dtype, "input")
    weights = _loss._weight(weight, x.shape[class_axis], d.compute_dtype(dtype))
    return _loss._Logits(x, class_axis, row_shape, *weights, dtype)


def _row_chunks(logits: _loss._Logits) -> tuple:
    return tuple(c for i, c in enumerate(logits.array.chunks) if i != logits.class_axis)


def _chunked_like(array, chunks: tuple):
    """``array`` (Dask or NumPy) as a Dask array of ``chunks``."""
    import dask.array as da
    if _devices.is_dask_array(array):
        return array.rechunk(chunks)
    return da.from_array(np.asarray(array), chunks=chunks)


def _class_index_targets(logits: _loss._Logits, target):
    """Class-index targets, checked as the CPU path does, chunked as the logits' rows."""
    _loss._check_target_shape(logits, target)
    if target.dtype.kind not in "iu":
        hint = (" (a float target of the input's shape holds class probabilities)"
                if target.dtype.kind == "f" else "")
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}{hint}")
    return _chunked_like(target, _row_chunks(logits))


def _on_host(block) -> np.ndarray:
    """A block of targets as a NumPy array: a CuPy block is copied over (``.get()``)."""
    return block.get() if _devices.is_cuda_array(block) else np.asarray(block)


def _out_of_bounds(target: int, n_classes: int) -> IndexError:
    return IndexError(f"Target {target} is out of bounds. ({n_classes} classes)")


def _checked_targets(target_block, n_classes: int, ignore_index: int) -> np.ndarray:
    """A block of targets as flat int64; IndexError for one outside ``[0, C)`` and not ignored."""
    flat = np.ascontiguousarray(target_block.reshape(-1), dtype=np.int64)
    outside = (flat != ignore_index) & ((flat < 0) | (flat >= n_classes))
    if outside.any():
        raise _out_of_bounds(int(flat[outside][0]), n_classes)
    return flat


def _target_weight_sum_block(target_block, weight, *, ignore_index):
    flat = np.ascontiguousarray(_on_host(target_block).reshape(-1), dtype=np.int64)
    first, total = _loss._check_class_indices()(flat, weight, ignore_index)
    if first >= 0:
        raise _out_of_bounds(int(flat[first]), weight.shape[0])
    return np.full((1,) * target_block.ndim, total)


def _target_weight_sum(target, class_weights, ignore_index: int):
    """``mean``'s denominator: ``sum(weight[t])`` over the kept targets, a 0-d Dask array.

    Raises IndexError, when computed, for a target out of range.
    """
    import dask.array as da
    rows = tuple(range(target.ndim))
    block_sums = da.blockwise(_target_weight_sum_block, rows, target, rows,
                              class_weights, (target.ndim,), concatenate=True,
                              adjust_chunks={i: 1 for i in rows},
                              meta=np.empty((0,) * target.ndim), ignore_index=ignore_index)
    return block_sums.sum()


def _first_class(class_ids: np.ndarray) -> int:
    """The first class of a block, from its block of ``arange(C)`` (none for an empty block)."""
    return int(class_ids[0]) if class_ids.size else 0


def _class_weights(logits: _loss._Logits):
    """The class weights as a Dask array chunked as the classes."""
    import dask.array as da
    return da.from_array(logits.weight, chunks=(logits.array.chunks[logits.class_axis],))


def _class_ids(logits: _loss._Logits):
    """``arange(C)`` chunked as the classes: a block's first class is its first element."""
    import dask.array as da
    return da.arange(logits.n_classes, chunks=(logits.array.chunks[logits.class_axis],))


def _scalar_arg(value) -> tuple:
    """A blockwise argument pair for a scalar: a 0-d Dask array, or a literal."""
    return (value, ()) if _devices.is_dask_array(value) else (value, None)


def _scale_block(denominator):
    return np.float64(_loss._scale("mean", float(denominator)))


def _mean_scale(denominator):
    """``mean``'s factor ``1 / denominator`` (inf for 0, as the CPU kernels take it)."""
    import dask.array as da
    if not _devices.is_dask_array(denominator):
        return _loss._scale("mean", denominator)
    return da.blockwise(_scale_block, (), denominator, (), meta=np.empty(()))


# The reduced loss is a NumPy scalar whatever the blocks (float() also takes a CuPy 0-d array).

def _divide_block(total, denominator, *, result_dtype):
    with np.errstate(invalid="ignore", divide="ignore"):
        return result_dtype.type(np.float64(float(total)) / np.float64(float(denominator)))


def _scaled_mean_block(total, denominator, *, result_dtype):
    # The terms were scaled by 1 / denominator already; none kept (denominator 0) gives nan.
    return result_dtype.type(np.nan if float(denominator) == 0.0 else float(total))


def _reduce(loss_rows, reduction: str, denominator, dtype: np.dtype, *, scaled: bool):
    """The per-row losses reduced as asked: cast for ``none``, summed in float64 otherwise.

    ``mean`` divides by ``denominator`` (a float or a 0-d Dask array), unless the losses were
    ``scaled`` by its inverse already.
    """
    import dask.array as da
    if reduction == "none":
        return loss_rows.astype(dtype)
    total = loss_rows.sum(dtype=np.float64)
    if reduction == "sum":
        return total.astype(dtype)
    return da.blockwise(_scaled_mean_block if scaled else _divide_block, (), total, (),
                        *_scalar_arg(denominator), meta=np.empty((), dtype), result_dtype=dtype)


def _block_results(function, x, *args, **kwargs):
    """``function(x_block, *arg_blocks, **kwargs)`` a block, each returning a tuple of results,
    as a Dask array of tuples for :func:`_result` to take apart."""
    import dask.array as da
    index = tuple(range(x.ndim))
    return da.blockwise(function, index, x, index, *args, meta=np.empty((0,) * x.ndim), **kwargs)


def _pick_block(results, *, position):
    return _single_block(results)[position]


def _result(results, position: int, out_index: tuple, meta, adjust_chunks=None):
    """Item ``position`` of every block's results (an ``out_index`` without the class axis
    drops it: it is in one chunk there)."""
    import dask.array as da
    return da.blockwise(_pick_block, out_index, results, tuple(range(results.ndim)),
                        adjust_chunks=adjust_chunks, meta=meta, position=position)


def _cross_entropy_rows_block(x_block, target_block, weight, scale, *, class_axis, ignore_index,
                              label_smoothing, z_loss, return_grad, return_lse):
    """fastlsm.cross_entropy of a block of whole rows: per-row losses, then grad and lse as asked.

    With a ``scale`` other than 1 (``mean``: the inverse of the whole array's denominator), the
    weights and ``z_loss`` are scaled by it: every term of the loss and of its gradient is linear
    in them, so ``reduction='none'`` then gives the rows' shares of the mean and the mean's
    gradient in the kernel's one pass.
    """
    scale = float(scale)
    if scale != 1.0:
        with np.errstate(over="ignore", invalid="ignore"):
            weight = weight * scale
        z_loss = z_loss * scale if z_loss > 0.0 else z_loss
    results = _loss.cross_entropy(x_block, target_block, weight, ignore_index, "none",
                                  label_smoothing, axis=class_axis, return_grad=return_grad,
                                  z_loss=z_loss, return_lse=return_lse)
    return results if isinstance(results, tuple) else (results,)


def _cross_entropy_rows(logits, target, ignore_index: int, reduction: str, label_smoothing: float,
                        z_loss: float, return_grad: bool, return_lse: bool, denominator, weighted):
    """cross_entropy with the class axis in one chunk: fastlsm.cross_entropy on every block."""
    x, class_axis, dtype = logits.array, logits.class_axis, logits.result_dtype
    index = tuple(range(x.ndim))
    rows = tuple(i for i in index if i != class_axis)
    target_index = index if target.ndim == x.ndim else rows
    scaled = reduction == "mean"
    weight_arg = ((_class_weights(logits), (class_axis,)) if weighted or scaled
                  else (None, None))
    scale = _mean_scale(denominator) if scaled else 1.0
    results = _block_results(_cross_entropy_rows_block, x, target, target_index, *weight_arg,
                             *_scalar_arg(scale), class_axis=class_axis,
                             ignore_index=ignore_index, label_smoothing=label_smoothing,
                             z_loss=z_loss, return_grad=return_grad, return_lse=return_lse)
    row_meta = _meta(x, len(rows), dtype)
    outputs = [_reduce(_result(results, 0, rows, row_meta), reduction, denominator, dtype,
                       scaled=scaled)]
    if return_grad:
        outputs.append(_result(results, 1, index, _meta(x, x.ndim, dtype)))
    if return_lse:
        outputs.append(_result(results, -1, rows, row_meta))
    return outputs


def _cross_entropy_partials_block(x_block, target_block, weight, class_ids, *, axes, n_columns,
                                  n_classes, ignore_index, label_smoothing):
    rows = _host_rows(x_block, axes, "input").matrix
    target = _checked_targets(target_block, n_classes, ignore_index)
    partials = np.empty((rows.shape[0], n_columns))
    if rows.shape[0]:
        d.run("cross_entropy_partials_rows", rows, target, _first_class(class_ids), weight,
              label_smoothing > 0.0, partials)
    # The block's weight total, for moving its weighted sum to the row's shift in the merge.
    partials[:, 5] = weight.sum(dtype=np.float64)
    return _block_partials(partials, x_block.shape, axes)


def _cross_entropy_merge_block(partials, target_block, *, axes, n_classes, total_weight,
                               ignore_index, label_smoothing, z_loss):
    """``(loss, lse, m, s, coef)`` a row: cpu/loss.py's formulas on the merged partials."""
    by_block, row_shape = _rows_by_block(partials, axes)
    row_max, shift, row_sum = _merge_max_sum(by_block)
    eps = label_smoothing
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_sum = np.log(row_sum)
        lse = shift + log_sum
        target_logit = by_block[..., 2].sum(axis=1)   # one block holds it, the others add 0
        target_weight = by_block[..., 3].sum(axis=1)
        loss = (1.0 - eps) * -target_weight * ((target_logit - shift) - log_sum)
        if eps > 0.0:
            block_shift = _finite_or_zero(by_block[..., 0])
            weighted = (by_block[..., 4]
                        + (block_shift - shift[:, None]) * by_block[..., 5]).sum(axis=1)
            loss += eps / n_classes * (total_weight * log_sum - weighted)
        if z_loss > 0.0:
            loss += z_loss * lse * lse
        coefs = (1.0 - eps) * target_weight + eps / n_classes * total_weight + 2.0 * z_loss * lse
    kept = target_block.reshape(-1) != ignore_index
    loss = np.where(kept, np.where(np.isfinite(row_max), loss, np.nan), 0.0)
    return np.stack([loss, lse, row_max, row_sum, coefs], axis=-1).reshape(row_shape + (5,))


def _cross_entropy_grad_block(x_block, stats, target_block, weight, class_ids, scale, *, axes,
                              n_classes, ignore_index, label_smoothing):
    rows = _host_rows(x_block, axes, "input")
    result, grad, scratch = d.elementwise_target(rows, None)
    stats = stats.reshape(-1, stats.shape[-1])
    if grad.size:
        target = np.ascontiguousarray(target_block.reshape(-1), dtype=np.int64)
        d.run("cross_entropy_grad_finish_rows", rows.matrix, target, _first_class(class_ids),
              weight, ignore_index, stats[:, 2], stats[:, 3], stats[:, 4], label_smoothing,
              n_classes, float(scale), grad)
    return d.finish_elementwise(rows, result, grad, scratch, None)


def _probs_partials_block(x_block, y_block, weight, *, axes, n_columns, n_classes,
                          label_smoothing):
    rows = _host_rows(x_block, axes, "input")
    probs = d.to_rows(y_block.astype(rows.compute_dtype, copy=False), axes, "target").matrix
    partials = np.empty((rows.matrix.shape[0], n_columns))
    if partials.size:
        d.run("cross_entropy_probs_partials_rows", rows.matrix, probs, weight, label_smoothing,
              n_classes, partials)
    return _block_partials(partials, x_block.shape, axes)


def _probs_merge_block(partials, *, axes, z_loss):
    """``(loss, lse, m, s, coef)`` a row: cpu/loss.py's formulas on the merged partials."""
    by_block, row_shape = _rows_by_block(partials, axes)
    row_max, shift, row_sum = _merge_max_sum(by_block)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_sum = np.log(row_sum)
        lse = shift + log_sum
        block_shift = _finite_or_zero(by_block[..., 0])
        wy = by_block[..., 2].sum(axis=1)
        wyx = (by_block[..., 3] + (block_shift - shift[:, None]) * by_block[..., 2]).sum(axis=1)
        loss = wy * log_sum - wyx + z_loss * lse * lse
        coefs = wy + 2.0 * z_loss * lse
    loss = np.where(np.isfinite(row_max), loss, np.nan)
    return np.stack([loss, lse, row_max, row_sum, coefs], axis=-1).reshape(row_shape + (5,))


def _probs_grad_block(x_block, stats, y_block, weight, scale, *, axes, n_classes,
                      label_smoothing):
    rows = _host_rows(x_block, axes, "input")
    probs = d.to_rows(y_block.astype(rows.compute_dtype, copy=False), axes, "target").matrix
    result, grad, scratch = d.elementwise_target(rows, None)
    stats = stats.reshape(-1, stats.shape[-1])
    if grad.size:
        d.run("cross_entropy_probs_grad_finish_rows", rows.matrix, probs, weight, stats[:, 2],
              stats[:, 3], stats[:, 4], label_smoothing, n_classes, float(scale), grad)
    return d.finish_elementwise(rows, result, grad, scratch, None)


def _cross_entropy_split(logits, target, ignore_index: int, reduction: str,
                         label_smoothing: float, z_loss: float, return_grad: bool,
                         return_lse: bool, denominator):
    """cross_entropy with the class axis split across chunks: partials, merge, finish."""
    x, class_axis, dtype = logits.array, logits.class_axis, logits.result_dtype
    axes = (class_axis,)
    index = tuple(range(x.ndim))
    rows = tuple(i for i in index if i != class_axis)
    weights, class_ids = _class_weights(logits), _class_ids(logits)
    options = dict(n_classes=logits.n_classes, label_smoothing=label_smoothing)
    if target.ndim == x.ndim:
        partials = _partials(_probs_partials_block, 4, axes, x, target, index,
                             weights, (class_axis,), **options)
        stats = _merge(_probs_merge_block, partials, axes, 5, z_loss=z_loss)
        grad_args = (target, index, weights, (class_axis,))
        grad_block = _probs_grad_block
    else:
        partials = _partials(_cross_entropy_partials_block, 6, axes, x, target, rows,
                             weights, (class_axis,), class_ids, (class_axis,),
                             ignore_index=ignore_index, **options)
        stats = _merge(_cross_entropy_merge_block, partials, axes, 5, target, rows,
                       total_weight=logits.total_weight, ignore_index=ignore_index,
                       z_loss=z_loss, **options)
        grad_args = (target, rows, weights, (class_axis,), class_ids, (class_axis,))
        grad_block = _cross_entropy_grad_block
        options["ignore_index"] = ignore_index
    outputs = [_reduce(stats[..., 0], reduction, denominator, dtype, scaled=False)]
    if return_grad:
        scale = _mean_scale(denominator) if reduction == "mean" else 1.0
        outputs.append(_finish(grad_block, x, stats, axes, dtype, *grad_args,
                               *_scalar_arg(scale), **options))
    if return_lse:
        outputs.append(stats[..., 1].astype(dtype))
    return outputs


def cross_entropy(input: da.Array | ArrayLike, target: da.Array | ArrayLike,
                  weight: ArrayLike | None = None, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, *, axis: int = 1,
                  return_grad: bool = False, grad_out: None = None, z_loss: float = 0.0,
                  return_lse: bool = False) -> da.Array | tuple[da.Array, ...]:
    """:func:`fastlsm.cross_entropy` of Dask logits (and Dask or NumPy targets), lazily.

    Arguments and results as :func:`fastlsm.cross_entropy`'s, as Dask arrays: the loss is a 0-d
    Dask array for ``mean`` and ``sum``, the gradient (``return_grad``) is chunked as ``input``,
    the per-row losses (``none``) and log-sum-exps (``return_lse``) as its rows.  ``grad_out``
    must be None.  The targets are rechunked to the logits' rows; ``weight`` is a NumPy array
    (or anything NumPy can convert).  Out-of-range targets raise IndexError when the result is
    computed.

    ``mean`` divides the sum of all the rows' losses by one denominator for the whole array
    (``sum(weight[target])`` over the kept targets, or the row count for probability targets),
    so chunking never changes the result beyond rounding.
    """
    _reject_output_array("grad_out", grad_out)
    ignore_index, label_smoothing, z_loss = _loss._check_options(ignore_index, reduction,
                                                                 label_smoothing, z_loss)
    logits = _logits(input, weight, axis)
    target = target if hasattr(target, "shape") else np.asarray(target)
    if target.shape == logits.array.shape:
        _loss.check_probability_target(target.dtype, ignore_index)
        target = _chunked_like(target, logits.array.chunks)
        denominator = float(math.prod(logits.row_shape))
    else:
        target = _class_index_targets(logits, target)
        denominator = (_target_weight_sum(target, _class_weights(logits), ignore_index)
                       if reduction == "mean" else None)
    arguments = (logits, target, ignore_index, reduction, label_smoothing, z_loss,
                 bool(return_grad), bool(return_lse), denominator)
    if logits.array.numblocks[logits.class_axis] > 1:
        outputs = _cross_entropy_split(*arguments)
    else:
        outputs = _cross_entropy_rows(*arguments, weighted=weight is not None)
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _nll_block(x_block, target_block, weight, class_ids, scale, *, class_axis, n_classes,
               ignore_index, return_grad):
    """fastlsm.nll_loss of one block of classes: each row's share of the loss (its target's term
    where the target lies in the block, else 0), with the class axis kept as size 1, and the
    gradient as asked.  ``scale`` as in :func:`_cross_entropy_rows_block`."""
    target = _checked_targets(target_block, n_classes, ignore_index)
    local = target - _first_class(class_ids)
    inside = (target != ignore_index) & (local >= 0) & (local < x_block.shape[class_axis])
    # -1 marks the rows this block adds nothing to: it is never a class of the block.
    local = np.where(inside, local, -1).reshape(target_block.shape)
    scale = float(scale)
    if scale != 1.0:
        with np.errstate(over="ignore", invalid="ignore"):
            weight = weight * scale
    results = _loss.nll_loss(x_block, local, weight, -1, "none", axis=class_axis,
                             return_grad=return_grad)
    loss, *grad = results if return_grad else (results,)
    return (np.expand_dims(loss, class_axis), *grad)


def _sum_over_classes_block(shares, *, class_axis):
    return shares.sum(axis=class_axis)


def nll_loss(input: da.Array | ArrayLike, target: da.Array | ArrayLike,
             weight: ArrayLike | None = None, ignore_index: int = -100, reduction: str = "mean",
             *, axis: int = 1, return_grad: bool = False,
             grad_out: None = None) -> da.Array | tuple[da.Array, ...]:
    """:func:`fastlsm.nll_loss` of Dask log-probabilities (and Dask or NumPy targets), lazily.

    Results as :func:`cross_entropy`'s; ``grad_out`` must be None.  fastlsm.nll_loss runs on every
    block with the targets that fall in its classes, whether or not the class axis is split.
    """
    import dask.array as da
    _reject_output_array("grad_out", grad_out)
    ignore_index = _loss._check_options(ignore_index, reduction, 0.0, 0.0)[0]
    logits = _logits(input, weight, axis)
    target = _class_index_targets(logits, target if hasattr(target, "shape")
                                  else np.asarray(target))
    x, class_axis, dtype = logits.array, logits.class_axis, logits.result_dtype
    index = tuple(range(x.ndim))
    rows = tuple(i for i in index if i != class_axis)
    weights, class_ids = _class_weights(logits), _class_ids(logits)
    denominator = (_target_weight_sum(target, weights, ignore_index) if reduction == "mean"
                   else None)
    scale = _mean_scale(denominator) if reduction == "mean" else 1.0
    results = _block_results(_nll_block, x, target, rows, weights, (class_axis,), class_ids,
                             (class_axis,), *_scalar_arg(scale), class_axis=class_axis,
                             n_classes=logits.n_classes, ignore_index=ignore_index,
                             return_grad=bool(return_grad))
    shares = _result(results, 0, index, _meta(x, x.ndim, dtype), adjust_chunks={class_axis: 1})
    if reduction == "none":
        loss = da.blockwise(_sum_over_classes_block, rows, shares, index, concatenate=True,
                            meta=_meta(x, len(rows), dtype), class_axis=class_axis)
    else:
        loss = _reduce(shares, reduction, denominator, dtype, scaled=True)
    if not return_grad:
        return loss
    return loss, _result(results, 1, index, _meta(x, x.ndim, dtype))
