"""linear_cross_entropy (loss and all gradients, float32): its time, its time over the three
matmuls alone (``X @ W.T``, ``dZ @ W``, ``dZ.T @ X``: what any implementation must do, timed in
alternation with it), and its peak memory beyond the gradients it returns as a share of the
logits it never materialises.

The cases are ``fastlsm bench --ops linear_cross_entropy``'s (``ROWSxFEATURESxCLASSES``).
"""

import functools

from fastlsm.bench.linear import (DEFAULT_SHAPES, extra_peak_bytes, loss_and_gradients,
                                  make_inputs, matmuls)
from fastlsm.bench.timing import shape_str

from . import common

SHAPES = ["256x64x1000"] if common.TINY else [shape_str(s) for s in DEFAULT_SHAPES]


@functools.lru_cache(maxsize=1)
def _inputs(shape: str):
    return make_inputs(tuple(int(n) for n in shape.split("x")), "float32")


class LinearLoss:
    params = (SHAPES,)
    param_names = ("shape",)
    timeout = 300
    rounds = 1

    def setup(self, shape):
        inputs = _inputs(shape)
        self.run = common.Warm(loss_and_gradients, inputs)
        self.number = self.run.calls_per_sample(0.01)

    def time_call(self, shape):
        self.run()

    def track_matmul_ratio(self, shape):
        return common.floor_ratio(self.run, common.Warm(matmuls, _inputs(shape)))
    track_matmul_ratio.unit = "x matmuls"

    def track_extra_memory(self, shape):
        rows, _, classes = map(int, shape.split("x"))
        return round(extra_peak_bytes(_inputs(shape)) / (rows * classes * 4), 4)
    track_extra_memory.unit = "x logits"
