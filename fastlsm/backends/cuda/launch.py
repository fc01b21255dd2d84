"""How the CUDA backend launches its kernels: block sizes from the occupancy count, a warp or a
block per row, and when a row is split into segments.
"""

from __future__ import annotations

import functools
import math
import warnings

from fastlsm.backends.cuda.arrays import cuda
from fastlsm.backends.cuda.kernels.primitives import VALUES, WARP

SMALL_GRID = 128  # numba-cuda warns of low occupancy for grids of fewer blocks
# Matched by its text: numba-cuda raises its own NumbaPerformanceWarning class
# (numba.cuda.core.errors), not numba's, and which one depends on the version.
LOW_OCCUPANCY_WARNING = r"Grid size \d+ will likely result in GPU under-utilization"


def launch(kernel, blocks, threads, *args) -> None:
    """``kernel[blocks, threads](*args)``.  A grid under :data:`SMALL_GRID` blocks is either the
    input's size or a one-block reduction kept so for determinism, not a mistake of the caller,
    so numba-cuda's low-occupancy warning is silenced for it."""
    grid = math.prod(blocks) if isinstance(blocks, tuple) else blocks
    if grid >= SMALL_GRID:
        kernel[blocks, threads](*args)
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=LOW_OCCUPANCY_WARNING)
        kernel[blocks, threads](*args)


MIN_BLOCK = 64
MAX_BLOCK = 1024  # at most this many threads share a row
# A block of a long row loads, reduces, then writes, and only another block on the same
# multiprocessor keeps memory busy while it reduces.  So a block is at most as large as lets two of
# them share one (each then streams more of its row, from L2), unless that leaves the
# multiprocessor fewer threads than one larger block: threads are what keep loads in flight.
# Measured on an H100 (float32, VALUES 16): log_softmax (64 registers) took 1.31 / 9.71 / 5.36 ms
# at 8192x32000 / 16384x131072 / 4096x262144 in blocks of 448 threads, two a multiprocessor, and
# 2.01 / 10.15 / 5.28 ms in one block of 1024; the fused loss and gradient (95 registers: one
# block of 672, or two of 320) 2.18 / 13.0 / 6.78 ms in blocks of 672 and 2.23 / 14.6 / 8.23 in
# blocks of 448, one a multiprocessor.  The rule gives log_softmax two blocks of 512 and the loss
# one of 672; neither was timed exactly so.
BLOCKS_PER_MULTIPROCESSOR = 2
ROWS_PER_BLOCK = 8  # warps (rows) in a block of the warp-per-row kernels


@functools.cache
def max_threads(kernel, signature) -> int:
    """The largest block of ``kernel`` (whole warps) of which :data:`BLOCKS_PER_MULTIPROCESSOR`
    fit on a multiprocessor, by the driver's occupancy count (registers, shared memory), unless
    the largest block that fits alone leaves the multiprocessor more threads."""
    compiled = kernel.compile(signature)
    warp = WARP
    multiprocessors = _multiprocessors()

    def resident(threads: int) -> int:
        return compiled.max_cooperative_grid_blocks(threads) // multiprocessors * threads

    alone = compiled.max_threads_per_block // warp * warp
    wanted = BLOCKS_PER_MULTIPROCESSOR * multiprocessors
    for threads in range(alone, 0, -warp):
        if compiled.max_cooperative_grid_blocks(threads) >= wanted:
            return threads if resident(threads) >= resident(alone) else alone
    return alone


def block_threads(kernel, args: tuple, n_classes: int) -> int:
    """Threads of a block that takes ``n_classes`` of a row: ``ceil(n_classes / VALUES)``,
    within :data:`MIN_BLOCK` to :data:`MAX_BLOCK` and :func:`max_threads`."""
    threads = min(MAX_BLOCK, max(MIN_BLOCK, -(-n_classes // (VALUES * WARP)) * WARP))
    typeof = getattr(kernel, "typeof_pyval", None)
    if typeof is not None:  # the simulator has no registers to run out of
        threads = min(threads, max_threads(kernel, tuple(typeof(a) for a in args)))
    return threads


def launch_rows(kernel, n_rows: int, n_classes: int, *args) -> None:
    """Run a bundle's ``rows`` kernel: a warp per row for rows that fit the warp's registers,
    else a block per row (:func:`block_threads`)."""
    if n_rows == 0:
        return
    warp_rows = n_classes <= WARP * VALUES
    args = (*args, warp_rows)
    if warp_rows:
        launch(kernel, -(-n_rows // ROWS_PER_BLOCK), ROWS_PER_BLOCK * WARP, *args)
        return
    launch(kernel, n_rows, block_threads(kernel, args, n_classes), *args)


# A row is split across blocks when the rows are too few for a block each to keep the GPU busy
# and longer than a block's registers hold (a shorter one takes its block a few microseconds:
# a second launch would cost more).  Not yet timed on a GPU: the thresholds follow from the launch
# shapes alone.  Up to half as many rows as multiprocessors, each row gets enough segments for
# two blocks a multiprocessor, and a segment at least MIN_SEGMENT classes (two warps' worth of
# registers).
MIN_SEGMENT = 2048


@functools.cache
def _multiprocessors() -> int:
    # The simulator's device has no multiprocessor count; it runs one block at a time.
    return getattr(cuda().get_current_device(), "MULTIPROCESSOR_COUNT", 1)


def segments(n_rows: int, n_classes: int) -> int:
    """How many blocks share each row (1: a row is not split)."""
    multiprocessors = _multiprocessors()
    if n_rows == 0 or 2 * n_rows > multiprocessors or n_classes <= VALUES * MAX_BLOCK:
        return 1
    return max(1, min(-(-2 * multiprocessors // n_rows), n_classes // MIN_SEGMENT))


def launch_segments(kernel, n_classes: int, n_segments: int, *args) -> None:
    """Run a bundle's ``segment_stats`` or ``segments`` kernel: a block per segment of every row
    (the rows are the first argument's)."""
    length = -(-n_classes // n_segments)
    launch(kernel, args[0].shape[0] * n_segments, block_threads(kernel, args, length), *args)


def reduction_threads(n: int) -> int:
    """The one block of a reduction over ``n`` rows: its size depends on ``n`` alone, so a
    shape always sums in the same order."""
    return min(MAX_BLOCK, max(WARP, -(-n // WARP) * WARP))
