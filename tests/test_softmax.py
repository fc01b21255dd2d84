"""Correctness of fastlsm's five functions against the float64 reference and scipy.special.

Tolerances (``|result - reference|`` with the reference computed in float64 from the very same
input values):

* log-domain values (log_softmax, logsumexp): ``tol * max(1, |ref|)`` with tol = 1e-12 for
  float64 (rows here are at most a few thousand long, summed in a different order from NumPy),
  4 ulps (4 * 2**-23) for float32, 1e-3 for float16 (one float16 ulp is 2**-10).
* probabilities (softmax): relative ``tol * (1 + |log_softmax ref|)`` -- the relative error of
  ``exp(x - max)`` is the absolute error of its argument -- plus the smallest normal number of the
  dtype for underflowed entries.
* backward passes: ``tol`` times the magnitude of the terms that are added (``|g| + |exp(y) * sum g|``
  or ``y * (|g| + sum |g * y|)``).
* Non-finite entries must match exactly: same nan positions, same signed infinities.

A missing max shift overflows (the 1e4 / +-80 / +-100 rows), a wrong -inf merge gives nan (the
"first 3000 are -inf, then about -800" rows), so both fail these bounds by far.
"""

from __future__ import annotations

import concurrent.futures
import functools

import numpy as np
import pytest

import fastlsm
from fastlsm.backends.cpu.kernels.softmax import SHIFTED_STORE_MIN_CLASSES
from fastlsm.backends.cpu.kernels.stats import TILE_ROWS
from fastlsm.backends.cpu.runtime import SHORT_ROW_CLASSES
from checks import assert_nonfinite_match
import reference as ref

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
INF, NAN = np.inf, np.nan

# Tolerances, see the module docstring.
LOG_TOL = {F64: 1e-12, F32: 4 * np.finfo(np.float32).eps, F16: 1e-3}
PROB_TOL = {F64: 1e-12, F32: 4 * np.finfo(np.float32).eps, F16: 1e-3}
PROB_ATOL = {F64: np.finfo(np.float64).tiny, F32: np.finfo(np.float32).tiny, F16: 1e-7}
BACK_TOL = {F64: 1e-12, F32: 4 * np.finfo(np.float32).eps, F16: 2e-3}


# --- comparison helpers ----------------------------------------------------------------------

def _report(err, bound, finite, what):
    over = err > bound
    if over.any():
        worst = np.argmax(err / np.where(bound > 0, bound, np.finfo(float).tiny))
        pytest.fail(f"{what}: {over.sum()} values out of tolerance; worst at "
                    f"{np.argwhere(finite)[worst].tolist()}: error {err[worst]:.3e} > bound "
                    f"{bound[worst]:.3e}")


def check_log(res, expected, dtype, what="log values"):
    """``res`` (log_softmax or logsumexp output) against the float64 ``expected``."""
    dtype = np.dtype(dtype)
    res = np.asarray(res, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    finite = assert_nonfinite_match(res, expected, what)
    err = np.abs(res[finite] - expected[finite])
    bound = LOG_TOL[dtype] * np.maximum(1.0, np.abs(expected[finite]))
    _report(err, bound, finite, what)


def check_prob(res, expected, expected_log, dtype, what="softmax"):
    """``res`` (softmax output) against ``expected``; ``expected_log`` is the log_softmax reference."""
    dtype = np.dtype(dtype)
    res = np.asarray(res, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    finite = assert_nonfinite_match(res, expected, what)
    err = np.abs(res[finite] - expected[finite])
    with np.errstate(invalid="ignore"):
        lg = np.abs(np.asarray(expected_log, dtype=np.float64)[finite])
    lg = np.where(np.isfinite(lg), lg, 0.0)
    bound = PROB_TOL[dtype] * (1.0 + lg) * expected[finite] + PROB_ATOL[dtype]
    _report(err, bound, finite, what)


def check_backward(res, expected, scale, dtype, what="backward"):
    dtype = np.dtype(dtype)
    res = np.asarray(res, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), expected.shape)
    finite = assert_nonfinite_match(res, expected, what)
    err = np.abs(res[finite] - expected[finite])
    bound = BACK_TOL[dtype] * np.maximum(scale[finite], 1e-300)
    _report(err, bound, finite, what)


def lsm_backward_scale(g, y, axis):
    g, y = np.asarray(g, np.float64), np.asarray(y, np.float64)
    ax = _axis_tuple(axis, g.ndim)
    return np.abs(g) + np.exp(y) * np.sum(np.abs(g), axis=ax, keepdims=True) + 1e-30


def sm_backward_scale(g, y, axis):
    g, y = np.asarray(g, np.float64), np.asarray(y, np.float64)
    ax = _axis_tuple(axis, g.ndim)
    return np.abs(y) * (np.abs(g) + np.sum(np.abs(g * y), axis=ax, keepdims=True)) + 1e-30


def _axis_tuple(axis, ndim):
    if ndim == 0:
        return None
    return axis


def check_all_forward(x, axis, dtype, expect_dtype=None):
    """Run log_softmax, softmax and logsumexp (both keepdims) on ``x`` and check every result."""
    expect_dtype = np.dtype(expect_dtype or dtype)
    before = np.array(x, copy=True)
    lsm_ref = ref.log_softmax(x, axis)
    out = fastlsm.log_softmax(x, axis)
    assert out.dtype == expect_dtype
    assert np.shape(out) == np.shape(x)
    check_log(out, lsm_ref, dtype, "log_softmax")
    out = fastlsm.softmax(x, axis)
    assert out.dtype == expect_dtype
    check_prob(out, ref.softmax(x, axis), lsm_ref, dtype)
    for keepdims in (False, True):
        out = fastlsm.logsumexp(x, axis, keepdims=keepdims)
        expected = ref.logsumexp(x, axis, keepdims=keepdims)
        assert np.shape(out) == expected.shape, (keepdims, np.shape(out), expected.shape)
        assert out.dtype == expect_dtype
        check_log(out, expected, dtype, f"logsumexp(keepdims={keepdims})")
    np.testing.assert_array_equal(np.asarray(x), before, err_msg="the input was modified")


# --- the worked example ----------------------------------------------------------------------

def test_two_row_example():
    x = [[2.0, 1.0, 0.1], [0.5, 2.0, 1.5]]
    out = fastlsm.log_softmax(x)
    expected = np.array([[-0.4170, -1.4170, -2.3170], [-2.1041, -0.6041, -1.1041]])
    np.testing.assert_allclose(out, expected, atol=5e-5, rtol=0)
    assert abs(out[1, 0] - (-2.0076)) > 0.05  # the source article's value for row 2 is wrong
    check_log(out, ref.log_softmax(x), F64)
    np.testing.assert_allclose(np.exp(out).sum(axis=1), 1.0, rtol=1e-15, atol=2e-16)


def test_against_scipy_basic(rng):
    special = pytest.importorskip("scipy.special")
    x = rng.standard_normal((7, 13)) * 5
    for axis in (-1, 0, None, (0, 1)):
        check_log(fastlsm.log_softmax(x, axis), special.log_softmax(x, axis=axis), F64)
        check_prob(fastlsm.softmax(x, axis), special.softmax(x, axis=axis),
                   special.log_softmax(x, axis=axis), F64)
        check_log(fastlsm.logsumexp(x, axis), special.logsumexp(x, axis=axis), F64)
        check_log(fastlsm.logsumexp(x, axis, keepdims=True),
                  special.logsumexp(x, axis=axis, keepdims=True), F64)


# --- dtypes ------------------------------------------------------------------------------------

def _sample(dtype, shape, rng):
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind == "u":
        return rng.integers(0, 200, shape).astype(dtype)
    if dtype.kind == "i":
        return rng.integers(-100, 100, shape).astype(dtype)
    return (rng.standard_normal(shape) * 4).astype(dtype)


@pytest.mark.parametrize("dtype", [F16, F32, F64])
@pytest.mark.parametrize("axis", [-1, 0, None])
def test_float_dtypes(dtype, axis, rng):
    x = _sample(dtype, (9, 37), rng)
    check_all_forward(x, axis, dtype)


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64, np.uint8, np.bool_])
@pytest.mark.parametrize("axis", [-1, 0, None])
def test_integer_and_bool_become_float64(dtype, axis, rng):
    x = _sample(dtype, (9, 37), rng)
    check_all_forward(x, axis, F64, expect_dtype=F64)
    # the same numbers as float64 give the same answers
    np.testing.assert_array_equal(fastlsm.log_softmax(x, axis),
                                  fastlsm.log_softmax(x.astype(np.float64), axis))


