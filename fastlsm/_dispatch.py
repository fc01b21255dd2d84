"""The one place that validates arguments, settles dtypes and axes, and picks a kernel.

Public functions turn their arguments into a :class:`Rows` problem here: the class axes moved to
the end and the array seen as ``(rows, classes)``, without a copy wherever the memory layout
allows one.  Kernels only ever see float32/float64 arrays of that 2-D shape, or, for a strided
class axis whose rows lie side by side in memory, the ``(batch, classes, width)`` view of
:func:`column_view` that the ``*_columns`` kernels read in place.
"""

from __future__ import annotations

import functools
import math
import operator
import os
import threading
from dataclasses import dataclass

import numpy as np

# A row costs about as much as ROW_OVERHEAD extra elements (its log, its block bookkeeping and
# the scalar tail of each vector loop).  Below PARALLEL_MIN_WORK such units a serial kernel beats
# starting the thread team: measured crossover ~10-16k units for 10, 100 and 1000 classes.
ROW_OVERHEAD = 100
PARALLEL_MIN_WORK = 12_000
# Rows of at most this many classes go to a kernel's ``*_short_rows`` twin where it has one
# (rows a tile at a time, across SIMD lanes).  Measured, one thread, tile time over row time:
# float32 0.15-0.36 at 4-10 classes, 0.72-0.78 at 32, 1.3-1.7 at 48; float64 0.3-0.6 at 4-10,
# 0.85-1.26 from 16 to 32.
SHORT_ROW_CLASSES = 32

_FLOAT_COMPUTE = {np.dtype(np.float16): np.dtype(np.float32)}
_NATIVE_FLOATS = frozenset({np.dtype(np.float32), np.dtype(np.float64)})


def result_dtype(dtype: np.dtype, name: str) -> np.dtype:
    """SciPy's rule: floats keep their dtype, integers and bool become float64."""
    if dtype in _NATIVE_FLOATS:
        return dtype
    if dtype.kind in "biu":
        return np.dtype(np.float64)
    if dtype.kind == "f":
        if dtype.itemsize > 8:
            raise TypeError(f"{name} has dtype {dtype}, which fastlsm does not support; "
                            "cast it to float64 first")
        return dtype.newbyteorder("=")
    raise TypeError(f"{name} must be a real numeric array, got dtype {dtype}")


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """float16 is computed in float32; every other result dtype is computed as itself."""
    return _FLOAT_COMPUTE.get(dtype, dtype)


def as_real_array(x, name: str) -> np.ndarray:
    if isinstance(x, np.ndarray):
        array = x
    else:
        try:
            array = np.asarray(x)
        except (ValueError, TypeError) as exc:
            raise TypeError(f"{name} could not be converted to an array: {exc}") from None
    result_dtype(array.dtype, name)
    return array


def backward_dtype(grad_output, output) -> np.dtype:
    """The dtype a backward pass computes ``grad_output`` and ``output`` in (anything with a
    ``shape`` and a NumPy ``dtype``), once their shapes are checked to match."""
    g_shape, y_shape = tuple(grad_output.shape), tuple(output.shape)
    if g_shape != y_shape:
        raise ValueError(f"grad_output has shape {g_shape} but output has shape {y_shape}; "
                         "they must match")
    return np.result_type(result_dtype(grad_output.dtype, "grad_output"),
                          result_dtype(output.dtype, "output"))


def normalize_axes(axis, ndim: int, name: str = "axis") -> tuple[int, ...]:
    """Sorted, non-negative axes; ``None`` means every axis.  A 0-d array has one implicit axis."""
    n = max(ndim, 1)
    if axis is None:
        return tuple(range(n))
    if type(axis) is int and -n <= axis < n:
        return (axis % n,)
    items = axis if isinstance(axis, tuple) else (axis,)
    axes = []
    for item in items:
        try:
            index = operator.index(item)
        except TypeError:
            raise TypeError(f"{name} must be an int, a tuple of ints or None, got {axis!r}") from None
        if not -n <= index < n:
            raise np.exceptions.AxisError(index, n)
        axes.append(index % n)
    if len(set(axes)) != len(axes):
        raise ValueError(f"repeated axis in {name}={axis!r}")
    return tuple(sorted(axes))


def plain_rows(x, axis) -> bool:
    """The common call: a non-empty C-ordered float32/float64 array, rows along the last axis.

    Callers hand such an ``x`` straight to a kernel as ``x.reshape(-1, x.shape[-1])``, skipping
    the general dtype and layout handling, which costs 3-6 us a call here: more than the whole
    fast call (~2-3 us) on a (1, 10) array.
    """
    return (type(x) is np.ndarray and x.dtype in _NATIVE_FLOATS and x.ndim > 0 and x.size > 0
            and type(axis) is int and (axis == -1 or axis == x.ndim - 1) and x.flags.c_contiguous)


def plain_out(x: np.ndarray, out) -> bool:
    """For a :func:`plain_rows` ``x``: ``out`` is None, ``x`` itself, or a C-ordered writeable
    array of ``x``'s shape and dtype apart from it, so the kernel can write it directly."""
    return out is None or (
        type(out) is np.ndarray and out.dtype == x.dtype and out.shape == x.shape
        and out.flags.c_contiguous and out.flags.writeable
        and (out is x or not np.may_share_memory(out, x)))


