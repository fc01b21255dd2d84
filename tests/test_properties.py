"""Property tests (hypothesis): identities the five functions must satisfy for any finite input.

Tolerances are in units of the float64 epsilon times the size of the numbers involved (a
backward-stable computation has errors of a few eps times those), or, for finite differences,
the O(h**2) truncation plus the O(eps / h) rounding error of a central difference.
"""

from __future__ import annotations

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

import fastlsm  # noqa: E402
import reference as ref  # noqa: E402

EPS64 = np.finfo(np.float64).eps
EPS32 = np.finfo(np.float32).eps

PROPS = settings(max_examples=60, deadline=None)


def finite_arrays(dtype=np.float64, max_dims=3, max_side=6, bound=50.0):
    return hnp.arrays(
        dtype,
        hnp.array_shapes(min_dims=1, max_dims=max_dims, min_side=1, max_side=max_side),
        elements=st.floats(-bound, bound, allow_nan=False, allow_infinity=False,
                           width=np.dtype(dtype).itemsize * 8),
    )


@st.composite
def array_and_axis(draw, dtype=np.float64, max_dims=3, max_side=6, bound=50.0):
    """A finite array and an axis argument valid for it: an int (maybe negative), a tuple or None."""
    x = draw(finite_arrays(dtype, max_dims, max_side, bound))
    n = x.ndim
    kind = draw(st.sampled_from(["int", "tuple", "none"]))
    if kind == "none":
        return x, None
    if kind == "int":
        return x, draw(st.integers(-n, n - 1))
    axes = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    negate = draw(st.lists(st.booleans(), min_size=len(axes), max_size=len(axes)))
    return x, tuple(a - n if neg else a for a, neg in zip(axes, negate))


def _axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    items = axis if isinstance(axis, tuple) else (axis,)
    return tuple(sorted(a % ndim for a in items))


def _row_size(x, axis):
    return int(np.prod([x.shape[a] for a in _axes(axis, x.ndim)]))


# --- forward identities -------------------------------------------------------------------------

@PROPS
@given(array_and_axis(), st.floats(-1e3, 1e3, allow_nan=False))
def test_log_softmax_shift_invariance(xa, c):
    x, axis = xa
    a = fastlsm.log_softmax(x, axis)
    b = fastlsm.log_softmax(x + c, axis)
    scale = 1.0 + np.max(np.abs(x)) + abs(c) + np.log(_row_size(x, axis))
    np.testing.assert_allclose(b, a, rtol=0, atol=32 * EPS64 * scale)
    # softmax is shift invariant too (relative to its values)
    np.testing.assert_allclose(fastlsm.softmax(x + c, axis), fastlsm.softmax(x, axis),
                               rtol=32 * EPS64 * scale, atol=1e-300)
    # and logsumexp moves with the shift
    np.testing.assert_allclose(fastlsm.logsumexp(x + c, axis), fastlsm.logsumexp(x, axis) + c,
                               rtol=0, atol=32 * EPS64 * scale)


@PROPS
@given(array_and_axis(dtype=np.float32, bound=30.0), st.integers(-60, 60))
def test_log_softmax_shift_invariance_float32(xa, c):
    x, axis = xa
    c = np.float32(c)
    a = fastlsm.log_softmax(x, axis)
    b = fastlsm.log_softmax(x + c, axis)
    assert a.dtype == b.dtype == np.float32
    scale = 1.0 + float(np.max(np.abs(x))) + abs(float(c)) + np.log(_row_size(x, axis))
    np.testing.assert_allclose(b, a, rtol=0, atol=8 * EPS32 * scale)


@PROPS
@given(array_and_axis())
def test_logsumexp_of_log_softmax_is_zero(xa):
    x, axis = xa
    y = fastlsm.log_softmax(x, axis)
    lse = fastlsm.logsumexp(y, axis)
    scale = 1.0 + 2 * np.max(np.abs(x)) + np.log(_row_size(x, axis))
    np.testing.assert_allclose(lse, 0.0, rtol=0, atol=16 * EPS64 * scale)


