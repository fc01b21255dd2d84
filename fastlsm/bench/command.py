"""The options of ``fastlsm bench`` and the choice between its CPU, CUDA and Dask runs."""

from __future__ import annotations

import argparse
import math
import os
from typing import Callable, Sequence

from fastlsm.bench import cluster, cpu, cuda, linear
from fastlsm.bench.ops import DEFAULT_OPS, OPS
from fastlsm.bench.timing import shape_str

DESCRIPTION = ("Time fastlsm beside NumPy, SciPy, PyTorch, JAX and the memory floors (on the "
               "CPU), beside PyTorch (on a CUDA GPU), or on a local Dask cluster.")


LINEAR = "linear_cross_entropy"  # an op of its own: its cases have three sizes


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """``"8192x32000,32x10"`` -> ``[(8192, 32000), (32, 10)]``; ``ROWSxFEATURESxCLASSES`` for
    linear_cross_entropy."""
    shapes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            shape = tuple(int(v) for v in item.lower().split("x"))
        except ValueError:
            shape = ()
        if len(shape) not in (2, 3):
            raise argparse.ArgumentTypeError(f"shape {item!r} is not ROWSxCOLS (or "
                                             "ROWSxFEATURESxCLASSES)")
        if min(shape) < 1:
            raise argparse.ArgumentTypeError(f"shape {item!r} must be positive")
        shapes.append(shape)
    if not shapes:
        raise argparse.ArgumentTypeError("no shapes given")
    return shapes


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


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
    parser.add_argument("--ops", type=_choices("op", [*OPS, LINEAR]), default=list(DEFAULT_OPS),
                        help=f"comma list of {', '.join(OPS)} (default: "
                             f"{','.join(DEFAULT_OPS)}); with --device cuda, those PyTorch has, "
                             f"and cross_entropy_grad also runs in place; or {LINEAR} alone, "
                             "on the CPU, beside PyTorch's (--shapes ROWSxFEATURESxCLASSES, "
                             "default: "
                             f"{','.join(map(shape_str, linear.DEFAULT_SHAPES))})")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu, or cuda: on an NVIDIA GPU beside PyTorch's CUDA kernels, "
                             "which needs PyTorch with CUDA and numba-cuda (default: cpu)")
    # None: each device's own default, which differ.
    parser.add_argument("--shapes", type=parse_shapes, default=None,
                        help="comma list of ROWSxCOLS (default: "
                             f"{','.join(map(shape_str, cpu.DEFAULT_SHAPES))}; with --device cuda: "
                             f"{','.join(map(shape_str, cuda.DEFAULT_SHAPES))})")
    parser.add_argument("--dtype", type=_choices("dtype", ("float32", "float64")),
                        default=["float32"], help="float32, float64 or both (default: float32)")
    parser.add_argument("--threads", type=_positive_int,
                        help="threads for Numba and PyTorch, cpu only (default: all)")
    parser.add_argument("--repeat", type=_positive_int,
                        help="samples per measurement (default: adaptive, a time budget per "
                             "measurement; cuda: 20)")
    parser.add_argument("--budget", type=_seconds, default=cpu.Config.run_budget_s,
                        help="seconds the peers may take, split evenly between the cases: a peer "
                             "slower than 20 ms a call is timed once (after a warm-up call) where "
                             "more samples would overrun its case's share; 0: no cap; cpu only "
                             f"(default: {cpu.Config.run_budget_s:g})")
    parser.add_argument("--json", metavar="PATH", help="write the results as a list of records")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of GB/s against columns "
                                                       "(needs matplotlib; cpu only)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--dask", action="store_true",
                        help="instead: cross_entropy with its classes split over Dask chunks, on "
                             "a dask.distributed LocalCluster of 2 worker processes, beside "
                             "fastlsm in one process and plain dask.array (one --shapes entry, "
                             "default 4096x32000, one --dtype, and --repeat; needs the dask "
                             "extra)")


def run_args(args: argparse.Namespace) -> int:
    """Run ``fastlsm bench`` from parsed arguments: on the CPU (:func:`fastlsm.bench.cpu.run_args`),
    ``--device cuda`` (:func:`fastlsm.bench.cuda.run_args`) or ``--dask``
    (:func:`fastlsm.bench.cluster.run`); the exit status."""
    _check_outputs(args)
    if args.dask:
        _check_dask(args)
    if LINEAR in args.ops:
        if args.ops != [LINEAR] or args.device != "cpu" or args.dask:
            raise SystemExit(f"fastlsm bench: --ops {LINEAR} runs alone, on the CPU")
        return linear.run_args(args)
    if args.shapes and any(len(shape) != 2 for shape in args.shapes):
        raise SystemExit("fastlsm bench: --shapes takes ROWSxCOLS")
    if args.device == "cuda":
        return cuda.run_args(args)
    if args.dask:
        shape = args.shapes[0] if args.shapes else (4096, 32000)
        print(cluster.run(shape, dtype=args.dtype[0], repeat=args.repeat or 3))
        return 0
    return cpu.run_args(args)


def _check_dask(args: argparse.Namespace) -> None:
    """``--dask`` times one case (cross_entropy with and without its gradient, at one shape and
    dtype, ``--repeat`` times): the options it would not honour are refused, not ignored."""
    ignored = [flag for flag, given in (
        ("--ops", args.ops != list(DEFAULT_OPS)),
        ("--device cuda", args.device != "cpu"),
        ("--threads", args.threads is not None),
        ("--budget", args.budget != cpu.Config.run_budget_s),
        ("a second --shapes entry", args.shapes is not None and len(args.shapes) > 1),
        ("a second --dtype", len(args.dtype) > 1)) if given]
    if ignored:
        raise SystemExit(f"fastlsm bench: --dask times cross_entropy at one shape and dtype; "
                         f"it does not take {', '.join(ignored)}")


def _check_outputs(args: argparse.Namespace) -> None:
    """Fail before a long run, not after it: an output the run does not write, a path that
    cannot be written, a shape no array of this machine's memory holds."""
    unsupported = (["--json", "--plot"] if args.dask
                   else ["--plot"] if LINEAR in args.ops else [])
    for flag in unsupported:
        if getattr(args, flag[2:]):
            raise SystemExit(f"fastlsm bench: {flag} is not supported with "
                             f"{'--dask' if args.dask else '--ops ' + LINEAR}")
    for flag in ("--json", "--plot"):
        path = getattr(args, flag[2:])
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if path and (os.path.isdir(path) or not os.access(folder, os.W_OK)):
            raise SystemExit(f"fastlsm bench: {flag} {path}: not a file in a writable folder")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for shape in args.shapes or ():
        need = math.prod(shape) * 8
        if need > memory:
            raise SystemExit(f"fastlsm bench: --shapes {shape_str(shape)} needs "
                             f"{need / 2**30:.0f} GiB an array; this machine has "
                             f"{memory / 2**30:.0f} GiB")


def main(argv: list[str] | None = None) -> int:
    """``python -m fastlsm.bench [options]``, the same as ``fastlsm bench [options]``."""
    parser = argparse.ArgumentParser(prog="fastlsm bench", description=DESCRIPTION)
    add_arguments(parser)
    return run_args(parser.parse_args(argv))
