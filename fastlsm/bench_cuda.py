"""``fastlsm bench --device cuda``: fastlsm on an NVIDIA GPU beside PyTorch's CUDA kernels.

Inputs are PyTorch CUDA tensors, which fastlsm reads in place and answers with PyTorch tensors
(:mod:`fastlsm._cuda`), so both sides allocate their outputs the same way.  For every dtype and
shape: first ``dst.copy_(x)`` into a preallocated tensor, the memory floor (it reads and writes
``N*C`` elements); then each op, checked against PyTorch and timed with CUDA events (the median of
``--repeat`` calls after :data:`WARMUP_CALLS` untimed ones, which also compile the kernels).
fastlsm's row also gives its *host* time, how long the Python call takes to return: where that
is close to the event time, the GPU waited on the host (launches, wrapping arrays, the target
check's copy back), not on memory.
Rows print as they complete.  A step that runs out of GPU memory says ``oom`` in its row and the
run goes on.  Exit status: 0; 1 when an error is over its limit or a step failed; 2 when PyTorch
and numba-cuda cannot both reach a CUDA GPU.

Layout: :data:`OPS` is the registry (one :class:`CudaOp` per op: how to build the timed fastlsm
and PyTorch calls, and the check); :func:`bench_shape` measures one input, :func:`run` walks
dtypes x shapes; :func:`format_rows` and :func:`write_json` report; :func:`run_args` is the entry
point, reached through :func:`fastlsm.bench.run_args`.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any, Callable, Iterator, Sequence

import numpy as np

import fastlsm
from fastlsm.bench import SCALE, format_time, shape_str

DEFAULT_CUDA_SHAPES = ((8192, 32000), (65536, 1000), (16384, 131072), (4096, 262144))
REPS = 20                    # timed calls per measurement unless --repeat says otherwise
WARMUP_CALLS = 2
CHECK_ROWS = 256             # the check compares this many rows at each end of the input
# An error passes when it is at most RTOL times the reference's scale (see array_check).
RTOL = {"float32": 1e-4, "float64": 1e-10}

# -------------------------------------------------------------------------------------------------
# Checks


@dataclass
class Check:
    """One comparison with PyTorch: ``error`` passes when it is at most ``limit``."""

    name: str
    error: float
    limit: float

    @property
    def ok(self) -> bool:
        return self.error <= self.limit  # a NaN error compares False: it fails


def array_check(name: str, got: Any, want: Any, rtol: float, log_scale: bool) -> Check:
    """The largest absolute difference of two tensors, computed in float64.

    Parameters
    ----------
    name : str
        What is compared (``"abs"``, ``"grad"``).
    got, want : torch.Tensor
        fastlsm's result and PyTorch's, of one shape.
    rtol : float
        The limit relative to the scale of ``want``.
    log_scale : bool
        Log values (log_softmax, logsumexp) are scaled by ``max(1, max|want|)``.  Probabilities and
        gradients are scaled by ``max|want|`` alone: they are far below 1 (a gradient's are about
        ``1/N``), so a limit of ``rtol`` itself would pass a gradient missing its ``-1`` at the
        target.

    Returns
    -------
    Check
    """
    want64 = want.double()
    error = (got.double() - want64).abs().max().item()
    magnitude = want64.abs().max().item()
    return Check(name, error, rtol * (max(1.0, magnitude) if log_scale else magnitude))


def loss_check(got: Any, want: Any, rtol: float) -> Check:
    """The difference of two scalar losses relative to ``max(1, |want|)``; the limit is ``rtol``."""
    got, want = float(got), float(want)
    return Check("loss", abs(got - want) / max(1.0, abs(want)), rtol)


def check_rows(n_rows: int, count: int = CHECK_ROWS) -> list[int]:
    """The rows the elementwise checks compare: the first and the last ``count``.

    The last rows are where a kernel's 32-bit element offset would overflow on the largest shapes.
    """
    head = range(min(n_rows, count))
    tail = range(max(count, n_rows - count), n_rows)
    return [*head, *tail]


# -------------------------------------------------------------------------------------------------
# The registry

Builder = Callable[[Any, Any], Callable[[], Any]]       # (x, target) -> the call to time
Checker = Callable[[Any, Any, Any, float], list[Check]]  # (x, target, rows, rtol) -> checks


def _fastlsm_forward(name: str) -> Builder:
    def build(x: Any, target: Any) -> Callable[[], Any]:
        if name == "cross_entropy":
            return lambda: fastlsm.cross_entropy(x, target)
        function = getattr(fastlsm, name)
        return lambda: function(x)
    return build


def _torch_forward(name: str) -> Builder:
    def build(x: Any, target: Any) -> Callable[[], Any]:
        import torch
        import torch.nn.functional as F
        if name == "cross_entropy":
            return lambda: F.cross_entropy(x, target)
        function = getattr(torch, name)
        return lambda: function(x, dim=-1)
    return build


def _fastlsm_grad(x: Any, target: Any) -> Callable[[], Any]:
    return lambda: fastlsm.cross_entropy(x, target, return_grad=True)


def _fastlsm_grad_inplace(x: Any, target: Any) -> Callable[[], Any]:
    # A scratch copy, as the call overwrites its input.  Timed calls after the first run on the
    # previous gradient, which stays finite: the time does not depend on the values.
    scratch = x.clone()
    return lambda: fastlsm.cross_entropy(scratch, target, grad_out=scratch)


def _torch_grad(x: Any, target: Any) -> Callable[[], Any]:
    import torch.nn.functional as F
    leaf = x.detach().requires_grad_(True)

    def forward_backward() -> None:
        leaf.grad = None  # else backward adds into the last call's gradient: an extra read
        F.cross_entropy(leaf, target).backward()
    return forward_backward


def _rowwise_check(name: str, log_scale: bool) -> Checker:
    def check(x: Any, target: Any, rows: Any, rtol: float) -> list[Check]:
        import torch
        got = getattr(fastlsm, name)(x).index_select(0, rows)
        want = getattr(torch, name)(x.index_select(0, rows), dim=-1)
        return [array_check("abs", got, want, rtol, log_scale)]
    return check


def _check_loss(x: Any, target: Any, rows: Any, rtol: float) -> list[Check]:
    import torch.nn.functional as F
    return [loss_check(fastlsm.cross_entropy(x, target), F.cross_entropy(x, target), rtol)]


def _grad_checks(x: Any, target: Any, rows: Any, rtol: float, loss: Any,
                 grad_rows: Any) -> list[Check]:
    """fastlsm's loss against PyTorch's on all rows, its gradient on ``rows``."""
    import torch.nn.functional as F
    want_loss = F.cross_entropy(x, target)
    # The rows of the mean loss's gradient: d(sum of these rows' losses / N) / d(rows), which
    # saves PyTorch's full-size backward here.
    leaf = x.index_select(0, rows).requires_grad_(True)
    (F.cross_entropy(leaf, target.index_select(0, rows), reduction="sum") / x.shape[0]).backward()
    return [loss_check(loss, want_loss, rtol),
            array_check("grad", grad_rows, leaf.grad, rtol, log_scale=False)]


def _check_grad(x: Any, target: Any, rows: Any, rtol: float) -> list[Check]:
    loss, grad = fastlsm.cross_entropy(x, target, return_grad=True)
    grad_rows = grad.index_select(0, rows)
    del grad  # one full-size result at a time
    return _grad_checks(x, target, rows, rtol, loss, grad_rows)


def _check_grad_inplace(x: Any, target: Any, rows: Any, rtol: float) -> list[Check]:
    scratch = x.clone()
    loss, grad = fastlsm.cross_entropy(scratch, target, grad_out=scratch)
    grad_rows = grad.index_select(0, rows)
    del grad, scratch
    return _grad_checks(x, target, rows, rtol, loss, grad_rows)


@dataclass(frozen=True)
class CudaOp:
    """One benchmarked op.

    ``fastlsm`` and ``torch`` build the call to time from ``(x, target)``, allocating any scratch
    it needs; ``check`` compares fastlsm with PyTorch.  ``selected_by`` is the ``--ops`` name that
    selects it; ``writes_output`` says whether it writes ``N*C`` elements besides reading them.
    """

    name: str
    selected_by: str
    writes_output: bool
    fastlsm: Builder
    torch: Builder
    check: Checker


def _forward_op(name: str, writes_output: bool, check: Checker) -> CudaOp:
    return CudaOp(name, name, writes_output, _fastlsm_forward(name), _torch_forward(name), check)


OPS: dict[str, CudaOp] = {op.name: op for op in (
    _forward_op("log_softmax", True, _rowwise_check("log_softmax", log_scale=True)),
    _forward_op("softmax", True, _rowwise_check("softmax", log_scale=False)),
    _forward_op("logsumexp", False, _rowwise_check("logsumexp", log_scale=True)),
    _forward_op("cross_entropy", False, _check_loss),
    CudaOp("cross_entropy_grad", "cross_entropy_grad", True, _fastlsm_grad, _torch_grad,
           _check_grad),
    CudaOp("cross_entropy_grad_inplace", "cross_entropy_grad", True, _fastlsm_grad_inplace,
           _torch_grad, _check_grad_inplace),
)}


def selected_ops(names: Sequence[str]) -> list[CudaOp]:
    """The ops that the ``--ops`` names select, in registry order."""
    return [op for op in OPS.values() if op.selected_by in names]


def bytes_moved(op: str, shape: tuple[int, int], dtype: str | np.dtype) -> int:
    """Bytes an op must move: it reads ``N*C`` elements, and writes as many where its output is
    as large as its input (the copy, log_softmax, softmax, the gradients).

    Parameters
    ----------
    op : str
        ``"copy"`` or a name in :data:`OPS`.
    shape : (int, int)
        ``(N, C)``.
    dtype : str or numpy.dtype

    Returns
    -------
    int
    """
    n, c = shape
    passes = 2 if op == "copy" or OPS[op].writes_output else 1
    return passes * n * c * np.dtype(dtype).itemsize


# -------------------------------------------------------------------------------------------------
# Measuring


@dataclass
class CudaRecord:
    """One row of the table, and one record of ``--json``."""

    op: str
    shape: list[int]
    dtype: str
    bytes_moved: int
    time_s: float | None = None      # fastlsm's median; on the copy row, the copy's
    host_s: float | None = None      # the same call's median time to return to Python
    torch_s: float | None = None
    copy_s: float | None = None      # the copy's median on the same input
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)   # "<step>: oom" or "<step>: <exception>"
    crashed: bool = False            # a step raised something other than running out of memory

    @property
    def gbps(self) -> float | None:
        return None if self.time_s is None else self.bytes_moved / self.time_s / 1e9

    @property
    def copy_multiple(self) -> float | None:
        if self.time_s is None or self.copy_s is None:
            return None
        return self.time_s / self.copy_s

    @property
    def speedup(self) -> float | None:
        """PyTorch's time over fastlsm's: above 1 where fastlsm is faster."""
        if self.time_s is None or self.torch_s is None:
            return None
        return self.torch_s / self.time_s

    @property
    def passed(self) -> bool:
        return not self.crashed and all(check.ok for check in self.checks)

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        for check, fields in zip(self.checks, record["checks"]):
            fields["ok"] = check.ok
        return {**record, "gbps": self.gbps, "copy_multiple": self.copy_multiple,
                "speedup": self.speedup, "passed": self.passed}


@dataclass(frozen=True)
class Timing:
    """Medians of one call: between CUDA events around it, and until it returned to Python."""

    device_s: float
    host_s: float


def time_call(call: Callable[[], Any], reps: int) -> Timing:
    """:class:`Timing` of ``call`` over ``reps`` calls after :data:`WARMUP_CALLS` untimed ones.

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
    return Timing(float(np.median(device)), float(np.median(host)))


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