def check_out(out, shape: tuple[int, ...], dtype: np.dtype, name: str = "out") -> None:
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != shape:
        raise ValueError(f"{name} has shape {out.shape}, expected {shape}")
    if out.dtype != dtype:
        raise ValueError(f"{name} has dtype {out.dtype}, expected {dtype}")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")


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
    run("copy_tiles", batched, copy)
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
    if len(axes) != 1 or a.dtype not in _NATIVE_FLOATS:
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


def to_rows(array: np.ndarray, axes: tuple[int, ...], name: str) -> Rows:
    rdtype = result_dtype(array.dtype, name)
    cdtype = compute_dtype(rdtype)
    m = moved(array, axes)
    if m.dtype != cdtype:
        m = m.astype(cdtype)
    return Rows(array, axes, rdtype, cdtype, as_matrix(m, len(axes)))


def elementwise_target(rows: Rows, out: np.ndarray | None,
                       out_name: str = "out") -> tuple[np.ndarray, np.ndarray, bool]:
    """``(result, target, scratch)``: the array to return and the ``(rows, classes)`` one to write.

    The kernel writes straight into the result when it can.  Otherwise (a dtype to cast to, a
    layout with no 2-D view, an ``out`` overlapping the input other than exactly) ``scratch`` is
    true and :func:`finish_elementwise` copies the target into the result.
    """
    array = rows.array
    if out is None:
        result = np.empty_like(array, dtype=rows.result_dtype)  # keeps the input's layout
    else:
        check_out(out, array.shape, rows.result_dtype, out_name)
        result = out
    if result.dtype == rows.compute_dtype and (
            out is None or _same_memory(out, array) or not np.may_share_memory(out, rows.matrix)):
        target = _as_2d(moved(result, rows.axes), len(rows.axes))
        if target is not None and _rows_are_contiguous(target):
            return result, target, False
    return result, np.empty(rows.matrix.shape, rows.compute_dtype), True


def finish_elementwise(rows: Rows, result: np.ndarray, target: np.ndarray, scratch: bool,
                       out: np.ndarray | None):
    if scratch:
        dst = moved(result, rows.axes)
        view = _as_2d(dst, len(rows.axes))
        if result.dtype == target.dtype and view is not None:
            run("copy_tiles", target[None], view[None])
        else:
            dst[...] = target.reshape(dst.shape)
    return result[()] if out is None and rows.array.ndim == 0 else result


# --- kernel choice -------------------------------------------------------------------------

_parallel_lock = threading.Lock()


@functools.cache
def _kernels():
    """Import the kernels (and Numba) on first use, after choosing a thread-safe layer."""
    import numba
    if "NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default":
        # Numba's default prefers tbb, then omp, then `workqueue`, which aborts the process when two
        # Python threads enter parallel code at once.  Ask for a thread-safe layer when one loads.
        if _loadable("numba.np.ufunc.tbbpool") or _loadable("numba.np.ufunc.omppool"):
            numba.config.THREADING_LAYER = "threadsafe"
    from fastlsm.cpu import kernels, loss, partials
    return {name: obj for module in (kernels, loss, partials) for name, obj in vars(module).items()
            if isinstance(obj, kernels.RowKernel)}


def _get_num_threads() -> int:
    from numba import get_num_threads
    return get_num_threads()


def _loadable(module: str) -> bool:
    import importlib
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def threading_layer() -> str:
    """The Numba threading layer in use, starting the thread pool if needed."""
    import numba
    from numba.np.ufunc import parallel
    _kernels()
    parallel._launch_threads()
    return numba.threading_layer()


@functools.cache
def _layer_is_threadsafe() -> bool:
    return threading_layer() != "workqueue"


def kernel(name: str):
    """The :class:`~fastlsm.cpu.kernels.RowKernel` called ``name``."""
    return _kernels()[name]


@functools.cache
def _variants(kernel_name: str) -> tuple:
    """``(for long rows, for short rows)``: the kernel and its ``*_short_rows`` twin, if any."""
    kernels = _kernels()
    long_rows = kernels[kernel_name]
    return long_rows, kernels.get(kernel_name.removesuffix("_rows") + "_short_rows", long_rows)


def run(kernel_name: str, *args) -> None:
    """Run a row kernel; its first argument, a ``(..., rows, classes)`` array, picks the variant."""
    shape = args[0].shape
    classes = shape[-1]
    rows = shape[0] if len(shape) == 2 else math.prod(shape[:-1])
    long_rows, short_rows = _variants(kernel_name)
    row_kernel = short_rows if classes <= SHORT_ROW_CLASSES else long_rows
    if rows < 2 or rows * (classes + ROW_OVERHEAD) < PARALLEL_MIN_WORK or _get_num_threads() == 1:
        row_kernel.serial(*args)
    elif _layer_is_threadsafe():
        row_kernel.parallel(*args)
    elif _parallel_lock.acquire(blocking=False):
        # workqueue: only one thread at a time may be inside parallel code; the others run serial.
        try:
            row_kernel.parallel(*args)
        finally:
            _parallel_lock.release()
    else:
        row_kernel.serial(*args)
