"""fastlsm.linear_cross_entropy on device arrays: PyTorch CUDA tensors and CuPy arrays, whose
own library does the matmuls (cuBLAS), against the CPU's results.  They run only where a GPU is
usable (skipped under the CUDA simulator, which has no matmul)."""

from __future__ import annotations

import numpy as np
import pytest

import fastlsm
from test_linear import head

F32 = np.float32


def _gpu_library(name: str):
    """PyTorch (with a usable CUDA device) or CuPy (with a GPU), else a skip."""
    module = pytest.importorskip(name)
    if name == "torch" and not module.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if name == "cupy":
        try:
            module.cuda.runtime.getDeviceCount()
        except Exception:  # CuPy raises its own CUDARuntimeError without a driver
            pytest.skip("needs a CUDA GPU")
    return module


@pytest.mark.parametrize("library", ["torch", "cupy"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [
    {}, {"weight": True, "ignore_index": 3, "label_smoothing": 0.1, "z_loss": 1e-3},
    {"softcap": 2.0}, {"probabilities": True},
], ids=lambda o: "-".join(o) or "plain")
def test_device_arrays_match_numpy(library, reduction, options, rng):
    """Device arrays (the matmuls in their own library, the loss in fastlsm's CUDA kernels)
    give the CPU's results, on the device."""
    module = _gpu_library(library)
    on_gpu = ((lambda a: module.tensor(a, device="cuda")) if library == "torch"
              else module.asarray)
    to_host = (lambda a: a.cpu().numpy()) if library == "torch" else module.asnumpy
    x, w, b = head(rng, dtype=F32)
    options = dict(options)
    if options.pop("weight", False):
        options["weight"] = rng.uniform(0.5, 2.0, 11).astype(F32)
    target = (rng.dirichlet(np.ones(11), 7).astype(F32) if options.pop("probabilities", False)
              else rng.integers(0, 11, 7))
    kwargs = dict(reduction=reduction, return_grad=True, chunk_bytes=3 * 11 * 4, **options)
    expected = fastlsm.linear_cross_entropy(x, w, target, linear_bias=b, **kwargs)
    if "weight" in kwargs:
        kwargs["weight"] = on_gpu(kwargs["weight"])
    result = fastlsm.linear_cross_entropy(on_gpu(x), on_gpu(w), on_gpu(target),
                                          linear_bias=on_gpu(b), **kwargs)
    assert len(result) == 4
    for got, want in zip(result, expected):
        assert type(got).__module__.split(".")[0] == library
        np.testing.assert_allclose(to_host(got), want, rtol=2e-5, atol=2e-5)


def test_device_targets_out_of_range_raise_first(rng):
    torch = _gpu_library("torch")
    x, w, _ = head(rng, dtype=F32)
    target = np.zeros(7, int)
    target[5] = 11
    with pytest.raises(IndexError, match=r"Target 11 is out of bounds. \(target\[5\] with 11 "):
        fastlsm.linear_cross_entropy(torch.tensor(x, device="cuda"),
                                     torch.tensor(w, device="cuda"),
                                     torch.tensor(target, device="cuda"), return_grad=True,
                                     chunk_bytes=3 * 11 * 4)


def test_torch_operations_on_cpu_tensors(rng):
    """The GPU chunk loop's PyTorch operations, on CPU tensors (the same calls as on CUDA)."""
    torch = pytest.importorskip("torch")
    from fastlsm.backends.cuda.linear import _Torch
    ops = _Torch("cpu")
    a = rng.standard_normal((5, 3)).astype(F32)
    b = rng.standard_normal((3, 4)).astype(F32)
    empty = ops.empty((5, 4), np.dtype(np.float64))
    assert empty.dtype == torch.float64 and tuple(empty.shape) == (5, 4)
    ta = ops.as_dtype(a, np.dtype(F32))
    assert ta.dtype == torch.float32
    assert ops.as_dtype(ta, np.dtype(F32)).data_ptr() == ta.data_ptr()  # no copy
    grad = torch.tensor(a, requires_grad=True)
    assert not ops.as_dtype(grad, np.dtype(F32)).requires_grad  # out= takes no graph
    c = ops.empty((5, 4), np.dtype(F32))
    ops.matmul(ta, ops.as_dtype(b, np.dtype(F32)), c)
    np.testing.assert_allclose(c.numpy(), a @ b, rtol=1e-6)
    ops.add_matmul(c, ta, ops.as_dtype(b, np.dtype(F32)))
    np.testing.assert_allclose(c.numpy(), 2 * (a @ b), rtol=1e-6)
    sums = ops.column_sums(ta)
    assert sums.dtype == torch.float64
    np.testing.assert_allclose(sums.numpy(), a.sum(axis=0, dtype=np.float64), rtol=1e-12)
    assert ops.scalar(0.5, np.dtype(np.float16)).dtype == torch.float16
