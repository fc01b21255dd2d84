"""Timing on the host, shared by ``fastlsm bench`` and the asv suite, and how times print."""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

MIN_SAMPLE_S = 2e-4          # tiny calls are timed in loops of at least this long
MAX_SAMPLES = 200


@dataclass
class Timing:
    median_s: float
    samples: int
    calls_per_sample: int


def per_call(call: Callable[[], Any], calls: int) -> float:
    """Mean seconds of ``calls`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls


def measure(call: Callable[[], Any], budget_s: float, repeat: int | None = None,
            min_samples: int = 1) -> Timing:
    """Median per-call time of an already warmed-up ``call``.

    One probe call sets the pace: calls shorter than ``MIN_SAMPLE_S`` are timed in loops; the
    number of samples fills ``budget_s`` (at least ``min_samples``, at most ``MAX_SAMPLES``)
    unless ``repeat`` fixes it.  The probe counts as a sample when calls are not looped.
    """
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        probe = per_call(call, 1)
        loop = max(1, math.ceil(MIN_SAMPLE_S / max(probe, 1e-9)))
        if repeat is not None:
            wanted = max(1, repeat)
        else:
            wanted = int(min(MAX_SAMPLES, max(min_samples, budget_s // (probe * loop))))
        samples = [probe] if loop == 1 else []
        while len(samples) < wanted:
            samples.append(per_call(call, loop))
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timing(float(np.median(samples)), len(samples), loop)


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
            took = per_call(self, 1)
        return max(1, math.ceil(sample_s / max(took, 1e-7)))


def floor_ratio(run: Warm, floor: Warm, budget_s: float, min_pairs: int = 3) -> float:
    """Median time of ``run`` over the median time of ``floor``, both warm.

    The two are timed in alternation, so that a slow spell of a shared machine falls on both.
    Pairs are taken until ``budget_s`` is spent (at least ``min_pairs``); each sample loops its
    call to about 2 ms so that the timer's resolution does not matter for tiny calls.
    """
    loops = [run.calls_per_sample(2e-3), floor.calls_per_sample(2e-3)]
    ours, floors = [], []
    deadline = time.perf_counter() + budget_s
    while len(ours) < min_pairs or time.perf_counter() < deadline:
        ours.append(per_call(run, loops[0]))
        floors.append(per_call(floor, loops[1]))
    return round(float(np.median(ours) / np.median(floors)), 4)


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def format_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"
