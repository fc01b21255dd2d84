"""The one validation layer: every check of fastlsm's arguments and every user-facing error
message, written once for every backend.

A public function hands its arguments to a builder here (:func:`rowwise`, :func:`backward`,
:func:`loss`), which checks them and returns a backend-neutral *spec*: shapes, dtypes, axes,
options and what to return, with each array argument described as an :class:`Argument` (its
data, shape, dtype and where it lives).  Only then is a backend chosen
(:mod:`fastlsm.backends.base`); backends read specs and never check arguments again, except for
what only the data can tell (a class index out of range: :func:`target_out_of_bounds` is its
message) and what a backend cannot do (its ``supports``).

Nothing here imports Numba, CUDA or Dask: a device or Dask array is recognised by its type, and
described by its ``shape`` and ``dtype`` attributes, without touching its data.
"""

from __future__ import annotations

import math
import numbers
import operator
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

NATIVE_FLOATS = frozenset({np.dtype(np.float32), np.dtype(np.float64)})
_FLOAT_COMPUTE = {np.dtype(np.float16): np.dtype(np.float32)}
REDUCTIONS = ("none", "mean", "sum")
INT64_MIN, INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)


# --- where an array lives ----------------------------------------------------------------------

HOST, CUDA, DASK = "host", "cuda", "dask"


def is_cuda_array(x) -> bool:
    """``x`` lives on an NVIDIA GPU (checked without importing or initialising CUDA)."""
    if type(x).__module__.startswith("torch"):
        return bool(getattr(x, "is_cuda", False))  # its interface raises for tensors with grad
    if hasattr(x, "__cuda_array_interface__"):
        return True
    # The CUDA simulator's device arrays carry no interface; they exist only once it is loaded.
    simulator = sys.modules.get("numba.cuda.simulator.cudadrv.devicearray")
    return simulator is not None and isinstance(x, simulator.FakeCUDAArray)


def is_dask_array(x) -> bool:
    """``x`` is a ``dask.array.Array`` (checked without importing Dask: an array can only be one
    once ``dask.array`` is imported)."""
    dask_array = sys.modules.get("dask.array")
    return (dask_array is not None and type(x).__module__.startswith("dask")
            and isinstance(x, dask_array.Array))


def placement(x) -> str:
    """Where ``x``'s data lives: :data:`DASK`, :data:`CUDA` or :data:`HOST` (anything else)."""
    if type(x) is np.ndarray:
        return HOST
    if is_dask_array(x):
        return DASK
    return CUDA if is_cuda_array(x) else HOST


# --- dtypes ------------------------------------------------------------------------------------

def is_bfloat16(dtype: np.dtype) -> bool:
    """``ml_dtypes.bfloat16``, known by its name: fastlsm never imports ml_dtypes."""
    return dtype.kind == "V" and dtype.name == "bfloat16"


def result_dtype(dtype: np.dtype, name: str) -> np.dtype:
    """SciPy's rule: floats keep their dtype (bfloat16 too), integers and bool become float64."""
    if dtype in NATIVE_FLOATS or is_bfloat16(dtype):
        return dtype
    if dtype.kind in "biu":
        return np.dtype(np.float64)
    if dtype.kind == "f":
        native = dtype.newbyteorder("=")
        if native in NATIVE_FLOATS or native in _FLOAT_COMPUTE:
            return native  # float16, or a non-native byte order: results are native
        # long double, or a float8 of ml_dtypes that calls itself a float
        raise TypeError(f"{name} has dtype {dtype}, which fastlsm does not support; cast it "
                        f"to {'float64' if dtype.itemsize > 8 else 'float32'} first")
    raise TypeError(f"{name} must be a real numeric array, got dtype {dtype}")


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """float16 and bfloat16 are computed in float32; every other result dtype as itself."""
    if dtype in NATIVE_FLOATS:
        return dtype
    return np.dtype(np.float32) if is_bfloat16(dtype) else _FLOAT_COMPUTE.get(dtype, dtype)


