"""``fastlsm bench``: fastlsm side by side with NumPy, SciPy, PyTorch and the memory floors.

Everything runs in one process on the same input.  For every op, shape and dtype the table shows
each contender's median time, the bandwidth it reaches (bytes the op must move: the read of ``x``
plus the write of its output), its time as a multiple of the memory floor measured right beside
it (``np.copyto(out, x)`` for elementwise ops, ``x.sum()`` for reductions), fastlsm's speed-up
over it, and its largest absolute error against a higher-precision reference.

Layout: :data:`OPS` is the registry (one :class:`Op` per op: fastlsm callable, floor kind, peer
callables, reference); :func:`run` walks dtypes x shapes x ops and measures each
:class:`Contender` with :func:`measure`; :func:`format_table`, :func:`write_json` and
:func:`write_plot` report.  :func:`main` is the entry point, also behind ``fastlsm bench``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

import fastlsm

DEFAULT_OPS = ("log_softmax", "softmax", "logsumexp", "cross_entropy", "cross_entropy_grad")
DEFAULT_SHAPES = ((8192, 32000), (131072, 1000), (2000000, 10), (8, 262144),
                  (1, 10), (32, 10), (256, 128))
SCALE = 3.0                  # inputs are standard normal * SCALE
ERROR_ELEMENTS = 1 << 21     # the error check and the peers' warm-up run on <= this many elements
MIN_SAMPLE_S = 2e-4          # tiny calls are timed in loops of at least this long
MAX_SAMPLES = 200
MIN_SAMPLES = 5              # fastlsm and the floors: a median of one run is noise on this VM

# -------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Inputs:
    """One benchmark input: logits ``x``, class ``target`` and a preallocated ``out`` buffer.

    Torch views of the same memory are made on first use.
    """

    x: np.ndarray
    target: np.ndarray
    out: np.ndarray
    _torch: tuple[Any, Any] | None = field(default=None, repr=False)

    @property
    def torch(self) -> tuple[Any, Any]:
        """``(torch.from_numpy(x), torch.from_numpy(target))``, sharing memory."""
        if self._torch is None:
            import torch
            self._torch = (torch.from_numpy(self.x), torch.from_numpy(self.target))
        return self._torch

    @property
    def rows(self) -> np.ndarray:
        return np.arange(self.x.shape[0])


def make_inputs(shape: tuple[int, int], dtype: np.dtype) -> Inputs:
    """Scaled standard-normal logits from ``default_rng(0)`` and random class targets."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=dtype)
    x *= SCALE
    target = rng.integers(0, shape[1], size=shape[0], dtype=np.int64)
    return Inputs(x, target, np.empty_like(x))