def test_int8_extremes_are_not_wrapped():
    x = np.array([[-128, 127, 0], [127, 127, 127]], dtype=np.int8)
    check_all_forward(x, -1, F64, expect_dtype=F64)


@pytest.mark.parametrize("axis", [-1, 0, None])
def test_float16_is_computed_in_float32(axis, rng):
    x = _sample(F16, (11, 40), rng)
    x32 = x.astype(np.float32)
    for name in ("log_softmax", "softmax"):
        got = getattr(fastlsm, name)(x, axis)
        assert got.dtype == F16
        np.testing.assert_array_equal(got, getattr(fastlsm, name)(x32, axis).astype(np.float16))
    got = fastlsm.logsumexp(x, axis)
    assert got.dtype == F16
    np.testing.assert_array_equal(got, np.asarray(fastlsm.logsumexp(x32, axis)).astype(np.float16))


def test_float16_large_values_do_not_overflow():
    # exp(11.1) already overflows float16, so a computation in float16 could not give these.
    x = np.array([[1e4, 1e4 - 8, 1e4 - 16], [-1e4, -1e4 + 8, -1e4], [60000, 0, -5000]],
                 dtype=np.float16)
    check_all_forward(x, -1, F16)


def test_python_lists_and_scalars():
    lst = [[1, 2, 3], [4, 5, 7]]
    check_all_forward(lst, -1, F64, expect_dtype=F64)
    check_all_forward([[0.5, -1.5], [3.25, 2.0]], 0, F64, expect_dtype=F64)
    check_all_forward([True, False, True], -1, F64, expect_dtype=F64)
    for value in (3, 3.0, True, -7):
        assert fastlsm.log_softmax(value) == 0.0
        assert fastlsm.softmax(value) == 1.0
        assert fastlsm.logsumexp(value) == float(value)
        for f in (fastlsm.log_softmax, fastlsm.softmax, fastlsm.logsumexp):
            r = f(value)
            assert isinstance(r, np.float64), (f.__name__, type(r))


@pytest.mark.parametrize("axis", [-1, 0, None])
@pytest.mark.parametrize("dtype", [F16, F32, F64])
def test_zero_d_input(axis, dtype):
    x = np.array(3.0, dtype=dtype)
    lsm, sm, lse = (fastlsm.log_softmax(x, axis), fastlsm.softmax(x, axis),
                    fastlsm.logsumexp(x, axis))
    for r in (lsm, sm, lse):
        assert isinstance(r, np.generic) and not isinstance(r, np.ndarray), type(r)
        assert r.dtype == dtype
    assert lsm == 0.0 and sm == 1.0 and lse == 3.0
    # a NumPy scalar input behaves the same
    assert fastlsm.log_softmax(dtype.type(3.0), axis) == 0.0
    assert isinstance(fastlsm.softmax(dtype.type(-2.5), axis), dtype.type)
    assert fastlsm.logsumexp(dtype.type(-2.5), axis) == -2.5


