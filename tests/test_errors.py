"""Argument errors: the exception type, a message naming the argument or the problem, raised
before any kernel runs, and never a Numba typing error leaking through."""

from __future__ import annotations

import re

import numpy as np
import pytest

import fastlsm
from checks import assert_not_numba, no_kernel  # noqa: F401  (no_kernel: autouse fixture)

AxisError = np.exceptions.AxisError

FORWARD = {
    "log_softmax": lambda x, **kw: fastlsm.log_softmax(x, **kw),
    "softmax": lambda x, **kw: fastlsm.softmax(x, **kw),
    "logsumexp": lambda x, **kw: fastlsm.logsumexp(x, **kw),
}
BACKWARD_AS_UNARY = {  # the bad value as grad_output, a good output of the same shape
    "log_softmax_backward": lambda x, **kw: fastlsm.log_softmax_backward(
        x, np.zeros(np.shape(x)), **kw),
    "softmax_backward": lambda x, **kw: fastlsm.softmax_backward(
        x, np.zeros(np.shape(x)), **kw),
}
ALL = {**FORWARD, **BACKWARD_AS_UNARY}


# --- dtypes ------------------------------------------------------------------------------------

BAD_DTYPE_INPUTS = {
    "complex128": np.array([1 + 2j, 3 - 1j]),
    "complex64": np.array([[1j, 2]], dtype=np.complex64),
    "object": np.array([1.0, 2.0], dtype=object),
    "str": np.array(["a", "b"]),
    "bytes": np.array([b"a", b"b"]),
    "datetime64": np.array(["2020-01-01", "2021-01-01"], dtype="datetime64[D]"),
    "timedelta64": np.array([1, 2], dtype="timedelta64[s]"),
    "structured": np.zeros(3, dtype=[("a", "f8"), ("b", "f8")]),
    "python complex": 1 + 2j,
    "list of complex": [1j, 2.0],
    "list of str": ["1", "2"],
}


@pytest.mark.parametrize("func", list(ALL))
@pytest.mark.parametrize("case", list(BAD_DTYPE_INPUTS))
def test_unsupported_dtypes(func, case):
    x = BAD_DTYPE_INPUTS[case]
    name = "grad_output" if func in BACKWARD_AS_UNARY else "x"
    with pytest.raises(TypeError, match=rf"^{name} must be a real numeric array, got dtype") as ei:
        ALL[func](x)
    assert_not_numba(ei)


@pytest.mark.parametrize("func", list(ALL))
def test_longdouble(func):
    if np.dtype(np.longdouble).itemsize <= 8:
        pytest.skip("longdouble is float64 on this platform")
    x = np.array([[1.0, 2.0]], dtype=np.longdouble)
    name = "grad_output" if func in BACKWARD_AS_UNARY else "x"
    with pytest.raises(TypeError, match=rf"^{name} has dtype float(96|128), which fastlsm does "
                                        r"not support") as ei:
        ALL[func](x)
    assert_not_numba(ei)


@pytest.mark.parametrize("func", ["log_softmax_backward", "softmax_backward"])
@pytest.mark.parametrize("case", ["complex128", "object", "str", "datetime64"])
def test_backward_output_dtype_names_output(func, case):
    f = getattr(fastlsm, func)
    bad = BAD_DTYPE_INPUTS[case]
    with pytest.raises(TypeError, match=r"^output must be a real numeric array"):
        f(np.zeros(bad.shape), bad)
    if np.dtype(np.longdouble).itemsize > 8:
        with pytest.raises(TypeError, match=r"^output has dtype float(96|128)"):
            f(np.zeros(3), np.zeros(3, np.longdouble))


NOT_ARRAYS = {
    "dict": {"a": 1.0},
    "str": "abc",
    "bytes": b"abc",
    "None": None,
    "set": {1.0, 2.0},
    "ragged": [[1, 2], [3]],
    "ragged floats": [[1.0, 2.0, 3.0], [4.0]],
    "object": object(),
    "list with None": [1.0, None],
}


@pytest.mark.parametrize("func", list(ALL))
@pytest.mark.parametrize("case", list(NOT_ARRAYS))
def test_non_arrays_raise_fastlsm_errors(func, case):
    x = NOT_ARRAYS[case]
    if func in BACKWARD_AS_UNARY:
        f = getattr(fastlsm, func)
        call = lambda: f(x, x)  # noqa: E731
    else:
        call = lambda: ALL[func](x)  # noqa: E731
    with pytest.raises((TypeError, ValueError)) as ei:
        call()
    assert_not_numba(ei)
    assert not isinstance(ei.value, AssertionError)
    name = r"(grad_output|output)" if func in BACKWARD_AS_UNARY else "x"
    assert re.match(rf"{name} (must be a real numeric array|could not be converted)",
                    str(ei.value)), str(ei.value)


