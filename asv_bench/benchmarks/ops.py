"""fastlsm's public operations: time, time as a multiple of the memory floor, and layouts.

Every benchmark takes the operation as its first parameter (see ``common.OPS``), so that ``asv run
-b "log_softmax'"`` selects one operation across shapes and dtypes, and ``setup()`` warms only the
kernels that benchmark runs.
"""

import functools

import fastlsm

from . import common


class Time:
    """Seconds per call, fastlsm writing into a preallocated output where the API allows it."""

    params = (list(common.OPS), common.SHAPES, common.DTYPES)
    param_names = ("op", "shape", "dtype")
    timeout = 300
    # Each process builds its own input (up to 2 GB): a few samples a round, two rounds.
    rounds = 2
    repeat = (3, 5, 3.0)
    warmup_time = 0   # setup() has run every call once

    def setup(self, op, shape, dtype):
        self.run = common.prepared(op, shape, dtype)
        # asv calls setup() before every timed call and times each call alone unless `number`
        # says how many make a sample: a 5 us call needs a few thousand.
        self.number = self.run.calls_per_sample(0.01)

    def time_op(self, op, shape, dtype):
        self.run()


class FloorRatio:
    """fastlsm's time over the memory floor's: a multi-threaded copy, or read, of the same bytes
    (the fastest of :data:`fastlsm.bench.ops.FLOORS`' ways here).

    Both are timed in the same process in alternation, so the ratio holds still on a shared or
    noisy machine where times move by 1.5x: the regression gate watches these.  float32 only,
    to keep the suite's running time in bounds, and the four shapes larger than the caches: on
    8x262144 and 32x10 the floor is a copy of microseconds and the ratio measures call overhead,
    which swings with the machine (``Time`` covers those, with asv's statistics).
    """

    params = (list(common.OPS), common.FLOOR_SHAPES)
    param_names = ("op", "shape")
    unit = "x floor"
    timeout = 300
    rounds = 1

    def setup(self, op, shape):
        self.run = common.prepared(op, shape, "float32")
        self.floor = common.prepared_floor(op, shape, "float32")

    def track_op(self, op, shape):
        return common.floor_ratio(self.run, self.floor)


class Layout:
    """Inputs that are not C-ordered rows along the last axis (fastlsm allocates the output)."""

    params = (["log_softmax", "softmax", "logsumexp", "cross_entropy"],
              ["padded_rows", "strided_cols", "axis0"])
    param_names = ("op", "layout")
    timeout = 300
    rounds = 1
    repeat = (3, 5, 3.0)
    warmup_time = 0

    def setup(self, op, layout):
        self.run = _layout_call(op, layout)
        self.number = self.run.calls_per_sample(0.01)

    def time_op(self, op, layout):
        self.run()


@functools.lru_cache(maxsize=1)
def _layout_call(op, layout):
    """``op`` on a medium float32 matrix laid out as ``layout`` says, warm."""
    rows, cols = common.parse_shape(common.MEDIUM)
    axis = -1
    if layout == "padded_rows":       # a vocabulary padded to a multiple of 64
        x = common.filled((rows, cols + 64), "float32")[:, :cols]
    elif layout == "strided_cols":    # every other column
        x = common.filled((rows, 2 * cols), "float32")[:, ::2]
    else:                             # axis0: the classes run down the columns
        x, axis = common.filled((cols, rows), "float32"), 0
    if op == "cross_entropy":
        target = common.targets(rows, cols)
        return common.Warm(lambda x: fastlsm.cross_entropy(x, target, axis=axis), x)
    function = getattr(fastlsm, op)
    return common.Warm(lambda x: function(x, axis=axis), x)
