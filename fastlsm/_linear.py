"""linear_cross_entropy: the cross-entropy of a linear head, its logits never materialised (the
public API).

Every argument is checked first: the head's shapes here, the loss's options and targets by
:func:`fastlsm._spec.loss` on a stand-in of the logits' shape that owns no memory, and every
class index against the class count, so a bad call raises before any gradient is written.  The
rows are then taken in chunks: a chunk's logits ``Z = X_c @ W.T + b`` go into one buffer, reused
for every chunk; :func:`fastlsm.cross_entropy` writes the chunk's gradient over them in its one
fused pass (``grad_out=Z``); and the matmuls ``dX_c = dZ @ W``, ``dW += dZ.T @ X_c`` go through
NumPy's BLAS, a large chunk's cut by classes into a part a BLAS thread
(:mod:`fastlsm.backends.cpu.blas`).

A ``mean`` loss is a ``sum`` whose gradient is scaled by the inverse of the whole call's
denominator, known before the first chunk from the targets alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from fastlsm import _loss, _spec
from fastlsm.backends import base
from fastlsm.backends.cpu import blas

# The logits buffer of one chunk of rows.  Loss and all gradients, 2 threads, float32, against
# the three unchunked matmuls: 4096x512 -> 32000 1.22x in chunks of 32 MiB, 1.09x of 64 MiB
# (524 rows), 1.07x of 128 MiB; 8192x256 -> 32000 1.27x, 1.14x, and 1.11x of 96 MiB.  64 MiB is
# 6.4% of the logits of 8192 rows of 32000 float32 classes.
DEFAULT_CHUNK_BYTES = 64 << 20


def linear_cross_entropy(input: ArrayLike, linear_weight: ArrayLike, target: ArrayLike, *,
                         linear_bias: ArrayLike | None = None, weight: ArrayLike | None = None,
                         ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, softcap: float | None = None,
                         z_loss: float = 0.0, return_grad: bool = False, grad_loss: Any = None,
                         chunk_bytes: int | None = None) -> Any:
    """Cross-entropy of the logits ``input @ linear_weight.T + linear_bias``, computed a chunk of
    rows at a time so the logits never exist in full.

    The same as ``cross_entropy(input @ linear_weight.T + linear_bias, target, axis=-1, ...)``
    (PyTorch's ``F.linear_cross_entropy``), in the memory of one chunk of logits.

    Parameters
    ----------
    input : array_like
        Features of shape ``(..., H)``.
    linear_weight : array_like
        The head's weight, ``(C, H)`` as ``torch.nn.Linear`` stores it.
    target : array_like
        Class indices of shape ``(...)``, or class probabilities of shape ``(..., C)``.
    linear_bias : array_like, optional
        The head's bias, ``(C,)``.
    weight, ignore_index, reduction, label_smoothing, softcap, z_loss, grad_loss
        As in :func:`fastlsm.cross_entropy`.
    return_grad : bool, optional
        Also return the gradients of the loss with respect to ``input``, ``linear_weight`` and,
        where one is given, ``linear_bias``.
    chunk_bytes : int, optional
        The logits buffer's size in bytes, which sets how many rows a chunk has (at least
        one).  Default :data:`DEFAULT_CHUNK_BYTES` (64 MiB).

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
    head = _head(input, linear_weight, linear_bias)
    _check_target_shape(head, target)
    loss_spec = _spec.loss(_logits_stand_in(head), target, weight, ignore_index, reduction,
                           label_smoothing, z_loss, -1, return_grad, None, False,
                           grad_loss=grad_loss, softcap=softcap)
    rows = head.features.shape[0]
    targets = np.asarray(loss_spec.target.data)
    targets = targets.reshape((rows, -1) if loss_spec.probabilities else (rows,))
    if not loss_spec.probabilities:
        _check_class_indices(targets, loss_spec)
    chunk = _chunk_rows(chunk_bytes, head.classes, head.compute_dtype.itemsize)
    return _Chunked(head, loss_spec, targets, chunk).run()


