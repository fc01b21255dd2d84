"""Correctness of fastlsm.cross_entropy and fastlsm.nll_loss against the float64 NumPy reference
(tests/loss_reference.py) and against PyTorch (torch.nn.functional with autograd, in float64 on the
very same input values; those comparisons are skipped where torch is not installed).

Tolerances (``|result - expected|``, expected computed in float64 from the same input values):

* Every value gets ``TOL[dtype] * magnitude + OUT_EPS[dtype] * |expected| + ATOL[dtype]``, where
  ``OUT_EPS`` is the final rounding to the result dtype (one ulp; float16 results are computed in
  float32 and rounded once) and ``magnitude`` is the size of the terms an accurate computation
  adds up, from :func:`error_scales`: for a loss, ``sum_c |a_c| * (1 + |x_c - m| + |lse - m|)``
  (``a_c`` the coefficient of ``logp_c``, ``m`` the row max; the bracket bounds the error of
  ``logp_c = (x_c - m) - log(sum exp)``) plus the z-loss term's; for a gradient entry
  ``p_j * (sum_c |a_c| + 2 z |lse|) * (1 + |x_j - m| + |lse - m|)`` plus the size of the direct
  term ``w_j * y_j``, times the reduction's scale; for lse ``1 + |lse - m|``.  Reduced losses use the
  sum of the per-row magnitudes (over the 'mean' denominator).
* TOL: 1e-12 for float64 (about 4500 eps: rows here are short, but summation order is free),
  4 float32 ulps (4 * 2**-23) for float32 and for float16 (which is computed in float32).  With
  magnitudes of a few units, float32 losses of size O(log C) must agree to a few 1e-7 relative,
  float16 ones to about 1e-3; float64 to ~1e-11 -- a wrong coefficient anywhere (eps / C vs eps,
  a missing weight, the wrong denominator) is off by orders of magnitude more.
* nll_loss: ``loss_n = -w_t x_t`` is one product, so its magnitude is ``|w_t x_t|`` (gradient: ``|w_t|``).
* Non-finite expected values must match exactly: same nan positions, same signed infinities.
* The float32 mean over 2 * 10**6 rows must agree with float64 to 1e-6 relative (a float32
  accumulator would be off by ~1e-4 or more).
* Memory (tracemalloc; NumPy reports its allocations to it) on a (4096, 32000) float32 input:
  loss only or with ``grad_out`` the peak traced allocation stays under 1% of the input's bytes,
  with ``return_grad`` under 1.1 times the input's bytes (the gradient itself and O(rows)).
"""

from __future__ import annotations

import gc
import inspect
import tracemalloc
from dataclasses import dataclass

import numpy as np
import pytest

import fastlsm
from fastlsm.backends.cpu.kernels.stats import TILE_ROWS
from fastlsm.backends.cpu.runtime import SHORT_ROW_CLASSES
from checks import assert_nonfinite_match
import loss_reference as ref

try:
    import torch
    import torch.nn.functional as TF
except ImportError:  # the PyTorch comparisons are skipped
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed "
                                 "(pip install -e '.[torch]')")

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
INF, NAN = np.inf, np.nan
EPS32 = float(np.finfo(np.float32).eps)

TOL = {F64: 1e-12, F32: 4 * EPS32, F16: 4 * EPS32}
OUT_EPS = {F64: 2.0 ** -52, F32: 2.0 ** -23, F16: 2.0 ** -10}
ATOL = {F64: float(np.finfo(np.float64).tiny), F32: float(np.finfo(np.float32).tiny),
        F16: 2.0 ** -24}

REDUCTIONS = ("none", "mean", "sum")


# --- cases ---------------------------------------------------------------------------------------

SHAPES = {  # name: (input shape, axis)
    "C": ((7,), 1),              # 1-D input, 0-d target: the class axis is 0 whatever `axis` says
    "NC": ((13, 7), 1),
    "NCd": ((5, 7, 4), 1),
    "NCdd": ((3, 7, 4, 2), 1),
    "BTV": ((3, 5, 7), -1),      # (B, T, V) logits with a (B, T) target
    # Past the short-row kernels' class limit; and enough short rows for parallel tiles.
    "NC long rows": ((13, SHORT_ROW_CLASSES + 5), 1),
    "NC tiles": ((2 * TILE_ROWS + 37, 7), 1),
}
IGNORE_MODES = ("absent", "-100", "class0")
SMOOTHINGS = (0.0, 0.1, 1.0)


@dataclass
class Case:
    x: np.ndarray
    target: np.ndarray
    weight: np.ndarray | None
    ignore_index: int
    axis: int

    @property
    def kwargs(self):
        return dict(weight=self.weight, ignore_index=self.ignore_index, axis=self.axis)

    @property
    def dtype(self):
        return F64 if self.x.dtype.kind in "biu" else self.x.dtype

    @property
    def class_axis(self):
        return ref.class_axis(self.x.ndim, self.axis)

    @property
    def row_shape(self):
        ca = self.class_axis
        return self.x.shape[:ca] + self.x.shape[ca + 1:]

    @property
    def probs(self):
        return self.target.shape == self.x.shape


def make_case(shape_name, rng, dtype=F64, kind="indices", ignore="absent", weighted=False,
              scale=3.0):
    shape, axis = SHAPES[shape_name]
    ca = ref.class_axis(len(shape), axis)
    n_classes = shape[ca]
    x = (rng.standard_normal(shape) * scale).astype(dtype)
    weight = rng.uniform(0.25, 2.0, n_classes) if weighted else None
    if kind == "probs":
        y = rng.random(shape)
        y = (y / y.sum(axis=ca, keepdims=True)).astype(dtype)
        return Case(x, y, weight, -100, axis)
    row_shape = shape[:ca] + shape[ca + 1:]
    flat = rng.integers(0, n_classes, int(np.prod(row_shape))).astype(np.int64)
    ignore_index = -100
    if ignore == "-100":
        mask = rng.random(flat.size) < 0.3
        mask[0] = True
        if flat.size > 1:
            mask[-1] = False
        flat[mask] = -100
    elif ignore == "class0":
        ignore_index = 0
        flat[0] = 0
        if flat.size > 1:
            flat[-1] = 1 + flat[-1] % (n_classes - 1)
    return Case(x, flat.reshape(row_shape), weight, ignore_index, axis)


# --- error scales and comparisons -----------------------------------------------------------------

@dataclass
class Scales:
    loss_rows: np.ndarray   # the target's shape ('none')
    loss_total: float       # 'mean' / 'sum'
    grad: np.ndarray        # the input's shape, scaled like the gradient
    lse: np.ndarray


