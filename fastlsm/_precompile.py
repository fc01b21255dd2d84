"""Filling Numba's on-disk cache ahead of time: what ``fastlsm compile`` runs.

fastlsm's CPU kernels compile on their first use (per dtype, serial or parallel, rows, short rows
or columns) and Numba caches them on disk.  A container image or a CI cache that runs this once
spares every later process the compiles: each of its first calls then loads a cached kernel.
Numba keys its cache on the CPU (name and features) as well as the source, so the cache must be
filled on the kind of machine that uses it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

import fastlsm

# (array shape, class axis, view): inputs that reach each CPU kernel path, serial (under
# runtime.PARALLEL_MIN_WORK) and parallel: short rows, rows, classes down the columns, and rows
# whose classes are strided (copied by a transposing kernel first, as PyTorch's (N, C, d) is;
# Numba compiles it per memory layout: Fortran-ordered, and any other strides).
LAYOUTS = {
    "short rows": [((8, 10), -1, None), ((4096, 10), -1, None)],
    "rows": [((4, 1000), -1, None), ((64, 1000), -1, None)],
    "columns": [((10, 16), 0, None), ((10, 4096), 0, None)],
    "strided": [((10, 8), -1, "transposed"), ((100, 4096), -1, "transposed"),
                ((8, 20), -1, "every other class"), ((4096, 200), -1, "every other class")],
}


def _view(a: np.ndarray, view: str | None) -> np.ndarray:
    if view == "transposed":
        return a.T
    return a[:, ::2] if view == "every other class" else a


def _calls(x: np.ndarray, axis: int) -> list[Callable[[], object]]:
    """Every public CPU operation on ``x`` (classes along ``axis``), with the options that run
    kernels of their own: class-index and probability targets, gradients, the soft cap."""
    n_rows, n_classes = (x.shape[1], x.shape[0]) if axis == 0 else x.shape
    target = np.arange(n_rows, dtype=np.int64) % n_classes
    probabilities = fastlsm.softmax(x, axis=axis)
    y = fastlsm.log_softmax(x, axis=axis)
    return [
        lambda: fastlsm.logsumexp(x, axis=axis),
        lambda: fastlsm.log_softmax_backward(x, y, axis=axis),
        lambda: fastlsm.softmax_backward(x, probabilities, axis=axis),
        lambda: fastlsm.cross_entropy(x, target, axis=axis, return_grad=True),
        lambda: fastlsm.cross_entropy(x, target, axis=axis),
        lambda: fastlsm.cross_entropy(x, probabilities, axis=axis, return_grad=True),
        lambda: fastlsm.cross_entropy(x, probabilities, axis=axis),
        lambda: fastlsm.cross_entropy(x, target, axis=axis, softcap=30.0, return_grad=True),
        lambda: fastlsm.cross_entropy(x, probabilities, axis=axis, softcap=30.0),
        lambda: fastlsm.nll_loss(y, target, axis=axis, return_grad=True),
        lambda: fastlsm.nll_loss(y, target, axis=axis),
    ]


def fill_cache(dtypes: Sequence[str | np.dtype] = ("float32", "float64"),
               progress: Callable[[str], None] | None = None) -> dict[str, float]:
    """Run every public operation once on inputs that reach each CPU kernel, in each of
    ``dtypes``, so that Numba compiles (or loads) and caches them all.

    Returns seconds taken per ``"dtype layout"``, in order; ``progress`` gets one line each.
    """
    seconds = {}
    rng = np.random.default_rng(0)
    for dtype in map(np.dtype, dtypes):
        for layout, cases in LAYOUTS.items():
            start = time.perf_counter()
            for shape, axis, view in cases:
                x = _view(rng.standard_normal(shape).astype(dtype), view)
                for call in _calls(x, axis):
                    call()
            name = f"{dtype.name} {layout}"
            seconds[name] = time.perf_counter() - start
            if progress is not None:
                progress(f"{name:<20} {seconds[name]:7.2f} s")
    return seconds
