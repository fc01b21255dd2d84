"""fastlsm.linear_cross_entropy against the float64 reference on materialised logits, against
PyTorch's F.linear_cross_entropy where installed, its errors, and the memory it holds."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import fastlsm
from fastlsm.backends.cpu import blas
import loss_reference as ref

F32, F64 = np.float32, np.float64


def head(rng, rows=(7,), features=5, classes=11, dtype=F64, bias=True):
    x = rng.standard_normal(rows + (features,)).astype(dtype)
    w = (rng.standard_normal((classes, features)) / np.sqrt(features)).astype(dtype)
    b = rng.standard_normal(classes).astype(dtype) if bias else None
    return x, w, b


def reference(x, w, b, target, *, weight=None, ignore_index=-100, reduction="mean",
              label_smoothing=0.0, z_loss=0.0, softcap=None, grad_loss=None):
    """``(loss, dx, dw, db)`` in float64 from the materialised logits."""
    x64, w64 = x.astype(F64), w.astype(F64)
    z = x64 @ w64.T + (0.0 if b is None else b.astype(F64))
    capped = z if softcap is None else softcap * np.tanh(z / softcap)
    loss, grad, _ = ref.cross_entropy(capped, target, weight, ignore_index, reduction,
                                      label_smoothing, axis=-1, z_loss=z_loss)
    if grad_loss is not None:
        g = np.asarray(grad_loss, F64)
        grad = grad * (g[..., None] if g.ndim else g)
    if softcap is not None:
        grad = grad * (1.0 - np.tanh(z / softcap) ** 2)
    dz = grad.reshape(-1, w.shape[0])
    x2 = x64.reshape(dz.shape[0], w.shape[1])
    return loss, (dz @ w64).reshape(x.shape), dz.T @ x2, dz.sum(axis=0)


def assert_matches(result, expected, rtol):
    for got, want in zip(result, expected):
        np.testing.assert_allclose(np.asarray(got, F64), want, rtol=rtol, atol=rtol)


# Chunks of 1 row, 3 rows (the last one short) and every row at once.
CHUNKS = [1, 3, None]


@pytest.fixture(params=["scipy-gemm", "numpy"], autouse=True)
def weight_gradient_sum(request, monkeypatch):
    """Every test twice: the weight gradient summed over chunks by SciPy's BLAS (where SciPy
    is installed) and by NumPy alone."""
    if request.param == "numpy":
        monkeypatch.setattr(blas, "adding_gemm", lambda dtype: None)
    elif blas.adding_gemm(np.dtype(F64)) is None:
        pytest.skip("SciPy is not installed")
    return request.param


@pytest.fixture(params=["inline", "class-parts"], autouse=True)
def class_parts(request, monkeypatch):
    """Every test twice more: each chunk's products in one call, and cut by classes into three
    parts on threads of their own, as a large chunk is."""
    if request.param == "class-parts":
        monkeypatch.setattr(blas, "MIN_SPLIT_WORK", 0)
        monkeypatch.setattr(blas, "blas_threads", lambda: 3)
    return request.param


def chunk_bytes(rows, classes, dtype):
    return None if rows is None else rows * classes * np.dtype(dtype).itemsize


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [
    {}, {"weight": True}, {"ignore_index": 3}, {"label_smoothing": 0.2}, {"z_loss": 1e-2},
    {"softcap": 2.0}, {"weight": True, "ignore_index": 3, "label_smoothing": 0.1, "z_loss": 1e-3},
], ids=lambda o: "-".join(o) or "plain")
def test_class_indices_match_materialised_logits(options, reduction, chunk, rng):
    x, w, b = head(rng)
    target = rng.integers(0, 11, 7)
    target[[1, 4]] = 3  # ignored where ignore_index=3
    options = dict(options)
    if options.pop("weight", False):
        options["weight"] = rng.uniform(0.5, 2.0, 11)
    expected = reference(x, w, b, target, reduction=reduction, **options)
    result = fastlsm.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction,
                                          return_grad=True, chunk_bytes=chunk_bytes(chunk, 11, F64),
                                          **options)
    assert len(result) == 4
    assert_matches(result, expected, 1e-12)
    loss = fastlsm.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction,
                                        chunk_bytes=chunk_bytes(chunk, 11, F64), **options)
    np.testing.assert_allclose(loss, expected[0], rtol=1e-12)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_probabilities_and_batch_dims(chunk, rng):
    x, w, b = head(rng, rows=(2, 3), bias=False)
    target = rng.dirichlet(np.ones(11), (2, 3))
    for reduction in ("mean", "none"):
        expected = reference(x, w, None, target, reduction=reduction, label_smoothing=0.1)
        loss, dx, dw = fastlsm.linear_cross_entropy(
            x, w, target, reduction=reduction, label_smoothing=0.1, return_grad=True,
            chunk_bytes=chunk_bytes(chunk, 11, F64))
        assert dx.shape == x.shape and dw.shape == w.shape
        assert np.shape(loss) == ((2, 3) if reduction == "none" else ())
        assert_matches((loss, dx, dw), expected, 1e-12)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_grad_loss(chunk, rng):
    x, w, b = head(rng)
    target = rng.integers(0, 11, 7)
    g = rng.standard_normal(7)
    for reduction, grad_loss in (("none", g), ("mean", 0.5), ("sum", -2.0)):
        expected = reference(x, w, b, target, reduction=reduction, grad_loss=grad_loss)
        result = fastlsm.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction,
                                              return_grad=True, grad_loss=grad_loss,
                                              chunk_bytes=chunk_bytes(chunk, 11, F64))
        assert_matches(result, expected, 1e-12)


def test_one_row_of_features(rng):
    x, w, b = head(rng, rows=())
    loss, dx, dw, db = fastlsm.linear_cross_entropy(x, w, np.array(4), linear_bias=b,
                                                    return_grad=True)
    assert dx.shape == x.shape
    assert_matches((loss, dx, dw, db), reference(x, w, b, np.array(4)), 1e-12)


def test_every_target_ignored_gives_nan_and_zero_gradients(rng):
    x, w, b = head(rng)
    loss, dx, dw, db = fastlsm.linear_cross_entropy(x, w, np.full(7, -100), linear_bias=b,
                                                    return_grad=True, chunk_bytes=3 * 11 * 8)
    assert np.isnan(loss)
    assert not dx.any() and not dw.any() and not db.any()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_rows_gives_zero_gradients(reduction, rng):
    """N = 0: no chunk runs, and the weight's gradient is still written: zeros."""
    _, w, b = head(rng)
    loss, dx, dw, db = fastlsm.linear_cross_entropy(
        np.zeros((0, 5)), w, np.zeros(0, np.int64), linear_bias=b, reduction=reduction,
        return_grad=True)
    assert dx.shape == (0, 5) and dw.shape == w.shape and db.shape == b.shape
    assert not dw.any() and not db.any()
    if reduction == "none":
        assert loss.shape == (0,)
    else:
        assert np.isnan(loss) if reduction == "mean" else loss == 0


