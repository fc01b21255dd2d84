"""The public functions on an NVIDIA GPU: the same validation as on the CPU, then
:mod:`fastlsm.cuda.kernels`.

Device inputs are used in place (no host round-trip) and results are allocated by the input's
own library, so they come back as the same kind of array: CuPy in, CuPy out; PyTorch in, PyTorch
out; a Numba device array otherwise.  NumPy input (``device="cuda"``) is copied over and its
results copied back.  Targets, weights and probability targets given on the host follow the
logits to the GPU.

Kernels run on the legacy default stream, which waits for the work already queued on the
blocking streams (PyTorch's and CuPy's default streams among them), so device inputs are read
without a synchronisation per argument; work on a non-blocking stream must be synchronised by
the caller first.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastlsm import _dispatch as d
from fastlsm import _loss
from fastlsm._devices import is_cuda_array

_TORCH_DTYPES = ("float16", "float32", "float64", "int64")


@functools.cache
def _cuda():
    try:
        from numba import cuda
    except ImportError as exc:  # pragma: no cover - numba always ships numba.cuda
        raise RuntimeError(f"device='cuda' needs numba-cuda ({exc}); pip install "
                           "'fastlsm[cuda]'") from None
    if not cuda.is_available():
        raise RuntimeError("device='cuda' was asked for, but no usable CUDA GPU and driver were "
                           "found (numba.cuda.is_available() is False); use device='cpu'")
    return cuda


def _one_context(entry_point):
    """``entry_point`` run inside one numba-cuda context scope (``cuda.require_context``).
    Outside a scope, each of numba's API calls in it (``as_cuda_array``, ``device_array``,
    copies) asks the driver for the current context and looks up its primary context again;
    inside one they find both in thread-local storage."""
    @functools.wraps(entry_point)
    def call(*args, **kwargs):
        return _scoped(entry_point)(*args, **kwargs)
    return call


@functools.cache
def _scoped(entry_point):
    return _cuda().require_context(entry_point)


@functools.cache
def _kernels():
    _cuda()
    from fastlsm.cuda import kernels
    return kernels


@dataclass
class _Array:
    """A caller's array seen as a C-ordered device array (``view``), and whose it was."""
    view: Any       # numba device array (the simulator's in CI)
    library: str    # "numpy" (copied over), "numba", "cupy" or "torch"
    owner: Any      # the caller's object, or the contiguous copy made of it


def _library(x) -> str:
    module = type(x).__module__
    if module.startswith("torch"):
        return "torch"
    if module.startswith("cupy"):
        return "cupy"
    return "numba"


def _device_array(x, name: str) -> _Array:
    """``x`` on the device, C-ordered; dtypes are checked (real numbers; any integers for a
    ``target``) before anything is copied.

    Device arrays of CuPy and PyTorch that are not C-ordered are made so by their own library, on
    the device; a Numba device array must already be.  Anything else goes through NumPy and is
    copied over.
    """
    cuda = _cuda()
    if not is_cuda_array(x):
        host = np.asarray(x) if name == "target" else d.as_real_array(x, name)
        host = host if host.flags.c_contiguous else host.copy()
        return _Array(cuda.to_device(host), "numpy", host)
    library = _library(x)
    owner = x
    if library == "torch":
        owner = x.detach()
        if not owner.is_contiguous():
            owner = owner.contiguous()
    elif library == "cupy" and not x.flags.c_contiguous:
        import cupy
        owner = cupy.ascontiguousarray(x)
    view = cuda.as_cuda_array(owner, sync=False) if hasattr(owner, "__cuda_array_interface__") else owner
    if not view.is_c_contiguous():
        raise ValueError(f"{name} is a device array that is not C-contiguous; fastlsm reads device "
                         "arrays in place and needs C order (make a contiguous copy first)")
    if name != "target":
        d.result_dtype(view.dtype, name)
    return _Array(view, library, owner)


