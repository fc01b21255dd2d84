"""log_softmax, softmax, logsumexp and their backward passes (the public API)."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from fastlsm import _devices
from fastlsm import _dispatch as d

Axis = int | tuple[int, ...] | None


def _elementwise(kernel: str, x: ArrayLike, axis: Axis, out: np.ndarray | None):
    if d.plain_rows(x, axis) and d.plain_out(x, out):
        result = np.empty_like(x) if out is None else out
        d.run(kernel, x.reshape(-1, x.shape[-1]), result.reshape(-1, x.shape[-1]))
        return result
    array = d.as_real_array(x, "x")
    axes = d.normalize_axes(axis, array.ndim)
    columns = d.column_view(array, axes)
    if columns is not None:
        result = np.empty_like(array) if out is None else out
        if out is not None:
            d.check_out(out, array.shape, array.dtype)
        result_columns = d.column_view(result, axes)
        if result_columns is not None and result_columns.strides == columns.strides and (
                result is array or not np.may_share_memory(result, array)):
            d.run(kernel.replace("_rows", "_columns"), columns, result_columns)
            return result
    rows = d.to_rows(array, axes, "x")
    result, target, scratch = d.elementwise_target(rows, out)
    if target.size:
        d.run(kernel, rows.matrix, target)
    return d.finish_elementwise(rows, result, target, scratch, out)


def log_softmax(x: ArrayLike, axis: Axis = -1, *, out: Any = None,
                device: str | None = None) -> Any:
    """Logarithm of the softmax along ``axis``: ``x - max - log(sum(exp(x - max)))``.

    Parameters
    ----------
    x : array_like
        Real input.  float32 and float64 are computed in their own precision, float16 in float32
        (and returned as float16); integers and bool become float64.
    axis : int, tuple of ints or None, optional
        Axis or axes making up one softmax "row" (default: the last).  ``None`` uses every axis.
    out : array, optional
        Array to write into, of ``x``'s shape and the result dtype; may be ``x`` itself.  A device
        array for device input.
    device : {None, 'auto', 'cpu', 'cuda'}, optional
        Where to compute.  None or ``'auto'`` (unless :func:`set_default_device` or the
        ``FASTLSM_DEVICE`` environment variable says otherwise) follows the data: an array on an
        NVIDIA GPU (CuPy, PyTorch CUDA, Numba device arrays: anything with
        ``__cuda_array_interface__``) is computed there in place and the result is an array of
        the same library; a ``dask.array.Array`` gives a lazy Dask result; anything else runs on
        the CPU.  ``'cuda'`` with NumPy input copies it over and the result back; it raises
        ``RuntimeError`` where there is no usable GPU.

    Returns
    -------
    ndarray
        Same shape as ``x`` (the input's kind of array for device or Dask input).

    Notes
    -----
    Non-finite values follow ``scipy.special.log_softmax``: an all ``-inf`` row gives nan, a row
    holding ``+inf`` gives nan at the ``+inf`` entries and ``-inf`` elsewhere, a nan makes the row
    nan.

    Examples
    --------
    >>> import fastlsm
    >>> fastlsm.log_softmax([[2.0, 1.0, 0.1], [0.5, 2.0, 1.5]]).round(4)
    array([[-0.417 , -1.417 , -2.317 ],
           [-2.1041, -0.6041, -1.1041]])
    """
    if device is not None or type(x) is not np.ndarray or _devices.default_device:
        other = _devices.backend(x, device)
        if other is not None:
            return other.log_softmax(x, axis, out=out)
    return _elementwise("log_softmax_rows", x, axis, out)


def softmax(x: ArrayLike, axis: Axis = -1, *, out: Any = None,
            device: str | None = None) -> Any:
    """Softmax along ``axis``: ``exp(x - max) / sum(exp(x - max))``.

    Parameters (``device`` too) and dtypes as in :func:`log_softmax`.  As in
    ``scipy.special.softmax``, a row whose
    max is not finite (``+inf`` present, or all ``-inf``) or that holds a nan is all nan.

    Examples
    --------
    >>> import fastlsm
    >>> fastlsm.softmax([1.0, 1.0]).tolist()
    [0.5, 0.5]
    """
    if device is not None or type(x) is not np.ndarray or _devices.default_device:
        other = _devices.backend(x, device)
        if other is not None:
            return other.softmax(x, axis, out=out)
    return _elementwise("softmax_rows", x, axis, out)


def logsumexp(x: ArrayLike, axis: Axis = -1, *, keepdims: bool = False, out: Any = None,
              device: str | None = None) -> Any:
    """``log(sum(exp(x)))`` along ``axis``, computed without overflow.

    Parameters
    ----------
    x : array_like
        Real input; dtypes as in :func:`log_softmax`.
    axis : int, tuple of ints or None, optional
        Axis or axes to reduce (default: the last).  ``None`` reduces every axis.
    keepdims : bool, optional
        Keep the reduced axes as size-1 dimensions.
    out : array, optional
        Array of the result's shape and dtype to write into.
    device : {None, 'auto', 'cpu', 'cuda'}, optional
        Where to compute, as in :func:`log_softmax`.

    Returns
    -------
    ndarray or scalar
        A NumPy scalar when every axis is reduced and ``out`` is not given.  An empty axis gives
        ``-inf``; a row holding ``+inf`` gives ``inf``, a nan gives nan (as ``scipy.special``).

    Examples
    --------
    >>> import fastlsm
    >>> float(fastlsm.logsumexp([0.0, 0.0]))  # log(2)
    0.6931471805599453
    """
    if device is not None or type(x) is not np.ndarray or _devices.default_device:
        other = _devices.backend(x, device)
        if other is not None:
            return other.logsumexp(x, axis, keepdims=keepdims, out=out)
    if out is None and not keepdims and d.plain_rows(x, axis):
        lse = np.empty(x.shape[:-1], x.dtype)
        d.run("logsumexp_rows", x.reshape(-1, x.shape[-1]), lse.reshape(-1))
        return lse[()] if lse.ndim == 0 else lse
    array = d.as_real_array(x, "x")
    axes = d.normalize_axes(axis, array.ndim)
    kept = tuple(1 if i in axes else n for i, n in enumerate(array.shape))
    shape = kept if keepdims else tuple(n for i, n in enumerate(array.shape) if i not in axes)
    result_dtype = d.result_dtype(array.dtype, "x")
    if out is not None:
        d.check_out(out, shape, result_dtype)
    columns = d.column_view(array, axes)
    if columns is not None:
        lse = np.empty(columns.shape[::2], columns.dtype)  # (batch, width): the rows in order
        d.run("logsumexp_columns", columns, lse)
    else:
        rows = d.to_rows(array, axes, "x")
        lse = np.empty(rows.matrix.shape[0], rows.compute_dtype)
        if lse.size:
            d.run("logsumexp_rows", rows.matrix, lse)
    if out is None:
        result = lse.reshape(shape).astype(result_dtype, copy=False)
        return result[()] if result.ndim == 0 else result
    out[...] = lse.reshape(shape)
    return out


def _backward(kernel: str, grad_output: ArrayLike, output: ArrayLike, axis: Axis) -> np.ndarray:
    g = d.as_real_array(grad_output, "grad_output")
    y = d.as_real_array(output, "output")
    dtype = d.backward_dtype(g, y)
    axes = d.normalize_axes(axis, g.ndim)
    g_rows = d.to_rows(g.astype(dtype, copy=False), axes, "grad_output")
    y_rows = d.to_rows(y.astype(dtype, copy=False), axes, "output")
    result, target, scratch = d.elementwise_target(g_rows, None)
    if target.size:
        d.run(kernel, g_rows.matrix, y_rows.matrix, target)
    return d.finish_elementwise(g_rows, result, target, scratch, None)


def log_softmax_backward(grad_output: ArrayLike, output: ArrayLike, axis: Axis = -1, *,
                         device: str | None = None) -> Any:
    """Vector-Jacobian product of :func:`log_softmax`: ``g - exp(y) * sum(g)`` along ``axis``.

    Parameters
    ----------
    grad_output : array_like
        Gradient of the loss with respect to the output of ``log_softmax``.
    output : array_like
        The forward output ``y = log_softmax(x, axis)``, same shape as ``grad_output``.
    axis : int, tuple of ints or None, optional
        The axis the forward pass used.
    device : {None, 'auto', 'cpu', 'cuda'}, optional
        Where to compute, as in :func:`log_softmax`; ``grad_output`` decides for ``'auto'``.

    Returns
    -------
    ndarray
        The gradient with respect to ``x``.

    Examples
    --------
    >>> import numpy as np, fastlsm
    >>> y = fastlsm.log_softmax(np.array([0.0, 0.0]))
    >>> fastlsm.log_softmax_backward(np.array([1.0, 0.0]), y).tolist()
    [0.5, -0.5]
    """
    if device is not None or type(grad_output) is not np.ndarray or _devices.default_device:
        other = _devices.backend(grad_output, device)
        if other is not None:
            return other.log_softmax_backward(grad_output, output, axis)
    return _backward("log_softmax_backward_rows", grad_output, output, axis)


def softmax_backward(grad_output: ArrayLike, output: ArrayLike, axis: Axis = -1, *,
                     device: str | None = None) -> Any:
    """Vector-Jacobian product of :func:`softmax`: ``y * (g - sum(g * y))`` along ``axis``.

    Parameters (``device`` too) as in :func:`log_softmax_backward`, with
    ``output = softmax(x, axis)``.

    Examples
    --------
    >>> import numpy as np, fastlsm
    >>> y = fastlsm.softmax(np.array([0.0, 0.0]))
    >>> fastlsm.softmax_backward(np.array([1.0, 0.0]), y).tolist()
    [0.25, -0.25]
    """
    if device is not None or type(grad_output) is not np.ndarray or _devices.default_device:
        other = _devices.backend(grad_output, device)
        if other is not None:
            return other.softmax_backward(grad_output, output, axis)
    return _backward("softmax_backward_rows", grad_output, output, axis)
