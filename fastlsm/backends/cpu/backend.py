"""The CPU backend: fastlsm's operations on NumPy arrays, from their specs to the CPU kernel
bundles (:mod:`.kernels.softmax`, :mod:`.kernels.backward`; the losses through :mod:`.loss`,
``linear_cross_entropy`` through :mod:`.linear`).

Each operation sees its input as ``(rows, classes)`` (:mod:`.layout`), runs the bundle's kernel
for that layout (:func:`~.runtime.run`: short rows a tile at a time, long rows one at a
time, serial or parallel by size) and maps the result back.  The ``plain_*`` methods are the
public functions' fast paths for the common call (:func:`fastlsm._spec.plain_rows`), which
skip the spec: on a (1, 10) array the general handling would cost more than the call.
"""

from __future__ import annotations

import functools

import numpy as np

from fastlsm import _spec
from fastlsm.backends.base import mean_scale
from fastlsm.backends.cpu import layout, linear, loss, runtime
from fastlsm.backends.cpu.kernels import backward, softmax
from fastlsm.backends.cpu.kernels import loss as loss_kernels
from fastlsm.backends.cpu.runtime import RowKernels


def _elementwise(kernels: RowKernels, spec: _spec.Rowwise):
    array, axes, out = spec.x.data, spec.axes, spec.out
    columns = layout.column_view(array, axes)
    if columns is not None:
        result = np.empty_like(array) if out is None else out
        result_columns = layout.column_view(result, axes)
        if result_columns is not None and result_columns.strides == columns.strides and (
                result is array or not np.may_share_memory(result, array)):
            runtime.run(kernels.columns, columns, result_columns)
            return result
    rows = layout.to_rows(array, axes, spec.result_dtype, spec.compute_dtype)
    result, target, scratch = layout.elementwise_target(rows, out)
    if target.size:
        runtime.run(kernels, rows.matrix, target)
    return layout.finish_elementwise(rows, result, target, scratch, out)


def _plain_elementwise(kernels: RowKernels, x: np.ndarray, out: np.ndarray | None):
    result = np.empty_like(x) if out is None else out
    n_classes = x.shape[-1]
    runtime.run(kernels, x.reshape(-1, n_classes), result.reshape(-1, n_classes))
    return result


def _logsumexp(spec: _spec.Rowwise):
    array, out = spec.x.data, spec.out
    columns = layout.column_view(array, spec.axes)
    if columns is not None:
        lse = np.empty(columns.shape[::2], columns.dtype)  # (batch, width): the rows in order
        runtime.run(softmax.LOGSUMEXP.columns, columns, lse)
    else:
        rows = layout.to_rows(array, spec.axes, spec.result_dtype, spec.compute_dtype)
        lse = np.empty(rows.matrix.shape[0], rows.compute_dtype)
        if lse.size:
            runtime.run(softmax.LOGSUMEXP, rows.matrix, lse)
    if out is None:
        result = lse.reshape(spec.shape).astype(spec.result_dtype, copy=False)
        return result[()] if result.ndim == 0 else result
    out[...] = lse.reshape(spec.shape)
    return out


def _backward(kernels: RowKernels, spec: _spec.Backward):
    dtype, axes = spec.result_dtype, spec.axes
    g = spec.grad_output.data.astype(dtype, copy=False)
    y = spec.output.data.astype(dtype, copy=False)
    g_rows = layout.to_rows(g, axes, dtype, spec.compute_dtype)
    y_rows = layout.to_rows(y, axes, dtype, spec.compute_dtype)
    result, target, scratch = layout.elementwise_target(g_rows, None)
    if target.size:
        runtime.run(kernels, g_rows.matrix, y_rows.matrix, target)
    return layout.finish_elementwise(g_rows, result, target, scratch, None)


_plain_log_softmax = functools.partial(_plain_elementwise, softmax.LOG_SOFTMAX)
_plain_softmax = functools.partial(_plain_elementwise, softmax.SOFTMAX)


class CpuBackend:
    """fastlsm on the CPU: NumPy arrays in and out, parallel Numba kernels."""

    name = "cpu"

    def supports(self, spec) -> Exception | None:
        return None

    def log_softmax(self, spec: _spec.Rowwise):
        return _elementwise(softmax.LOG_SOFTMAX, spec)

    def softmax(self, spec: _spec.Rowwise):
        return _elementwise(softmax.SOFTMAX, spec)

    def logsumexp(self, spec: _spec.Rowwise):
        return _logsumexp(spec)

    def log_softmax_backward(self, spec: _spec.Backward):
        return _backward(backward.LOG_SOFTMAX_BACKWARD, spec)

    def softmax_backward(self, spec: _spec.Backward):
        return _backward(backward.SOFTMAX_BACKWARD, spec)

    def cross_entropy(self, spec: _spec.Loss):
        return loss.cross_entropy(spec)

    def nll_loss(self, spec: _spec.Loss):
        return loss.nll_loss(spec)

    def linear_cross_entropy(self, spec: _spec.LinearLoss):
        return linear.linear_cross_entropy(spec)

    # -- the public functions' fast paths (arguments checked by fastlsm._spec.plain_*) --

    # (x, out) -> the result; partials rather than methods: a Python frame less a small call.
    plain_log_softmax = staticmethod(_plain_log_softmax)
    plain_softmax = staticmethod(_plain_softmax)

    def plain_logsumexp(self, x: np.ndarray):
        lse = np.empty(x.shape[:-1], x.dtype)
        runtime.run(softmax.LOGSUMEXP, x.reshape(-1, x.shape[-1]), lse.reshape(-1))
        return lse[()] if lse.ndim == 0 else lse

    def plain_cross_entropy(self, input: np.ndarray, target: np.ndarray, ignore_index: int,
                            reduction: str, return_grad: bool, grad_out: np.ndarray | None = None):
        """:func:`fastlsm.cross_entropy` of a :func:`fastlsm._spec.plain_cross_entropy` call,
        straight to the kernel: the general handling is ~6 of a ~11 us small call (~12 of ~17
        with ``grad_out``).  None where a target is out of range (the general path raises, and
        ``grad_out`` is not yet written)."""
        n_rows, n_classes = input.shape
        weight = loss.unit_weight(n_classes, input.dtype)
        first, denominator = loss_kernels.check_class_indices(target, weight, ignore_index)
        if first >= 0:
            return None
        per_row = np.empty(n_rows)
        if grad_out is not None:
            grad = grad_out
        else:
            grad = np.empty_like(input) if return_grad else loss.NO_GRADIENT[input.dtype]
        runtime.run(loss_kernels.CROSS_ENTROPY, input, target, weight, float(n_classes),
                    ignore_index, 0.0, 0.0, mean_scale(reduction, denominator), loss.NO_ROWS, None,
                    per_row, loss.NO_ROWS, grad)
        value = loss.reduce_rows(per_row, reduction, denominator, input.dtype, (n_rows,))
        return (value, grad) if return_grad or grad_out is not None else value

    def info(self) -> dict[str, str]:
        import numba
        cache = getattr(softmax.LOG_SOFTMAX.rows.parallel, "_cache", None)
        try:
            layer = runtime.threading_layer()
            threads = str(numba.get_num_threads())
        except ValueError as exc:  # NUMBA_THREADING_LAYER names a layer that does not load
            layer = "none: " + " ".join(str(exc).split())
            threads = "none"
        return {
            "threads": threads,
            "threading layer": layer,
            "numba cache": getattr(cache, "_cache_path", "unknown (this Numba hides it)"),
        }


BACKEND = CpuBackend()
