"""What the benchmark modules share: shapes, inputs, fastlsm's calls and the memory floors.

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
import math
import os
import time
from typing import Any, Callable

import numba
import numpy as np

import fastlsm
from fastlsm.bench import FLOORS, SCALE, Inputs

numba.njit(lambda: 0)()   # before the fork, see above: serial, no thread team starts

TINY = os.environ.get("FASTLSM_ASV_TINY", "") not in ("", "0")

# Shape families: many short rows, medium rows, LLM vocabularies (32k and Llama 3's 128,256),
# a few huge rows, and two small calls (one cache-resident block of work, 256x128, and one whose
# time is all per-call overhead, 32x10) that keep the front end's cost in view.
SHAPES = (["2000x10", "64x1000", "16x3200", "4x12825", "2x26214", "256x128", "32x10"] if TINY else
          ["2000000x10", "131072x1000", "8192x32000", "1024x128256", "8x262144", "256x128",
           "32x10"])
# Vocabulary-sized logits come in float32 (or narrower); float64 copies of them would be the
# suite's largest inputs (2 GB) for a case nobody runs, so those benchmarks skip.
LLM_SHAPES = SHAPES[2:4]
# The peers, peak memory and layouts use smaller stand-ins for the short-row and medium
# families: 40-64 MB, well past the last-level cache, so still a test of memory traffic, but
# where SciPy's logsumexp takes ~1 s a call instead of ~10 s (at 131072x1000) and a benchmark
# process does not spend its time faulting in gigabytes.
PEER_SHAPES = (["2000x10", "64x1000", "32x10"] if TINY else
               ["1048576x10", "16384x1000", "32x10"])
MEDIUM = PEER_SHAPES[1]
DTYPES = ["float32", "float64"]

# fastlsm's public operations.  Each call takes an Inputs whose ``out`` is preallocated (as the
# copy floor's is); for the backward ops ``out`` holds the forward output and ``x`` stands in for
# the incoming gradient.  The second item names the floor the op is measured against.
OPS: dict[str, tuple[Callable[[Inputs], Any], str]] = {
    "log_softmax": (lambda i: fastlsm.log_softmax(i.x, out=i.out), "copy"),
    "softmax": (lambda i: fastlsm.softmax(i.x, out=i.out), "copy"),
    "logsumexp": (lambda i: fastlsm.logsumexp(i.x), "read"),
    "log_softmax_backward": (lambda i: fastlsm.log_softmax_backward(i.x, i.out), "add"),
    "softmax_backward": (lambda i: fastlsm.softmax_backward(i.x, i.out), "add"),
    "cross_entropy": (lambda i: fastlsm.cross_entropy(i.x, i.target), "read"),
    "cross_entropy_grad": (lambda i: fastlsm.cross_entropy(i.x, i.target, grad_out=i.out),
                           "copy"),
    "nll_loss": (lambda i: fastlsm.nll_loss(i.x, i.target), "gather"),
}

# The floor of each op: the least memory traffic any implementation needs.  "copy" and "read" are
# fastlsm bench's; "add" reads two arrays and writes a new one, as the backward ops do; "gather"
# reads one element a row, as nll_loss does.
FLOOR_CALLS: dict[str, Callable[[Inputs], Any]] = {
    "copy": FLOORS["copy"][1],
    "read": FLOORS["read"][1],
    "add": lambda i: np.add(i.x, i.out),
    "gather": lambda i: np.take_along_axis(i.x, i.target[:, None], axis=1).sum(),
}

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


class Warm:
    """``call(inp)`` as a call without arguments, run once on creation.

    That first call compiles (or loads from Numba's cache) the kernels this input takes, so that
    no timed call does; ``first_s`` is how long it took.
    """

    def __init__(self, call: Callable[[Any], Any], inp: Any):
        self.call, self.inp = call, inp
        start = time.perf_counter()
        call(inp)
        self.first_s = time.perf_counter() - start

    def __call__(self) -> Any:
        return self.call(self.inp)

    def calls_per_sample(self, sample_s: float) -> int:
        """How many calls make a sample of about ``sample_s``.

        A first call that took that long already settles it (one call): inputs of gigabytes are
        not run once more just to be measured.
        """
        took = self.first_s
        if took < sample_s:
            start = time.perf_counter()
            self()
            took = time.perf_counter() - start
        return max(1, math.ceil(sample_s / max(took, 1e-7)))


@functools.lru_cache(maxsize=1)
def prepared(op: str, shape: str, dtype: str) -> tuple[Warm, Warm]:
    """fastlsm's ``op`` and its floor on the same input, both warm.

    Memoised: asv calls ``setup()`` again before every timed call.  Raises NotImplementedError,
    which asv reports as a skip, for float64 on the LLM shapes.
    """
    if dtype == "float64" and shape in LLM_SHAPES:
        raise NotImplementedError("float64 LLM-vocabulary logits are left out (see LLM_SHAPES)")
    call, floor = OPS[op]
    inp = inputs(shape, dtype)
    if op.endswith("_backward"):
        forward = fastlsm.log_softmax if op.startswith("log_") else fastlsm.softmax
        forward(inp.x, out=inp.out)
    return Warm(call, inp), Warm(FLOOR_CALLS[floor], inp)


def _per_call(run: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - start) / calls


def floor_ratio(run: Warm, floor: Warm, budget_s: float = 0.05 if TINY else 0.5,
                min_pairs: int = 3) -> float:
    """Median time of ``run`` over the median time of ``floor``, both warm.

    The two are timed in alternation, so that a slow spell of a shared machine falls on both.
    Pairs are taken until ``budget_s`` is spent (at least ``min_pairs``); each sample loops its
    call to about 2 ms so that the timer's resolution does not matter for tiny calls.
    """
    loops = [run.calls_per_sample(2e-3), floor.calls_per_sample(2e-3)]
    ours, floors = [], []
    deadline = time.perf_counter() + budget_s
    while len(ours) < min_pairs or time.perf_counter() < deadline:
        ours.append(_per_call(run, loops[0]))
        floors.append(_per_call(floor, loops[1]))
    return round(float(np.median(ours) / np.median(floors)), 4)