def _numpy_dtype(dtype) -> np.dtype:
    """A device array's dtype as NumPy names it (PyTorch's ``torch.float32`` is ``float32``)."""
    if isinstance(dtype, np.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name == "bfloat16":
        return _bfloat16()
    try:
        return np.dtype(name)
    except TypeError:
        raise TypeError(f"fastlsm does not support arrays of dtype {dtype}") from None


def _bfloat16() -> np.dtype:
    """NumPy's name for a bfloat16 tensor's dtype, ml_dtypes' (imported for such a tensor only)."""
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError("bfloat16 tensors need ml_dtypes, which gives NumPy the bfloat16 dtype "
                        "that fastlsm's results are described by: pip install ml-dtypes") from None
    return np.dtype(ml_dtypes.bfloat16)


def as_real_array(x, name: str) -> np.ndarray:
    """``x`` as a NumPy array of a real dtype (no copy for an ndarray).

    A subclass of ``ndarray`` is read as its base array: a masked array's mask is ignored, as
    SciPy's functions ignore it, and the result is a plain ``ndarray``.
    """
    array = x if type(x) is np.ndarray else as_array(x, name)
    result_dtype(array.dtype, name)
    return array


def as_array(x, name: str) -> np.ndarray:
    """``np.asarray(x)``, or a ``TypeError`` naming the argument: a ragged list's ValueError,
    or the RuntimeError of a PyTorch tensor that requires grad."""
    try:
        return np.asarray(x)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise TypeError(f"{name} could not be converted to an array: {exc}") from None


# --- arguments ---------------------------------------------------------------------------------

@dataclass(slots=True)
class Argument:
    """An array argument, described: its data, shape, dtype and where the data lives.

    ``data`` is a NumPy array for host data (array-likes are converted), else the caller's
    own device or Dask array, untouched.
    """
    data: Any
    shape: tuple[int, ...]
    dtype: np.dtype
    placement: str

    @property
    def ndim(self) -> int:
        return len(self.shape)


def describe(x, name: str, within: str, *, real: bool = True) -> Argument:
    """``x`` as an :class:`Argument` of a call whose first array lives ``within`` a placement.

    Beside host data everything is host data (converted with NumPy); beside device or Dask data,
    arrays of that kind are used as they are and the others converted with NumPy (the backend
    moves them).  ``real`` requires a real numeric dtype (:func:`result_dtype`'s errors).
    """
    where = HOST if within == HOST else placement(x)
    if where != within:
        where = HOST
    if where == HOST:
        array = as_real_array(x, name) if real else as_array(x, name)
        return Argument(array, array.shape, array.dtype, HOST)
    dtype = _numpy_dtype(x.dtype)
    if real:
        result_dtype(dtype, name)
    if any(n != n for n in x.shape):  # nan: a Dask array's unknown chunk sizes
        raise ValueError(f"{name} has unknown chunk sizes (shape {x.shape}), as after boolean "
                         f"indexing; call {name}.compute_chunk_sizes() first")
    return Argument(x, tuple(int(n) for n in x.shape), dtype, where)


def check_out(out, shape: tuple[int, ...], dtype: np.dtype, within: str,
              name: str = "out") -> None:
    """``out`` can take a result of ``shape`` and ``dtype`` for a call on data ``within``."""
    if within == DASK:
        raise TypeError(f"{name}= is not supported for Dask arrays: the result is a lazy Dask "
                        "array, computed when asked; leave it out and store or compute the result")
    if within == HOST:
        if not isinstance(out, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
        out_shape, out_dtype = out.shape, out.dtype
    else:
        if not is_cuda_array(out):
            raise TypeError(f"{name} must be a device array for device input, got "
                            f"{type(out).__name__}")
        out_shape, out_dtype = tuple(int(n) for n in out.shape), _numpy_dtype(out.dtype)
    if out_shape != shape:
        raise ValueError(f"{name} has shape {out_shape}, expected {shape}")
    if out_dtype != dtype:
        raise ValueError(f"{name} has dtype {out_dtype}, expected {dtype}")
    if within == HOST and not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    if within == HOST and _internal_overlap(out):
        raise ValueError(f"{name} has elements that share memory (a stride of 0, or rows that "
                         "overlap), so results would overwrite each other; pass an array "
                         "without overlap")


def _internal_overlap(a: np.ndarray) -> bool:
    """Whether two elements of ``a`` may share memory.

    Axes sorted by stride: each stride must step past everything the smaller ones span.  That
    clears every layout NumPy makes (any transpose, slice or broadcast-free view); an exotic
    interleaving it cannot clear is refused, never written wrongly.
    """
    span = a.itemsize
    for stride, n in sorted((abs(st), n) for st, n in zip(a.strides, a.shape) if n > 1):
        if stride < span:
            return True
        span = stride * (n - 1) + span
    return False


def shares_memory(a, b) -> bool:
    """Whether arrays ``a`` and ``b`` may hold the same memory: exactly for NumPy arrays, by
    the address ranges of device arrays (``__cuda_array_interface__``); never across the two."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return np.may_share_memory(a, b) and np.shares_memory(a, b)
    if is_cuda_array(a) and is_cuda_array(b):
        (a_start, a_end), (b_start, b_end) = _device_range(a), _device_range(b)
        return a_start < b_end and b_start < a_end
    return False


def same_device_elements(a, b) -> bool:
    """Whether device arrays ``a`` and ``b`` are views of the very same elements, in the same
    order (an output that is its input): address, shape and strides alike."""
    return _device_layout(a) == _device_layout(b)


def _device_layout(a) -> tuple[int, tuple[int, ...], tuple[int, ...], int]:
    """A device array's ``(start address, shape, strides in bytes, itemsize)``."""
    if type(a).__module__.startswith("torch"):
        # Its interface raises for a tensor that requires grad.
        shape, itemsize = tuple(a.shape), a.element_size()
        return a.data_ptr(), shape, tuple(st * itemsize for st in a.stride()), itemsize
    # The CUDA simulator's arrays hold a NumPy array, with NumPy's interface.
    face = (a.__cuda_array_interface__ if hasattr(a, "__cuda_array_interface__")
            else a._ary.__array_interface__)
    shape, itemsize = tuple(face["shape"]), np.dtype(face["typestr"]).itemsize
    strides = tuple(face.get("strides") or _c_strides(shape, itemsize))
    return face["data"][0], shape, strides, itemsize


def _device_range(a) -> tuple[int, int]:
    """The addresses ``[start, end)`` a device array's elements span."""
    start, shape, strides, itemsize = _device_layout(a)
    if 0 in shape:
        return start, start
    low = sum(st * (n - 1) for st, n in zip(strides, shape) if st < 0)
    high = sum(st * (n - 1) for st, n in zip(strides, shape) if st > 0)
    return start + low, start + high + itemsize


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def not_c_contiguous(name: str) -> ValueError:
    """A device array a backend must read or write in place is not C-ordered."""
    return ValueError(f"{name} is a device array that is not C-contiguous; fastlsm reads device "
                      "arrays in place and needs C order (make a contiguous copy first)")


# --- axes --------------------------------------------------------------------------------------

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
            if type(item) is bool:  # an int to Python, refused by NumPy: axis=False is no axis 0
                raise TypeError
            index = operator.index(item)
        except TypeError:
            raise TypeError(f"{name} must be an int, a tuple of ints or None, got {axis!r}") from None
        if not -n <= index < n:
            raise np.exceptions.AxisError(index, n)
        axes.append(index % n)
    if len(set(axes)) != len(axes):
        raise ValueError(f"repeated axis in {name}={axis!r}")
    return tuple(sorted(axes))


def reduced_shape(shape: tuple[int, ...], axes: tuple[int, ...], keepdims: bool):
    """The shape of a reduction of ``shape`` over ``axes``."""
    if keepdims:
        return tuple(1 if i in axes else n for i, n in enumerate(shape))
    return tuple(n for i, n in enumerate(shape) if i not in axes)


# --- the common call -----------------------------------------------------------------------------

def plain_rows(x, axis) -> bool:
    """The common call: a non-empty C-ordered float32/float64 array, rows along the last axis.

    Callers hand such an ``x`` straight to the CPU's kernels, skipping the general argument
    handling, which costs 3-6 us a call here: more than the whole fast call (~2-3 us) on a
    (1, 10) array.
    """
    return (type(x) is np.ndarray and x.dtype in NATIVE_FLOATS and x.ndim > 0 and x.size > 0
            and type(axis) is int and (axis == -1 or axis == x.ndim - 1) and x.flags.c_contiguous)


def plain_out(x: np.ndarray, out) -> bool:
    """For a :func:`plain_rows` ``x``: ``out`` is None, ``x`` itself, or a C-ordered writeable
    array of ``x``'s shape and dtype apart from it, so the kernel can write it directly."""
    return out is None or (
        type(out) is np.ndarray and out.dtype == x.dtype and out.shape == x.shape
        and out.flags.c_contiguous and out.flags.writeable
        and (out is x or not np.may_share_memory(out, x)))


def plain_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, axis,
                        grad_out, z_loss, return_lse) -> bool:
    """The common loss call: :func:`plain_rows` ``(N, C)`` logits, C-ordered ``(N,)`` int64
    targets, no weights, no smoothing, z-loss or log-sum-exps, valid options, and a ``grad_out``
    that is None, the input itself or a :func:`plain_out` apart from the targets."""
    return (weight is None and not return_lse and type(axis) is int
            and axis in (1, -1) and plain_rows(input, -1) and input.ndim == 2
            and type(target) is np.ndarray and target.dtype == np.int64
            and target.shape == input.shape[:1] and target.flags.c_contiguous
            and type(ignore_index) is int and INT64_MIN <= ignore_index <= INT64_MAX
            and reduction in REDUCTIONS and type(label_smoothing) in (int, float)
            and label_smoothing == 0 and type(z_loss) in (int, float) and z_loss == 0
            and (grad_out is None or (plain_out(input, grad_out)
                                      and not np.may_share_memory(grad_out, target))))


# --- log_softmax, softmax, logsumexp -----------------------------------------------------------

@dataclass(slots=True)
class Rowwise:
    """log_softmax or softmax (``shape`` is the input's) or logsumexp (the reduced shape) of
    ``x`` along ``axes``."""
    x: Argument
    axes: tuple[int, ...]
    result_dtype: np.dtype
    compute_dtype: np.dtype
    shape: tuple[int, ...]   # the result's
    out: Any                 # None, or an array checked to take the result
    keepdims: bool = False


def rowwise(x, axis, out, *, reduce: bool = False, keepdims: bool = False) -> Rowwise:
    """The spec of ``log_softmax``/``softmax`` (``reduce=False``) or ``logsumexp``."""
    arg = describe(x, "x", placement(x))
    axes = normalize_axes(axis, arg.ndim)
    dtype = result_dtype(arg.dtype, "x")
    shape = reduced_shape(arg.shape, axes, keepdims) if reduce else arg.shape
    if out is not None:
        check_out(out, shape, dtype, arg.placement)
    return Rowwise(arg, axes, dtype, compute_dtype(dtype), shape, out, keepdims)


@dataclass(slots=True)
class Backward:
    """A backward pass: ``grad_output`` and ``output`` of one shape, computed in ``dtype``."""
    grad_output: Argument
    output: Argument
    axes: tuple[int, ...]
    result_dtype: np.dtype
    compute_dtype: np.dtype


def backward(grad_output, output, axis) -> Backward:
    """The spec of ``log_softmax_backward``/``softmax_backward``."""
    within = placement(grad_output)
    g = describe(grad_output, "grad_output", within)
    y = describe(output, "output", within)
    if g.shape != y.shape:
        raise ValueError(f"grad_output has shape {g.shape} but output has shape {y.shape}; "
                         "they must match")
    g_dtype, y_dtype = result_dtype(g.dtype, "grad_output"), result_dtype(y.dtype, "output")
    dtype = g_dtype if g_dtype == y_dtype else np.result_type(g_dtype, y_dtype)  # ~1 us less
    return Backward(g, y, normalize_axes(axis, g.ndim), dtype, compute_dtype(dtype))


# --- cross_entropy and nll_loss ----------------------------------------------------------------

@dataclass(slots=True)
class Loss:
    """``cross_entropy`` or ``nll_loss``: logits (or log-probabilities) with classes on
    ``class_axis``, class-index or probability targets, and what to return."""
    input: Argument
    class_axis: int
    target: Argument
    probabilities: bool      # the target holds class probabilities (it has the input's shape)
    weight: Argument | None  # (classes,)
    ignore_index: int
    reduction: str
    label_smoothing: float
    z_loss: float
    softcap: float           # 0: none; else the loss is taken on softcap * tanh(input / softcap)
    want_grad: bool
    grad_out: Any            # None, or an array checked to take the gradient
    return_lse: bool
    result_dtype: np.dtype
    compute_dtype: np.dtype
    # The loss's dtype as returned: the result dtype, or float64 for a Dask block's per-row
    # losses (and a chunk's), which are summed before the call rounds once.
    loss_dtype: np.dtype
    # The caller's gradient w.r.t. the returned loss (``grad_loss``): a number for a reduced
    # loss, or per element (the row shape) for ``none``, where ``grad_scale`` stays 1.
    grad_scale: float = 1.0
    grad_loss: Argument | None = None

    @property
    def n_classes(self) -> int:
        return self.input.shape[self.class_axis]

    @property
    def row_shape(self) -> tuple[int, ...]:
        """The input's shape without the class axis: one loss per element."""
        return _without_axis(self.input.shape, self.class_axis)

    @property
    def n_rows(self) -> int:
        return math.prod(self.row_shape)

    @property
    def probability_rows(self) -> float:
        """The ``mean`` denominator of probability targets: the number of rows (PyTorch's
        ``numel / C``), nan for an empty input, whose ``mean`` PyTorch fills with nan even where
        its rows have no classes and a ``sum`` of them is 0."""
        return float(self.n_rows) if math.prod(self.input.shape) else math.nan


def _options(ignore_index, reduction, label_smoothing, z_loss,
             softcap) -> tuple[int, float, float, float]:
    try:
        ignore_index = operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}") from None
    if not INT64_MIN <= ignore_index <= INT64_MAX:
        raise ValueError(f"ignore_index must fit in int64 (as in PyTorch), got {ignore_index}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    label_smoothing = _real(label_smoothing, "label_smoothing")
    if label_smoothing > 1.0:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if not label_smoothing > 0.0:
        label_smoothing = 0.0  # PyTorch's check is `> 1` only: a negative or nan eps is none
    z_loss = _real(z_loss, "z_loss")
    if not z_loss >= 0.0:
        raise ValueError(f"z_loss must be a non-negative number, got {z_loss}")
    if softcap is None:
        return ignore_index, label_smoothing, z_loss, 0.0
    softcap = _real(softcap, "softcap")
    if not 0.0 < softcap < math.inf:
        raise ValueError(f"softcap must be a positive finite number (or None for none), got "
                         f"{softcap}")
    return ignore_index, label_smoothing, z_loss, softcap


def _real(value, name: str) -> float:
    """A real-number option as a float; anything else (a string, None) is PyTorch's TypeError."""
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)


