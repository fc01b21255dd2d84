"""The memory floors: the machine's multi-threaded bandwidth on the bytes an op must move.

NumPy's ``x.sum()`` and ``np.add`` run on one thread, and ``x.sum()`` is compute-bound besides
(pairwise summation: 18 GB/s here against 46 GB/s for a parallel read), so neither bounds what a
parallel kernel can reach.  Each floor is therefore taken several ways, Numba ``prange`` loops
over contiguous chunks beside the NumPy (and, where installed, PyTorch) call, and the fastest of
them on the machine at hand is the floor (:func:`fastest`).

The kernels compile on first use (``cache=True``), never at import.
"""

from __future__ import annotations

import numba
import numpy as np

CHUNK = 1 << 16   # elements per task: 256 kB of float32, many tasks per thread on large arrays


@numba.njit(parallel=True, cache=True, nogil=True)
def _parallel_copy(source, target):
    n = source.size
    for chunk in numba.prange((n + CHUNK - 1) // CHUNK):
        for i in range(chunk * CHUNK, min(n, (chunk + 1) * CHUNK)):
            target[i] = source[i]


@numba.njit(parallel=True, cache=True, nogil=True)
def _parallel_add(a, b, target):
    n = a.size
    for chunk in numba.prange((n + CHUNK - 1) // CHUNK):
        for i in range(chunk * CHUNK, min(n, (chunk + 1) * CHUNK)):
            target[i] = a[i] + b[i]


# fastmath lets the chunk's sum be reassociated into SIMD lanes, as a bandwidth test must; the
# chunks' sums are added in float64.
@numba.njit(parallel=True, cache=True, nogil=True, fastmath=True)
def _parallel_sum(values):
    n = values.size
    total = 0.0
    for chunk in numba.prange((n + CHUNK - 1) // CHUNK):
        part = values.dtype.type(0)
        for i in range(chunk * CHUNK, min(n, (chunk + 1) * CHUNK)):
            part += values[i]
        total += np.float64(part)
    return total


def _flat(array: np.ndarray) -> np.ndarray:
    """``array`` as a 1-d view; the floors run on the benchmarks' C-ordered arrays only."""
    if not array.flags.c_contiguous:
        raise ValueError("the floor kernels take C-contiguous arrays")
    return array.reshape(-1)


def parallel_copy(source: np.ndarray, target: np.ndarray) -> None:
    """``target[...] = source`` on every Numba thread."""
    _parallel_copy(_flat(source), _flat(target))


def parallel_add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a + b`` into a new array, on every Numba thread."""
    target = np.empty_like(a)
    _parallel_add(_flat(a), _flat(b), _flat(target))
    return target


def parallel_sum(values: np.ndarray) -> float:
    """The sum of ``values``, read once on every Numba thread."""
    return _parallel_sum(_flat(values))
