"""The value contract on every backend: the same public calls, on the CPU (NumPy arrays), on CUDA
(Numba device arrays; the simulator where there is no GPU) and on Dask (Dask arrays), give the
answers of the float64 references within the tolerances of test_softmax and test_loss.

Shapes are small, for the simulator.  What is particular to one backend stays in its module: the
CPU's layouts and kernels (test_softmax, test_loss), CUDA's launch modes and device interop
(test_cuda), Dask's chunkings and schedulers (test_dask); the error contract is test_errors'
and test_loss_errors', the gaps test_gaps'.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastlsm
import loss_reference as loss_ref
import reference as ref
from checks import logits
from test_loss import (REDUCTIONS, check_grad, check_lse, check_loss, check_soft_capped,
                       error_scales, expected_reference, make_case)
from test_softmax import (F32, F64, check_backward, check_log, check_prob, lsm_backward_scale,
                          sm_backward_scale)

# The simulator computes with NumPy scalars, which warn where a row's answer is nan (inf - inf).
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
INF = np.inf


# --- log_softmax, softmax, logsumexp -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F64])
def test_rowwise(on, dtype, rng):
    x = logits((6, 9), dtype, rng)
    lsm = ref.log_softmax(x)
    got = on.result(fastlsm.log_softmax(on.array(x)))
    assert got.dtype == dtype
    check_log(got, lsm, dtype, "log_softmax")
    check_prob(on.result(fastlsm.softmax(on.array(x))), ref.softmax(x), lsm, dtype)
    check_log(on.result(fastlsm.logsumexp(on.array(x))), ref.logsumexp(x), dtype, "logsumexp")


@pytest.mark.parametrize("axis", [0, 1, -1, (0, 1), (1, 2), None])
def test_axes_and_keepdims(on, axis, rng):
    x = logits((3, 5, 4), F64, rng, nonfinite=False)
    check_log(on.result(fastlsm.log_softmax(on.array(x), axis)), ref.log_softmax(x, axis), F64,
              "log_softmax")
    for keepdims in (False, True):
        got = on.result(fastlsm.logsumexp(on.array(x), axis, keepdims=keepdims))
        expected = ref.logsumexp(x, axis, keepdims=keepdims)
        assert np.shape(got) == expected.shape
        check_log(got, expected, F64, "logsumexp")


@pytest.mark.parametrize("dtype, result", [(np.float16, np.float16), (np.int32, np.float64),
                                           (np.int64, np.float64), (np.bool_, np.float64)])
def test_result_dtypes(on, dtype, result, rng):
    """float16 is computed in float32 and returned as float16; integers and bool as float64."""
    x = (rng.standard_normal((5, 7)) * 3).astype(dtype)
    exact = x.astype(F64)
    tol = 1e-3 if dtype is np.float16 else 1e-12   # float16: the result's rounding, 2**-11
    for name, expected in (("log_softmax", ref.log_softmax(exact)),
                           ("softmax", ref.softmax(exact)),
                           ("logsumexp", ref.logsumexp(exact))):
        got = on.result(getattr(fastlsm, name)(on.array(x)))
        assert got.dtype == result, name
        np.testing.assert_allclose(got, expected, rtol=tol, atol=tol, err_msg=name)


def test_empty_and_zero_dimensional(on):
    assert on.result(fastlsm.log_softmax(on.array(np.zeros((0, 5))))).shape == (0, 5)
    np.testing.assert_array_equal(on.result(fastlsm.logsumexp(on.array(np.zeros((3, 0))))), -INF)
    assert on.result(fastlsm.logsumexp(on.array(np.array(2.0)))) == 2.0
    assert on.result(fastlsm.log_softmax(on.array(np.array(2.0)))) == 0.0


def test_backward(on, rng):
    x = logits((6, 9), F64, rng, nonfinite=False)
    g = rng.standard_normal(x.shape)
    y = fastlsm.log_softmax(x)
    check_backward(on.result(fastlsm.log_softmax_backward(on.array(g), on.array(y))),
                   ref.log_softmax_backward(g, y), lsm_backward_scale(g, y, -1), F64)
    p = fastlsm.softmax(x)
    check_backward(on.result(fastlsm.softmax_backward(on.array(g), on.array(p))),
                   ref.softmax_backward(g, p), sm_backward_scale(g, p, -1), F64)


# --- cross_entropy and nll_loss ------------------------------------------------------------------

LOSS_CASES = {  # name: (shape name in test_loss.SHAPES, make_case options, loss options)
    "plain": ("NC", {}, {}),
    "weights, ignored": ("NC", dict(weighted=True, ignore="-100"), {}),
    "ignore a class": ("NC", dict(ignore="class0"), dict(label_smoothing=0.1)),
    "smoothing, weights": ("NCd", dict(weighted=True), dict(label_smoothing=0.3)),
    "z-loss": ("BTV", {}, dict(z_loss=1e-3)),
    "probabilities": ("NC", dict(kind="probs", weighted=True), dict(label_smoothing=0.2)),
    "1-D": ("C", {}, {}),
}


def moved(on, kwargs: dict) -> dict:
    """``kwargs`` with its arrays (the weights) on the backend."""
    return {name: on.array(value) for name, value in kwargs.items()}


@pytest.mark.parametrize("name", LOSS_CASES)
def test_cross_entropy(on, name, rng):
    shape_name, case_options, options = LOSS_CASES[name]
    case = make_case(shape_name, rng, dtype=F32, **case_options)
    for reduction in REDUCTIONS:
        what = f"{name}, reduction={reduction!r}"
        exp_loss, exp_grad, exp_lse = expected_reference(case, reduction, **options)
        scales = error_scales(case, reduction, **options)
        loss, grad, lse = on.result(fastlsm.cross_entropy(
            on.array(case.x), on.array(case.target), reduction=reduction, return_grad=True,
            return_lse=True, **options, **moved(on, case.kwargs)))
        check_loss(loss, exp_loss, scales, F32, reduction, case.row_shape, f"{what} loss")
        check_grad(grad, exp_grad, scales, case.x, F32, f"{what} grad")
        check_lse(lse, exp_lse, scales, case.row_shape, F32, f"{what} lse")


def test_cross_entropy_of_rows_without_classes(on):
    # As PyTorch: each row's loss is the empty sum -sum_c y_c logp_c (not 0 * -inf), and the mean
    # of an empty input is nan.
    x = on.array(np.zeros((3, 0), F32))
    y = on.array(np.zeros((3, 0), F32))
    loss, grad = on.result(fastlsm.cross_entropy(x, y, reduction="none", return_grad=True))
    np.testing.assert_array_equal(loss, np.zeros(3, F32))
    assert grad.shape == (3, 0)
    assert on.result(fastlsm.cross_entropy(x, y, reduction="sum", label_smoothing=0.1)) == 0
    assert np.isnan(on.result(fastlsm.cross_entropy(x, y)))


# The CUDA simulator runs a thread per CUDA thread (~10 s a case): on CUDA the soft cap runs on
# class indices, probabilities and 3-D input, one reduction each (its launch modes, streamed
# and split rows: test_cuda).
CUDA_SOFTCAP_CASES = {"plain": "none", "probabilities": "mean", "z-loss": "sum"}


@pytest.mark.parametrize("name", LOSS_CASES)
def test_cross_entropy_softcap(on, name, rng):
    if on.name == "cuda" and name not in CUDA_SOFTCAP_CASES:
        pytest.skip("on CUDA, the soft cap runs on CUDA_SOFTCAP_CASES")
    shape_name, case_options, options = LOSS_CASES[name]
    case = make_case(shape_name, rng, dtype=F32, scale=20.0, **case_options)
    for reduction in (CUDA_SOFTCAP_CASES[name],) if on.name == "cuda" else REDUCTIONS:
        check_soft_capped(case, 15.0, reduction, options, f"{name}, reduction={reduction!r}",
                          on=on)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nll_loss(on, reduction, rng):
    case = make_case("NCd", rng, weighted=True, ignore="-100")
    exp_loss, exp_grad = loss_ref.nll_loss(case.x, case.target, case.weight, case.ignore_index,
                                           reduction, axis=case.axis)
    scales = error_scales(case, reduction, nll=True)
    loss, grad = on.result(fastlsm.nll_loss(on.array(case.x), on.array(case.target),
                                            reduction=reduction, return_grad=True,
                                            **moved(on, case.kwargs)))
    check_loss(loss, exp_loss, scales, F64, reduction, case.row_shape, "nll_loss")
    check_grad(grad, exp_grad, scales, case.x, F64, "nll_loss grad")


def test_mean_of_all_ignored_is_nan(on, rng):
    x = logits((10, 20), F32, rng, nonfinite=False)
    target = np.full(10, -100)
    for name in ("cross_entropy", "nll_loss"):
        loss, grad = on.result(getattr(fastlsm, name)(on.array(x), on.array(target),
                                                      return_grad=True))
        assert np.isnan(loss) and np.asarray(loss).dtype == F32, name
        np.testing.assert_array_equal(grad, np.zeros_like(x))


# --- grad_loss: the gradient as a vector-Jacobian product ----------------------------------------

def vjp(grad_of_loss, grad_loss, class_axis: int, reduction: str) -> np.ndarray:
    """The gradient of ``sum(grad_loss * loss)`` from the loss's own gradient (``none``: of the
    sum, row by row)."""
    if reduction == "none":
        return grad_of_loss * np.expand_dims(grad_loss, class_axis)
    return grad_of_loss * grad_loss


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", ["plain", "smoothing, weights", "z-loss", "probabilities"])
def test_cross_entropy_grad_loss(on, name, reduction, rng):
    """What ``loss.backward(grad_loss)`` gives in PyTorch, for every layout of the rows: classes
    on axis 1 with a trailing axis (``NCd``), on the last axis (``BTV``)."""
    shape_name, case_options, options = LOSS_CASES[name]
    case = make_case(shape_name, rng, dtype=F64, **case_options)
    grad_loss = rng.standard_normal(case.row_shape) if reduction == "none" else -2.5
    exp_loss, exp_grad, _ = expected_reference(case, reduction, **options)
    scales = error_scales(case, reduction, **options)
    loss, grad = on.result(fastlsm.cross_entropy(
        on.array(case.x), on.array(case.target), reduction=reduction, return_grad=True,
        grad_loss=on.array(np.asarray(grad_loss)) if reduction == "none" else grad_loss,
        **options, **moved(on, case.kwargs)))
    check_loss(loss, exp_loss, scales, F64, reduction, case.row_shape, f"{name} loss")
    expected = vjp(exp_grad, grad_loss, case.class_axis, reduction)
    scales.grad = vjp(scales.grad, np.abs(grad_loss), case.class_axis, reduction)
    check_grad(grad, expected, scales, case.x, F64, f"{name} grad")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nll_loss_grad_loss(on, reduction, rng):
    case = make_case("NCd", rng, weighted=True, ignore="-100")
    grad_loss = rng.standard_normal(case.row_shape) if reduction == "none" else 0.75
    exp_loss, exp_grad = loss_ref.nll_loss(case.x, case.target, case.weight, case.ignore_index,
                                           reduction, axis=case.axis)
    _, grad = on.result(fastlsm.nll_loss(
        on.array(case.x), on.array(case.target), reduction=reduction, return_grad=True,
        grad_loss=on.array(np.asarray(grad_loss)) if reduction == "none" else grad_loss,
        **moved(on, case.kwargs)))
    np.testing.assert_allclose(grad, vjp(exp_grad, grad_loss, case.class_axis, reduction),
                               rtol=1e-14, atol=0)


def test_mean_over_weights_summing_to_zero(on, rng):
    """NumPy's and PyTorch's answer, an infinite mean (its gradient too), on every chunking."""
    x = logits((6, 5), F64, rng, nonfinite=False)
    target, weight = np.array([0, 1, 0, 1, 2, 2]), np.array([1.0, -1.0, 0.0, 3.0, 3.0])
    expected = fastlsm.cross_entropy(x, target, weight, return_grad=True)
    assert np.isinf(expected[0])
    loss, grad = on.result(fastlsm.cross_entropy(on.array(x), on.array(target), on.array(weight),
                                                 return_grad=True))
    assert loss == expected[0]
    np.testing.assert_array_equal(grad, expected[1])
    assert on.result(fastlsm.nll_loss(on.array(x), on.array(target), on.array(weight))) == (
        fastlsm.nll_loss(x, target, weight))


# --- bfloat16 ------------------------------------------------------------------------------------
# A Numba device array cannot hold bfloat16 (a PyTorch tensor can: test_cuda), so on CUDA the
# bfloat16 arrays stay NumPy arrays, sent to the GPU by ``device="cuda"``.

def bfloat16_or_skip():
    """ml_dtypes' bfloat16 (the test extra has it)."""
    return np.dtype(pytest.importorskip("ml_dtypes").bfloat16)


