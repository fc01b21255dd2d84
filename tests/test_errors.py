"""Argument errors: the exception type, a message naming the argument or the problem, raised
before any kernel runs, and never a Numba typing error leaking through.

The tests run on every backend that their case applies to (``backend``: the arrays of a case
moved there, its kernels forbidden): the contract is the same on all of them, and where a backend
refuses what a case asks for (:data:`checks.GAPS`) the case expects that refusal.  Each error is
raised by the call itself: on Dask, while the graph is built.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import fastlsm
from checks import assert_not_numba, only_on, raises_on

AxisError = np.exceptions.AxisError

FORWARD = ["log_softmax", "softmax", "logsumexp"]
BACKWARD = ["log_softmax_backward", "softmax_backward"]
ALL = FORWARD + BACKWARD


def call(backend, func, x, *args, **kwargs):
    """``func`` on ``backend`` with ``x`` moved there; a backward pass takes ``x`` as
    ``grad_output``, beside a good ``output`` of its shape."""
    f = getattr(fastlsm, func)
    x = backend.array(x)
    if func in BACKWARD:
        return f(x, backend.array(np.zeros(np.shape(x))), *args, **kwargs)
    return f(x, *args, **kwargs)


def bad_name(func):
    return "grad_output" if func in BACKWARD else "x"


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


@pytest.mark.parametrize("func", ALL)
@pytest.mark.parametrize("case", list(BAD_DTYPE_INPUTS))
def test_unsupported_dtypes(backend, func, case):
    pattern = rf"^{bad_name(func)} must be a real numeric array, got dtype"
    with pytest.raises(TypeError, match=pattern) as ei:
        call(backend, func, BAD_DTYPE_INPUTS[case])
    assert_not_numba(ei)


@pytest.mark.parametrize("func", ALL)
def test_longdouble(backend, func):
    if np.dtype(np.longdouble).itemsize <= 8:
        pytest.skip("longdouble is float64 on this platform")
    x = np.array([[1.0, 2.0]], dtype=np.longdouble)
    with pytest.raises(TypeError, match=rf"^{bad_name(func)} has dtype float(96|128), which "
                                        r"fastlsm does not support") as ei:
        call(backend, func, x)
    assert_not_numba(ei)


@pytest.mark.parametrize("func", ALL)
def test_float8_is_refused(backend, func):
    """ml_dtypes' float8_e5m2 calls itself a float (kind 'f'): refused like long double, not
    handed to the kernels."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.array([[1.0, 2.0]], dtype=ml_dtypes.float8_e5m2)
    with pytest.raises(TypeError, match=rf"^{bad_name(func)} has dtype float8_e5m2, which "
                                        r"fastlsm does not support; cast it to float32") as ei:
        call(backend, func, x)
    assert_not_numba(ei)


@pytest.mark.parametrize("func", BACKWARD)
@pytest.mark.parametrize("case", ["complex128", "object", "str", "datetime64"])
def test_backward_output_dtype_names_output(backend, func, case):
    f = getattr(fastlsm, func)
    bad = BAD_DTYPE_INPUTS[case]
    with pytest.raises(TypeError, match=r"^output must be a real numeric array"):
        f(backend.array(np.zeros(bad.shape)), backend.array(bad))
    if np.dtype(np.longdouble).itemsize > 8:
        with pytest.raises(TypeError, match=r"^output has dtype float(96|128)"):
            f(backend.array(np.zeros(3)), backend.array(np.zeros(3, np.longdouble)))


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


@only_on("cpu")  # not arrays: host data whatever the backend, so one run says it all
@pytest.mark.parametrize("func", ALL)
@pytest.mark.parametrize("case", list(NOT_ARRAYS))
def test_non_arrays_raise_fastlsm_errors(backend, func, case):
    x = NOT_ARRAYS[case]
    f = getattr(fastlsm, func)
    with pytest.raises((TypeError, ValueError)) as ei:
        f(x, x) if func in BACKWARD else f(x)
    assert_not_numba(ei)
    name = r"(grad_output|output)" if func in BACKWARD else "x"
    assert re.match(rf"{name} (must be a real numeric array|could not be converted)",
                    str(ei.value)), str(ei.value)


