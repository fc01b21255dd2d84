"""Class-chunked cross-entropy on a ``dask.distributed`` LocalCluster: fastlsm's Dask path and
plain ``dask.array``.

The calls are ``fastlsm bench --dask``'s (:mod:`fastlsm.bench.cluster`): float32 logits drawn and
persisted on two single-threaded worker processes, the class axis split in four chunks, the
``mean`` loss gathered and the gradient (with ``grad``) persisted on the workers.  fastlsm in one
process on a NumPy array is ``peers.Contenders``' and ``ops.Time``'s business.  Skipped where Dask
or ``distributed`` is not installed (``pip install -e ".[dask]"``).

Each benchmark process starts its own cluster once (memoised, as ``common.prepared`` is: asv
calls ``setup()`` before every sample), after asv's fork: the workers are spawned.
"""

import functools
import itertools

from fastlsm.bench import cluster as bench_cluster

from . import common

SHAPE = (256, 3200) if common.TINY else (4096, 32000)
CLASS_CHUNKS = 4
N_WORKERS = 2
CONTENDERS = list(bench_cluster.DASK_CONTENDERS)


def _require_dask() -> None:
    try:
        import dask.array  # noqa: F401
        import distributed  # noqa: F401
    except ImportError as error:
        raise NotImplementedError("dask.distributed is not installed") from error


@functools.lru_cache(maxsize=1)
def _cluster_inputs():
    """``(client, logits, targets)``: the process's cluster and inputs on it."""
    _require_dask()
    cluster, client = bench_cluster.start_cluster(N_WORKERS)
    logits, targets = bench_cluster.persisted_inputs(client, SHAPE, CLASS_CHUNKS, "float32")
    return client, logits, targets


@functools.lru_cache(maxsize=None)
def _warmed(contender: str, grad: bool) -> None:
    """One untimed call a process and benchmark: the workers load the kernels."""
    client, logits, targets = _cluster_inputs()
    bench_cluster.cluster_call(client, contender, logits, targets, grad, "asv-warm-up")()


_labels = itertools.count()   # every sample's graph reads the inputs under names of its own


class Cluster:
    """Seconds per ``mean`` cross-entropy (``grad``: with the gradient) on the cluster."""

    params = (CONTENDERS, [False, True])
    param_names = ("contender", "grad")
    timeout = 300
    rounds = 1
    repeat = (3, 5, 3.0)
    number = 1        # a fresh graph a sample: setup() builds it
    warmup_time = 0

    def setup(self, contender, grad):
        _warmed(contender, grad)
        client, logits, targets = _cluster_inputs()
        self.call = bench_cluster.cluster_call(client, contender, logits, targets, grad,
                                            f"asv-{next(_labels)}")

    def time_cross_entropy(self, contender, grad):
        self.call()


class Graph:
    """Tasks of the graph per input chunk (no cluster needed): 2 a chunk and a few a row chunk
    for fastlsm, many more for plain ``dask.array``."""

    params = (CONTENDERS, [False, True])
    param_names = ("contender", "grad")
    unit = "tasks per chunk"
    timeout = 60

    def setup(self, contender, grad):
        _require_dask()

    def track_tasks_per_chunk(self, contender, grad):
        import dask.array as da
        rows, classes = SHAPE
        logits = da.zeros(SHAPE, chunks=(rows // 2, classes // CLASS_CHUNKS), dtype="float32")
        targets = da.zeros(rows, chunks=rows // 2, dtype="int64")
        return bench_cluster.tasks_per_chunk(contender, logits, targets, grad)
