"""cross_entropy and nll_loss with PyTorch's semantics (the public API)."""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from fastlsm import _devices
from fastlsm import _dispatch as d

_REDUCTIONS = ("none", "mean", "sum")
_INT64_MIN, _INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)


@dataclass
class _Logits:
    """Validated logits and their class weights; :attr:`rows` sees them as ``(rows, classes)``."""
    array: np.ndarray
    class_axis: int
    row_shape: tuple[int, ...]  # the input's shape without the class axis: one loss per element
    weight: np.ndarray          # (classes,), compute dtype
    total_weight: float         # sum(weight) in float64
    result_dtype: np.dtype

    @property
    def n_classes(self) -> int:
        return self.array.shape[self.class_axis]

    @functools.cached_property
    def rows(self) -> d.Rows:
        # Only once every argument is validated: a transposed layout is copied by a kernel.
        array = self.array
        if array.ndim == 2 and self.class_axis == 1 and d.plain_rows(array, 1):
            return d.Rows(array, (1,), array.dtype, array.dtype, array)  # ~3 us less a call
        return d.to_rows(array, (self.class_axis,), "input")



def _class_axis(array: np.ndarray, axis) -> int:
    if array.ndim == 0:
        raise ValueError("input must have at least 1 dimension (the classes), got a 0-d array")
    if array.ndim == 1 and axis == 1:
        return 0  # PyTorch: a 1-D input is a single row of classes
    if type(axis) is int and 0 <= axis < array.ndim:
        return axis
    try:
        index = operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an int, got {axis!r}") from None
    return d.normalize_axes(index, array.ndim)[0]


def _check_options(ignore_index: int, reduction: str, label_smoothing: float,
                   z_loss: float) -> tuple[int, float, float]:
    try:
        ignore_index = operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}") from None
    if not _INT64_MIN <= ignore_index <= _INT64_MAX:
        raise ValueError(f"ignore_index must fit in int64 (as in PyTorch), got {ignore_index}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    label_smoothing = float(label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    z_loss = float(z_loss)
    if not z_loss >= 0.0:
        raise ValueError(f"z_loss must be a non-negative number, got {z_loss}")
    return ignore_index, label_smoothing, z_loss


def check_probability_target(dtype: np.dtype, ignore_index: int) -> None:
    """PyTorch's two refusals for a target of class probabilities (the input's shape)."""
    if dtype.kind != "f":
        raise TypeError("Expected floating point type for target with class probabilities, "
                        f"got {dtype}")
    if ignore_index >= 0:
        raise ValueError("ignore_index is not supported for floating point target")


@functools.lru_cache(maxsize=64)
def _unit_weight(n_classes: int, dtype: np.dtype) -> np.ndarray:
    # Shared by every call without weights; kernels only read it.  (A read-only flag would be a
    # different Numba type: a second compilation of every loss kernel.)
    return np.ones(n_classes, dtype)


def _weight(weight, n_classes: int, dtype: np.dtype) -> tuple[np.ndarray, float]:
    """The weights as a contiguous array of ``dtype``, and their sum."""
    if weight is None:
        return _unit_weight(n_classes, dtype), float(n_classes)
    w = d.as_real_array(weight, "weight")
    if w.shape != (n_classes,):
        raise ValueError(f"weight should be a 1-D array of {n_classes} elements (one per class), "
                         f"got shape {w.shape}")
    w = np.ascontiguousarray(w, dtype=dtype)
    return w, float(w.sum(dtype=np.float64))


def _check_target_shape(logits: _Logits, target: np.ndarray) -> None:
    array, class_axis, expected = logits.array, logits.class_axis, logits.row_shape
    if target.shape == expected:
        return
    if array.ndim == 1:
        raise ValueError(f"a 1-D input (one row of classes) needs a 0-d target, got shape "
                         f"{target.shape}")
    batch = 1 if class_axis == 0 else 0
    if target.ndim >= 1 and target.shape[0] != array.shape[batch]:
        raise ValueError(f"Expected input batch_size ({array.shape[batch]}) to match target "
                         f"batch_size ({target.shape[0]}).")
    raise ValueError(f"target has shape {target.shape}, but input of shape {array.shape} with "
                     f"classes on axis {class_axis} needs a target of shape {expected}")


@functools.cache
def _check_class_indices():
    from fastlsm.cpu.loss import check_class_indices  # Numba loads on first use
    return check_class_indices


def _class_indices(target: np.ndarray, logits: _Logits,
                   ignore_index: int) -> tuple[np.ndarray, float]:
    """Flat int64 targets, checked against the class count, and the sum of their weights."""
    n_classes = logits.n_classes
    if target.dtype.kind not in "iu":
        hint = (" (a float target of the input's shape holds class probabilities)"
                if target.dtype.kind == "f" else "")
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}{hint}")
    flat = np.ascontiguousarray(target.reshape(-1), dtype=np.int64)
    first, denominator = _check_class_indices()(flat, logits.weight, ignore_index)
    if first >= 0:
        position = [int(k) for k in np.unravel_index(first, target.shape)] if target.ndim else []
        raise IndexError(f"Target {flat[first]} is out of bounds. (target{position} with "
                         f"{n_classes} classes)")
    return flat, denominator