def _class_axis(shape: tuple[int, ...], axis) -> int:
    ndim = len(shape)
    if ndim == 0:
        raise ValueError("input must have at least 1 dimension (the classes), got a 0-d array")
    if type(axis) is bool:  # an int to Python, refused by NumPy (as normalize_axes)
        raise TypeError(f"axis must be an int, got {axis!r}")
    if ndim == 1 and axis == 1:
        return 0  # PyTorch: a 1-D input is a single row of classes
    if type(axis) is int and 0 <= axis < ndim:
        return axis
    try:
        index = operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an int, got {axis!r}") from None
    return normalize_axes(index, ndim)[0]


def _check_target_shape(input_shape: tuple[int, ...], class_axis: int,
                        target_shape: tuple[int, ...]) -> None:
    expected = _without_axis(input_shape, class_axis)
    if target_shape == expected:
        return
    if len(input_shape) == 1:
        raise ValueError(f"a 1-D input (one row of classes) needs a 0-d target, got shape "
                         f"{target_shape}")
    batch = 1 if class_axis == 0 else 0
    if target_shape and target_shape[0] != input_shape[batch]:
        raise ValueError(f"Expected input batch_size ({input_shape[batch]}) to match target "
                         f"batch_size ({target_shape[0]}).")
    raise ValueError(f"target has shape {target_shape}, but input of shape {input_shape} with "
                     f"classes on axis {class_axis} needs a target of shape {expected}")