def subset(inputs: Inputs) -> Inputs:
    """The first rows of ``inputs`` (views, no copy), at most ``ERROR_ELEMENTS`` elements."""
    n, c = inputs.x.shape
    k = max(1, min(n, ERROR_ELEMENTS // max(c, 1)))
    if k == n:
        return inputs
    return Inputs(inputs.x[:k], inputs.target[:k], inputs.out[:k])


def reference_dtype(dtype: np.dtype) -> np.dtype:
    """float64 for float32 input; ``longdouble`` for float64 where it is wider."""
    if dtype == np.float64 and np.finfo(np.longdouble).eps < np.finfo(np.float64).eps:
        return np.dtype(np.longdouble)
    return np.dtype(np.float64)


# -------------------------------------------------------------------------------------------------
# Plain NumPy implementations: the NumPy peer, and in float64 the reference.


def np_logsumexp(x: np.ndarray, keepdims: bool = False) -> np.ndarray:
    """``max + log(sum(exp(x - max)))`` over the last axis."""
    m = x.max(axis=-1, keepdims=True)
    s = np.log(np.exp(x - m).sum(axis=-1, keepdims=True))
    s += m
    return s if keepdims else s[..., 0]


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    return x - np_logsumexp(x, keepdims=True)


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    e /= e.sum(axis=-1, keepdims=True)
    return e


def np_cross_entropy(x: np.ndarray, target: np.ndarray) -> np.floating:
    rows = np.arange(x.shape[0])
    return (np_logsumexp(x) - x[rows, target]).mean()


def np_cross_entropy_grad(x: np.ndarray, target: np.ndarray) -> tuple[np.floating, np.ndarray]:
    rows = np.arange(x.shape[0])
    lse = np_logsumexp(x, keepdims=True)
    loss = (lse[:, 0] - x[rows, target]).mean()
    grad = np.exp(x - lse)
    grad[rows, target] -= 1
    grad /= x.shape[0]
    return loss, grad


# -------------------------------------------------------------------------------------------------
# The registry


Call = Callable[[Inputs], Any]


@dataclass(frozen=True)
class Op:
    """One benchmarked op.

    ``fastlsm`` and each peer take an :class:`Inputs`; ``reference(x, target)`` computes the exact
    answer from higher-precision input; ``floor`` is ``"copy"`` (output as large as ``x``) or
    ``"read"`` (a reduction).  ``out_elements(n, c)`` is the number of elements the op writes.
    """

    name: str
    fastlsm: Call
    floor: str
    reference: Callable[[np.ndarray, np.ndarray], Any]
    out_elements: Callable[[int, int], int]
    peers: dict[str, Call]


def _torch_ce_grad(inp: Inputs) -> tuple[Any, Any]:
    import torch.nn.functional as F
    xt, tt = inp.torch
    leaf = xt.detach().requires_grad_(True)
    loss = F.cross_entropy(leaf, tt)
    loss.backward()
    return loss.detach(), leaf.grad


def _torch(name: str) -> Call:
    """A torch peer by name, resolved lazily so that the registry does not import torch."""
    def call(inp: Inputs) -> Any:
        import torch
        import torch.nn.functional as F
        xt, tt = inp.torch
        if name == "log_softmax":
            return torch.log_softmax(xt, -1)
        if name == "softmax":
            return torch.softmax(xt, -1)
        if name == "logsumexp":
            return torch.logsumexp(xt, -1)
        return F.cross_entropy(xt, tt)
    return call


def _scipy(name: str) -> Call:
    def call(inp: Inputs) -> Any:
        from scipy import special
        if name == "cross_entropy":
            return (special.logsumexp(inp.x, axis=-1) - inp.x[inp.rows, inp.target]).mean()
        return getattr(special, name)(inp.x, axis=-1)
    return call


OPS: dict[str, Op] = {
    "log_softmax": Op(
        "log_softmax", lambda i: fastlsm.log_softmax(i.x, out=i.out), "copy",
        lambda x, t: np_log_softmax(x), lambda n, c: n * c,
        {"numpy": lambda i: np_log_softmax(i.x), "scipy": _scipy("log_softmax"),
         "torch": _torch("log_softmax")}),
    "softmax": Op(
        "softmax", lambda i: fastlsm.softmax(i.x, out=i.out), "copy",
        lambda x, t: np_softmax(x), lambda n, c: n * c,
        {"numpy": lambda i: np_softmax(i.x), "scipy": _scipy("softmax"),
         "torch": _torch("softmax")}),
    "logsumexp": Op(
        "logsumexp", lambda i: fastlsm.logsumexp(i.x), "read",
        lambda x, t: np_logsumexp(x), lambda n, c: n,
        {"numpy": lambda i: np_logsumexp(i.x), "scipy": _scipy("logsumexp"),
         "torch": _torch("logsumexp")}),
    "cross_entropy": Op(
        "cross_entropy", lambda i: fastlsm.cross_entropy(i.x, i.target), "read",
        np_cross_entropy, lambda n, c: 1,
        {"numpy": lambda i: np_cross_entropy(i.x, i.target), "scipy": _scipy("cross_entropy"),
         "torch": _torch("cross_entropy")}),
    "cross_entropy_grad": Op(
        "cross_entropy_grad", lambda i: fastlsm.cross_entropy(i.x, i.target, grad_out=i.out),
        "copy", np_cross_entropy_grad, lambda n, c: n * c + 1,
        {"numpy": lambda i: np_cross_entropy_grad(i.x, i.target), "torch": _torch_ce_grad}),
}

FLOORS: dict[str, tuple[str, Call]] = {
    "copy": ("copy floor", lambda i: np.copyto(i.out, i.x)),
    "read": ("read floor", lambda i: i.x.sum()),
}

PEER_MODULES = {"numpy": "numpy", "scipy": "scipy.special", "torch": "torch"}


def available_peers() -> dict[str, str | None]:
    """Peer name -> version, or ``None`` where it does not import."""
    found: dict[str, str | None] = {}
    for peer, module in PEER_MODULES.items():
        try:
            importlib.import_module(module)
            top = sys.modules[module.split(".")[0]]
            found[peer] = getattr(top, "__version__", "?")
        except Exception:  # a peer that fails to import for any reason is left out
            found[peer] = None
    return found


@dataclass(frozen=True)
class Contender:
    """Something timed: ``kind`` is ``"fastlsm"``, ``"floor"`` or ``"peer"``."""

    name: str
    kind: str
    call: Call


def contenders(op: Op, peers: dict[str, str | None]) -> list[Contender]:
    """fastlsm first, then the floor, then the importable peers."""
    floor_name, floor_call = FLOORS[op.floor]
    found = [Contender("fastlsm", "fastlsm", op.fastlsm), Contender(floor_name, "floor", floor_call)]
    found += [Contender(name, "peer", call) for name, call in op.peers.items() if peers.get(name)]
    return found


# -------------------------------------------------------------------------------------------------
# Timing and errors


@dataclass
class Timing:
    median_s: float
    samples: int
    calls_per_sample: int


def _timed(call: Callable[[], Any], calls: int) -> float:
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
        probe = _timed(call, 1)
        loop = max(1, math.ceil(MIN_SAMPLE_S / max(probe, 1e-9)))
        if repeat is not None:
            wanted = max(1, repeat)
        else:
            wanted = int(min(MAX_SAMPLES, max(min_samples, budget_s // (probe * loop))))
        samples = [probe] if loop == 1 else []
        while len(samples) < wanted:
            samples.append(_timed(call, loop))
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timing(float(np.median(samples)), len(samples), loop)


def as_arrays(result: Any) -> list[np.ndarray]:
    """A result (array, scalar, torch tensor or a tuple of them) as a list of NumPy arrays."""
    items = result if isinstance(result, tuple) else (result,)
    arrays = []
    for item in items:
        if hasattr(item, "detach"):
            item = item.detach().numpy()
        arrays.append(np.asarray(item))
    return arrays


def max_error(result: Any, expected: Any) -> float:
    """Largest absolute difference over all components, computed in the reference's precision."""
    worst = 0.0
    for got, want in zip(as_arrays(result), as_arrays(expected), strict=True):
        worst = max(worst, float(np.max(np.abs(got.astype(want.dtype) - want))))
    return worst


# -------------------------------------------------------------------------------------------------
# Running


@dataclass
class Record:
    """One row of a table, and one record of ``--json``."""

    op: str
    shape: list[int]
    dtype: str
    contender: str
    kind: str
    median_s: float | None
    gbps: float | None
    floor_multiple: float | None
    speedup: float | None        # fastlsm's speed-up over this contender: its time / fastlsm's
    max_error: float | None
    samples: int = 0
    calls_per_sample: int = 0
    skipped: str | None = None


@dataclass
class Config:
    ops: list[str]
    shapes: list[tuple[int, int]]
    dtypes: list[np.dtype]
    repeat: int | None = None
    budget_s: float = 0.1        # per measurement
    run_budget_s: float = 30.0   # peers' share of the run, split evenly between cases (0: no cap)
    progress: Callable[[str], None] = lambda line: None


def bytes_moved(op: Op, shape: tuple[int, int], dtype: np.dtype) -> int:
    """Read of ``x`` (and the targets for the losses) plus the write of the output."""
    n, c = shape
    moved = (n * c + op.out_elements(n, c)) * dtype.itemsize
    if op.name.startswith("cross_entropy"):
        moved += n * 8
    return moved


def skip_reason(estimate_s: float, spent_s: float, case_budget_s: float) -> str | None:
    """Why a slow peer is skipped: only when its measurement would overrun its case's budget."""
    if case_budget_s > 0 and estimate_s > 0.02 and spent_s + estimate_s > case_budget_s:
        return (f"skipped: ~{format_time(estimate_s)}/call would overrun this case's "
                f"{case_budget_s:.2g} s share of the run budget (--budget)")
    return None


def bench_case(op: Op, inputs: Inputs, peers: dict[str, str | None], config: Config,
               case_budget_s: float) -> list[Record]:
    """Every contender of ``op`` on one input, fastlsm first; peers share ``case_budget_s``."""
    peers_spent = 0.0
    shape, dtype = inputs.x.shape, inputs.x.dtype
    small = subset(inputs)
    expected = op.reference(small.x.astype(reference_dtype(dtype)), small.target)
    moved = bytes_moved(op, shape, dtype)
    records: list[Record] = []
    for contender in contenders(op, peers):
        error = None
        if contender.kind != "floor":
            start = time.perf_counter()
            error = max_error(contender.call(small), expected)   # also the peers' warm-up
            estimate = (time.perf_counter() - start) * inputs.x.size / small.x.size
        if contender.kind != "peer":
            contender.call(inputs)                                 # warm-up at full size
        elif reason := skip_reason(estimate, peers_spent, case_budget_s):
            records.append(Record(op.name, list(shape), dtype.name, contender.name,
                                  contender.kind, None, None, None, None, error, skipped=reason))
            config.progress(f"{op.name} {shape_str(shape)} {dtype.name} {contender.name}: {reason}")
            continue
        start = time.perf_counter()
        timing = measure(lambda: contender.call(inputs), config.budget_s, config.repeat,
                         min_samples=1 if contender.kind == "peer" else MIN_SAMPLES)
        if contender.kind == "peer":
            peers_spent += time.perf_counter() - start
        records.append(Record(op.name, list(shape), dtype.name, contender.name, contender.kind,
                              timing.median_s, moved / timing.median_s / 1e9, None, None, error,
                              timing.samples, timing.calls_per_sample))
        config.progress(f"{op.name} {shape_str(shape)} {dtype.name} {contender.name:<10} "
                        f"{format_time(timing.median_s):>9}  ({timing.samples} x "
                        f"{timing.calls_per_sample} calls)")
    floor_s = next(r.median_s for r in records if r.kind == "floor")
    ours_s = records[0].median_s
    for record in records:
        if record.median_s is not None:
            record.floor_multiple = record.median_s / floor_s
            record.speedup = record.median_s / ours_s
    return records


def warm_up_fastlsm(ops: Sequence[str], dtypes: Sequence[np.dtype]) -> float:
    """Compile (or load from Numba's cache) fastlsm's serial and parallel kernels; seconds taken."""
    start = time.perf_counter()
    for dtype in dtypes:
        for shape in ((4, 10), (64, 1000), (4096, 10)):
            inputs = make_inputs(shape, dtype)
            for name in ops:
                OPS[name].fastlsm(inputs)
    return time.perf_counter() - start


def run(config: Config, peers: dict[str, str | None] | None = None,
        emit: Callable[[str], None] = print) -> list[Record]:
    """Benchmark every dtype x shape x op of ``config``; ``emit`` each table as it completes."""
    peers = available_peers() if peers is None else peers
    started = time.perf_counter()
    emit(f"fastlsm warm-up (Numba compile or cache load, excluded from timings): "
         f"{warm_up_fastlsm(config.ops, config.dtypes):.2f} s")
    records: list[Record] = []
    case_budget_s = config.run_budget_s / (len(config.dtypes) * len(config.shapes) * len(config.ops))
    for dtype in config.dtypes:
        for shape in config.shapes:
            config.progress(f"generating {shape_str(shape)} {dtype.name} input")
            inputs = make_inputs(shape, dtype)
            for name in config.ops:
                case = bench_case(OPS[name], inputs, peers, config, case_budget_s)
                records += case
                emit(format_table(case))
            del inputs
    emit(f"total {time.perf_counter() - started:.1f} s")
    return records


# -------------------------------------------------------------------------------------------------
# Reporting


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def format_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def format_table(records: Sequence[Record]) -> str:
    """One op, shape and dtype: a header line and one row per contender."""
    first = records[0]
    op = OPS[first.op]
    floor_name = FLOORS[op.floor][0]
    moved = bytes_moved(op, tuple(first.shape), np.dtype(first.dtype))
    lines = [f"\n{first.op}  {shape_str(first.shape)}  {first.dtype}   "
             f"({moved / 1e9:.3g} GB moved; floor: {floor_name})",
             f"  {'contender':<12}{'median':>11}{'GB/s':>9}{'x floor':>10}"
             f"{'fastlsm speed-up':>18}{'max error':>11}{'runs':>10}"]
    for r in records:
        if r.skipped:
            lines.append(f"  {r.contender:<12}{r.skipped}")
            continue
        speedup = "" if r.kind == "fastlsm" else f"{r.speedup:.2f}x"
        error = "-" if r.max_error is None else f"{r.max_error:.1e}"
        runs = f"{r.samples}" + (f"x{r.calls_per_sample}" if r.calls_per_sample > 1 else "")
        lines.append(f"  {r.contender:<12}{format_time(r.median_s):>11}{r.gbps:>9.3g}"
                     f"{r.floor_multiple:>9.2f}x{speedup:>18}{error:>11}{runs:>10}")
    return "\n".join(lines)


def write_json(records: Sequence[Record], path: str) -> None:
    with open(path, "w") as f:
        json.dump([asdict(r) for r in records], f, indent=1)


def check_matplotlib() -> None:
    """Fail before a long run, not after it, when ``--plot`` cannot work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("fastlsm bench: --plot needs matplotlib; "
                         "install it with: pip install 'fastlsm[bench]'") from None


def write_plot(records: Sequence[Record], path: str) -> None:
    """GB/s against the number of columns, one panel per op (and dtype), one line per contender."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r.op, r.dtype) for r in records},
                    key=lambda panel: (DEFAULT_OPS.index(panel[0]), panel[1]))
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    names = list(dict.fromkeys(r.contender for r in records))
    colours = {name: f"C{i}" for i, name in enumerate(names)}
    for ax, (op, dtype) in zip(axes.flat, panels):
        mine = [r for r in records if r.op == op and r.dtype == dtype and r.gbps]
        for name in dict.fromkeys(r.contender for r in mine):
            points = sorted((r.shape[-1], r.shape[0], r.gbps) for r in mine if r.contender == name)
            ax.plot([p[0] for p in points], [p[2] for p in points], marker="o", label=name,
                    color=colours[name],
                    linestyle="--" if "floor" in name else "-")
        ax.set(xscale="log", yscale="log", title=f"{op} ({dtype})", xlabel="columns",
               ylabel="GB/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------
# Command line


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"8192x32000,32x10"`` -> ``[(8192, 32000), (32, 10)]``."""
    shapes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            rows, cols = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"shape {item!r} is not ROWSxCOLS") from None
        if rows < 1 or cols < 1:
            raise argparse.ArgumentTypeError(f"shape {item!r} must be positive")
        shapes.append((rows, cols))
    if not shapes:
        raise argparse.ArgumentTypeError("no shapes given")
    return shapes


def _choices(kind: str, allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {', '.join(bad) or '(none)'}; choose from {', '.join(allowed)}")
        return items
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fastlsm bench``."""
    parser.add_argument("--ops", type=_choices("op", DEFAULT_OPS), default=list(DEFAULT_OPS),
                        help=f"comma list (default: {','.join(DEFAULT_OPS)}); with --device "
                             "cuda, cross_entropy_grad also runs in place")
    from fastlsm.bench_cuda import DEFAULT_CUDA_SHAPES  # here: bench_cuda imports this module
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu, or cuda: on an NVIDIA GPU beside PyTorch's CUDA kernels, "
                             "which needs PyTorch with CUDA and numba-cuda (default: cpu)")
    # None: each device's own default, which differ.
    parser.add_argument("--shapes", type=parse_shapes, default=None,
                        help="comma list of ROWSxCOLS (default: "
                             f"{','.join(map(shape_str, DEFAULT_SHAPES))}; with --device cuda: "
                             f"{','.join(map(shape_str, DEFAULT_CUDA_SHAPES))})")
    parser.add_argument("--dtype", type=_choices("dtype", ("float32", "float64")),
                        default=["float32"], help="float32, float64 or both (default: float32)")
    parser.add_argument("--threads", type=int, help="threads for Numba and PyTorch, cpu only "
                                                    "(default: all)")
    parser.add_argument("--repeat", type=int, help="samples per measurement (default: adaptive, "
                                                   "a time budget per measurement; cuda: 20)")
    parser.add_argument("--budget", type=float, default=Config.run_budget_s,
                        help="seconds the peers may take, split evenly between the cases: a peer "
                             "slower than 20 ms a call is skipped where it would overrun its "
                             f"case's share; 0 never skips; cpu only "
                             f"(default: {Config.run_budget_s:g})")
    parser.add_argument("--json", metavar="PATH", help="write the results as a list of records")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of GB/s against columns "
                                                       "(needs matplotlib; cpu only)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--dask", action="store_true",
                        help="instead: cross_entropy with its classes split over Dask chunks, on "
                             "a dask.distributed LocalCluster of 2 worker processes, beside "
                             "fastlsm in one process and plain dask.array (first --shapes entry, "
                             "default 4096x32000; needs the dask extra)")


def set_threads(threads: int | None, peers: dict[str, str | None]) -> str:
    """Apply ``--threads``; describe the thread counts in use."""
    import numba
    if threads is not None:
        if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
            raise SystemExit(f"fastlsm bench: --threads must be in 1..{numba.config.NUMBA_NUM_THREADS}")
        numba.set_num_threads(threads)
    text = f"numba {numba.get_num_threads()}"
    if peers.get("torch"):
        import torch
        if threads is not None:
            torch.set_num_threads(threads)
        text += f", torch {torch.get_num_threads()}"
    return text


def run_args(args: argparse.Namespace) -> int:
    """Run ``fastlsm bench`` from parsed arguments; ``--device cuda`` runs
    :func:`fastlsm.bench_cuda.run_args`, ``--dask`` :func:`fastlsm.bench_dask.run`."""
    if args.device == "cuda":
        from fastlsm import bench_cuda
        return bench_cuda.run_args(args)
    if args.dask:
        from fastlsm import bench_dask
        shape = args.shapes[0] if args.shapes else (4096, 32000)
        print(bench_dask.run(shape, dtype=args.dtype[0], repeat=args.repeat or 3))
        return 0
    if args.plot:
        check_matplotlib()
    peers = available_peers()
    threads = set_threads(args.threads, peers)
    print(f"fastlsm {fastlsm.__version__} bench; threads: {threads} "
          f"({fastlsm.info()['threading layer']} layer); peers: "
          + ", ".join(f"{k} {v}" if v else f"{k} (not importable, skipped)"
                      for k, v in peers.items()))
    print("fastlsm writes into a preallocated out/grad_out, as the copy floor does; peers allocate "
          "their output. Errors: max |result - reference| on up to "
          f"{ERROR_ELEMENTS} elements; reference in float64 (longdouble for float64 input).")
    counter = iter(range(1, 1 << 62))

    def progress(line: str) -> None:
        if not args.quiet:
            print(f"[{next(counter)}] {line}", file=sys.stderr, flush=True)

    config = Config(args.ops, args.shapes or list(DEFAULT_SHAPES),
                    [np.dtype(d) for d in args.dtype], args.repeat,
                    run_budget_s=args.budget, progress=progress)
    records = run(config, peers, emit=lambda text: print(text, flush=True))
    if args.json:
        write_json(records, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(records, args.plot)
        print(f"wrote {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fastlsm.bench [options]``, the same as ``fastlsm bench [options]``."""
    parser = argparse.ArgumentParser(prog="fastlsm bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