@pytest.mark.parametrize("value", [-np.inf, np.inf, np.nan])
def test_zero_d_nonfinite(value):
    special = pytest.importorskip("scipy.special")
    x = np.float64(value)
    with np.errstate(all="ignore"):
        wants = [g(x) for g in (special.log_softmax, special.softmax, special.logsumexp)]
    for f, want in zip((fastlsm.log_softmax, fastlsm.softmax, fastlsm.logsumexp), wants):
        np.testing.assert_array_equal(f(x), want, err_msg=f.__name__)


@pytest.mark.parametrize("dtypes, expected", [
    ((F32, F32), F32), ((F64, F64), F64), ((F16, F16), F16), ((F32, F64), F64),
    ((F16, F32), F32), ((np.int64, np.int64), F64), ((np.int32, F32), F64),
    ((np.bool_, F64), F64), ((np.uint8, F16), F64), ((F64, np.int8), F64),
])
def test_backward_dtypes(dtypes, expected, rng):
    x = rng.standard_normal((6, 9)) * 2
    g = _sample(dtypes[0], x.shape, rng)
    y_lsm = np.asarray(ref.log_softmax(x)).astype(dtypes[1]) if np.dtype(dtypes[1]).kind == "f" \
        else _sample(dtypes[1], x.shape, rng)
    y_sm = np.asarray(ref.softmax(x)).astype(dtypes[1]) if np.dtype(dtypes[1]).kind == "f" \
        else _sample(dtypes[1], x.shape, rng)
    g0, yl0, ys0 = g.copy(), y_lsm.copy(), y_sm.copy()
    r = fastlsm.log_softmax_backward(g, y_lsm)
    assert r.dtype == expected
    check_backward(r, ref.log_softmax_backward(g, y_lsm), lsm_backward_scale(g, y_lsm, -1),
                   expected)
    r = fastlsm.softmax_backward(g, y_sm)
    assert r.dtype == expected
    check_backward(r, ref.softmax_backward(g, y_sm), sm_backward_scale(g, y_sm, -1), expected)
    np.testing.assert_array_equal(g, g0)
    np.testing.assert_array_equal(y_lsm, yl0)
    np.testing.assert_array_equal(y_sm, ys0)


def test_backward_lists_and_zero_d():
    r = fastlsm.log_softmax_backward([[1, 0], [0, 2]], [[-0.5, -1.0], [-2.0, -0.1]])
    assert r.dtype == F64
    check_backward(r, ref.log_softmax_backward([[1, 0], [0, 2]], [[-0.5, -1.0], [-2.0, -0.1]]),
                   np.ones((2, 2)), F64)
    for f in (fastlsm.log_softmax_backward, fastlsm.softmax_backward):
        r = f(2.0, 0.0 if f is fastlsm.log_softmax_backward else 1.0)
        assert isinstance(r, np.float64) and r == 0.0  # a one-element softmax has zero gradient
    r = fastlsm.softmax_backward(np.float32(1.5), np.float32(0.25))
    assert isinstance(r, np.float32)
    assert r == np.float32(0.25 * (1.5 - 1.5 * 0.25))


# --- shapes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0), (1, 1), (1, 10), (32, 10), (10,),
                                   (0,), (1,), (2, 0, 3)])
@pytest.mark.parametrize("axis", [-1, 0, None])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_shapes(shape, axis, dtype, rng):
    x = _sample(dtype, shape, rng)
    check_all_forward(x, axis, dtype)
    if axis is None or len(shape) == 1:
        r = fastlsm.logsumexp(x, axis)
        assert isinstance(r, np.generic) and not isinstance(r, np.ndarray)
        assert r.dtype == dtype


@pytest.mark.parametrize("shape, axis", [((0, 5), 0), ((5, 0), -1), ((0, 0), 0), ((0,), 0),
                                         ((0,), None), ((0, 5), -1), ((5, 0), 0)])
def test_empty_axis_matches_scipy(shape, axis):
    special = pytest.importorskip("scipy.special")
    x = np.empty(shape)
    for keepdims in (False, True):
        got = fastlsm.logsumexp(x, axis, keepdims=keepdims)
        want = special.logsumexp(x, axis=axis, keepdims=keepdims)
        assert np.shape(got) == np.shape(want)
        np.testing.assert_array_equal(got, want)
        assert np.all(np.asarray(got) == -np.inf)


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0), (2, 0, 3)])
def test_empty_full_reduction_is_minus_inf_scalar(shape):
    r = fastlsm.logsumexp(np.empty(shape), axis=None)
    assert isinstance(r, np.float64) and r == -np.inf
    r = fastlsm.logsumexp(np.empty(shape), axis=tuple(range(len(shape))), keepdims=True)
    assert r.shape == (1,) * len(shape) and r.dtype == F64 and np.all(r == -np.inf)
    # a reduction over the empty axis only
    r = fastlsm.logsumexp(np.empty(shape, np.float32), axis=shape.index(0))
    assert r.dtype == F32 and np.all(r == -np.inf)


def test_empty_axis_tuple_matches_scipy(rng):
    # axis=() is a tuple of ints naming no axis: every element is its own row, as in SciPy
    # (log_softmax 0, softmax 1, logsumexp the input itself).
    special = pytest.importorskip("scipy.special")
    x = rng.standard_normal((2, 3))
    np.testing.assert_array_equal(fastlsm.log_softmax(x, ()), special.log_softmax(x, axis=()))
    np.testing.assert_array_equal(fastlsm.softmax(x, ()), special.softmax(x, axis=()))
    np.testing.assert_array_equal(fastlsm.logsumexp(x, ()), special.logsumexp(x, axis=()))


@pytest.mark.parametrize("keepdims", [False, True])
def test_full_reduction_returns_numpy_scalar(keepdims, rng):
    x = rng.standard_normal((4, 5))
    for axis in (None, (0, 1), (1, 0), (-1, -2)):
        r = fastlsm.logsumexp(x, axis, keepdims=keepdims)
        if keepdims:
            assert isinstance(r, np.ndarray) and r.shape == (1, 1)
        else:
            assert isinstance(r, np.float64) and not isinstance(r, np.ndarray)
        check_log(r, ref.logsumexp(x, None, keepdims=keepdims), F64)
    r = fastlsm.logsumexp(x[0].astype(np.float32), 0)
    assert isinstance(r, np.float32)


