"""linear_cross_entropy on the CPU: the rows taken in chunks, a chunk's logits never more than
one buffer.

A chunk's logits ``Z = X_c @ W.T + b`` go into one buffer, reused for every chunk; the CPU's
fused cross-entropy writes the chunk's gradient over them in its one pass (``grad_out=Z``); and
the matmuls ``dX_c = dZ @ W``, ``dW += dZ.T @ X_c`` go through NumPy's BLAS, a large chunk's cut
by classes into a part a BLAS thread (:mod:`.blas`).  A ``mean`` loss is a ``sum`` whose
gradient is scaled by the inverse of the whole call's denominator, known before the first chunk
from the targets alone, which are all checked before then.
"""

from __future__ import annotations

import numpy as np

from fastlsm import _spec
from fastlsm.backends import base
from fastlsm.backends.cpu import blas
from fastlsm.backends.cpu.loss import checked_class_indices, class_weights, cross_entropy

# The logits buffer of one chunk of rows.  Loss and all gradients, 2 threads, float32, against
# the three unchunked matmuls: 4096x512 -> 32000 1.22x in chunks of 32 MiB, 1.09x of 64 MiB
# (524 rows), 1.07x of 128 MiB; 8192x256 -> 32000 1.27x, 1.14x, and 1.11x of 96 MiB.  Two more
# interleaved runs, 64 against 80 MiB: 8192x256 1.15x against 1.115-1.117x, 4096x512 1.12-1.13x
# both.  80 MiB is 8% of the logits of 8192 rows of 32000 float32 classes.
DEFAULT_CHUNK_BYTES = 80 << 20


def linear_cross_entropy(spec: _spec.LinearLoss):
    """The loss (and gradients) of ``spec`` as ``fastlsm.linear_cross_entropy`` returns them."""
    chunked = _Chunked(spec)
    chunked.run()
    loss = chunked.loss()
    if not spec.loss.want_grad:
        return loss
    return (loss, *(g.astype(spec.result_dtype, copy=False) for g in chunked.gradients()))


def block_terms(spec: _spec.LinearLoss, scale: float, row_scales: np.ndarray | None):
    """What a block of rows adds to the whole call's results: its per-row losses (float64),
    and with a gradient the input's gradient (result dtype), and the weight's and bias's
    (compute dtype, float64), unscaled by any ``mean``: each row's gradient is ``scale`` times
    its ``row_scales`` (None: 1)."""
    chunked = _Chunked(spec, scale=scale, row_scales=row_scales)
    chunked.run()
    per_row = chunked.per_row.reshape(spec.loss.row_shape)
    return (per_row, *chunked.gradients()) if spec.loss.want_grad else (per_row,)


