"""How the CPU kernels run: a thread-safe threading layer, serial and parallel twins of each
kernel, and which kernel of a bundle a call takes.

Importing this module imports Numba and asks it for a thread-safe threading layer where one
loads (before any parallel kernel has run, which is when Numba picks its layer).
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import threading
from dataclasses import dataclass
from types import FunctionType
from typing import NamedTuple

import numba
from numba import njit


def _loadable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


if "NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default":
    # Numba's default prefers tbb, then omp, then `workqueue`, which aborts the process when two
    # Python threads enter parallel code at once.  Ask for a thread-safe layer when one loads.
    if _loadable("numba.np.ufunc.tbbpool") or _loadable("numba.np.ufunc.omppool"):
        numba.config.THREADING_LAYER = "threadsafe"


class Kernel(NamedTuple):
    """One kernel compiled twice: with a parallel ``prange`` and as a plain loop."""
    parallel: object
    serial: object

    def __reduce__(self):
        # By reference, as pickle takes a function: a Dask task that names a kernel then carries
        # its module and name, not the dispatchers (~80 kB each).
        function = self.parallel.py_func
        return _imported, (function.__module__, function.__name__)


def _imported(module: str, name: str):
    return getattr(importlib.import_module(module), name)


def rowwise(py_func) -> Kernel:
    """Compile ``py_func`` (a loop over ``prange``) as a parallel and as a serial kernel."""
    # Numba's cache keys on the function's qualified name and bytecode, not on ``parallel``:
    # the serial twin gets a name of its own so the two never share a cache entry.
    serial_func = FunctionType(py_func.__code__, py_func.__globals__, py_func.__name__ + "_serial")
    serial_func.__qualname__ = py_func.__qualname__ + "_serial"
    # NumPy's error model: a float division by zero gives inf or nan as NumPy's would, where
    # Python's model tests every divisor to raise ZeroDivisionError, a branch that keeps a loop
    # with a division in it (the soft-cap's tanh) from vectorising.  Kernels never raise.
    options = dict(cache=True, nogil=True, error_model="numpy")
    return Kernel(
        parallel=njit(parallel=True, **options)(py_func),
        serial=njit(**options)(serial_func),
    )


@dataclass(frozen=True)
class RowKernels:
    """One operation's kernels, by the layout they read.

    ``rows`` takes ``(rows, classes)`` arrays with contiguous rows; ``short_rows`` (where there
    is one) the same for rows of at most :data:`SHORT_ROW_CLASSES` classes, a tile of rows at a
    time across SIMD lanes; ``columns`` (where there is one) a ``(batch, classes, width)`` view
    whose width axis is contiguous, in place.
    """
    rows: Kernel
    short_rows: Kernel | None = None
    columns: Kernel | None = None


# A row costs about as much as ROW_OVERHEAD extra elements (its log, its block bookkeeping and
# the scalar tail of each vector loop).  Below PARALLEL_MIN_WORK such units a serial kernel beats
# starting the thread team: measured crossover ~10-16k units for 10, 100 and 1000 classes.
ROW_OVERHEAD = 100
PARALLEL_MIN_WORK = 12_000
# Rows of at most this many classes go to a bundle's ``short_rows`` kernel where it has one.
# Measured, one thread, tile time over row time: float32 0.15-0.36 at 4-10 classes, 0.72-0.78 at
# 32, 1.3-1.7 at 48; float64 0.3-0.6 at 4-10, 0.85-1.26 from 16 to 32.
SHORT_ROW_CLASSES = 32
# ... and at least this many rows: a tile's scratch arrays cost more than a few rows.  Measured,
# one thread, 10 float32 classes: cross_entropy 0.71 / 0.98 / 1.96 us a call by rows at 1 / 4 / 16
# rows against 0.97 / 1.20 / 1.66 by tiles; log_softmax 0.35 / 0.46 / 0.93 against 0.59 / 0.73 /
# 0.72.
SHORT_ROW_MIN_ROWS = 8

_parallel_lock = threading.Lock()


def threading_layer() -> str:
    """The Numba threading layer in use, starting the thread pool if needed."""
    from numba.np.ufunc import parallel
    parallel._launch_threads()
    return numba.threading_layer()


@functools.cache
def _layer_is_threadsafe() -> bool:
    return threading_layer() != "workqueue"


def run(kernel: Kernel | RowKernels, *args) -> None:
    """Run ``kernel`` (for a bundle: its ``short_rows`` kernel for at least
    :data:`SHORT_ROW_MIN_ROWS` rows of at most :data:`SHORT_ROW_CLASSES` classes where it has
    one, else its ``rows`` kernel), serial or
    parallel by the size of its first argument, a ``(..., rows, classes)`` array."""
    shape = args[0].shape
    classes = shape[-1]
    rows = shape[0] if len(shape) == 2 else math.prod(shape[:-1])
    if type(kernel) is RowKernels:  # a test, not a call: this is every small call's path
        kernel = (kernel.short_rows if kernel.short_rows is not None
                  and classes <= SHORT_ROW_CLASSES and rows >= SHORT_ROW_MIN_ROWS
                  else kernel.rows)
    # numba.config.NUMBA_NUM_THREADS is the pool's size; numba.get_num_threads() (what
    # set_num_threads asked for) cost 0.6 us a call here, and the parallel kernel honours it.
    if rows < 2 or rows * (classes + ROW_OVERHEAD) < PARALLEL_MIN_WORK or (
            numba.config.NUMBA_NUM_THREADS == 1):
        kernel.serial(*args)
    elif _layer_is_threadsafe():
        kernel.parallel(*args)
    elif _parallel_lock.acquire(blocking=False):
        # workqueue: only one thread at a time may be inside parallel code; the others run serial.
        try:
            kernel.parallel(*args)
        finally:
            _parallel_lock.release()
    else:
        kernel.serial(*args)