def as_bfloat16(values, bfloat16):
    return np.asarray(values, np.float32).astype(bfloat16)


@pytest.mark.parametrize("name", ["log_softmax", "softmax", "logsumexp"])
def test_bfloat16_is_float32_rounded_once(on, name, rng):
    """Computed in float32 from the exact float32 value of each input, returned rounded to the
    nearest bfloat16 (ties to even): the backend's float32 answer, rounded, bit for bit."""
    bfloat16 = bfloat16_or_skip()
    x = as_bfloat16(logits((6, 40), F32, rng, nonfinite=False), bfloat16)
    function = getattr(fastlsm, name)
    got = on.result(function(on.array(x), device=on.device))
    assert got.dtype == bfloat16
    float32 = on.result(function(on.array(x.astype(F32))))
    np.testing.assert_array_equal(got.view(np.uint16), float32.astype(bfloat16).view(np.uint16))
    exact = getattr(ref, name)(x.astype(F64))
    np.testing.assert_allclose(got.astype(F64), exact, rtol=2.0 ** -8, atol=2.0 ** -16)


def test_bfloat16_nonfinite_rows(on):
    """inf, -inf and nan inputs (their bfloat16 words widened exactly) give the backend's
    float32 answers, rounded: nan where they have nan."""
    bfloat16 = bfloat16_or_skip()
    x = as_bfloat16([[INF, 1.0, 2.0], [-INF, -INF, -INF], [np.nan, 0.0, 1.0], [-INF, 0.0, 3.0]],
                    bfloat16)
    for name in ("log_softmax", "softmax", "logsumexp"):
        function = getattr(fastlsm, name)
        got = on.result(function(on.array(x), device=on.device)).astype(F32)
        float32 = on.result(function(on.array(x.astype(F32))))
        np.testing.assert_array_equal(got, float32.astype(bfloat16).astype(F32), err_msg=name)


