"""Argument errors of cross_entropy and nll_loss: the exception type and message (PyTorch's wording
where PyTorch has one), raised before any kernel runs (the launchers are patched to fail), the
input left unchanged, and never a Numba error leaking through.

Every test runs on every backend (``backend``: the arrays of a case moved there, its kernels
forbidden), as in test_errors.  An argument error is raised by the call itself (on Dask while the
graph is built); a target out of range, which only the data shows, may wait until the result is
computed.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import fastlsm
from checks import assert_not_numba, raises_on


def _raises(backend, computed, exc, pattern, func, x, *args, **kwargs):
    before = np.array(x, copy=True)
    data = backend.array(x)
    args = [backend.array(a) for a in args]
    kwargs = {k: data if v is x else backend.array(v) for k, v in kwargs.items()}
    asks = "grad_out" if kwargs.get("grad_out") is not None else None
    with raises_on(backend, exc, pattern or None, asks) as ei:
        result = func(data, *args, **kwargs)
        if computed:
            backend.result(result)
    assert_not_numba(ei)
    np.testing.assert_array_equal(backend.host(data), before, err_msg="the input was modified")
    return ei


def raises(backend, exc, pattern, func, x, *args, **kwargs):
    """On ``backend`` (every array argument moved there; ``x`` once, where it is ``grad_out``
    too), ``func(x, *args, **kwargs)`` raises ``exc`` matching ``pattern``, or the backend's
    refusal of ``grad_out=``, and leaves ``x`` unchanged."""
    return _raises(backend, False, exc, pattern, func, x, *args, **kwargs)


def raises_when_computed(backend, exc, pattern, func, x, *args, **kwargs):
    """As :func:`raises`, for an error that the call or, on Dask, computing its result raises."""
    return _raises(backend, True, exc, pattern, func, x, *args, **kwargs)


BOTH = pytest.mark.parametrize("func", [fastlsm.cross_entropy, fastlsm.nll_loss],
                               ids=["cross_entropy", "nll_loss"])


def logits(*shape, dtype=np.float64):
    return np.linspace(-2, 2, int(np.prod(shape))).reshape(shape).astype(dtype)


# --- target values ----------------------------------------------------------------------------------

def assert_position(message, *index):
    """The position of the bad target, written plainly: [1, 2], (1, 2), (1,), [1] or 'index 1'."""
    inner = ", ".join(str(i) for i in index)
    assert re.search(rf"(\[{inner}\]|\({inner},?\)|(position|index|at) {inner}\b)", message), (
        f"no position {index} in: {message}")
    assert "np." not in message and "int64(" not in message, f"NumPy reprs in: {message}"


@BOTH
@pytest.mark.parametrize("return_grad", [False, True])
def test_target_out_of_range(backend, func, return_grad):
    x = logits(4, 5)
    t = np.array([1, 0, 4, 12])
    ei = raises_when_computed(backend, IndexError, r"Target 12 is out of bounds\.", func, x, t,
                              return_grad=return_grad)
    assert_position(str(ei.value), 3)
    # a target of host data (a list) beside logits on the backend
    raises_when_computed(backend, IndexError, r"Target 12 is out of bounds\.", func, x,
                         [1, 0, 4, 12], return_grad=return_grad)
    # the boundary: C itself
    raises_when_computed(backend, IndexError, r"Target 5 is out of bounds\.", func, x,
                         np.array([5, 0, 0, 0]))
    # a negative target that is not ignore_index
    ei = raises_when_computed(backend, IndexError, r"Target -1 is out of bounds\.", func, x,
                              np.array([0, -1, 0, 0]))
    assert_position(str(ei.value), 1)
    raises_when_computed(backend, IndexError, r"Target -100 is out of bounds\.", func, x,
                         np.array([0, -100, 0, 0]), ignore_index=0)


@BOTH
def test_first_bad_target_is_reported(backend, func):
    # after an ignored one; the second bad one (7) lies in Dask's second block of rows, whose
    # check may run first
    raises_when_computed(backend, IndexError, r"Target 12 is out of bounds\.", func, logits(4, 5),
                         np.array([-100, 12, 7, 0]))


@BOTH
def test_target_out_of_range_position_nd(backend, func):
    x = logits(3, 5, 4)
    t = np.zeros((3, 4), np.int64)
    t[1, 2] = 12
    ei = raises_when_computed(backend, IndexError, r"Target 12 is out of bounds\.", func, x, t,
                              reduction="none", return_grad=True)
    assert_position(str(ei.value), 1, 2)
    # classes last (axis=-1), and an unsigned target
    x = logits(2, 3, 5)
    t = np.zeros((2, 3), np.uint8)
    t[0, 1] = 255
    ei = raises_when_computed(backend, IndexError, r"Target 255 is out of bounds\.", func, x, t,
                              axis=-1)
    assert_position(str(ei.value), 0, 1)


@BOTH
def test_target_out_of_range_one_row(backend, func):
    raises_when_computed(backend, IndexError, r"Target 7 is out of bounds\.", func, logits(5),
                         np.array(7))


@BOTH
def test_target_out_of_range_with_grad_out_in_place(backend, func):
    x = logits(4, 5)
    raises_when_computed(backend, IndexError, r"Target 12 is out of bounds\.", func, x,
                         np.array([0, 12, 1, 1]), return_grad=True, grad_out=x)


# --- target dtypes ----------------------------------------------------------------------------------

@BOTH
@pytest.mark.parametrize("tdtype", [np.float64, np.float32, np.float16])
def test_class_index_shaped_float_target(backend, func, tdtype):
    pattern = r"^target must hold integer class indices, got dtype float"
    raises(backend, TypeError, pattern, func, logits(4, 5), np.array([0, 1, 2, 3], tdtype))
    raises(backend, TypeError, pattern, func, logits(4, 5, 3), np.zeros((4, 3), tdtype))
    raises(backend, TypeError, pattern, func, logits(5), np.array(2.0, tdtype))


@pytest.mark.parametrize("tdtype", [np.int64, np.int32, np.uint8, np.bool_])
def test_probability_target_must_be_float(backend, tdtype):
    for shape in ((4, 5), (2, 5, 3), (5,)):
        raises(backend, TypeError,
               r"Expected floating point type for target with class probabilities",
               fastlsm.cross_entropy, logits(*shape), np.zeros(shape, tdtype))


@pytest.mark.parametrize("ignore_index", [0, 3, 100])
def test_ignore_index_with_probability_target(backend, ignore_index):
    raises(backend, ValueError, r"ignore_index is not supported for floating point target",
           fastlsm.cross_entropy, logits(4, 5), np.full((4, 5), 0.2), ignore_index=ignore_index)


def test_nll_loss_has_no_probability_targets(backend):
    # as in PyTorch: a float target of the input's shape is not a class-index target
    raises(backend, (ValueError, TypeError), r"", fastlsm.nll_loss, logits(4, 5),
           np.full((4, 5), 0.2))


# --- shapes -----------------------------------------------------------------------------------------

@BOTH
@pytest.mark.parametrize("x_shape, t_shape, kw", [
    ((4, 5), (3,), {}),
    ((4, 5, 6), (3, 6), {}),
    ((4, 5, 6, 2), (2, 6, 2), {}),
    ((3, 7, 5), (2, 7), dict(axis=-1)),
])
def test_batch_size_mismatch(backend, func, x_shape, t_shape, kw):
    n, m = x_shape[0], t_shape[0]
    raises(backend, ValueError, re.escape(f"Expected input batch_size ({n}) to match target "
                                          f"batch_size ({m})."),
           func, logits(*x_shape), np.zeros(t_shape, np.int64), **kw)


@BOTH
@pytest.mark.parametrize("x_shape, t_shape, kw", [
    ((4, 5, 6), (4, 7), {}),
    ((4, 5, 6), (4,), {}),
    ((4, 5), (4, 1), {}),
    ((4, 5, 6, 2), (4, 6, 3), {}),
    ((4, 5, 6, 2), (4, 6), {}),
    ((3, 7, 5), (3, 8), dict(axis=-1)),
    ((3, 7, 5), (3, 5), dict(axis=-1)),  # the (N, C, d) reading of it is not what axis=-1 asks
])
def test_spatial_shape_mismatch_names_both_shapes(backend, func, x_shape, t_shape, kw):
    ei = raises(backend, ValueError, "", func, logits(*x_shape), np.zeros(t_shape, np.int64),
                **kw)
    msg = str(ei.value)
    assert str(x_shape) in msg and str(t_shape) in msg, msg


@BOTH
@pytest.mark.parametrize("t_shape", [(1,), (2,), (1, 1), (5, 1)])
def test_one_d_input_needs_a_0d_target(backend, func, t_shape):
    raises(backend, ValueError, "", func, logits(5), np.zeros(t_shape, np.int64))


@BOTH
@pytest.mark.parametrize("w_shape", [(4,), (6,), (1, 5), (0,), ()])
def test_weight_wrong_length(backend, func, w_shape):
    w = np.ones(w_shape)
    pattern = r"^weight should be a 1-D array of 5 elements"
    raises(backend, ValueError, pattern, func, logits(4, 5), np.array([0, 1, 2, 3]), weight=w)
    raises(backend, ValueError, pattern, func, logits(3, 7, 5), np.zeros((3, 7), np.int64),
           weight=w, axis=-1)


# --- options ----------------------------------------------------------------------------------------

@BOTH
@pytest.mark.parametrize("reduction", ["avg", "Mean", "elementwise_mean", "", None, 1])
def test_bad_reduction(backend, func, reduction):
    raises(backend, ValueError, "reduction", func, logits(4, 5), np.array([0, 1, 2, 3]),
           reduction=reduction)


@pytest.mark.parametrize("eps", [1.5, 1.0000001, float("inf")])
def test_label_smoothing_out_of_range(backend, eps):
    # PyTorch checks only eps <= 1; eps <= 0 means no smoothing (test_loss).
    raises(backend, ValueError, re.escape("label_smoothing must be between 0.0 and 1.0. Got: ")
           + re.escape(str(eps))[:3], fastlsm.cross_entropy, logits(4, 5),
           np.array([0, 1, 2, 3]), label_smoothing=eps)
    raises(backend, ValueError, r"label_smoothing must be between 0\.0 and 1\.0\. Got: ",
           fastlsm.cross_entropy, logits(4, 5), np.full((4, 5), 0.2), label_smoothing=eps)


def test_label_smoothing_message_shows_the_value(backend):
    raises(backend, ValueError, r"^label_smoothing must be between 0\.0 and 1\.0\. Got: 1\.5$",
           fastlsm.cross_entropy, logits(4, 5), np.array([0, 1, 2, 3]), label_smoothing=1.5)


@pytest.mark.parametrize("z", [-1e-4, -1.0, -np.inf])
def test_negative_z_loss(backend, z):
    raises(backend, ValueError, "z_loss", fastlsm.cross_entropy, logits(4, 5),
           np.array([0, 1, 2, 3]), z_loss=z)
    raises(backend, ValueError, "z_loss", fastlsm.cross_entropy, logits(4, 5),
           np.full((4, 5), 0.2), z_loss=z)


@pytest.mark.parametrize("softcap", [0.0, -1.0, np.inf, -np.inf, np.nan])
def test_softcap_not_positive_and_finite(backend, softcap):
    for target in (np.array([0, 1, 2, 3]), np.full((4, 5), 0.2)):
        raises(backend, ValueError, r"^softcap must be a positive finite number \(or None for "
               r"none\), got ", fastlsm.cross_entropy, logits(4, 5), target, softcap=softcap)


@pytest.mark.parametrize("softcap", ["30", [30.0], 1j])
def test_softcap_not_a_number(backend, softcap):
    raises(backend, TypeError, r"^softcap must be a real number, got ", fastlsm.cross_entropy,
           logits(4, 5), np.array([0, 1, 2, 3]), softcap=softcap)


# --- grad_out ---------------------------------------------------------------------------------------

@BOTH
@pytest.mark.parametrize("xdtype, bad", [
    (np.float64, np.zeros((5, 4))),
    (np.float64, np.zeros(20)),
    (np.float64, np.zeros((1, 5))),
    (np.float64, np.zeros((4, 5, 1))),
    (np.float64, np.zeros((4, 5), np.float32)),
    (np.float32, np.zeros((4, 5), np.float64)),
    (np.float16, np.zeros((4, 5), np.float32)),
    (np.float32, np.zeros((4, 5), np.float16)),
    (np.float64, np.zeros((4, 5), np.int64)),
    (np.int64, np.zeros((4, 5), np.float32)),
    (np.float64, np.zeros((4, 5), np.complex128)),
])
def test_grad_out_wrong_shape_or_dtype(backend, func, xdtype, bad):
    bad[...] = 7
    bad = backend.array(bad)
    raises(backend, ValueError, "grad_out", func, logits(4, 5, dtype=xdtype),
           np.array([0, 1, 2, 3]), return_grad=True, grad_out=bad)
    assert np.all(backend.host(bad) == 7), "grad_out was written although it was refused"


@BOTH
@pytest.mark.parametrize("bad", [[[0.0] * 5] * 4, (0.0,), 0.0, np.float64(0.0), "grad"])
def test_grad_out_not_an_ndarray(backend, func, bad):
    raises(backend, TypeError, rf"^grad_out must be {re.escape(backend.out_type)}", func,
           logits(4, 5), np.array([0, 1, 2, 3]), return_grad=True, grad_out=bad)


@BOTH
def test_grad_out_is_an_integer_input(backend, func):
    # the result dtype of integer logits is float64: the input cannot hold the gradient
    x = np.arange(20).reshape(4, 5)
    raises(backend, ValueError, "grad_out", func, x, np.array([0, 1, 2, 3]), return_grad=True,
           grad_out=x)


# --- input dtypes -----------------------------------------------------------------------------------

BAD_INPUTS = {
    "complex128": np.array([[1 + 2j, 3 - 1j]]),
    "complex64": np.array([[1j, 2]], dtype=np.complex64),
    "object": np.array([[1.0, 2.0]], dtype=object),
    "str": np.array([["a", "b"]]),
    "bytes": np.array([[b"a", b"b"]]),
    "list of complex": [[1j, 2.0]],
    "list of str": [["1", "2"]],
}


@BOTH
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_unsupported_input_dtypes(backend, func, case):
    x = backend.array(BAD_INPUTS[case])
    with pytest.raises(TypeError) as ei:
        func(x, backend.array(np.array([0])))
    assert_not_numba(ei)


@BOTH
@pytest.mark.parametrize("odd, named", [
    (dict(target=np.array(["a", "b", "c", "d"])), "target"),
    (dict(target=[[0, 1], [2]]), "target"),
    (dict(target=np.array([0, 1, 2, 3]), weight=np.array(["a"] * 5)), "weight"),
    (dict(target=np.array([0, 1, 2, 3]), weight=np.ones(5, complex)), "weight"),
    (dict(target=np.array([0, 1, 2, 3]), weight=[[1.0] * 5, [1.0]]), "weight"),
    (dict(target=np.array([0, 1, 2, 3]), axis=5), "axis"),
    (dict(target=np.array([0, 1, 2, 3]), axis=1.0), "axis"),
    (dict(target=np.array([0, 1, 2, 3]), axis=True), "axis"),
], ids=["str target", "ragged target", "str weight", "complex weight", "ragged weight",
        "axis 5", "axis 1.0", "axis True"])
def test_errors_never_come_from_numba_for_odd_arguments(backend, func, odd, named):
    ei = raises(backend, (TypeError, ValueError, IndexError), "", func, logits(4, 5), **odd)
    assert named in str(ei.value), f"the error does not name {named}: {ei.value}"


@BOTH
@pytest.mark.parametrize("ignore_index", [1.5, -100.0, "0", None])
def test_ignore_index_must_be_an_int(backend, func, ignore_index):
    # PyTorch: "argument 'ignore_index' must be int"; truncating 1.5 to 1 would ignore class 1
    raises(backend, TypeError, "ignore_index", func, logits(4, 5), np.array([0, 1, 2, 3]),
           ignore_index=ignore_index)


@BOTH
@pytest.mark.parametrize("ignore_index", [2 ** 63, -2 ** 63 - 1, 2 ** 70])
def test_ignore_index_must_fit_in_int64(backend, func, ignore_index):
    raises(backend, ValueError, "ignore_index must fit in int64", func, logits(4, 5),
           np.array([0, 1, 2, 3]), ignore_index=ignore_index)


# --- what is allowed --------------------------------------------------------------------------------

def finite(backend, func, *args, **kwargs):
    """``func``'s result on ``backend`` (its arrays moved there) is finite."""
    return np.isfinite(backend.result(func(*map(backend.array, args), **kwargs)))