# --- memory layouts ----------------------------------------------------------------------------

@functools.cache
def _layout_cases(dtype):
    """name -> (array, axis): the same numbers in many memory layouts (arrays built in ``dtype``)."""
    rng = np.random.default_rng(99)
    base = (rng.standard_normal((12, 45)) * 4).astype(dtype)
    big = (rng.standard_normal((24, 91)) * 4).astype(dtype)
    x3 = (rng.standard_normal((4, 5, 6)) * 3).astype(dtype)
    x4 = (rng.standard_normal((3, 4, 5, 6)) * 3).astype(dtype)
    large = (rng.standard_normal((520, 130)) * 4).astype(dtype)  # parallel kernel size
    return {
        "C": (base, -1),
        "C-axis0": (base, 0),
        "F": (np.asfortranarray(base), -1),
        "F-axis0": (np.asfortranarray(base), 0),
        "F-None": (np.asfortranarray(base), None),
        "column-slice": (big[:, ::3], -1),
        "column-slice-axis0": (big[:, ::3], 0),
        "transposed": (base.T, -1),
        "negative-strides": (big[::-1, ::-2], -1),
        "negative-strides-axis0": (big[::-1, ::-2], 0),
        "negative-strides-None": (big[::-1, ::-2], None),
        "1d-negative-stride": (big[3, ::-2], -1),
        "3d-last": (x3, -1),
        "3d-axis1": (x3, 1),
        "3d-(0,2)": (x3, (0, 2)),
        "3d-(1,2)": (x3, (1, 2)),
        "3d-(-1,-3)": (x3, (-1, -3)),
        "3d-None": (x3, None),
        "3d-transposed-(0,1)": (x3.transpose(2, 0, 1), (0, 1)),
        "4d-(1,3)": (x4, (1, 3)),
        "4d-(0,2,3)": (x4, (0, 2, 3)),
        "4d-F-(0,1)": (np.asfortranarray(x4), (0, 1)),
        "4d-negative-strides-(2,)": (x4[::-1, :, ::-2], (2,)),
        "4d-all-axes": (x4, (3, 1, 0, 2)),
        "parallel-C": (large, -1),
        "parallel-C-axis0": (large, 0),
        "parallel-F": (np.asfortranarray(large), -1),
        "parallel-negative-strides": (large[::-1, ::-1], -1),
    }


LAYOUTS = list(_layout_cases(F64))


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("case", LAYOUTS)
def test_layouts_forward(case, dtype):
    x, axis = _layout_cases(dtype)[case]
    check_all_forward(x, axis, dtype)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("case", LAYOUTS)
def test_layouts_backward(case, dtype, rng):
    x, axis = _layout_cases(dtype)[case]
    g = (rng.standard_normal(x.shape) * 3).astype(dtype)
    # give g and y the layout of x where there is one (F or transposed), else C
    if x.ndim >= 2 and not x.flags.c_contiguous:
        g = np.asfortranarray(g)
    g0 = g.copy()
    y = fastlsm.log_softmax(x, axis)
    y0 = y.copy()
    r = fastlsm.log_softmax_backward(g, y, axis)
    assert r.dtype == dtype and r.shape == x.shape
    check_backward(r, ref.log_softmax_backward(g, y, axis), lsm_backward_scale(g, y, axis),
                   dtype, "log_softmax_backward")
    y = fastlsm.softmax(x, axis)
    r = fastlsm.softmax_backward(g, y, axis)
    assert r.dtype == dtype and r.shape == x.shape
    check_backward(r, ref.softmax_backward(g, y, axis), sm_backward_scale(g, y, axis),
                   dtype, "softmax_backward")
    np.testing.assert_array_equal(g, g0)
    np.testing.assert_array_equal(fastlsm.log_softmax(x, axis), y0)


def test_read_only_unaligned_and_broadcast_inputs(rng):
    x = rng.standard_normal((7, 30))
    ro = x.copy()
    ro.flags.writeable = False
    check_all_forward(ro, -1, F64)
    buf = np.zeros(x.size * 8 + 1, np.uint8)
    unaligned = buf[1:].view(np.float64).reshape(x.shape)
    unaligned[...] = x
    assert not unaligned.flags.aligned
    check_all_forward(unaligned, -1, F64)
    check_all_forward(unaligned, 0, F64)
    # zero strides (read-only), large enough for the parallel kernel
    b = np.broadcast_to(x[0].astype(np.float32), (2000, 30))
    check_all_forward(b, -1, F32)
    check_all_forward(b, 0, F32)
    g = np.broadcast_to(x[1], x.shape)
    y = fastlsm.log_softmax(x)
    check_backward(fastlsm.log_softmax_backward(g, y), ref.log_softmax_backward(g, y),
                   lsm_backward_scale(g, y, -1), F64)


@pytest.mark.parametrize("name", ["log_softmax", "softmax", "logsumexp"])
@pytest.mark.parametrize("dtype", [">f8", ">f4", "<f8"])
def test_non_native_byte_order(name, dtype, rng):
    # A byte-swapped float64 array is float64 data: it must be computed (not reach Numba as an
    # unsupported array type) and give the same numbers as the native array.
    f = getattr(fastlsm, name)
    native = rng.standard_normal((5, 9)).astype(np.dtype(dtype).newbyteorder("="))
    swapped = native.astype(dtype)
    r = f(swapped)
    assert r.dtype.kind == "f" and r.dtype.itemsize == native.dtype.itemsize
    np.testing.assert_array_equal(np.asarray(r, dtype=native.dtype), f(native))