def bench_shape(shape: tuple[int, int], dtype: str, ops: Sequence[CudaOp], reps: int,
                device: str = "cuda", progress: Callable[[str], None] = lambda line: None,
                reported: set[str] | None = None) -> Iterator[CudaRecord]:
    """The copy, then each op, on one input; each record is yielded as soon as it is measured.

    Parameters
    ----------
    shape : (int, int)
    dtype : str
        ``"float32"`` or ``"float64"``.
    ops : sequence of CudaOp
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
    copy = CudaRecord("copy", list(shape), dtype, bytes_moved("copy", shape, dtype))
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
    for op in ops:
        progress(f"{name}: {op.name}")
        record = CudaRecord(op.name, list(shape), dtype, bytes_moved(op.name, shape, dtype),
                            copy_s=copy.copy_s)
        record.checks = attempt(record, "check", lambda: op.check(x, target, rows, RTOL[dtype]),
                                reported) or []
        timing = attempt(record, "fastlsm", lambda: time_call(op.fastlsm(x, target), reps),
                         reported)
        if timing is not None:
            record.time_s, record.host_s = timing.device_s, timing.host_s
        timing = attempt(record, "torch", lambda: time_call(op.torch(x, target), reps), reported)
        record.torch_s = None if timing is None else timing.device_s
        yield record
    del x, target, rows, inputs
    release_memory()


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
        ``--ops`` names (:func:`selected_ops`); the copy always runs.
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
    ops = selected_ops(op_names)
    records = []
    reported: set[str] = set()
    emit(format_header())
    for dtype in dtypes:
        for shape in shapes:
            for record in bench_shape(shape, dtype, ops, reps, device, progress, reported):
                records.append(record)
                emit(format_row(record))
    return records


# -------------------------------------------------------------------------------------------------
# Reporting


def format_header() -> str:
    return (f"{'op':<28}{'shape':>14}{'dtype':>9}{'fastlsm':>11}{'host':>11}{'GB/s':>9}"
            f"{'x copy (r+w)':>14}{'torch':>11}{'speed-up':>10}  err vs torch")


def _time_cell(record: CudaRecord, seconds: float | None, step: str) -> str:
    """A time, or why there is none: ``oom``, ``error`` (a step failed) or ``-``."""
    if seconds is not None:
        return format_time(seconds)
    if f"{step}: oom" in record.notes or "inputs: oom" in record.notes:
        return "oom"
    if any(note.startswith(f"{step}: ") for note in record.notes):
        return "error"
    return "-"


def _errors_cell(record: CudaRecord) -> str:
    """The checks' errors (named where there are several), failures flagged, then the notes."""
    parts = []
    for check in record.checks:
        text = f"{check.error:.1e}"
        if len(record.checks) > 1:
            text = f"{check.name} {text}"
        if not check.ok:
            text += f" FAIL (limit {check.limit:.1e})"
        parts.append(text)
    text = ", ".join(parts) or "-"
    if record.notes:
        text += "  [" + "; ".join(record.notes) + "]"
    return text


