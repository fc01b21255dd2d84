"""``fastlsm bench --dask``: class-chunked cross-entropy on a ``dask.distributed`` cluster.

:func:`run` starts a ``LocalCluster`` of worker processes, draws float32 logits on it in blocks
that split the class axis (a vocabulary over several chunks), and times the ``mean``
cross-entropy, with and without its gradient, three ways:

* fastlsm's Dask path (:func:`fastlsm.cross_entropy` on Dask arrays): per-block partials, a merge a row chunk, a finish a
  block, all fastlsm kernels;
* ``dask.array`` written the plain way: ``x - lse`` from ``da.max``, ``da.exp``, ``da.log``, the
  target's log-probability picked with a one-hot mask, the gradient as ``softmax - one_hot``;
* fastlsm in this one process on the same values as a NumPy array (the workers idle).

The logits stay on the workers (persisted), and a gradient is persisted there, not gathered: the
times are the computation and its communication, not moving the input or the output through this
process.  Every time is the best of ``repeat`` calls, each on a graph of its own.  The report
also gives each graph's task count per input chunk and its layers.

The asv suite (``asv_bench/benchmarks/dask_cluster.py``) times the same calls with
:func:`start_cluster`, :func:`persisted_inputs` and :func:`cluster_call`.  Dask and
``distributed`` are optional (``pip install "fastlsm[dask]"``): only those functions import them.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Any, Callable

import numpy as np

import fastlsm
from fastlsm.bench.ops import SCALE

BLOCK_BYTES = 64 << 20   # rows per chunk are chosen so that a block holds about this much


def naive_cross_entropy(x, target, return_grad: bool):
    """The ``mean`` cross-entropy of Dask logits ``(N, C)`` as plain ``dask.array`` code."""
    import dask.array as da
    shifted = x - x.max(axis=1, keepdims=True)
    log_probs = shifted - da.log(da.exp(shifted).sum(axis=1, keepdims=True))
    classes = da.arange(x.shape[1], chunks=(x.chunks[1],))
    one_hot = classes[None, :] == target[:, None]
    loss = -da.where(one_hot, log_probs, 0.0).sum(axis=1).mean()
    if not return_grad:
        return loss
    return loss, (da.exp(log_probs) - one_hot) / x.shape[0]


def fastlsm_dask_cross_entropy(x, target, return_grad: bool):
    """The ``mean`` cross-entropy of Dask logits through fastlsm's Dask path."""
    return fastlsm.cross_entropy(x, target, return_grad=return_grad)


DASK_CONTENDERS = {"fastlsm Dask": fastlsm_dask_cross_entropy,
                   "naive dask.array": naive_cross_entropy}


def _as_tuple(result) -> tuple:
    return result if isinstance(result, tuple) else (result,)


def _same_block(block):
    return block


def _renamed(array, label: str):
    """``array`` under another name (an identity task a block, no copy)."""
    return array.map_blocks(_same_block, name=f"{array.name}-{label}", meta=array._meta)


def start_cluster(n_workers: int):
    """A ``(LocalCluster, Client)`` of ``n_workers`` single-threaded worker processes, Numba on
    one thread in each.

    The workers are spawned (distributed's default, made explicit): GNU OpenMP, Numba's threading
    layer here, kills a child forked after a parallel region.  The caller closes both.
    """
    import dask
    import distributed
    with dask.config.set({"distributed.worker.multiprocessing-method": "spawn"}):
        cluster = distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1,
                                           processes=True, dashboard_address=None,
                                           env={"NUMBA_NUM_THREADS": "1"})
    return cluster, distributed.Client(cluster)


