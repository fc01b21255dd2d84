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