def test_ragged_message(backend):
    with pytest.raises(TypeError, match=r"^x could not be converted to an array"):
        fastlsm.log_softmax([[1, 2], [3]])
    with pytest.raises(TypeError, match=r"^grad_output could not be converted"):
        fastlsm.softmax_backward([[1, 2], [3]], [[1, 2], [3, 4]])
    # a ragged output beside a grad_output on the backend
    with pytest.raises(TypeError, match=r"^output could not be converted"):
        fastlsm.softmax_backward(backend.array(np.array([[1.0, 2.0], [3.0, 4.0]])),
                                 [[1, 2], [3]])


# --- axis --------------------------------------------------------------------------------------

@pytest.mark.parametrize("func", ALL)
@pytest.mark.parametrize("shape, axis", [((3, 4), 2), ((3, 4), -3), ((3, 4), (0, 2)),
                                         ((3, 4), (-3,)), ((5,), 1), ((), 1), ((), -2),
                                         ((2, 3, 4), 7)])
def test_axis_out_of_range(backend, func, shape, axis):
    with pytest.raises(AxisError, match=r"out of bounds") as ei:
        call(backend, func, np.zeros(shape), axis)
    assert isinstance(ei.value, ValueError)  # AxisError subclasses ValueError (and IndexError)
    assert_not_numba(ei)


@pytest.mark.parametrize("func", ALL)
@pytest.mark.parametrize("axis", [(0, 0), (1, -1), (0, 1, 0), (-2, 0)])
def test_repeated_axis(backend, func, axis):
    with pytest.raises(ValueError, match=r"repeated axis") as ei:
        call(backend, func, np.zeros((3, 4)), axis)
    assert not isinstance(ei.value, AxisError)


@pytest.mark.parametrize("func", ALL)
@pytest.mark.parametrize("axis", [1.0, 0.5, "a", "0", (0, 1.0), (0, "1"), [0], b"0", object(),
                                  True, False, (0, True)])  # bools: NumPy's TypeError too
def test_axis_wrong_type(backend, func, axis):
    with pytest.raises(TypeError, match=r"axis must be an int, a tuple of ints or None") as ei:
        call(backend, func, np.zeros((3, 4)), axis)
    assert_not_numba(ei)


def test_axis_numpy_integers_are_accepted(backend, monkeypatch):
    monkeypatch.undo()  # this one runs kernels
    x = backend.array(np.arange(12.0).reshape(3, 4))
    np.testing.assert_array_equal(backend.result(fastlsm.log_softmax(x, np.int64(0))),
                                  backend.result(fastlsm.log_softmax(x, 0)))
    np.testing.assert_array_equal(backend.result(fastlsm.logsumexp(x, (np.int32(1), np.int8(0)))),
                                  backend.result(fastlsm.logsumexp(x, None)))


# --- out ---------------------------------------------------------------------------------------

def assert_refused(backend, exc, pattern, f, x, out, **kwargs):
    """``f(x, out=out)`` on ``backend`` raises ``exc`` matching ``pattern`` (or the backend's
    refusal of ``out=``) and leaves ``out`` as it was."""
    before = out.copy()
    out = backend.array(out)
    with raises_on(backend, exc, pattern, asks="out"):
        f(x, out=out, **kwargs)
    np.testing.assert_array_equal(backend.host(out), before)


@pytest.mark.parametrize("name", ["log_softmax", "softmax"])
def test_out_errors_elementwise(backend, name):
    f = getattr(fastlsm, name)
    x0 = np.linspace(-1, 1, 12).reshape(3, 4)
    x = backend.array(x0)
    cases = [
        (ValueError, r"out has shape \(4, 3\), expected \(3, 4\)", np.full((4, 3), 7.0)),
        (ValueError, r"out has shape \(12,\), expected \(3, 4\)", np.full(12, 7.0)),
        (ValueError, r"out has shape \(1, 4\)", np.full((1, 4), 7.0)),  # broadcastable is not enough
        (ValueError, r"out has dtype float32, expected float64", np.full((3, 4), 7, np.float32)),
        (ValueError, r"out has dtype int64, expected float64", np.full((3, 4), 7, np.int64)),
        (ValueError, r"out has dtype complex128, expected float64", np.full((3, 4), 7, complex)),
    ]
    for exc, pattern, out in cases:
        assert_refused(backend, exc, pattern, f, x, out)
    for bad in ([[0.0] * 4] * 3, (1.0,), 5.0, np.float64(1.0)):
        with raises_on(backend, TypeError, rf"out must be {re.escape(backend.out_type)}", "out"):
            f(x, out=bad)
    np.testing.assert_array_equal(backend.host(x), x0)