def test_backward_strided_inputs(rng):
    big_g = rng.standard_normal((20, 60))
    x = rng.standard_normal((20, 60))
    y = fastlsm.log_softmax(x)[::-1, ::-3]
    g = big_g[::-1, ::-3]
    check_backward(fastlsm.log_softmax_backward(g, y), ref.log_softmax_backward(g, y),
                   lsm_backward_scale(g, y, -1), F64)
    y = fastlsm.softmax(x, 0)[:, ::2]
    g = big_g[:, 1::2]
    check_backward(fastlsm.softmax_backward(g, y, 0), ref.softmax_backward(g, y, 0),
                   sm_backward_scale(g, y, 0), F64)
    # mixed layouts and dtypes
    y = np.asfortranarray(fastlsm.softmax(x.astype(np.float32)))
    check_backward(fastlsm.softmax_backward(big_g, y), ref.softmax_backward(big_g, y),
                   sm_backward_scale(big_g, y, -1), F64)


# --- out= --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["log_softmax", "softmax"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_out_fresh_arrays(name, dtype, rng):
    f = getattr(fastlsm, name)
    x = _sample(dtype, (30, 17), rng)
    x0 = x.copy()
    expected = f(x)
    for out in (np.empty_like(x), np.empty(x.shape, dtype, order="F")):
        r = f(x, out=out)
        assert r is out
        np.testing.assert_array_equal(out, expected)
    # out as a strided view of a larger buffer: only the view is written
    buf = np.full((30, 34), 7.0, dtype)
    out = buf[:, ::2]
    assert f(x, out=out) is out
    np.testing.assert_array_equal(out, expected)
    assert np.all(buf[:, 1::2] == 7.0)
    for axis in (0, None):
        out = np.empty_like(x)
        assert f(x, axis, out=out) is out
        np.testing.assert_array_equal(out, f(x, axis))
    np.testing.assert_array_equal(x, x0)


@pytest.mark.parametrize("name", ["log_softmax", "softmax"])
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("shape, axis", [((30, 17), -1), ((30, 17), 0), ((4, 5, 6), (0, 2)),
                                         ((300, 200), -1), ((300, 200), 0), ((5000,), -1)])
def test_out_is_input(name, dtype, shape, axis, rng):
    f = getattr(fastlsm, name)
    x = _sample(dtype, shape, rng)
    expected = f(x, axis)  # the input is not modified (tested elsewhere)
    r = f(x, axis, out=x)
    assert r is x
    np.testing.assert_array_equal(x, expected)


@pytest.mark.parametrize("name", ["log_softmax", "softmax"])
def test_out_is_input_float16_and_views(name, rng):
    f = getattr(fastlsm, name)
    x = _sample(F16, (20, 33), rng)
    expected = f(x.copy())
    assert f(x, out=x) is x
    np.testing.assert_array_equal(x, expected)
    # Expected values come from the same input layout: the kernels may round differently for
    # strided and contiguous rows (SIMD lanes), so a contiguous copy could differ in the last bit.
    base = _sample(F64, (20, 66), rng)
    view = base[::-1, ::2]
    expected = f(view)
    assert f(view, out=view) is view
    np.testing.assert_array_equal(view, expected)
    fx = np.asfortranarray(_sample(F32, (40, 21), rng))
    expected = f(fx)
    assert f(fx, out=fx) is fx
    np.testing.assert_array_equal(fx, expected)


def _overlap_cases(rng):
    x = _sample(F64, (16, 23), rng)
    yield "rows reversed", x, lambda a: a[::-1], -1
    yield "columns reversed", x, lambda a: a[:, ::-1], -1
    yield "columns reversed, axis 0", x, lambda a: a[:, ::-1], 0
    yield "transposed square", _sample(F64, (20, 20), rng), lambda a: a.T, -1
    yield "both reversed, large", _sample(F64, (300, 200), rng), lambda a: a[::-1, ::-1], -1
    x1 = _sample(F64, (101,), rng)
    yield "1d reversed", x1, lambda a: a[::-1], -1


@pytest.mark.parametrize("name", ["log_softmax", "softmax"])
def test_out_overlapping_input(name, rng):
    f = getattr(fastlsm, name)
    for label, x, make_out, axis in _overlap_cases(rng):
        expected = f(x.copy(), axis)
        out = make_out(x)
        assert np.shares_memory(out, x)
        r = f(x, axis, out=out)
        assert r is out, label
        np.testing.assert_array_equal(out, expected, err_msg=label)
    # partial overlap, shifted by one element
    buf = _sample(F64, (1001,), rng)
    x, out = buf[:-1], buf[1:]
    expected = f(x.copy())
    assert f(x, out=out) is out
    np.testing.assert_array_equal(out, expected)
    buf = _sample(F32, (41, 50), rng)
    x, out = buf[:-1], buf[1:]
    expected = f(x.copy())
    f(x, out=out)
    np.testing.assert_array_equal(out, expected)


def test_out_dtype_conversions(rng):
    x = _sample(np.int32, (5, 8), rng)
    out = np.empty((5, 8))
    assert fastlsm.log_softmax(x, out=out) is out
    np.testing.assert_array_equal(out, fastlsm.log_softmax(x))
    x16 = _sample(F16, (5, 8), rng)
    out = np.empty((5, 8), F16)
    assert fastlsm.softmax(x16, out=out) is out
    np.testing.assert_array_equal(out, fastlsm.softmax(x16))


def test_out_zero_d_elementwise_returns_out():
    # Decision: "the function returns out when given" (logsumexp's full reduction does so too).
    for f, expected in ((fastlsm.log_softmax, 0.0), (fastlsm.softmax, 1.0)):
        out = np.empty(())
        r = f(np.float64(2.0), out=out)
        assert r is out, f"{f.__name__} returned {type(r).__name__}, not out"
        assert out[()] == expected