class _Head:
    """The head's arrays, checked and in the compute dtype: ``features`` ``(N, H)``,
    ``weight`` ``(C, H)``, ``bias`` ``(C,)`` or None."""

    def __init__(self, input, linear_weight, linear_bias):
        x = _spec.as_real_array(input, "input")
        w = _spec.as_real_array(linear_weight, "linear_weight")
        b = None if linear_bias is None else _spec.as_real_array(linear_bias, "linear_bias")
        if x.ndim == 0:
            raise ValueError("input must have at least 1 dimension (the features), got a 0-d "
                             "array")
        if w.ndim != 2:
            raise ValueError(f"linear_weight must be 2-D, (classes, features) as in "
                             f"torch.nn.Linear, got shape {w.shape}")
        if w.shape[1] != x.shape[-1]:
            raise ValueError(f"input of shape {x.shape} has {x.shape[-1]} features, but "
                             f"linear_weight of shape {w.shape} takes {w.shape[1]}")
        if b is not None and b.shape != (w.shape[0],):
            raise ValueError(f"linear_bias must have shape ({w.shape[0]},), one per class of "
                             f"linear_weight {w.shape}, got {b.shape}")
        dtypes = [a.dtype for a in (x, w, b) if a is not None]
        self.result_dtype = _spec.result_dtype(np.result_type(*dtypes), "input")
        self.compute_dtype = _spec.compute_dtype(self.result_dtype)
        self.input_shape = x.shape
        self.classes = w.shape[0]
        self.features = x.reshape(-1, x.shape[-1])
        self.weight = w.astype(self.compute_dtype, copy=False)
        self.bias = None if b is None else b.astype(self.compute_dtype, copy=False)


def _head(input, linear_weight, linear_bias) -> _Head:
    for name, value in (("input", input), ("linear_weight", linear_weight),
                        ("linear_bias", linear_bias)):
        if value is not None and _spec.placement(value) != _spec.HOST:
            raise TypeError(f"linear_cross_entropy takes NumPy arrays (or anything np.asarray "
                            f"takes); {name} is a {type(value).__name__} on another device, "
                            "which it does not support yet")
    return _Head(input, linear_weight, linear_bias)


def _logits_stand_in(head: _Head) -> np.ndarray:
    """An array of the logits' shape and dtype that owns one element: what the loss's checks
    read (shape, dtype, where it lives) without the logits existing."""
    shape = head.input_shape[:-1] + (head.classes,)
    return np.broadcast_to(np.zeros((), head.result_dtype), shape)


def _check_target_shape(head: _Head, target) -> None:
    shape = _spec.describe(target, "target", _spec.HOST, real=False).shape
    rows = head.input_shape[:-1]
    if shape not in (rows, rows + (head.classes,)):
        raise ValueError(f"target has shape {shape}, but input of shape {head.input_shape} and "
                         f"linear_weight of shape {head.weight.shape} need class indices of "
                         f"shape {rows} or probabilities of shape {rows + (head.classes,)}")


def _check_class_indices(targets: np.ndarray, spec: _spec.Loss) -> None:
    """Every class index in ``[0, C)`` or ``ignore_index``, before a chunk writes anything."""
    bad = (targets < 0) | (targets >= spec.n_classes)
    if targets.size:
        bad &= targets != spec.ignore_index
    if bad.any():
        flat = int(np.flatnonzero(bad)[0])
        position = np.unravel_index(flat, spec.row_shape) if spec.row_shape else ()
        raise _spec.target_out_of_bounds(targets[flat], position, spec.n_classes)