def _logits(input, weight, axis, grad_out) -> _Logits:
    array = d.as_real_array(input, "input")
    class_axis = _class_axis(array, axis)
    row_shape = array.shape[:class_axis] + array.shape[class_axis + 1:]
    dtype = d.result_dtype(array.dtype, "input")
    if grad_out is not None:
        d.check_out(grad_out, array.shape, dtype, "grad_out")
    return _Logits(array, class_axis, row_shape,
                   *_weight(weight, array.shape[class_axis], d.compute_dtype(dtype)), dtype)


def _reduce(loss: np.ndarray, reduction: str, denominator: float, dtype: np.dtype,
            row_shape: tuple[int, ...]) -> Any:
    """The per-row float64 losses, reduced as asked and cast to the result dtype."""
    if reduction == "none":
        value = loss.reshape(row_shape).astype(dtype)
        return value[()] if value.ndim == 0 else value
    total = loss.sum()  # pairwise, in float64
    if reduction == "mean":
        if denominator == 0.0:
            with np.errstate(invalid="ignore", divide="ignore"):
                total = total / np.float64(denominator)  # nan, or inf for weights summing to 0
        else:
            total = total / denominator
    return dtype.type(total)


def _plain_cross_entropy(input, target, ignore_index: int, reduction: str, return_grad: bool):
    """:func:`cross_entropy` of C-ordered float32/float64 ``(N, C)`` logits and ``(N,)`` int64
    targets without weights or grad_out, straight to the kernel; the general argument handling
    is ~6 of a ~11 us small call.  None where a target is out of range: the general path raises.
    """
    n_rows, n_classes = input.shape
    weight = _unit_weight(n_classes, input.dtype)
    first, denominator = _check_class_indices()(target, weight, ignore_index)
    if first >= 0:
        return None
    loss = np.empty(n_rows)
    lse = np.empty(n_rows)
    grad = np.empty_like(input) if return_grad else np.empty((0, 0), input.dtype)
    d.run("cross_entropy_rows", input, target, weight, float(n_classes), ignore_index, 0.0, 0.0,
          _scale(reduction, denominator), loss, lse, grad)
    value = _reduce(loss, reduction, denominator, input.dtype, (n_rows,))
    return (value, grad) if return_grad else value


def _finish(logits: _Logits, reduction: str, denominator: float, loss: np.ndarray,
            grad: tuple | None, grad_out, lse: np.ndarray | None):
    """Reduce the per-row losses and gather what the caller asked for, in the result dtype."""
    dtype = logits.result_dtype
    results = [_reduce(loss, reduction, denominator, dtype, logits.row_shape)]
    if grad is not None:
        results.append(d.finish_elementwise(logits.rows, *grad, grad_out))
    if lse is not None:
        lse_value = lse.reshape(logits.row_shape).astype(dtype)
        results.append(lse_value[()] if lse_value.ndim == 0 else lse_value)
    return results[0] if len(results) == 1 else tuple(results)


