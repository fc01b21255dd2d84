"""log_softmax, softmax, logsumexp and their backward passes on the GPU, from their specs: each in
one pass over the rows, or, for rows split into segments (:func:`~.launch.segments`), the
segments' statistics and then a pass that merges them and writes (:mod:`.kernels.softmax`,
:mod:`.kernels.backward`)."""

from __future__ import annotations

import numpy as np

from fastlsm import _spec
from fastlsm.backends.cuda import arrays, launch
from fastlsm.backends.cuda.arrays import DeviceArray
from fastlsm.backends.cuda.kernels import backward
from fastlsm.backends.cuda.kernels.primitives import RowKernels
from fastlsm.backends.cuda.kernels.softmax import LOGSUMEXP
from fastlsm.backends.cuda.launch import launch_rows, launch_segments
from fastlsm.backends.cuda.rows import Rows, cast_into, matrix_target, to_rows, unrows


def _partials(kernels: RowKernels, n_rows: int, n_segments: int, like: DeviceArray):
    return arrays.scratch((n_rows, n_segments, kernels.partials), np.float64, like)


def _result(spec: _spec.Rowwise, like: DeviceArray):
    """``(result, view, apart)``: what the caller gets (``out``, or a new array), the device
    view to write, and whether that is a buffer apart from ``out`` (:func:`.arrays.out_view`)."""
    if spec.out is None:
        return *arrays.empty(spec.shape, spec.result_dtype, like), False
    return spec.out, *arrays.out_view(spec.out, spec.shape, spec.result_dtype, like, spec.x.data)


def _returned(spec: _spec.Rowwise, result, view, apart: bool, like: DeviceArray):
    if spec.out is not None:
        return arrays.deliver(view, apart, spec.out, like)
    return arrays.handed_back(result, like, spec.result_dtype)


def elementwise(kernels: RowKernels, spec: _spec.Rowwise):
    """log_softmax or softmax (``kernels``) of ``spec.x`` into a result of its shape."""
    array = arrays.on_device(spec.x)
    rows = to_rows(array, spec.axes, spec.compute_dtype)
    result, dst, apart = _result(spec, array)
    target = matrix_target(rows, dst)
    matrix = rows.matrix
    n_rows, n_classes = matrix.shape
    n_segments = launch.segments(n_rows, n_classes)
    if n_segments == 1:
        launch_rows(kernels.rows, n_rows, n_classes, matrix, target)
    else:
        partials = _partials(kernels, n_rows, n_segments, array)
        launch_segments(kernels.segment_stats, n_classes, n_segments, matrix, partials)
        launch_segments(kernels.segments, n_classes, n_segments, matrix, partials, target)
    unrows(rows, target, dst)
    return _returned(spec, result, dst, apart, array)


def logsumexp(spec: _spec.Rowwise):
    array = arrays.on_device(spec.x)
    rows = to_rows(array, spec.axes, spec.compute_dtype)
    result, dst, apart = _result(spec, array)
    matrix = rows.matrix
    n_rows, n_classes = matrix.shape
    lse = (dst.reshape(n_rows) if dst.dtype == matrix.dtype
           else arrays.scratch((n_rows,), matrix.dtype, array))
    n_segments = launch.segments(n_rows, n_classes)
    if n_segments == 1:
        launch_rows(LOGSUMEXP.rows, n_rows, n_classes, matrix, lse)  # -inf for no classes
    else:
        partials = _partials(LOGSUMEXP, n_rows, n_segments, array)
        launch_segments(LOGSUMEXP.segment_stats, n_classes, n_segments, matrix, partials)
        launch.launch(LOGSUMEXP.segments, n_rows, launch.reduction_threads(n_segments), partials,
                      lse)
    if dst.dtype != lse.dtype:
        cast_into(lse, dst)
    return _returned(spec, result, dst, apart, array)


def backward_pass(kernels: RowKernels, spec: _spec.Backward):
    """A backward pass (``kernels``: log_softmax's or softmax's) in one pass, or split as the
    forward passes split their rows."""
    g = arrays.on_device(spec.grad_output)
    y = arrays.on_device(spec.output)
    g_rows = to_rows(g, spec.axes, spec.compute_dtype)
    y_rows = to_rows(y, spec.axes, spec.compute_dtype)
    result, dst = arrays.empty(spec.grad_output.shape, spec.result_dtype, g)
    target = matrix_target(g_rows, dst)
    _launch_backward(kernels, g_rows, y_rows.matrix, target)
    unrows(g_rows, target, dst)
    return arrays.handed_back(result, g, spec.result_dtype)


def _launch_backward(kernels: RowKernels, g_rows: Rows, output, grad_input) -> None:
    grad_output = g_rows.matrix
    n_rows, n_classes = grad_output.shape
    n_segments = launch.segments(n_rows, n_classes)
    if n_segments == 1:
        launch_rows(kernels.rows, n_rows, n_classes, grad_output, output, grad_input)
        return
    partials = _partials(kernels, n_rows, n_segments, g_rows.like)
    sums_products = kernels is backward.SOFTMAX_BACKWARD  # softmax's needs sum(g * y), not sum(g)
    launch_segments(kernels.segment_stats, n_classes, n_segments, grad_output, output,
                    sums_products, partials)
    launch_segments(kernels.segments, n_classes, n_segments, grad_output, output, partials,
                    grad_input)
