"""``fastlsm bench --ops linear_cross_entropy``: the loss of a linear head with its three
gradients, beside the three matmuls alone (what any implementation must do, the floor here),
the same matmuls around fastlsm's fused loss on materialised logits, and PyTorch's
``F.linear_cross_entropy`` chunked and materialised, each with its backward.

A case is ``ROWSxFEATURESxCLASSES``.  fastlsm's extra memory is measured with ``tracemalloc``
(NumPy reports its allocations to it): the call's peak beyond the gradients it returns, as a
share of the logits it never materialises.
"""

from __future__ import annotations

import tracemalloc
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

import fastlsm
from fastlsm.bench.cpu import set_threads
from fastlsm.bench.timing import format_time, measure, shape_str

# The cases: a 32000-class head on 4096 rows of 512 features (speed) and on 8192 rows of
# 256 features (memory: the float32 logits would take 1 GB).
DEFAULT_SHAPES = ((4096, 512, 32000), (8192, 256, 32000))
FLOOR = "numpy matmuls"


@dataclass(frozen=True)
class Inputs:
    x: np.ndarray       # (N, H)
    w: np.ndarray       # (C, H)
    target: np.ndarray  # (N,) int64


def make_inputs(shape: tuple[int, int, int], dtype: Any, seed: int = 0) -> Inputs:
    n, h, c = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, h), dtype=np.float32).astype(dtype)
    w = (rng.standard_normal((c, h), dtype=np.float32) / np.sqrt(h)).astype(dtype)
    return Inputs(x, w, rng.integers(0, c, n))


def loss_and_gradients(i: Inputs):
    return fastlsm.linear_cross_entropy(i.x, i.w, i.target, return_grad=True)


def matmuls(i: Inputs):
    z = i.x @ i.w.T
    return z @ i.w, z.T @ i.x


def matmuls_and_loss(i: Inputs):
    z = i.x @ i.w.T
    loss, _ = fastlsm.cross_entropy(z, i.target, axis=-1, grad_out=z)
    return loss, z @ i.w, z.T @ i.x


def _torch(chunked: bool) -> Callable[[Inputs], Any]:
    import torch
    import torch.nn.functional as F
    options = torch.nn.LinearCrossEntropyOptions() if chunked else None

    def call(i: Inputs):
        x = torch.from_numpy(i.x).requires_grad_()
        w = torch.from_numpy(i.w).requires_grad_()
        loss = F.linear_cross_entropy(x, w, torch.from_numpy(i.target), options=options)
        loss.backward()
        return loss.item(), x.grad.numpy(), w.grad.numpy()
    return call


def contenders(torch_available: bool) -> dict[str, Callable[[Inputs], Any]]:
    found = {"fastlsm": loss_and_gradients, FLOOR: matmuls,
             "numpy matmuls + fastlsm.cross_entropy": matmuls_and_loss}
    if torch_available:
        found["torch chunked"] = _torch(chunked=True)
        found["torch materialised"] = _torch(chunked=False)
    return found


def extra_peak_bytes(i: Inputs) -> int:
    """fastlsm's peak memory beyond the gradients it returns (a warm call, traced)."""
    tracemalloc.start()
    try:
        result = loss_and_gradients(i)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - sum(a.nbytes for a in result[1:])


def run(shapes, dtypes, repeat: int | None, torch_available: bool,
        emit: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Time every contender on every case; emit a table a case; return the records."""
    records = []
    for dtype in dtypes:
        for shape in shapes:
            i = make_inputs(shape, dtype)
            times = {}
            for name, call in contenders(torch_available).items():
                call(i)  # warm: Numba's compile or cache load, PyTorch's first call
                times[name] = measure(lambda: call(i), budget_s=10.0, repeat=repeat,
                                      min_samples=3).median_s
            logits = shape[0] * shape[2] * np.dtype(dtype).itemsize
            extra = extra_peak_bytes(i)
            emit(format_case(shape, np.dtype(dtype), times, extra, logits))
            records.append(dict(shape=list(shape), dtype=np.dtype(dtype).name, seconds=times,
                                extra_peak_bytes=extra, logits_bytes=logits))
    return records


def format_case(shape, dtype: np.dtype, times: dict[str, float], extra: int, logits: int) -> str:
    ours, floor = times["fastlsm"], times[FLOOR]
    lines = [f"linear_cross_entropy {shape_str(shape)} {dtype.name}: loss and all gradients; "
             f"fastlsm's extra peak memory {extra / 2**20:.1f} MiB "
             f"({extra / logits:.1%} of the {logits / 2**20:.0f} MiB logits)",
             f"  {'contender':40s} {'time':>10s} {'x matmuls':>10s} {'fastlsm speed-up':>17s}"]
    for name, seconds in times.items():
        lines.append(f"  {name:40s} {format_time(seconds):>10s} {seconds / floor:10.2f} "
                     f"{seconds / ours:16.2f}x")
    return "\n".join(lines)


def run_args(args) -> int:
    """``fastlsm bench --ops linear_cross_entropy`` from parsed arguments; the exit status."""
    shapes = args.shapes or list(DEFAULT_SHAPES)
    if any(len(shape) != 3 for shape in shapes):
        raise SystemExit("fastlsm bench: linear_cross_entropy takes --shapes as "
                         "ROWSxFEATURESxCLASSES")
    try:
        import torch
    except ImportError:
        torch = None
    threads = set_threads(args.threads, {"torch": torch.__version__ if torch else None})
    print(f"fastlsm {fastlsm.__version__} bench: linear_cross_entropy; threads: {threads}; "
          f"torch {torch.__version__ if torch else '(not importable, skipped)'}")
    records = run(shapes, [np.dtype(d) for d in args.dtype], args.repeat, torch is not None)
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
        print(f"wrote {args.json}")
    return 0
