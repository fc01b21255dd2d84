"""Rows where one entry dominates: relative precision of what is small, on every backend.

With ``r`` the sum of ``exp(x_j - m)`` over every entry but one equal to the max ``m``,
``logsumexp = m + log1p(r)``, the dominant entry's log-probability is ``-log1p(r)`` and the
cross-entropy of a row whose target is that entry is ``log1p(r)``, its gradient there
``p_t - 1 = -r / (1 + r)``: all of them tiny, and each must keep its *relative* precision
(``logsumexp([0, -40])`` is 4.25e-18, not 0).  References are computed in long double from the
very values the kernels read, so the bound is the kernels' own error: a few ulp of the sum of the
small terms.

Every kernel path is reached: one row and many, short rows (the tiled kernels, up to 32
classes), long rows of several L1 blocks (more than 2048 classes, the dominant entry in any
block), classes along a strided axis (the column kernels), rows held by a warp and by a block on
CUDA, and rows split across Dask chunks (the partials and their merge).
"""

from __future__ import annotations

import numpy as np
import pytest

import fastlsm

LD = np.longdouble
F32, F64 = np.float32, np.float64
# A few ulp of a sum of up to thousands of terms, each rounded once (float32 lanes, float64 totals).
RTOL = {F32: 64 * np.finfo(F32).eps, F64: 64 * np.finfo(F64).eps}
# Gaps below the max: r from ~1e-2 down to the smallest the dtype's exp reaches.
GAPS = {F32: (4.0, 20.0, 60.0), F64: (4.0, 40.0, 400.0)}


def dominated(n_rows, n_classes, dtype, gap, positions, rng):
    """Rows whose entry at ``positions[i]`` is 0 and the others ``-gap - u``, ``u`` in [0, 1)."""
    x = (-gap - rng.random((n_rows, n_classes))).astype(dtype)
    x[np.arange(n_rows), positions] = 0.0
    return x


def small_sum(x, axis=-1):
    """``r`` along ``axis`` in long double, one entry equal to the max left out."""
    a = np.moveaxis(x, axis, -1).astype(LD)
    m = a.max(axis=-1, keepdims=True)
    terms = np.exp(a - m)
    np.put_along_axis(terms, np.argmax(a, axis=-1)[..., None], 0.0, axis=-1)
    return np.moveaxis(terms.sum(axis=-1, keepdims=True), -1, axis), np.moveaxis(m, -1, axis)


def check_relative(got, expected, dtype, what):
    got = np.asarray(got, dtype=LD)
    expected = np.asarray(expected, dtype=LD)
    error = np.abs(got - expected) / np.abs(expected)
    worst = np.unravel_index(np.argmax(error), error.shape)
    assert error.max() <= RTOL[dtype], (
        f"{what}: relative error {float(error.max()):.3g} at {worst}: got {float(got[worst])!r}, "
        f"expected {float(expected[worst])!r}")


def check_dominated(on, x, dtype, axis=-1):
    """logsumexp, log_softmax (every entry) and the dominant entry's cross-entropy of ``x``."""
    r, m = small_sum(x, axis)
    lse = m + np.log1p(r)
    check_relative(on.result(fastlsm.logsumexp(on.array(x), axis=axis)),
                   np.squeeze(lse, axis), dtype, "logsumexp")
    check_relative(on.result(fastlsm.log_softmax(on.array(x), axis=axis)),
                   x.astype(LD) - lse, dtype, "log_softmax")
    if on.name == "cpu":
        # In place too, with a max other than 0: a dominated row is summed again after it is
        # written.
        moved = x + dtype(-5.0)
        moved_r, moved_m = small_sum(moved, axis)
        expected = (moved.astype(LD) - moved_m) - np.log1p(moved_r)
        fastlsm.log_softmax(moved, axis=axis, out=moved)
        check_relative(moved, expected, dtype, "log_softmax in place")
    target = np.argmax(x, axis=axis)
    loss, grad = on.result(fastlsm.cross_entropy(on.array(x), on.array(target), axis=axis,
                                                 reduction="none", return_grad=True))
    check_relative(loss, np.squeeze(np.log1p(r), axis), dtype, "cross_entropy")
    # The dominant target's gradient, p_t - 1 = -r / (1 + r), tiny and relatively exact too;
    # every other class's is p_j.
    expected = np.exp(x.astype(LD) - m) / (1 + r)
    np.put_along_axis(expected, np.expand_dims(target, axis), -r / (1 + r), axis=axis)
    check_relative(grad, expected, dtype, "cross_entropy gradient")
    one_hot = np.zeros_like(x)
    np.put_along_axis(one_hot, np.expand_dims(target, axis), 1.0, axis=axis)
    loss, grad = on.result(fastlsm.cross_entropy(on.array(x), on.array(one_hot), axis=axis,
                                                 reduction="none", return_grad=True))
    check_relative(loss, np.squeeze(np.log1p(r), axis), dtype, "cross_entropy, probabilities")
    check_relative(grad, expected, dtype, "cross_entropy gradient, probabilities")


