"""Defects an adversarial test run found, each with its regression test, on every backend where
the defect could arise: aliasing between arguments, non-finite weights of classes no row targets,
uint64 targets past int64's range, outputs whose elements overlap, weights of 1 kept after a
call, masked arrays, and options that are not numbers."""

from __future__ import annotations

import contextlib
import gc
import tracemalloc

import numpy as np
import pytest

import fastlsm
from checks import raises_on

INT64_MAX = int(np.iinfo(np.int64).max)


def scaled_normal(shape, rng):
    return rng.standard_normal(shape) * 3


# --- aliasing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("classes", [8, 40])   # 40: past the short-row kernels' 32 classes
@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss"])
def test_grad_out_sharing_the_weights_is_refused(on, name, classes, rng):
    x = on.array(scaled_normal((1, classes), rng))
    weight = on.array(np.linspace(0.5, 2.0, classes))
    with raises_on(on, ValueError, r"^grad_out shares memory with weight", asks="grad_out"):
        on.result(getattr(fastlsm, name)(x, on.array(np.array([3])), weight,
                                         grad_out=weight.reshape(1, classes)))


def test_grad_out_sharing_the_probability_target_is_refused(on, rng):
    x = on.array(scaled_normal((4, 40), rng))
    buffer = rng.random((4, 40))
    buffer /= buffer.sum(axis=1, keepdims=True)
    buffer = on.array(buffer)
    with raises_on(on, ValueError, r"^grad_out shares memory with target", asks="grad_out"):
        on.result(fastlsm.cross_entropy(x, buffer[::-1], grad_out=buffer))


def test_grad_out_sharing_the_class_indices_is_refused(rng):
    """A plain call (int64 targets, no weights: the fast path) whose grad_out holds the
    targets' bytes: refused, and the targets are untouched."""
    words = np.zeros(4 * 8, np.int64)
    target = words[:4]
    target[:] = [0, 5, 7, 3]
    with pytest.raises(ValueError, match=r"^grad_out shares memory with target"):
        fastlsm.cross_entropy(scaled_normal((4, 8), rng), target,
                              grad_out=words.view(np.float64).reshape(4, 8))
    np.testing.assert_array_equal(target, [0, 5, 7, 3])


@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss"])
def test_grad_out_sharing_grad_loss_is_refused(on, name, rng):
    """``grad_loss`` of a ``none`` loss is read row by row after the gradient rows before it
    are written: inside ``grad_out`` (or the input taken as ``grad_out``) it is refused."""
    target = on.array(np.array([0, 1, 2, 3]))
    grad_out = on.array(np.zeros((4, 6)))
    with raises_on(on, ValueError, r"^grad_out shares memory with grad_loss", asks="grad_out"):
        on.result(getattr(fastlsm, name)(on.array(scaled_normal((4, 6), rng)), target,
                                         reduction="none", grad_out=grad_out,
                                         grad_loss=grad_out.reshape(-1)[6:10]))
    x = scaled_normal((4, 6), rng)
    before = x.copy()
    with pytest.raises(ValueError, match=r"^grad_out shares memory with grad_loss"):
        getattr(fastlsm, name)(x, np.array([0, 1, 2, 3]), reduction="none", grad_out=x,
                               grad_loss=x.reshape(-1)[6:10])
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("name", ["log_softmax", "logsumexp", "cross_entropy"])
def test_an_output_over_other_elements_of_its_input(on, name, rng):
    """The output one row on from the input in one buffer: the answer of apart arrays (on CUDA,
    whose rows run in parallel, this raced: wrong losses, different on each run)."""
    x0 = scaled_normal((4, 5), rng)
    target = on.array(np.array([0, 3, 4, 1]))
    calls = {
        "log_softmax": lambda x, out: fastlsm.log_softmax(x, out=out),
        "logsumexp": lambda x, out: fastlsm.logsumexp(
            x, out=None if out is None else out.reshape(-1)[1:5]),
        "cross_entropy": lambda x, out: fastlsm.cross_entropy(
            x, target, reduction="none", return_grad=True, grad_out=out)}
    call = calls[name]
    expected = on.result(call(on.array(x0), None))
    buffer = on.array(np.concatenate([x0.ravel(), np.zeros(5)]))
    x, out = buffer[:20].reshape(4, 5), buffer[5:25].reshape(4, 5)
    with raises_on(on, None, None, asks="grad_out" if name == "cross_entropy" else "out") \
            if on.name == "dask" else contextlib.nullcontext():
        got = on.result(call(x, out))
        for g, e in zip(got if isinstance(got, tuple) else (got,),
                        expected if isinstance(expected, tuple) else (expected,)):
            np.testing.assert_allclose(g, e, rtol=1e-14)


def test_grad_out_may_still_be_the_input(rng):
    x = scaled_normal((4, 40), rng)
    target = np.array([0, 5, 39, 7])
    expected = fastlsm.cross_entropy(x, target, return_grad=True)
    loss, grad = fastlsm.cross_entropy(x, target, grad_out=x)
    assert grad is x and loss == expected[0]
    np.testing.assert_array_equal(grad, expected[1])