def persisted_inputs(client, shape: tuple[int, int], class_chunks: int, dtype: str):
    """``(logits, targets)`` drawn on the cluster and persisted there: standard normal logits
    times ``SCALE`` in blocks of ``class_chunks`` chunks of classes and ~64 MiB, and random
    class indices chunked as the rows."""
    import dask.array as da
    n_rows, n_classes = shape
    block_classes = math.ceil(n_classes / class_chunks)
    block_rows = max(1, BLOCK_BYTES // (block_classes * np.dtype(dtype).itemsize))
    normal = da.random.default_rng(0).standard_normal(
        shape, chunks=(block_rows, block_classes), dtype=np.float32)
    logits = client.persist((normal * SCALE).astype(dtype))
    targets = client.persist(
        da.random.default_rng(1).integers(0, n_classes, n_rows, chunks=block_rows))
    return logits, targets


def cluster_call(client, contender: str, logits, targets, return_grad: bool,
                 label: str) -> Callable[[], Any]:
    """A call of ``DASK_CONTENDERS[contender]`` on the cluster, returning the loss.

    The loss and the gradient (if any) are computed in one graph; the gradient stays on the
    workers.  The graph reads the inputs under names of their own (``label`` must differ from
    call to call): the same keys would find an earlier call's results still in memory, and the
    loss's keys, the same with and without the gradient, fused into other tasks there, which
    the scheduler warns of.
    """
    import distributed
    results = list(_as_tuple(DASK_CONTENDERS[contender](
        _renamed(logits, label), _renamed(targets, label), return_grad)))

    def call():
        persisted = client.persist(results)
        distributed.wait(persisted)
        return persisted[0].compute()
    return call


def layer_sizes(results, inputs) -> dict[str, int]:
    """Tasks of each layer of the graphs of ``results`` (layers shared by them counted once),
    by name without the token, leaving out the layers of the (persisted) ``inputs``."""
    layers = {}
    for result in results:
        layers.update(result.__dask_graph__().layers)
    input_names = {array.name for array in inputs}
    sizes = Counter()
    for name, layer in layers.items():
        if name not in input_names:
            sizes[name.rsplit("-", 1)[0]] += len(layer)
    return dict(sizes)


def tasks_per_chunk(contender: str, logits, targets, return_grad: bool) -> float:
    """Tasks of a contender's graph (the inputs' own left out) per block of ``logits``."""
    results = _as_tuple(DASK_CONTENDERS[contender](logits, targets, return_grad))
    return sum(layer_sizes(results, (logits, targets)).values()) / logits.npartitions


def _best_time(calls: list[Callable[[], Any]]) -> tuple[float, Any]:
    """The shortest of the timed ``calls``, and the last one's result."""
    best = math.inf
    for call in calls:
        start = time.perf_counter()
        result = call()
        best = min(best, time.perf_counter() - start)
    return best, result


def run(shape: tuple[int, int] = (4096, 32000), class_chunks: int = 4, n_workers: int = 2,
        dtype: str = "float32", repeat: int = 3) -> str:
    """Time class-chunked cross-entropy on a LocalCluster; return the printable report.

    Parameters
    ----------
    shape : (int, int)
        Logits ``(rows, classes)``.  The default (0.5 GB of float32) takes ~30 s on a 2-core
        machine, cluster start-up included.
    class_chunks : int
        Chunks the class axis is split into; rows are chunked so that a block holds ~64 MiB.
    n_workers : int
        Worker processes, one thread each (and Numba on one thread in each).
    dtype : str
        Logits' dtype.
    repeat : int
        Timed calls of each contender; the best counts.

    Returns
    -------
    str
        The report: times, speed-ups and graph sizes.
    """
    import dask
    cluster, client = start_cluster(n_workers)
    with cluster, client:
        logits, targets = persisted_inputs(client, shape, class_chunks, dtype)
        x, target = dask.compute(logits, targets)   # here, for the one-process run
        times, losses = {}, {}
        for number, contender in enumerate(DASK_CONTENDERS):
            for grad in (False, True):
                calls = [cluster_call(client, contender, logits, targets, grad,
                                      f"{number}-{grad}-{k}") for k in range(repeat + 1)]
                calls[0]()  # untimed: the workers load the kernels
                times[contender, grad], losses[contender, grad] = _best_time(calls[1:])
        for grad in (False, True):
            times["fastlsm, one process", grad], value = _best_time(
                [lambda: fastlsm.cross_entropy(x, target, return_grad=grad)] * repeat)
            losses["fastlsm, one process", grad] = value[0] if grad else value
        return _report(shape, dtype, logits, targets, n_workers, times, losses)


def _report(shape, dtype, logits, targets, n_workers, times, losses) -> str:
    row_chunks, class_chunks = logits.numblocks
    lines = [
        f"fastlsm Dask benchmark: cross_entropy (mean), {dtype} {shape[0]} x {shape[1]} in "
        f"{row_chunks} x {class_chunks} blocks of {logits.chunks[0][0]} x {logits.chunks[1][0]} "
        f"(classes split in {class_chunks}), LocalCluster of {n_workers} worker processes x 1 "
        "thread; best of the timed calls",
        "",
        f"{'':24}{'loss':>10}{'loss + grad':>14}{'loss value':>16}",
    ]
    baseline = "fastlsm, one process"
    for name in (*DASK_CONTENDERS, baseline):
        lines.append(f"{name:24}{times[name, False]:>9.3f}s{times[name, True]:>13.3f}s"
                     f"{float(losses[name, False]):>16.7f}")
    for name in ("naive dask.array", baseline):
        ratios = [times[name, grad] / times["fastlsm Dask", grad] for grad in (False, True)]
        lines.append(f"fastlsm Dask speed-up over {name}: {ratios[0]:.2f}x loss, "
                     f"{ratios[1]:.2f}x loss + grad")
    lines.append("")
    lines.append(f"graph tasks per input chunk ({logits.npartitions} chunks; the persisted "
                 "logits' and targets' own tasks left out), and the layers:")
    for contender, build in DASK_CONTENDERS.items():
        for grad in (False, True):
            sizes = layer_sizes(_as_tuple(build(logits, targets, grad)), (logits, targets))
            tasks = sum(sizes.values())
            label = f"{contender}, {'loss + grad' if grad else 'loss'}"
            lines.append(f"  {label:30} {tasks / logits.npartitions:5.2f}  ({tasks} tasks)")
            lines.append("      " + ", ".join(f"{layer} {n}" for layer, n in sizes.items()))
    return "\n".join(lines)
