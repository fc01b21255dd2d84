"""The CPU's matrix products for linear_cross_entropy: BLAS's in-place gemm without the GIL, and
a chunk's classes cut into parts on threads of their own."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from fastlsm.backends.cpu import blas


def layouts(a: np.ndarray) -> list[np.ndarray]:
    """``a`` C-ordered, Fortran-ordered, as a strided slice of a wider array, and reversed
    along an axis of length 1 (a negative stride that steps nowhere: a 1-row chunk of
    ``x[::-1]``)."""
    wide = np.zeros((a.shape[0], a.shape[1] + 5), a.dtype)
    wide[:, 2:2 + a.shape[1]] = a
    reversed_ones = [a[::-1]] if a.shape[0] == 1 else []
    reversed_ones += [a[:, ::-1]] if a.shape[1] == 1 else []
    return [a, np.asfortranarray(a), wide[:, 2:2 + a.shape[1]], *reversed_ones]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m, k, n", [(7, 5, 9), (1, 4, 3), (6, 1, 1), (3, 0, 2)])
def test_adding_gemm_adds_the_product_in_place(dtype, m, k, n, rng):
    add_product = blas.adding_gemm(np.dtype(dtype))
    if add_product is None:
        pytest.skip("SciPy is not installed")
    a0 = rng.standard_normal((m, k)).astype(dtype)
    b0 = rng.standard_normal((k, n)).astype(dtype)
    c0 = rng.standard_normal((m, n)).astype(dtype)
    expected = c0.astype(np.float64) + a0.astype(np.float64) @ b0.astype(np.float64)
    for a in layouts(a0):
        for b in layouts(b0):
            for c in layouts(c0.copy()):
                if c.strides[1] != c.itemsize and n > 1:
                    continue  # c needs unit column stride
                c[...] = c0
                add_product(c, a, b)
                np.testing.assert_allclose(c, expected, rtol=1e-5 if dtype == np.float32 else 1e-12,
                                           atol=1e-5)


def test_adding_gemm_refuses_what_blas_cannot_read(rng):
    add_product = blas.adding_gemm(np.dtype(np.float64))
    if add_product is None:
        pytest.skip("SciPy is not installed")
    c = np.zeros((4, 3))
    with pytest.raises(ValueError, match="add_product takes float64"):
        add_product(c, np.ones((4, 2), np.float32), np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"\(4, 3\) \+= \(4, 2\) @ \(5, 3\)"):
        add_product(c, np.ones((4, 2)), np.ones((5, 3)))
    with pytest.raises(ValueError, match="BLAS can read, got strides"):
        add_product(c, np.ones((8, 4))[::2, ::2], np.ones((2, 3)))


@pytest.mark.parametrize("n_classes, parts", [(32000, 2), (100, 3), (11, 3), (2, 5), (0, 2)])
def test_class_parts_cover_the_classes_in_aligned_ranges(n_classes, parts):
    bounds = blas.ClassParts(n_classes, parts).bounds
    assert bounds[0][0] == 0 and bounds[-1][1] == n_classes
    assert all(stop == start for (_, stop), (start, _) in zip(bounds, bounds[1:]))
    assert all(start < stop for start, stop in bounds) or n_classes == 0
    assert len(bounds) == max(1, min(parts, n_classes))
    if n_classes >= len(bounds) * blas.CLASS_ALIGN:
        assert all(start % blas.CLASS_ALIGN == 0 for start, _ in bounds)


def test_class_parts_run_on_threads_with_one_blas_thread_and_restore_it():
    if blas.blas_threads() < 2:
        pytest.skip("BLAS runs on one thread here")
    before = blas.blas_threads()
    seen = {}
    lock = threading.Lock()

    def work(part, start, stop):
        with lock:
            seen[part] = (threading.current_thread() is not threading.main_thread(),
                          blas.blas_threads())
    with blas.ClassParts(1000, 2) as parts:
        parts.run(work)
    assert seen == {0: (True, 1), 1: (True, 1)}
    assert blas.blas_threads() == before


def test_class_parts_raise_a_part_s_error_and_restore_blas():
    before = blas.blas_threads()

    def work(part, start, stop):
        if part == 1:
            raise RuntimeError("part 1 failed")
    with pytest.raises(RuntimeError, match="part 1 failed"):
        with blas.ClassParts(1000, 2) as parts:
            parts.run(work)
    assert blas.blas_threads() == before


def test_overlapping_calls_restore_blas_threads():
    """Two calls whose parts overlap in time (as from two threads; interleaved here, on one
    thread), the first in leaving first: BLAS stays on one thread until the last one leaves,
    then is back to its thread count (each call restoring what it found would leave it at
    1)."""
    before = blas.blas_threads()
    if before < 2:
        pytest.skip("BLAS runs on one thread here")
    first, second = blas.ClassParts(1000, 2), blas.ClassParts(1000, 2)
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert blas.blas_threads() == 1
    second.__exit__(None, None, None)
    assert blas.blas_threads() == before