@pytest.mark.parametrize("dtype", [F16, F32, F64])
def test_logsumexp_out(dtype, rng):
    x = _sample(dtype, (6, 7, 8), rng)
    x0 = x.copy()
    for axis, keepdims in ((-1, False), (-1, True), ((0, 2), False), ((0, 2), True), (1, False)):
        expected = fastlsm.logsumexp(x, axis, keepdims=keepdims)
        out = np.full(expected.shape, 5.0, dtype)
        r = fastlsm.logsumexp(x, axis, keepdims=keepdims, out=out)
        assert r is out
        np.testing.assert_array_equal(out, expected)
    # full reduction with out: out (a 0-d array) is returned, not a scalar
    out = np.empty((), dtype)
    r = fastlsm.logsumexp(x, None, out=out)
    assert r is out
    assert out[()] == fastlsm.logsumexp(x, None)
    out = np.empty((1, 1, 1), dtype)
    assert fastlsm.logsumexp(x, None, keepdims=True, out=out) is out
    # an F-ordered / strided out
    buf = np.zeros((6, 16), dtype)
    out = buf[:, ::2]
    assert fastlsm.logsumexp(x, 1, out=out) is out
    np.testing.assert_array_equal(out, fastlsm.logsumexp(x, 1))
    assert np.all(buf[:, 1::2] == 0)
    np.testing.assert_array_equal(x, x0)


# --- non-finite values -------------------------------------------------------------------------

_L = np.log1p(np.e)  # logsumexp([-inf, 0, 1]) = log(1 + e)

# row, log_softmax, logsumexp, softmax: the table of semantics.md plus a few more rows that
# scipy.special 1.17 answers in the same way.
NONFINITE = {
    "all -inf": ([-INF, -INF, -INF], [NAN, NAN, NAN], -INF, [NAN, NAN, NAN]),
    "+inf": ([INF, 1, 2], [NAN, -INF, -INF], INF, [NAN, NAN, NAN]),
    "two +inf": ([INF, INF, 1], [NAN, NAN, -INF], INF, [NAN, NAN, NAN]),
    "nan": ([NAN, 1, 2], [NAN, NAN, NAN], NAN, [NAN, NAN, NAN]),
    "some -inf": ([-INF, 0, 1], [-INF, -_L, 1 - _L], _L, [0.0, np.exp(-_L), np.exp(1 - _L)]),
    "+inf and -inf": ([INF, -INF, 1], [NAN, -INF, -INF], INF, [NAN, NAN, NAN]),
    "nan and +inf": ([1, NAN, INF], [NAN, NAN, NAN], NAN, [NAN, NAN, NAN]),
    "nan and -inf": ([-INF, NAN, 0], [NAN, NAN, NAN], NAN, [NAN, NAN, NAN]),
    "all nan": ([NAN, NAN], [NAN, NAN], NAN, [NAN, NAN]),
    "single -inf": ([-INF], [NAN], -INF, [NAN]),
    "single +inf": ([INF], [NAN], INF, [NAN]),
    "single nan": ([NAN], [NAN], NAN, [NAN]),
    "all +inf": ([INF, INF], [NAN, NAN], INF, [NAN, NAN]),
}


@pytest.mark.parametrize("dtype", [F16, F32, F64])
@pytest.mark.parametrize("case", list(NONFINITE))
def test_nonfinite_table(case, dtype):
    row, lsm, lse, sm = (np.array(v, dtype=np.float64) for v in NONFINITE[case])
    x = row.astype(dtype)
    check_log(fastlsm.log_softmax(x), lsm, dtype, "log_softmax")
    check_log(fastlsm.logsumexp(x), lse, dtype, "logsumexp")
    check_prob(fastlsm.softmax(x), sm, lsm, dtype)
    # also as one row among finite ones, and along axis 0
    finite = np.array([0.5, -1.0, 2.0][:len(row)] + [0.0] * max(0, len(row) - 3))
    x2 = np.stack([finite, row, finite]).astype(dtype)
    for axis, xx in ((-1, x2), (0, np.ascontiguousarray(x2.T))):
        check_log(fastlsm.log_softmax(xx, axis), ref.log_softmax(xx, axis), dtype)
        check_log(fastlsm.logsumexp(xx, axis), ref.logsumexp(xx, axis), dtype)
        check_prob(fastlsm.softmax(xx, axis), ref.softmax(xx, axis), ref.log_softmax(xx, axis),
                   dtype)
    lsm_row = fastlsm.log_softmax(x2)[1]
    check_log(lsm_row, lsm, dtype)
    # in rows long enough for log_softmax's shifted store (padded with -inf: terms of 0), apart
    # and in place
    wide = np.full((3, SHIFTED_STORE_MIN_CLASSES + 3), -np.inf, dtype)
    wide[:, :x2.shape[1]] = x2
    expected = ref.log_softmax(wide)
    check_log(fastlsm.log_softmax(wide), expected, dtype, "log_softmax, long rows")
    check_log(fastlsm.log_softmax(wide, out=wide), expected, dtype, "log_softmax, in place")


@pytest.mark.parametrize("case", list(NONFINITE))
def test_nonfinite_table_matches_scipy(case):
    special = pytest.importorskip("scipy.special")
    x = np.array(NONFINITE[case][0], dtype=np.float64)
    with np.errstate(all="ignore"):
        want = (special.log_softmax(x), special.logsumexp(x), special.softmax(x))
    got = (fastlsm.log_softmax(x), fastlsm.logsumexp(x), fastlsm.softmax(x))
    check_log(got[0], want[0], F64, "log_softmax vs scipy")
    check_log(got[1], want[1], F64, "logsumexp vs scipy")
    check_prob(got[2], want[2], want[0], F64, "softmax vs scipy")
    # and the reference agrees with the table, so it can be trusted for the larger cases
    check_log(ref.log_softmax(x), NONFINITE[case][1], F64)
    check_log(ref.logsumexp(x), NONFINITE[case][2], F64)
    check_prob(ref.softmax(x), NONFINITE[case][3], NONFINITE[case][1], F64)


