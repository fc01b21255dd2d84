"""A plain float64 NumPy reference for fastlsm.cross_entropy and fastlsm.nll_loss, and their gradients.

Written the obvious way from PyTorch's formulas (see shared/reference/semantics.md):

* ``logp = x - m - log(sum(exp(x - m)))`` with ``m`` the row max, shifted even where ``m`` is not
  finite (PyTorch's log_softmax), so a row holding +inf, a nan, or nothing but -inf is all nan.
* class indices ``t``: ``loss_n = (1 - eps) * -w[t_n] * logp[n, t_n] + eps / C * -sum_c w_c logp[n, c]
  + z * lse_n**2``, ignored rows 0; ``mean`` divides by ``sum(w[t_n])`` over non-ignored rows.
* probabilities ``y`` (``y <- y * (1 - eps) + eps / C`` first): ``loss_n = -sum_c w_c y_nc logp_nc
  + z * lse_n**2``; ``mean`` divides by the number of rows.
* gradient w.r.t. the logits, ``p = softmax(x_n)``, ``W = sum_c w_c``:
  class indices ``(1 - eps) * w_t * (p_j - [j == t]) + eps / C * (W * p_j - w_j) + 2 z lse_n p_j``,
  probabilities ``(sum_c w_c y_nc) * p_j - w_j * y_nj + 2 z lse_n p_j``; ignored rows 0;
  ``mean`` divides by the same denominator as the loss, ``none`` is the gradient of the sum.
* nll_loss: ``loss_n = -w[t_n] * x[n, t_n]``, gradient ``-w[t_n]`` at ``t_n`` (over the denominator
  for ``mean``), 0 elsewhere and on ignored rows.
* ``lse`` is the per-row log-sum-exp of every row (ignored ones too), with SciPy's rules for
  non-finite rows (as fastlsm.logsumexp): shift by the max only where it is finite.

Everything is computed in float64 from the input values, whatever their dtype.  ``axis`` names the
class axis; a 1-D input has its class axis at 0.  Results: ``loss`` (a float for 'mean'/'sum', an
array for 'none'), ``grad`` (the input's shape) and ``lse`` (the input's shape minus the class axis).
"""

from __future__ import annotations

import numpy as np


def class_axis(ndim, axis=1):
    """The class axis as a non-negative int: ``axis`` normalised, 0 for a 1-D input."""
    if ndim == 1:
        return 0
    return axis % ndim


def to_rows(x, axis):
    """``x`` (float64) with its class axis moved last and flattened to ``(rows, C)``; the moved shape."""
    x = np.asarray(x, dtype=np.float64)
    moved = np.moveaxis(x, class_axis(x.ndim, axis), -1)
    return moved.reshape(int(np.prod(moved.shape[:-1])), moved.shape[-1]), moved.shape


def from_rows(g, moved_shape, ndim, axis):
    """The inverse of :func:`to_rows` for an array of the input's shape."""
    return np.moveaxis(g.reshape(moved_shape), -1, class_axis(ndim, axis))


def torch_log_softmax(xr):
    """``log_softmax`` of ``(rows, C)`` float64 as PyTorch computes it (max shift even if not finite)."""
    with np.errstate(all="ignore"):
        m = np.max(xr, axis=1, keepdims=True) if xr.shape[1] else np.zeros((xr.shape[0], 1))
        shifted = xr - m
        return shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))


