"""The matrix products of :func:`fastlsm.linear_cross_entropy` on the CPU: NumPy's BLAS, a chunk
of rows cut by classes into one part per BLAS thread.

OpenBLAS shares one product among its threads well for a whole head's logits, poorly for a
chunk of rows.  Measured, the three products of 4096x512 -> 32000 float32 (2 threads, buffers
reused): 1.38 s unchunked, 1.69 s in chunks of 1024 rows, 2.1 s in chunks of 512.  On one BLAS
thread a chunk costs what its share of the whole does (8192x256 -> 32000: 2.97 s unchunked,
2.98 s in chunks of 1024 rows, 3.1 s of 512).  So :class:`ClassParts` runs each part of a
chunk's products on a thread of its own, each a single-threaded BLAS call: the parts write
disjoint columns of the logits and disjoint rows of the weight's gradient, and only the input's
gradient is a sum over the parts.

NumPy's ``matmul`` releases the GIL; SciPy's ``gemm`` wrapper, the one that adds a product into
its output, does not (two threads took 71 ms for what one took 76 in).  :func:`adding_gemm`
calls the same BLAS routine through ``scipy.linalg.cython_blas``'s function pointer with
ctypes, which releases it.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

# Multiply-adds a chunk's product needs before it is cut by classes: below, a thread hand-off
# (tens of us) is not small against the product.
MIN_SPLIT_WORK = 1 << 24
# Parts start on a multiple of this many classes: a part's columns of a row start on a cache
# line of float32 (64 bytes).
CLASS_ALIGN = 16


@functools.cache
def _controller():
    """threadpoolctl's view of the BLAS libraries loaded (NumPy's and, once imported,
    SciPy's own OpenBLAS); None where threadpoolctl is not installed."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    _scipy_blas()  # loaded first, so that its BLAS is among the libraries controlled
    return ThreadpoolController()


def blas_threads() -> int:
    """How many threads BLAS would use for one product: the parts a large chunk is cut into.
    1 where threadpoolctl, which sets them, is not installed."""
    controller = _controller()
    if controller is None:
        return 1
    blas = controller.select(user_api="blas")
    return max([lib.num_threads for lib in blas.lib_controllers], default=1)


@functools.cache
def _scipy_blas():
    try:
        from scipy.linalg import cython_blas
    except ImportError:
        return None
    return cython_blas


def _routine(name: str):
    """The Fortran BLAS routine ``name`` of SciPy's ``cython_blas`` as a ctypes function."""
    capsule = _scipy_blas().__pyx_capi__[name]
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype = ctypes.c_char_p
    api.PyCapsule_GetName.argtypes = [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    address = api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))
    # gemm(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc): every argument a pointer
    return ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 13)(address)


@functools.cache
def _gemm(dtype: np.dtype):
    if _scipy_blas() is None:
        return None
    return _routine("sgemm" if dtype == np.float32 else "dgemm")