def _long_rows(dtype):
    """Rows of 5000 elements (BLOCK is 2048, so three blocks are merged per row)."""
    rng = np.random.default_rng(5)
    n = 5000
    rows = {}

    def base():
        return rng.standard_normal(n) * 2

    r = base(); r[4990] = 50.0; rows["max in last block"] = r
    r = base(); r[3] = 50.0; rows["max in first block"] = r
    rows["increasing ramp"] = np.linspace(-30.0, 30.0, n)
    rows["decreasing ramp"] = np.linspace(30.0, -30.0, n)
    r = base(); r[:2048] -= 700.0; r[4096:] += 700.0; rows["-700 then +700"] = r
    r = base(); r[:2048] += 700.0; r[4096:] -= 700.0; rows["+700 then -700"] = r
    r = base(); r[3000] = INF; rows["+inf at 3000"] = r
    r = base(); r[4500] = NAN; rows["nan at 4500"] = r
    r = base(); r[3000] = -INF; rows["-inf at 3000"] = r
    r = base(); r[2] = INF; r[2100:] += 800.0; rows["+inf first, 800 later"] = r
    r = base(); r[7] = NAN; r[4000] = 60.0; rows["nan first, larger max later"] = r
    r = base() - 800.0; r[:3000] = -INF; rows["3000 -inf then about -800"] = r
    r = base() - 800.0; r[:2048] = -INF; rows["first block -inf then about -800"] = r
    r = base() - 800.0; r[:4999] = -INF; rows["only the last element finite"] = r
    r = base(); r[:3000] = -INF; rows["3000 -inf then about 0"] = r
    r = np.full(n, -INF); r[3000] = INF; rows["-inf then +inf in a later block"] = r
    rows["all -inf"] = np.full(n, -INF)
    r = np.full(n, -INF); r[4096:] = NAN; rows["-inf then nan"] = r
    r = base() * 0 + 1e4; r[::7] -= 3.0; rows["constant 1e4"] = r
    r = base() - 1e4; rows["about -1e4"] = r
    return {k: v.astype(dtype) for k, v in rows.items()}


@pytest.mark.parametrize("dtype", [F32, F64])
def test_long_rows_block_merging(dtype):
    rows = _long_rows(dtype)
    for label, row in rows.items():
        for x, axis, where in ((row, -1, "1-D"),
                               (np.stack([row] * 2), -1, "2 rows"),
                               (np.stack([row] * 3).T, 0, "axis 0"),
                               (np.tile(row, (16, 1)), -1, "16 rows (parallel)")):
            what = f"{label}, {where}"
            lsm_ref = ref.log_softmax(x, axis)
            check_log(fastlsm.log_softmax(x, axis), lsm_ref, dtype, f"log_softmax: {what}")
            check_prob(fastlsm.softmax(x, axis), ref.softmax(x, axis), lsm_ref, dtype,
                       f"softmax: {what}")
            check_log(fastlsm.logsumexp(x, axis), ref.logsumexp(x, axis), dtype,
                      f"logsumexp: {what}")


def test_long_rows_match_scipy():
    special = pytest.importorskip("scipy.special")
    rows = _long_rows(F64)
    x = np.stack(list(rows.values()))
    with np.errstate(all="ignore"):
        lsm = special.log_softmax(x, axis=-1)
        check_log(fastlsm.log_softmax(x), lsm, F64, "log_softmax vs scipy")
        check_prob(fastlsm.softmax(x), special.softmax(x, axis=-1), lsm, F64, "softmax vs scipy")
        check_log(fastlsm.logsumexp(x), special.logsumexp(x, axis=-1), F64, "logsumexp vs scipy")


def test_minus_inf_then_finite_rescale_trap():
    # Spelled out: a first block that is all -inf must contribute nothing, not nan.
    x = np.full(5000, -np.inf)
    x[3000:] = -800.0 + np.arange(2000) * 1e-3
    lse = fastlsm.logsumexp(x)
    assert np.isfinite(lse)
    expected = -800.0 + 1.999 + np.log(np.sum(np.exp(np.arange(2000) * 1e-3 - 1.999)))
    assert abs(lse - expected) < 1e-12 * 800
    lsm = fastlsm.log_softmax(x)
    assert np.all(lsm[:3000] == -np.inf) and np.all(np.isfinite(lsm[3000:]))
    sm = fastlsm.softmax(x)
    assert np.all(sm[:3000] == 0) and abs(sm.sum() - 1) < 1e-12


@pytest.mark.parametrize("dtype", [F32, F64])
def test_nonfinite_rows_in_parallel_kernel(dtype, rng):
    x = (rng.standard_normal((24, 5000)) * 3).astype(dtype)
    x[1] = -np.inf
    x[2, 3000] = np.inf
    x[3, 4500] = np.nan
    x[4, :3000] = -np.inf
    x[4, 3000:] -= 800
    x[5, 10] = np.inf
    x[5, 11] = -np.inf
    x[6, 2047:2049] = np.inf
    x[7, :] = np.nan
    for axis, xx in ((-1, x), (0, x.T)):
        lsm_ref = ref.log_softmax(xx, axis)
        check_log(fastlsm.log_softmax(xx, axis), lsm_ref, dtype)
        check_prob(fastlsm.softmax(xx, axis), ref.softmax(xx, axis), lsm_ref, dtype)
        check_log(fastlsm.logsumexp(xx, axis), ref.logsumexp(xx, axis), dtype)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("n_classes", [1, 3, 10, 17, SHORT_ROW_CLASSES, SHORT_ROW_CLASSES + 1])
