"""fastlsm on Dask arrays (fastlsm.backends.dask) against fastlsm's single-machine results on the same
values.

Every result must be a lazy Dask array that computes to what fastlsm returns for the NumPy array:
the same dtype and shape, the same non-finite entries (``assert_allclose`` requires nan and
infinities in the same places, with the same signs), and finite entries within

* float64: ``rtol = 1e-12`` and ``atol = 1e-12 * max|expected|``.  Splitting a row changes only
  the order of float64 additions (its sum of exps, and where the kernels' blocks of 2048 start);
  measured here: at most 2.2e-14 relative (a probability-target mean, whose ``wy * log(s) - wyx``
  cancels), most results identical.
* float32: ``rtol = 2e-6`` (~16 ulps) and ``atol = 2e-6 * max|expected|``; measured here: at most
  4.8e-7 (4 ulps).  The kernels add float32 exps in float32 within a block of up to 2048 of them
  before adding block sums in float64, and a chunk boundary moves those blocks, so rows longer
  than these may differ by some more ulps.  The absolute part is scaled by the array's largest
  magnitude because the error of a log-domain entry ``x_j - m - log(s)`` is one of its terms'
  size, not its own (the row's largest entry is close to 0).  A wrong merge (a missing rescale,
  or ``x - lse`` with ``lse`` rounded to float32 at ``|m| = 1e4``) is off by 1e-4 or more.

Most tests use the synchronous scheduler, ``test_threaded_scheduler`` the threaded one, and
``test_distributed_cluster`` a ``dask.distributed.LocalCluster`` of two worker processes, under a
hard deadline.  The functions are called through fastlsm's public API.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
import dask  # noqa: E402

import fastlsm  # noqa: E402
from fastlsm import _spec  # noqa: E402

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
TOL = {F64: 1e-12, F32: 2e-6}
INF, NAN = np.inf, np.nan

# (rows, classes) chunkings of a (10, 20) array: rows only, classes only, both, ragged (a class
# chunk of one), and one with an empty class chunk.
CHUNKINGS = {
    "rows": ((3, 3, 4), (20,)),
    "classes": ((10,), (7, 13)),
    "both": ((4, 6), (5, 5, 10)),
    "ragged": ((3, 5, 2), (7, 1, 12)),
    "empty_chunk": ((5, 5), (0, 8, 12)),
}


@pytest.fixture(autouse=True)
def synchronous_scheduler():
    with dask.config.set(scheduler="synchronous"):
        yield


def _api(name: str):
    """``fastlsm.<name>``: the public functions route Dask arrays to the Dask backend."""
    return getattr(fastlsm, name)


def compute(result):
    """Check that ``result`` (an array or a tuple of them) is lazy, and compute it."""
    results = result if isinstance(result, tuple) else (result,)
    assert all(_spec.is_dask_array(r) for r in results), [type(r) for r in results]
    values = dask.compute(*results)
    return values if isinstance(result, tuple) else values[0]


def assert_matches(value, expected, dtype) -> None:
    """``value`` (computed) equals fastlsm's ``expected`` to ``TOL`` (module docstring)."""
    expected = np.asarray(expected)
    value = np.asarray(value)
    assert value.dtype == expected.dtype
    assert value.shape == expected.shape
    finite = np.abs(expected[np.isfinite(expected)])
    scale = finite.max() if finite.size else 0.0
    tol = TOL[np.dtype(dtype)]
    np.testing.assert_allclose(value, expected, rtol=tol, atol=tol * scale)