# --- non-finite weights --------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_nonfinite_weight_of_an_untargeted_class_spoils_nothing(on, bad, rng):
    """Without label smoothing a class's weight counts only where it is the target: PyTorch's
    loss and gradient stay finite, and are those of any other weight there."""
    x = scaled_normal((6, 40), rng)
    target = np.array([0, 5, 12, 7, 3, 5])
    weight = np.linspace(0.5, 2.0, 40)
    expected = fastlsm.cross_entropy(x, target, weight, return_grad=True)
    weight[39] = bad
    for reduction in ("mean", "sum", "none"):
        loss, grad = on.result(fastlsm.cross_entropy(on.array(x), on.array(target),
                                                     on.array(weight), reduction=reduction,
                                                     return_grad=True))
        assert np.isfinite(grad).all() and np.isfinite(loss).all(), reduction
    np.testing.assert_allclose(loss.sum() / weight[target].sum(), expected[0], rtol=1e-12)
    loss, grad = on.result(fastlsm.cross_entropy(on.array(x), on.array(target), on.array(weight),
                                                 return_grad=True))
    np.testing.assert_allclose(grad, expected[1], rtol=1e-12, atol=1e-15)


# --- uint64 targets ------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [2 ** 64 - 100, 2 ** 63, INT64_MAX])
def test_uint64_targets_past_the_classes_name_their_value(on, value, rng):
    """``2**64 - 100`` would wrap to -100, the default ``ignore_index``, and be ignored."""
    target = np.array([1, value, 2, 3], dtype=np.uint64)
    with pytest.raises(IndexError, match=rf"^Target {value} is out of bounds\. \(target\[1\] "):
        on.result(fastlsm.cross_entropy(on.array(scaled_normal((4, 40), rng)), on.array(target)))


def test_uint64_targets_with_the_largest_ignore_index(on, rng):
    x = scaled_normal((4, 40), rng)
    target = np.array([1, INT64_MAX, 2, 3], dtype=np.uint64)
    loss = on.result(fastlsm.cross_entropy(on.array(x), on.array(target), ignore_index=INT64_MAX))
    assert loss == fastlsm.cross_entropy(x[[0, 2, 3]], np.array([1, 2, 3]))
    target[1] = 2 ** 63 + 5
    with pytest.raises(IndexError, match=rf"^Target {2 ** 63 + 5} is out of bounds"):
        on.result(fastlsm.cross_entropy(on.array(x), on.array(target), ignore_index=INT64_MAX))


# --- outputs whose elements overlap --------------------------------------------------------------

def overlapping(shape, dtype=np.float64):
    """A writable array whose rows are all one row (a row stride of 0)."""
    row = np.empty(shape[-1], dtype)
    return np.lib.stride_tricks.as_strided(row, shape=shape, strides=(0, row.itemsize),
                                           writeable=True)


def test_outputs_whose_elements_overlap_are_refused(rng):
    x = scaled_normal((4, 40), rng)
    target = np.array([0, 5, 39, 7])
    for call in (lambda out: fastlsm.log_softmax(x, out=out),
                 lambda out: fastlsm.softmax(x, out=out)):
        with pytest.raises(ValueError, match=r"^out has elements that share memory"):
            call(overlapping(x.shape))
    with pytest.raises(ValueError, match=r"^grad_out has elements that share memory"):
        fastlsm.cross_entropy(x, target, grad_out=overlapping(x.shape))


def test_strided_outputs_without_overlap_are_taken(rng):
    x = scaled_normal((4, 40), rng)
    target = np.array([0, 5, 39, 7])
    out = np.empty((40, 4)).T
    np.testing.assert_array_equal(fastlsm.log_softmax(x, out=out), fastlsm.log_softmax(x))
    grad = np.empty((4, 80))[:, ::2]
    loss, _ = fastlsm.cross_entropy(x, target, grad_out=grad)
    expected = fastlsm.cross_entropy(x, target, return_grad=True)
    assert loss == expected[0]
    np.testing.assert_array_equal(grad, expected[1])


# --- memory kept after a call --------------------------------------------------------------------

def test_unit_weights_for_many_classes_are_not_kept(rng):
    classes = 1 << 20
    x = rng.standard_normal((2, classes)).astype(np.float32)
    target = np.array([0, classes - 1])
    # The same calls on another class count first: Numba compiles (and keeps) the kernels.
    half = np.ascontiguousarray(x[:, :classes // 2])
    fastlsm.cross_entropy(half, target // 2)
    fastlsm.cross_entropy(half, target // 2, label_smoothing=0.1)
    tracemalloc.start()
    try:
        fastlsm.cross_entropy(x, target)
        fastlsm.cross_entropy(x, target, label_smoothing=0.1)
        gc.collect()
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kept < classes, f"{kept} bytes kept after the calls (the weights of 1 are 4 MiB)"


# --- masked arrays -------------------------------------------------------------------------------

def test_masked_arrays_are_read_without_their_mask(rng):
    """As SciPy's functions do; the same on the first call (cold) and after."""
    x = scaled_normal((4, 40), rng)
    masked = np.ma.masked_array(x, mask=x > 1)
    target = np.array([0, 5, 39, 7])
    for _ in range(2):
        result = fastlsm.log_softmax(masked)
        assert type(result) is np.ndarray
        np.testing.assert_array_equal(result, fastlsm.log_softmax(x))
        assert fastlsm.cross_entropy(masked, target) == fastlsm.cross_entropy(x, target)
        assert fastlsm.logsumexp(masked, axis=0).tolist() == fastlsm.logsumexp(x, axis=0).tolist()


# --- options -------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["0.1", None, [0.1]])
@pytest.mark.parametrize("option", ["label_smoothing", "z_loss"])
def test_options_that_are_not_numbers_are_type_errors(on, option, value, rng):
    x = on.array(scaled_normal((4, 40), rng))
    with pytest.raises(TypeError, match=rf"^{option} must be a real number, got "):
        on.result(fastlsm.cross_entropy(x, on.array(np.array([0, 1, 2, 3])), **{option: value}))
