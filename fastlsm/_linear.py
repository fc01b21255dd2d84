"""linear_cross_entropy: the cross-entropy of a linear head, its logits never materialised (the
public API).

Every argument is checked first (:func:`fastlsm._spec.linear_loss`): the head's shapes, then the
loss's options and targets as :func:`fastlsm.cross_entropy` checks them, so a bad call raises
before any gradient is written.  The backend where the input lives computes it: on the CPU
(:mod:`fastlsm.backends.cpu.linear`) and the GPU (:mod:`fastlsm.backends.cuda.linear`) a chunk
of rows at a time, on Dask a block of rows a task.
"""

from __future__ import annotations

from typing import Any

from numpy.typing import ArrayLike

from fastlsm import _spec
from fastlsm.backends import base


def linear_cross_entropy(input: ArrayLike, linear_weight: ArrayLike, target: ArrayLike, *,
                         linear_bias: ArrayLike | None = None, weight: ArrayLike | None = None,
                         ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, softcap: float | None = None,
                         z_loss: float = 0.0, return_grad: bool = False, grad_loss: Any = None,
                         chunk_bytes: int | None = None, device: str | None = None) -> Any:
    """Cross-entropy of the logits ``input @ linear_weight.T + linear_bias``, computed a chunk of
    rows at a time so the logits never exist in full.

    The same as ``cross_entropy(input @ linear_weight.T + linear_bias, target, axis=-1, ...)``
    (PyTorch's ``F.linear_cross_entropy``), in the memory of one chunk of logits.

    Parameters
    ----------
    input : array_like, dask.array.Array, CuPy array or PyTorch CUDA tensor
        Features of shape ``(..., H)``.  A Dask array gives lazy results, a block of rows a
        task (the features in one chunk), the weight's gradient summed over the blocks.  On a
        GPU the matmuls run in the input's own library (cuBLAS) and the loss in fastlsm's
        CUDA kernels; the results are of that library.
    linear_weight : array_like
        The head's weight, ``(C, H)`` as ``torch.nn.Linear`` stores it.
    target : array_like or dask.array.Array
        Class indices of shape ``(...)``, or class probabilities of shape ``(..., C)``.
    linear_bias : array_like, optional
        The head's bias, ``(C,)``.
    weight, ignore_index, reduction, label_smoothing, softcap, z_loss
        As in :func:`fastlsm.cross_entropy`.
    return_grad : bool, optional
        Also return the gradients of the loss with respect to ``input``, ``linear_weight`` and,
        where one is given, ``linear_bias``.
    grad_loss : float or array_like, optional
        As in :func:`fastlsm.cross_entropy`.
    chunk_bytes : int, optional
        The logits buffer's size in bytes, which sets how many rows a chunk has (at least
        one).  Default 80 MiB.
    device : {None, 'auto', 'cpu', 'cuda'}, optional
        As in :func:`fastlsm.cross_entropy`, but NumPy input runs on the CPU only (its matmuls
        are NumPy's): ``'cuda'`` with NumPy input is a ``TypeError``.

    Returns
    -------
    loss : scalar or ndarray
        As :func:`fastlsm.cross_entropy` returns it.
    grad_input, grad_linear_weight, grad_linear_bias : ndarray
        With ``return_grad``; ``grad_linear_bias`` only with a ``linear_bias``.  The
        gradients of ``linear_weight`` and ``linear_bias`` are summed over the chunks in float32
        or wider, whatever the inputs' dtype.

    Notes
    -----
    Inputs are computed in their dtype promoted as NumPy's ``@`` would (float16 in float32,
    integers in float64).  Beyond what it returns, a call holds the chunk's logits and, with
    ``return_grad``, each part's share of a chunk's input gradient (``(chunk rows, H)``);
    without SciPy, with more than one chunk, a ``(C, H)`` buffer for a chunk's share of the
    weight's gradient; float16 inputs add float32 copies of ``linear_weight`` and of the
    gradients.

    A large chunk's products are cut by classes into one part per BLAS thread, each run on a
    thread of its own with BLAS on one thread: OpenBLAS shares out a chunk's product less well
    than a whole one.  The BLAS thread count is lowered through ``threadpoolctl`` for the call
    and restored after; it is process-wide, so BLAS calls from other threads meanwhile run on
    one thread.

    Examples
    --------
    >>> import numpy as np, fastlsm
    >>> x = np.array([[1.0, 0.0], [0.0, 2.0]])
    >>> w = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> t = np.array([0, 2])
    >>> round(float(fastlsm.linear_cross_entropy(x, w, t)), 6)
    0.810309
    >>> round(float(fastlsm.cross_entropy(x @ w.T, t)), 6)
    0.810309
    """
    spec = _spec.linear_loss(input, linear_weight, target, linear_bias, weight, ignore_index,
                             reduction, label_smoothing, z_loss, softcap, return_grad, grad_loss,
                             chunk_bytes)
    return base.resolve(spec, device).linear_cross_entropy(spec)