def assert_all_match(values, expected, dtype) -> None:
    values = values if isinstance(values, tuple) else (values,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    assert len(values) == len(expected)
    for value, want in zip(values, expected):
        assert_matches(value, want, dtype)


def logits(dtype, rng, shape=(10, 20)) -> np.ndarray:
    return (rng.standard_normal(shape) * 3).astype(dtype)


def nonfinite_logits(dtype, rng) -> np.ndarray:
    """(10, 20) logits whose rows, split as CHUNKINGS["ragged"] (classes 0:7, 7, 8:20), are:"""
    x = logits(dtype, rng)
    x[1] = -INF                   # all -inf: every chunk contributes nothing
    x[2, :8] = -INF               # two whole chunks of -inf, the rest finite
    x[3, 3] = INF                 # +inf in one chunk
    x[4, [3, 15]] = INF           # +inf in two chunks
    x[5, 10] = NAN
    x[6] += 1e4                   # a large max: float32 keeps x - m and log(s) apart
    x[7, [0, 7, 19]] = -INF       # a few -inf entries, one a whole chunk
    x[8] -= 1e4
    return x


def random_chunks(n: int, rng) -> tuple[int, ...]:
    """A random split of ``n`` into 1 to 4 chunks."""
    parts = int(rng.integers(1, min(n, 4) + 1))
    cuts = np.sort(rng.choice(np.arange(1, n), parts - 1, replace=False)) if n > 1 else []
    return tuple(int(c) for c in np.diff([0, *cuts, n]))


# --- log_softmax, softmax, logsumexp ---------------------------------------------------------

@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("chunking", list(CHUNKINGS))
@pytest.mark.parametrize("name", ["log_softmax", "softmax", "logsumexp"])
def test_rowwise_functions_match_unchunked(name, chunking, dtype, rng):
    x = nonfinite_logits(dtype, rng)
    result = compute(_api(name)(da.from_array(x, chunks=CHUNKINGS[chunking])))
    assert_matches(result, getattr(fastlsm, name)(x), dtype)


def test_nonfinite_rows_follow_scipy_when_split():
    x = np.array([[-INF, -INF, -INF, -INF], [INF, 1.0, 2.0, 3.0], [INF, INF, 1.0, 2.0],
                  [0.0, NAN, 1.0, 2.0], [-INF, 0.0, 1.0, -INF]])
    dx = da.from_array(x, chunks=(5, 2))
    with np.errstate(all="ignore"):
        expected_lsm = np.array([[NAN] * 4, [NAN, -INF, -INF, -INF], [NAN, NAN, -INF, -INF],
                                 [NAN] * 4, [-INF, -1.31326169, -0.31326169, -INF]])
    np.testing.assert_allclose(compute(_api("log_softmax")(dx)), expected_lsm, rtol=1e-8)
    np.testing.assert_array_equal(compute(_api("logsumexp")(dx))[:4], [-INF, INF, INF, NAN])
    assert np.isnan(compute(_api("softmax")(dx))[:4]).all()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [F32, F64])
def test_random_shapes_and_chunkings(seed, dtype):
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(1, 13)), int(rng.integers(1, 41)))
    x = logits(dtype, rng, shape)
    dx = da.from_array(x, chunks=tuple(random_chunks(n, rng) for n in shape))
    for name in ("log_softmax", "softmax", "logsumexp"):
        assert_matches(compute(_api(name)(dx)), getattr(fastlsm, name)(x), dtype)
    target = rng.integers(0, shape[1], shape[0])
    assert_all_match(compute(_api("cross_entropy")(dx, target, return_grad=True)),
                     fastlsm.cross_entropy(x, target, return_grad=True), dtype)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_float32_large_max_keeps_accuracy(dtype, rng):
    """Rows around 1e4 split in chunks: log_softmax as accurate as unchunked."""
    x = (1e4 + rng.standard_normal((4, 3000))).astype(dtype)
    expected = fastlsm.log_softmax(x)
    for chunks in [(4, 1000), (2, (1, 2000, 999))]:
        assert_matches(compute(_api("log_softmax")(da.from_array(x, chunks=chunks))), expected,
                       dtype)