def row_lse(xr):
    """Per-row log-sum-exp with SciPy's rules (the max shift replaced by 0 where not finite)."""
    with np.errstate(all="ignore"):
        if xr.shape[1] == 0:
            return np.full(xr.shape[0], -np.inf)
        m = np.max(xr, axis=1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        return (m + np.log(np.sum(np.exp(xr - m), axis=1, keepdims=True)))[:, 0]


def _weights(weight, n_classes):
    if weight is None:
        return np.ones(n_classes)
    return np.asarray(weight, dtype=np.float64)


def _reduce(per_row, denominator, reduction, target_shape):
    if reduction == "none":
        return per_row.reshape(target_shape)
    total = float(np.sum(per_row))
    if reduction == "sum":
        return total
    with np.errstate(all="ignore"):
        return float(np.float64(total) / np.float64(denominator))


def _grad_scale(denominator, reduction):
    if reduction != "mean":
        return 1.0
    with np.errstate(all="ignore"):
        return 1.0 / np.float64(denominator)


def cross_entropy(x, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                  axis=1, z_loss=0.0):
    """``(loss, grad, lse)`` in float64.  Probability targets when ``target.shape == x.shape``."""
    x = np.asarray(x, dtype=np.float64)
    target = np.asarray(target)
    xr, moved_shape = to_rows(x, axis)
    n_rows, n_classes = xr.shape
    w = _weights(weight, n_classes)
    eps = float(label_smoothing)
    logp = torch_log_softmax(xr)
    lse = row_lse(xr)
    with np.errstate(all="ignore"):
        p = np.exp(logp)

    with np.errstate(all="ignore"):
        if target.shape == x.shape:  # class probabilities
            y, _ = to_rows(target, axis)
            if eps > 0 and n_classes:  # no classes: nothing to smooth
                y = y * (1.0 - eps) + eps / n_classes
            per_row = -np.sum(w * y * logp, axis=1)
            if z_loss > 0:
                per_row = per_row + z_loss * lse ** 2
            wy = np.sum(w * y, axis=1)
            grad = wy[:, None] * p - w * y + 2.0 * z_loss * lse[:, None] * p
            denominator = n_rows if x.size else np.nan  # PyTorch: an empty input's mean is nan
            out_shape = moved_shape[:-1]
            keep = np.ones(n_rows, dtype=bool)
        else:  # class indices
            t = target.reshape(-1).astype(np.int64)
            keep = t != ignore_index
            t_safe = np.where(keep, t, 0)
            rows = np.arange(n_rows)
            w_t = np.where(keep, w[t_safe] if n_classes else 0.0, 0.0)
            nll = -w_t * (logp[rows, t_safe] if n_classes else 0.0)
            smooth = -np.sum(w * logp, axis=1)
            per_row = (1.0 - eps) * nll
            if eps > 0:  # as PyTorch: no smoothing term at all (not 0 * inf) when eps is 0
                per_row = per_row + (eps / n_classes) * smooth
            if z_loss > 0:
                per_row = per_row + z_loss * lse ** 2
            per_row = np.where(keep, per_row, 0.0)
            onehot = np.zeros_like(xr)
            onehot[rows[keep], t[keep]] = 1.0
            grad = ((1.0 - eps) * w_t[:, None] * (p - onehot)
                    + (eps / n_classes) * (np.sum(w) * p - w)
                    + 2.0 * z_loss * lse[:, None] * p)
            denominator = np.sum(w_t)
            out_shape = target.shape

        loss = _reduce(per_row, denominator, reduction, out_shape)
        # ignored rows get 0 even where the 'mean' scale is 1 / 0 (everything ignored)
        grad = np.where(keep[:, None], grad * _grad_scale(denominator, reduction), 0.0)
    return (loss, from_rows(grad, moved_shape, x.ndim, axis), lse.reshape(moved_shape[:-1]))


def nll_loss(x, target, weight=None, ignore_index=-100, reduction="mean", axis=1):
    """``(loss, grad)`` in float64; ``x`` holds log-probabilities."""
    x = np.asarray(x, dtype=np.float64)
    target = np.asarray(target)
    xr, moved_shape = to_rows(x, axis)
    n_rows, n_classes = xr.shape
    w = _weights(weight, n_classes)
    t = target.reshape(-1).astype(np.int64)
    keep = t != ignore_index
    t_safe = np.where(keep, t, 0)
    rows = np.arange(n_rows)
    with np.errstate(all="ignore"):
        w_t = np.where(keep, w[t_safe] if n_classes else 0.0, 0.0)
        per_row = np.where(keep, -w_t * (xr[rows, t_safe] if n_classes else 0.0), 0.0)
        denominator = np.sum(w_t)
        loss = _reduce(per_row, denominator, reduction, target.shape)
        grad = np.zeros_like(xr)
        grad[rows[keep], t[keep]] = -w_t[keep]
        grad = np.where(keep[:, None], grad * _grad_scale(denominator, reduction), 0.0)
    return loss, from_rows(grad, moved_shape, x.ndim, axis)
