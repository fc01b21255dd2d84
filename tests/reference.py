"""A plain float64 NumPy reference for the five fastlsm functions.

Written the obvious way (np.max, np.exp, np.sum, np.log) and following scipy.special's formulas:

* log_softmax / logsumexp shift by the max of the reduced axes, but by 0 where that max is not
  finite (a row holding +inf, a nan, or nothing but -inf), which gives SciPy's nan / -inf answers.
* softmax shifts by the max even when it is not finite (scipy.special.softmax), so such rows are nan.

Every input is converted to float64 first; the result is float64 whatever the input dtype.  A 0-d
input is treated as a one-element row; ``axis`` may be an int, a tuple of ints or None.
"""

from __future__ import annotations

import numpy as np


def _prepare(x, axis):
    """``x`` as float64 (0-d seen as shape (1,)) and ``axis`` as a tuple of non-negative ints."""
    a = np.asarray(x, dtype=np.float64)
    zero_d = a.ndim == 0
    if zero_d:
        a = a.reshape(1)
    if axis is None:
        axes = tuple(range(a.ndim))
    else:
        items = axis if isinstance(axis, tuple) else (axis,)
        axes = tuple(sorted(int(i) % a.ndim for i in items))
    return a, axes, zero_d


def _finite_max(a, axes):
    """The max over ``axes`` (keepdims), replaced by 0 where it is not finite or the axes are empty."""
    if any(a.shape[i] == 0 for i in axes):
        shape = tuple(1 if i in axes else n for i, n in enumerate(a.shape))
        return np.zeros(shape)
    m = np.max(a, axis=axes, keepdims=True)
    return np.where(np.isfinite(m), m, 0.0)


def _back(result, zero_d):
    return result.reshape(()) if zero_d else result


def log_softmax(x, axis=-1):
    a, axes, zero_d = _prepare(x, axis)
    with np.errstate(all="ignore"):
        shifted = a - _finite_max(a, axes)
        s = np.sum(np.exp(shifted), axis=axes, keepdims=True)
        return _back(shifted - np.log(s), zero_d)


def softmax(x, axis=-1):
    a, axes, zero_d = _prepare(x, axis)
    if a.size == 0:
        return _back(a.copy(), zero_d)
    with np.errstate(all="ignore"):
        m = np.max(a, axis=axes, keepdims=True)  # not made finite: +inf / all -inf rows become nan
        e = np.exp(a - m)
        return _back(e / np.sum(e, axis=axes, keepdims=True), zero_d)


def logsumexp(x, axis=-1, keepdims=False):
    a, axes, zero_d = _prepare(x, axis)
    with np.errstate(all="ignore"):
        m = _finite_max(a, axes)
        s = np.sum(np.exp(a - m), axis=axes, keepdims=True)
        result = np.log(s) + m
    if zero_d:
        return result.reshape(())
    if not keepdims:
        result = result.reshape(tuple(n for i, n in enumerate(a.shape) if i not in axes))
    return result


def log_softmax_backward(grad_output, output, axis=-1):
    """``g - exp(y) * sum(g)`` along ``axis``."""
    g, axes, zero_d = _prepare(grad_output, axis)
    y, _, _ = _prepare(output, axis)
    with np.errstate(all="ignore"):
        return _back(g - np.exp(y) * np.sum(g, axis=axes, keepdims=True), zero_d)


def softmax_backward(grad_output, output, axis=-1):
    """``y * (g - sum(g * y))`` along ``axis``."""
    g, axes, zero_d = _prepare(grad_output, axis)
    y, _, _ = _prepare(output, axis)
    with np.errstate(all="ignore"):
        return _back(y * (g - np.sum(g * y, axis=axes, keepdims=True)), zero_d)