def _grad_arrays(logits: _Logits, want_grad: bool, grad_out) -> tuple[tuple | None, np.ndarray]:
    """``(grad, target)``: the ``(result, target, scratch)`` triple of
    :func:`~fastlsm._dispatch.elementwise_target`, or None and a ``(0, 0)`` target for no gradient."""
    if not want_grad:
        return None, np.empty((0, 0), logits.rows.compute_dtype)
    grad = d.elementwise_target(logits.rows, grad_out, "grad_out")
    return grad, grad[1]


def _scale(reduction: str, denominator: float) -> float:
    if reduction != "mean":
        return 1.0
    return math.inf if denominator == 0.0 else 1.0 / denominator


def cross_entropy(input: ArrayLike, target: ArrayLike, weight: ArrayLike | None = None,
                  ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, *, axis: int = 1, return_grad: bool = False,
                  grad_out: Any = None, z_loss: float = 0.0, return_lse: bool = False,
                  device: str | None = None) -> Any:
    """Cross-entropy between logits and class indices or class probabilities, fused.

    ``log_softmax`` is never materialised: each row of logits is read once for its loss and, with
    ``return_grad``, once more to write the gradient.

    Parameters
    ----------
    input : array_like
        Logits of shape ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)`` (classes on ``axis``).
        float32/float64 computed in their own dtype, float16 in float32; integers become float64.
    target : array_like
        Class indices of any integer dtype, shaped like ``input`` without the class axis (0-d for
        a 1-D input); or class probabilities, a float array of ``input``'s shape.
    weight : array_like, optional
        Per-class weights, ``C`` of them.
    ignore_index : int, optional
        Class-index targets equal to it add nothing to the loss, the gradient or the ``mean``
        denominator.  Must be negative with probability targets.
    reduction : {'mean', 'sum', 'none'}, optional
        ``mean`` divides by the sum of ``weight[target]`` over kept elements (by the number of
        rows with probability targets); all ignored gives nan.
    label_smoothing : float, optional
        In [0, 1]: PyTorch's ``(1 - eps) * nll + eps / C * sum_c(-w_c * logp_c)``.
    axis : int, optional
        The class axis (PyTorch's dim 1 by default; the only axis of a 1-D input).  ``axis=-1``
        takes ``(B, T, V)`` logits without a copy.
    return_grad : bool, optional
        Also return ``d loss / d input`` for the chosen reduction (``none``: of the sum).
    grad_out : ndarray, optional
        Where to write the gradient (input's shape and result dtype); may be ``input`` itself.
        Implies ``return_grad``.
    z_loss : float, optional
        Adds ``z_loss * lse**2`` to each kept row (PaLM's auxiliary loss).
    return_lse : bool, optional
        Also return each row's log-sum-exp (every row, ignored ones included).
    device : {None, 'auto', 'cpu', 'cuda'}, optional
        Where to compute, as in :func:`fastlsm.log_softmax`; ``input`` decides for ``'auto'``.
        Targets and weights given as NumPy arrays follow device logits to the GPU.  On the GPU,
        class-index targets are range-checked there, and the call waits for that check.

    Returns
    -------
    loss : scalar or ndarray
        A NumPy scalar of the result dtype for ``mean``/``sum``; per-element losses for ``none``.
    grad : ndarray
        With ``return_grad`` or ``grad_out``.
    lse : ndarray
        With ``return_lse``.

    Examples
    --------
    >>> import numpy as np, fastlsm
    >>> logits = np.array([[2.0, 1.0, 0.1], [0.5, 2.0, 1.5]])
    >>> round(float(fastlsm.cross_entropy(logits, np.array([0, 1]))), 4)
    0.5106
    """
    if device is not None or type(input) is not np.ndarray or _devices.default_device:
        other = _devices.backend(input, device)
        if other is not None:
            return other.cross_entropy(input, target, weight, ignore_index, reduction,
                                      label_smoothing, axis=axis, return_grad=return_grad,
                                      grad_out=grad_out, z_loss=z_loss,
                                      return_lse=return_lse)
    if (weight is None and grad_out is None and not return_lse and type(axis) is int
            and axis in (1, -1) and d.plain_rows(input, -1) and input.ndim == 2
            and type(target) is np.ndarray and target.dtype == np.int64
            and target.shape == input.shape[:1] and target.flags.c_contiguous
            and type(ignore_index) is int and _INT64_MIN <= ignore_index <= _INT64_MAX
            and reduction in _REDUCTIONS and type(label_smoothing) in (int, float)
            and label_smoothing == 0 and type(z_loss) in (int, float) and z_loss == 0):
        result = _plain_cross_entropy(input, target, ignore_index, reduction, bool(return_grad))
        if result is not None:
            return result
    ignore_index, label_smoothing, z_loss = _check_options(ignore_index, reduction,
                                                           label_smoothing, z_loss)
    logits = _logits(input, weight, axis, grad_out)
    target = np.asarray(target)
    want_grad = return_grad or grad_out is not None
    rows = math.prod(logits.row_shape)
    loss = np.empty(rows)
    lse = np.empty(rows)
    if target.shape == logits.array.shape:
        check_probability_target(target.dtype, ignore_index)
        denominator = float(rows)
        probs = d.to_rows(target.astype(logits.weight.dtype, copy=False),
                          (logits.class_axis,), "target").matrix
        grad, grad_target = _grad_arrays(logits, want_grad, grad_out)
        d.run("cross_entropy_probs_rows", logits.rows.matrix, probs, logits.weight,
              label_smoothing, z_loss, _scale(reduction, denominator), loss, lse, grad_target)
    else:
        _check_target_shape(logits, target)
        flat, denominator = _class_indices(target, logits, ignore_index)
        grad, grad_target = _grad_arrays(logits, want_grad, grad_out)
        d.run("cross_entropy_rows", logits.rows.matrix, flat, logits.weight,
              logits.total_weight, ignore_index, label_smoothing,
              z_loss, _scale(reduction, denominator), loss, lse, grad_target)
    return _finish(logits, reduction, denominator, loss, grad, grad_out,
                   lse if return_lse else None)


