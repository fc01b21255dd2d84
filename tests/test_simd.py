"""The vectorisable ``exp``, ``log1p`` and ``max`` of :mod:`fastlsm.backends.cpu.kernels._simd`
against NumPy.

Errors are in units in the last place (ulp) of the correctly rounded result, taken from a wider
reference: float64 for float32, the x87 80-bit long double for float64 (where NumPy has one).
"""

import ctypes
import mmap
import re
import sys

import llvmlite.binding as llvm
import numba
import numpy as np
import pytest
from numba import njit

from fastlsm.backends.cpu.kernels import loss, softmax
from fastlsm.backends.cpu.kernels._simd import (block_max, exp, exp_nonpositive, exp_summand,
                                                log1p, max_ignoring_nan)


def elementwise(func):
    """A compiled loop applying the intrinsic ``func`` to each element of a 1-D array."""
    @njit
    def apply(x):
        out = np.empty_like(x)
        for i in range(x.shape[0]):
            out[i] = func(x[i])
        return out
    return apply


exp_all = elementwise(exp)
exp_summand_all = elementwise(exp_summand)
exp_nonpositive_all = elementwise(exp_nonpositive)
log1p_all = elementwise(log1p)


@njit
def max_all(x):
    m = x.dtype.type(-np.inf)
    for i in range(x.shape[0]):
        m = max_ignoring_nan(m, x[i])
    return m


def ulp_error(result, reference, dtype):
    """``|result - reference|`` in ulps of ``reference`` rounded to ``dtype`` (normal range)."""
    rounded = reference.astype(dtype)
    ulp = np.spacing(np.abs(rounded)).astype(reference.dtype)
    return np.abs(result.astype(reference.dtype) - reference) / ulp


def test_float32_within_1_01_ulp(rng):
    # One float32 in 512 from -87 to 88 (results in the normal range): ~4.3M values.
    magnitudes = np.arange(0, np.float32(88.0).view(np.int32), 512, dtype=np.int32).view(np.float32)
    x = np.concatenate([magnitudes, -magnitudes[magnitudes <= 87.0]])
    err = ulp_error(exp_all(x), np.exp(x.astype(np.float64)), np.float32)
    assert err.max() <= 1.01, x[np.argmax(err)]


@pytest.mark.skipif(np.finfo(np.longdouble).nmant < 63, reason="no 80-bit long double here")
def test_float64_within_1_ulp(rng):
    x = np.concatenate([rng.uniform(-708.0, 709.0, 1_000_000), rng.uniform(-1.0, 1.0, 500_000),
                        rng.uniform(-1e-6, 1e-6, 100_000)])
    err = ulp_error(exp_all(x), np.exp(x.astype(np.longdouble)), np.float64)
    assert err.max() <= 1.0, x[np.argmax(err)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_special_values_and_range_ends(dtype):
    info = np.finfo(dtype)
    x = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 1e4, -1e4, np.log(info.max) * 1.0001,
                  np.log(info.max) * 0.9999, np.log(info.tiny), np.log(info.tiny) - 5.0,
                  np.log(info.smallest_subnormal) - 1.0], dtype=dtype)
    got = exp_all(x)
    with np.errstate(over="ignore"):
        expected = np.exp(x.astype(np.float64 if dtype == np.float32 else np.longdouble))
        expected = expected.astype(dtype)
    assert np.isnan(got[2]) and np.isnan(expected[2])
    keep = ~np.isnan(x)
    # Overflow, underflow, the signs of infinity and zero exactly; subnormal results to within
    # one subnormal step (their precision is the step itself).
    np.testing.assert_array_equal(np.isinf(got[keep]), np.isinf(expected[keep]))
    np.testing.assert_allclose(got[keep], expected[keep], rtol=2 * info.eps,
                               atol=info.smallest_subnormal)


@pytest.mark.skipif(np.finfo(np.longdouble).nmant < 63, reason="no 80-bit long double here")
def test_log1p_within_1_ulp(rng):
    # Every binade of float64 above -1 (the excesses the kernels pass are 0 and up, or -1).
    x = np.concatenate([np.exp(rng.uniform(-745.0, 709.7, 1_000_000)),
                        -np.exp(rng.uniform(-745.0, 0.0, 200_000)), rng.uniform(-1.0, 1.0, 200_000),
                        rng.uniform(0.0, 100.0, 200_000),
                        -1.0 + np.spacing(1.0) * np.arange(1, 99)])
    x = x[x > -1.0]
    err = ulp_error(log1p_all(x), np.log1p(x.astype(np.longdouble)), np.float64)
    assert err.max() <= 1.0, x[np.argmax(err)]