def test_ragged_message():
    with pytest.raises(TypeError, match=r"^x could not be converted to an array"):
        fastlsm.log_softmax([[1, 2], [3]])
    with pytest.raises(TypeError, match=r"^grad_output could not be converted"):
        fastlsm.softmax_backward([[1, 2], [3]], [[1, 2], [3, 4]])
    with pytest.raises(TypeError, match=r"^output could not be converted"):
        fastlsm.softmax_backward([[1, 2], [3, 4]], [[1, 2], [3]])


# --- axis --------------------------------------------------------------------------------------

def _call(func, x, axis):
    if func in BACKWARD_AS_UNARY:
        return getattr(fastlsm, func)(x, np.zeros_like(x), axis)
    return getattr(fastlsm, func)(x, axis)


@pytest.mark.parametrize("func", list(ALL))
@pytest.mark.parametrize("shape, axis", [((3, 4), 2), ((3, 4), -3), ((3, 4), (0, 2)),
                                         ((3, 4), (-3,)), ((5,), 1), ((), 1), ((), -2),
                                         ((2, 3, 4), 7)])
def test_axis_out_of_range(func, shape, axis):
    x = np.zeros(shape)
    with pytest.raises(AxisError, match=r"out of bounds") as ei:
        _call(func, x, axis)
    assert isinstance(ei.value, ValueError)  # AxisError subclasses ValueError (and IndexError)
    assert_not_numba(ei)


@pytest.mark.parametrize("func", list(ALL))
@pytest.mark.parametrize("axis", [(0, 0), (1, -1), (0, 1, 0), (-2, 0)])
def test_repeated_axis(func, axis):
    x = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"repeated axis") as ei:
        _call(func, x, axis)
    assert not isinstance(ei.value, AxisError)


@pytest.mark.parametrize("func", list(ALL))
@pytest.mark.parametrize("axis", [1.0, 0.5, "a", "0", (0, 1.0), (0, "1"), [0], b"0", object()])
def test_axis_wrong_type(func, axis):
    x = np.zeros((3, 4))
    with pytest.raises(TypeError, match=r"axis must be an int, a tuple of ints or None") as ei:
        _call(func, x, axis)
    assert_not_numba(ei)


def test_axis_numpy_integers_are_accepted(monkeypatch):
    monkeypatch.undo()  # this one runs kernels
    x = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(fastlsm.log_softmax(x, np.int64(0)), fastlsm.log_softmax(x, 0))
    np.testing.assert_array_equal(fastlsm.logsumexp(x, (np.int32(1), np.int8(0))),
                                  fastlsm.logsumexp(x, None))


# --- out ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["log_softmax", "softmax"])
def test_out_errors_elementwise(name):
    f = getattr(fastlsm, name)
    x = np.linspace(-1, 1, 12).reshape(3, 4)
    x0 = x.copy()
    cases = [
        (ValueError, r"out has shape \(4, 3\), expected \(3, 4\)", np.full((4, 3), 7.0)),
        (ValueError, r"out has shape \(12,\), expected \(3, 4\)", np.full(12, 7.0)),
        (ValueError, r"out has shape \(1, 4\)", np.full((1, 4), 7.0)),  # broadcastable is not enough
        (ValueError, r"out has dtype float32, expected float64", np.full((3, 4), 7, np.float32)),
        (ValueError, r"out has dtype int64, expected float64", np.full((3, 4), 7, np.int64)),
        (ValueError, r"out has dtype complex128, expected float64", np.full((3, 4), 7, complex)),
    ]
    for exc, pattern, out in cases:
        before = out.copy()
        with pytest.raises(exc, match=pattern):
            f(x, out=out)
        np.testing.assert_array_equal(out, before)
    ro = np.full((3, 4), 7.0)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"out is read-only"):
        f(x, out=ro)
    assert np.all(ro == 7.0)
    for bad in ([[0.0] * 4] * 3, (1.0,), 5.0, np.float64(1.0)):
        with pytest.raises(TypeError, match=r"out must be a numpy.ndarray"):
            f(x, out=bad)
    np.testing.assert_array_equal(x, x0)