def nll_loss(input: ArrayLike, target: ArrayLike, weight: ArrayLike | None = None,
             ignore_index: int = -100, reduction: str = "mean", *, axis: int = 1,
             return_grad: bool = False, grad_out: Any = None,
             device: str | None = None) -> Any:
    """Negative log-likelihood of class indices, from log-probabilities (PyTorch's ``nll_loss``).

    ``loss_n = -weight[t_n] * input[n, t_n]``; parameters, shapes and reductions as in
    :func:`cross_entropy` (class-index targets only, no smoothing; ``device`` too).  With
    ``return_grad`` (or ``grad_out``) returns ``(loss, grad)``.

    Examples
    --------
    >>> import numpy as np, fastlsm
    >>> logp = np.log(np.array([[0.5, 0.5], [0.25, 0.75]]))
    >>> round(float(fastlsm.nll_loss(logp, np.array([0, 1]))), 4)
    0.4904
    """
    if device is not None or type(input) is not np.ndarray or _devices.default_device:
        other = _devices.backend(input, device)
        if other is not None:
            return other.nll_loss(input, target, weight, ignore_index, reduction, axis=axis,
                                 return_grad=return_grad, grad_out=grad_out)
    ignore_index = _check_options(ignore_index, reduction, 0.0, 0.0)[0]
    logits = _logits(input, weight, axis, grad_out)
    target = np.asarray(target)
    _check_target_shape(logits, target)
    flat, denominator = _class_indices(target, logits, ignore_index)
    grad, grad_target = _grad_arrays(logits, return_grad or grad_out is not None, grad_out)
    loss = np.empty(flat.shape[0])
    d.run("nll_loss_rows", logits.rows.matrix, flat, logits.weight, ignore_index,
          _scale(reduction, denominator), loss, grad_target)
    return _finish(logits, reduction, denominator, loss, grad, grad_out, None)
