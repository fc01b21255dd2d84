"""cross_entropy and nll_loss on the GPU, from their specs (:mod:`.kernels.loss`).

Class-index targets are range-checked on the device by a one-block kernel that also sums the
``mean`` denominator, and the call waits for its two numbers: that round trip is what lets a
bad target raise its IndexError before any kernel writes a result.  Per-row losses are float64
and reduced on the device in one block, in a fixed order.  With ``softcap`` the loss kernels
read the logits capped and write the gradient with respect to the raw ones, in their one pass
(:mod:`.kernels.loss`).
"""

from __future__ import annotations

import functools

import numpy as np

from fastlsm import _spec
from fastlsm.backends.base import (KEPT_UNIT_WEIGHT_CLASSES, ClassIndexTerms, ProbabilityTerms,
                                   class_indices_int64, gradient_scale)
from fastlsm.backends.cuda import arrays, launch
from fastlsm.backends.cuda.arrays import DeviceArray
from fastlsm.backends.cuda.kernels import reduce
from fastlsm.backends.cuda.kernels.loss import (CROSS_ENTROPY, CROSS_ENTROPY_PROBABILITIES,
                                                NLL_LOSS)
from fastlsm.backends.cuda.kernels.primitives import RowKernels
from fastlsm.backends.cuda.launch import launch_rows, launch_segments, reduction_threads
from fastlsm.backends.cuda.rows import (Rows, cast_into, in_dtype, matrix_target, to_rows, unrows,
                                        values)


@functools.lru_cache(maxsize=8)
def _nothing(shape: tuple[int, ...], dtype: np.dtype):
    """An empty array that tells a loss kernel to write no gradient ``(0, 0)`` or no lse ``(0,)``."""
    return arrays.cuda().device_array(shape, dtype)


def _unit_weight(n_classes: int, dtype: np.dtype):
    """Weights of 1 on the current GPU, made once per GPU, size and dtype up to
    :data:`~fastlsm.backends.base.KEPT_UNIT_WEIGHT_CLASSES` classes, else for this call."""
    if n_classes > KEPT_UNIT_WEIGHT_CLASSES:
        return arrays.cuda().to_device(np.ones(n_classes, dtype))
    return _unit_weight_on(n_classes, dtype, arrays.cuda().get_current_device().uuid)


@functools.lru_cache(maxsize=16)
def _unit_weight_on(n_classes: int, dtype: np.dtype, device: str):
    # ``device`` (the GPU's uuid) is in the key so that a call on another GPU (made current by
    # torch.cuda.set_device, say) never reads an array that lives on the first.
    return arrays.cuda().to_device(np.ones(n_classes, dtype))


def _row_scales(spec: _spec.Loss, like: DeviceArray):
    """``grad_loss`` of a ``none`` loss as the kernels' per-row factors (float64 on the device,
    in the order of the rows); an empty array without it."""
    if spec.grad_loss is None:
        return _nothing((0,), np.float64)
    view = values(arrays.on_device(spec.grad_loss), np.float64, like)
    return view.reshape(spec.n_rows) if view.ndim != 1 else view


def _sum_rows(values, divisor: float, out) -> None:
    """``out[0] = sum(values) / divisor`` on the device, in a fixed order."""
    launch.launch(reduce.sum_rows, 1, reduction_threads(values.size), values, divisor, out)


def class_weights(spec: _spec.Loss, like: DeviceArray, need_total: bool):
    """``(weights on the device in the compute dtype, their sum)``; the sum (a trip to the device
    and back) only where ``need_total`` says the kernels use it, 0 otherwise."""
    if spec.weight is None:
        return _unit_weight(spec.n_classes, spec.compute_dtype), float(spec.n_classes)
    w = values(arrays.on_device(spec.weight), spec.compute_dtype, like)
    if not need_total:
        return w, 0.0
    total = arrays.scratch((1,), np.float64, like)
    _sum_rows(w, 1.0, total)
    return w, float(total.copy_to_host()[0])


def class_indices(spec: _spec.Loss, weight, like: DeviceArray):
    """Flat int64 targets on the device, range-checked there, and the ``mean`` denominator."""
    view = arrays.on_device(spec.target).view
    shape = spec.target.shape
    n = spec.n_rows
    original = view if len(shape) == 1 else view.reshape(n)
    if original.dtype == np.uint64:  # rare: made int64 on the host, as the CPU does
        flat = arrays.cuda().to_device(class_indices_int64(original.copy_to_host(),
                                                           spec.ignore_index))
    else:
        flat = in_dtype(original, np.int64, like)
    checked = arrays.scratch((2,), np.float64, like)
    launch.launch(reduce.check_targets, 1, reduction_threads(n), flat, weight, spec.ignore_index,
                  checked)
    first_bad, denominator = checked.copy_to_host()
    if first_bad < n:
        bad = int(first_bad)
        value = int(original[bad:bad + 1].copy_to_host()[0])
        position = np.unravel_index(bad, shape) if shape else ()
        raise _spec.target_out_of_bounds(value, position, spec.n_classes)
    return flat, float(denominator)