@PROPS
@given(array_and_axis())
def test_softmax_sums_to_one(xa):
    x, axis = xa
    p = fastlsm.softmax(x, axis)
    assert np.all(p >= 0) and np.all(p <= 1)
    total = np.sum(p, axis=_axes(axis, x.ndim))
    np.testing.assert_allclose(total, 1.0, rtol=0, atol=(8 + _row_size(x, axis)) * EPS64)


@PROPS
@given(array_and_axis(dtype=np.float32, bound=40.0))
def test_softmax_sums_to_one_float32(xa):
    x, axis = xa
    p = fastlsm.softmax(x, axis)
    assert p.dtype == np.float32
    total = np.sum(p.astype(np.float64), axis=_axes(axis, x.ndim))
    np.testing.assert_allclose(total, 1.0, rtol=0, atol=(8 + _row_size(x, axis)) * EPS32)


@PROPS
@given(array_and_axis())
def test_exp_log_softmax_is_softmax(xa):
    x, axis = xa
    y = fastlsm.log_softmax(x, axis)
    p = fastlsm.softmax(x, axis)
    err = np.abs(np.exp(y) - p)
    bound = 32 * EPS64 * (1.0 + np.abs(y)) * p + 1e-300
    assert np.all(err <= bound), float(np.max(err / bound))


@PROPS
@given(array_and_axis())
def test_log_softmax_is_x_minus_logsumexp(xa):
    x, axis = xa
    y = fastlsm.log_softmax(x, axis)
    lse = fastlsm.logsumexp(x, axis, keepdims=True)
    scale = 1.0 + 2 * np.max(np.abs(x)) + np.log(_row_size(x, axis))
    np.testing.assert_allclose(y, x - lse, rtol=0, atol=16 * EPS64 * scale)
    # keepdims only changes the shape
    flat = fastlsm.logsumexp(x, axis)
    np.testing.assert_array_equal(np.reshape(lse, np.shape(flat)), flat)
    # max <= logsumexp <= max + log(n)
    m = np.max(x, axis=_axes(axis, x.ndim))
    assert np.all(flat >= m - 16 * EPS64 * scale)
    assert np.all(flat <= m + np.log(_row_size(x, axis)) + 16 * EPS64 * scale)


@PROPS
@given(array_and_axis(max_dims=4, max_side=5))
def test_forward_matches_reference(xa):
    x, axis = xa
    scale = 1.0 + np.max(np.abs(x))
    np.testing.assert_allclose(fastlsm.log_softmax(x, axis), ref.log_softmax(x, axis),
                               rtol=0, atol=1e-13 * scale)
    np.testing.assert_allclose(fastlsm.softmax(x, axis), ref.softmax(x, axis),
                               rtol=1e-13 * scale, atol=1e-300)
    np.testing.assert_allclose(fastlsm.logsumexp(x, axis), ref.logsumexp(x, axis),
                               rtol=0, atol=1e-13 * scale)


# --- backward passes -----------------------------------------------------------------------------

@st.composite
def backward_case(draw, max_dims=2):
    x, axis = draw(array_and_axis(max_dims=max_dims, max_side=5, bound=5.0))
    g = draw(hnp.arrays(np.float64, x.shape,
                        elements=st.floats(-3, 3, allow_nan=False, allow_infinity=False)))
    return x, g, axis


def _central_differences(f, x, g, axis, h=1e-6):
    """d/dx of L(x) = sum(g * f(x, axis)), one element at a time."""
    grad = np.empty_like(x)
    for idx in np.ndindex(x.shape):
        step = h * max(1.0, abs(x[idx]))
        xp, xm = x.copy(), x.copy()
        xp[idx] += step
        xm[idx] -= step
        grad[idx] = (np.sum(g * f(xp, axis)) - np.sum(g * f(xm, axis))) / (xp[idx] - xm[idx])
    return grad