# Short rows (tiled), rows in one L1 block (log_softmax's shifted store from 512 classes), rows of
# several blocks with the dominant entry in the first, a middle and the last block.
CLASSES = (2, 10, 32, 33, 500, 1000, 2100, 5000)
# On CUDA (the simulator takes ~10 s a case) a row of a few classes and one that fills a warp's
# registers (WARP * VALUES = 512); longer rows: test_long_rows_on_cuda.
CUDA_CLASSES = (10, 500)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("n_classes", CLASSES)
def test_dominant_entry_at_every_position(on, dtype, n_classes, rng):
    if on.name == "cuda" and n_classes not in CUDA_CLASSES:
        pytest.skip("on CUDA: CUDA_CLASSES here, long rows in test_long_rows_on_cuda")
    positions = np.unique(np.linspace(0, n_classes - 1, 7).astype(int))
    for gap in GAPS[dtype]:
        x = dominated(len(positions), n_classes, dtype, gap, positions, rng)
        check_dominated(on, x, dtype)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("n_classes", CLASSES)
def test_entries_far_below_the_max_add_exactly_nothing(on, dtype, n_classes, rng):
    """A masked row (one live entry, the rest -inf) or one whose other entries are far below
    its max: ``r`` is 0, so logsumexp is the max, the dominant log-probability and its
    cross-entropy exactly 0, as SciPy gives (not the smallest normal number a term)."""
    if on.name == "cuda" and n_classes not in CUDA_CLASSES:
        pytest.skip("on CUDA: CUDA_CLASSES only")
    positions = np.unique(np.linspace(0, n_classes - 1, 7).astype(int))
    for gap in (np.inf, 1e9):
        x = dominated(len(positions), n_classes, dtype, gap, positions, rng)
        for axis, a in ((-1, x), (0, np.ascontiguousarray(x.T))):
            if on.name == "cuda" and axis == 0:
                continue  # CUDA's columns are rows of a transposed copy: the case above
            assert np.all(on.result(fastlsm.logsumexp(on.array(a), axis=axis)) == 0)
            logp = on.result(fastlsm.log_softmax(on.array(a), axis=axis))
            np.testing.assert_array_equal(logp, a)   # x - 0 - log1p(0): x itself, -inf or not
            loss = on.result(fastlsm.cross_entropy(on.array(a), on.array(positions), axis=axis,
                                                   reduction="none"))
            assert np.all(loss == 0), loss