def _grad_target(spec: _spec.Loss, rows: Rows, like: DeviceArray):
    """``(result, dst, target, apart)`` for the gradient (``apart``: ``dst`` is a buffer apart
    from ``grad_out``, :func:`.arrays.out_view`), or Nones and a ``(0, 0)`` target."""
    if not spec.want_grad:
        return None, None, _nothing((0, 0), rows.matrix.dtype), False
    shape = spec.input.shape
    if spec.grad_out is None:
        (result, dst), apart = arrays.empty(shape, spec.result_dtype, like), False
    else:
        result = spec.grad_out
        dst, apart = arrays.out_view(spec.grad_out, shape, spec.result_dtype, like,
                                     spec.input.data)
    return result, dst, matrix_target(rows, dst), apart


def _reduced(spec: _spec.Loss, per_row, denominator: float, like: DeviceArray):
    """The per-row float64 losses reduced on the device, in the loss's dtype."""
    if spec.reduction == "none":
        result, dst = arrays.empty(spec.row_shape, spec.loss_dtype, like)
        cast_into(per_row, dst)
        return result
    result, dst = arrays.empty((), spec.loss_dtype, like)
    divisor = denominator if spec.reduction == "mean" else 1.0
    if dst.dtype != arrays.BFLOAT16_WORDS:
        _sum_rows(per_row, divisor, dst.reshape(1))
        return result
    total = arrays.scratch((1,), np.float64, like)  # rounded from float64 once, as on the CPU
    _sum_rows(per_row, divisor, total)
    cast_into(total, dst)
    return result


def _finish(spec: _spec.Loss, rows: Rows, value, grad, lse):
    """``value``, then the gradient and the log-sum-exps where asked for, as the caller gets them."""
    like = rows.like
    dtype = spec.result_dtype
    results = [arrays.handed_back(value, like, spec.loss_dtype)]
    if spec.want_grad:
        result, dst, target, apart = grad
        unrows(rows, target, dst)
        results.append(arrays.handed_back(result, like, dtype) if spec.grad_out is None
                       else arrays.deliver(dst, apart, spec.grad_out, like))
    if spec.return_lse:
        lse_result, dst = arrays.empty(spec.row_shape, spec.result_dtype, like)
        cast_into(lse, dst)
        results.append(arrays.handed_back(lse_result, like, dtype))
    return results[0] if len(results) == 1 else tuple(results)


def _launch_loss(kernels: RowKernels, matrix, target, terms, softcap: float | None, per_row,
                 lse, grad, like: DeviceArray) -> None:
    """A loss bundle's kernel over ``matrix`` (``target``: class indices or probabilities), or
    its split form where the rows are long and few (:func:`~.launch.segments`).  ``softcap``
    None compiles the kernels without the cap (a number is a specialisation of its own)."""
    n_rows, n_classes = matrix.shape
    n_segments = launch.segments(n_rows, n_classes)
    if n_segments == 1:
        launch_rows(kernels.rows, n_rows, n_classes, matrix, target, *terms, softcap, per_row,
                    lse, grad)
        return
    partials = arrays.scratch((n_rows, n_segments, kernels.partials), np.float64, like)
    launch_segments(kernels.segment_stats, n_classes, n_segments, matrix, target, terms.weight,
                    terms.label_smoothing, softcap, partials)
    launch_segments(kernels.segments, n_classes, n_segments, matrix, target, *terms, softcap,
                    partials, per_row, lse, grad)


def cross_entropy(spec: _spec.Loss):
    logits = arrays.on_device(spec.input)
    weight, total_weight = class_weights(spec, logits, need_total=spec.label_smoothing > 0.0)
    if spec.probabilities:
        denominator = spec.probability_rows
        rows = to_rows(logits, (spec.class_axis,), spec.compute_dtype)
        target = to_rows(arrays.on_device(spec.target), (spec.class_axis,),
                         spec.compute_dtype).matrix
        kernels = CROSS_ENTROPY_PROBABILITIES
        terms = ProbabilityTerms(weight, spec.label_smoothing, spec.z_loss,
                                 gradient_scale(spec, denominator), _row_scales(spec, logits))
    else:
        target, denominator = class_indices(spec, weight, logits)
        rows = to_rows(logits, (spec.class_axis,), spec.compute_dtype)
        kernels = CROSS_ENTROPY
        terms = ClassIndexTerms(weight, total_weight, spec.ignore_index, spec.label_smoothing,
                                spec.z_loss, gradient_scale(spec, denominator),
                                _row_scales(spec, logits))
    matrix = rows.matrix
    per_row = arrays.scratch((matrix.shape[0],), np.float64, logits)
    lse = (arrays.scratch((matrix.shape[0],), matrix.dtype, logits) if spec.return_lse
           else _nothing((0,), matrix.dtype))
    grad = _grad_target(spec, rows, logits)
    _launch_loss(kernels, matrix, target, terms, spec.softcap or None, per_row, lse, grad[2],
                 logits)
    return _finish(spec, rows, _reduced(spec, per_row, denominator, logits), grad, lse)


def nll_loss(spec: _spec.Loss):
    logits = arrays.on_device(spec.input)
    weight = class_weights(spec, logits, need_total=False)[0]
    target, denominator = class_indices(spec, weight, logits)
    rows = to_rows(logits, (spec.class_axis,), spec.compute_dtype)
    grad = _grad_target(spec, rows, logits)
    per_row = arrays.scratch((rows.matrix.shape[0],), np.float64, logits)
    launch_rows(NLL_LOSS.rows, rows.matrix.shape[0], rows.classes, rows.matrix, target, weight,
                spec.ignore_index, gradient_scale(spec, denominator), _row_scales(spec, logits),
                per_row, grad[2])
    return _finish(spec, rows, _reduced(spec, per_row, denominator, logits), grad, None)
