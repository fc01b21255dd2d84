"""cross_entropy and nll_loss on the CPU, from their specs to the fused loss kernels
(:mod:`.kernels.loss`): the targets checked and the weights made ready, the logits seen as rows
(:mod:`.layout`), the per-row losses reduced."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from fastlsm import _spec
from fastlsm.backends.base import (KEPT_UNIT_WEIGHT_CLASSES, ClassIndexTerms, ProbabilityTerms,
                                   class_indices_int64, gradient_scale)
from fastlsm.backends.cpu import layout, runtime
from fastlsm.backends.cpu.kernels import loss as kernels


def unit_weight(n_classes: int, dtype: np.dtype) -> np.ndarray:
    """Weights of 1 (kernels only read them), kept between calls for up to
    :data:`~fastlsm.backends.base.KEPT_UNIT_WEIGHT_CLASSES` classes."""
    if n_classes > KEPT_UNIT_WEIGHT_CLASSES:
        return np.ones(n_classes, dtype)
    return _kept_unit_weight(n_classes, dtype)


@functools.lru_cache(maxsize=16)
def _kept_unit_weight(n_classes: int, dtype: np.dtype) -> np.ndarray:
    # Shared by the calls without weights.  (A read-only flag would be a different Numba type: a
    # second compilation of every loss kernel.)
    return np.ones(n_classes, dtype)


def class_weights(spec: _spec.Loss) -> tuple[np.ndarray, float]:
    """The weights as a contiguous array of the compute dtype, and their sum in float64."""
    if spec.weight is None:
        return unit_weight(spec.n_classes, spec.compute_dtype), float(spec.n_classes)
    w = np.ascontiguousarray(spec.weight.data, dtype=spec.compute_dtype)
    return w, float(w.sum(dtype=np.float64))


def checked_class_indices(target: np.ndarray, weight: np.ndarray, ignore_index: int,
                          offsets: tuple[int, ...] = ()) -> tuple[np.ndarray, float]:
    """Flat int64 class indices, each in ``[0, C)`` or ``ignore_index`` (an IndexError naming
    the first one that is not, at its position plus ``offsets``: where a block of targets
    starts in the whole array), and the sum of their weights."""
    flat, denominator, bad = class_indices_and_error(target, weight, ignore_index, offsets)
    if bad is not None:
        raise bad[1]
    return flat, denominator


def class_indices_and_error(target: np.ndarray, weight: np.ndarray, ignore_index: int,
                            offsets: tuple[int, ...] = ()):
    """:func:`checked_class_indices`, the error returned rather than raised: ``(flat,
    denominator, None)``, or ``(flat, None, (position, IndexError))`` for the first target out
    of range, ``position`` its index in the whole array."""
    original = target.reshape(-1)
    flat = class_indices_int64(original, ignore_index)
    first, denominator = kernels.check_class_indices(flat, weight, ignore_index)
    if first < 0:
        return flat, denominator, None
    position = tuple(int(i) for i in np.unravel_index(first, target.shape)) if target.ndim else ()
    if offsets:
        position = tuple(o + i for o, i in zip(offsets, position))
    return flat, None, (position, _spec.target_out_of_bounds(original[first], position,
                                                             weight.shape[0]))


NO_ROWS = np.empty(0)  # no per-row factors, or no log-sum-exps wanted
# No gradient wanted, for the kernels of each dtype (made once: ~0.2 us of a ~4 us small call).
NO_GRADIENT = {np.dtype(t): np.empty((0, 0), t) for t in (np.float32, np.float64)}


def _row_scales(spec: _spec.Loss) -> np.ndarray:
    """``grad_loss`` of a ``none`` loss as the kernels' per-row factors (float64, in the order
    of the rows); none without it."""
    if spec.grad_loss is None:
        return NO_ROWS
    return np.ascontiguousarray(spec.grad_loss.data.reshape(-1), dtype=np.float64)


def _logit_rows(spec: _spec.Loss) -> layout.Rows:
    # Only once the targets are checked: a transposed layout is copied by a kernel.
    array = spec.input.data
    if array.ndim == 2 and spec.class_axis == 1 and _spec.plain_rows(array, 1):
        return layout.Rows(array, (1,), array.dtype, array.dtype, array)  # ~3 us less a call
    return layout.to_rows(array, (spec.class_axis,), spec.result_dtype, spec.compute_dtype)


def _grad_arrays(spec: _spec.Loss, rows: layout.Rows) -> tuple[tuple | None, np.ndarray]:
    """``(grad, target)``: the ``(result, target, scratch)`` triple of
    :func:`~.layout.elementwise_target`, or None and a ``(0, 0)`` target for no gradient."""
    if not spec.want_grad:
        return None, np.empty((0, 0), rows.compute_dtype)
    grad = layout.elementwise_target(rows, spec.grad_out)
    return grad, grad[1]


def reduce_rows(per_row: np.ndarray, reduction: str, denominator: float, dtype: np.dtype,
                row_shape: tuple[int, ...]) -> Any:
    """The per-row float64 losses, reduced as asked and cast to the result dtype."""
    if reduction == "none":
        value = per_row.reshape(row_shape).astype(dtype)
        return value[()] if value.ndim == 0 else value
    total = np.add.reduce(per_row)  # pairwise, in float64 (per_row.sum() adds a Python frame)
    if reduction == "mean":
        if denominator == 0.0:
            with np.errstate(invalid="ignore", divide="ignore"):
                total = total / np.float64(denominator)  # nan, or inf for weights summing to 0
        else:
            total = total / denominator
    return dtype.type(total)


def _finish_loss(spec: _spec.Loss, rows: layout.Rows, denominator: float, per_row: np.ndarray,
                 grad: tuple | None, lse: np.ndarray | None):
    """Reduce the per-row losses and gather what the caller asked for, in the result dtype."""
    dtype = spec.result_dtype
    results = [reduce_rows(per_row, spec.reduction, denominator, spec.loss_dtype, spec.row_shape)]
    if grad is not None:
        results.append(layout.finish_elementwise(rows, *grad, spec.grad_out))
    if lse is not None:
        lse_value = lse.reshape(spec.row_shape).astype(dtype)
        results.append(lse_value[()] if lse_value.ndim == 0 else lse_value)
    return results[0] if len(results) == 1 else tuple(results)


def cross_entropy(spec: _spec.Loss):
    weight, total_weight = class_weights(spec)
    n_rows = spec.n_rows
    per_row = np.empty(n_rows)
    lse = np.empty(n_rows if spec.return_lse else 0)
    softcap = spec.softcap or None  # None compiles the kernels without the cap's branch
    if spec.probabilities:
        denominator = spec.probability_rows
        rows = _logit_rows(spec)
        probs = layout.to_rows(spec.target.data.astype(weight.dtype, copy=False),
                               (spec.class_axis,), weight.dtype, weight.dtype).matrix
        grad, grad_target = _grad_arrays(spec, rows)
        terms = ProbabilityTerms(weight, spec.label_smoothing, spec.z_loss,
                                 gradient_scale(spec, denominator), _row_scales(spec))
        runtime.run(kernels.CROSS_ENTROPY_PROBABILITIES, rows.matrix, probs, *terms, softcap,
                    per_row, lse, grad_target)
    else:
        flat, denominator = checked_class_indices(spec.target.data, weight, spec.ignore_index)
        rows = _logit_rows(spec)
        grad, grad_target = _grad_arrays(spec, rows)
        terms = ClassIndexTerms(weight, total_weight, spec.ignore_index, spec.label_smoothing,
                                spec.z_loss, gradient_scale(spec, denominator),
                                _row_scales(spec))
        runtime.run(kernels.CROSS_ENTROPY, rows.matrix, flat, *terms, softcap, per_row, lse,
                    grad_target)
    return _finish_loss(spec, rows, denominator, per_row, grad, lse if spec.return_lse else None)


def nll_loss(spec: _spec.Loss):
    weight = class_weights(spec)[0]
    flat, denominator = checked_class_indices(spec.target.data, weight, spec.ignore_index)
    rows = _logit_rows(spec)
    grad, grad_target = _grad_arrays(spec, rows)
    per_row = np.empty(flat.shape[0])
    runtime.run(kernels.NLL_LOSS, rows.matrix, flat, weight, spec.ignore_index,
                gradient_scale(spec, denominator), _row_scales(spec), per_row, grad_target)
    return _finish_loss(spec, rows, denominator, per_row, grad, None)
