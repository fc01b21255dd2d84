"""The CPU backend's API for rows split across blocks of classes (what the Dask backend runs in
its tasks when a class axis spans several chunks): a block's per-row partials, a row chunk's
merge of them, and a block's part of the result, each through the kernels of
:mod:`.kernels.partials`.

Blocks are NumPy arrays of the caller's layout, the class axes ``axes``; partials and merged
statistics are float64 ``(rows, k)`` arrays, the rows in the order of the block's other axes.
"""

from __future__ import annotations

import numpy as np

from fastlsm import _spec
from fastlsm.backends.cpu import layout, runtime
from fastlsm.backends.cpu.loss import (checked_class_indices, class_indices_and_error,
                                       class_weights)
from fastlsm.backends.cpu.kernels import loss as loss_kernels
from fastlsm.backends.cpu.kernels import partials as kernels
from fastlsm.backends.cpu.kernels.partials import SplitKernels
from fastlsm.backends.cpu.runtime import Kernel

__all__ = ["block_rows", "class_indices", "class_weights", "cross_entropy_partials", "finish",
           "matrix_like", "merge", "not_numpy", "partials", "probability_partials"]


def not_numpy(block) -> TypeError:
    """The error for a block of another kind than NumPy's (``block`` may be a Dask meta)."""
    return TypeError(f"fastlsm splits a row across chunks for NumPy blocks only, got "
                     f"{type(block).__module__}.{type(block).__name__} blocks; keep the class "
                     f"axis in one chunk (x.rechunk({{axis: -1}})) to run on other arrays")


def block_rows(block, axes: tuple[int, ...]) -> layout.Rows:
    """A block as :class:`~.layout.Rows` in its compute dtype; a TypeError for blocks that are
    not NumPy arrays (the split-row kernels are CPU kernels)."""
    if type(block) is not np.ndarray:
        raise not_numpy(block)
    dtype = _spec.result_dtype(block.dtype, "x")
    return layout.to_rows(block, axes, dtype, _spec.compute_dtype(dtype))


def _matrices(rows: layout.Rows, others, axes: tuple[int, ...]) -> list[np.ndarray]:
    """Blocks of the same shape as ``rows``' (the backward passes' second array), as matrices."""
    dtype = rows.compute_dtype
    return [layout.to_rows(np.asarray(a).astype(dtype, copy=False), axes, dtype, dtype).matrix
            for a in others]


def partials(split: SplitKernels, n_columns: int, block, axes: tuple[int, ...],
             *others) -> np.ndarray:
    """``split.partials`` of a block (and blocks ``others`` of its shape): ``(rows, n_columns)``."""
    rows = block_rows(block, axes)
    result = np.empty((rows.matrix.shape[0], n_columns))
    if result.size:
        runtime.run(split.partials, rows.matrix, *_matrices(rows, others, axes), result)
    return result


def merge(kernel: Kernel, by_block: np.ndarray, *args, n_out: int | None) -> np.ndarray:
    """``kernel`` over a row chunk's partials ``(rows, blocks, k)``: ``(rows, n_out)`` float64
    statistics, or one float64 value a row where ``n_out`` is None."""
    by_block = np.ascontiguousarray(by_block)
    n_rows = by_block.shape[0]
    result = np.empty(n_rows if n_out is None else (n_rows, n_out))
    if n_rows:
        runtime.run(kernel, by_block, *args, result)
    return result


def matrix_like(block, other, axes: tuple[int, ...]) -> np.ndarray:
    """A block of the same shape as ``block`` (the backward passes' second array, probability
    targets) as a matrix of its rows, in ``block``'s compute dtype."""
    return _matrices(block_rows(block, axes), (other,), axes)[0]


def finish(kernel: Kernel, block, axes: tuple[int, ...], *args, softcap: float = 0.0):
    """``kernel(rows, *args, result)`` over a block: the block's part of the result, in its
    shape and result dtype (``args`` hold the rows' merged statistics).  With ``softcap``, the
    kernel reads the block soft-capped and its result (a loss's gradient) is brought to the raw
    logits."""
    rows = block_rows(block, axes)
    result, target, scratch = layout.elementwise_target(rows, None)
    if target.size:
        matrix = soft_capped(rows.matrix, softcap)
        runtime.run(kernel, matrix, *args, target)
        if softcap:
            runtime.run(loss_kernels.soft_cap_slope_rows, matrix, softcap, target)
    return layout.finish_elementwise(rows, result, target, scratch, None)


def soft_capped(matrix: np.ndarray, softcap: float) -> np.ndarray:
    """``softcap * tanh(matrix / softcap)`` as a new matrix; ``matrix`` itself for 0 (none)."""
    if not softcap:
        return matrix
    capped = np.empty(matrix.shape, matrix.dtype)
    runtime.run(loss_kernels.soft_cap_rows, matrix, softcap, capped)
    return capped


def class_indices(target_block, weight: np.ndarray, ignore_index: int,
                  offsets: tuple[int, ...]) -> tuple[np.ndarray, float]:
    """A block of class indices (NumPy, or a device array copied over) as flat int64, checked
    as the CPU backend checks them (the block starts at ``offsets`` of the whole target array),
    and the sum of their weights."""
    return checked_class_indices(_host(target_block), weight, ignore_index, offsets)


def class_index_error(target_block, weight: np.ndarray, ignore_index: int,
                      offsets: tuple[int, ...]):
    """The block's first target out of range, ``(position in the whole array, IndexError)``,
    or None: what :func:`class_indices` would raise."""
    return class_indices_and_error(_host(target_block), weight, ignore_index, offsets)[2]


def _host(target_block) -> np.ndarray:
    return target_block.get() if _spec.is_cuda_array(target_block) else np.asarray(target_block)


def cross_entropy_partials(block, class_axis: int, target: np.ndarray, first_class: int,
                           weight: np.ndarray, label_smoothing: float,
                           softcap: float) -> np.ndarray:
    """A block's :func:`~.kernels.partials.cross_entropy_partials_rows` (flat int64 targets,
    the block's first class and weights), of its logits soft-capped where ``softcap`` is set."""
    rows = block_rows(block, (class_axis,))
    result = np.empty((rows.matrix.shape[0], kernels.CROSS_ENTROPY_PARTIALS))
    if result.size:
        runtime.run(kernels.CROSS_ENTROPY_SPLIT.partials, soft_capped(rows.matrix, softcap),
                    target, first_class, weight, label_smoothing > 0.0, result)
    return result


def probability_partials(block, class_axis: int, probabilities, weight: np.ndarray,
                         label_smoothing: float, n_classes: int, softcap: float) -> np.ndarray:
    """A block's :func:`~.kernels.partials.cross_entropy_probs_partials_rows`, soft-capped as
    :func:`cross_entropy_partials`."""
    rows = block_rows(block, (class_axis,))
    y = _matrices(rows, (probabilities,), (class_axis,))[0]
    result = np.empty((rows.matrix.shape[0], kernels.PROBABILITY_PARTIALS))
    if result.size:
        runtime.run(kernels.PROBABILITIES_SPLIT.partials, soft_capped(rows.matrix, softcap), y,
                    weight, label_smoothing, n_classes, result)
    return result
