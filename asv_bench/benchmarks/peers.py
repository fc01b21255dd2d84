"""fastlsm beside plain NumPy, SciPy, PyTorch and JAX (CPU) on the same inputs.

The contender is a parameter, so one graph of the published report holds fastlsm and its peers
over time.  The peers are the op table's (:data:`fastlsm.bench.ops.OPS`, plain NumPy first), on
``fastlsm bench``'s default ops; a peer that is not installed, or has no version of an op (SciPy
has no fused cross-entropy gradient), is skipped.  The peers allocate their output; fastlsm
writes into a preallocated one, as in ``ops.Time``.
"""

import functools
import importlib

from fastlsm.bench.ops import DEFAULT_OPS, OPS, PEER_MODULES, for_op, peers_of

from . import common

CONTENDERS = ["fastlsm", *PEER_MODULES]


@functools.lru_cache(maxsize=1)
def _contender_call(contender, op, shape):
    """``contender``'s ``op`` on a float32 ``shape`` input, warm; NotImplementedError skips."""
    if contender == "fastlsm":
        return common.prepared(op, shape, "float32")
    call = peers_of(OPS[op]).get(contender)
    if call is None:
        raise NotImplementedError(f"{contender} has no {op}")
    try:
        importlib.import_module(PEER_MODULES[contender])
    except ImportError as error:
        raise NotImplementedError(f"{contender} is not installed") from error
    return common.Warm(call, for_op(OPS[op], common.inputs(shape, "float32")))


class Contenders:
    """Seconds per call, float32, on ``PEER_SHAPES``."""

    params = (CONTENDERS, list(DEFAULT_OPS), common.PEER_SHAPES)
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