def test_short_row_tiles(dtype, n_classes, rng):
    # Three full tiles and a partial one, large enough for the parallel kernels; non-finite rows
    # sit at a tile's edges, where a lane mix-up in the transposed tile would show.
    n_rows = 3 * TILE_ROWS + 37
    x = (rng.standard_normal((n_rows, n_classes)) * 3).astype(dtype)
    x[0] = -np.inf
    x[TILE_ROWS - 1, -1] = np.inf
    x[TILE_ROWS, 0] = np.nan
    x[2 * TILE_ROWS + 1, :] = np.nan
    x[-1, 0] = -np.inf
    x[-2] += 1e4
    lsm_ref = ref.log_softmax(x)
    check_log(fastlsm.log_softmax(x), lsm_ref, dtype)
    check_prob(fastlsm.softmax(x), ref.softmax(x), lsm_ref, dtype)
    check_log(fastlsm.logsumexp(x), ref.logsumexp(x), dtype)


def _column_layouts(rng, dtype, n_classes, width):
    """(name, x, axis): layouts whose class axis is strided and neighbouring rows contiguous."""
    x = (rng.standard_normal((n_classes, width)) * 3).astype(dtype)
    # Non-finite and extreme rows (columns here) at a strip's edges and inside it.
    x[:, 0] = -np.inf
    x[n_classes // 2, 1] = np.inf
    x[0, 2] = np.nan
    x[:, 3] -= 900.0
    x[: n_classes // 2, 4] = -np.inf          # -inf in the first class blocks, then finite
    x[n_classes // 2:, 4] -= 800.0
    x[:, 5] += 1e4
    x[:, width - 1] = np.nan
    batched = (rng.standard_normal((3, n_classes, width)) * 3).astype(dtype)
    batched[1, :, width // 2] = -np.inf
    return [("axis=0 of a C array", x, 0), ("last axis of a Fortran array", x.T, -1),
            ("(N, C, d) with axis=1", batched, 1),
            ("axis=0 of a column slice", np.hstack([x, x])[:, :width], 0)]


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("n_classes, width", [(1, 8), (2, 70), (33, 64), (70, 150), (300, 17)])
def test_strided_class_axis_read_in_place(dtype, n_classes, width, rng):
    # The *_columns kernels: several class blocks, strips with a tail, in place and not.
    for name, x, axis in _column_layouts(rng, dtype, n_classes, width):
        lsm_ref = ref.log_softmax(x, axis)
        check_log(fastlsm.log_softmax(x, axis), lsm_ref, dtype, f"{name}: log_softmax")
        check_prob(fastlsm.softmax(x, axis), ref.softmax(x, axis), lsm_ref, dtype,
                   f"{name}: softmax")
        check_log(fastlsm.logsumexp(x, axis), ref.logsumexp(x, axis), dtype, f"{name}: logsumexp")
        # (Against the same layout: a vector loop's peeled tail may round exp differently.)
        inplace = x.copy(order="K")
        assert fastlsm.log_softmax(inplace, axis, out=inplace) is inplace
        np.testing.assert_array_equal(inplace, fastlsm.log_softmax(x.copy(order="K"), axis),
                                      err_msg=name)


# --- large magnitudes and long rows -------------------------------------------------------------

@pytest.mark.parametrize("dtype, center", [(F64, 1e4), (F64, -1e4), (F32, 1e4), (F32, -1e4),
                                           (F32, 80.0), (F32, -80.0), (F32, 100.0),
                                           (F32, -100.0), (F64, 800.0), (F64, -800.0)])
def test_large_magnitudes(dtype, center, rng):
    x = (center + rng.standard_normal((8, 300)) * 2).astype(dtype)
    x[0] = center  # a row of equal values: log_softmax is exactly -log(n) up to rounding
    check_all_forward(x, -1, dtype)
    check_all_forward(x, 0, dtype)
    np.testing.assert_allclose(fastlsm.log_softmax(x)[0], -np.log(300), rtol=4e-7)
    np.testing.assert_allclose(fastlsm.softmax(x)[0], 1 / 300, rtol=4e-6)
    np.testing.assert_allclose(fastlsm.logsumexp(x)[0], float(x[0, 0]) + np.log(300),
                               rtol=4e-7)


def test_two_by_300000_float32(rng):
    x = (rng.standard_normal((2, 300000)) * 3).astype(np.float32)
    x[1, 123456] = 25.0
    lsm_ref = ref.log_softmax(x)
    lsm = fastlsm.log_softmax(x)
    assert lsm.dtype == F32
    check_log(lsm, lsm_ref, F32, "log_softmax")
    sm = fastlsm.softmax(x)
    assert sm.dtype == F32
    check_prob(sm, ref.softmax(x), lsm_ref, F32)
    # sums in float64 of the float32 probabilities: each is within a few ulps
    np.testing.assert_allclose(sm.astype(np.float64).sum(axis=1), 1.0, rtol=0, atol=1e-5)
    check_log(fastlsm.logsumexp(x), ref.logsumexp(x), F32, "logsumexp")
    check_log(fastlsm.logsumexp(x, axis=None), ref.logsumexp(x, axis=None), F32,
              "logsumexp(axis=None)")


# --- threads -----------------------------------------------------------------------------------

def test_thread_safety(rng):
    # 512 x 1000 is far above the dispatcher's threshold for the parallel (prange) kernel, so
    # every call below starts Numba's thread team while seven other Python threads do the same.
    x = (rng.standard_normal((512, 1000)) * 3).astype(np.float32)
    lsm0, lse0, sm0 = fastlsm.log_softmax(x), fastlsm.logsumexp(x), fastlsm.softmax(x)
    x_before = x.copy()

    def work(seed):
        local = np.random.default_rng(seed)
        bad = 0
        for _ in range(20):
            if not np.array_equal(fastlsm.log_softmax(x), lsm0):
                bad += 1
            if not np.array_equal(fastlsm.logsumexp(x), lse0):
                bad += 1
            if local.random() < 0.5 and not np.array_equal(fastlsm.softmax(x), sm0):
                bad += 1
        return bad

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(work, range(8)))
    assert results == [0] * 8
    np.testing.assert_array_equal(x, x_before)
