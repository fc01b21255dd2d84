"""What ``fastlsm bench --device cuda`` reports: the checks against PyTorch, the rows, the JSON
and the exit status (the measuring is :mod:`fastlsm.bench.cuda`'s)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from fastlsm.bench.timing import format_time, shape_str

CHECK_ROWS = 256             # the checks compare this many rows at each end of the input

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
# Rows


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