def _fortran_operand(a: np.ndarray) -> tuple[bytes, int]:
    """``(trans, ld)`` that give BLAS (column-major) the transpose of the 2-D row-major ``a``:
    ``a``'s memory is ``a.T`` with unit column stride, or ``a`` itself, then transposed."""
    item = a.itemsize
    if a.shape[1] == 1 or a.strides[1] == item:
        return b"N", max(a.strides[0] // item, a.shape[1], 1)
    return b"T", max(a.strides[1] // item, a.shape[0], 1)


def _is_blas_operand(a: np.ndarray) -> bool:
    item = a.itemsize
    return (a.strides[1] == item or a.shape[1] == 1 or a.strides[0] == item
            or a.shape[0] == 1) and all(s % item == 0 and (s >= 0 or n == 1)  # a 1-row chunk of
                                        for s, n in zip(a.strides, a.shape))  # x[::-1], say


def adding_gemm(dtype: np.dtype) -> Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None:
    """``add_product(c, a, b)``: ``c += a @ b`` in place, in BLAS without the GIL, for
    float32 or float64 ``c`` (2-D, unit column stride) and ``a``, ``b`` of its dtype laid out
    as BLAS takes them (either axis of unit stride); None where SciPy is not installed."""
    gemm = _gemm(np.dtype(dtype))
    if gemm is None:
        return None
    real = ctypes.c_float if dtype == np.float32 else ctypes.c_double

    def add_product(c: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
        m, n = c.shape
        k = a.shape[1]
        if not (c.dtype == a.dtype == b.dtype == dtype and a.shape == (m, k)
                and b.shape == (k, n)):
            raise ValueError(f"add_product takes {np.dtype(dtype)} operands BLAS can read, got "
                             f"{c.shape} += {a.shape} @ {b.shape}")
        if m == 0 or n == 0 or k == 0:
            return
        if not ((c.strides[1] == c.itemsize or n == 1) and _is_blas_operand(c)
                and _is_blas_operand(a) and _is_blas_operand(b)):
            raise ValueError(f"add_product takes {np.dtype(dtype)} operands BLAS can read, got "
                             f"strides {c.strides} += {a.strides} @ {b.strides}")
        # Row-major c = a @ b is column-major c.T = b.T @ a.T.
        trans_b, ld_b = _fortran_operand(b)
        trans_a, ld_a = _fortran_operand(a)
        ld_c = max(c.strides[0] // c.itemsize, n, 1)
        ints = [ctypes.c_int(v) for v in (n, m, k, ld_b, ld_a, ld_c)]
        one = real(1.0)
        ref = ctypes.byref
        gemm(ctypes.c_char_p(trans_b), ctypes.c_char_p(trans_a), ref(ints[0]), ref(ints[1]),
             ref(ints[2]), ref(one), ctypes.c_void_p(b.ctypes.data), ref(ints[3]),
             ctypes.c_void_p(a.ctypes.data), ref(ints[4]), ref(one),
             ctypes.c_void_p(c.ctypes.data), ref(ints[5]))
    return add_product


class _OneBlasThread:
    """BLAS held to one thread while any call has parts running: the first to enter lowers it,
    the last to leave restores what it was.  (A limit each call set and restored on its own
    would, with two calls overlapping in time, restore the other's 1 for good.)

    Seen with this machine's OpenBLAS (0.3.30 and 0.3.31): once the main thread has set the
    thread count, a count set from another thread does not take effect.  A call made from a
    worker thread (a Dask task, say) may then run its parts on BLAS's own threads too: slower,
    the same results."""

    def __init__(self):
        self._lock = threading.Lock()
        self._holders = 0
        self._limits = None

    def __enter__(self) -> None:
        with self._lock:
            if self._holders == 0:
                controller = _controller()
                self._limits = (None if controller is None
                                else controller.limit(limits=1, user_api="blas"))
            self._holders += 1

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0 and self._limits is not None:
                self._limits.restore_original_limits()
                self._limits = None


_ONE_BLAS_THREAD = _OneBlasThread()


class ClassParts:
    """A chunk's classes cut into ``parts`` contiguous ranges, each run on a thread of its own
    with BLAS on one thread (for the ``with`` block); one part runs inline, BLAS untouched.

    ``bounds`` are the ranges' ``(start, stop)``; :meth:`run` calls ``work(part, start, stop)``
    for each range and returns once every part is done (raising the first error).
    """

    def __init__(self, n_classes: int, parts: int):
        parts = max(1, min(parts, n_classes))
        align = CLASS_ALIGN if n_classes >= parts * CLASS_ALIGN else 1
        cuts = [n_classes * k // parts // align * align for k in range(parts)]
        self.bounds = list(zip(cuts, cuts[1:] + [n_classes]))
        self._pool = None

    def __len__(self) -> int:
        return len(self.bounds)

    def __enter__(self) -> ClassParts:
        if len(self) > 1:
            _ONE_BLAS_THREAD.__enter__()
            self._pool = ThreadPoolExecutor(len(self), thread_name_prefix="fastlsm-blas")
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
            _ONE_BLAS_THREAD.__exit__()

    def run(self, work: Callable[[int, int, int], None]) -> None:
        if self._pool is None:
            for part, (start, stop) in enumerate(self.bounds):
                work(part, start, stop)
            return
        futures = [self._pool.submit(work, part, start, stop)
                   for part, (start, stop) in enumerate(self.bounds)]
        for future in futures:
            future.result()