def error_scales(case, reduction, label_smoothing=0.0, z_loss=0.0, nll=False, logit_scale=0.0):
    """The magnitudes of the module docstring, for ``case`` and the options; ``logit_scale``
    adds the magnitude of an error the logits themselves carry, in units of the rounding (for
    soft-capped logits, the cap: its tanh is exact to a few ulp of 1)."""
    x, target, axis = case.x, case.target, case.axis
    xr, moved_shape = ref.to_rows(x, axis)
    n_rows, n_classes = xr.shape
    w = np.ones(n_classes) if case.weight is None else np.asarray(case.weight, np.float64)
    eps = label_smoothing
    with np.errstate(all="ignore"):
        lse = ref.row_lse(xr)
        m = np.max(xr, axis=1) if n_classes else np.zeros(n_rows)
        p = np.exp(ref.torch_log_softmax(xr))
        e = 1.0 + np.abs(xr - m[:, None]) + np.abs(lse - m)[:, None] + logit_scale
        e = np.where(np.isfinite(e), e, 0.0)
        p = np.where(np.isfinite(p), p, 0.0)
        if case.probs:
            y, _ = ref.to_rows(target, axis)
            if eps > 0 and n_classes:  # no classes: nothing to smooth
                y = y * (1 - eps) + eps / n_classes
            a = np.abs(w * y)
            keep = np.ones(n_rows, bool)
            denominator = np.float64(n_rows)
            rows_shape = moved_shape[:-1]
        else:
            t = target.reshape(-1).astype(np.int64)
            keep = t != case.ignore_index
            rows = np.arange(n_rows)[keep]
            a = np.zeros_like(xr)
            at_target = np.zeros(xr.shape, bool)
            at_target[rows, t[keep]] = True
            if nll:
                a[rows, t[keep]] = np.abs(w[t[keep]] * xr[rows, t[keep]])
            else:
                a += eps / n_classes * np.abs(w)
                a[rows, t[keep]] += (1 - eps) * np.abs(w[t[keep]])
            a[~keep] = 0.0
            denominator = np.sum(w[t[keep]], dtype=np.float64)
            rows_shape = target.shape
        if nll:
            loss_rows = a.sum(axis=1)
            grad = np.where(at_target, np.abs(w), 0.0)
        else:
            big_a = a.sum(axis=1)
            flse = np.where(np.isfinite(lse), np.abs(lse), 0.0)
            loss_rows = (a * e).sum(axis=1) + 2 * z_loss * flse * (1 + np.abs(lse - m))
            grad = ((big_a + 2 * z_loss * (flse + 1))[:, None] * p * e + a)
        loss_rows = np.where(keep, loss_rows, 0.0)
        grad = np.where(keep[:, None], grad, 0.0)
        loss_rows = np.where(np.isfinite(loss_rows), loss_rows, 0.0)
        scale = 1.0 / denominator if reduction == "mean" else 1.0
        total = np.sum(loss_rows) * scale
        grad = grad * scale if np.isfinite(scale) else grad
        lse_scale = np.where(np.isfinite(lse), 1 + np.abs(lse - m), 0.0)
    return Scales(loss_rows.reshape(rows_shape), float(total),
                  ref.from_rows(grad, moved_shape, x.ndim, axis), lse_scale.reshape(moved_shape[:-1]))


