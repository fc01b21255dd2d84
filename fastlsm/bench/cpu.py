"""``fastlsm bench`` on the CPU: fastlsm beside NumPy, SciPy, PyTorch, JAX and the memory floors.

Everything runs in one process on the same input.  For every op, shape and dtype the table shows
each contender's median time, the bandwidth it reaches (:func:`fastlsm.bench.ops.bytes_moved`),
its time as a multiple of the memory floor measured right beside it (the fastest of the ways of
:data:`fastlsm.bench.ops.FLOORS`: the machine's multi-threaded bandwidth), fastlsm's speed-up over
it, and its largest absolute error against a higher-precision reference; a summary closes the run.

:func:`run` walks dtypes x shapes x ops of :data:`fastlsm.bench.ops.OPS` and times each
:class:`Contender` with :func:`fastlsm.bench.timing.measure`; :func:`format_table`,
:func:`format_summary`, :func:`write_json` and :func:`write_plot` report; :func:`run_args` is the
entry point.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

import fastlsm
from fastlsm.bench.ops import (FLOORS, OPS, Call, Inputs, Op, available_peers, bytes_moved,
                               floor_ways, for_op, make_inputs, peers_of, reference_inputs)
from fastlsm.bench.timing import format_time, measure, shape_str

# The shapes of the project's targets (issue 18): an LLM vocabulary, medium, short and very
# short rows, a few huge rows, and per-call sizes.
DEFAULT_SHAPES = ((8192, 32000), (131072, 1000), (1000000, 100), (2000000, 10), (8, 262144),
                  (1, 10), (32, 10), (256, 128), (1024, 1000))
ERROR_ELEMENTS = 1 << 21     # the error check and the peers' warm-up run on <= this many elements
MIN_SAMPLES = 5              # fastlsm and the floors: a median of one run is noise on this VM


def subset(inputs: Inputs) -> Inputs:
    """The first rows of ``inputs`` (views, no copy), at most ``ERROR_ELEMENTS`` elements."""
    n, c = inputs.x.shape
    k = max(1, min(n, ERROR_ELEMENTS // max(c, 1)))
    if k == n:
        return inputs
    forward = None if inputs.forward is None else inputs.forward[:k]
    return Inputs(inputs.x[:k], inputs.target[:k], inputs.out[:k], forward)


@dataclass(frozen=True)
class Contender:
    """Something timed: ``kind`` is ``"fastlsm"``, ``"floor"`` or ``"peer"``."""

    name: str
    kind: str
    call: Call


def contenders(op: Op, peers: dict[str, str | None]) -> list[Contender]:
    """fastlsm first, then every way of taking the floor, then the importable peers."""
    floor = FLOORS[op.floor]
    found = [Contender("fastlsm", "fastlsm", op.call)]
    found += [Contender(f"{floor.name} ({way})", "floor", call)
              for way, call in floor_ways(floor).items()]
    found += [Contender(name, "peer", call) for name, call in peers_of(op).items()
              if peers.get(name)]
    return found


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


@dataclass
class Config:
    ops: list[str]
    shapes: list[tuple[int, int]]
    dtypes: list[np.dtype]
    repeat: int | None = None
    budget_s: float = 0.1        # per measurement
    run_budget_s: float = 30.0   # peers' share of the run, split evenly between cases (0: no cap)
    progress: Callable[[str], None] = lambda line: None


def one_sample(first_s: float, spent_s: float, case_budget_s: float) -> bool:
    """Whether a slow peer gets one timed call only: where more would overrun its case's
    budget.  Every peer is timed at least once on every case."""
    return case_budget_s > 0 and first_s > 0.02 and spent_s + MIN_SAMPLES * first_s > case_budget_s


def bench_case(op: Op, inputs: Inputs, peers: dict[str, str | None], config: Config,
               case_budget_s: float) -> list[Record]:
    """Every contender of ``op`` on one input, fastlsm first, then the fastest way of taking the
    floor, then the peers, which share ``case_budget_s`` for their samples."""
    peers_spent = 0.0
    shape, dtype = inputs.x.shape, inputs.x.dtype
    inputs = for_op(op, inputs)
    small = subset(inputs)
    expected = op.reference(reference_inputs(small))
    moved = bytes_moved(op, shape, dtype)
    records: list[Record] = []
    for contender in contenders(op, peers):
        error = None
        if contender.kind != "floor":
            error = max_error(contender.call(small), expected)
        start = time.perf_counter()
        contender.call(inputs)            # warm-up at full size (XLA compiles for each shape)
        repeat = config.repeat
        if contender.kind == "peer" and one_sample(time.perf_counter() - start, peers_spent,
                                                   case_budget_s):
            repeat = 1
        timing = measure(lambda: contender.call(inputs), config.budget_s, repeat,
                         min_samples=1 if contender.kind == "peer" else MIN_SAMPLES)
        if contender.kind == "peer":
            peers_spent += time.perf_counter() - start
        records.append(Record(op.name, list(shape), dtype.name, contender.name, contender.kind,
                              timing.median_s, moved / timing.median_s / 1e9, None, None, error,
                              timing.samples, timing.calls_per_sample))
        config.progress(f"{op.name} {shape_str(shape)} {dtype.name} {contender.name:<10} "
                        f"{format_time(timing.median_s):>9}  ({timing.samples} x "
                        f"{timing.calls_per_sample} calls)")
    floor = min((r for r in records if r.kind == "floor"), key=lambda r: r.median_s)
    records = [r for r in records if r.kind != "floor" or r is floor]
    for record in records:
        record.floor_multiple = record.median_s / floor.median_s
        record.speedup = record.median_s / records[0].median_s
    return records


def warm_up_fastlsm(ops: Sequence[str], dtypes: Sequence[np.dtype]) -> float:
    """Compile (or load from Numba's cache) fastlsm's serial and parallel kernels; seconds taken."""
    start = time.perf_counter()
    for dtype in dtypes:
        for shape in ((4, 10), (64, 1000), (4096, 10)):
            inputs = make_inputs(shape, dtype)
            for name in ops:
                OPS[name].call(for_op(OPS[name], inputs))
    return time.perf_counter() - start


def run(config: Config, peers: dict[str, str | None] | None = None,
        emit: Callable[[str], None] = print) -> list[Record]:
    """Benchmark every dtype x shape x op of ``config``; ``emit`` each table as it completes."""
    peers = available_peers() if peers is None else peers
    started = time.perf_counter()
    emit(f"fastlsm warm-up (Numba compile or cache load, excluded from timings): "
         f"{warm_up_fastlsm(config.ops, config.dtypes):.2f} s")
    records: list[Record] = []
    cases = len(config.dtypes) * len(config.shapes) * len(config.ops)
    case_budget_s = config.run_budget_s / cases
    for dtype in config.dtypes:
        for shape in config.shapes:
            config.progress(f"generating {shape_str(shape)} {dtype.name} input")
            inputs = make_inputs(shape, dtype)
            for name in config.ops:
                case = bench_case(OPS[name], inputs, peers, config, case_budget_s)
                records += case
                emit(format_table(case))
            del inputs
    emit(format_summary(records))
    emit(f"total {time.perf_counter() - started:.1f} s")
    return records


def format_table(records: Sequence[Record]) -> str:
    """One op, shape and dtype: a header line and one row per contender."""
    first = records[0]
    moved = bytes_moved(OPS[first.op], tuple(first.shape), np.dtype(first.dtype))
    lines = [f"\n{first.op}  {shape_str(first.shape)}  {first.dtype}   "
             f"({moved / 1e9:.3g} GB moved)",
             f"  {'contender':<26}{'median':>11}{'GB/s':>9}{'x floor':>10}"
             f"{'fastlsm speed-up':>18}{'max error':>11}{'runs':>10}"]
    for r in records:
        speedup = "" if r.kind == "fastlsm" else f"{r.speedup:.2f}x"
        error = "-" if r.max_error is None else f"{r.max_error:.1e}"
        runs = f"{r.samples}" + (f"x{r.calls_per_sample}" if r.calls_per_sample > 1 else "")
        lines.append(f"  {r.contender:<26}{format_time(r.median_s):>11}{r.gbps:>9.3g}"
                     f"{r.floor_multiple:>9.2f}x{speedup:>18}{error:>11}{runs:>10}")
    return "\n".join(lines)


def format_summary(records: Sequence[Record]) -> str:
    """One line per case: fastlsm's time, its multiple of the floor, and its speed-up over each
    peer (``-``: the peer has no such op or is not installed)."""
    peers = list(dict.fromkeys(r.contender for r in records if r.kind == "peer"))
    cases = list(dict.fromkeys((r.op, tuple(r.shape), r.dtype) for r in records))
    lines = ["\nsummary: fastlsm's multiple of the floor and its speed-up over each peer",
             f"  {'op':<20}{'shape':>15}{'dtype':>9}{'fastlsm':>11}{'x floor':>9}"
             + "".join(f"{'vs ' + p:>11}" for p in peers)]
    for op, shape, dtype in cases:
        case = {r.contender: r for r in records
                if (r.op, tuple(r.shape), r.dtype) == (op, shape, dtype)}
        ours = case["fastlsm"]
        speedups = [f"{case[p].speedup:.2f}x" if p in case else "-" for p in peers]
        lines.append(f"  {op:<20}{shape_str(shape):>15}{dtype:>9}"
                     f"{format_time(ours.median_s):>11}{ours.floor_multiple:>8.2f}x"
                     + "".join(f"{v:>11}" for v in speedups))
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
                    key=lambda panel: (list(OPS).index(panel[0]), panel[1]))
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    def line(record: Record) -> str:      # the floor is one line, whichever way was fastest
        return "floor" if record.kind == "floor" else record.contender

    names = list(dict.fromkeys(map(line, records)))
    colours = {name: f"C{i}" for i, name in enumerate(names)}
    for ax, (op, dtype) in zip(axes.flat, panels):
        mine = [r for r in records if r.op == op and r.dtype == dtype]
        for name in dict.fromkeys(map(line, mine)):
            points = sorted((r.shape[-1], r.shape[0], r.gbps) for r in mine if line(r) == name)
            ax.plot([p[0] for p in points], [p[2] for p in points], marker="o", label=name,
                    color=colours[name], linestyle="--" if name == "floor" else "-")
        ax.set(xscale="log", yscale="log", title=f"{op} ({dtype})", xlabel="columns",
               ylabel="GB/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)



def set_threads(threads: int | None, peers: dict[str, str | None]) -> str:
    """Apply ``--threads``; describe the thread counts in use."""
    import numba
    if threads is not None:
        most = numba.config.NUMBA_NUM_THREADS
        if not 1 <= threads <= most:
            raise SystemExit(f"fastlsm bench: --threads must be in 1..{most}")
        numba.set_num_threads(threads)
    text = f"numba {numba.get_num_threads()}"
    if peers.get("torch"):
        import torch
        if threads is not None:
            torch.set_num_threads(threads)
        text += f", torch {torch.get_num_threads()}"
    return text


def run_args(args: argparse.Namespace) -> int:
    """Run ``fastlsm bench`` on the CPU from parsed arguments (see
    :func:`fastlsm.bench.command.add_arguments`); the exit status."""
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