@pytest.mark.parametrize("axis", [0, -1, (0, 1), None])
def test_reduction_axes_and_keepdims(axis, rng):
    x = nonfinite_logits(F64, rng)[[0, 2, 6, 7, 9]]
    dx = da.from_array(x, chunks=(2, (7, 1, 12)))
    for keepdims in (False, True):
        result = compute(_api("logsumexp")(dx, axis=axis, keepdims=keepdims))
        expected = fastlsm.logsumexp(x, axis=axis, keepdims=keepdims)
        assert_matches(result, expected, F64)
        assert type(result) is type(expected)  # a full reduction: a NumPy scalar on both
    for name in ("log_softmax", "softmax"):
        assert_matches(compute(_api(name)(dx, axis=axis)), getattr(fastlsm, name)(x, axis=axis),
                       F64)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_class_axis_not_last(dtype, rng):
    """(N, C, d) logits, classes on axis 1 split in chunks, as PyTorch lays out images."""
    x = logits(dtype, rng, (4, 9, 5))
    dx = da.from_array(x, chunks=(2, (4, 5), (3, 2)))
    for name in ("log_softmax", "softmax", "logsumexp"):
        assert_matches(compute(_api(name)(dx, axis=1)), getattr(fastlsm, name)(x, axis=1), dtype)
    target = rng.integers(0, 9, (4, 5))
    target[0, 0] = -100
    options = dict(label_smoothing=0.1, weight=rng.random(9), return_grad=True, return_lse=True)
    assert_all_match(compute(_api("cross_entropy")(dx, target, **options)),
                     fastlsm.cross_entropy(x, target, **options), dtype)
    assert_all_match(compute(_api("nll_loss")(dx, target, reduction="none", return_grad=True)),
                     fastlsm.nll_loss(x, target, reduction="none", return_grad=True), dtype)