def _empty(shape: tuple[int, ...], dtype, like: _Array):
    """``(result, view)``: a new array of ``like``'s library and its device view."""
    dtype = np.dtype(dtype)
    if like.library == "cupy":
        import cupy
        result = cupy.empty(shape, dtype)
        return result, _cuda().as_cuda_array(result, sync=False)
    if like.library == "torch" and dtype.name in _TORCH_DTYPES:
        import torch
        result = torch.empty(shape, dtype=getattr(torch, dtype.name), device=like.owner.device)
        return result, _cuda().as_cuda_array(result, sync=False)
    result = _cuda().device_array(shape, dtype)
    return result, result


def _handed_back(result, like: _Array):
    """The result as the caller gets it: copied to the host for NumPy input."""
    if like.library == "numpy":
        host = result.copy_to_host()
        return host[()] if host.ndim == 0 else host
    return result


def _out_view(out, shape: tuple[int, ...], dtype: np.dtype, like: _Array, name: str):
    """The device view to write for a caller's ``out``; a NumPy ``out`` for NumPy input gets a
    device buffer, copied into it by :func:`_deliver`."""
    if like.library == "numpy":
        d.check_out(out, shape, dtype, name)
        return _cuda().device_array(shape, dtype)
    if not is_cuda_array(out):
        raise TypeError(f"{name} must be a device array for device input, got "
                        f"{type(out).__name__}")
    view = _device_array(out, name).view
    if tuple(view.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(view.shape)}, expected {shape}")
    if view.dtype != dtype:
        raise ValueError(f"{name} has dtype {view.dtype}, expected {dtype}")
    if _library(out) == "torch" and not out.is_contiguous() or (
            _library(out) == "cupy" and not out.flags.c_contiguous):
        raise ValueError(f"{name} must be C-contiguous")
    return view


def _deliver(view, out, like: _Array):
    """Hand back the caller's ``out``, filled from ``view`` where it is a host array."""
    if like.library == "numpy":
        view.copy_to_host(out)
    return out


# --- rows --------------------------------------------------------------------------------------

@dataclass
class _Rows:
    """A device array as ``(rows, classes)`` with contiguous rows, in its compute dtype.

    ``inner > 1`` where the class axis is not last: ``matrix`` is then a transposed copy of the
    ``(outer, classes, inner)`` array, its rows in the order of the remaining axes.
    """
    matrix: Any
    outer: int
    classes: int
    inner: int
    result_dtype: np.dtype
    like: _Array  # whose library allocates the scratch arrays


def _scratch(shape: tuple[int, ...], dtype, like: _Array):
    """A device array for intermediate results, from ``like``'s library: PyTorch's and CuPy's
    allocators keep freed memory for reuse, where a Numba allocation is a cudaMalloc each time."""
    return _empty(shape, dtype, like)[1]