@pytest.mark.parametrize("dtype, split", [(F64, False), (F32, True)], ids=["streamed", "split"])
def test_long_rows_on_cuda(dtype, split, monkeypatch, rng):
    """Rows streamed beyond the registers, and rows split into segments (few and long), with
    blocks of one warp so that the simulator sees both at a small size (one dtype each: the
    simulator takes ~30 s a case)."""
    from checks import Cuda
    from fastlsm.backends.cuda import launch
    from fastlsm.backends.cuda.kernels import primitives as kernels
    cuda = Cuda()
    cuda.available()
    held = kernels.WARP * kernels.VALUES
    monkeypatch.setattr(launch, "MIN_BLOCK", kernels.WARP)
    monkeypatch.setattr(launch, "MAX_BLOCK", kernels.WARP)
    n_classes = 2 * held + 100
    if split:
        monkeypatch.setattr(launch, "_multiprocessors", lambda: 132)  # an H100's
        monkeypatch.setattr(launch, "MIN_SEGMENT", held + 50)
        assert launch.segments(3, n_classes) == 2
    positions = np.array([0, n_classes // 2, n_classes - 1])
    check_dominated(cuda, dominated(3, n_classes, dtype, GAPS[dtype][1], positions, rng), dtype)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_one_row_and_a_full_reduction(on, dtype):
    x = np.array([0.0, -40.0 if dtype is F64 else -20.0], dtype)
    r = np.exp(LD(x[1]))
    check_relative(on.result(fastlsm.logsumexp(on.array(x))), np.log1p(r), dtype, "logsumexp")
    check_relative(on.result(fastlsm.logsumexp(on.array(x[None]), axis=None)), np.log1p(r), dtype,
                   "logsumexp over every axis")
    check_relative(on.result(fastlsm.log_softmax(on.array(x)))[0], -np.log1p(r), dtype,
                   "log_softmax")


@pytest.mark.parametrize("dtype", [F32, F64])
def test_scipy_example(on, dtype):
    """scipy.special.logsumexp's own: ``[0] + [-20] * 100`` (2.06e-7; 1.19e-7 before the fix)."""
    x = np.array([0.0] + [-20.0] * 100, dtype)
    check_relative(on.result(fastlsm.logsumexp(on.array(x))), np.log1p(100 * np.exp(LD(x[1]))),
                   dtype, "logsumexp")


@pytest.mark.parametrize("dtype", [F32, F64])
def test_ties_with_the_max(on, dtype, rng):
    """Two entries equal to the max: ``log(2 + r)``, whichever blocks they fall in."""
    for n_classes, pair in ((10, (0, 9)), (100, (3, 4)), (3000, (5, 2500))):
        x = dominated(1, n_classes, dtype, 30.0, [pair[0]], rng)
        x[0, pair[1]] = 0.0
        r, m = small_sum(x)
        assert float(r[0, 0]) > 1.0
        check_relative(on.result(fastlsm.logsumexp(on.array(x))), np.log1p(r[:, 0]), dtype,
                       "logsumexp")


@pytest.mark.parametrize("dtype", [F32, F64])
def test_classes_along_a_strided_axis(on, dtype, rng):
    """axis=0 of a C-ordered array: the CPU's column kernels (CUDA's rows of a transposed
    copy: float64 only there)."""
    if on.name == "cuda" and dtype is F32:
        pytest.skip("on CUDA, float64 only")
    positions = np.arange(12)
    x = np.ascontiguousarray(dominated(12, 12, dtype, GAPS[dtype][1], positions, rng).T)
    check_dominated(on, x, dtype, axis=0)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("n_classes, chunk", [(12, 5), (3000, 1000)])
def test_rows_split_across_dask_chunks(dtype, n_classes, chunk, rng):
    """The class axis in several chunks: partials a chunk, merged; the dominant entry in each."""
    da = pytest.importorskip("dask.array")
    from checks import Dask
    positions = np.array([0, chunk - 1, chunk, n_classes // 2, n_classes - 1])
    x = dominated(len(positions), n_classes, dtype, GAPS[dtype][1], positions, rng)

    class SplitDask(Dask):
        def array(self, a):
            if isinstance(a, np.ndarray) and a.ndim == 2:
                return da.from_array(a, chunks=(2, chunk))
            return super().array(a)
    check_dominated(SplitDask(), x, dtype)
    masked = dominated(len(positions), n_classes, dtype, np.inf, positions, rng)
    assert np.all(SplitDask().result(fastlsm.logsumexp(SplitDask().array(masked))) == 0)
    np.testing.assert_array_equal(
        SplitDask().result(fastlsm.log_softmax(SplitDask().array(masked))), masked)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_confident_right_answer_with_options(on, dtype, rng):
    """The loss of a dominant target and its gradient stay relatively exact with weights and
    the mean."""
    positions = np.array([1, 4, 7])
    x = dominated(3, 8, dtype, GAPS[dtype][1], positions, rng)
    weight = np.linspace(0.5, 2.0, 8).astype(dtype)
    r, _ = small_sum(x)
    w_t = weight[positions].astype(LD)
    expected = (w_t * np.log1p(r[:, 0])).sum() / w_t.sum()
    got, grad = on.result(fastlsm.cross_entropy(on.array(x), on.array(positions),
                                                weight=on.array(weight), return_grad=True))
    check_relative(got, expected, dtype, "cross_entropy mean")
    check_relative(grad[np.arange(3), positions], -w_t / w_t.sum() * r[:, 0] / (1 + r[:, 0]),
                   dtype, "cross_entropy mean gradient")
