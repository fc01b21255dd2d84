"""fastlsm.torch: the autograd functions against finite differences (gradcheck) and
torch.nn.functional, in a training loop, and what they must not write."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
import fastlsm  # noqa: E402
import fastlsm.torch as ft  # noqa: E402  (after the skip: it imports torch)

F32, F64 = torch.float32, torch.float64
REDUCTIONS = ["mean", "sum", "none"]
CASES = ["plain", "weight", "ignore_index", "label_smoothing", "all", "probabilities"]
TOLERANCE = {F32: dict(rtol=1e-5, atol=1e-6), F64: dict(rtol=1e-10, atol=1e-12)}

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def randn(rng, shape, dtype=F64, scale=1.0):
    return torch.tensor(rng.standard_normal(shape) * scale, dtype=dtype, requires_grad=True)


def loss_case(rng, shape, case, dtype=F64, class_axis=None):
    """``(target, options)`` for logits of ``shape``, the same for fastlsm.torch and
    torch.nn.functional; classes on ``class_axis``, by default PyTorch's (dim 1, or the only
    dim)."""
    if class_axis is None:
        class_axis = min(1, len(shape) - 1)
    class_axis %= len(shape)
    classes = shape[class_axis]
    rows = shape[:class_axis] + shape[class_axis + 1:]
    options = {}
    if case == "probabilities":
        p = rng.dirichlet(np.ones(classes), size=rows)
        return torch.tensor(np.moveaxis(p, -1, class_axis), dtype=dtype), options
    t = np.asarray(rng.integers(0, classes, rows))
    t.flat[::3] = 2  # ignored where ignore_index=2
    if case in ("weight", "all"):
        options["weight"] = torch.tensor(rng.uniform(0.5, 2.0, classes), dtype=dtype)
    if case in ("ignore_index", "all"):
        options["ignore_index"] = 2
    if case in ("label_smoothing", "all"):
        options["label_smoothing"] = 0.2
    return torch.tensor(t), options


def upstream_for(out, rng):
    """A gradient of ``out`` that is not all ones: 0.7 for a scalar, random elsewhere."""
    return torch.tensor(rng.uniform(0.5, 1.5, out.shape) if out.ndim else 0.7, dtype=out.dtype,
                        device=out.device)


def forward_backward(fn, inputs, upstream):
    """``fn``'s output and the gradients of its inputs (fresh leaves) for ``upstream``."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(upstream)
    return out.detach(), [x.grad for x in leaves]


def assert_same(fastlsm_fn, torch_fn, inputs, rng, dtype):
    """Outputs and gradients of the inputs (cast to ``dtype``) alike, for a random upstream."""
    inputs = [x.detach().to(dtype) for x in inputs]
    upstream = upstream_for(torch_fn(*inputs), rng)
    got, grads = forward_backward(fastlsm_fn, inputs, upstream)
    want, want_grads = forward_backward(torch_fn, inputs, upstream)
    assert got.dtype == dtype and got.shape == want.shape
    # equal_nan: a mean over targets all ignored is nan in both.
    torch.testing.assert_close(got, want, equal_nan=True, **TOLERANCE[dtype])
    for grad, want_grad in zip(grads, want_grads):
        torch.testing.assert_close(grad, want_grad, **TOLERANCE[dtype])


def test_import_fastlsm_does_not_import_torch():
    code = "import sys, fastlsm; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- log_softmax and softmax -------------------------------------------------------------------

ROWWISE = [(ft.log_softmax, F.log_softmax), (ft.softmax, F.softmax)]