def _cast_into(src, dst) -> None:
    """``dst[...] = src`` in ``dst``'s dtype: C-ordered device arrays of one size, any shapes."""
    if src.size:
        threads = 256
        blocks = min(-(-src.size // threads), 65535)  # the kernel strides over the rest
        _launch(_kernels().cast, blocks, threads, src.reshape(src.size), dst.reshape(src.size))


def _cast(src, dtype, like: _Array):
    """A C-ordered copy of ``src`` in ``dtype``, made on the device."""
    dst = _scratch(tuple(src.shape), dtype, like)
    _cast_into(src, dst)
    return dst


def _swap_last_axes(src, dst) -> None:
    """``dst = src.swapaxes(1, 2)`` for 3-D device arrays (a tiled transposing copy)."""
    batch, n, m = src.shape
    if src.size == 0:
        return
    k = _kernels()
    grid = (-(-m // k.TILE), -(-n // k.TILE), min(batch, 65535))
    _launch(k.swap_last_axes, grid, (k.TILE, 8), src, dst)


def _split(shape: tuple[int, ...], axes: tuple[int, ...], name: str) -> tuple[int, int, int]:
    """``(outer, classes, inner)`` of a C-ordered array reduced over ``axes``."""
    first, last = axes[0], axes[-1]
    if last - first + 1 != len(axes):
        raise ValueError(f"on a CUDA device the class axes of {name} must be adjacent, got {axes}")
    return math.prod(shape[:first]), math.prod(shape[first:last + 1]), math.prod(shape[last + 1:])


def _as_matrix(view, outer: int, classes: int):
    # A device array's reshape builds a new array object each time: skip it for the common 2-D call.
    return view if tuple(view.shape) == (outer, classes) else view.reshape(outer, classes)


def _rows(array: _Array, axes: tuple[int, ...], name: str) -> _Rows:
    view = array.view
    shape = tuple(view.shape) or (1,)
    rdtype = d.result_dtype(view.dtype, name)
    cdtype = d.compute_dtype(rdtype)
    outer, classes, inner = _split(shape, axes, name)
    if view.dtype != cdtype:
        view = _cast(view, cdtype, array)
    if inner == 1:
        return _Rows(_as_matrix(view, outer, classes), outer, classes, 1, rdtype, array)
    matrix = _scratch((outer, inner, classes), cdtype, array)
    _swap_last_axes(view.reshape(outer, classes, inner), matrix)
    return _Rows(matrix.reshape(outer * inner, classes), outer, classes, inner, rdtype, array)


def _matrix_target(rows: _Rows, dst):
    """Where a kernel writes an elementwise result bound for ``dst`` (a C-ordered device array of
    the input's shape): ``dst`` itself seen as rows, or a scratch matrix for :func:`_unrows`."""
    if rows.inner == 1 and dst.dtype == rows.matrix.dtype:
        return _as_matrix(dst, rows.outer, rows.classes)
    return _scratch((rows.outer * rows.inner, rows.classes), rows.matrix.dtype, rows.like)


def _unrows(rows: _Rows, target, dst) -> None:
    """Copy a kernel's ``(rows, classes)`` result into ``dst`` unless it wrote there already."""
    if rows.inner == 1 and dst.dtype == target.dtype:
        return
    if rows.inner > 1:
        swapped = (_scratch(tuple(dst.shape), target.dtype, rows.like)
                   if dst.dtype != target.dtype else dst)
        _swap_last_axes(target.reshape(rows.outer, rows.inner, rows.classes),
                        swapped.reshape(rows.outer, rows.classes, rows.inner))
        target = swapped
        if swapped is dst:
            return
    _cast_into(target, dst)


# --- launching ---------------------------------------------------------------------------------

SMALL_GRID = 128  # numba-cuda warns of low occupancy for grids of fewer blocks
# Matched by its text: numba-cuda raises its own NumbaPerformanceWarning class
# (numba.cuda.core.errors), not numba's, and which one depends on the version.
LOW_OCCUPANCY_WARNING = r"Grid size \d+ will likely result in GPU under-utilization"


def _launch(kernel, blocks, threads, *args) -> None:
    """``kernel[blocks, threads](*args)``.  A grid under :data:`SMALL_GRID` blocks is either the
    input's size or a one-block reduction kept so for determinism, not a mistake of the caller,
    so numba-cuda's low-occupancy warning is silenced for it."""
    grid = math.prod(blocks) if isinstance(blocks, tuple) else blocks
    if grid >= SMALL_GRID:
        kernel[blocks, threads](*args)
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=LOW_OCCUPANCY_WARNING)
        kernel[blocks, threads](*args)


MIN_BLOCK = 64
MAX_BLOCK = 1024  # at most this many threads share a row
# A block of a long row loads, reduces, then writes, and only another block on the same
# multiprocessor keeps memory busy while it reduces.  So a block is at most as large as lets two of
# them share one (each then streams more of its row, from L2), unless that leaves the
# multiprocessor fewer threads than one larger block: threads are what keep loads in flight.
# Measured on an H100 (float32, VALUES 16): log_softmax (64 registers) took 1.31 / 9.71 / 5.36 ms
# at 8192x32000 / 16384x131072 / 4096x262144 in blocks of 448 threads, two a multiprocessor, and
# 2.01 / 10.15 / 5.28 ms in one block of 1024; the fused loss and gradient (95 registers: one
# block of 672, or two of 320) 2.18 / 13.0 / 6.78 ms in blocks of 672 and 2.23 / 14.6 / 8.23 in
# blocks of 448, one a multiprocessor.  The rule gives log_softmax two blocks of 512 and the loss
# one of 672; neither was timed exactly so.
BLOCKS_PER_MULTIPROCESSOR = 2
ROWS_PER_BLOCK = 8  # warps (rows) in a block of the warp-per-row kernels


@functools.cache
def _max_threads(kernel, signature) -> int:
    """The largest block of ``kernel`` (whole warps) of which :data:`BLOCKS_PER_MULTIPROCESSOR`
    fit on a multiprocessor, by the driver's occupancy count (registers, shared memory), unless
    the largest block that fits alone leaves the multiprocessor more threads."""
    compiled = kernel.compile(signature)
    warp = _kernels().WARP
    multiprocessors = _multiprocessors()

    def resident(threads: int) -> int:
        return compiled.max_cooperative_grid_blocks(threads) // multiprocessors * threads

    alone = compiled.max_threads_per_block // warp * warp
    wanted = BLOCKS_PER_MULTIPROCESSOR * multiprocessors
    for threads in range(alone, 0, -warp):
        if compiled.max_cooperative_grid_blocks(threads) >= wanted:
            return threads if resident(threads) >= resident(alone) else alone
    return alone


def _block_threads(kernel, args: tuple, n_classes: int) -> int:
    """Threads of a block that takes ``n_classes`` of a row: ``ceil(n_classes / VALUES)``,
    within :data:`MIN_BLOCK` to :data:`MAX_BLOCK` and :func:`_max_threads`."""
    k = _kernels()
    threads = min(MAX_BLOCK, max(MIN_BLOCK, -(-n_classes // (k.VALUES * k.WARP)) * k.WARP))
    typeof = getattr(kernel, "typeof_pyval", None)
    if typeof is not None:  # the simulator has no registers to run out of
        threads = min(threads, _max_threads(kernel, tuple(typeof(a) for a in args)))
    return threads


def _launch_rows(name: str, n_rows: int, n_classes: int, *args) -> None:
    """Run row kernel ``name``: a warp per row for rows that fit the warp's registers, else a
    block per row (:func:`_block_threads`)."""
    if n_rows == 0:
        return
    k = _kernels()
    kernel = getattr(k, name)
    warp_rows = n_classes <= k.WARP * k.VALUES
    args = (*args, warp_rows)
    if warp_rows:
        _launch(kernel, -(-n_rows // ROWS_PER_BLOCK), ROWS_PER_BLOCK * k.WARP, *args)
        return
    _launch(kernel, n_rows, _block_threads(kernel, args, n_classes), *args)


# A row is split across blocks when the rows are too few for a block each to keep the GPU busy
# and longer than a block's registers hold (a shorter one takes its block a few microseconds:
# a second launch would cost more).  Not yet timed on a GPU: the thresholds follow from the launch
# shapes alone.  Up to half as many rows as multiprocessors, each row gets enough segments for
# two blocks a multiprocessor, and a segment at least MIN_SEGMENT classes (two warps' worth of
# registers).
MIN_SEGMENT = 2048


@functools.cache
def _multiprocessors() -> int:
    # The simulator's device has no multiprocessor count; it runs one block at a time.
    return getattr(_cuda().get_current_device(), "MULTIPROCESSOR_COUNT", 1)


def _segments(n_rows: int, n_classes: int) -> int:
    """How many blocks share each row (1: a row is not split)."""
    multiprocessors = _multiprocessors()
    if n_rows == 0 or 2 * n_rows > multiprocessors or n_classes <= _kernels().VALUES * MAX_BLOCK:
        return 1
    return max(1, min(-(-2 * multiprocessors // n_rows), n_classes // MIN_SEGMENT))


def _launch_softmax_family(name: str, rows: _Rows, out) -> None:
    """``name`` (log_softmax, softmax or logsumexp) of ``rows.matrix`` into ``out``: in one pass,
    or, for rows split into segments, the segments' ``(m, s)`` and then a pass that merges
    them and writes (:mod:`fastlsm.cuda.kernels`)."""
    matrix = rows.matrix
    n_rows, n_classes = matrix.shape
    segments = _segments(n_rows, n_classes)
    if segments == 1:
        _launch_rows(f"{name}_rows", n_rows, n_classes, matrix, out)
        return
    partials = _scratch((n_rows, segments, 2), np.float64, rows.like)
    if name == "logsumexp":
        _launch_segments(n_classes, segments, ("segment_stats", (matrix, partials)))
        _launch(_kernels().logsumexp_segments, n_rows, _reduction_threads(segments), partials,
                out)
        return
    _launch_segments(n_classes, segments, ("segment_stats", (matrix, partials)),
                     (f"{name}_segments", (matrix, partials, out)))


def _launch_segments(n_classes: int, segments: int, *launches: tuple[str, tuple]) -> None:
    """Run each ``(kernel name, args)`` of ``launches`` in turn, a block per segment of every
    row (the rows are the first argument's)."""
    k = _kernels()
    length = -(-n_classes // segments)
    for name, args in launches:
        kernel = getattr(k, name)
        _launch(kernel, args[0].shape[0] * segments, _block_threads(kernel, args, length), *args)


# --- log_softmax, softmax, logsumexp and the backward passes ------------------------------------

def _elementwise(name: str, x, axis, out):
    array = _device_array(x, "x")
    axes = d.normalize_axes(axis, len(array.view.shape))
    rows = _rows(array, axes, "x")
    shape = tuple(array.view.shape)
    if out is None:
        result, dst = _empty(shape, rows.result_dtype, array)
    else:
        result, dst = out, _out_view(out, shape, rows.result_dtype, array, "out")
    target = _matrix_target(rows, dst)
    _launch_softmax_family(name, rows, target)
    _unrows(rows, target, dst)
    if out is not None:
        return _deliver(dst, out, array)
    return _handed_back(result, array)


@_one_context
def log_softmax(x, axis=-1, *, out=None):
    return _elementwise("log_softmax", x, axis, out)


@_one_context
def softmax(x, axis=-1, *, out=None):
    return _elementwise("softmax", x, axis, out)


@_one_context
def logsumexp(x, axis=-1, *, keepdims=False, out=None):
    array = _device_array(x, "x")
    shape = tuple(array.view.shape)
    axes = d.normalize_axes(axis, len(shape))
    rows = _rows(array, axes, "x")
    kept = tuple(1 if i in axes else n for i, n in enumerate(shape))
    result_shape = kept if keepdims else tuple(n for i, n in enumerate(shape) if i not in axes)
    if out is None:
        result, dst = _empty(result_shape, rows.result_dtype, array)
    else:
        result, dst = out, _out_view(out, result_shape, rows.result_dtype, array, "out")
    n_rows = rows.matrix.shape[0]
    lse = (dst.reshape(n_rows) if dst.dtype == rows.matrix.dtype
           else _scratch((n_rows,), rows.matrix.dtype, array))
    _launch_softmax_family("logsumexp", rows, lse)  # -inf for no classes
    if dst.dtype != lse.dtype:
        _cast_into(lse, dst)
    if out is not None:
        return _deliver(dst, out, array)
    return _handed_back(result, array)


def _backward(name: str, grad_output, output, axis):
    g = _device_array(grad_output, "grad_output")
    y = _device_array(output, "output")
    dtype = d.backward_dtype(g.view, y.view)
    if g.view.dtype != dtype:
        g.view = _cast(g.view, dtype, g)
    if y.view.dtype != dtype:
        y.view = _cast(y.view, dtype, g)
    axes = d.normalize_axes(axis, len(g.view.shape))
    g_rows, y_rows = _rows(g, axes, "grad_output"), _rows(y, axes, "output")
    result, dst = _empty(tuple(g.view.shape), g_rows.result_dtype, g)
    target = _matrix_target(g_rows, dst)
    _launch_backward(name, g_rows, y_rows.matrix, target)
    _unrows(g_rows, target, dst)
    return _handed_back(result, g)


def _launch_backward(name: str, g_rows: _Rows, output, grad_input) -> None:
    """Backward kernel ``name`` (log_softmax or softmax) in one pass, or split as
    :func:`_launch_softmax_family` splits its rows."""
    grad_output = g_rows.matrix
    n_rows, n_classes = grad_output.shape
    segments = _segments(n_rows, n_classes)
    if segments == 1:
        _launch_rows(f"{name}_backward_rows", n_rows, n_classes, grad_output, output, grad_input)
        return
    partials = _scratch((n_rows, segments, 1), np.float64, g_rows.like)
    _launch_segments(n_classes, segments,
                     ("backward_segment_sums", (grad_output, output, name == "softmax", partials)),
                     (f"{name}_backward_segments", (grad_output, output, partials, grad_input)))


@_one_context
def log_softmax_backward(grad_output, output, axis=-1):
    return _backward("log_softmax", grad_output, output, axis)


@_one_context
def softmax_backward(grad_output, output, axis=-1):
    return _backward("softmax", grad_output, output, axis)


# --- losses ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _nothing(shape: tuple[int, ...], dtype: np.dtype):
    """An empty array that tells a loss kernel to write no gradient ``(0, 0)`` or no lse ``(0,)``."""
    return _cuda().device_array(shape, dtype)


def _unit_weight(n_classes: int, dtype: np.dtype):
    """Weights of 1 on the current GPU, made once per GPU, size and dtype."""
    return _unit_weight_on(n_classes, dtype, _cuda().get_current_device().uuid)


@functools.lru_cache(maxsize=16)
def _unit_weight_on(n_classes: int, dtype: np.dtype, device: str):
    # ``device`` (the GPU's uuid) is in the key so that a call on another GPU (made current by
    # torch.cuda.set_device, say) never reads an array that lives on the first.
    return _cuda().to_device(np.ones(n_classes, dtype))


def _weight(weight, n_classes: int, dtype: np.dtype, like: _Array, need_total: bool):
    """``(weights on the device in dtype, their sum)``; the sum (a trip to the device and back)
    only where ``need_total`` says the caller uses it, 0 otherwise."""
    if weight is None:
        return _unit_weight(n_classes, dtype), float(n_classes)
    w = _device_array(weight, "weight").view
    if tuple(w.shape) != (n_classes,):
        raise ValueError(f"weight should be a 1-D array of {n_classes} elements (one per class), "
                         f"got shape {tuple(w.shape)}")
    if w.dtype != dtype:
        w = _cast(w, dtype, like)
    return w, _device_sum(w, like) if need_total else 0.0


def _reduction_threads(n: int) -> int:
    """The one block of a reduction over ``n`` rows: its size depends on ``n`` alone, so a
    shape always sums in the same order."""
    warp = _kernels().WARP
    return min(MAX_BLOCK, max(warp, -(-n // warp) * warp))


def _sum_rows(values, divisor: float, out) -> None:
    """``out[0] = sum(values) / divisor`` on the device, in a fixed order."""
    _launch(_kernels().sum_rows, 1, _reduction_threads(values.size), values, divisor, out)


def _device_sum(values, like: _Array) -> float:
    total = _scratch((1,), np.float64, like)
    _sum_rows(values, 1.0, total)
    return float(total.copy_to_host()[0])


@dataclass
class _Loss:
    """Validated loss arguments on the device."""
    logits: _Array
    rows: _Rows
    class_axis: int
    row_shape: tuple[int, ...]
    weight: Any
    total_weight: float  # sum of the weights where asked for (label smoothing), else 0


def _loss_inputs(input, weight, axis, need_total: bool) -> _Loss:
    logits = _device_array(input, "input")
    shape = tuple(logits.view.shape)
    class_axis = _loss._class_axis(_ShapeOnly(shape, logits.view.dtype), axis)
    rows = _rows(logits, (class_axis,), "input")
    w, total = _weight(weight, shape[class_axis], rows.matrix.dtype, logits, need_total)
    return _Loss(logits, rows, class_axis, shape[:class_axis] + shape[class_axis + 1:], w, total)


@dataclass
class _ShapeOnly:
    """What the shared shape checks of :mod:`fastlsm._loss` read of an array."""
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


def _class_targets(target, loss: _Loss, ignore_index: int):
    """Flat int64 targets on the device, range-checked there, and the ``mean`` denominator."""
    t = _device_array(target, "target")
    if t.view.dtype.kind not in "iu":
        hint = (" (a float target of the input's shape holds class probabilities)"
                if t.view.dtype.kind == "f" else "")
        raise TypeError(f"target must hold integer class indices, got dtype {t.view.dtype}{hint}")
    shape = tuple(t.view.shape)
    _loss._check_target_shape(_LossShapes(loss), _ShapeOnly(shape, t.view.dtype))
    n = math.prod(shape)
    flat = t.view if len(shape) == 1 else t.view.reshape(n)
    if flat.dtype != np.int64:
        flat = _cast(flat, np.int64, loss.logits)
    k = _kernels()
    checked = _scratch((2,), np.float64, loss.logits)
    _launch(k.check_targets, 1, _reduction_threads(n), flat, loss.weight, ignore_index, checked)
    first_bad, denominator = checked.copy_to_host()
    if first_bad < n:
        bad = int(first_bad)
        value = int(flat[bad:bad + 1].copy_to_host()[0])
        position = [int(k) for k in np.unravel_index(bad, shape)] if shape else []
        raise IndexError(f"Target {value} is out of bounds. (target{position} with "
                         f"{loss.rows.classes} classes)")
    return flat, float(denominator)


@dataclass
class _LossShapes:
    """The view of a :class:`_Loss` that ``fastlsm._loss._check_target_shape`` reads."""
    loss: _Loss

    @property
    def array(self):
        return _ShapeOnly(tuple(self.loss.logits.view.shape), self.loss.logits.view.dtype)

    @property
    def class_axis(self):
        return self.loss.class_axis

    @property
    def row_shape(self):
        return self.loss.row_shape


def _grad_target(loss: _Loss, want_grad: bool, grad_out):
    """``(result, dst, target)`` for the gradient, or Nones and a ``(0, 0)`` target."""
    rows = loss.rows
    if not want_grad:
        return None, None, _nothing((0, 0), rows.matrix.dtype)
    shape = tuple(loss.logits.view.shape)
    if grad_out is None:
        result, dst = _empty(shape, rows.result_dtype, loss.logits)
    else:
        result, dst = grad_out, _out_view(grad_out, shape, rows.result_dtype, loss.logits,
                                          "grad_out")
    return result, dst, _matrix_target(rows, dst)


def _reduced(per_row, reduction: str, denominator: float, loss: _Loss):
    """The per-row float64 losses reduced on the device, in the result dtype."""
    dtype = loss.rows.result_dtype
    if reduction == "none":
        result, dst = _empty(loss.row_shape, dtype, loss.logits)
        _cast_into(per_row, dst)
        return result
    result, dst = _empty((), dtype, loss.logits)
    divisor = denominator if reduction == "mean" else 1.0
    _sum_rows(per_row, divisor, dst.reshape(1))
    return result


def _finish(loss: _Loss, value, grad, grad_out, lse):
    """``value``, then the gradient and the log-sum-exps where asked for, as the caller gets them."""
    like = loss.logits
    results = [_handed_back(value, like)]
    if grad is not None:
        result, dst, target = grad
        _unrows(loss.rows, target, dst)
        results.append(_handed_back(result, like) if grad_out is None
                       else _deliver(dst, grad_out, like))
    if lse is not None:
        lse_result, dst = _empty(loss.row_shape, loss.rows.result_dtype, like)
        _cast_into(lse, dst)
        results.append(_handed_back(lse_result, like))
    return results[0] if len(results) == 1 else tuple(results)


@_one_context
def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, *, axis=1, return_grad=False, grad_out=None, z_loss=0.0,
                  return_lse=False):
    ignore_index, label_smoothing, z_loss = _loss._check_options(ignore_index, reduction,
                                                                 label_smoothing, z_loss)
    loss = _loss_inputs(input, weight, axis, need_total=label_smoothing > 0.0)
    rows = loss.rows
    n_rows = rows.matrix.shape[0]
    per_row = _scratch((n_rows,), np.float64, loss.logits)
    lse = (_scratch((n_rows,), rows.matrix.dtype, loss.logits) if return_lse
           else _nothing((0,), rows.matrix.dtype))
    target_shape = tuple(target.shape) if hasattr(target, "shape") else np.shape(target)
    want_grad = return_grad or grad_out is not None
    if target_shape == tuple(loss.logits.view.shape) and loss.logits.view.ndim > 0:
        probs = _device_array(target, "target")
        _loss.check_probability_target(probs.view.dtype, ignore_index)
        if probs.view.dtype != rows.matrix.dtype:
            probs.view = _cast(probs.view, rows.matrix.dtype, loss.logits)
        y = _rows(probs, (loss.class_axis,), "target").matrix
        denominator = float(n_rows)
        grad = _grad_target(loss, want_grad, grad_out)
        args = (loss.weight, label_smoothing, z_loss, _loss._scale(reduction, denominator))
        _launch_cross_entropy_probs(rows, y, args, per_row, lse, grad[2])
    else:
        flat, denominator = _class_targets(target, loss, ignore_index)
        grad = _grad_target(loss, want_grad, grad_out)
        args = (loss.weight, loss.total_weight, ignore_index, label_smoothing, z_loss,
                _loss._scale(reduction, denominator))
        _launch_cross_entropy(rows, flat, args, per_row, lse, grad[2])
    value = _reduced(per_row, reduction, denominator, loss)
    return _finish(loss, value, grad if want_grad else None, grad_out,
                   lse if return_lse else None)


def _launch_cross_entropy(rows: _Rows, target, args: tuple, per_row, lse, grad) -> None:
    """The class-index loss kernel over ``rows``, or its split form where the rows are long and
    few (as :func:`_launch_softmax_family`).  ``args``: weight, total weight, ignore_index,
    label_smoothing, z_loss and the gradient's scale."""
    matrix = rows.matrix
    n_rows, n_classes = matrix.shape
    segments = _segments(n_rows, n_classes)
    if segments == 1:
        _launch_rows("cross_entropy_rows", n_rows, n_classes, matrix, target, *args, per_row, lse,
                     grad)
        return
    partials = _scratch((n_rows, segments, _kernels().CROSS_ENTROPY_PARTIALS), np.float64,
                        rows.like)
    weight, smoothing = args[0], args[3]
    _launch_segments(n_classes, segments,
                     ("cross_entropy_segment_stats", (matrix, target, weight, smoothing, partials)),
                     ("cross_entropy_segments", (matrix, target, *args, partials, per_row, lse,
                                                 grad)))


def _launch_cross_entropy_probs(rows: _Rows, y, args: tuple, per_row, lse, grad) -> None:
    """The probability-target loss kernel, or its split form (as :func:`_launch_cross_entropy`).
    ``args``: weight, label_smoothing, z_loss and the gradient's scale."""
    matrix = rows.matrix
    n_rows, n_classes = matrix.shape
    segments = _segments(n_rows, n_classes)
    if segments == 1:
        _launch_rows("cross_entropy_probs_rows", n_rows, n_classes, matrix, y, *args, per_row,
                     lse, grad)
        return
    partials = _scratch((n_rows, segments, _kernels().PROBABILITY_PARTIALS), np.float64,
                        rows.like)
    weight, smoothing = args[0], args[1]
    _launch_segments(n_classes, segments,
                     ("cross_entropy_probs_segment_stats", (matrix, y, weight, smoothing,
                                                            partials)),
                     ("cross_entropy_probs_segments", (matrix, y, *args, partials, per_row, lse,
                                                       grad)))


@_one_context
def nll_loss(input, target, weight=None, ignore_index=-100, reduction="mean", *, axis=1,
             return_grad=False, grad_out=None):
    ignore_index = _loss._check_options(ignore_index, reduction, 0.0, 0.0)[0]
    loss = _loss_inputs(input, weight, axis, need_total=False)
    rows = loss.rows
    flat, denominator = _class_targets(target, loss, ignore_index)
    want_grad = return_grad or grad_out is not None
    grad = _grad_target(loss, want_grad, grad_out)
    per_row = _scratch((rows.matrix.shape[0],), np.float64, loss.logits)
    _launch_rows("nll_loss_rows", rows.matrix.shape[0], rows.classes, rows.matrix, flat,
                 loss.weight, ignore_index, _loss._scale(reduction, denominator), per_row,
                 grad[2])
    value = _reduced(per_row, reduction, denominator, loss)
    return _finish(loss, value, grad if want_grad else None, grad_out, None)