def _chunk_rows(chunk_bytes: int | None, classes: int, itemsize: int) -> int:
    if chunk_bytes is None:
        chunk_bytes = DEFAULT_CHUNK_BYTES
    elif type(chunk_bytes) is not int and not isinstance(chunk_bytes, np.integer):
        raise TypeError(f"chunk_bytes must be an int (bytes), got {chunk_bytes!r}")
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    return max(1, int(chunk_bytes) // max(1, classes * itemsize))


def _denominator(spec: _spec.Loss, targets: np.ndarray) -> float:
    """What ``mean`` divides the summed loss by: the rows' count for probability targets, else
    the weights (or count) of the targets that are not ``ignore_index``."""
    if spec.probabilities:
        return float(targets.shape[0])
    kept = targets[targets != spec.ignore_index]
    if spec.weight is None:
        return float(kept.size)
    return float(np.asarray(spec.weight.data, np.float64)[kept].sum())


class _Chunked:
    """One call's chunk loop and the arrays it fills.

    A chunk's products are cut by classes (:class:`~fastlsm.backends.cpu.blas.ClassParts`):
    each part fills its columns of the logits, then, from its columns of their gradient, its rows
    of the weight's gradient and its share of the input's gradient, which the parts' shares sum
    to.
    """

    def __init__(self, head: _Head, spec: _spec.Loss, targets: np.ndarray, chunk: int):
        self.head, self.spec, self.targets, self.chunk = head, spec, targets, chunk
        n, h = head.features.shape
        chunk = min(chunk, n)
        work = chunk * head.classes * h
        self.parts = blas.ClassParts(
            head.classes, blas.blas_threads() if work >= blas.MIN_SPLIT_WORK else 1)
        self.reduced = spec.reduction != "none"
        self.per_row = None if self.reduced else np.empty(n, head.result_dtype)
        self.total = 0.0
        self.denominator = _denominator(spec, targets) if spec.reduction == "mean" else 1.0
        self.grad_loss = None
        if spec.want_grad:
            self.grad_scale = spec.grad_scale * base.mean_scale(spec.reduction, self.denominator)
            self.grad_loss = None if spec.grad_loss is None else np.asarray(
                spec.grad_loss.data).reshape(n)
            self.grad_input = np.empty((n, h), head.result_dtype)
            # Each part's share of a chunk's input gradient, where one part does not write it
            # straight into grad_input.
            shared = len(self.parts) > 1 or head.result_dtype != head.compute_dtype
            self.input_shares = np.empty((len(self.parts), chunk, h) if shared else (0, 0, 0),
                                         head.compute_dtype)
            # In the compute dtype: float32 or float64, also for float16 inputs.
            self.grad_weight = np.empty(head.weight.shape, head.compute_dtype)
            self.grad_bias = None if head.bias is None else np.zeros(head.classes, np.float64)
            self.add_product = blas.adding_gemm(head.compute_dtype)
            self.weight_share = None  # without SciPy: a later chunk's dW, before it is added

    def run(self):
        n = self.head.features.shape[0]
        logits = np.empty((min(self.chunk, n), self.head.classes), self.head.compute_dtype)
        with self.parts:
            for start in range(0, n, self.chunk):
                stop = min(start + self.chunk, n)
                self._chunk(start, stop, logits[:stop - start])
        return self._results()

    def _chunk(self, start: int, stop: int, z: np.ndarray) -> None:
        head, spec = self.head, self.spec
        x = np.ascontiguousarray(head.features[start:stop], dtype=head.compute_dtype)

        def forward(part: int, first: int, last: int) -> None:
            np.matmul(x, head.weight[first:last].T, out=z[:, first:last])
            if head.bias is not None:
                z[:, first:last] += head.bias[first:last]
        self.parts.run(forward)
        options = dict(weight=None if spec.weight is None else spec.weight.data,
                       ignore_index=spec.ignore_index, label_smoothing=spec.label_smoothing,
                       axis=-1, z_loss=spec.z_loss, softcap=spec.softcap or None)
        target = self.targets[start:stop]
        if not spec.want_grad:
            loss = _loss.cross_entropy(z, target, reduction="sum" if self.reduced else "none",
                                       **options)
            self._add_loss(start, stop, loss)
            return
        if self.reduced:
            loss, _ = _loss.cross_entropy(z, target, reduction="sum", grad_out=z,
                                          grad_loss=self.grad_scale, **options)
        else:
            grad_loss = None if self.grad_loss is None else self.grad_loss[start:stop]
            loss, _ = _loss.cross_entropy(z, target, reduction="none", grad_out=z,
                                          grad_loss=grad_loss, **options)
        self._add_loss(start, stop, loss)
        self._backward(start, stop, x, z)

    def _add_loss(self, start: int, stop: int, loss) -> None:
        if self.reduced:
            self.total += float(loss)
        else:
            self.per_row[start:stop] = loss

    def _backward(self, start: int, stop: int, x: np.ndarray, dz: np.ndarray) -> None:
        head = self.head
        dx = self.grad_input[start:stop]
        shares = self.input_shares[:, :stop - start]
        if start > 0 and self.add_product is None and self.weight_share is None:
            self.weight_share = np.empty_like(self.grad_weight)

        def backward(part: int, first: int, last: int) -> None:
            dz_part = dz[:, first:last]
            np.matmul(dz_part, head.weight[first:last], out=shares[part] if len(shares) else dx)
            dw = self.grad_weight[first:last]
            if start == 0:
                np.matmul(dz_part.T, x, out=dw)
            elif self.add_product is not None:
                # dW += dZ.T @ X_c in place: BLAS's own accumulation, where NumPy's matmul
                # would need a buffer for the chunk's share and a pass to add it.
                self.add_product(dw, dz_part.T, x)
            else:
                share = self.weight_share[first:last]
                np.matmul(dz_part.T, x, out=share)
                dw += share
            if self.grad_bias is not None:
                self.grad_bias[first:last] += dz_part.sum(axis=0, dtype=np.float64)
        self.parts.run(backward)
        if len(shares):
            for share in shares[1:]:
                shares[0] += share
            dx[...] = shares[0]

    def _results(self):
        head, spec = self.head, self.spec
        if self.reduced:
            with np.errstate(divide="ignore", invalid="ignore"):
                total = np.float64(self.total) / self.denominator  # 0 / 0 = nan: all ignored
            loss = head.result_dtype.type(total)
        else:
            loss = self.per_row.reshape(head.input_shape[:-1])
        if not spec.want_grad:
            return loss
        grads = (self.grad_input.reshape(head.input_shape),
                 self.grad_weight.astype(head.result_dtype, copy=False))
        if self.grad_bias is not None:
            grads += (self.grad_bias.astype(head.result_dtype),)
        return (loss, *grads)
