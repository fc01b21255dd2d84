"""cross_entropy and nll_loss with PyTorch's semantics (the public API).

As in :mod:`fastlsm._softmax`: the CPU's fast path for the plain call, else a spec
(:func:`fastlsm._spec.loss`) handed to the backend that serves it.
"""

from __future__ import annotations

from typing import Any

from numpy.typing import ArrayLike

from fastlsm import _spec
from fastlsm.backends import base


def cross_entropy(input: ArrayLike, target: ArrayLike, weight: ArrayLike | None = None,
                  ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, *, axis: int = 1, return_grad: bool = False,
                  grad_out: Any = None, z_loss: float = 0.0, return_lse: bool = False,
                  grad_loss: Any = None, softcap: float | None = None,
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
        rows with probability targets); all ignored, or an empty input, gives nan (rows of
        no classes have a loss of 0, an empty sum, as in PyTorch).  Where that sum is 0 with label
        smoothing, the smoothed sum is divided as a whole (``inf`` or nan); PyTorch divides its
        two terms apart, so it may give nan where fastlsm gives ``inf``.
    label_smoothing : float, optional
        At most 1: PyTorch's ``(1 - eps) * nll + eps / C * sum_c(-w_c * logp_c)``; 0, a
        negative number or nan is no smoothing, as in PyTorch.
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
    grad_loss : float or array_like, optional
        The gradient of the caller's objective with respect to the returned loss (with
        ``return_grad`` or ``grad_out``): a number for ``mean``/``sum``, an array of the loss's
        shape for ``none``.  The gradient returned is then ``loss.backward(grad_loss)``'s in
        PyTorch.  Default: 1 (for ``none``, ones: the gradient of the sum).
    softcap : float, optional
        Gemma 2's final-logit soft-capping: the loss is taken on ``softcap * tanh(input /
        softcap)``, in the same pass, and the gradient returned is with respect to the raw
        ``input``.  A positive finite number, or None (the default) for none.
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
    if grad_loss is None and softcap is None and base.runs_on_cpu(device) and (
            _spec.plain_cross_entropy(input, target, weight, ignore_index, reduction,
                                      label_smoothing, axis, grad_out, z_loss, return_lse)):
        result = base.get("cpu").plain_cross_entropy(input, target, ignore_index, reduction,
                                                     bool(return_grad), grad_out)
        if result is not None:
            return result
    spec = _spec.loss(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                      axis, return_grad, grad_out, return_lse, grad_loss=grad_loss,
                      softcap=softcap)
    return base.resolve(spec, device).cross_entropy(spec)


def nll_loss(input: ArrayLike, target: ArrayLike, weight: ArrayLike | None = None,
             ignore_index: int = -100, reduction: str = "mean", *, axis: int = 1,
             return_grad: bool = False, grad_out: Any = None, grad_loss: Any = None,
             device: str | None = None) -> Any:
    """Negative log-likelihood of class indices, from log-probabilities (PyTorch's ``nll_loss``).

    ``loss_n = -weight[t_n] * input[n, t_n]``; parameters, shapes and reductions as in
    :func:`cross_entropy` (class-index targets only, no smoothing; ``grad_loss`` and ``device``
    too).  With ``return_grad`` (or ``grad_out``) returns ``(loss, grad)``.

    Examples
    --------
    >>> import numpy as np, fastlsm
    >>> logp = np.log(np.array([[0.5, 0.5], [0.25, 0.75]]))
    >>> round(float(fastlsm.nll_loss(logp, np.array([0, 1]))), 4)
    0.4904
    """
    spec = _spec.loss(input, target, weight, ignore_index, reduction, 0.0, 0.0, axis, return_grad,
                      grad_out, False, probabilities_allowed=False, grad_loss=grad_loss)
    return base.resolve(spec, device).nll_loss(spec)