@pytest.mark.parametrize("name", ["log_softmax", "softmax"])
def test_out_dtype_must_equal_result_dtype(backend, name):
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
        assert_refused(backend, ValueError, r"out has dtype", f, backend.array(x),
                       np.zeros((2, 3), out_dtype))


@only_on("cpu", "dask")  # a device array has no read-only flag
def test_out_read_only(backend):
    x = backend.array(np.linspace(-1, 1, 24).reshape(2, 3, 4))
    for f, shape in [(fastlsm.log_softmax, (2, 3, 4)), (fastlsm.softmax, (2, 3, 4)),
                     (fastlsm.logsumexp, (2, 3))]:
        ro = np.full(shape, 7.0)
        ro.flags.writeable = False
        assert_refused(backend, ValueError, r"out is read-only", f, x, ro)
    # in place, on a read-only input
    x = np.linspace(-1, 1, 6).reshape(2, 3)
    x.flags.writeable = False
    x = backend.array(x)
    with raises_on(backend, ValueError, r"read-only", "out"):
        fastlsm.log_softmax(x, out=x)


def test_out_in_place_on_int_input(backend):
    xi = backend.array(np.arange(6).reshape(2, 3))
    with raises_on(backend, ValueError, r"out has dtype int64, expected float64", "out"):
        fastlsm.softmax(xi, out=xi)
    np.testing.assert_array_equal(backend.host(xi), np.arange(6).reshape(2, 3))


def test_out_errors_logsumexp(backend):
    x0 = np.linspace(-1, 1, 24).reshape(2, 3, 4)
    x = backend.array(x0)
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
        assert_refused(backend, ValueError, pattern, fastlsm.logsumexp, x, out, **kw)
    with raises_on(backend, TypeError, rf"out must be {re.escape(backend.out_type)}", "out"):
        fastlsm.logsumexp(x, out=[[0.0] * 3] * 2)
    assert_refused(backend, ValueError, r"out has dtype float64, expected float16",
                   fastlsm.logsumexp, backend.array(x0.astype(np.float16)), np.zeros((2, 3)))
    np.testing.assert_array_equal(backend.host(x), x0)


def test_out_error_leaves_input_unchanged_in_place(backend):
    # out is the input but has the wrong dtype for the result: nothing may be written
    x = backend.array(np.arange(6, dtype=np.int32).reshape(2, 3))
    for f in (fastlsm.log_softmax, fastlsm.softmax):
        with raises_on(backend, ValueError, r"out has dtype", "out"):
            f(x, out=x)
        np.testing.assert_array_equal(backend.host(x), np.arange(6).reshape(2, 3))


# --- backward shape checks ---------------------------------------------------------------------

@pytest.mark.parametrize("func", BACKWARD)
@pytest.mark.parametrize("g_shape, y_shape", [((3, 4), (4, 3)), ((3, 4), (1, 4)),
                                              ((1, 4), (3, 4)), ((3, 4), (4,)),
                                              ((3, 4), (3, 4, 1)), ((), (1,)), ((0, 4), (4, 0)),
                                              ((12,), (3, 4))])
def test_backward_shape_mismatch(backend, func, g_shape, y_shape):
    f = getattr(fastlsm, func)
    g, y = backend.array(np.ones(g_shape)), backend.array(np.full(y_shape, -1.0))
    with pytest.raises(ValueError, match=r"grad_output has shape .* but output has shape .*must "
                                         r"match") as ei:
        f(g, y)
    assert_not_numba(ei)
    assert np.all(backend.host(g) == 1) and np.all(backend.host(y) == -1)


@pytest.mark.parametrize("func", BACKWARD)
def test_backward_checks_shape_before_axis(backend, func):
    # (documented order is not a decision; only that both are errors of fastlsm's own)
    f = getattr(fastlsm, func)
    with pytest.raises((ValueError, TypeError)) as ei:
        f(backend.array(np.ones((2, 3))), backend.array(np.ones((3, 2))), axis=5)
    assert_not_numba(ei)