def test_valid_edge_arguments_are_accepted(backend, monkeypatch):
    monkeypatch.undo()  # these run kernels
    x = logits(4, 5)
    y = np.full((4, 5), 0.2)
    for eps in (0.0, 1.0, 0, 1):
        assert finite(backend, fastlsm.cross_entropy, x, np.array([0, 1, 2, 3]),
                      label_smoothing=eps)
        assert finite(backend, fastlsm.cross_entropy, x, y, label_smoothing=eps)
    assert finite(backend, fastlsm.cross_entropy, x, y, ignore_index=-1)
    assert finite(backend, fastlsm.cross_entropy, x, y, ignore_index=-100, z_loss=0)
    # an ignored target is not range-checked (segmentation's 255)
    t = np.array([0, 255, 2, 255], np.uint8)
    assert finite(backend, fastlsm.cross_entropy, x, t, ignore_index=255)
    assert finite(backend, fastlsm.nll_loss, x, t, ignore_index=255)
    assert finite(backend, fastlsm.cross_entropy, x, np.array([0, -7, 2, 3]), ignore_index=-7)
    assert finite(backend, fastlsm.cross_entropy, x, np.array([0, -7, 2, 3]),
                  ignore_index=np.int64(-7))


# --- grad_loss ------------------------------------------------------------------------------------

@BOTH
def test_grad_loss_needs_a_gradient(backend, func):
    raises(backend, ValueError, r"^grad_loss is the gradient of the loss for the returned "
           r"gradient: it needs return_grad=True or grad_out", func, logits(4, 5),
           np.array([0, 1, 2, 3]), grad_loss=2.0)


@BOTH
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("grad_loss", ["1", np.ones(4), [1.0]], ids=["str", "array", "list"])
def test_grad_loss_of_a_reduced_loss_is_a_number(backend, func, reduction, grad_loss):
    raises(backend, TypeError, rf"^grad_loss must be a real number for reduction='{reduction}'",
           func, logits(4, 5), np.array([0, 1, 2, 3]), reduction=reduction, return_grad=True,
           grad_loss=grad_loss)


@BOTH
@pytest.mark.parametrize("shape", [(3,), (4, 1), ()])
def test_grad_loss_of_none_has_the_loss_shape(backend, func, shape):
    raises(backend, ValueError, rf"^grad_loss has shape {re.escape(str(shape))}, expected "
           r"\(4,\) \(the shape of the loss with reduction='none'\)", func, logits(4, 5),
           np.array([0, 1, 2, 3]), reduction="none", return_grad=True,
           grad_loss=np.ones(shape))
