"""fastlsm beside plain NumPy, SciPy and PyTorch (CPU) on the same inputs.

The contender is a parameter, so one graph of the published report holds fastlsm and its peers
over time.  The peers are ``fastlsm bench``'s (:data:`fastlsm.bench.OPS`); a peer that is not
installed, or has no version of an op (SciPy has no fused cross-entropy gradient, none has the
backward ops or nll_loss), is skipped.  The peers allocate their output; fastlsm writes into a
preallocated one, as in ``ops.Time``.
"""

import functools
import importlib

from fastlsm.bench import OPS as BENCH_OPS
from fastlsm.bench import PEER_MODULES

from . import common

CONTENDERS = ["fastlsm", *PEER_MODULES]


@functools.lru_cache(maxsize=1)
def _contender_call(contender, op, shape):
    """``contender``'s ``op`` on a float32 ``shape`` input, warm; NotImplementedError skips."""
    if contender == "fastlsm":
        return common.prepared(op, shape, "float32")[0]
    call = BENCH_OPS[op].peers.get(contender) if op in BENCH_OPS else None
    if call is None:
        raise NotImplementedError(f"{contender} has no {op}")
    try:
        importlib.import_module(PEER_MODULES[contender])
    except ImportError as error:
        raise NotImplementedError(f"{contender} is not installed") from error
    return common.Warm(call, common.inputs(shape, "float32"))


class Contenders:
    """Seconds per call, float32, on ``PEER_SHAPES``."""

    params = (CONTENDERS, list(BENCH_OPS), common.PEER_SHAPES)
    param_names = ("contender", "op", "shape")
    timeout = 300
    rounds = 1
    repeat = (2, 5, 3.0)
    warmup_time = 0   # setup() has run every call once

    def setup(self, contender, op, shape):
        self.run = _contender_call(contender, op, shape)
        self.number = self.run.calls_per_sample(0.01)

    def time_contender(self, contender, op, shape):
        self.run()


class PeakMem:
    """The process's peak resident memory for one call on a medium float32 input.

    Counts everything the process holds: the interpreter, the imported libraries (Numba's
    compiler for fastlsm, PyTorch for its peer), the input and preallocated output, and whatever
    the call allocates on top.
    """

    params = (CONTENDERS, list(common.OPS))
    param_names = ("contender", "op")
    timeout = 300

    def setup(self, contender, op):
        self.run = _contender_call(contender, op, common.MEDIUM)

    def peakmem_op(self, contender, op):
        self.run()