@pytest.mark.parametrize("dtype", [np.float16, np.int64, np.bool_])
def test_result_dtypes(dtype, rng):
    """float16 is computed in float32 and returned as float16; integers and bool as float64."""
    x = (rng.standard_normal((6, 10)) * 3).astype(dtype)
    dx = da.from_array(x, chunks=(3, 4))
    for name in ("log_softmax", "softmax", "logsumexp"):
        result = compute(_api(name)(dx))
        expected = getattr(fastlsm, name)(x)
        assert result.dtype == expected.dtype
        np.testing.assert_allclose(result, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss"])
def test_half_losses_are_rounded_once(name, dtype, rng):
    """A half-precision mean or sum is the float64 sum of the rows' losses rounded once, as on
    NumPy: blocks of rows hand their losses on in float64 (rounded a block at a time, 1 in 7
    sums came out an ulp off)."""
    dtype = np.dtype(pytest.importorskip("ml_dtypes").bfloat16) if dtype == "bfloat16" else (
        np.dtype(dtype))
    for _ in range(40):
        x = (rng.standard_normal((6, 10)) * 3).astype(dtype)
        t = rng.integers(0, 10, 6)
        for chunks, reduction in (((3, 10), "sum"), ((2, 10), "mean"), ((3, 5), "sum"),
                                  ((2, 10), "none")):
            expected = _api(name)(x, t, reduction=reduction)
            got = compute(_api(name)(da.from_array(x, chunks=chunks), da.from_array(t, chunks=3),
                                     reduction=reduction))
            assert got.dtype == dtype
            np.testing.assert_array_equal(np.asarray(got, np.float64),
                                          np.asarray(expected, np.float64))


# --- backward passes -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("chunking", ["rows", "classes", "ragged"])
@pytest.mark.parametrize("name", ["log_softmax", "softmax"])
def test_backward_passes(name, chunking, dtype, rng):
    x = logits(dtype, rng)
    g = rng.standard_normal(x.shape).astype(dtype)
    y = getattr(fastlsm, name)(x)
    backward = name + "_backward"
    chunks = CHUNKINGS[chunking]
    expected = getattr(fastlsm, backward)(g, y)
    # Both Dask, and a NumPy output beside a Dask gradient.
    assert_matches(compute(_api(backward)(da.from_array(g, chunks=chunks),
                                          da.from_array(y, chunks=chunks))), expected, dtype)
    assert_matches(compute(_api(backward)(da.from_array(g, chunks=chunks), y)), expected, dtype)


# --- cross_entropy and nll_loss --------------------------------------------------------------

LOSS_OPTIONS = {
    "plain": {},
    "ignore": dict(ignore_index=3),
    "weights": dict(weight="random"),
    "smoothing": dict(label_smoothing=0.2, weight="random", ignore_index=3),
    "z_loss": dict(z_loss=1e-3, label_smoothing=0.1),
}


def _options(name: str, rng) -> dict:
    options = dict(LOSS_OPTIONS[name])
    if options.get("weight") == "random":
        options["weight"] = rng.random(20) + 0.5
    return options


def _targets(rng, ignore_index: int = -100) -> np.ndarray:
    """Targets in every class chunk of CHUNKINGS, one ``ignore_index`` and one class 3 (ignored
    where ``ignore_index`` is 3)."""
    target = rng.integers(0, 20, 10)
    target[[0, 1, 2, 3]] = [0, 7, 8, 19]    # the first and last classes of chunks
    target[4] = ignore_index
    target[5] = 3
    return target


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("chunking", ["rows", "classes", "ragged", "empty_chunk"])
@pytest.mark.parametrize("options", list(LOSS_OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_class_indices(reduction, options, chunking, dtype, rng):
    x = logits(dtype, rng)
    kwargs = dict(_options(options, rng), reduction=reduction, return_grad=True, return_lse=True)
    target = _targets(rng, kwargs.get("ignore_index", -100))
    dx = da.from_array(x, chunks=CHUNKINGS[chunking])
    expected = fastlsm.cross_entropy(x, target, **kwargs)
    assert_all_match(compute(_api("cross_entropy")(dx, target, **kwargs)), expected, dtype)
    # Targets as a Dask array of other chunks; the loss alone.
    kwargs.update(return_grad=False, return_lse=False)
    dask_target = da.from_array(target, chunks=5)
    assert_matches(compute(_api("cross_entropy")(dx, dask_target, **kwargs)), expected[0], dtype)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("chunking", ["rows", "classes", "ragged"])
@pytest.mark.parametrize("options", ["plain", "weights", "z_loss"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_probabilities(reduction, options, chunking, dtype, rng):
    x = logits(dtype, rng)
    probs = rng.random(x.shape).astype(dtype)
    probs /= probs.sum(axis=1, keepdims=True)
    kwargs = dict(_options(options, rng), reduction=reduction, return_grad=True, return_lse=True)
    if options == "weights":
        kwargs["label_smoothing"] = 0.3
    chunks = CHUNKINGS[chunking]
    result = _api("cross_entropy")(da.from_array(x, chunks=chunks),
                                   da.from_array(probs, chunks=chunks), **kwargs)
    assert_all_match(compute(result), fastlsm.cross_entropy(x, probs, **kwargs), dtype)


@pytest.mark.parametrize("chunking", ["rows", "ragged"])
def test_cross_entropy_nonfinite_rows(chunking, rng):
    """Rows with +inf or all -inf give nan (PyTorch); -inf entries elsewhere are fine; an
    ignored row is 0 whatever it holds.  Class indices and probabilities."""
    x = nonfinite_logits(F64, rng)
    target = _targets(rng)
    target[[1, 2, 5, 7]] = [2, 9, -100, 7]  # all -inf; target in finite part; ignored nan row
    dx = da.from_array(x, chunks=CHUNKINGS[chunking])
    probs = rng.random(x.shape)
    probs /= probs.sum(axis=1, keepdims=True)
    for kwargs in (dict(reduction="none"), dict(reduction="none", label_smoothing=0.1),
                   dict(reduction="sum", z_loss=1e-4)):
        for labels in (target, probs):
            expected = fastlsm.cross_entropy(x, labels, return_grad=True, return_lse=True,
                                             **kwargs)
            result = _api("cross_entropy")(dx, labels, return_grad=True, return_lse=True,
                                           **kwargs)
            assert_all_match(compute(result), expected, F64)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("chunking", ["rows", "classes", "ragged", "empty_chunk"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nll_loss(reduction, weighted, chunking, dtype, rng):
    x = fastlsm.log_softmax(logits(dtype, rng))
    target = _targets(rng, ignore_index=3)
    kwargs = dict(reduction=reduction, return_grad=True, ignore_index=3,
                  weight=rng.random(20) + 0.5 if weighted else None)
    result = _api("nll_loss")(da.from_array(x, chunks=CHUNKINGS[chunking]), target, **kwargs)
    assert_all_match(compute(result), fastlsm.nll_loss(x, target, **kwargs), dtype)


@pytest.mark.parametrize("classes", [(12,), (5, 7)])
def test_one_dimensional_input(classes, rng):
    x = logits(F64, rng, (12,))
    dx = da.from_array(x, chunks=(classes,))
    for reduction in ("mean", "none"):
        kwargs = dict(reduction=reduction, return_grad=True)
        assert_all_match(compute(_api("cross_entropy")(dx, np.array(6), return_lse=True,
                                                       **kwargs)),
                         fastlsm.cross_entropy(x, np.array(6), return_lse=True, **kwargs), F64)
        assert_all_match(compute(_api("nll_loss")(dx, np.array(6), **kwargs)),
                         fastlsm.nll_loss(x, np.array(6), **kwargs), F64)


@pytest.mark.parametrize("chunking", ["rows", "classes"])
def test_mean_of_all_ignored_is_nan(chunking, rng):
    x = logits(F32, rng)
    target = np.full(10, -100)
    dx = da.from_array(x, chunks=CHUNKINGS[chunking])
    for name in ("cross_entropy", "nll_loss"):
        loss, grad = compute(_api(name)(dx, target, return_grad=True))
        assert np.isnan(loss) and loss.dtype == F32
        np.testing.assert_array_equal(grad, np.zeros_like(x))


def test_unknown_chunk_sizes_are_named(rng):
    """Boolean indexing leaves nan chunk sizes: a ValueError naming the argument and the cure."""
    x = da.from_array(rng.standard_normal((6, 4)), chunks=2)
    x = x[x[:, 0] > -10]
    for call in (lambda: fastlsm.log_softmax(x), lambda: fastlsm.logsumexp(x),
                 lambda: fastlsm.softmax_backward(x, x),
                 lambda: fastlsm.cross_entropy(x, np.zeros(6, np.int64))):
        with pytest.raises(ValueError, match=r"^(x|input|grad_output) has unknown chunk sizes "
                                             r".*compute_chunk_sizes\(\)"):
            call()


def test_split_classes_need_numpy_blocks(rng):
    """The split-class kernels are CPU kernels: other block types get a clear error."""
    masked = da.from_array(logits(F64, rng), chunks=(5, 10)).map_blocks(np.ma.masked_invalid)
    with pytest.raises(TypeError, match="NumPy blocks only, got numpy.ma.MaskedArray"):
        compute(_api("log_softmax")(masked))


def test_split_class_graph_is_two_tasks_a_block(rng):
    """The class-split cross-entropy's graph with its gradient: two layers of one task a block
    (partials and gradient), the others of at most one task a row chunk or a class chunk --
    no rechunking of the logits, no per-block intermediate."""
    dx = da.from_array(logits(F32, rng, (64, 40)), chunks=(16, 10))    # 4 x 4 blocks
    loss, grad = _api("cross_entropy")(dx, rng.integers(0, 40, 64), return_grad=True)
    layers = {**loss.__dask_graph__().layers, **grad.__dask_graph__().layers}
    del layers[dx.name]
    per_block = sorted(name.rsplit("-", 1)[0] for name, layer in layers.items()
                       if len(layer) > max(dx.numblocks))
    assert per_block == ["cross_entropy_grad_block", "cross_entropy_partials_block"]
    assert all(len(layers[name]) == dx.npartitions for name in layers
               if name.rsplit("-", 1)[0] in per_block)


def test_threaded_scheduler(rng):
    """Blocks computed in several threads at once (each block small enough for the serial
    kernels, so the test compiles no parallel ones)."""
    x = logits(F32, rng, (64, 2000))
    target = rng.integers(0, 2000, 64)
    dx = da.from_array(x, chunks=(16, 500))
    with dask.config.set(scheduler="threads", num_workers=4):
        values = compute((*_api("cross_entropy")(dx, target, return_grad=True),
                          _api("log_softmax")(dx)))
    expected = (*fastlsm.cross_entropy(x, target, return_grad=True), fastlsm.log_softmax(x))
    assert_all_match(values, expected, F32)


# --- a real cluster, and the optional dependency -----------------------------------------------

DEADLINE_S = 120


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (TimeoutError) instead of hanging when the block takes longer than ``seconds``."""
    def expire(signum, frame):
        raise TimeoutError(f"gave up after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- linear_cross_entropy ------------------------------------------------------------------------

LINEAR_OPTIONS = {
    "plain": {},
    "everything": {"weight": True, "ignore_index": 3, "label_smoothing": 0.1, "z_loss": 1e-3},
    "softcap": {"softcap": 2.0},
    "probabilities": {"probabilities": True, "label_smoothing": 0.1},
}


def linear_head(dtype, rng, rows=(10,), features=6, classes=13):
    x = rng.standard_normal(rows + (features,)).astype(dtype)
    w = (rng.standard_normal((classes, features)) / 3).astype(dtype)
    b = rng.standard_normal(classes).astype(dtype)
    return x, w, b


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", list(LINEAR_OPTIONS), ids=list(LINEAR_OPTIONS))
@pytest.mark.parametrize("rows, chunks", [((10,), ((3, 3, 4), (6,))),
                                          ((10,), ((5, 5), (2, 4))),
                                          ((2, 5), ((1, 1), (2, 3), (6,)))],
                         ids=["rows", "features-split", "batch"])
def test_linear_cross_entropy_matches_numpy(dtype, reduction, options, rows, chunks, rng):
    x, w, b = linear_head(dtype, rng, rows)
    options = dict(LINEAR_OPTIONS[options])
    if options.pop("weight", False):
        options["weight"] = rng.uniform(0.5, 2.0, 13)
    if options.pop("probabilities", False):
        target = rng.dirichlet(np.ones(13), rows)
        target_chunks = chunks[:-1] + ((13,),)
    else:
        target = rng.integers(0, 13, rows)
        target.flat[[1, 4]] = 3
        target_chunks = chunks[:-1]
    kwargs = dict(linear_bias=b, reduction=reduction, return_grad=True, chunk_bytes=2 * 13 * 8,
                  **options)
    expected = fastlsm.linear_cross_entropy(x, w, target, **kwargs)
    result = compute(fastlsm.linear_cross_entropy(
        da.from_array(x, chunks=chunks), w, da.from_array(target, chunks=target_chunks),
        **kwargs))
    assert len(result) == 4
    assert_all_match(result, expected, dtype)
    loss = compute(fastlsm.linear_cross_entropy(da.from_array(x, chunks=chunks), w, target,
                                                reduction=reduction, **options))
    assert_matches(loss, fastlsm.linear_cross_entropy(x, w, target, reduction=reduction,
                                                      **options), dtype)


def test_linear_cross_entropy_grad_loss(rng):
    x, w, _ = linear_head(F64, rng)
    target = rng.integers(0, 13, 10)
    dx = da.from_array(x, chunks=(4, 6))
    g = rng.standard_normal(10)
    for reduction, grad_loss in (("none", g), ("none", da.from_array(g, chunks=3)),
                                 ("mean", 0.5), ("sum", -2.0)):
        expected = fastlsm.linear_cross_entropy(x, w, target, reduction=reduction,
                                                return_grad=True, grad_loss=np.asarray(grad_loss))
        result = compute(fastlsm.linear_cross_entropy(dx, w, target, reduction=reduction,
                                                      return_grad=True, grad_loss=grad_loss))
        assert_all_match(result, expected, F64)


@pytest.mark.parametrize("rows, features", [(0, 6), (10, 0)])
def test_linear_cross_entropy_without_rows_or_features(rows, features, rng):
    """N = 0 (zero gradients) and H = 0 (the logits are the bias) as on NumPy."""
    x = rng.standard_normal((rows, features))
    w, b = rng.standard_normal((13, features)), rng.standard_normal(13)
    target = rng.integers(0, 13, rows)
    expected = fastlsm.linear_cross_entropy(x, w, target, linear_bias=b, return_grad=True)
    result = compute(fastlsm.linear_cross_entropy(da.from_array(x, chunks=(4, features)), w,
                                                  target, linear_bias=b, return_grad=True))
    assert_all_match(result, expected, F64)
    if rows == 0:
        assert not np.asarray(result[2]).any()


def test_linear_cross_entropy_bad_target_raises_the_first_in_the_whole_array(rng):
    x, w, _ = linear_head(F64, rng)
    target = rng.integers(0, 13, 10)
    target[[6, 9]] = [13, -5]
    lazy = fastlsm.linear_cross_entropy(da.from_array(x, chunks=(3, 6)), w, target,
                                        return_grad=True)
    with pytest.raises(IndexError, match=r"Target 13 is out of bounds. \(target\[6\] with 13 "):
        dask.compute(*lazy)


def test_linear_cross_entropy_refuses_a_dask_weight(rng):
    x, w, b = linear_head(F64, rng)
    dx = da.from_array(x, chunks=(5, 6))
    with pytest.raises(TypeError, match="takes linear_weight as a NumPy array"):
        fastlsm.linear_cross_entropy(dx, da.from_array(w), np.zeros(10, int))
    with pytest.raises(TypeError, match="takes linear_bias as a NumPy array"):
        fastlsm.linear_cross_entropy(dx, w, np.zeros(10, int), linear_bias=da.from_array(b))
    with pytest.raises(ValueError, match=r"target has shape \(9,\), but input of shape "
                                         r"\(10, 6\)"):
        fastlsm.linear_cross_entropy(dx, w, np.zeros(9, int))


@pytest.fixture(scope="module")
def cluster_client():
    """A LocalCluster of two single-threaded worker processes (spawned: GNU OpenMP, Numba's
    threading layer here, does not survive a fork), each running Numba on one thread."""
    with deadline(DEADLINE_S), dask.config.set({"distributed.worker.multiprocessing-method":
                                                "spawn"}):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address=None,
                                           env={"NUMBA_NUM_THREADS": "1"})
        client = distributed.Client(cluster, timeout=DEADLINE_S)
    try:
        yield client
    finally:
        with deadline(DEADLINE_S):
            client.close()
            cluster.close()


def test_distributed_cluster(cluster_client, rng):
    x = logits(F32, rng, (256, 3000))
    target = rng.integers(0, 3000, 256)
    target[:3] = -100
    dx = da.from_array(x, chunks=(128, (1000, 1200, 800)))
    loss, grad = _api("cross_entropy")(dx, target, return_grad=True, label_smoothing=0.1)
    features = rng.standard_normal((256, 16)).astype(F32)
    head = rng.standard_normal((3000, 16)).astype(F32)
    linear = _api("linear_cross_entropy")(da.from_array(features, chunks=(100, 16)), head,
                                          target, return_grad=True)
    lazy = [loss, grad, _api("log_softmax")(dx), _api("logsumexp")(dx), *linear]
    with deadline(DEADLINE_S):
        futures = cluster_client.compute(lazy)
        values = [future.result(timeout=DEADLINE_S) for future in futures]
    assert len(cluster_client.scheduler_info()["workers"]) == 2
    expected = [*fastlsm.cross_entropy(x, target, return_grad=True, label_smoothing=0.1),
                fastlsm.log_softmax(x), fastlsm.logsumexp(x),
                *fastlsm.linear_cross_entropy(features, head, target, return_grad=True)]
    for value, want in zip(values, expected):
        assert_matches(value, want, F32)


def test_importing_fastlsm_does_not_import_dask():
    code = ("import sys, numpy, fastlsm, fastlsm.backends.dask\n"
            "assert not fastlsm._spec.is_dask_array(numpy.zeros(2))\n"
            "assert not any(m.split('.')[0] == 'dask' for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