def test_log1p_special_values():
    x = np.array([0.0, -0.0, 5e-324, -1.0, np.inf, np.finfo(np.float64).max, -1.5, -np.inf, np.nan])
    got = log1p_all(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = np.log1p(x)
    np.testing.assert_array_equal(got, expected)       # nan where NumPy has nan
    np.testing.assert_array_equal(np.signbit(got[:5]), np.signbit(expected[:5]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_summand_is_exp_down_to_the_smallest_normal_then_0(dtype, rng):
    floor = {np.float32: -87.0, np.float64: -708.0}[dtype]  # just above log(smallest normal)
    zero = {np.float32: -88.0, np.float64: -709.0}[dtype]   # and from here down, 0
    x = np.concatenate([rng.uniform(floor, 0.0, 200_000), [0.0, -0.0, floor, zero],
                        rng.uniform(zero, floor, 1000), rng.uniform(2 * floor, zero, 1000),
                        [-1e30, -np.inf]]).astype(dtype)
    got = exp_summand_all(x)
    exact = exp_all(x)
    above = x >= floor
    np.testing.assert_array_equal(got[above], exact[above])
    # In between: at most exp(floor), about the smallest normal number; below: 0, and exactly 0
    # for -inf.
    between = (x < floor) & (x > zero)
    assert np.all((got[between] >= 0) & (got[between] <= exact[x == floor][0]))
    assert np.all(got[x <= zero] == 0)
    zero_and_nan = exp_summand_all(np.array([0.0, np.nan], dtype))
    assert zero_and_nan[0] == 1 and np.isnan(zero_and_nan[1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_nonpositive_is_exp_bit_for_bit(dtype, rng):
    # float32: one bit pattern in 97 from -0 down to -110 (every binade, subnormal results and
    # the 0s below them included; all 1.1e9 of them matched when the function was written);
    # float64: samples down to -760 and around the subnormal range.
    if dtype == np.float32:
        x = np.arange(0x80000000, 0xC2DC0000, 97, dtype=np.uint64).astype(np.uint32).view(dtype)
    else:
        x = np.concatenate([rng.uniform(-760.0, 0.0, 1_000_000),
                            rng.uniform(-746.0, -707.0, 200_000),
                            -np.exp(rng.uniform(-745.0, 6.6, 200_000))])
    x = np.concatenate([x, np.array([0.0, -0.0, -np.inf, np.nan, -1e30], dtype)])
    got, expected = exp_nonpositive_all(x), exp_all(x)
    bits = np.uint32 if dtype == np.float32 else np.uint64
    same = got.view(bits) == expected.view(bits)
    assert same.all(), (x[~same][:5], got[~same][:5], expected[~same][:5])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_ignores_nan(dtype, rng):
    x = rng.standard_normal(1001).astype(dtype)
    assert max_all(x) == x.max()
    x[[0, 500, 1000]] = np.nan
    assert max_all(x) == np.nanmax(x)
    assert max_all(np.full(37, np.nan, dtype)) == -np.inf
    assert max_all(np.array([-np.inf, np.inf], dtype)) == np.inf


@njit
def _block_max_of(x, start, stop):
    return block_max(x, start, stop)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_block_max_is_the_max_ignoring_nan(dtype, rng):
    """Every start and stop around the vector groups (32 float32 / 16 float64 a group), the
    whole vectors after them and the masked last one, with the max at each place in turn."""
    x = rng.standard_normal(300).astype(dtype)
    x[[7, 150]] = np.nan
    x[299] = 9.0
    for start in (0, 1, 5, 31, 32, 63, 64, 100):
        for stop in range(start, 300):
            part = x[start:stop]
            kept = part[~np.isnan(part)]
            expected = kept.max() if kept.size else -np.inf
            assert _block_max_of(x, start, stop) == expected, (start, stop)
    for n in range(1, 80):
        for place in range(n):
            y = np.full(n, -1.0, dtype)
            y[place] = 2.0
            assert _block_max_of(y, 0, n) == 2.0, (n, place)
    assert _block_max_of(np.full(200, np.nan, dtype), 0, 200) == -np.inf
    assert _block_max_of(np.array([-np.inf] * 70 + [np.inf], dtype), 0, 71) == np.inf
    assert _block_max_of(np.array([np.nan] * 69 + [-np.inf], dtype), 0, 70) == -np.inf


@pytest.mark.skipif(sys.platform == "win32", reason="needs mprotect (POSIX)")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_block_max_reads_nothing_past_stop(dtype):
    """Rows that end where an unreadable page begins: the masked last vector must not touch
    it (a load of the whole vector would crash the process)."""
    page = mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    pages = mmap.mmap(-1, 2 * page)
    values = np.frombuffer(pages, dtype, count=page // np.dtype(dtype).itemsize)
    guard = values.ctypes.data + page
    assert libc.mprotect(guard, page, 0) == 0, ctypes.get_errno()  # PROT_NONE
    try:
        values[:] = np.arange(values.size, dtype=dtype)
        for n in range(1, 70):
            assert _block_max_of(values[values.size - n:], 0, n) == values.size - 1, n
    finally:
        libc.mprotect(guard, page, mmap.PROT_READ | mmap.PROT_WRITE)
        del values
        pages.close()


@njit
def _tripled(values, out):
    for i in range(values.shape[0]):
        out[i] = values[i] * values.dtype.type(3.0)


def host_lanes(dtype) -> int:
    """SIMD lanes of ``dtype`` in the vectors LLVM chooses for this host, as a plain loop
    compiled by Numba shows them: 16 float32 on Zen 4/5, which run AVX-512 full width; 8 where
    LLVM prefers 256-bit vectors (AVX2, and Intel's AVX-512 server cores, whose 512-bit
    instructions lower the clock).  A fixed 16 for every AVX-512 host failed on a Xeon here."""
    values = np.ones(64, dtype)
    _tripled(values, np.empty_like(values))
    ir = _tripled.inspect_llvm((numba.typeof(values),) * 2)
    float_type = "float" if np.dtype(dtype) == np.float32 else "double"
    return max(int(n) for n in re.findall(rf"fmul[^<\n]*<(\d+) x {float_type}>", ir))


def test_host_lanes_are_the_vector_registers_width():
    """The reference loop itself runs as wide as the host's vectors go, at least SSE's."""
    features = llvm.get_host_cpu_features()
    widest = 64 if features.get("avx512f") else 32 if features.get("avx2") else 16
    for dtype in (np.float32, np.float64):
        assert 16 // np.dtype(dtype).itemsize <= host_lanes(dtype) <= widest // np.dtype(
            dtype).itemsize


# Kernels whose loops call exp, one per statistics pass (row_stats with and without storing the
# exps, tile_stats, the loss's own), each with arguments that compile it.
EXP_KERNELS = {  # name: (kernel, its arguments for a matrix x)
    "log_softmax_rows": (softmax.log_softmax_rows, lambda x: (x, np.empty_like(x))),
    "softmax_rows": (softmax.softmax_rows, lambda x: (x, np.empty_like(x))),
    "log_softmax_short_rows": (softmax.log_softmax_short_rows, lambda x: (x, np.empty_like(x))),
    "cross_entropy_rows": (loss.cross_entropy_rows,
                           lambda x: (x, np.zeros(len(x), np.int64), np.ones(x.shape[1], x.dtype),
                                      float(x.shape[1]), -100, 0.1, 0.0, 1.0, np.empty(0), None,
                                      np.empty(len(x)), np.empty(len(x)), np.empty_like(x))),
}


@pytest.mark.parametrize("name", sorted(EXP_KERNELS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_loops_vectorise(name, dtype):
    # exp builds 2**n by shifting integers into the exponent bits: a vector `shl` in the
    # optimised IR is exp running across SIMD lanes.  The max is block_max's vector loop (its
    # last vector a masked load, of 256 bits) or, in the tiles, a vector `llvm.maxnum`.
    # (Compiled afresh: Numba cannot show the IR of a kernel loaded from its cache.)
    compiled, arguments = EXP_KERNELS[name]
    kernel = numba.njit(error_model="numpy")(compiled.serial.py_func)  # as runtime.rowwise
    x = np.ones((4, 100), dtype)
    kernel(*arguments(x))
    ir = kernel.inspect_llvm(kernel.signatures[0])
    int_type, float_type = ("i32", "f32") if dtype == np.float32 else ("i64", "f64")
    lanes = host_lanes(dtype)
    shl = [int(n) for n in re.findall(rf"shl <(\d+) x {int_type}>", ir)]
    maxima = [int(n) for n in re.findall(rf"llvm\.(?:masked\.load|maxnum)\.v(\d+){float_type}",
                                         ir)]
    assert shl and max(shl) >= lanes, f"exp is not vectorised in {name}"
    assert maxima and max(maxima) >= min(lanes, 32 // np.dtype(dtype).itemsize), \
        f"the max loop is not vectorised in {name}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_soft_cap_loop_vectorises(dtype):
    """The soft-cap's tanh (an exp, a series and a division a logit) runs across SIMD lanes."""
    kernel = numba.njit(error_model="numpy")(loss.soft_cap_rows.serial.py_func)
    x = np.ones((4, 100), dtype)
    kernel(x, 30.0, np.empty_like(x))
    ir = kernel.inspect_llvm(kernel.signatures[0])
    float_type = "float" if dtype == np.float32 else "double"
    divisions = [int(n) for n in re.findall(rf"fdiv[^<\n]*<(\d+) x {float_type}>", ir)]
    assert divisions and max(divisions) >= host_lanes(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tile_log_sums_vectorise(dtype):
    """The short-row kernels take each row's log1p across SIMD lanes (its two divisions)."""
    kernel = numba.njit(error_model="numpy")(softmax.log_softmax_short_rows.serial.py_func)
    x = np.ones((300, 10), dtype)
    kernel(x, np.empty_like(x))
    ir = kernel.inspect_llvm(kernel.signatures[0])
    divisions = [int(n) for n in re.findall(r"fdiv[^<\n]*<(\d+) x double>", ir)]
    assert divisions and max(divisions) >= host_lanes(np.float64)