@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("fastlsm_fn, torch_fn", ROWWISE, ids=["log_softmax", "softmax"])
def test_rowwise_gradcheck(fastlsm_fn, torch_fn, dim, rng):
    x = randn(rng, (3, 4, 5))
    assert torch.autograd.gradcheck(lambda x: fastlsm_fn(x, dim), (x,))


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dim", [0, -1])
@pytest.mark.parametrize("fastlsm_fn, torch_fn", ROWWISE, ids=["log_softmax", "softmax"])
def test_rowwise_matches_pytorch(fastlsm_fn, torch_fn, dim, transposed, dtype, rng):
    x = randn(rng, (6, 7), scale=3.0)
    inputs = [x.T if transposed else x]  # a strided view in
    assert_same(lambda x: fastlsm_fn(x, dim), lambda x: torch_fn(x, dim), inputs, rng, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fastlsm_fn, torch_fn", ROWWISE, ids=["log_softmax", "softmax"])
def test_rowwise_half_precision(fastlsm_fn, torch_fn, dtype, rng):
    x = randn(rng, (4, 9), dtype=dtype, scale=3.0)
    got = fastlsm_fn(x, -1)
    assert got.dtype == dtype
    want = torch_fn(x.detach().float(), -1).to(dtype)
    torch.testing.assert_close(got.detach(), want)


# --- cross_entropy -----------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", [(6, 5), (3, 5, 2)])
def test_cross_entropy_gradcheck(shape, case, reduction, rng):
    x = randn(rng, shape)
    target, options = loss_case(rng, shape, case)
    assert torch.autograd.gradcheck(
        lambda x: ft.cross_entropy(x, target, reduction=reduction, **options), (x,))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_gradcheck_fastlsm_options(reduction, rng):
    x = randn(rng, (6, 5), scale=3.0)
    target, _ = loss_case(rng, (6, 5), "plain")
    assert torch.autograd.gradcheck(
        lambda x: ft.cross_entropy(x, target, reduction=reduction, z_loss=0.1, softcap=2.0), (x,))


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", [(6, 5), (3, 5, 2), (5,)])
def test_cross_entropy_matches_pytorch(shape, case, reduction, dtype, rng):
    x = randn(rng, shape, scale=2.0)
    target, options = loss_case(rng, shape, case, dtype)
    options = {k: v.to(dtype) if torch.is_tensor(v) else v for k, v in options.items()}
    assert_same(lambda x: ft.cross_entropy(x, target, reduction=reduction, **options),
                lambda x: F.cross_entropy(x, target, reduction=reduction, **options),
                [x], rng, dtype)


def test_reduced_loss_is_a_0d_tensor_of_the_input_dtype(rng):
    x = randn(rng, (6, 5), dtype=F32)
    loss = ft.cross_entropy(x, loss_case(rng, (6, 5), "plain")[0])
    assert isinstance(loss, torch.Tensor) and loss.shape == () and loss.dtype == F32


def test_errors_come_from_fastlsm(rng):
    x = randn(rng, (2, 5))
    with pytest.raises(IndexError):
        ft.cross_entropy(x, torch.tensor([0, 5]))
    with pytest.raises(ValueError):
        ft.cross_entropy(x, torch.tensor([0, 1]), reduction="average")


@pytest.mark.parametrize("case", ["weight", "probabilities"])
def test_no_gradient_for_weights_or_probabilities(case, rng):
    x = randn(rng, (6, 5))
    target, options = loss_case(rng, (6, 5), case)
    grad_wanted = options["weight"] if case == "weight" else target
    grad_wanted.requires_grad_()
    with pytest.raises(NotImplementedError, match="detach"):
        ft.cross_entropy(x, target, **options)


# --- linear_cross_entropy ----------------------------------------------------------------------

def head(rng, rows=(7,), features=4, classes=6, dtype=F64):
    """``(x, w, b)``: features, a linear head's weight and bias, all requiring grad."""
    return (randn(rng, rows + (features,), dtype), randn(rng, (classes, features), dtype, 0.5),
            randn(rng, (classes,), dtype))


def three_rows_a_chunk(dtype=F64, classes=6):
    """chunk_bytes for chunks of 3 rows: 7 rows make 3 chunks, the last one short."""
    return 3 * classes * dtype.itemsize


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rows", [(7,), (2, 3)])
def test_linear_cross_entropy_gradcheck(rows, case, reduction, bias, rng):
    x, w, b = head(rng, rows)
    target, options = loss_case(rng, rows + (6,), case, class_axis=-1)

    def loss(x, w, *b):
        return ft.linear_cross_entropy(x, w, target, linear_bias=b[0] if b else None,
                                       reduction=reduction, chunk_bytes=three_rows_a_chunk(),
                                       **options)

    assert torch.autograd.gradcheck(loss, (x, w, b) if bias else (x, w))


def torch_linear_cross_entropy(x, w, target, b, **options):
    if hasattr(F, "linear_cross_entropy"):
        return F.linear_cross_entropy(x, w, target, linear_bias=b, **options)
    return F.cross_entropy(F.linear(x, w, b), target, **options)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES)
