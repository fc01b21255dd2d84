"""The CPU's view of its arrays: the class axes moved to the end and the array seen as
``(rows, classes)``, without a copy wherever the memory layout allows one.

Kernels only ever see float32/float64 arrays of that 2-D shape with contiguous rows, or, for a
strided class axis whose rows lie side by side in memory, the ``(batch, classes, width)`` view of
:func:`column_view` that the ``columns`` kernels read in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fastlsm._spec import NATIVE_FLOATS
from fastlsm.backends.cpu.kernels.copy import copy_tiles
from fastlsm.backends.cpu import runtime


def _view(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """``a`` reshaped to ``shape`` without a copy, or None where its layout allows no such view."""
    try:
        return a.reshape(shape, copy=False)
    except ValueError:
        return None


def _as_2d(a: np.ndarray, n_class_axes: int) -> np.ndarray | None:
    """``a`` (class axes last) viewed as ``(rows, classes)``, or None."""
    split = a.ndim - n_class_axes
    return _view(a, (math.prod(a.shape[:split]), math.prod(a.shape[split:])))


def _rows_are_contiguous(matrix: np.ndarray) -> bool:
    # Kernels see each row as a C-ordered 1-D array: the column stride must be the item size.
    return matrix.shape[1] <= 1 or matrix.strides[1] == matrix.itemsize


def as_matrix(a: np.ndarray, n_class_axes: int) -> np.ndarray:
    """``a`` (class axes last) as ``(rows, classes)`` with contiguous rows: a view where the
    layout allows, else a C-ordered copy.

    Transposed layouts -- ``(rows, classes)`` or ``(batch, rows, classes)`` views with strided
    classes, as ``axis=0`` or PyTorch's ``(N, C, d1, ...)`` give -- are copied by a cache-blocked
    parallel kernel, ~4x faster than NumPy's copy of them.
    """
    classes = math.prod(a.shape[a.ndim - n_class_axes:])
    matrix = _as_2d(a, n_class_axes)
    if matrix is not None and _rows_are_contiguous(matrix):
        return matrix
    batched = _batched(a, n_class_axes, matrix)
    if batched is None:
        return np.ascontiguousarray(a).reshape(-1, classes)
    copy = np.empty(batched.shape, a.dtype)
    runtime.run(copy_tiles, batched, copy)
    return copy.reshape(-1, classes)


def _batched(a: np.ndarray, n_class_axes: int, matrix: np.ndarray | None) -> np.ndarray | None:
    """``a`` (class axes last) viewed as ``(batch, rows, classes)``, or None; ``matrix`` is its
    :func:`_as_2d` view, if any."""
    if matrix is not None:
        return matrix[None]
    split = a.ndim - n_class_axes
    if split < 2:
        return None
    return _view(a, (a.shape[0], math.prod(a.shape[1:split]), math.prod(a.shape[split:])))


# Column kernels need enough neighbouring rows to fill SIMD lanes.  Measured on float32 with
# 10-32000 classes: at 8 rows they took 0.54-0.79x the time of the transposed copy and a row
# kernel, at 4 rows 1.6x.
MIN_COLUMN_WIDTH = 8


def column_view(a: np.ndarray, axes: tuple[int, ...]) -> np.ndarray | None:
    """``a`` as ``(batch, classes, width)`` with a contiguous width axis, or None.

    That is the layout of one class axis whose neighbouring rows lie next to each other in
    memory (``axis=0`` of a C-ordered array, the last axis of a Fortran-ordered one, PyTorch's
    ``(N, C, d)``), which the ``*_columns`` kernels read in place.
    """
    if len(axes) != 1 or a.dtype not in NATIVE_FLOATS:
        return None
    m = moved(a, axes)
    batched = _batched(m, 1, _as_2d(m, 1))
    if (batched is None or batched.shape[1] < MIN_COLUMN_WIDTH or batched.shape[2] < 2
            or batched.strides[1] != a.itemsize):
        return None
    return batched.swapaxes(1, 2)


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.strides == b.strides and a.shape == b.shape and a.dtype == b.dtype)


@dataclass(slots=True)
class Rows:
    """An input seen as ``(rows, classes)`` in its compute dtype, and how to map results back."""
    array: np.ndarray          # the caller's array, converted to an ndarray (never modified)
    axes: tuple[int, ...]      # class axes, sorted
    result_dtype: np.dtype
    compute_dtype: np.dtype
    matrix: np.ndarray         # (rows, classes), compute dtype; a view of `array` where possible


def moved(a: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """``a`` with its class axes moved, in order, to the end (a view)."""
    if a.ndim == 0:
        return a.reshape(1)
    k = len(axes)
    if not axes or axes[0] == a.ndim - k and axes[-1] == a.ndim - 1:  # sorted and distinct: already trailing
        return a
    return np.moveaxis(a, axes, tuple(range(a.ndim - k, a.ndim)))


def to_rows(array: np.ndarray, axes: tuple[int, ...], result_dtype: np.dtype,
            compute_dtype: np.dtype) -> Rows:
    """``array`` (never modified) as :class:`Rows` in ``compute_dtype``."""
    m = moved(array, axes)
    if m.dtype != compute_dtype:
        m = m.astype(compute_dtype)
    return Rows(array, axes, result_dtype, compute_dtype, as_matrix(m, len(axes)))


def elementwise_target(rows: Rows, out: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(result, target, scratch)``: the array to return and the ``(rows, classes)`` one to write.

    The kernel writes straight into the result (``out``, already checked, or a new array) when it
    can.  Otherwise (a dtype to cast to, a layout with no 2-D view, an ``out`` overlapping the
    input other than exactly) ``scratch`` is true and :func:`finish_elementwise` copies the
    target into the result.
    """
    array = rows.array
    # A new result keeps the input's layout.
    result = np.empty_like(array, dtype=rows.result_dtype) if out is None else out
    if result.dtype == rows.compute_dtype and (
            out is None or _same_memory(out, array) or not np.may_share_memory(out, rows.matrix)):
        target = _as_2d(moved(result, rows.axes), len(rows.axes))
        if target is not None and _rows_are_contiguous(target):
            return result, target, False
    return result, np.empty(rows.matrix.shape, rows.compute_dtype), True


def finish_elementwise(rows: Rows, result: np.ndarray, target: np.ndarray, scratch: bool,
                       out: np.ndarray | None):
    """The result, once a kernel wrote ``target`` (copied into it where ``scratch``); a NumPy
    scalar for a 0-d input without ``out``."""
    if scratch:
        dst = moved(result, rows.axes)
        view = _as_2d(dst, len(rows.axes))
        if result.dtype == target.dtype and view is not None:
            runtime.run(copy_tiles, target[None], view[None])
        else:
            dst[...] = target.reshape(dst.shape)
    return result[()] if out is None and rows.array.ndim == 0 else result