@pytest.mark.parametrize("name", ["log_softmax", "softmax"])
def test_out_dtype_must_equal_result_dtype(name):
    f = getattr(fastlsm, name)
    cases = [  # (input, out dtype): the out dtype is castable but not the result dtype
        (np.zeros((2, 3), np.float32), np.float64),
        (np.zeros((2, 3), np.float64), np.float32),
        (np.zeros((2, 3), np.float16), np.float32),
        (np.zeros((2, 3), np.float32), np.float16),
        (np.zeros((2, 3), np.int32), np.float32),
        (np.zeros((2, 3), np.int64), np.float16),
        (np.zeros((2, 3), np.bool_), np.float32),
    ]
    for x, out_dtype in cases:
        out = np.zeros((2, 3), out_dtype)
        with pytest.raises(ValueError, match=r"out has dtype"):
            f(x, out=out)
        assert np.all(out == 0)


def test_out_in_place_on_read_only_input_and_int_input():
    x = np.linspace(-1, 1, 6).reshape(2, 3)
    x.flags.writeable = False
    with pytest.raises(ValueError, match=r"read-only"):
        fastlsm.log_softmax(x, out=x)
    xi = np.arange(6).reshape(2, 3)
    with pytest.raises(ValueError, match=r"out has dtype int64, expected float64"):
        fastlsm.softmax(xi, out=xi)
    np.testing.assert_array_equal(xi, np.arange(6).reshape(2, 3))


def test_out_errors_logsumexp():
    x = np.linspace(-1, 1, 24).reshape(2, 3, 4)
    x0 = x.copy()
    cases = [
        (dict(axis=-1), np.zeros((2, 3, 1)), r"out has shape \(2, 3, 1\), expected \(2, 3\)"),
        (dict(axis=-1, keepdims=True), np.zeros((2, 3)),
         r"out has shape \(2, 3\), expected \(2, 3, 1\)"),
        (dict(axis=(0, 2)), np.zeros((3, 1)), r"expected \(3,\)"),
        (dict(axis=None), np.zeros(1), r"out has shape \(1,\), expected \(\)"),
        (dict(axis=None, keepdims=True), np.zeros(()), r"expected \(1, 1, 1\)"),
        (dict(axis=-1), np.zeros((2, 3), np.float32), r"out has dtype float32, expected float64"),
    ]
    for kw, out, pattern in cases:
        out[...] = 9
        with pytest.raises(ValueError, match=pattern):
            fastlsm.logsumexp(x, out=out, **kw)
        assert np.all(out == 9)
    ro = np.zeros((2, 3))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"out is read-only"):
        fastlsm.logsumexp(x, out=ro)
    with pytest.raises(TypeError, match=r"out must be a numpy.ndarray"):
        fastlsm.logsumexp(x, out=[[0.0] * 3] * 2)
    with pytest.raises(ValueError, match=r"out has dtype float64, expected float16"):
        fastlsm.logsumexp(x.astype(np.float16), out=np.zeros((2, 3)))
    np.testing.assert_array_equal(x, x0)


def test_out_error_leaves_input_unchanged_in_place():
    # out is the input but has the wrong dtype for the result: nothing may be written
    x = np.arange(6, dtype=np.int32).reshape(2, 3)
    for f in (fastlsm.log_softmax, fastlsm.softmax):
        with pytest.raises(ValueError, match=r"out has dtype"):
            f(x, out=x)
        np.testing.assert_array_equal(x, np.arange(6).reshape(2, 3))


# --- backward shape checks ---------------------------------------------------------------------

@pytest.mark.parametrize("func", ["log_softmax_backward", "softmax_backward"])
@pytest.mark.parametrize("g_shape, y_shape", [((3, 4), (4, 3)), ((3, 4), (1, 4)),
                                              ((1, 4), (3, 4)), ((3, 4), (4,)),
                                              ((3, 4), (3, 4, 1)), ((), (1,)), ((0, 4), (4, 0)),
                                              ((12,), (3, 4))])
def test_backward_shape_mismatch(func, g_shape, y_shape):
    f = getattr(fastlsm, func)
    g, y = np.ones(g_shape), np.full(y_shape, -1.0)
    with pytest.raises(ValueError, match=r"grad_output has shape .* but output has shape .*must "
                                         r"match") as ei:
        f(g, y)
    assert_not_numba(ei)
    assert np.all(g == 1) and np.all(y == -1)


@pytest.mark.parametrize("func", ["log_softmax_backward", "softmax_backward"])
def test_backward_checks_shape_before_axis(func):
    # (documented order is not a decision; only that both are errors of fastlsm's own)
    f = getattr(fastlsm, func)
    with pytest.raises((ValueError, TypeError)) as ei:
        f(np.ones((2, 3)), np.ones((3, 2)), axis=5)
    assert_not_numba(ei)

