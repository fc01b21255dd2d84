"""The CUDA backend (fastlsm.backends.cuda): the same answers as the float64
references of test_softmax and test_loss, with the same tolerances, from the real kernels.

On a machine without a GPU, conftest runs this module under Numba's CUDA simulator (each CUDA
thread a Python thread, with a shim for the warp shuffles it lacks), so shapes stay small; on a
GPU the same tests run on the device.  ``test_kernels_compile_for_sm80_and_sm90`` compiles every
kernel to PTX for real hardware either way.

Shapes cover the launch modes: a warp per row (up to ``WARP * VALUES`` classes), a block per row,
and a row split across blocks; ``streamed`` narrows the block so a row also has elements beyond
the registers, and ``split_rows`` makes a few rows count as too few for the GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numba
import numpy as np
import pytest

import fastlsm
import loss_reference as loss_ref
from cuda_compile import signatures
import reference as ref
from checks import logits
from test_loss import check_grad, check_lse, check_loss, error_scales, make_case
from test_softmax import (F32, F64, check_backward, check_log, check_prob, lsm_backward_scale,
                          sm_backward_scale)

cuda = pytest.importorskip("numba.cuda")
if not cuda.is_available():
    pytest.skip("no CUDA device and no simulator", allow_module_level=True)

from fastlsm.backends.cuda import arrays, launch  # noqa: E402  (needs numba.cuda)
from fastlsm.backends.cuda import backend as cuda_backend  # noqa: E402
from fastlsm.backends.cuda import loss as cuda_loss  # noqa: E402
from fastlsm.backends.cuda.kernels import primitives as kernels  # noqa: E402
from fastlsm.backends.cuda.kernels import reduce  # noqa: E402
from fastlsm.backends import formulas  # noqa: E402

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
# The simulator computes with NumPy scalars, which warn where a row's answer is nan (inf - inf).
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
INF, NAN = np.inf, np.nan
WARP_ROWS = (6, 9)                          # a warp per row
BLOCK_ROWS = (3, kernels.WARP * kernels.VALUES + 77)  # a block per row


@pytest.fixture
def streamed(monkeypatch):
    """Blocks of 64 threads: a row of more than 64 * VALUES classes is partly streamed; the
    length returned streams each thread two chunks of UNROLL elements and part of a third."""
    monkeypatch.setattr(launch, "MAX_BLOCK", 64)
    return 64 * (kernels.VALUES + 2 * kernels.UNROLL) + 500


@pytest.fixture
def split_rows(monkeypatch):
    """A GPU of 132 multiprocessors (an H100's), so that up to 66 rows are split into segments."""
    monkeypatch.setattr(launch, "_multiprocessors", lambda: 132)


# --- log_softmax, softmax, logsumexp ------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("shape", [WARP_ROWS, BLOCK_ROWS], ids=["warp", "block"])
def test_forward_matches_reference(shape, dtype, rng):
    x = logits(shape, dtype, rng)
    lsm = ref.log_softmax(x)
    out = fastlsm.log_softmax(x, device="cuda")
    assert type(out) is np.ndarray and out.dtype == dtype
    check_log(out, lsm, dtype, "log_softmax")
    check_prob(fastlsm.softmax(x, device="cuda"), ref.softmax(x), lsm, dtype)
    check_log(fastlsm.logsumexp(x, device="cuda"), ref.logsumexp(x), dtype, "logsumexp")


def test_streamed_rows(streamed, rng):
    x = logits((4, streamed), F32, rng)
    x[3, :-3] = -INF  # the row's finite values all lie past the registers
    lsm = ref.log_softmax(x)
    check_log(fastlsm.log_softmax(x, device="cuda"), lsm, F32, "log_softmax")
    check_prob(fastlsm.softmax(x, device="cuda"), ref.softmax(x), lsm, F32)
    check_log(fastlsm.logsumexp(x, device="cuda"), ref.logsumexp(x), F32, "logsumexp")


def check_softmax_family(x, dtype):
    lsm = ref.log_softmax(x)
    check_log(fastlsm.log_softmax(x, device="cuda"), lsm, dtype, "log_softmax")
    check_prob(fastlsm.softmax(x, device="cuda"), ref.softmax(x), lsm, dtype)
    check_log(fastlsm.logsumexp(x, device="cuda"), ref.logsumexp(x), dtype, "logsumexp")


def test_split_policy(split_rows, monkeypatch):
    monkeypatch.setattr(launch, "MIN_SEGMENT", 2048)
    assert launch.segments(67, 10**6) == 1        # more than half as many rows as multiprocessors
    assert launch.segments(66, 10**6) == 4        # two blocks a multiprocessor
    assert launch.segments(1, 262144) == 128      # segments of at least MIN_SEGMENT classes
    held = kernels.VALUES * launch.MAX_BLOCK
    assert launch.segments(1, held) == 1          # one block holds the row in registers
    assert launch.segments(1, held + 1) == (held + 1) // 2048
    assert launch.segments(0, 10**6) == 1


class RegisterBoundKernel:
    """A compiled kernel as the occupancy count sees it on an H100: 65536 registers and 64 warps
    a multiprocessor, registers given to a warp 256 at a time."""

    def __init__(self, registers: int):
        warp_registers = -(-registers * 32 // 256) * 256
        self.warps = min(64, 65536 // warp_registers)
        self.max_threads_per_block = min(1024, self.warps * 32)

    def compile(self, signature):
        return self

    def max_cooperative_grid_blocks(self, threads: int) -> int:
        return min(32, self.warps // -(-threads // 32)) * 132


@pytest.mark.parametrize("registers, threads", [
    (64, 512),   # two blocks of 512 hold as many threads as one of 1024
    (72, 448),   # two of 448 as many as one of 896
    (95, 672),   # two would be 320 each, 640 in all: one of 672 holds more
    (32, 1024),  # two of the largest block fit
    (255, 128),  # 8 warps fit: two blocks of 4 warps as many as one of 8
])
def test_block_size_rule(registers, threads, monkeypatch):
    monkeypatch.setattr(launch, "_multiprocessors", lambda: 132)
    assert launch.max_threads(RegisterBoundKernel(registers), ()) == threads


@pytest.fixture
def warp_blocks(monkeypatch):
    """Blocks of one warp (the simulator runs a block a second or so: split rows make many)."""
    monkeypatch.setattr(launch, "MIN_BLOCK", kernels.WARP)
    monkeypatch.setattr(launch, "MAX_BLOCK", kernels.WARP)
    return kernels.WARP * kernels.VALUES


def test_split_rows(split_rows, warp_blocks, monkeypatch, rng):
    # Two segments a row, each 100 classes longer than its block's registers hold.
    monkeypatch.setattr(launch, "MIN_SEGMENT", warp_blocks + 100)
    x = logits((5, 2 * (warp_blocks + 100)), F32, rng)  # four non-finite rows, one finite
    x[3, :-3] = -INF  # the first segment is all -inf: it adds nothing to the merge
    assert launch.segments(*x.shape) == 2
    check_softmax_family(x, F32)


def test_split_rows_into_more_segments_than_threads(split_rows, warp_blocks, monkeypatch, rng):
    # 34 segments of 33 classes: a block's 32 threads fold more than one segment's pair each.
    monkeypatch.setattr(launch, "MIN_SEGMENT", 32)
    x = logits((1, 1100), F64, rng, nonfinite=False)
    assert launch.segments(*x.shape) == 34
    check_log(fastlsm.log_softmax(x, device="cuda"), ref.log_softmax(x), F64, "log_softmax")


def test_split_rows_in_place(split_rows, warp_blocks, monkeypatch, rng):
    monkeypatch.setattr(launch, "MIN_SEGMENT", 600)
    x = logits((1, 1200), F64, rng, nonfinite=False)
    rows = cuda.to_device(x)
    fastlsm.log_softmax(rows, out=rows)  # each block reads its segment before writing it
    check_log(rows.copy_to_host(), ref.log_softmax(x), F64, "log_softmax")


@pytest.mark.parametrize("mode", ["warp", "block", "streamed", "split"])
def test_backward(mode, monkeypatch, request, rng):
    shape = {"warp": WARP_ROWS, "block": BLOCK_ROWS, "split": (2, 1200)}.get(mode)
    if mode == "streamed":
        shape = (2, request.getfixturevalue("streamed"))
    if mode == "split":  # two segments a row
        request.getfixturevalue("split_rows")
        request.getfixturevalue("warp_blocks")
        monkeypatch.setattr(launch, "MIN_SEGMENT", 600)
        assert launch.segments(*shape) == 2
    x = logits(shape, F64, rng, nonfinite=False)
    g = rng.standard_normal(shape)
    y = fastlsm.log_softmax(x)
    check_backward(fastlsm.log_softmax_backward(g, y, device="cuda"),
                   ref.log_softmax_backward(g, y), lsm_backward_scale(g, y, -1), F64)
    p = fastlsm.softmax(x)
    check_backward(fastlsm.softmax_backward(g, p, device="cuda"), ref.softmax_backward(g, p),
                   sm_backward_scale(g, p, -1), F64)


# --- device arrays in, device arrays out ---------------------------------------------------------


def test_device_arrays_stay_on_the_device(rng):
    x = logits(WARP_ROWS, F32, rng, nonfinite=False)
    dx = cuda.to_device(x)
    out = fastlsm.log_softmax(dx)  # auto: the data is on the device
    assert not isinstance(out, np.ndarray) and tuple(out.shape) == x.shape
    np.testing.assert_allclose(out.copy_to_host(), fastlsm.log_softmax(x), atol=1e-6)
    buffer = cuda.device_array(x.shape, np.float32)
    assert fastlsm.softmax(dx, out=buffer) is buffer
    np.testing.assert_allclose(buffer.copy_to_host(), fastlsm.softmax(x), atol=1e-7)
    fastlsm.log_softmax(dx, out=dx)  # in place
    np.testing.assert_allclose(dx.copy_to_host(), fastlsm.log_softmax(x), atol=1e-6)


def test_numpy_out_with_device_cuda(rng):
    x = logits(WARP_ROWS, F64, rng, nonfinite=False)
    out = np.empty_like(x)
    assert fastlsm.log_softmax(x, out=out, device="cuda") is out
    check_log(out, ref.log_softmax(x), F64, "log_softmax")


def test_host_out_for_device_input_is_refused(rng):
    # the other out= errors are test_errors' on every backend
    dx = cuda.to_device(logits(WARP_ROWS, F32, rng, nonfinite=False))
    with pytest.raises(TypeError, match="device array"):
        fastlsm.log_softmax(dx, out=np.empty(WARP_ROWS, np.float32))


# --- losses ------------------------------------------------------------------------------------

def test_cross_entropy_long_rows(streamed, rng):
    x = logits((4, streamed), F64, rng)
    x[0] = rng.standard_normal(streamed)  # one all -inf row would make the mean nan
    target = np.array([5, 1, streamed - 1, 2 * streamed // 3])
    weight = rng.uniform(0.5, 2.0, streamed)
    for options in ({}, dict(label_smoothing=0.1, weight=weight)):
        expected = loss_ref.cross_entropy(x, target, reduction="none", **options)
        loss, grad = fastlsm.cross_entropy(x, target, reduction="none", return_grad=True,
                                           device="cuda", **options)
        case = make_case("NC", rng)  # only for error_scales' shape-independent fields
        case.x, case.target, case.weight = x, target, options.get("weight")
        scales = error_scales(case, "none", options.get("label_smoothing", 0.0))
        check_loss(loss, expected[0], scales, F64, "none", (4,), f"{options} loss")
        check_grad(grad, expected[1], scales, x, F64, f"{options} grad")


def test_cross_entropy_probabilities_long_rows(streamed, rng):
    x = logits((4, streamed), F64, rng)  # rows: all -inf, +inf, nan, half -inf
    y = rng.dirichlet(np.ones(streamed), 4)
    options = dict(label_smoothing=0.1, weight=rng.uniform(0.5, 2.0, streamed), z_loss=1e-3)
    expected_loss, expected_grad = loss_ref.cross_entropy(x, y, reduction="none", **options)[:2]
    loss, grad = fastlsm.cross_entropy(x, y, reduction="none", return_grad=True, device="cuda",
                                       **options)
    case = make_case("NC", rng)  # only for error_scales' shape-independent fields
    case.x, case.target, case.weight = x, y, options["weight"]
    scales = error_scales(case, "none", 0.1, 1e-3)
    check_loss(loss, expected_loss, scales, F64, "none", (4,), "loss")
    check_grad(grad, expected_grad, scales, x, F64, "grad")


def test_cross_entropy_split_rows(split_rows, warp_blocks, monkeypatch, rng):
    monkeypatch.setattr(launch, "MIN_SEGMENT", 600)
    n = 1200  # two segments a row
    x = logits((5, n), F64, rng)  # rows: all -inf, +inf, nan, first segment all -inf, finite
    target = np.array([5, 1, n - 1, 2 * n // 3, 7])  # in both segments
    weight = rng.uniform(0.5, 2.0, n)
    assert launch.segments(*x.shape) == 2
    case = make_case("NC", rng)  # only for error_scales' shape-independent fields
    case.x, case.target = x, target
    # ignore_index=1 drops the +inf row; the finite row then checks the merged smoothing sum.
    for options in ({}, dict(label_smoothing=0.1, weight=weight, ignore_index=1, z_loss=1e-3)):
        expected_loss, expected_grad, expected_lse = loss_ref.cross_entropy(
            x, target, reduction="none", **options)
        loss, grad, lse = fastlsm.cross_entropy(x, target, reduction="none", return_grad=True,
                                                return_lse=True, device="cuda", **options)
        case.weight = options.get("weight")
        scales = error_scales(case, "none", options.get("label_smoothing", 0.0),
                              options.get("z_loss", 0.0))
        check_loss(loss, expected_loss, scales, F64, "none", (5,), f"{options} loss")
        check_grad(grad, expected_grad, scales, x, F64, f"{options} grad")
        check_lse(lse, expected_lse, scales, (5,), F64, f"{options} lse")


@pytest.mark.parametrize("mode", ["streamed", "split"])
def test_soft_cap_is_read_in_every_launch_mode(mode, request, monkeypatch, rng):
    """The soft cap fused into the loss kernels where they stream a row past the registers and
    where they split it into segments, class indices (smoothed) and probabilities, the gradient
    written over the input too: the CPU's answers (test_loss checks those against the
    reference)."""
    if mode == "streamed":
        n = request.getfixturevalue("streamed")
    else:
        request.getfixturevalue("split_rows")
        request.getfixturevalue("warp_blocks")
        monkeypatch.setattr(launch, "MIN_SEGMENT", 600)
        n = 1200
    x = rng.standard_normal((4, n)) * 40.0  # many logits past the cap
    assert launch.segments(*x.shape) == (2 if mode == "split" else 1)
    target = np.array([0, n - 1, n // 2, 7])
    weight = rng.uniform(0.5, 2.0, n)
    smoothed = dict(label_smoothing=0.1, weight=weight)
    for t, options in ((target, {}), (target, dict(smoothed, z_loss=1e-3)),
                       (rng.dirichlet(np.ones(n), 4), smoothed)):
        expected = fastlsm.cross_entropy(x, t, reduction="none", return_grad=True,
                                         return_lse=True, softcap=30.0, **options)
        got = fastlsm.cross_entropy(x, t, reduction="none", return_grad=True, return_lse=True,
                                    softcap=30.0, device="cuda", **options)
        for name, value, exact in zip(("loss", "grad", "lse"), got, expected):
            np.testing.assert_allclose(value, exact, rtol=1e-12, atol=1e-17,
                                       err_msg=f"{name} {options}")
    dx = cuda.to_device(x)
    _, same = fastlsm.cross_entropy(dx, target, grad_out=dx, softcap=30.0)
    assert same is dx
    np.testing.assert_allclose(dx.copy_to_host(),
                               fastlsm.cross_entropy(x, target, return_grad=True, softcap=30.0)[1],
                               rtol=1e-12, atol=1e-17)


def test_cross_entropy_split_rows_mean_and_in_place(split_rows, warp_blocks, monkeypatch, rng):
    monkeypatch.setattr(launch, "MIN_SEGMENT", 600)
    x = rng.standard_normal((3, 1200))
    target = np.array([0, 599, 600])  # each a segment's first or last class
    options = dict(weight=rng.uniform(0.5, 2.0, 1200), label_smoothing=0.2)
    expected_loss, expected_grad = fastlsm.cross_entropy(x, target, return_grad=True, **options)
    np.testing.assert_allclose(fastlsm.cross_entropy(x, target, device="cuda", **options),
                               expected_loss, rtol=1e-12)
    dx = cuda.to_device(x)
    _, same = fastlsm.cross_entropy(dx, target, grad_out=dx, **options)
    assert same is dx  # the target's logit was read before any block wrote over it
    np.testing.assert_allclose(dx.copy_to_host(), expected_grad, rtol=0, atol=1e-15)


def test_cross_entropy_probabilities_split_rows(split_rows, warp_blocks, monkeypatch, rng):
    monkeypatch.setattr(launch, "MIN_SEGMENT", 600)
    x = logits((5, 1200), F64, rng)  # rows: all -inf, +inf, nan, first segment all -inf, finite
    y = rng.dirichlet(np.ones(1200), 5)
    options = dict(label_smoothing=0.1, weight=rng.uniform(0.5, 2.0, 1200), z_loss=1e-3)
    expected_loss, expected_grad, expected_lse = loss_ref.cross_entropy(x, y, reduction="none",
                                                                        **options)
    loss, grad, lse = fastlsm.cross_entropy(x, y, reduction="none", return_grad=True,
                                            return_lse=True, device="cuda", **options)
    case = make_case("NC", rng)  # only for error_scales' shape-independent fields
    case.x, case.target, case.weight = x, y, options["weight"]
    scales = error_scales(case, "none", 0.1, 1e-3)
    check_loss(loss, expected_loss, scales, F64, "none", (5,), "loss")
    check_grad(grad, expected_grad, scales, x, F64, "grad")
    check_lse(lse, expected_lse, scales, (5,), F64, "lse")
    finite = slice(4, 5)  # the mean of the finite row alone, without a gradient
    np.testing.assert_allclose(
        fastlsm.cross_entropy(x[finite], y[finite], device="cuda", **options),
        fastlsm.cross_entropy(x[finite], y[finite], **options), rtol=1e-12)


def test_split_rows_take_each_rows_grad_loss(split_rows, warp_blocks, monkeypatch, rng):
    """``grad_loss`` of a ``none`` loss reaches both segments of every row, for class indices
    and probabilities: the CPU's gradient (test_backends checks the CPU's)."""
    monkeypatch.setattr(launch, "MIN_SEGMENT", 600)
    x = rng.standard_normal((3, 1200))
    grad_loss = np.array([0.5, -2.0, 3.0])
    for target in (np.array([0, 599, 600]), rng.dirichlet(np.ones(1200), 3)):
        options = dict(reduction="none", return_grad=True, grad_loss=grad_loss,
                       label_smoothing=0.1)
        expected = fastlsm.cross_entropy(x, target, **options)
        got = fastlsm.cross_entropy(x, target, device="cuda", **options)
        np.testing.assert_allclose(got[0], expected[0], rtol=1e-12)
        np.testing.assert_allclose(got[1], expected[1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("shape", [WARP_ROWS, BLOCK_ROWS], ids=["warp", "block"])
def test_nll_loss_in_place_gradient(shape, rng):
    # The thread that writes the gradient at the target reads the target's value first.
    x = logits(shape, F64, rng, nonfinite=False)
    target = rng.integers(0, shape[1], shape[0])
    target[1] = -100
    expected_loss, expected_grad = fastlsm.nll_loss(x, target, reduction="none", return_grad=True)
    dx = cuda.to_device(x)
    loss, grad = fastlsm.nll_loss(dx, target, reduction="none", grad_out=dx)
    assert grad is dx
    np.testing.assert_array_equal(loss.copy_to_host(), expected_loss)
    np.testing.assert_array_equal(dx.copy_to_host(), expected_grad)


def test_loss_on_device_arrays_and_in_place_gradient(rng):
    case = make_case("NC", rng, dtype=F32, weighted=True)
    dx = cuda.to_device(case.x)
    loss, grad = fastlsm.cross_entropy(dx, case.target, case.weight, return_grad=True)
    assert tuple(loss.shape) == () and tuple(grad.shape) == case.x.shape
    expected_loss, expected_grad = fastlsm.cross_entropy(case.x, case.target, case.weight,
                                                         return_grad=True)
    np.testing.assert_allclose(loss.copy_to_host(), expected_loss, rtol=1e-6)
    np.testing.assert_allclose(grad.copy_to_host(), expected_grad, atol=1e-7)
    loss, same = fastlsm.cross_entropy(dx, cuda.to_device(case.target),
                                       cuda.to_device(case.weight), grad_out=dx)
    assert same is dx
    np.testing.assert_allclose(loss.copy_to_host(), expected_loss, rtol=1e-6)
    np.testing.assert_allclose(dx.copy_to_host(), expected_grad, atol=1e-7)


def test_unit_weights_are_made_once_per_gpu(monkeypatch):
    first = cuda_loss._unit_weight(7, np.dtype(F32))
    assert cuda_loss._unit_weight(7, np.dtype(F32)) is first
    another_gpu = types.SimpleNamespace(uuid="GPU-another")
    monkeypatch.setattr(cuda, "get_current_device", lambda: another_gpu)
    second = cuda_loss._unit_weight(7, np.dtype(F32))
    assert second is not first
    np.testing.assert_array_equal(second.copy_to_host(), np.ones(7, F32))


def test_reductions_are_deterministic(rng):
    x = logits(BLOCK_ROWS, F32, rng, nonfinite=False)
    target = rng.integers(0, x.shape[1], x.shape[0])
    first = fastlsm.cross_entropy(x, target, return_grad=True, device="cuda")
    again = fastlsm.cross_entropy(x, target, return_grad=True, device="cuda")
    assert first[0].tobytes() == again[0].tobytes()
    np.testing.assert_array_equal(first[1], again[1])


def test_one_block_reductions_read_several_chunks_a_thread(rng):
    # The target check and the sum over rows with one warp over 600 values: about 19 a thread,
    # in chunks of UNROLL.
    n, n_classes, threads = 600, 7, kernels.WARP
    target = rng.integers(0, n_classes, n)
    target[rng.choice(n, 50, replace=False)] = -100
    weight = rng.uniform(0.5, 2.0, n_classes)
    checked = cuda.device_array(2)
    reduce.check_targets[1, threads](cuda.to_device(target), cuda.to_device(weight), -100,
                                      checked)
    first_bad, denominator = checked.copy_to_host()
    assert first_bad == n
    np.testing.assert_allclose(denominator, weight[target[target != -100]].sum(), rtol=1e-13)
    # Out of range at 501, 357, 300 and 37 (threads 21, 5, 12 and 5): the first is reported.
    target[[501, 357, 300, 37]] = [n_classes, 12, -1, 99]
    reduce.check_targets[1, threads](cuda.to_device(target), cuda.to_device(weight), -100,
                                      checked)
    assert checked.copy_to_host()[0] == 37
    values = rng.standard_normal(n)
    total = cuda.device_array(1)
    reduce.sum_rows[1, threads](cuda.to_device(values), 4.0, total)
    np.testing.assert_allclose(total.copy_to_host()[0], values.sum() / 4.0, rtol=1e-12)


@pytest.mark.skipif(SIMULATED, reason="the simulator gives no low-occupancy warnings")
def test_small_grids_do_not_warn(rng):
    # By class name: numba-cuda warns with a NumbaPerformanceWarning of its own, not numba's.
    x = cuda.to_device(logits((3, 10), F32, rng, nonfinite=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastlsm.log_softmax(x)
        fastlsm.cross_entropy(x, np.array([1, 2, 3]))  # one-block target check and mean
        cuda.synchronize()
    assert not [w for w in caught if type(w.message).__name__ == "NumbaPerformanceWarning"]


# --- choosing the device -------------------------------------------------------------------------

def test_device_argument_and_default(monkeypatch, rng):
    x = logits(WARP_ROWS, F64, rng, nonfinite=False)
    calls = []
    real = cuda_backend.BACKEND.log_softmax
    monkeypatch.setattr(cuda_backend.BACKEND, "log_softmax",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    fastlsm.log_softmax(x)
    assert calls == []  # auto: NumPy data stays on the CPU
    fastlsm.set_default_device("cuda")
    try:
        assert fastlsm.get_default_device() == "cuda"
        check_log(fastlsm.log_softmax(x), ref.log_softmax(x), F64, "log_softmax")
        assert calls == [1]
        fastlsm.log_softmax(x, device="cpu")
        assert calls == [1]
    finally:
        fastlsm.set_default_device(None)
    assert fastlsm.get_default_device() == "auto"
    with pytest.raises(ValueError, match="device must be one of"):
        fastlsm.log_softmax(x, device="tpu")
    with pytest.raises(ValueError, match="device='cpu'"):
        fastlsm.log_softmax(cuda.to_device(x), device="cpu")


def test_no_gpu_is_a_runtime_error(monkeypatch):
    monkeypatch.setattr(cuda, "is_available", lambda: False)
    arrays.cuda.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="no usable CUDA GPU"):
            fastlsm.softmax(np.ones((2, 3)), device="cuda")
    finally:
        arrays.cuda.cache_clear()


def test_import_and_numpy_calls_leave_cuda_alone():
    env = dict(os.environ, FASTLSM_DEVICE="auto")
    code = ("import sys, numpy as np, fastlsm; fastlsm.log_softmax(np.ones((2, 3)));"
            "fastlsm.cross_entropy(np.ones((2, 3)), np.array([0, 1]));"
            "assert not [m for m in sys.modules if m.startswith(('numba.cuda', 'fastlsm.backends.cuda'))], sorted(m for m in sys.modules if 'cuda' in m)")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_fastlsm_device_environment_variable():
    env = dict(os.environ, FASTLSM_DEVICE="cuda")
    code = ("import fastlsm; assert fastlsm.get_default_device() == 'cuda'")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    # A bad value fails the first call that goes by the default, not the import (nor the
    # command line's --help); an explicit device= or set_default_device() still works.
    code = ("import numpy as np, pytest, fastlsm\n"
            "x = np.ones((2, 3))\n"
            "for call in (lambda: fastlsm.log_softmax(x), lambda: fastlsm.get_default_device(),\n"
            "             lambda: fastlsm.cross_entropy(x, np.array([0, 1]))):\n"
            "    with pytest.raises(ValueError, match='^FASTLSM_DEVICE must be one of'):\n"
            "        call()\n"
            "fastlsm.log_softmax(x, device='cpu')\n"
            "fastlsm.set_default_device('cpu')\n"
            "fastlsm.log_softmax(x)\n")
    env = dict(os.environ, FASTLSM_DEVICE="gpu")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    subprocess.run([sys.executable, "-m", "fastlsm.cli", "--help"], check=True, env=env,
                   capture_output=True)


# --- PyTorch and CuPy arrays (on a real GPU only) ------------------------------------------------

def _torch_cuda():
    torch = pytest.importorskip("torch")
    if SIMULATED or not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA device here")
    return torch


def test_torch_tensors_in_and_out(rng):
    torch = _torch_cuda()
    x = logits((64, 3000), F32, rng, nonfinite=False)
    t = torch.from_numpy(x).cuda()
    out = fastlsm.log_softmax(t)
    assert isinstance(out, torch.Tensor) and out.is_cuda and out.dtype == torch.float32
    np.testing.assert_allclose(out.cpu().numpy(), torch.log_softmax(t, -1).cpu().numpy(),
                               atol=1e-5)
    transposed = fastlsm.log_softmax(t.T, axis=0)  # not contiguous: made so on the device
    np.testing.assert_allclose(transposed.cpu().numpy(), out.T.cpu().numpy(), atol=1e-6)
    target = torch.from_numpy(rng.integers(0, 3000, 64)).cuda()
    tr = t.clone().requires_grad_(True)
    expected = torch.nn.functional.cross_entropy(tr, target)
    expected.backward()
    loss, grad = fastlsm.cross_entropy(t, target, return_grad=True)
    assert isinstance(loss, torch.Tensor) and loss.shape == ()
    np.testing.assert_allclose(loss.item(), expected.item(), rtol=1e-5)
    np.testing.assert_allclose(grad.cpu().numpy(), tr.grad.cpu().numpy(), atol=1e-7)


def test_cupy_arrays_in_and_out(rng):
    if SIMULATED:
        pytest.skip("CuPy needs a real GPU")
    cupy = pytest.importorskip("cupy")
    x = logits((64, 3000), F64, rng, nonfinite=False)
    out = fastlsm.softmax(cupy.asarray(x))
    assert isinstance(out, cupy.ndarray)
    check_prob(cupy.asnumpy(out), ref.softmax(x), ref.log_softmax(x), F64)


# --- compiling for real hardware -----------------------------------------------------------------

def test_kernels_compile_for_sm80_and_sm90():
    """Every kernel, in float32 and float64, compiles to PTX for sm_80 and sm_90 (in a process
    without the simulator), and the row kernels keep their cached row in registers."""
    script = Path(__file__).with_name("cuda_compile.py")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    result = subprocess.run([sys.executable, str(script), "8.0", "9.0"], capture_output=True,
                            text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    compiled = [line for line in result.stdout.splitlines() if line.startswith("compiled")]
    assert len(compiled) == 2 * 2 * len(signatures(np.float32)), result.stdout


# --- bfloat16: read and written as 16-bit words --------------------------------------------------

@numba.njit
def _words_of(values, words):
    for i in range(values.size):
        words[i] = formulas.bfloat16_word(values[i])


@numba.njit
def _values_of(words, values):
    for i in range(words.size):
        values[i] = formulas.bfloat16_value(words[i])


def _rounding_cases(rng) -> tuple[np.ndarray, np.ndarray]:
    """float32 and float64 values for the rounding: random bits, and beside every bfloat16 the
    float32s at and around its rounding boundaries (ties, subnormals, inf, nan of both signs),
    and float64s a hair off them (a float32 would round the hair away)."""
    upper = np.arange(1 << 16, dtype=np.uint32) << 16
    near = (upper[:, None] + np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)).ravel()
    f32 = np.concatenate([rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32),
                          near]).view(F32)
    wide = f32.astype(F64)
    f64 = np.concatenate([rng.integers(0, 1 << 63, 1 << 20, dtype=np.uint64).view(F64), wide,
                          wide * (1 + 2.0 ** -40), wide * (1 - 2.0 ** -40)])
    return f32, f64


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # ml_dtypes' casts of nan and overflow
def test_bfloat16_words_match_ml_dtypes(rng):
    """The conversions the CUDA kernels use (plain njit functions, checked here on the CPU):
    every word widens to ml_dtypes' float32 value, and float32 and float64 values round to
    ml_dtypes' words, ties to even, once."""
    bfloat16 = np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    words = np.arange(1 << 16, dtype=np.uint16)
    widened = np.empty(words.size, F32)
    _values_of(words, widened)
    expected = words.view(bfloat16).astype(F32)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(widened), nan)
    np.testing.assert_array_equal(widened[~nan].view(np.uint32), expected[~nan].view(np.uint32))
    for values in _rounding_cases(rng):
        rounded = np.empty(values.size, np.uint16)
        _words_of(values, rounded)
        np.testing.assert_array_equal(rounded, values.astype(bfloat16).view(np.uint16),
                                      err_msg=str(values.dtype))


def test_bfloat16_kernels_widen_and_round(rng):
    """The device kernels over words and values at the edges (a few blocks, for the simulator)."""
    bfloat16 = np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    words = np.array([0x0000, 0x8000, 0x0001, 0x807F, 0x3F80, 0x7F7F, 0x7F80, 0xFF80, 0x7FC0,
                      0xFFC1, 0x4049, 0xC2F7], np.uint16)
    widened = cuda.device_array(words.size, F32)
    launch.launch(reduce.widen_bfloat16, 1, 32, cuda.to_device(words), widened)
    np.testing.assert_array_equal(widened.copy_to_host(), words.view(bfloat16).astype(F32))
    f32, f64 = _rounding_cases(rng)
    for values in (f32[-600:], f64[-600:], f64[:300]):
        rounded = cuda.device_array(values.size, np.uint16)
        launch.launch(reduce.round_to_bfloat16, 3, 256, cuda.to_device(values), rounded)
        with np.errstate(invalid="ignore", over="ignore"):
            expected = values.astype(bfloat16).view(np.uint16)
        np.testing.assert_array_equal(rounded.copy_to_host(), expected)


def test_torch_bfloat16_tensors(rng):
    """PyTorch's bfloat16 CUDA tensors (no ``__cuda_array_interface__``: read as 16-bit words)
    in, bfloat16 tensors out, ``out=`` and ``grad_out=`` too: the answers of the same values in
    float32 on the GPU, rounded."""
    if SIMULATED:
        pytest.skip("PyTorch CUDA tensors need a real GPU")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch without CUDA")
    bfloat16 = np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    x = logits((64, 3000), F32, rng, nonfinite=False).astype(bfloat16)
    t = torch.from_numpy(x.view(np.int16)).view(torch.bfloat16).cuda()
    t32 = torch.from_numpy(x.astype(F32)).cuda()

    def words(tensor):
        return tensor.view(torch.int16).cpu().numpy().view(np.uint16)

    def rounded(tensor):
        return tensor.cpu().numpy().astype(bfloat16).view(np.uint16)

    for name in ("log_softmax", "softmax", "logsumexp"):
        got = getattr(fastlsm, name)(t)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.bfloat16
        np.testing.assert_array_equal(words(got), rounded(getattr(fastlsm, name)(t32)))
    out = torch.empty_like(t)
    assert fastlsm.log_softmax(t, out=out) is out
    np.testing.assert_array_equal(words(out), rounded(fastlsm.log_softmax(t32)))
    target = torch.from_numpy(rng.integers(0, 3000, 64)).cuda()
    expected = fastlsm.cross_entropy(t32, target, return_grad=True)
    loss, grad = fastlsm.cross_entropy(t, target, grad_out=t)
    assert grad is t and loss.dtype == torch.bfloat16
    np.testing.assert_allclose(loss.float().item(), expected[0].item(), rtol=2.0 ** -8)
    np.testing.assert_array_equal(words(t), rounded(expected[1]))