def test_bfloat16_losses(on, rng):
    bfloat16 = bfloat16_or_skip()
    x = as_bfloat16(logits((6, 40), F32, rng, nonfinite=False), bfloat16)
    target = np.array([0, 5, 39, -100, 7, 3])
    weight = as_bfloat16(rng.uniform(0.5, 2.0, 40), bfloat16)
    for args in ((target,), (target, weight), (fastlsm.softmax(x),)):
        loss, grad = on.result(fastlsm.cross_entropy(on.array(x), *map(on.array, args),
                                                     return_grad=True, label_smoothing=0.1,
                                                     device=on.device))
        exact = [a.astype(F32) if a.dtype == bfloat16 else a for a in args]
        expected = on.result(fastlsm.cross_entropy(on.array(x.astype(F32)),
                                                   *map(on.array, exact), return_grad=True,
                                                   label_smoothing=0.1))
        assert type(loss) is bfloat16.type and grad.dtype == bfloat16
        assert float(loss) == float(bfloat16.type(expected[0]))
        np.testing.assert_array_equal(grad.view(np.uint16),
                                      expected[1].astype(bfloat16).view(np.uint16))
    loss, grad = on.result(fastlsm.nll_loss(on.array(fastlsm.log_softmax(x)), on.array(target),
                                            return_grad=True, device=on.device))
    assert type(loss) is bfloat16.type and grad.dtype == bfloat16
    rows, lse = on.result(fastlsm.cross_entropy(on.array(x), on.array(target), reduction="none",
                                                return_lse=True, device=on.device))
    assert rows.dtype == bfloat16 and lse.dtype == bfloat16
    exact = loss_ref.cross_entropy(x.astype(F64), target, reduction="none")
    np.testing.assert_allclose(rows.astype(F64), exact[0], rtol=2.0 ** -8, atol=0)
    np.testing.assert_allclose(lse.astype(F64), exact[2], rtol=2.0 ** -8, atol=0)


def test_bfloat16_outputs(on, rng):
    """``out=`` and ``grad_out=`` in bfloat16 (Dask takes no ``out=``), ``grad_out`` the input
    itself."""
    if on.name == "dask":
        pytest.skip("Dask takes no out= (test_errors checks the refusal)")
    bfloat16 = bfloat16_or_skip()
    x = as_bfloat16(logits((6, 40), F32, rng, nonfinite=False), bfloat16)
    out = np.empty_like(x)
    assert fastlsm.log_softmax(x, out=out, device=on.device) is out
    np.testing.assert_array_equal(out.view(np.uint16), fastlsm.log_softmax(x).view(np.uint16))
    target = np.array([0, 5, 39, -100, 7, 3])
    expected = fastlsm.cross_entropy(x, target, return_grad=True)
    loss, grad = fastlsm.cross_entropy(x, target, grad_out=x, device=on.device)
    assert grad is x and loss == expected[0]
    np.testing.assert_array_equal(x.view(np.uint16), expected[1].view(np.uint16))
    with pytest.raises(ValueError, match=r"^out has dtype float32, expected bfloat16"):
        fastlsm.softmax(as_bfloat16(np.ones((2, 3)), bfloat16), out=np.empty((2, 3), F32))