def check_close(res, expected, magnitude, dtype, what):
    """``res`` against the float64 ``expected`` with the module docstring's bound."""
    dtype = np.dtype(dtype)
    res = np.asarray(res, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    magnitude = np.broadcast_to(np.asarray(magnitude, dtype=np.float64), expected.shape)
    finite = assert_nonfinite_match(res, expected, what)
    err = np.abs(res[finite] - expected[finite])
    bound = (TOL[dtype] * magnitude[finite] + OUT_EPS[dtype] * np.abs(expected[finite])
             + ATOL[dtype])
    over = err > bound
    if over.any():
        worst = int(np.argmax(err / bound))
        where = np.argwhere(finite)[worst].tolist() if expected.ndim else "()"
        pytest.fail(f"{what}: {int(over.sum())} of {err.size} values out of tolerance; worst at "
                    f"{where}: got {res[finite][worst]!r}, expected {expected[finite][worst]!r}, "
                    f"error {err[worst]:.3e} > bound {bound[worst]:.3e}")


def check_loss(loss, expected, scales, dtype, reduction, row_shape, what):
    if reduction == "none":
        assert isinstance(loss, (np.ndarray, np.generic)), f"{what}: got {type(loss)}"
        assert np.shape(loss) == tuple(row_shape), f"{what}: shape {np.shape(loss)} != {row_shape}"
        assert loss.dtype == dtype, f"{what}: dtype {loss.dtype} != {dtype}"
        check_close(loss, expected, scales.loss_rows, dtype, what)
    else:
        assert type(loss) is dtype.type, f"{what}: {type(loss)} is not a NumPy {dtype} scalar"
        check_close(loss, expected, scales.loss_total, dtype, what)


def check_grad(grad, expected, scales, x, dtype, what):
    assert isinstance(grad, np.ndarray), f"{what}: got {type(grad)}"
    assert grad.shape == x.shape, f"{what}: shape {grad.shape} != {x.shape}"
    assert grad.dtype == dtype, f"{what}: dtype {grad.dtype} != {dtype}"
    check_close(grad, expected, scales.grad, dtype, what)


def check_lse(lse, expected, scales, row_shape, dtype, what):
    assert np.shape(lse) == tuple(row_shape), f"{what}: shape {np.shape(lse)} != {row_shape}"
    assert np.asarray(lse).dtype == dtype, f"{what}: dtype {np.asarray(lse).dtype} != {dtype}"
    check_close(lse, expected, scales.lse, dtype, what)


# --- expected values: the reference and PyTorch ---------------------------------------------------

def expected_reference(case, reduction, label_smoothing=0.0, z_loss=0.0):
    return ref.cross_entropy(case.x, case.target, case.weight, case.ignore_index, reduction,
                             label_smoothing, axis=case.axis, z_loss=z_loss)


def expected_reference_nll(case, reduction):
    return ref.nll_loss(case.x, case.target, case.weight, case.ignore_index, reduction,
                        axis=case.axis)


def _torch_inputs(case):
    """Float64 tensors in PyTorch's layout (classes on dim 1, or dim 0 of a 1-D input)."""
    x = np.asarray(case.x, dtype=np.float64)
    ca, tdim = case.class_axis, (1 if x.ndim > 1 else 0)
    xt = torch.tensor(np.moveaxis(x, ca, tdim).copy(), requires_grad=True)
    if case.probs:
        tt = torch.tensor(np.moveaxis(np.asarray(case.target, np.float64), ca, tdim).copy())
    else:
        tt = torch.tensor(np.asarray(case.target).astype(np.int64))
    wt = None if case.weight is None else torch.tensor(np.asarray(case.weight, np.float64))
    return xt, tt, wt, tdim


def _torch_finish(case, loss, xt, tdim):
    loss.backward(torch.ones_like(loss))
    grad = np.moveaxis(xt.grad.numpy(), tdim, case.class_axis)
    value = loss.detach().numpy()
    return (value if value.ndim else float(value)), grad


def expected_torch(case, reduction, label_smoothing=0.0, z_loss=0.0):
    """``(loss, grad, lse)`` from torch.nn.functional.cross_entropy and autograd, in float64.

    z_loss is not a PyTorch option: its term is built from torch.logsumexp, masked to the kept rows
    and divided by the same 'mean' denominator."""
    xt, tt, wt, tdim = _torch_inputs(case)
    loss = TF.cross_entropy(xt, tt, weight=wt, ignore_index=case.ignore_index,
                            reduction=reduction, label_smoothing=label_smoothing)
    lse = torch.logsumexp(xt, dim=tdim)
    if z_loss > 0:
        if case.probs:
            keep = torch.ones_like(lse)
            denominator = float(lse.numel())
        else:
            t = np.asarray(case.target).astype(np.int64)
            kept = t != case.ignore_index
            keep = torch.tensor(kept.astype(np.float64))
            w = np.ones(xt.shape[tdim]) if case.weight is None else np.asarray(case.weight)
            denominator = float(np.sum(w[t[kept]]))
        z_term = torch.where(keep > 0, z_loss * lse ** 2, torch.zeros_like(lse))
        if reduction == "mean" and denominator == 0:
            pass  # everything ignored or empty: the mean is nan already, the gradient 0
        elif reduction == "none":
            loss = loss + z_term
        elif reduction == "sum":
            loss = loss + z_term.sum()
        else:
            loss = loss + z_term.sum() / denominator
    value, grad = _torch_finish(case, loss, xt, tdim)
    return value, grad, lse.detach().numpy()


def expected_torch_nll(case, reduction):
    xt, tt, wt, tdim = _torch_inputs(case)
    loss = TF.nll_loss(xt, tt, weight=wt, ignore_index=case.ignore_index, reduction=reduction)
    return _torch_finish(case, loss, xt, tdim)


# --- running fastlsm ------------------------------------------------------------------------------

def run_cross_entropy(case, expected_fn, label_smoothing=0.0, z_loss=0.0, label=""):
    """Every reduction: loss, grad and lse together, then the loss alone, against ``expected_fn``."""
    x_before, t_before = case.x.copy(), case.target.copy()
    dtype = case.dtype
    for reduction in REDUCTIONS:
        what = f"{label} reduction={reduction!r}"
        exp_loss, exp_grad, exp_lse = expected_fn(case, reduction, label_smoothing, z_loss)
        scales = error_scales(case, reduction, label_smoothing, z_loss)
        got = fastlsm.cross_entropy(case.x, case.target, reduction=reduction,
                                    label_smoothing=label_smoothing, return_grad=True,
                                    z_loss=z_loss, return_lse=True, **case.kwargs)
        assert isinstance(got, tuple) and len(got) == 3, f"{what}: got {type(got)}"
        loss, grad, lse = got
        check_loss(loss, exp_loss, scales, dtype, reduction, case.row_shape, f"{what} loss")
        check_grad(grad, exp_grad, scales, case.x, dtype, f"{what} grad")
        check_lse(lse, exp_lse, scales, case.row_shape, dtype, f"{what} lse")
        alone = fastlsm.cross_entropy(case.x, case.target, reduction=reduction,
                                      label_smoothing=label_smoothing, z_loss=z_loss,
                                      **case.kwargs)
        check_loss(alone, exp_loss, scales, dtype, reduction, case.row_shape,
                   f"{what} loss (without return_grad)")
        np.testing.assert_array_equal(case.x, x_before, err_msg=f"{what}: the input was modified")
        np.testing.assert_array_equal(case.target, t_before, err_msg=f"{what}: target modified")


def run_nll(case, expected_fn, label=""):
    x_before = case.x.copy()
    dtype = case.dtype
    for reduction in REDUCTIONS:
        what = f"{label} nll_loss reduction={reduction!r}"
        exp_loss, exp_grad = expected_fn(case, reduction)
        scales = error_scales(case, reduction, nll=True)
        got = fastlsm.nll_loss(case.x, case.target, reduction=reduction, return_grad=True,
                               **case.kwargs)
        assert isinstance(got, tuple) and len(got) == 2, f"{what}: got {type(got)}"
        loss, grad = got
        check_loss(loss, exp_loss, scales, dtype, reduction, case.row_shape, f"{what} loss")
        check_grad(grad, exp_grad, scales, case.x, dtype, f"{what} grad")
        alone = fastlsm.nll_loss(case.x, case.target, reduction=reduction, **case.kwargs)
        check_loss(alone, exp_loss, scales, dtype, reduction, case.row_shape,
                   f"{what} loss (without return_grad)")
        np.testing.assert_array_equal(case.x, x_before, err_msg=f"{what}: the input was modified")


def nll_case(shape_name, rng, dtype=F64, ignore="absent", weighted=False):
    """A class-index case whose input holds log-probabilities."""
    case = make_case(shape_name, rng, F64, "indices", ignore, weighted)
    case.x = ref.from_rows(ref.torch_log_softmax(ref.to_rows(case.x, case.axis)[0]),
                           np.moveaxis(case.x, case.class_axis, -1).shape, case.x.ndim,
                           case.axis).astype(dtype)
    return case


SOURCES = {"reference": (expected_reference, expected_reference_nll),
           "torch": (expected_torch, expected_torch_nll)}
source_param = pytest.mark.parametrize(
    "source", ["reference", pytest.param("torch", marks=needs_torch)])


# --- (a) and (b): the product, against the reference and against PyTorch ---------------------------

@source_param
@pytest.mark.parametrize("label_smoothing", SMOOTHINGS)
@pytest.mark.parametrize("ignore", IGNORE_MODES)
@pytest.mark.parametrize("weighted", [False, True], ids=["w=None", "w=random"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_cross_entropy_class_indices(source, shape, weighted, ignore, label_smoothing, rng):
    case = make_case(shape, rng, F64, "indices", ignore, weighted)
    run_cross_entropy(case, SOURCES[source][0], label_smoothing)


@source_param
@pytest.mark.parametrize("label_smoothing", SMOOTHINGS)
@pytest.mark.parametrize("weighted", [False, True], ids=["w=None", "w=random"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_cross_entropy_probabilities(source, shape, weighted, label_smoothing, rng):
    case = make_case(shape, rng, F64, "probs", weighted=weighted)
    run_cross_entropy(case, SOURCES[source][0], label_smoothing)


@source_param
@pytest.mark.parametrize("kind", ["indices", "probs"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", [F32, F64, F16], ids=str)
def test_cross_entropy_dtypes(source, dtype, shape, kind, rng):
    # weights, ignored elements, smoothing and z_loss all at once
    case = make_case(shape, rng, dtype, kind, "-100", weighted=True)
    run_cross_entropy(case, SOURCES[source][0], 0.1, 1e-3, label=f"{dtype}")


@source_param
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("z_loss", [1e-4, 0.5])
@pytest.mark.parametrize("kind", ["indices", "probs"])
def test_z_loss(source, kind, z_loss, dtype, rng):
    case = make_case("NCd", rng, dtype, kind, "-100", weighted=True)
    case.x += np.asarray(4.0, dtype)  # lse well away from 0, so the z term matters
    run_cross_entropy(case, SOURCES[source][0], 0.0, z_loss)
    run_cross_entropy(case, SOURCES[source][0], 0.1, z_loss, label="smoothing 0.1")


def test_z_loss_changes_the_loss_by_its_term(rng):
    case = make_case("NC", rng, F64, "indices", "-100", weighted=True)
    base, g0, lse = fastlsm.cross_entropy(case.x, case.target, reduction="none", return_grad=True,
                                          return_lse=True, **case.kwargs)
    with_z, g1 = fastlsm.cross_entropy(case.x, case.target, reduction="none", return_grad=True,
                                       z_loss=0.25, **case.kwargs)
    keep = case.target != -100
    np.testing.assert_allclose(with_z - base, np.where(keep, 0.25 * lse ** 2, 0.0), rtol=1e-12,
                               atol=1e-12)
    p = np.exp(case.x - lse[:, None])
    np.testing.assert_allclose(g1 - g0, np.where(keep[:, None], 0.5 * lse[:, None] * p, 0.0),
                               rtol=1e-11, atol=1e-13)


# --- soft-capping -----------------------------------------------------------------------------------

def soft_capped_case(case, softcap):
    """``case`` with its logits capped, in float64, and ``d capped / d logits``."""
    capped = softcap * np.tanh(np.asarray(case.x, np.float64) / softcap)
    return Case(capped, case.target, case.weight, case.ignore_index, case.axis), (
        1.0 - (capped / softcap) ** 2)


def check_soft_capped(case, softcap, reduction, options, what, grad_out=None, on=None):
    """``cross_entropy(..., softcap=)`` against the reference on the capped logits, its
    gradient brought back by the chain rule; on the backend ``on`` where given."""
    capped, slope = soft_capped_case(case, softcap)
    exp_loss, exp_grad, exp_lse = ref.cross_entropy(capped.x, case.target, case.weight,
                                                    case.ignore_index, reduction,
                                                    axis=case.axis, **options)
    scales = error_scales(capped, reduction, **options, logit_scale=softcap)
    dtype = case.dtype
    move = (lambda a: a) if on is None else on.array
    kwargs = {k: (move(v) if isinstance(v, np.ndarray) else v) for k, v in case.kwargs.items()}
    got = fastlsm.cross_entropy(move(case.x), move(case.target), reduction=reduction,
                                return_grad=True, return_lse=True, softcap=softcap,
                                grad_out=grad_out, **options, **kwargs)
    loss, grad, lse = got if on is None else on.result(got)
    check_loss(loss, exp_loss, scales, dtype, reduction, case.row_shape, f"{what} loss")
    check_grad(grad, exp_grad * slope, scales, case.x, dtype, f"{what} grad")
    check_lse(lse, exp_lse, scales, case.row_shape, dtype, f"{what} lse")
    return grad


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", ["indices", "probs"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_softcap(shape, kind, dtype, rng):
    """The loss of the capped logits on every CPU layout (short rows, long rows, tiles, classes
    on another axis), with every option; logits large enough that the cap bites."""
    case = make_case(shape, rng, dtype=dtype, kind=kind, weighted=True,
                     ignore="-100" if kind == "indices" else "absent", scale=20.0)
    for options in ({}, dict(label_smoothing=0.2), dict(z_loss=1e-3)):
        for reduction in REDUCTIONS:
            check_soft_capped(case, 15.0, reduction, options, f"{shape} {kind} {options} "
                              f"{reduction}")


def test_softcap_in_place(rng):
    """``grad_out`` that is the logits themselves: each row is capped before it is overwritten."""
    case = make_case("NC long rows", rng, scale=20.0)
    x_before = case.x.copy()
    grad = check_soft_capped(Case(case.x.copy(), case.target, None, -100, 1), 15.0, "mean", {},
                             "in place", grad_out=case.x)
    assert grad is case.x
    assert not np.array_equal(case.x, x_before)


def test_softcap_with_grad_loss_is_the_vjp(rng):
    """``grad_loss`` per row with ``none``: what ``loss.backward(grad_loss)`` gives PyTorch."""
    torch = pytest.importorskip("torch")
    case = make_case("NC", rng, scale=20.0)
    upstream = rng.standard_normal(case.row_shape)
    xt = torch.tensor(case.x, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(15.0 * torch.tanh(xt / 15.0),
                                             torch.tensor(case.target), reduction="none")
    loss.backward(torch.tensor(upstream))
    _, grad = fastlsm.cross_entropy(case.x, case.target, reduction="none", softcap=15.0,
                                    return_grad=True, grad_loss=upstream)
    np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=1e-12, atol=1e-15)


def test_softcap_bounds_the_logits(rng):
    """Capped, an infinite logit is ``softcap``: the row's loss is finite where the raw one is
    nan, and a huge cap changes nothing within rounding."""
    x = np.array([[np.inf, 0.0, 1.0], [-np.inf, 0.0, 1.0]])
    loss = fastlsm.cross_entropy(x, np.array([1, 2]), reduction="none", softcap=5.0)
    capped = 5.0 * np.tanh(x / 5.0)
    assert np.array_equal(capped[:, 0], [5.0, -5.0])
    np.testing.assert_allclose(loss, ref.cross_entropy(capped, np.array([1, 2]),
                                                       reduction="none")[0], rtol=1e-14)
    case = make_case("NC", rng)
    np.testing.assert_allclose(
        fastlsm.cross_entropy(case.x, case.target, softcap=1e8),
        fastlsm.cross_entropy(case.x, case.target), rtol=1e-12)



@source_param
@pytest.mark.parametrize("ignore", IGNORE_MODES)
@pytest.mark.parametrize("weighted", [False, True], ids=["w=None", "w=random"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_nll_loss(source, shape, weighted, ignore, rng):
    run_nll(nll_case(shape, rng, F64, ignore, weighted), SOURCES[source][1])


@source_param
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
def test_nll_loss_dtypes(source, dtype, shape, rng):
    run_nll(nll_case(shape, rng, dtype, "-100", True), SOURCES[source][1], label=str(dtype))


@pytest.mark.parametrize("ignore", IGNORE_MODES)
def test_nll_loss_of_log_softmax_is_cross_entropy(ignore, rng):
    case = make_case("NCd", rng, F64, "indices", ignore, weighted=True)
    logp = fastlsm.log_softmax(case.x, axis=1)
    for reduction in REDUCTIONS:
        a = fastlsm.nll_loss(logp, case.target, reduction=reduction, **case.kwargs)
        b = fastlsm.cross_entropy(case.x, case.target, reduction=reduction, **case.kwargs)
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


# --- API shape of the results -----------------------------------------------------------------------

def test_signatures():
    P, K = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
    ce = inspect.signature(fastlsm.cross_entropy).parameters
    assert [(n, p.kind, p.default) for n, p in ce.items()] == [
        ("input", P, inspect.Parameter.empty), ("target", P, inspect.Parameter.empty),
        ("weight", P, None), ("ignore_index", P, -100), ("reduction", P, "mean"),
        ("label_smoothing", P, 0.0), ("axis", K, 1), ("return_grad", K, False),
        ("grad_out", K, None), ("z_loss", K, 0.0), ("return_lse", K, False),
        ("grad_loss", K, None), ("softcap", K, None), ("device", K, None)]
    nll = inspect.signature(fastlsm.nll_loss).parameters
    assert [(n, p.kind, p.default) for n, p in nll.items()] == [
        ("input", P, inspect.Parameter.empty), ("target", P, inspect.Parameter.empty),
        ("weight", P, None), ("ignore_index", P, -100), ("reduction", P, "mean"),
        ("axis", K, 1), ("return_grad", K, False), ("grad_out", K, None), ("grad_loss", K, None),
        ("device", K, None)]
    assert "cross_entropy" in fastlsm.__all__ and "nll_loss" in fastlsm.__all__


def test_return_structure_and_positional_arguments(rng):
    case = make_case("NC", rng, F32, "indices", "-100", weighted=True)
    x, t, w = case.x, case.target, case.weight
    loss = fastlsm.cross_entropy(x, t)
    assert type(loss) is np.float32
    loss_g = fastlsm.cross_entropy(x, t, return_grad=True)
    assert isinstance(loss_g, tuple) and len(loss_g) == 2 and loss_g[1].shape == x.shape
    loss_l = fastlsm.cross_entropy(x, t, return_lse=True)
    assert isinstance(loss_l, tuple) and len(loss_l) == 2 and loss_l[1].shape == (13,)
    loss_gl = fastlsm.cross_entropy(x, t, return_grad=True, return_lse=True)
    assert isinstance(loss_gl, tuple) and len(loss_gl) == 3
    assert loss_gl[1].shape == x.shape and loss_gl[2].shape == (13,)
    for r in (loss_g[0], loss_l[0], loss_gl[0]):
        np.testing.assert_allclose(r, loss, rtol=4 * EPS32)
    np.testing.assert_allclose(loss_gl[1], loss_g[1], rtol=4 * EPS32, atol=1e-12)
    np.testing.assert_allclose(loss_gl[2], loss_l[1], rtol=4 * EPS32)
    # positional order: input, target, weight, ignore_index, reduction, label_smoothing
    a = fastlsm.cross_entropy(x, t, w, -100, "sum", 0.2)
    b = fastlsm.cross_entropy(x, t, weight=w, ignore_index=-100, reduction="sum",
                              label_smoothing=0.2)
    assert a == b
    a = fastlsm.nll_loss(x, t, w, -100, "none")
    b = fastlsm.nll_loss(x, t, weight=w, ignore_index=-100, reduction="none")
    np.testing.assert_array_equal(a, b)
    assert isinstance(fastlsm.nll_loss(x, t, return_grad=True), tuple)
    assert type(fastlsm.nll_loss(x, t)) is np.float32


def test_worked_example():
    logits = np.array([[2.0, 1.0, 0.1], [0.5, 2.0, 1.5]])
    t = np.array([0, 1])
    # -log_softmax = [0.4170, 0.6041] -> mean 0.5106
    np.testing.assert_allclose(fastlsm.cross_entropy(logits, t), 0.51055, atol=5e-5)
    np.testing.assert_allclose(fastlsm.cross_entropy(logits, t, reduction="none"),
                               [0.4170, 0.6041], atol=5e-5)


# --- (c) hypothesis ---------------------------------------------------------------------------------

try:
    from hypothesis import given, settings, strategies as st
    from hypothesis.extra import numpy as hnp
except ImportError:  # pragma: no cover - hypothesis is in the [test] extra
    given = None


def problems(draw):
    ndim = draw(st.integers(1, 4))
    n_classes = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([F64, F32]))
    if ndim == 1:
        shape, class_axis = (n_classes,), 0
        axis = draw(st.sampled_from([1, 0, -1]))
    else:
        others = draw(st.lists(st.integers(0, 4), min_size=ndim - 1, max_size=ndim - 1))
        class_axis = draw(st.integers(0, ndim - 1))
        shape = tuple(others[:class_axis]) + (n_classes,) + tuple(others[class_axis:])
        axis = class_axis - draw(st.sampled_from([0, ndim]))  # as given or negative
    x = draw(hnp.arrays(dtype, shape, elements=st.floats(-30, 30, width=dtype.itemsize * 8)))
    row_shape = shape[:class_axis] + shape[class_axis + 1:]
    weight = draw(st.none() | hnp.arrays(np.float64, n_classes, elements=st.floats(0.1, 3.0)))
    if draw(st.booleans()):  # class probabilities
        target = draw(hnp.arrays(dtype, shape, elements=st.floats(0, 1, width=dtype.itemsize * 8)))
        ignore_index = draw(st.sampled_from([-100, -1]))
    else:
        ignore_index = draw(st.sampled_from([-100, -1, 0, n_classes - 1]))
        target = draw(hnp.arrays(np.int64, row_shape, elements=st.sampled_from(
            sorted(set(range(n_classes)) | {ignore_index}))))
        target = target.astype(draw(st.sampled_from([np.int64, np.int32, np.int16])))
    case = Case(x, target, weight, ignore_index, axis)
    reduction = draw(st.sampled_from(REDUCTIONS))
    label_smoothing = draw(st.sampled_from([0.0, 1.0]) | st.floats(0, 1))
    z_loss = draw(st.sampled_from([0.0]) | st.floats(0, 0.1))
    return case, reduction, label_smoothing, z_loss


def _hypothesis_test(max_examples):
    """``given(problems())`` with these settings, or a skip where hypothesis is not installed."""
    def decorate(test):
        if given is None:
            return pytest.mark.skip(reason="hypothesis is not installed")(lambda: None)
        return settings(max_examples=max_examples, deadline=None)(
            given(st.composite(problems)())(test))
    return decorate


@_hypothesis_test(80)
def test_hypothesis_cross_entropy(problem):
    case, reduction, eps, z = problem
    x_before = case.x.copy()
    exp_loss, exp_grad, exp_lse = expected_reference(case, reduction, eps, z)
    scales = error_scales(case, reduction, eps, z)
    loss, grad, lse = fastlsm.cross_entropy(case.x, case.target, reduction=reduction,
                                            label_smoothing=eps, return_grad=True, z_loss=z,
                                            return_lse=True, **case.kwargs)
    check_loss(loss, exp_loss, scales, case.dtype, reduction, case.row_shape, "loss")
    check_grad(grad, exp_grad, scales, case.x, case.dtype, "grad")
    check_lse(lse, exp_lse, scales, case.row_shape, case.dtype, "lse")
    np.testing.assert_array_equal(case.x, x_before)


@_hypothesis_test(60)
def test_hypothesis_nll_loss(problem):
    case, reduction, _, _ = problem
    if case.probs:
        return
    exp_loss, exp_grad = expected_reference_nll(case, reduction)
    scales = error_scales(case, reduction, nll=True)
    loss, grad = fastlsm.nll_loss(case.x, case.target, reduction=reduction, return_grad=True,
                                  **case.kwargs)
    check_loss(loss, exp_loss, scales, case.dtype, reduction, case.row_shape, "loss")
    check_grad(grad, exp_grad, scales, case.x, case.dtype, "grad")


# --- (d) layouts, grad_out, dtypes of targets and logits, edge cases ---------------------------------

def _layout_cases(rng, dtype):
    """(name, strided input, axis, the same values C-contiguous with axis 1 or -1, target)."""
    out = []
    big = (rng.standard_normal((9, 14)) * 3).astype(dtype)
    t9 = rng.integers(0, 7, 9)
    x = big[:, ::2]
    out.append(("every other class", x, 1, np.ascontiguousarray(x), t9))
    x = big[::-1, ::-2]
    out.append(("negative strides", x, 1, np.ascontiguousarray(x), t9))
    x = np.asfortranarray(big[:, :7])
    out.append(("Fortran order", x, 1, np.ascontiguousarray(x), t9))
    x = np.ascontiguousarray(big[:, :7].T)  # (C, N) with the classes on axis 0
    out.append(("transposed, axis=0", x, 0, np.ascontiguousarray(x.T), t9))
    x = np.ascontiguousarray(big[:, :7]).T  # a transposed view: (C, N), axis 0
    out.append(("transposed view, axis=0", x, 0, np.ascontiguousarray(x.T), t9))
    big3 = (rng.standard_normal((4, 10, 7)) * 3).astype(dtype)
    x = big3[:, ::2, :]
    t45 = rng.integers(0, 7, (4, 5))
    out.append(("(B, T, V) every other T, axis=-1", x, -1, np.ascontiguousarray(x), t45))
    x = np.moveaxis(big3[:, :5, :], 2, 1)  # (B, V, T) view with the classes on axis 1
    out.append(("(B, V, T) view of (B, T, V), axis=1", x, 1, np.ascontiguousarray(x), t45))
    return out


@pytest.mark.parametrize("dtype", [F32, F64, F16], ids=str)
def test_strided_inputs(dtype, rng):
    for name, x, axis, xc, t in _layout_cases(rng, dtype):
        x_before = x.copy()
        case = Case(x, t, rng.uniform(0.5, 2, 7), -100, axis)
        for reduction in REDUCTIONS:
            exp_loss, exp_grad, exp_lse = expected_reference(case, reduction, 0.1, 1e-3)
            scales = error_scales(case, reduction, 0.1, 1e-3)
            loss, grad, lse = fastlsm.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1,
                                                    return_grad=True, z_loss=1e-3,
                                                    return_lse=True, **case.kwargs)
            what = f"{name} {reduction}"
            check_loss(loss, exp_loss, scales, case.dtype, reduction, case.row_shape, what)
            check_grad(grad, exp_grad, scales, x, case.dtype, what + " grad")
            check_lse(lse, exp_lse, scales, case.row_shape, case.dtype, what + " lse")
            # the same values laid out plainly give the same answers (to the same tolerance)
            cc = Case(xc, t, case.weight, -100, 1 if axis == 0 else axis)
            csc = error_scales(cc, reduction, 0.1, 1e-3)
            lc, gc = fastlsm.cross_entropy(xc, t, reduction=reduction, label_smoothing=0.1,
                                           return_grad=True, z_loss=1e-3, **cc.kwargs)
            check_close(loss, lc, 2 * (csc.loss_rows if reduction == "none" else csc.loss_total),
                        case.dtype, what + " vs contiguous")
            check_close(grad.T if axis == 0 else grad, gc, 2 * csc.grad, case.dtype,
                        what + " grad vs contiguous")
            nl, ng = fastlsm.nll_loss(x, t, reduction=reduction, return_grad=True,
                                      **case.kwargs)
            enl, eng = expected_reference_nll(case, reduction)
            nsc = error_scales(case, reduction, nll=True)
            check_loss(nl, enl, nsc, case.dtype, reduction, case.row_shape, what + " nll")
            check_grad(ng, eng, nsc, x, case.dtype, what + " nll grad")
            np.testing.assert_array_equal(x, x_before, err_msg=f"{name}: the input was modified")


@pytest.mark.parametrize("dtype", [F32, F64, F16], ids=str)
def test_read_only_and_list_inputs(dtype, rng):
    case = make_case("NCd", rng, dtype, "indices", "-100", weighted=True)
    case.x.flags.writeable = False
    case.target.flags.writeable = False
    run_cross_entropy(case, expected_reference, 0.1, label="read-only")
    lists = Case(case.x.astype(np.float64).tolist(), case.target.tolist(), case.weight.tolist(),
                 -100, 1)
    loss = fastlsm.cross_entropy(lists.x, lists.target, weight=lists.weight, reduction="sum")
    assert type(loss) is np.float64
    exp = ref.cross_entropy(np.array(lists.x), np.array(lists.target), case.weight, -100, "sum")[0]
    np.testing.assert_allclose(loss, exp, rtol=1e-12)


@pytest.mark.parametrize("dtype", [F32, F64, F16], ids=str)
def test_grad_out_fresh_arrays(dtype, rng):
    case = make_case("NCd", rng, dtype, "indices", "-100", weighted=True)
    x_before = case.x.copy()
    for reduction in REDUCTIONS:
        exp_loss, exp_grad, _ = expected_reference(case, reduction, 0.1)
        scales = error_scales(case, reduction, 0.1)
        outs = {"C-order": np.full(case.x.shape, 7, dtype),
                "Fortran order": np.asfortranarray(np.full(case.x.shape, 7, dtype)),
                "strided view": np.full((5, 7, 8), 7, dtype)[:, :, ::2]}
        for name, g_out in outs.items():
            loss, grad = fastlsm.cross_entropy(case.x, case.target, reduction=reduction,
                                               label_smoothing=0.1, return_grad=True,
                                               grad_out=g_out, **case.kwargs)
            assert grad is g_out, f"{name}: the gradient was not returned in grad_out"
            what = f"{reduction} grad_out {name}"
            check_loss(loss, exp_loss, scales, case.dtype, reduction, case.row_shape, what)
            check_grad(g_out, exp_grad, scales, case.x, case.dtype, what)
        g_out = np.full(case.x.shape, 7, dtype)
        nl, ng = fastlsm.nll_loss(case.x, case.target, reduction=reduction, return_grad=True,
                                  grad_out=g_out, **case.kwargs)
        assert ng is g_out
        enl, eng = expected_reference_nll(case, reduction)
        check_grad(ng, eng, error_scales(case, reduction, nll=True), case.x, case.dtype,
                   f"{reduction} nll grad_out")
        np.testing.assert_array_equal(case.x, x_before)


def _in_place_inputs(rng, dtype):
    out = []
    for shape in ("NC", "NCd", "BTV", "C"):
        out.append((shape, make_case(shape, rng, dtype, "indices", "-100", weighted=True)))
    out.append(("NCd probabilities", make_case("NCd", rng, dtype, "probs", weighted=True)))
    base = (rng.standard_normal((9, 14)) * 3).astype(dtype)
    out.append(("strided view", Case(base[:, ::2], rng.integers(0, 7, 9), None, -100, 1)))
    out.append(("transposed view, axis=0",
                Case(np.ascontiguousarray(base[:, :7]).T, rng.integers(0, 7, 9), None, -100, 0)))
    return out


@pytest.mark.parametrize("dtype", [F32, F64, F16], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_grad_out_is_the_input(dtype, reduction, rng):
    for name, case in _in_place_inputs(rng, dtype):
        original = Case(case.x.copy(), case.target, case.weight, case.ignore_index, case.axis)
        exp_loss, exp_grad, exp_lse = expected_reference(original, reduction, 0.1, 1e-3)
        scales = error_scales(original, reduction, 0.1, 1e-3)
        x = case.x
        loss, grad, lse = fastlsm.cross_entropy(x, case.target, reduction=reduction,
                                                label_smoothing=0.1, return_grad=True,
                                                grad_out=x, z_loss=1e-3, return_lse=True,
                                                **case.kwargs)
        assert grad is x, f"{name}: the gradient was not returned in the input array"
        what = f"{name} in place"
        check_loss(loss, exp_loss, scales, case.dtype, reduction, case.row_shape, what)
        check_grad(x, exp_grad, scales, original.x, case.dtype, what + " grad")
        check_lse(lse, exp_lse, scales, case.row_shape, case.dtype, what + " lse")
        if case.probs:
            continue
        # nll_loss in place
        y = nll_case("NCd", rng, dtype, "-100", True)
        y_orig = Case(y.x.copy(), y.target, y.weight, y.ignore_index, y.axis)
        enl, eng = expected_reference_nll(y_orig, reduction)
        nl, ng = fastlsm.nll_loss(y.x, y.target, reduction=reduction, return_grad=True,
                                  grad_out=y.x, **y.kwargs)
        assert ng is y.x
        nsc = error_scales(y_orig, reduction, nll=True)
        check_loss(nl, enl, nsc, case.dtype, reduction, y.row_shape, what + " nll")
        check_grad(y.x, eng, nsc, y_orig.x, case.dtype, what + " nll grad")


@pytest.mark.parametrize("tdtype", [np.int64, np.int32, np.int16, np.int8, np.uint8, np.uint16,
                                    np.uint32, np.uint64], ids=lambda d: np.dtype(d).name)
def test_integer_target_dtypes(tdtype, rng):
    x = (rng.standard_normal((6, 5, 3)) * 3).astype(np.float32)
    t64 = rng.integers(0, 5, (6, 3))
    signed = np.dtype(tdtype).kind == "i"
    if signed:
        t64[0, 0] = t64[3, 2] = -100
        ignore_index = -100
    else:
        t64[0, 0] = t64[3, 2] = 255 if tdtype == np.uint8 else 4  # 255: segmentation's "void"
        ignore_index = int(t64[0, 0])
    t = t64.astype(tdtype)
    w = rng.uniform(0.5, 2, 5)
    for reduction in REDUCTIONS:
        for eps in (0.0, 0.2):
            a = fastlsm.cross_entropy(x, t, w, ignore_index, reduction, eps, return_grad=True,
                                      return_lse=True)
            b = fastlsm.cross_entropy(x, t64, w, ignore_index, reduction, eps, return_grad=True,
                                      return_lse=True)
            for u, v in zip(a, b):
                np.testing.assert_array_equal(u, v, err_msg=f"{reduction} eps={eps}")
        a = fastlsm.nll_loss(x, t, w, ignore_index, reduction, return_grad=True)
        b = fastlsm.nll_loss(x, t64, w, ignore_index, reduction, return_grad=True)
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
        case = Case(x, t, w, ignore_index, 1)
        exp_loss, exp_grad, _ = expected_reference(case, reduction)
        scales = error_scales(case, reduction)
        check_loss(fastlsm.cross_entropy(x, t, w, ignore_index, reduction), exp_loss, scales, F32,
                   reduction, (6, 3), f"{reduction} target {t.dtype}")


@pytest.mark.parametrize("xdtype", [np.int32, np.int64, np.uint8, np.int8, np.bool_],
                         ids=lambda d: np.dtype(d).name)
def test_integer_and_bool_logits_become_float64(xdtype, rng):
    x = rng.integers(0, 2 if xdtype == np.bool_ else 20, (8, 5)).astype(xdtype)
    t = rng.integers(0, 5, 8)
    x64 = x.astype(np.float64)
    for reduction in REDUCTIONS:
        a = fastlsm.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1,
                                  return_grad=True, return_lse=True)
        b = fastlsm.cross_entropy(x64, t, reduction=reduction, label_smoothing=0.1,
                                  return_grad=True, return_lse=True)
        if reduction != "none":
            assert type(a[0]) is np.float64
        assert a[0].dtype == F64 and a[1].dtype == F64 and a[2].dtype == F64
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
        a = fastlsm.nll_loss(x, t, reduction=reduction, return_grad=True)
        b = fastlsm.nll_loss(x64, t, reduction=reduction, return_grad=True)
        assert a[1].dtype == F64
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_float16_is_computed_in_float32(label_smoothing, rng):
    x = (rng.standard_normal((7, 9, 3)) * 4).astype(np.float16)
    t = rng.integers(0, 9, (7, 3))
    t[1, 1] = -100
    for reduction in REDUCTIONS:
        a = fastlsm.cross_entropy(x, t, reduction=reduction, label_smoothing=label_smoothing,
                                  return_grad=True, return_lse=True)
        b = fastlsm.cross_entropy(x.astype(np.float32), t, reduction=reduction,
                                  label_smoothing=label_smoothing, return_grad=True,
                                  return_lse=True)
        for u, v in zip(a, b):
            assert np.asarray(u).dtype == F16
            # one rounding of the float32 answer (a float16 computation is off by far more)
            np.testing.assert_allclose(np.asarray(u, np.float64),
                                       np.asarray(v, np.float64).astype(np.float16),
                                       rtol=2.0 ** -10, atol=2.0 ** -24)


def test_float16_large_logits_do_not_overflow():
    # exp(11.1) overflows float16: a computation in float16 would give inf or nan
    x = np.array([[1e4, 1e4 - 8, 1e4 - 16], [-1e4, -1e4 + 8, -1e4], [60000, 0, -5000]],
                 dtype=np.float16)
    t = np.array([1, 0, 0])
    case = Case(x, t, None, -100, 1)
    run_cross_entropy(case, expected_reference, 0.1, label="float16 large")


@source_param
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(5, 4), (3, 4, 2), (4,)])
def test_all_ignored(source, shape, label_smoothing, rng):
    x = rng.standard_normal(shape)
    row_shape = (shape[0],) + shape[2:] if len(shape) > 1 else ()
    for ignore_index, fill in ((-100, -100), (2, 2)):
        case = Case(x, np.full(row_shape, fill), rng.uniform(0.5, 2, 4), ignore_index, 1)
        run_cross_entropy(case, SOURCES[source][0], label_smoothing, 0.01,
                          label=f"ignore_index={ignore_index}")
        loss = fastlsm.cross_entropy(x, case.target, **case.kwargs)
        assert np.isnan(loss) and type(loss) is np.float64
        assert fastlsm.cross_entropy(x, case.target, reduction="sum", **case.kwargs) == 0.0
        _, grad, lse = fastlsm.cross_entropy(x, case.target, return_grad=True, return_lse=True,
                                             label_smoothing=label_smoothing, **case.kwargs)
        assert np.all(grad == 0), "ignored elements must get a zero gradient"
        np.testing.assert_allclose(lse, ref.row_lse(ref.to_rows(x, 1)[0]).reshape(row_shape),
                                   rtol=1e-13)  # lse of every row, ignored ones too
        run_nll(Case(x, case.target, case.weight, ignore_index, 1), SOURCES[source][1])
        assert np.isnan(fastlsm.nll_loss(x, case.target, **case.kwargs))


@pytest.mark.parametrize("eps", [-0.1, -INF, NAN])
def test_label_smoothing_not_above_zero_is_none(eps, rng):
    """PyTorch checks only ``eps <= 1``: a negative or nan ``eps`` means no smoothing."""
    x = rng.standard_normal((4, 5))
    for target in (np.array([0, 1, 2, 3]), rng.dirichlet(np.ones(5), 4)):
        loss, grad = fastlsm.cross_entropy(x, target, label_smoothing=eps, return_grad=True)
        loss0, grad0 = fastlsm.cross_entropy(x, target, return_grad=True)
        assert loss == loss0
        np.testing.assert_array_equal(grad, grad0)
        if torch is not None:
            expected = TF.cross_entropy(torch.from_numpy(x), torch.from_numpy(target),
                                        label_smoothing=eps)
            np.testing.assert_allclose(loss, expected.item(), rtol=1e-14)


@source_param
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("shape, kind", [((0, 5), "indices"), ((0, 5, 3), "indices"),
                                         ((2, 5, 0), "indices"), ((0, 5), "probs"),
                                         ((3, 5, 0), "probs"), ((3, 0), "probs"),
                                         ((2, 0, 4), "probs")])
def test_empty(source, shape, kind, dtype, rng):
    x = np.empty(shape, dtype)
    row_shape = (shape[0],) + shape[2:]
    target = np.empty(shape, dtype) if kind == "probs" else np.empty(row_shape, np.int64)
    case = Case(x, target, None, -100, 1)
    run_cross_entropy(case, SOURCES[source][0], 0.1, 0.01)
    assert np.isnan(fastlsm.cross_entropy(x, target))
    assert fastlsm.cross_entropy(x, target, reduction="sum") == 0
    none = fastlsm.cross_entropy(x, target, reduction="none")
    assert none.shape == row_shape and none.dtype == dtype
    np.testing.assert_array_equal(none, 0)  # rows of no classes: an empty sum, as PyTorch's
    if kind == "indices":
        run_nll(case, SOURCES[source][1])


NONFINITE_ROWS = [  # (logits, target)
    ([INF, 1.0, 2.0, 0.0], 1),         # +inf: nan (PyTorch)
    ([INF, INF, 1.0, 0.0], 0),
    ([-INF, -INF, -INF, -INF], 2),     # all -inf: nan
    ([NAN, 1.0, 2.0, 0.0], 0),         # nan propagates
    ([1.0, NAN, 2.0, 0.0], 0),
    ([-INF, 0.0, 1.0, 2.0], 1),        # -inf entries are fine: finite loss
    ([-INF, 0.0, 1.0, 2.0], 0),        # ... unless the target is one: +inf loss
    ([1e4, 0.0, -1e4, 5.0], 1),        # large but finite: no overflow
    ([0.5, -1.0, 2.0, 0.0], 3),
    ([INF, NAN, 1.0, -INF], -100),     # ignored: 0 loss and 0 gradient, whatever the logits
]


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_nonfinite_rows(dtype, label_smoothing):
    x = np.array([r for r, _ in NONFINITE_ROWS], dtype=dtype)
    t = np.array([t for _, t in NONFINITE_ROWS])
    case = Case(x, t, None, -100, 1)
    run_cross_entropy(case, expected_reference, label_smoothing, label="non-finite")
    loss, grad, lse = fastlsm.cross_entropy(x, t, reduction="none", return_grad=True,
                                            label_smoothing=label_smoothing, return_lse=True)
    assert np.all(np.isnan(loss[:5])) and loss[6] == INF
    # a -inf logit off the target is harmless, except to the smoothing term (-log 0 = inf)
    assert np.isfinite(loss[5]) if label_smoothing == 0 else loss[5] == INF
    assert loss[9] == 0 and np.all(grad[9] == 0)
    # lse follows fastlsm.logsumexp (SciPy's rules) on every row, the ignored one too
    np.testing.assert_array_equal(np.isnan(lse), np.isnan(fastlsm.logsumexp(x, axis=1)))
    np.testing.assert_allclose(lse, fastlsm.logsumexp(x, axis=1), rtol=4 * EPS32)
    assert lse[0] == INF and lse[2] == -INF and np.isnan(lse[3])
    # 'mean' over the rows whose loss is finite (the ignored nan row included) is finite
    finite_rows = [5, 7, 8, 9] if label_smoothing == 0 else [7, 8, 9]
    m = fastlsm.cross_entropy(x[finite_rows], t[finite_rows], label_smoothing=label_smoothing)
    assert np.isfinite(m)
    assert np.isnan(fastlsm.cross_entropy(x, t, label_smoothing=label_smoothing))


@pytest.mark.parametrize("n_classes", [4, SHORT_ROW_CLASSES + 1])
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_nonfinite_rows_among_many(dtype, n_classes, rng):
    # The rows above, padded with -inf classes (harmless off the target), spread over tiles and
    # threads among finite rows.
    x = (rng.standard_normal((3 * TILE_ROWS + 37, n_classes)) * 3).astype(dtype)
    t = rng.integers(0, 4, len(x))
    places = [0, 1, TILE_ROWS - 1, TILE_ROWS, TILE_ROWS + 1, 2 * TILE_ROWS - 1, 2 * TILE_ROWS,
              2 * TILE_ROWS + 5, len(x) - 2, len(x) - 1]
    for place, (row, target) in zip(places, NONFINITE_ROWS, strict=True):
        x[place] = -INF
        x[place, :4] = row
        t[place] = target
    run_cross_entropy(Case(x, t, None, -100, 1), expected_reference, 0.0, label="spread")


@needs_torch
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_nonfinite_rows_match_torch(dtype, label_smoothing):
    x = np.array([r for r, _ in NONFINITE_ROWS], dtype=dtype)
    t = np.array([t for _, t in NONFINITE_ROWS])
    kept = t != -100  # PyTorch's autograd gives an ignored nan row a nan gradient (0 * nan)
    case = Case(x, t, None, -100, 1)
    for reduction in REDUCTIONS:
        exp_loss, exp_grad, exp_lse = expected_torch(case, reduction, label_smoothing)
        scales = error_scales(case, reduction, label_smoothing)
        loss, grad, lse = fastlsm.cross_entropy(x, t, reduction=reduction, return_grad=True,
                                                label_smoothing=label_smoothing, return_lse=True)
        check_loss(loss, exp_loss, scales, dtype, reduction, (len(t),), reduction)
        check_close(grad[kept], exp_grad[kept], scales.grad[kept], dtype, f"{reduction} grad")
        assert np.all(grad[~kept] == 0)
        check_close(lse, exp_lse, scales.lse, dtype, "lse (torch.logsumexp)")
    # the rows with a finite loss, the ignored non-finite one included: a finite mean
    rows = [5, 7, 8, 9] if label_smoothing == 0 else [7, 8, 9]
    sub = Case(x[rows], t[rows], None, -100, 1)
    exp_loss, _, _ = expected_torch(sub, "mean", label_smoothing)
    assert np.isfinite(exp_loss)
    got = fastlsm.cross_entropy(sub.x, sub.target, label_smoothing=label_smoothing)
    check_loss(got, exp_loss, error_scales(sub, "mean", label_smoothing), dtype, "mean",
               (len(rows),), "finite mean")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("rows", [3, 50])  # fewer rows than a tile's minimum, and more
def test_plain_call_matches_the_general_path(dtype, reduction, rows, rng):
    # C-ordered (N, C) logits with int64 targets and no weights go straight to the kernel, with
    # or without a grad_out (the input itself too); the same call with unit weights takes the
    # general path and must agree bit for bit.
    x = (rng.standard_normal((rows, 7)) * 3).astype(dtype)
    t = rng.integers(0, 7, rows)
    t[::5] = -100
    for return_grad in (False, True):
        plain = fastlsm.cross_entropy(x, t, reduction=reduction, return_grad=return_grad)
        general = fastlsm.cross_entropy(x, t, np.ones(7), reduction=reduction,
                                        return_grad=return_grad)
        for a, b in zip(plain if return_grad else [plain], general if return_grad else [general]):
            assert type(a) is type(b) and a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
    for out, logits in ((np.empty_like(x), x), (x.copy(),) * 2):  # apart, then in place
        loss, grad = fastlsm.cross_entropy(logits, t, reduction=reduction, grad_out=out)
        assert grad is out
        np.testing.assert_array_equal(loss, general[0])
        np.testing.assert_array_equal(grad, general[1])


def test_ignore_index_that_is_a_class_keeps_it_in_other_rows_softmax(rng):
    x = rng.standard_normal((6, 4))
    t = np.array([0, 1, 2, 0, 3, 1])
    # rows with target 0 are removed; class 0 still counts in every other row's softmax
    loss = fastlsm.cross_entropy(x, t, ignore_index=0, reduction="none")
    lse = np.log(np.exp(x).sum(axis=1))
    expected = np.where(t == 0, 0.0, lse - x[np.arange(6), t])
    np.testing.assert_allclose(loss, expected, rtol=1e-13, atol=0)
    mean = fastlsm.cross_entropy(x, t, ignore_index=0)
    np.testing.assert_allclose(mean, expected.sum() / 4, rtol=1e-13)
    # a negative ignore_index other than -100
    t2 = np.where(t == 0, -3, t)
    np.testing.assert_allclose(fastlsm.cross_entropy(x, t2, ignore_index=-3), mean, rtol=1e-13)


def test_axis_minus_one_is_the_flattened_problem(rng):
    x = (rng.standard_normal((3, 5, 11)) * 3).astype(np.float32)
    t = rng.integers(0, 11, (3, 5))
    t[0, 2] = -100
    w = rng.uniform(0.5, 2, 11)
    for reduction in REDUCTIONS:
        a, ga, la = fastlsm.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1,
                                          axis=-1, return_grad=True, return_lse=True)
        b, gb, lb = fastlsm.cross_entropy(x.reshape(-1, 11), t.reshape(-1), w,
                                          reduction=reduction, label_smoothing=0.1,
                                          return_grad=True, return_lse=True)
        np.testing.assert_allclose(np.reshape(a, -1), np.reshape(b, -1), rtol=4 * EPS32)
        np.testing.assert_allclose(ga.reshape(-1, 11), gb, rtol=4 * EPS32, atol=1e-9)
        np.testing.assert_allclose(la.reshape(-1), lb, rtol=4 * EPS32)
        c = fastlsm.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1, axis=2)
        np.testing.assert_array_equal(a, c)
    # a 1-D input: every spelling of its class axis is the same
    v = x[0, 0]
    for axis in (1, 0, -1):
        np.testing.assert_array_equal(fastlsm.cross_entropy(v, np.array(3), axis=axis),
                                      fastlsm.cross_entropy(v, np.array(3)))
    lone = fastlsm.cross_entropy(v, np.int64(3), reduction="none")
    assert np.shape(lone) == () and np.asarray(lone).dtype == F32


def test_float32_mean_over_two_million_rows(rng):
    n = 2_000_000
    x = (rng.standard_normal((n, 2)) * 3).astype(np.float32)
    t = rng.integers(0, 2, n)
    t[::97] = -100
    for reduction in ("mean", "sum"):
        exp_loss, exp_grad, exp_lse = ref.cross_entropy(x, t, reduction=reduction)
        loss, grad, lse = fastlsm.cross_entropy(x, t, reduction=reduction, return_grad=True,
                                                return_lse=True)
        assert type(loss) is np.float32
        assert abs(float(loss) - exp_loss) <= 1e-6 * abs(exp_loss), (reduction, loss, exp_loss)
        case = Case(x, t, None, -100, 1)
        scales = error_scales(case, reduction)
        check_grad(grad, exp_grad, scales, x, F32, f"{reduction} grad")
        check_lse(lse, exp_lse, scales, (n,), F32, "lse")
    exp_loss = ref.nll_loss(x, t)[0]
    assert abs(float(fastlsm.nll_loss(x, t)) - exp_loss) <= 1e-6 * abs(exp_loss)


# --- (e) memory -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_logits():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4096, 32000), dtype=np.float32)
    t = rng.integers(0, 32000, 4096)
    t[::10] = -100
    return x, t


def _peak(call):
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, result


@pytest.mark.parametrize("mode", ["loss only", "return_grad", "grad_out", "grad_out is input",
                                  "nll loss only", "nll grad_out"])
def test_memory(mode, big_logits):
    x, t = big_logits
    nbytes = x.nbytes
    small_x, small_t = np.ascontiguousarray(x[:64]), t[:64]
    if mode.startswith("nll"):
        f = fastlsm.nll_loss
        kw = {}
    else:
        f = fastlsm.cross_entropy
        kw = dict(label_smoothing=0.1, z_loss=1e-4, return_lse=True)
    # warm-up on the same dtype and layout, so compilation's allocations do not count
    f(small_x, small_t, return_grad=True, **kw)
    f(small_x, small_t, **kw)
    f(small_x.copy(), small_t, return_grad=True, grad_out=np.empty_like(small_x), **kw)
    if mode in ("loss only", "nll loss only"):
        peak, _ = _peak(lambda: f(x, t, **kw))
        limit = 0.01 * nbytes
    elif mode == "return_grad":
        peak, res = _peak(lambda: f(x, t, return_grad=True, **kw))
        assert res[1].shape == x.shape
        del res
        limit = 1.1 * nbytes
    elif mode == "grad_out is input":
        xc = x.copy()
        peak, res = _peak(lambda: f(xc, t, return_grad=True, grad_out=xc, **kw))
        assert res[1] is xc
        del res, xc
        limit = 0.01 * nbytes
    else:
        g = np.empty_like(x)
        peak, res = _peak(lambda: f(x, t, return_grad=True, grad_out=g, **kw))
        assert res[1] is g
        limit = 0.01 * nbytes
    assert peak < limit, (f"{mode}: peak traced allocation {peak / 2**20:.1f} MiB, limit "
                          f"{limit / 2**20:.1f} MiB (input {nbytes / 2**20:.0f} MiB)")
