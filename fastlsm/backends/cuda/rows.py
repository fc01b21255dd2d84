"""The CUDA backend's view of an array as ``(rows, classes)`` with contiguous rows, in its compute
dtype, and the device-side casts and transposes that make it so and map results back."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastlsm.backends.cuda.arrays import BFLOAT16_WORDS, DeviceArray, scratch
from fastlsm.backends.cuda.kernels import reduce
from fastlsm.backends.cuda.launch import launch


@dataclass
class Rows:
    """A device array as ``(rows, classes)`` with contiguous rows, in its compute dtype.

    ``inner > 1`` where the class axis is not last: ``matrix`` is then a transposed copy of the
    ``(outer, classes, inner)`` array, its rows in the order of the remaining axes.
    """
    matrix: Any
    outer: int
    classes: int
    inner: int
    like: DeviceArray  # whose library allocates the scratch arrays


def adjacent(axes: tuple[int, ...]) -> bool:
    """Whether the class ``axes`` (sorted) are next to each other, as :func:`split` needs."""
    return axes[-1] - axes[0] + 1 == len(axes)


def split(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, int, int]:
    """``(outer, classes, inner)`` of a C-ordered array reduced over (adjacent) ``axes``."""
    first, last = axes[0], axes[-1]
    return math.prod(shape[:first]), math.prod(shape[first:last + 1]), math.prod(shape[last + 1:])


def _elementwise(kernel, src, dst) -> None:
    """``kernel`` over C-ordered device arrays of one size, any shapes, seen as vectors."""
    if src.size:
        threads = 256
        blocks = min(-(-src.size // threads), 65535)  # the kernel strides over the rest
        launch(kernel, blocks, threads, src.reshape(src.size), dst.reshape(src.size))


def cast_into(src, dst) -> None:
    """``dst[...] = src`` in ``dst``'s dtype: C-ordered device arrays of one size, any shapes.
    A result view of :data:`~.arrays.BFLOAT16_WORDS` gets ``src`` rounded to bfloat16 once."""
    rounds = dst.dtype == BFLOAT16_WORDS and src.dtype.kind == "f"
    _elementwise(reduce.round_to_bfloat16 if rounds else reduce.cast, src, dst)


def cast(src, dtype, like: DeviceArray):
    """A C-ordered copy of ``src`` in ``dtype``, made on the device."""
    dst = scratch(tuple(src.shape), dtype, like)
    cast_into(src, dst)
    return dst


def in_dtype(view, dtype, like: DeviceArray):
    """``view``, or a copy of it cast to ``dtype`` where it has another dtype."""
    return view if view.dtype == dtype else cast(view, dtype, like)


def values(array: DeviceArray, dtype, like: DeviceArray):
    """``array``'s values in ``dtype``: its view, or a copy cast (or, for bfloat16 words,
    widened) to ``dtype``."""
    if not array.bfloat16:
        return in_dtype(array.view, dtype, like)
    wide = scratch(tuple(array.view.shape), np.float32, like)
    _elementwise(reduce.widen_bfloat16, array.view, wide)
    return in_dtype(wide, dtype, like)


def swap_last_axes(src, dst) -> None:
    """``dst = src.swapaxes(1, 2)`` for 3-D device arrays (a tiled transposing copy)."""
    batch, n, m = src.shape
    if src.size == 0:
        return
    grid = (-(-m // reduce.TILE), -(-n // reduce.TILE), min(batch, 65535))
    launch(reduce.swap_last_axes, grid, (reduce.TILE, 8), src, dst)


def as_matrix(view, outer: int, classes: int):
    # A device array's reshape builds a new array object each time: skip it for the common 2-D call.
    return view if tuple(view.shape) == (outer, classes) else view.reshape(outer, classes)


def to_rows(array: DeviceArray, axes: tuple[int, ...], compute_dtype: np.dtype) -> Rows:
    """``array`` (never modified) as :class:`Rows` in ``compute_dtype``."""
    view = values(array, compute_dtype, array)
    outer, classes, inner = split(tuple(view.shape) or (1,), axes)
    if inner == 1:
        return Rows(as_matrix(view, outer, classes), outer, classes, 1, array)
    matrix = scratch((outer, inner, classes), compute_dtype, array)
    swap_last_axes(view.reshape(outer, classes, inner), matrix)
    return Rows(matrix.reshape(outer * inner, classes), outer, classes, inner, array)


def matrix_target(rows: Rows, dst):
    """Where a kernel writes an elementwise result bound for ``dst`` (a C-ordered device array of
    the input's shape): ``dst`` itself seen as rows, or a scratch matrix for :func:`unrows`."""
    if rows.inner == 1 and dst.dtype == rows.matrix.dtype:
        return as_matrix(dst, rows.outer, rows.classes)
    return scratch((rows.outer * rows.inner, rows.classes), rows.matrix.dtype, rows.like)


def unrows(rows: Rows, target, dst) -> None:
    """Copy a kernel's ``(rows, classes)`` result into ``dst`` unless it wrote there already."""
    if rows.inner == 1 and dst.dtype == target.dtype:
        return
    if rows.inner > 1:
        swapped = (scratch(tuple(dst.shape), target.dtype, rows.like)
                   if dst.dtype != target.dtype else dst)
        swap_last_axes(target.reshape(rows.outer, rows.inner, rows.classes),
                       swapped.reshape(rows.outer, rows.classes, rows.inner))
        target = swapped
        if swapped is dst:
            return
    cast_into(target, dst)