def _chunk_rows(chunk_bytes: int | None, classes: int, itemsize: int) -> int:
    if chunk_bytes is None:
        chunk_bytes = DEFAULT_CHUNK_BYTES
    return max(1, chunk_bytes // max(1, classes * itemsize))


class _Chunked:
    """One call's chunk loop and the arrays it fills.

    Each chunk's loss is summed for the call's ``mean`` or ``sum``, else kept a row: for
    ``none``, and for a Dask block's terms (:func:`block_terms`: given a ``scale``, each row's
    gradient is ``scale`` times its ``row_scales``).

    A chunk's products are cut by classes (:class:`~fastlsm.backends.cpu.blas.ClassParts`):
    each part fills its columns of the logits, then, from its columns of their gradient, its rows
    of the weight's gradient and its share of the input's gradient, which the parts' shares sum
    to.
    """

    def __init__(self, spec: _spec.LinearLoss, *, scale: float | None = None,
                 row_scales: np.ndarray | None = None):
        loss = spec.loss
        self.spec, self.loss_spec = spec, loss
        dtype = spec.compute_dtype
        x = spec.input.data
        self.features = x.reshape(spec.loss.n_rows, x.shape[-1])  # -1 fails where H = 0
        n, h = self.features.shape
        self.weight = spec.linear_weight.data.astype(dtype, copy=False)
        self.bias = None if spec.linear_bias is None else spec.linear_bias.data.astype(
            dtype, copy=False)
        if loss.probabilities:
            self.targets = np.asarray(loss.target.data).reshape(n, spec.n_classes)
            denominator = float(n)
        else:
            # Every target checked before the first chunk writes a gradient.
            self.targets, denominator = checked_class_indices(
                loss.target.data, class_weights(loss)[0], loss.ignore_index)
        self.denominator = denominator if loss.reduction == "mean" else 1.0
        self.reduced = loss.reduction != "none" and scale is None
        self.total = 0.0
        self.per_row = None if self.reduced else np.empty(n)
        # The gradient's factor: one for every row (a reduced loss), else one a row (or None: 1).
        self.factor = loss.grad_scale * base.mean_scale(loss.reduction, self.denominator)
        self.row_factors = None
        if scale is not None:
            self.row_factors = (np.full(n, scale) if row_scales is None
                                else np.asarray(row_scales, np.float64).reshape(n) * scale)
        elif loss.grad_loss is not None:
            self.row_factors = np.asarray(loss.grad_loss.data).reshape(n)
        self.chunk = min(_chunk_rows(spec.chunk_bytes, spec.n_classes, dtype.itemsize), n)
        work = self.chunk * spec.n_classes * h
        self.parts = blas.ClassParts(
            spec.n_classes, blas.blas_threads() if work >= blas.MIN_SPLIT_WORK else 1)
        if loss.want_grad:
            self.grad_input = np.empty((n, h), spec.result_dtype)
            # Each part's share of a chunk's input gradient, where one part does not write it
            # straight into grad_input.
            shared = len(self.parts) > 1 or spec.result_dtype != dtype
            self.input_shares = np.empty((len(self.parts), self.chunk, h) if shared
                                         else (0, 0, 0), dtype)
            # In the compute dtype: float32 or float64, also for float16 inputs.  Zeros (calloc:
            # no pass before the first chunk's product writes it), for a call without rows.
            self.grad_weight = np.zeros(self.weight.shape, dtype)
            self.grad_bias = None if self.bias is None else np.zeros(spec.n_classes, np.float64)
            self.add_product = blas.adding_gemm(dtype)
            self.weight_share = None  # without SciPy: a later chunk's dW, before it is added

    def run(self) -> None:
        n = self.features.shape[0]
        logits = np.empty((self.chunk, self.spec.n_classes), self.spec.compute_dtype)
        with self.parts:
            for start in range(0, n, max(self.chunk, 1)):
                stop = min(start + self.chunk, n)
                self._chunk(start, stop, logits[:stop - start])

    def _chunk(self, start: int, stop: int, z: np.ndarray) -> None:
        x = np.ascontiguousarray(self.features[start:stop], dtype=self.spec.compute_dtype)
        weight, bias = self.weight, self.bias

        def forward(part: int, first: int, last: int) -> None:
            np.matmul(x, weight[first:last].T, out=z[:, first:last])
            if bias is not None:
                z[:, first:last] += bias[first:last]
        self.parts.run(forward)
        self._loss(start, stop, z)
        if self.loss_spec.want_grad:
            self._backward(start, stop, x, z)

    def _loss(self, start: int, stop: int, z: np.ndarray) -> None:
        """The chunk's loss; with a gradient, written over its logits ``z``."""
        grad_loss = self.factor if self.reduced else (
            None if self.row_factors is None else self.row_factors[start:stop])
        result = cross_entropy(base.linear_chunk_loss(self.loss_spec, z, self.targets[start:stop],
                                                      self.reduced, grad_loss))
        value = result[0] if self.loss_spec.want_grad else result
        if self.reduced:
            self.total += float(value)
        else:
            self.per_row[start:stop] = value

    def _backward(self, start: int, stop: int, x: np.ndarray, dz: np.ndarray) -> None:
        weight = self.weight
        dx = self.grad_input[start:stop]
        shares = self.input_shares[:, :stop - start]
        if start > 0 and self.add_product is None and self.weight_share is None:
            self.weight_share = np.empty_like(self.grad_weight)

        def backward(part: int, first: int, last: int) -> None:
            dz_part = dz[:, first:last]
            np.matmul(dz_part, weight[first:last], out=shares[part] if len(shares) else dx)
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

    def loss(self):
        """The loss as ``linear_cross_entropy`` returns it, in the result dtype."""
        dtype, loss = self.spec.result_dtype, self.loss_spec
        if not self.reduced:
            per_row = self.per_row.reshape(loss.row_shape).astype(dtype)
            return per_row[()] if per_row.ndim == 0 else per_row
        with np.errstate(divide="ignore", invalid="ignore"):
            total = np.float64(self.total) / self.denominator  # 0 / 0 = nan: all ignored
        return dtype.type(total)

    def gradients(self) -> tuple[np.ndarray, ...]:
        """The input's gradient (result dtype, the input's shape), the weight's (compute dtype)
        and, with a bias, the bias's (float64)."""
        grads = (self.grad_input.reshape(self.spec.input.shape), self.grad_weight)
        return grads if self.grad_bias is None else grads + (self.grad_bias,)
