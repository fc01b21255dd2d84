"""What the benchmark modules share: shapes and inputs.  The ops (fastlsm's calls, their floors
and peers) are ``fastlsm bench``'s op table, :data:`fastlsm.bench.ops.OPS`.

No fastlsm kernel runs at import.  asv imports the benchmark modules once and forks every
benchmark process from that parent (``"launch_method": "forkserver"``); under GNU OpenMP a child
dies if the parent ever ran a parallel region.  What is safe is done here, once, to spare every
child: importing Numba (0.5 s) and compiling one trivial serial function, which sets up LLVM
(0.4 s; a child then loads fastlsm's cached kernels in tens of milliseconds).  Kernels are warmed
in each benchmark's ``setup()``.

``FASTLSM_ASV_TINY=1`` swaps every shape for a small one of the same kind and shortens the floor
ratios' sampling: the tests run the real suite and the regression gate that way, in seconds.
"""

from __future__ import annotations

import functools
import os
from dataclasses import replace

import numba
import numpy as np

from fastlsm.bench.ops import FLOORS, OPS, SCALE, Inputs, fastest_way, for_op
from fastlsm.bench.timing import Warm, floor_ratio as _floor_ratio

numba.njit(lambda: 0)()   # before the fork, see above: serial, no thread team starts

TINY = os.environ.get("FASTLSM_ASV_TINY", "") not in ("", "0")

# Shape families: many short rows, medium rows, LLM vocabularies (32k and Llama 3's 128,256),
# a few huge rows, and two small calls (one cache-resident block of work, 256x128, and one whose
# time is all per-call overhead, 32x10) that keep the front end's cost in view.
# Tiny, one shape a kernel path (parallel short rows, parallel rows, a long row, serial short
# rows): each benchmark is a process of its own, and CI's time goes on their count.
SHAPES = (["2000x10", "64x1000", "4x12825", "32x10"] if TINY else
          ["2000000x10", "131072x1000", "8192x32000", "1024x128256", "8x262144", "256x128",
           "32x10"])
# Vocabulary-sized logits come in float32 (or narrower); float64 copies of them would be the
# suite's largest inputs (2 GB) for a case nobody runs, so those benchmarks skip.
LLM_SHAPES = [] if TINY else SHAPES[2:4]
# The floor ratios' shapes: those larger than the caches (see ops.FloorRatio).
FLOOR_SHAPES = SHAPES[:2] if TINY else SHAPES[:4]
# The peers, peak memory and layouts use smaller stand-ins for the short-row and medium
# families: 40-64 MB, well past the last-level cache, so still a test of memory traffic, but
# where SciPy's logsumexp takes ~1 s a call instead of ~10 s (at 131072x1000) and a benchmark
# process does not spend its time faulting in gigabytes.
# Tiny, the peers run at 32x10 alone (peak memory and layouts keep MEDIUM): every peer process
# imports its library (PyTorch and JAX take seconds), and the tests' run of the suite checks
# that each benchmark runs, not shapes.
MEDIUM = "64x1000" if TINY else "16384x1000"
PEER_SHAPES = ["32x10"] if TINY else ["1048576x10", MEDIUM, "32x10"]
# Tiny, float32 only: the tests' run of the suite checks that each benchmark runs (CI's time).
DTYPES = ["float32"] if TINY else ["float32", "float64"]

_BLOCK = 65521  # prime, so that consecutive rows start at different points of the pattern


def parse_shape(text: str) -> tuple[int, int]:
    rows, cols = text.split("x")
    return int(rows), int(cols)


def filled(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Standard normal values times ``SCALE``, one random block tiled over the array.

    Drawing 262 million normals takes seconds and each benchmark process draws its own input;
    tiling a block costs one write of the array, and the values do not affect the kernels' speed.
    """
    block = (np.random.default_rng(0).standard_normal(_BLOCK) * SCALE).astype(dtype)
    x = np.empty(shape, dtype)
    flat = x.reshape(-1)
    whole = flat.size - flat.size % _BLOCK
    flat[:whole].reshape(-1, _BLOCK)[...] = block
    flat[whole:] = block[:flat.size - whole]
    return x


@functools.lru_cache(maxsize=1)
def inputs(shape: str, dtype: str) -> Inputs:
    """Logits, class targets and an output buffer; one set alive at a time."""
    x = filled(parse_shape(shape), dtype)
    return Inputs(x, targets(*x.shape), np.empty_like(x))


def targets(rows: int, classes: int) -> np.ndarray:
    """Random class indices, one a row."""
    return np.random.default_rng(1).integers(0, classes, size=rows)


@functools.lru_cache(maxsize=1)
def prepared(op_name: str, shape: str, dtype: str) -> Warm:
    """fastlsm's op on its input, warm.

    Memoised: asv calls ``setup()`` again before every timed call.  Raises NotImplementedError,
    which asv reports as a skip, for float64 on the LLM shapes.
    """
    if dtype == "float64" and shape in LLM_SHAPES:
        raise NotImplementedError("float64 LLM-vocabulary logits are left out (see LLM_SHAPES)")
    op = OPS[op_name]
    return Warm(op.call, for_op(op, inputs(shape, dtype)))


@functools.lru_cache(maxsize=1)
def prepared_floor(op_name: str, shape: str, dtype: str) -> Warm:
    """The op's memory floor on the same input as :func:`prepared`'s, warm: the fastest here of
    its ways that need no PyTorch (a Numba ``prange`` loop, NumPy), so that a tracked ratio does
    not move with whether, or which, PyTorch is installed (and no benchmark process imports it
    for its floor)."""
    op = OPS[op_name]
    floor = FLOORS[op.floor]
    ways = {name: call for name, call in floor.ways.items() if name != "torch"}
    inp = for_op(op, inputs(shape, dtype))
    return Warm(fastest_way(replace(floor, ways=ways), inp)[1], inp)


def floor_ratio(run: Warm, floor: Warm) -> float:
    """:func:`fastlsm.bench.timing.floor_ratio` with the suite's budget: short when ``TINY``."""
    return _floor_ratio(run, floor, budget_s=0.05 if TINY else 0.5)