def format_row(record: CudaRecord) -> str:
    """One row under :func:`format_header`."""
    gbps = "-" if record.gbps is None else f"{record.gbps:.1f}"
    multiple = "-" if record.copy_multiple is None else f"{record.copy_multiple:.2f}x"
    speedup = "-" if record.speedup is None else f"{record.speedup:.2f}x"
    time_step = "copy" if record.op == "copy" else "fastlsm"
    return (f"{record.op:<28}{shape_str(record.shape):>14}{record.dtype:>9}"
            f"{_time_cell(record, record.time_s, time_step):>11}"
            f"{_time_cell(record, record.host_s, time_step):>11}{gbps:>9}{multiple:>14}"
            f"{_time_cell(record, record.torch_s, 'torch'):>11}{speedup:>10}  "
            f"{_errors_cell(record)}")


def format_rows(records: Sequence[CudaRecord]) -> str:
    """The table: a header line and one row per record."""
    return "\n".join([format_header(), *map(format_row, records)])


def write_json(records: Sequence[CudaRecord], path: str) -> None:
    with open(path, "w") as f:
        json.dump([record.to_dict() for record in records], f, indent=1)


def exit_status(records: Sequence[CudaRecord]) -> int:
    """1 where a check is over its limit or a step failed, else 0 (running out of memory is not
    a failure: it is reported in the row)."""
    return 0 if all(record.passed for record in records) else 1


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

    Uses ``--shapes`` (default :data:`DEFAULT_CUDA_SHAPES`), ``--dtype``, ``--ops``, ``--repeat``
    (default :data:`REPS`), ``--json`` and ``--quiet``; ``--threads`` and ``--budget`` are the CPU
    run's and are ignored.
    """
    if args.plot:
        print("fastlsm bench: --plot is not supported with --device cuda", file=sys.stderr)
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
    records = run(args.shapes or list(DEFAULT_CUDA_SHAPES), args.dtype, args.ops, reps,
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