def _check_class_index_dtype(dtype: np.dtype) -> None:
    if dtype.kind not in "iu":
        hint = (" (a float target of the input's shape holds class probabilities)"
                if dtype.kind == "f" else "")
        raise TypeError(f"target must hold integer class indices, got dtype {dtype}{hint}")


def _check_probability_target(dtype: np.dtype, ignore_index: int) -> None:
    """PyTorch's two refusals for a target of class probabilities (the input's shape)."""
    if dtype.kind != "f" and not is_bfloat16(dtype):
        raise TypeError("Expected floating point type for target with class probabilities, "
                        f"got {dtype}")
    if ignore_index >= 0:
        raise ValueError("ignore_index is not supported for floating point target")


def loss(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, axis,
         want_grad, grad_out, return_lse, *, probabilities_allowed: bool = True,
         grad_loss=None, softcap=None, loss_dtype: np.dtype | None = None) -> Loss:
    """The spec of ``cross_entropy`` (or, with ``probabilities_allowed=False``, no smoothing,
    no z-loss and no soft-capping, ``nll_loss``)."""
    ignore_index, label_smoothing, z_loss, softcap = _options(
        ignore_index, reduction, label_smoothing, z_loss, softcap)
    within = placement(input)
    logits = describe(input, "input", within)
    class_axis = _class_axis(logits.shape, axis)
    dtype = result_dtype(logits.dtype, "input")
    want_grad = bool(want_grad) or grad_out is not None
    if grad_out is not None:
        check_out(grad_out, logits.shape, dtype, within, "grad_out")
    n_classes = logits.shape[class_axis]
    w = None
    if weight is not None:
        w = describe(weight, "weight", within)
        if w.shape != (n_classes,):
            raise ValueError(f"weight should be a 1-D array of {n_classes} elements (one per "
                             f"class), got shape {w.shape}")
    t = describe(target, "target", within, real=False)
    probabilities = probabilities_allowed and t.shape == logits.shape
    if probabilities:
        _check_probability_target(t.dtype, ignore_index)
    else:
        _check_target_shape(logits.shape, class_axis, t.shape)
        _check_class_index_dtype(t.dtype)
    grad_scale, grad_loss = _grad_loss(grad_loss, want_grad, reduction,
                                       _without_axis(logits.shape, class_axis), within)
    if grad_out is not None:
        for name, other in (("target", t), ("weight", w), ("grad_loss", grad_loss)):
            if other is not None and shares_memory(grad_out, other.data):
                raise ValueError(f"grad_out shares memory with {name}, which the gradient would "
                                 f"overwrite before it is read; pass a grad_out apart from {name}")
    return Loss(logits, class_axis, t, probabilities, w, ignore_index, reduction,
                label_smoothing, z_loss, softcap, want_grad, grad_out, bool(return_lse), dtype,
                compute_dtype(dtype), dtype if loss_dtype is None else np.dtype(loss_dtype),
                grad_scale, grad_loss)