def test_linear_cross_entropy_matches_pytorch(case, reduction, dtype, device, rng):
    """On CUDA tensors the matmuls run in PyTorch (cuBLAS) and the loss in fastlsm's CUDA
    kernels."""
    x, w, b = (t.detach().to(device) for t in head(rng))
    target, options = loss_case(rng, (7, 6), case, dtype, class_axis=-1)
    target = target.to(device)
    options = {k: v.to(device, dtype) if torch.is_tensor(v) else v for k, v in options.items()}
    chunk_bytes = three_rows_a_chunk(dtype)
    assert_same(lambda x, w, b: ft.linear_cross_entropy(x, w, target, linear_bias=b,
                                                        reduction=reduction,
                                                        chunk_bytes=chunk_bytes, **options),
                lambda x, w, b: torch_linear_cross_entropy(x, w, target, b,
                                                           reduction=reduction, **options),
                [x, w, b], rng, dtype)


def test_linear_cross_entropy_gradient_of_the_input_only(rng):
    x, w, b = head(rng)
    w.requires_grad_(False)
    target, _ = loss_case(rng, (7, 6), "plain")
    ft.linear_cross_entropy(x, w, target, linear_bias=b.detach()).backward()
    want = torch.autograd.grad(F.cross_entropy(F.linear(x, w, b), target), x)[0]
    torch.testing.assert_close(x.grad, want, **TOLERANCE[F64])


@pytest.mark.parametrize("loss", ["cross_entropy", "linear_cross_entropy"])
def test_loss_none_takes_the_expanded_upstream_of_a_sum(loss, rng):
    # loss.sum().backward() hands the 'none' loss a stride-0 tensor of ones.
    x, w, b = head(rng)
    target, _ = loss_case(rng, (7, 6), "plain")
    if loss == "cross_entropy":
        ft.cross_entropy(F.linear(x, w, b), target, reduction="none").sum().backward()
    else:
        ft.linear_cross_entropy(x, w, target, linear_bias=b, reduction="none").sum().backward()
    want = torch.autograd.grad(F.cross_entropy(F.linear(x, w, b), target, reduction="sum"),
                               (x, w, b))
    torch.testing.assert_close((x.grad, w.grad, b.grad), want, **TOLERANCE[F64])


@pytest.mark.parametrize("inplace", [False, True])
def test_ignored_rows_get_no_gradient_whatever_their_upstream(inplace, rng):
    x, w, b = head(rng)
    target, _ = loss_case(rng, (7, 6), "plain")
    target[[1, 4]] = -100
    upstream = torch.tensor(rng.uniform(0.5, 1.5, 7))
    upstream[1], upstream[4] = float("nan"), float("inf")
    ft.cross_entropy(F.linear(x, w, b), target, reduction="none", inplace=inplace).backward(
        upstream)
    want = torch.autograd.grad(F.cross_entropy(F.linear(x, w, b), target, reduction="none"),
                               (x, w, b), upstream)
    torch.testing.assert_close((x.grad, w.grad, b.grad), want, **TOLERANCE[F64])