@pytest.mark.parametrize("bias", [True, False])
def test_no_features(bias, rng):
    """H = 0: the logits are the bias, or zeros (a loss of log C), as PyTorch has them."""
    x, w, b = head(rng, features=0, bias=bias)
    t = np.array([0, 1, 2, 3, 4, 5, 6])
    result = fastlsm.linear_cross_entropy(x, w, t, linear_bias=b, return_grad=True)
    assert_matches(result, reference(x, w, b, t), 1e-12)
    if not bias:
        np.testing.assert_allclose(result[0], np.log(11), rtol=1e-15)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_reversed_rows(chunk, rng):
    """``x[::-1]``: each 1-row chunk of it keeps a negative stride BLAS is given no step of."""
    x, w, b = head(rng)
    t = np.array([0, 5, 10, 3, 3, 7, 1])
    result = fastlsm.linear_cross_entropy(x[::-1], w, t, linear_bias=b, return_grad=True,
                                          chunk_bytes=chunk_bytes(chunk, 11, F64))
    assert_matches(result, reference(x[::-1].copy(), w, b, t), 1e-12)


@pytest.mark.parametrize("dtype, rtol", [(F32, 2e-5), (np.float16, 2e-2)])
def test_float32_and_float16(dtype, rtol, rng):
    x, w, b = head(rng, rows=(64,), features=16, classes=300, dtype=dtype)
    target = rng.integers(0, 300, 64)
    loss, dx, dw, db = fastlsm.linear_cross_entropy(x, w, target, linear_bias=b,
                                                    return_grad=True, chunk_bytes=4 * 300 * 4)
    assert {loss.dtype, dx.dtype, dw.dtype, db.dtype} == {np.dtype(dtype)}
    assert_matches((loss, dx, dw, db), reference(x, w, b, target), rtol)


