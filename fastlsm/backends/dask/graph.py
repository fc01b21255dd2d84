"""The Dask backend's building blocks: blockwise layers over a Dask array's blocks.

Blockwise indices: dimension k of the input is index k; the statistics of a row (one float64
column each) run along one more index, ``ndim``, that is always in a single chunk.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fastlsm import _spec
from fastlsm.backends.cpu import split


def as_dask(x: Any):
    """``x`` as a Dask array (a NumPy array, say, in one chunk)."""
    import dask.array as da
    return x if _spec.is_dask_array(x) else da.asarray(x)


def classes_split(x, axes: tuple[int, ...]) -> bool:
    """Whether any class axis of ``x`` spans several chunks; a TypeError where one does and
    ``x``'s blocks are not NumPy arrays (the split-row kernels are CPU kernels)."""
    if not (x.ndim > 0 and any(x.numblocks[axis] > 1 for axis in axes)):
        return False
    meta = getattr(x, "_meta", None)
    if meta is not None and type(meta) is not np.ndarray:
        raise split.not_numpy(meta)
    return True


def block_meta(x, ndim: int, dtype: np.dtype):
    """An empty array of ``x``'s block type (NumPy, CuPy, ...) for Dask's metadata."""
    from dask.array.utils import meta_from_array
    return meta_from_array(x, ndim=ndim, dtype=dtype)


def block_partials(partials: np.ndarray, block_shape: tuple[int, ...],
                   axes: tuple[int, ...]) -> np.ndarray:
    """``(rows, k)`` partials laid out as their block: the class axes of size 1, then ``k``."""
    row_shape = tuple(n for i, n in enumerate(block_shape) if i not in axes)
    return np.expand_dims(partials.reshape(row_shape + partials.shape[1:]), axes)


def rows_by_block(partials: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, tuple]:
    """Concatenated partials of a row chunk as ``(rows, blocks, k)``, and the chunk's row shape."""
    ndim = partials.ndim - 1
    first_class = ndim - len(axes)
    moved = np.moveaxis(partials, axes, range(first_class, ndim))
    row_shape = moved.shape[:first_class]
    blocks = math.prod(moved.shape[first_class:ndim])
    return moved.reshape(math.prod(row_shape), blocks, partials.shape[-1]), row_shape


def partials_layer(block_function, n_columns: int, axes: tuple[int, ...], x, *args, **kwargs):
    """Stage 1: ``block_function(x_block, *arg_blocks, axes=axes, n_columns=n_columns,
    **kwargs)``, one task a block, returning :func:`block_partials` of ``n_columns`` columns."""
    import dask.array as da
    index = tuple(range(x.ndim))
    return da.blockwise(block_function, index + (x.ndim,), x, index, *args,
                        new_axes={x.ndim: n_columns}, adjust_chunks={axis: 1 for axis in axes},
                        meta=np.empty((0,) * (x.ndim + 1)), axes=axes, n_columns=n_columns,
                        **kwargs)


def merge_layer(merge_function, partials, axes: tuple[int, ...], n_out: int | None, *args,
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


def finish_layer(finish_function, x, stats, axes: tuple[int, ...], dtype: np.dtype, *args,
                 **kwargs):
    """Stage 3: ``finish_function(x_block, row_chunk_stats, *arg_blocks, axes=axes, **kwargs)``,
    one task a block of ``x``, returning an array of the block's shape and ``dtype``."""
    import dask.array as da
    index = tuple(range(x.ndim))
    rows = tuple(i for i in index if i not in axes)
    return da.blockwise(finish_function, index, x, index, stats, rows + (x.ndim,), *args,
                        concatenate=True, meta=block_meta(x, x.ndim, dtype), axes=axes, **kwargs)


def single_block(blocks):
    """The block inside the nested one-element lists that blockwise (without ``concatenate``,
    which would copy) passes for the single-chunk axes an output drops."""
    while isinstance(blocks, list):
        (blocks,) = blocks
    return blocks


def scalar_arg(value) -> tuple:
    """A blockwise argument pair for a scalar: a 0-d Dask array, or a literal."""
    return (value, ()) if _spec.is_dask_array(value) else (value, None)


def block_results(function, x, *args, **kwargs):
    """``function(x_block, *arg_blocks, **kwargs)`` a block, each returning a tuple of results,
    as a Dask array of tuples for :func:`result` to take apart."""
    import dask.array as da
    index = tuple(range(x.ndim))
    return da.blockwise(function, index, x, index, *args, meta=np.empty((0,) * x.ndim), **kwargs)


def _pick_block(results, *, position):
    return single_block(results)[position]


def result(results, position: int, out_index: tuple, meta, adjust_chunks=None):
    """Item ``position`` of every block's results (an ``out_index`` without the class axis
    drops it: it is in one chunk there)."""
    import dask.array as da
    return da.blockwise(_pick_block, out_index, results, tuple(range(results.ndim)),
                        adjust_chunks=adjust_chunks, meta=meta, position=position)
