"""linear_cross_entropy on the GPU, for PyTorch CUDA tensors and CuPy arrays: a chunk of rows at a
time, as on the CPU (:mod:`fastlsm.backends.cpu.linear`), the matmuls in cuBLAS through the
input's own library and each chunk's loss in fastlsm's CUDA kernels, its gradient written over
the chunk's logits.

Every class index is range-checked on the device before the first chunk (the check of
:func:`.loss.cross_entropy`, one round trip), so a bad target raises before anything is written.
A reduced loss's chunk sums come back to the host a chunk at a time (a synchronisation a chunk of
many rows).  Numba device arrays have no matmul and NumPy input belongs on the CPU:
:meth:`~.backend.CudaBackend.supports` refuses both.
"""

from __future__ import annotations

import numpy as np

from fastlsm import _spec
from fastlsm.backends import base
from fastlsm.backends.cuda import arrays, loss

# The logits buffer of one chunk of rows, as on the CPU (where it is measured).
DEFAULT_CHUNK_BYTES = 80 << 20


class _Torch:
    """The chunk loop's array operations for PyTorch tensors on ``device``."""

    def __init__(self, device):
        import torch
        self.torch, self.device = torch, device

    def empty(self, shape: tuple[int, ...], dtype: np.dtype):
        return self.torch.empty(shape, dtype=getattr(self.torch, dtype.name), device=self.device)

    def as_dtype(self, a, dtype: np.dtype):
        """``a`` (a tensor or host data) on the device in ``dtype``, out of autograd's graph
        (``out=`` takes no tensor that requires grad); no copy where it is already."""
        tensor = self.torch.as_tensor(a, device=self.device).detach()
        return tensor.to(getattr(self.torch, dtype.name))

    def matmul(self, a, b, out) -> None:
        self.torch.matmul(a, b, out=out)

    def add_matmul(self, c, a, b) -> None:
        c.addmm_(a, b)

    def column_sums(self, a):
        return a.sum(dim=0, dtype=self.torch.float64)

    def scalar(self, value: float, dtype: np.dtype):
        return self.torch.tensor(value, dtype=getattr(self.torch, dtype.name), device=self.device)


class _CuPy:
    """The chunk loop's array operations for CuPy arrays (on the current device)."""

    def __init__(self, device):
        import cupy
        self.cupy = cupy

    def empty(self, shape: tuple[int, ...], dtype: np.dtype):
        return self.cupy.empty(shape, dtype)

    def as_dtype(self, a, dtype: np.dtype):
        return self.cupy.asarray(a, dtype=dtype)

    def matmul(self, a, b, out) -> None:
        self.cupy.matmul(a, b, out=out)

    def add_matmul(self, c, a, b) -> None:
        c += a @ b

    def column_sums(self, a):
        return a.sum(axis=0, dtype=self.cupy.float64)

    def scalar(self, value: float, dtype: np.dtype):
        return self.cupy.asarray(value, dtype=dtype)


LIBRARIES = {"torch": _Torch, "cupy": _CuPy}


def linear_cross_entropy(spec: _spec.LinearLoss):
    x = spec.input.data
    ops = LIBRARIES[arrays.library(x)](getattr(x, "device", None))
    return _Chunked(spec, ops).run()


class _Chunked:
    """One call's chunk loop on the device, in the input's library (``ops``)."""

    def __init__(self, spec: _spec.LinearLoss, ops):
        self.spec, self.ops = spec, ops
        target = spec.loss
        dtype = spec.compute_dtype
        x = spec.input.data
        self.features = x.reshape(spec.loss.n_rows, x.shape[-1])  # -1 fails where H = 0
        n = self.features.shape[0]
        self.weight = ops.as_dtype(spec.linear_weight.data, dtype)
        self.bias = None if spec.linear_bias is None else ops.as_dtype(spec.linear_bias.data,
                                                                        dtype)
        if target.probabilities:
            self.targets = target.target.data.reshape(n, spec.n_classes)
            denominator = float(n)
        else:
            like = arrays.on_device(spec.input)
            weight = loss.class_weights(target, like, need_total=False)[0]
            self.targets, denominator = loss.class_indices(target, weight, like)
        self.denominator = denominator if target.reduction == "mean" else 1.0
        self.factor = target.grad_scale * base.mean_scale(target.reduction, self.denominator)
        self.row_factors = (None if target.grad_loss is None
                            else target.grad_loss.data.reshape(n))
        chunk_bytes = spec.chunk_bytes or DEFAULT_CHUNK_BYTES
        self.chunk = max(1, min(chunk_bytes // max(1, spec.n_classes * dtype.itemsize), n))

    def run(self):
        spec, ops, dtype = self.spec, self.ops, self.spec.compute_dtype
        want_grad = spec.loss.want_grad
        n, h = self.features.shape
        reduced = spec.loss.reduction != "none"
        total = 0.0
        per_row = None if reduced else ops.empty((n,), np.dtype(np.float64))
        if want_grad:
            grad_input = ops.empty((n, h), spec.result_dtype)
            grad_weight = ops.empty(tuple(spec.linear_weight.shape), dtype)
            if n == 0:
                grad_weight[...] = 0  # no chunk's product writes it
            grad_bias = (None if self.bias is None
                         else ops.as_dtype(np.zeros(spec.n_classes), np.dtype(np.float64)))
        logits = ops.empty((self.chunk, spec.n_classes), dtype)
        for start in range(0, n, self.chunk):
            stop = min(start + self.chunk, n)
            x = ops.as_dtype(self.features[start:stop], dtype)
            z = logits[:stop - start]
            ops.matmul(x, self.weight.T, z)
            if self.bias is not None:
                z += self.bias
            value = self._loss(start, stop, z, reduced)
            if reduced:
                total += float(value)
            else:
                per_row[start:stop] = value
            if not want_grad:
                continue
            dx = grad_input[start:stop]
            if dx.dtype == z.dtype:
                ops.matmul(z, self.weight, dx)
            else:
                dx[...] = z @ self.weight
            if start == 0:
                ops.matmul(z.T, x, grad_weight)
            else:
                ops.add_matmul(grad_weight, z.T, x)
            if grad_bias is not None:
                grad_bias += ops.column_sums(z)
        result_dtype = spec.result_dtype
        if reduced:
            with np.errstate(divide="ignore", invalid="ignore"):
                value = ops.scalar(np.float64(total) / self.denominator, result_dtype)
        else:
            value = ops.as_dtype(per_row.reshape(spec.loss.row_shape), result_dtype)
        if not want_grad:
            return value
        grads = [grad_input.reshape(spec.input.shape), grad_weight, grad_bias]
        return (value, *(ops.as_dtype(g, result_dtype) for g in grads if g is not None))

    def _loss(self, start: int, stop: int, z, reduced: bool):
        """The chunk's loss; with a gradient, written over its logits ``z``."""
        grad_loss = self.factor if reduced else (
            None if self.row_factors is None else self.row_factors[start:stop])
        result = loss.cross_entropy(base.linear_chunk_loss(self.spec.loss, z,
                                                           self.targets[start:stop], reduced,
                                                           grad_loss))
        return result[0] if self.spec.loss.want_grad else result
