"""log_softmax, softmax, logsumexp and their backward passes (the public API).

Each function takes the CPU's fast path for the plain NumPy call, or builds its spec
(:mod:`fastlsm._spec`) and hands it to the backend that serves it (:mod:`fastlsm.backends.base`).
"""

from __future__ import annotations

from typing import Any

from numpy.typing import ArrayLike

from fastlsm import _spec
from fastlsm.backends import base

Axis = int | tuple[int, ...] | None


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
    if base.runs_on_cpu(device) and _spec.plain_rows(x, axis) and _spec.plain_out(x, out):
        return base.get("cpu").plain_log_softmax(x, out)
    spec = _spec.rowwise(x, axis, out)
    return base.resolve(spec, device).log_softmax(spec)


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
    if base.runs_on_cpu(device) and _spec.plain_rows(x, axis) and _spec.plain_out(x, out):
        return base.get("cpu").plain_softmax(x, out)
    spec = _spec.rowwise(x, axis, out)
    return base.resolve(spec, device).softmax(spec)


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
    if out is None and not keepdims and base.runs_on_cpu(device) and _spec.plain_rows(x, axis):
        return base.get("cpu").plain_logsumexp(x)
    spec = _spec.rowwise(x, axis, out, reduce=True, keepdims=keepdims)
    return base.resolve(spec, device).logsumexp(spec)


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
    spec = _spec.backward(grad_output, output, axis)
    return base.resolve(spec, device).log_softmax_backward(spec)


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
    spec = _spec.backward(grad_output, output, axis)
    return base.resolve(spec, device).softmax_backward(spec)