@pytest.mark.parametrize("loss", ["cross_entropy", "linear_cross_entropy"])
def test_loss_under_no_grad_is_a_plain_tensor(loss, rng):
    x, w, b = head(rng)
    target, _ = loss_case(rng, (7, 6), "plain")
    with torch.no_grad():
        got = (ft.cross_entropy(F.linear(x, w, b), target) if loss == "cross_entropy" else
               ft.linear_cross_entropy(x, w, target, linear_bias=b))
        want = F.cross_entropy(F.linear(x, w, b), target)
    assert got.grad_fn is None and not got.requires_grad
    torch.testing.assert_close(got, want, **TOLERANCE[F64])


# --- training ----------------------------------------------------------------------------------

def train(loss_fn, data, dtype, steps=20):
    """Losses of SGD (lr 0.5) on a linear classifier from a fixed init, and its final weights."""
    x, y, w0, b0 = data
    x = x.to(dtype)
    w = w0.to(dtype, copy=True).requires_grad_()  # each run from the same init
    b = b0.to(dtype, copy=True).requires_grad_()
    optimizer = torch.optim.SGD([w, b], lr=0.5)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(x, w, b, y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return np.array(losses), w.detach(), b.detach()


TRAINED_LOSSES = {
    "cross_entropy": lambda x, w, b, y: ft.cross_entropy(F.linear(x, w, b), y),
    "cross_entropy_inplace": lambda x, w, b, y: ft.cross_entropy(F.linear(x, w, b), y,
                                                                 inplace=True),
    "linear_cross_entropy": lambda x, w, b, y: ft.linear_cross_entropy(x, w, y, linear_bias=b),
}


@pytest.mark.parametrize("dtype, rtol", [(F32, 1e-5), (F64, 1e-12)], ids=["float32", "float64"])
@pytest.mark.parametrize("loss", TRAINED_LOSSES)
def test_training_matches_pytorch(loss, dtype, rtol, rng):
    x = rng.standard_normal((256, 20))
    y = (x @ rng.standard_normal((20, 5)) + rng.standard_normal((256, 5))).argmax(axis=1)
    data = (torch.tensor(x), torch.tensor(y), torch.tensor(rng.standard_normal((5, 20)) * 0.1),
            torch.zeros(5, dtype=F64))
    losses, w, b = train(TRAINED_LOSSES[loss], data, dtype)
    want_losses, want_w, want_b = train(
        lambda x, w, b, y: F.cross_entropy(F.linear(x, w, b), y), data, dtype)
    np.testing.assert_allclose(losses, want_losses, rtol=rtol)
    assert losses[-1] < 0.6 * losses[0]  # it learnt something
    torch.testing.assert_close(w, want_w, rtol=rtol * 10, atol=rtol * 10)
    torch.testing.assert_close(b, want_b, rtol=rtol * 10, atol=rtol * 10)


# --- what must not be written ------------------------------------------------------------------

def test_inputs_and_upstream_gradients_are_not_written(rng):
    x, w, b = head(rng)
    target, options = loss_case(rng, (7, 6), "weight")
    upstream = torch.tensor(rng.uniform(0.5, 1.5, 7))
    logits = randn(rng, (7, 6))
    calls = [
        lambda: ft.log_softmax(logits, 1), lambda: ft.softmax(logits, 1),
        lambda: ft.cross_entropy(logits, target, reduction="none", **options),
        lambda: ft.linear_cross_entropy(x, w, target, linear_bias=b, reduction="none", **options),
    ]
    originals = [t.detach().clone() for t in (x, w, b, target, options["weight"], upstream)]
    for call in calls:
        out = call()
        out.backward(upstream if out.ndim == 1 else upstream[:, None].expand(out.shape))
    for t, original in zip((x, w, b, target, options["weight"], upstream), originals):
        assert torch.equal(t, original)


def logits_of_a_head(rng, classes=6):
    """Logits ``x @ w.T`` of leaves ``x, w``: the matmul's backward needs ``x`` and ``w``, not
    the logits, so writing over them is safe."""
    x, w, _ = head(rng, classes=classes)
    return x, w, x @ w.T


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_inplace_gives_the_same_gradients(reduction, rng):
    target, options = loss_case(rng, (7, 6), "all")
    results = []
    for inplace in (False, True):
        x, w, logits = logits_of_a_head(np.random.default_rng(1))
        loss = ft.cross_entropy(logits, target, reduction=reduction, inplace=inplace, **options)
        loss.backward(upstream_for(loss, np.random.default_rng(2)))
        results.append((loss.detach(), x.grad, w.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_inplace_writes_the_gradient_over_the_logits(rng):
    _, _, logits = logits_of_a_head(rng)
    target, _ = loss_case(rng, (7, 6), "plain")
    want = torch.autograd.grad(F.cross_entropy(logits, target), logits)[0]
    ft.cross_entropy(logits, target, inplace=True)
    torch.testing.assert_close(logits.detach(), want, **TOLERANCE[F64])


@pytest.mark.parametrize("how, refused_as", [("leaf", "leaf"), ("view_of_a_leaf", "view"),
                                              ("slice", "view"), ("reshaped", "view")])
def test_inplace_refuses_leaves_and_views_before_writing(how, refused_as, rng):
    x, w, _ = head(rng, classes=12)
    leaf = randn(rng, (7, 6))
    logits = {"leaf": lambda: leaf, "view_of_a_leaf": lambda: leaf.view(7, 6),
              "slice": lambda: (x @ w.T)[:, 6:],
              "reshaped": lambda: (x @ w[:6].T).reshape(42).reshape(7, 6)}[how]()
    original = logits.detach().clone()
    with pytest.raises(ValueError, match=refused_as):
        ft.cross_entropy(logits, loss_case(rng, (7, 6), "plain")[0], inplace=True)
    assert torch.equal(logits.detach(), original)


def test_inplace_is_refused_where_autograd_saved_the_logits(rng):
    x, w, logits = logits_of_a_head(rng)
    target, _ = loss_case(rng, (7, 6), "plain")
    penalty = logits.pow(2).mean()  # its backward reads the logits
    loss = ft.cross_entropy(logits, target, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + penalty).backward()


def test_without_inplace_other_users_of_the_logits_get_their_gradients(rng):
    x, w, logits = logits_of_a_head(rng)
    target, _ = loss_case(rng, (7, 6), "plain")
    (ft.cross_entropy(logits, target) + logits.pow(2).mean()).backward()
    want = torch.autograd.grad(F.cross_entropy(x @ w.T, target) + (x @ w.T).pow(2).mean(),
                               (x, w))
    torch.testing.assert_close((x.grad, w.grad), want, **TOLERANCE[F64])


def test_inplace_logits_cannot_be_differentiated_through(rng):
    _, _, logits = logits_of_a_head(rng)
    target, _ = loss_case(rng, (7, 6), "plain")
    loss = ft.cross_entropy(logits, target, inplace=True)
    with pytest.raises(RuntimeError, match="hold its gradient"):
        (loss + logits.sum()).backward()


def test_retain_graph_backs_twice_except_inplace(rng):
    x, _, logits = logits_of_a_head(rng)
    target, _ = loss_case(rng, (7, 6), "plain")
    loss = ft.cross_entropy(logits, target)
    loss.backward(retain_graph=True)
    once = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * once)
    x, _, logits = logits_of_a_head(rng)
    loss = ft.cross_entropy(logits, target, inplace=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_inplace_without_a_gradient_writes_nothing(rng):
    _, _, logits = logits_of_a_head(rng)
    target, _ = loss_case(rng, (7, 6), "plain")
    original = logits.detach().clone()
    want = F.cross_entropy(original, target)
    with torch.no_grad():
        loss = ft.cross_entropy(logits, target, inplace=True)
    no_grad_logits = original.clone()
    assert torch.equal(ft.cross_entropy(no_grad_logits, target, inplace=True), loss)
    assert torch.equal(logits.detach(), original) and torch.equal(no_grad_logits, original)
    torch.testing.assert_close(loss, want, **TOLERANCE[F64])


@pytest.mark.parametrize("loss", ["log_softmax", "cross_entropy"])
def test_second_derivatives_are_refused(loss, rng):
    x = randn(rng, (3, 4))
    out = ft.log_softmax(x, 1)[:, 0] if loss == "log_softmax" else ft.cross_entropy(
        x, torch.tensor([0, 1, 2]), reduction="none")
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(out.sum(), x, create_graph=True)


# --- CUDA --------------------------------------------------------------------------------------

@needs_gpu
@pytest.mark.parametrize("fastlsm_fn, torch_fn", ROWWISE, ids=["log_softmax", "softmax"])
def test_rowwise_on_the_gpu(fastlsm_fn, torch_fn, rng):
    x = randn(rng, (6, 300), dtype=F32).cuda()
    assert_same(lambda x: fastlsm_fn(x, -1), lambda x: torch_fn(x, -1), [x], rng, F32)


@needs_gpu
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES)
def test_cross_entropy_on_the_gpu(case, reduction, inplace, rng):
    target, options = loss_case(rng, (6, 300), case, F32)
    target = target.cuda()
    options = {k: v.to("cuda", F32) if torch.is_tensor(v) else v for k, v in options.items()}
    x = randn(rng, (6, 300), dtype=F32).cuda()
    # x * 1: a fresh non-leaf, which inplace may overwrite.
    assert_same(lambda x: ft.cross_entropy(x * 1, target, reduction=reduction, inplace=inplace,
                                           **options),
                lambda x: F.cross_entropy(x, target, reduction=reduction, **options),
                [x], rng, F32)


def test_the_numpy_functions_name_a_tensor_that_requires_grad():
    """NumPy cannot read a tensor that requires grad: the error names the argument (and keeps
    PyTorch's advice), instead of PyTorch's RuntimeError from inside NumPy."""
    x = torch.zeros(3, 4, requires_grad=True)
    with pytest.raises(TypeError, match=r"^input could not be converted to an array: .*detach"):
        fastlsm.cross_entropy(x, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match=r"^weight could not be converted to an array"):
        fastlsm.cross_entropy(x.detach(), torch.tensor([0, 1, 2]), x[0])
    with pytest.raises(TypeError, match=r"^x could not be converted to an array"):
        fastlsm.log_softmax(x)


@pytest.mark.parametrize("dtype, upstream", [(torch.float16, 1.0), (torch.bfloat16, 1.0),
                                             (torch.bfloat16, 1024.0), (torch.bfloat16, 0.125)])
def test_half_gradients_are_rounded_once_where_the_docstring_says(dtype, upstream, rng):
    """For an upstream gradient of 1 (and, in bfloat16, a power of two) the gradient is
    fastlsm.cross_entropy's with that grad_loss, which rounds once: what the docstring says."""
    ml_dtypes = pytest.importorskip("ml_dtypes")

    def as_numpy(t):
        return (t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16
                else t.numpy())
    for _ in range(20):
        x = torch.tensor(rng.standard_normal((6, 5)) * 3).to(dtype)
        t = torch.tensor(rng.integers(0, 5, 6))
        ours = x.clone().requires_grad_()
        ft.cross_entropy(ours, t, reduction="sum").backward(torch.tensor(upstream, dtype=dtype))
        _, once = fastlsm.cross_entropy(as_numpy(x), t.numpy(), reduction="sum",
                                        return_grad=True, grad_loss=upstream)
        np.testing.assert_array_equal(as_numpy(ours.grad).astype(np.float64),
                                      once.astype(np.float64))