@pytest.mark.parametrize("name", ["log_softmax", "softmax"])
@settings(max_examples=50, deadline=None)
@given(backward_case())
def test_backward_matches_finite_differences(name, case):
    x, g, axis = case
    forward = getattr(fastlsm, name)
    grad = getattr(fastlsm, name + "_backward")(g, forward(x, axis), axis)
    fd = _central_differences(forward, x, g, axis)
    # truncation ~ h**2 * |g| * n, rounding ~ eps * |L| / h
    np.testing.assert_allclose(grad, fd, rtol=0, atol=1e-7 * (1 + np.sum(np.abs(g))))


def _jacobian_vjp(x, g, axis, which):
    """``g @ J`` row by row, with J the explicit Jacobian of log_softmax or softmax of each row."""
    axes = _axes(axis, x.ndim)
    dest = tuple(range(x.ndim - len(axes), x.ndim))
    xm = np.moveaxis(x, axes, dest)
    gm = np.moveaxis(g, axes, dest)
    moved_shape = xm.shape
    c = int(np.prod([x.shape[a] for a in axes]))
    xr, gr = xm.reshape(-1, c), gm.reshape(-1, c)
    result = np.empty_like(xr)
    for i in range(xr.shape[0]):
        p = np.exp(xr[i] - xr[i].max())
        p /= p.sum()
        if which == "log_softmax":
            jac = np.eye(c) - p[None, :]          # d y_k / d x_j = delta_kj - p_j
        else:
            jac = np.diag(p) - np.outer(p, p)     # d p_k / d x_j = p_k (delta_kj - p_j)
        result[i] = gr[i] @ jac
    return np.moveaxis(result.reshape(moved_shape), dest, axes)


@pytest.mark.parametrize("name", ["log_softmax", "softmax"])
@settings(max_examples=60, deadline=None)
@given(backward_case(max_dims=3))
def test_backward_is_jacobian_vector_product(name, case):
    x, g, axis = case
    y = getattr(fastlsm, name)(x, axis)
    grad = getattr(fastlsm, name + "_backward")(g, y, axis)
    expected = _jacobian_vjp(x, g, axis, name)
    scale = 1 + np.sum(np.abs(g))
    np.testing.assert_allclose(grad, expected, rtol=0, atol=64 * EPS64 * scale)
    np.testing.assert_allclose(grad, getattr(ref, name + "_backward")(g, y, axis), rtol=0,
                               atol=16 * EPS64 * scale)


@settings(max_examples=50, deadline=None)
@given(backward_case(max_dims=2))
def test_backward_float32_matches_jacobian(case):
    x, g, axis = case
    x32, g32 = x.astype(np.float32), g.astype(np.float32)
    scale = 1 + np.sum(np.abs(g32.astype(np.float64)))
    for name in ("log_softmax", "softmax"):
        y32 = getattr(fastlsm, name)(x32, axis)
        grad = getattr(fastlsm, name + "_backward")(g32, y32, axis)
        assert grad.dtype == np.float32
        expected = _jacobian_vjp(x32.astype(np.float64), g32.astype(np.float64), axis, name)
        np.testing.assert_allclose(grad, expected, rtol=0, atol=16 * EPS32 * scale,
                                   err_msg=name)


@settings(max_examples=50, deadline=None)
@given(backward_case(max_dims=3))
def test_backward_gradient_rows_sum_to_zero(case):
    # softmax is shift invariant, so the gradient w.r.t. x sums to 0 over each row
    x, g, axis = case
    axes = _axes(axis, x.ndim)
    scale = 1 + np.sum(np.abs(g))
    for name in ("log_softmax", "softmax"):
        y = getattr(fastlsm, name)(x, axis)
        grad = getattr(fastlsm, name + "_backward")(g, y, axis)
        np.testing.assert_allclose(np.sum(grad, axis=axes), 0.0, rtol=0,
                                   atol=64 * EPS64 * scale, err_msg=name)