def _without_axis(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    return shape[:axis] + shape[axis + 1:]


def _grad_loss(grad_loss, want_grad: bool, reduction: str, row_shape: tuple[int, ...],
               within: str) -> tuple[float, Argument | None]:
    """``(grad_scale, grad_loss)`` of :class:`Loss`: ``grad_loss`` checked against the loss it
    is the gradient of."""
    if grad_loss is None:
        return 1.0, None
    if not want_grad:
        raise ValueError("grad_loss is the gradient of the loss for the returned gradient: it "
                         "needs return_grad=True or grad_out")
    if reduction != "none":
        if not isinstance(grad_loss, numbers.Real) and not (
                isinstance(grad_loss, np.ndarray) and grad_loss.ndim == 0
                and grad_loss.dtype.kind in "iuf"):
            raise TypeError(f"grad_loss must be a real number for reduction={reduction!r} "
                            f"(the loss is a scalar), got {grad_loss!r}")
        return float(grad_loss), None
    g = describe(grad_loss, "grad_loss", within)
    if g.shape != row_shape:
        raise ValueError(f"grad_loss has shape {g.shape}, expected {row_shape} (the "
                         "shape of the loss with reduction='none')")
    return 1.0, g


def target_out_of_bounds(value: int, position: tuple[int, ...], n_classes: int) -> IndexError:
    """A class-index target outside ``[0, C)`` that is not ``ignore_index``, at ``position``
    (its index in the target array)."""
    where = [int(k) for k in position]
    return IndexError(f"Target {int(value)} is out of bounds. (target{where} with {n_classes} "
                      "classes)")


# --- linear_cross_entropy ------------------------------------------------------------------------

@dataclass(slots=True)
class LinearLoss:
    """``linear_cross_entropy``: the head ``input @ linear_weight.T + linear_bias`` and the loss
    of its logits, checked by :func:`loss` on a stand-in of the logits' shape (classes last)
    that owns no memory: a zero-stride NumPy array, PyTorch tensor or CuPy array, or a lazy
    Dask array chunked as the rows."""
    input: Argument             # (..., H)
    linear_weight: Argument     # (C, H)
    linear_bias: Argument | None
    loss: Loss
    chunk_bytes: int | None     # the size of one chunk's logits; None: the backend's default
    result_dtype: np.dtype      # the head's dtypes promoted, as NumPy's ``@`` would
    compute_dtype: np.dtype

    @property
    def n_classes(self) -> int:
        return self.linear_weight.shape[0]


def linear_loss(input, linear_weight, target, linear_bias, weight, ignore_index, reduction,
                label_smoothing, z_loss, softcap, want_grad, grad_loss,
                chunk_bytes) -> LinearLoss:
    """The spec of ``linear_cross_entropy``: shapes (errors naming both), dtypes, where the
    arrays live, the chunk size, then the loss's options and targets as ``cross_entropy``'s."""
    within = placement(input)
    x = describe(input, "input", within)
    w = describe(linear_weight, "linear_weight", within)
    b = None if linear_bias is None else describe(linear_bias, "linear_bias", within)
    for name, arg in (("linear_weight", w), ("linear_bias", b)):
        if arg is not None and arg.placement == DASK:
            raise TypeError(f"linear_cross_entropy takes {name} as a NumPy array (every block "
                            "of rows reads all of it), got a Dask array; compute it first")
    if x.ndim == 0:
        raise ValueError("input must have at least 1 dimension (the features), got a 0-d array")
    if w.ndim != 2:
        raise ValueError(f"linear_weight must be 2-D, (classes, features) as in "
                         f"torch.nn.Linear, got shape {w.shape}")
    if w.shape[1] != x.shape[-1]:
        raise ValueError(f"input of shape {x.shape} has {x.shape[-1]} features, but "
                         f"linear_weight of shape {w.shape} takes {w.shape[1]}")
    if b is not None and b.shape != (w.shape[0],):
        raise ValueError(f"linear_bias must have shape ({w.shape[0]},), one per class of "
                         f"linear_weight {w.shape}, got {b.shape}")
    dtype = result_dtype(np.result_type(*[a.dtype for a in (x, w, b) if a is not None]),
                         "input")
    rows, classes = x.shape[:-1], w.shape[0]
    target_shape = describe(target, "target", within, real=False).shape
    if target_shape not in (rows, rows + (classes,)):
        raise ValueError(f"target has shape {target_shape}, but input of shape {x.shape} and "
                         f"linear_weight of shape {w.shape} need class indices of shape {rows} "
                         f"or probabilities of shape {rows + (classes,)}")
    logits = _logits_stand_in(x, classes, dtype)
    spec = loss(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, -1,
                want_grad, None, False, grad_loss=grad_loss, softcap=softcap)
    return LinearLoss(x, w, b, spec, _chunk_bytes(chunk_bytes), dtype, compute_dtype(dtype))


def _logits_stand_in(x: Argument, classes: int, dtype: np.dtype):
    """An array of the logits' shape and dtype, where the input lives, that owns one element:
    what the loss's checks read (shape, dtype, placement) without the logits existing."""
    shape = x.shape[:-1] + (classes,)
    if x.placement == DASK:
        import dask.array as da
        return da.zeros(shape, dtype=dtype, chunks=x.data.chunks[:-1] + ((classes,),))
    if x.placement == CUDA:
        module = type(x.data).__module__
        if module.startswith("torch"):
            import torch
            zero = torch.zeros((), dtype=getattr(torch, dtype.name), device=x.data.device)
            return zero.expand(shape)
        if module.startswith("cupy"):
            import cupy
            return cupy.broadcast_to(cupy.zeros((), dtype), shape)
        raise TypeError(f"linear_cross_entropy on a CUDA device takes CuPy arrays or PyTorch "
                        f"tensors, whose library does the matmuls; input is a "
                        f"{type(x.data).__name__}")
    return np.broadcast_to(np.zeros((), dtype), shape)


def _chunk_bytes(chunk_bytes) -> int | None:
    if chunk_bytes is None:
        return None
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, (int, np.integer)):
        raise TypeError(f"chunk_bytes must be an int (bytes), got {chunk_bytes!r}")
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    return int(chunk_bytes)