def test_float16_weight_gradient_is_summed_in_float32(rng):
    """16 chunks of one row each: a float16 running sum would lose ~2**-11 a chunk."""
    x, w, b = head(rng, rows=(2048,), features=4, classes=8, dtype=np.float16)
    target = rng.integers(0, 8, 2048)
    _, _, dw, _ = fastlsm.linear_cross_entropy(x, w, target, linear_bias=b, reduction="sum",
                                               return_grad=True, chunk_bytes=1)
    expected = reference(x, w, b, target, reduction="sum")[2]
    error = np.abs(dw.astype(F64) - expected) / np.abs(expected).max()
    assert error.max() < 2e-3


def test_matches_pytorch(rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, w, b = head(rng, rows=(9,), features=6, classes=13)
    target = rng.integers(0, 13, 9)
    target[2] = -100
    weight = rng.uniform(0.5, 2.0, 13)
    tensors = [torch.tensor(a, requires_grad=True) for a in (x, w, b)]
    expected = F.linear_cross_entropy(tensors[0], tensors[1], torch.tensor(target),
                                      linear_bias=tensors[2], weight=torch.tensor(weight),
                                      label_smoothing=0.1)
    expected.backward()
    result = fastlsm.linear_cross_entropy(x, w, target, linear_bias=b, weight=weight,
                                          label_smoothing=0.1, return_grad=True,
                                          chunk_bytes=2 * 13 * 8)
    assert_matches(result, [expected.detach().numpy()] + [t.grad.numpy() for t in tensors],
                   1e-12)


# --- errors ------------------------------------------------------------------------------------

def test_shape_errors_name_both_shapes(rng):
    x, w, b = head(rng)
    with pytest.raises(ValueError, match=r"input of shape \(7, 5\) has 5 features, but "
                                         r"linear_weight of shape \(11, 4\) takes 4"):
        fastlsm.linear_cross_entropy(x, w[:, :4], np.zeros(7, int))
    with pytest.raises(ValueError, match=r"linear_weight must be 2-D"):
        fastlsm.linear_cross_entropy(x, w[0], np.zeros(7, int))
    with pytest.raises(ValueError, match=r"linear_bias must have shape \(11,\)"):
        fastlsm.linear_cross_entropy(x, w, np.zeros(7, int), linear_bias=b[:5])
    with pytest.raises(ValueError, match=r"target has shape \(6,\), but input of shape \(7, 5\) "
                                         r"and linear_weight of shape \(11, 5\)"):
        fastlsm.linear_cross_entropy(x, w, np.zeros(6, int))
    with pytest.raises(ValueError, match=r"at least 1 dimension"):
        fastlsm.linear_cross_entropy(np.float64(1.0), w, np.zeros((), int))


def test_options_are_checked_as_in_cross_entropy(rng):
    x, w, _ = head(rng)
    t = np.zeros(7, int)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fastlsm.linear_cross_entropy(x, w, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing must be between"):
        fastlsm.linear_cross_entropy(x, w, t, label_smoothing=2.0)
    with pytest.raises(TypeError, match="target must hold integer class indices"):
        fastlsm.linear_cross_entropy(x, w, t.astype(F32))
    with pytest.raises(ValueError, match="grad_loss .* needs return_grad"):
        fastlsm.linear_cross_entropy(x, w, t, grad_loss=1.0)
    with pytest.raises(TypeError, match="chunk_bytes must be an int"):
        fastlsm.linear_cross_entropy(x, w, t, chunk_bytes=1.5)
    with pytest.raises(ValueError, match="chunk_bytes must be positive"):
        fastlsm.linear_cross_entropy(x, w, t, chunk_bytes=0)


def test_the_cuda_backend_refuses_numpy_input(rng):
    x, w, _ = head(rng)
    fastlsm.set_default_device("cuda")
    try:
        with pytest.raises(TypeError, match="linear_cross_entropy on the CUDA backend takes "
                                            "CuPy arrays or PyTorch CUDA tensors"):
            fastlsm.linear_cross_entropy(x, w, np.zeros(7, int))
        # device= as every function takes it: 'cpu' runs where the default says cuda
        expected = reference(x, w, None, np.zeros(7, int))[0]
        np.testing.assert_allclose(
            fastlsm.linear_cross_entropy(x, w, np.zeros(7, int), device="cpu"), expected,
            rtol=1e-12)
    finally:
        fastlsm.set_default_device(None)
    with pytest.raises(TypeError, match="linear_cross_entropy on the CUDA backend"):
        fastlsm.linear_cross_entropy(x, w, np.zeros(7, int), device="cuda")
    with pytest.raises(ValueError, match="device must be one of"):
        fastlsm.linear_cross_entropy(x, w, np.zeros(7, int), device="gpu")


def test_target_out_of_range_raises_before_anything_is_written(rng, monkeypatch):
    x, w, b = head(rng)
    target = np.zeros(7, int)
    target[6] = 11  # in the last chunk
    calls = []
    monkeypatch.setattr(np, "matmul", lambda *a, **k: calls.append(a))
    with pytest.raises(IndexError, match=r"Target 11 is out of bounds. \(target\[6\] with 11 "
                                         r"classes\)"):
        fastlsm.linear_cross_entropy(x, w, target, linear_bias=b, return_grad=True,
                                     chunk_bytes=8 * 11)
    assert calls == []


def test_inputs_are_not_modified(rng):
    x, w, b = head(rng)
    copies = [a.copy() for a in (x, w, b)]
    fastlsm.linear_cross_entropy(x, w, rng.integers(0, 11, 7), linear_bias=b, return_grad=True,
                                 chunk_bytes=8 * 11 * 2)
    for a, before in zip((x, w, b), copies):
        np.testing.assert_array_equal(a, before)


# --- memory ------------------------------------------------------------------------------------

def test_peak_memory_is_a_chunk_not_the_logits(rng, weight_gradient_sum):
    """NumPy reports its allocations to tracemalloc: beyond the gradients it returns, a call
    holds the chunk's logits and one chunk's share of the weight's gradient, a fraction of the
    (4096, 2000) float32 logits (32 MB)."""
    x, w, b = head(rng, rows=(4096,), features=32, classes=2000, dtype=F32)
    target = rng.integers(0, 2000, 4096)
    chunk = 1 << 20
    fastlsm.linear_cross_entropy(x, w, target, linear_bias=b, return_grad=True,
                                 chunk_bytes=chunk)  # compiled, warm
    # tracemalloc counts every thread's allocations: in a whole run of the suite other threads
    # (a Dask cluster's, say) may allocate during a call, once 95 kB over the bound below.  The
    # least of three calls' peaks is the call's own.
    peaks = []
    for _ in range(3):
        tracemalloc.start()
        try:
            result = fastlsm.linear_cross_entropy(x, w, target, linear_bias=b, return_grad=True,
                                                  chunk_bytes=chunk)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    peak = min(peaks)
    returned = sum(a.nbytes for a in result[1:])
    logits = 4096 * 2000 * 4
    # The chunk, the weight gradient's share (without SciPy), and per-row and per-class vectors
    # (the targets' checks, the loss kernels' own) well under 1% of the logits.
    share = w.nbytes if weight_gradient_sum == "numpy" else 0
    assert peak - returned <= chunk + share + 0.01 * logits
    assert peak - returned < 0.1 * logits
