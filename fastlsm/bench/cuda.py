"""``fastlsm bench --device cuda``: fastlsm on an NVIDIA GPU beside PyTorch's CUDA kernels.

Inputs are PyTorch CUDA tensors, which fastlsm reads in place and answers with PyTorch tensors
(:mod:`fastlsm.backends.cuda`), so both sides allocate their outputs the same way.  For every
dtype and shape: first ``dst.copy_(x)`` into a preallocated tensor, the memory floor (it reads
and writes ``N*C`` elements); then each op, checked against PyTorch and timed with CUDA events
(the median of ``--repeat`` calls after :data:`WARMUP_CALLS` untimed ones, which also compile
the kernels).
fastlsm's row also gives its *host* time, how long the Python call takes to return: where that
is close to the event time, the GPU waited on the host (launches, wrapping arrays, the target
check's copy back), not on memory.
Rows print as they complete.  A step that runs out of GPU memory says ``oom`` in its row and the
run goes on.  Exit status: 0; 1 when an error is over its limit or a step failed; 2 when PyTorch
and numba-cuda cannot both reach a CUDA GPU.

Layout: the ops, their calls and PyTorch's are the op table's (:data:`fastlsm.bench.ops.OPS`);
:func:`cases` picks its rows, :func:`check` compares; :func:`bench_shape` measures one input,
:func:`run` walks dtypes x shapes; :mod:`fastlsm.bench.cuda_report` checks and reports;
:func:`run_args` is the entry point, reached through :func:`fastlsm.bench.run_args`.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Iterator, Sequence

import numpy as np

import fastlsm
from fastlsm.bench.cuda_report import (CHECK_ROWS, Check, CudaRecord, array_check, check_rows,
                                       exit_status, format_header, format_row, loss_check,
                                       write_json)
from fastlsm.bench.ops import FLOORS, OPS, SCALE, Inputs, Op, bytes_moved, for_op
from fastlsm.bench.timing import shape_str

DEFAULT_SHAPES = ((8192, 32000), (65536, 1000), (16384, 131072), (4096, 262144))
REPS = 20                    # timed calls per measurement unless --repeat says otherwise
WARMUP_CALLS = 2
# An error passes when it is at most RTOL times the reference's scale (see array_check).
RTOL = {"float32": 1e-4, "float64": 1e-10}

# -------------------------------------------------------------------------------------------------
# The cases: the op table's ops that PyTorch has, on tensors


@dataclass(frozen=True)
class CudaCase:
    """One row of the table: an op of :data:`fastlsm.bench.ops.OPS`, allocating its result, or
    (``in_place``) writing it over a scratch copy of its input, as ``grad_out=x`` does."""

    name: str
    op: Op
    in_place: bool = False

    def inputs(self, x: Any, target: Any) -> Inputs:
        """The case's inputs; in place, a scratch copy of ``x`` is both input and output.

        Timed calls after the first then run on the previous result, which stays finite: the
        time does not depend on the values.
        """
        if self.in_place:
            scratch = x.clone()
            return Inputs(scratch, target, out=scratch)
        return for_op(self.op, Inputs(x, target))


def cases(names: Sequence[str]) -> list[CudaCase]:
    """The cases of the ``--ops`` names that PyTorch has, in table order; an op that may write
    over its input also runs that way."""
    found = []
    for op in OPS.values():
        if op.name in names and "torch" in op.peers:
            found.append(CudaCase(op.name, op))
            if op.in_place:
                found.append(CudaCase(f"{op.name}_inplace", op, in_place=True))
    return found


def _results(value: Any) -> tuple[Any, ...]:
    return value if isinstance(value, tuple) else (value,)


def check(case: CudaCase, x: Any, target: Any, rows: Any, rtol: float) -> list[Check]:
    """fastlsm's results against PyTorch's on the same input: a scalar (a loss) on its own, an
    array on ``rows``.  Named ``loss`` and ``grad`` where there are two, else ``abs``."""
    got = _results(case.op.call(case.inputs(x, target)))
    want = _results(case.op.peers["torch"](Inputs(x, target)))
    checks = []
    for got_value, want_value in zip(got, want, strict=True):
        if want_value.dim() == 0:
            checks.append(loss_check(got_value, want_value, rtol))
        else:
            name = "grad" if len(want) > 1 else "abs"
            checks.append(array_check(name, got_value.index_select(0, rows),
                                      want_value.index_select(0, rows), rtol,
                                      case.op.log_values))
    return checks


# -------------------------------------------------------------------------------------------------
# Measuring


@dataclass(frozen=True)
class EventTiming:
    """Medians of one call: between CUDA events around it, and until it returned to Python."""

    device_s: float
    host_s: float


def time_call(call: Callable[[], Any], reps: int) -> EventTiming:
    """`EventTiming` of ``call`` over ``reps`` calls after :data:`WARMUP_CALLS` untimed ones.

    The events go on PyTorch's current stream, the legacy default stream, which is also where
    numba-cuda launches fastlsm's kernels.  The queue is empty when each call starts, so the
    event time also counts the host's time to launch: a call that returns no sooner than its
    kernels end kept the GPU waiting.
    """
    import torch
    for _ in range(WARMUP_CALLS):
        call()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    device, host = [], []
    for _ in range(reps):
        start.record()
        started = time.perf_counter()
        call()
        host.append(time.perf_counter() - started)
        end.record()
        end.synchronize()
        device.append(start.elapsed_time(end) / 1e3)
    return EventTiming(float(np.median(device)), float(np.median(host)))


def is_out_of_memory(exc: BaseException) -> bool:
    """PyTorch's ``OutOfMemoryError``, or a driver's out-of-memory error raised through Numba."""
    text = str(exc).lower()
    return (type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text
            or "out_of_memory" in text)


def release_memory() -> None:
    """Hand freed GPU memory back, so that the next step (or numba-cuda) can allocate it."""
    import torch
    gc.collect()  # a failed step's traceback can keep its tensors alive in reference cycles
    torch.cuda.empty_cache()


def attempt(record: CudaRecord, step: str, work: Callable[[], Any],
            reported: set[str] | None = None) -> Any:
    """``work()``, or None where it raises: noted in ``record``, the traceback on stderr unless
    it ran out of memory or its message is in ``reported`` already (a fault that breaks every
    step would otherwise bury the table).  Freed memory is released either way."""
    try:
        return work()
    except Exception as exc:  # one step's failure must not lose the rest of a long run
        if is_out_of_memory(exc):
            record.notes.append(f"{step}: oom")
        else:
            record.crashed = True
            message = f"{type(exc).__name__}: {next(iter(str(exc).splitlines()), '')}"
            record.notes.append(f"{step}: {message}")
            if reported is None or message not in reported:
                traceback.print_exc()
            if reported is not None:
                reported.add(message)
        return None
    finally:
        release_memory()


def make_inputs(shape: tuple[int, int], dtype: str, device: str) -> tuple[Any, Any, Any]:
    """``(x, target, rows)``: scaled standard-normal logits, class targets, and the indices of
    :func:`check_rows`, all on ``device``."""
    import torch
    torch.manual_seed(0)
    x = torch.randn(shape, device=device, dtype=getattr(torch, dtype))
    x.mul_(SCALE)  # in place: no second full-size tensor
    target = torch.randint(0, shape[1], (shape[0],), device=device)
    rows = torch.tensor(check_rows(shape[0]), device=device)
    return x, target, rows


def _copy_call(x: Any) -> Callable[[], Any]:
    import torch
    destination = torch.empty_like(x)
    return lambda: destination.copy_(x)


def bench_shape(shape: tuple[int, int], dtype: str, rows_of: Sequence[CudaCase], reps: int,
                device: str = "cuda", progress: Callable[[str], None] = lambda line: None,
                reported: set[str] | None = None) -> Iterator[CudaRecord]:
    """The copy, then each op, on one input; each record is yielded as soon as it is measured.

    Parameters
    ----------
    shape : (int, int)
    dtype : str
        ``"float32"`` or ``"float64"``.
    rows_of : sequence of CudaCase
    reps : int
        Timed calls per measurement.
    device : str, optional
        Where the inputs are made; ``"cuda"`` but for tests.
    progress : callable, optional
        Called with a line before each step.
    reported : set of str, optional
        Messages of the exceptions whose tracebacks are printed already (see :func:`attempt`).

    Yields
    ------
    CudaRecord
    """
    name = f"{shape_str(shape)} {dtype}"
    copy = CudaRecord("copy", list(shape), dtype, bytes_moved(FLOORS["copy"], shape, dtype))
    progress(f"{name}: inputs and copy")
    inputs = attempt(copy, "inputs", lambda: make_inputs(shape, dtype, device), reported)
    if inputs is None:
        yield copy
        return
    x, target, rows = inputs
    timing = attempt(copy, "copy", lambda: time_call(_copy_call(x), reps), reported)
    if timing is not None:
        copy.time_s = copy.copy_s = timing.device_s
        copy.host_s = timing.host_s
    yield copy
    for case in rows_of:
        progress(f"{name}: {case.name}")
        yield measure_case(case, x, target, rows, copy.copy_s, reps, reported)
    inputs = x = target = rows = None   # free them before handing the memory back
    release_memory()


def measure_case(case: CudaCase, x: Any, target: Any, rows: Any, copy_s: float | None,
                 reps: int, reported: set[str] | None) -> CudaRecord:
    """One row: the check, fastlsm's time and PyTorch's, each step on its own (see
    :func:`attempt`)."""
    shape, dtype = tuple(x.shape), str(x.dtype).removeprefix("torch.")
    record = CudaRecord(case.name, list(shape), dtype, bytes_moved(case.op, shape, dtype),
                        copy_s=copy_s)
    record.checks = attempt(record, "check",
                            lambda: check(case, x, target, rows, RTOL[dtype]), reported) or []
    ours, theirs = case.inputs(x, target), Inputs(x, target)
    timing = attempt(record, "fastlsm", lambda: time_call(lambda: case.op.call(ours), reps),
                     reported)
    if timing is not None:
        record.time_s, record.host_s = timing.device_s, timing.host_s
    timing = attempt(record, "torch",
                     lambda: time_call(lambda: case.op.peers["torch"](theirs), reps), reported)
    record.torch_s = None if timing is None else timing.device_s
    return record



def run(shapes: Sequence[tuple[int, int]], dtypes: Sequence[str], op_names: Sequence[str],
        reps: int, emit: Callable[[str], None] = print,
        progress: Callable[[str], None] = lambda line: None,
        device: str = "cuda") -> list[CudaRecord]:
    """Benchmark every dtype x shape; ``emit`` the table's header, then each row as it completes.

    Parameters
    ----------
    shapes : sequence of (int, int)
    dtypes : sequence of str
    op_names : sequence of str
        ``--ops`` names (:func:`cases`); the copy always runs.
    reps : int
        Timed calls per measurement.
    emit, progress : callable, optional
        Take the table's lines, and the progress lines.
    device : str, optional
        Where the inputs are made; ``"cuda"`` but for tests.

    Returns
    -------
    list of CudaRecord
    """
    rows_of = cases(op_names)
    records = []
    reported: set[str] = set()
    emit(format_header())
    for dtype in dtypes:
        for shape in shapes:
            for record in bench_shape(shape, dtype, rows_of, reps, device, progress, reported):
                records.append(record)
                emit(format_row(record))
    return records


# -------------------------------------------------------------------------------------------------
# Command line


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def cuda_problem() -> str | None:
    """Why fastlsm and PyTorch cannot both run on a CUDA GPU here; None when they can."""
    try:
        import torch
    except Exception as exc:  # not installed, or a broken install that fails to load
        return f"needs PyTorch with CUDA support (import torch failed: {exc})"
    if not torch.cuda.is_available():
        return (f"PyTorch {torch.__version__} sees no CUDA GPU (torch.cuda.is_available() is "
                "False); this benchmark needs an NVIDIA GPU and a CUDA build of PyTorch")
    import numba
    if numba.config.ENABLE_CUDASIM:
        return ("NUMBA_ENABLE_CUDASIM is set, so fastlsm would run in Numba's CUDA simulator "
                "rather than on the GPU; unset it")
    try:
        from numba import cuda
    except ImportError as exc:
        return f"needs numba-cuda ({exc}); pip install 'fastlsm[cuda]'"
    if not cuda.is_available():
        return ("PyTorch sees a CUDA GPU but numba-cuda does not (numba.cuda.is_available() is "
                "False); check the numba-cuda install and the driver")
    return None


def describe_setup() -> str:
    """The GPU and the versions in use."""
    import torch
    return (f"fastlsm {fastlsm.__version__} bench --device cuda on {torch.cuda.get_device_name()}; "
            f"torch {torch.__version__} (CUDA {torch.version.cuda}), "
            f"numba-cuda {_version('numba-cuda')}, numba {_version('numba')}")


def run_args(args: argparse.Namespace) -> int:
    """Run ``fastlsm bench --device cuda`` from parsed arguments; the exit status.

    Uses ``--shapes`` (default :data:`DEFAULT_SHAPES`), ``--dtype``, ``--ops``, ``--repeat``
    (default :data:`REPS`), ``--json`` and ``--quiet``; ``--threads`` and ``--budget`` are the CPU
    run's and are ignored.
    """
    if args.plot:
        print("fastlsm bench: --plot is not supported with --device cuda", file=sys.stderr)
        return 2
    missing = [name for name in args.ops if "torch" not in OPS[name].peers]
    if missing:
        print(f"fastlsm bench --device cuda: PyTorch has no {', '.join(missing)} to compare with; "
              "leave it out of --ops", file=sys.stderr)
        return 2
    problem = cuda_problem()
    if problem:
        print(f"fastlsm bench --device cuda: {problem}", file=sys.stderr)
        return 2
    reps = max(1, args.repeat or REPS)
    print(describe_setup())
    print(f"Times: CUDA events, the median of {reps} calls after {WARMUP_CALLS} warm-up calls. "
          "copy: dst.copy_(x) into a preallocated tensor, which reads and writes N*C elements "
          "(the floor); 'x copy' is time over the copy's, also for the ops that only read. "
          "host: the median time the call took to return to Python (launches and all the "
          "host's work; near the event time, the GPU waited on the host). "
          "fastlsm and torch allocate their outputs; cross_entropy_grad_inplace writes the "
          "gradient over its input (grad_out=x), and its torch column is torch's forward and "
          "backward again. err vs torch: max |fastlsm - torch| on the first and last "
          f"{CHECK_ROWS} rows; for the loss, |difference| / max(1, |torch's loss|). Limits: "
          f"{RTOL['float32']:g} (float32) or {RTOL['float64']:g} (float64) times max(1, "
          "max|torch|) for log values, times max|torch| for probabilities and gradients.",
          flush=True)

    def progress(line: str) -> None:
        if not args.quiet:
            print(f"[cuda] {line}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    records = run(args.shapes or list(DEFAULT_SHAPES), args.dtype, args.ops, reps,
                  emit=lambda text: print(text, flush=True), progress=progress)
    failed = sum(not record.passed for record in records)
    out_of_memory = sum(any(note.endswith(": oom") for note in record.notes)
                        for record in records)
    print(f"total {time.perf_counter() - started:.1f} s; "
          + (f"FAILED: {failed} row(s) over a limit or with an error" if failed
             else "every check within its limit")
          + (f"; {out_of_memory} row(s) ran out of GPU memory" if out_of_memory else ""))
    if args.json:
        write_json(records, args.json)
        print(f"wrote {args.json}")
    return exit_status(records)
