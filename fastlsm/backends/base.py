"""The backend protocol, the registry of backends, and which backend runs a call.

A backend serves every public operation from its spec (:mod:`fastlsm._spec`): one method per
operation in :class:`Backend`.  It says what it cannot do in :meth:`Backend.supports`, which
returns the error to raise (a gap is an explicit, clear error, raised before any kernel runs)
or None.

Which backend: the ``device=`` keyword, else :func:`set_default_device` (which starts from the
``FASTLSM_DEVICE`` environment variable), else the data.  ``None``/``"auto"`` follows where the
first array argument lives (:func:`fastlsm._spec.placement`): the CUDA backend for an array on an
NVIDIA GPU (anything exposing ``__cuda_array_interface__``: CuPy arrays, Numba device arrays,
PyTorch CUDA tensors), the Dask backend for a ``dask.array.Array``, the CPU for everything else.
The other arguments follow the first one to its device (the CUDA backend copies host targets and
weights over).  A backend's module is imported when it is first chosen, so importing fastlsm, or
calling it on NumPy data, never imports Numba's CUDA support or Dask.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np

from fastlsm import _spec


# A loss without weights reads weights of 1.  Backends keep such arrays between calls for up to
# this many classes (at most 1 MiB each, for Llama 3's 128,256 classes in float64); for more they
# make one a call, which is small beside the call's input, rather than keep memory that scales
# with an input after the call has returned.
KEPT_UNIT_WEIGHT_CLASSES = 1 << 17


class Backend(Protocol):
    """What a backend provides: each public operation, from its spec."""

    name: str

    def supports(self, spec: Any) -> Exception | None:
        """The error to raise where this backend cannot serve ``spec``; None where it can."""

    def log_softmax(self, spec: _spec.Rowwise) -> Any: ...
    def softmax(self, spec: _spec.Rowwise) -> Any: ...
    def logsumexp(self, spec: _spec.Rowwise) -> Any: ...
    def log_softmax_backward(self, spec: _spec.Backward) -> Any: ...
    def softmax_backward(self, spec: _spec.Backward) -> Any: ...
    def cross_entropy(self, spec: _spec.Loss) -> Any: ...
    def nll_loss(self, spec: _spec.Loss) -> Any: ...
    def linear_cross_entropy(self, spec: _spec.LinearLoss) -> Any: ...

    def info(self) -> dict[str, str]:
        """Facts for ``fastlsm info`` (versions, threads, where kernels are cached)."""


@dataclass(frozen=True)
class Registration:
    """A backend: the module whose ``BACKEND`` it is, the data it owns (a
    :func:`fastlsm._spec.placement`), and the ``device=`` name that asks for it (None: chosen
    by its data alone)."""
    module: str
    placement: str
    device: str | None


REGISTRY: dict[str, Registration] = {
    "cpu": Registration("fastlsm.backends.cpu", _spec.HOST, "cpu"),
    "cuda": Registration("fastlsm.backends.cuda", _spec.CUDA, "cuda"),
    "dask": Registration("fastlsm.backends.dask", _spec.DASK, None),
}
DEVICES = ("auto", *(r.device for r in REGISTRY.values() if r.device))
_BY_PLACEMENT = {r.placement: name for name, r in REGISTRY.items()}
_BY_DEVICE = {r.device: name for name, r in REGISTRY.items() if r.device}


@functools.cache
def get(name: str) -> Backend:
    """The backend registered as ``name``, its module imported on first use."""
    return importlib.import_module(REGISTRY[name].module).BACKEND


# --- device selection --------------------------------------------------------------------------

def _check_device(device, name: str) -> str | None:
    if device is None:
        return None
    if not isinstance(device, str) or device.lower() not in DEVICES:
        raise ValueError(f"{name} must be one of {DEVICES} or None, got {device!r}")
    device = device.lower()
    return None if device == "auto" else device


def _from_environment() -> tuple[str | None, ValueError | None]:
    """``FASTLSM_DEVICE`` checked: ``(device, None)``, or for a bad value ``("invalid",
    its error)``, raised by the first call that goes by the default (not at import, so that a
    typo does not break ``import fastlsm`` or ``fastlsm --help``)."""
    try:
        return _check_device(os.environ.get("FASTLSM_DEVICE") or None, "FASTLSM_DEVICE"), None
    except ValueError as error:
        return "invalid", error  # not None: the fast paths, which skip _select, step aside


# Read once at import; set_default_device() changes it.
default_device, _environment_error = _from_environment()


def set_default_device(device: str | None) -> None:
    """Device for calls that pass no ``device=``: ``"cpu"``, ``"cuda"``, or ``"auto"``/None
    (the default: follow the data).  Starts from the ``FASTLSM_DEVICE`` environment variable."""
    global default_device, _environment_error
    default_device, _environment_error = _check_device(device, "device"), None


def get_default_device() -> str:
    """The device set by :func:`set_default_device` or ``FASTLSM_DEVICE``; ``"auto"`` if none."""
    return _checked_default() or "auto"


def _checked_default() -> str | None:
    if _environment_error is not None:
        raise _environment_error
    return default_device


def runs_on_cpu(device) -> bool:
    """Whether a call on host data with ``device=device`` runs on the CPU without a spec: the
    public functions' first test for their fast paths (a default device other than the data's
    takes the general path)."""
    return device == "cpu" or device is None and default_device is None


def _select(where: str, device) -> Backend:
    device = _check_device(device, "device") or _checked_default()
    if where == _spec.DASK:
        if device is not None:
            raise ValueError(f"device={device!r} does not apply to a Dask array: each chunk runs "
                             "where its data lives (CuPy chunks on the GPU)")
        return get("dask")
    if device is None:
        return get(_BY_PLACEMENT[where])
    if device == "cpu" and where == _spec.CUDA:
        raise ValueError("device='cpu' was asked for, but the input lives on a CUDA device; copy "
                         "it to the host first (.get() for CuPy, .cpu() for PyTorch)")
    return get(_BY_DEVICE[device])


def resolve(spec, device) -> Backend:
    """The backend that runs ``spec`` (its first array decides, with ``device``), once it has
    said that it supports it."""
    first = spec.grad_output if isinstance(spec, _spec.Backward) else (
        spec.x if isinstance(spec, _spec.Rowwise) else spec.input)
    backend = _select(first.placement, device)
    gap = backend.supports(spec)
    if gap is not None:
        raise gap
    return backend


def for_block(block) -> Backend:
    """The backend for one block of a Dask array: where the block's data lives."""
    return get(_BY_PLACEMENT[_spec.placement(block)])


# --- what the loss kernels take, on every backend ----------------------------------------------

class ClassIndexTerms(NamedTuple):
    """The class-index loss kernels' arguments after the targets (in this order): the class
    weights in the compute dtype, their sum (for label smoothing), ``ignore_index``, the label
    smoothing, the z-loss coefficient, the gradient's ``scale`` (:func:`gradient_scale`) and
    its ``row_scales`` (float64, one a row, or none: see
    :func:`fastlsm.backends.formulas.row_scale`)."""
    weight: Any
    total_weight: float
    ignore_index: int
    label_smoothing: float
    z_loss: float
    scale: float
    row_scales: Any


class ProbabilityTerms(NamedTuple):
    """The probability-target loss kernels' arguments after the targets (in this order)."""
    weight: Any
    label_smoothing: float
    z_loss: float
    scale: float
    row_scales: Any


def gradient_scale(spec: _spec.Loss, denominator: float) -> float:
    """The gradient's factor for every row: :func:`mean_scale` times ``grad_loss`` of a reduced
    loss (per-row factors, for ``none``, are the backend's ``row_scales``)."""
    return mean_scale(spec.reduction, denominator) * spec.grad_scale


def mean_scale(reduction: str, denominator: float) -> float:
    """The gradient's factor: 1, or for ``mean`` the inverse of its denominator (inf where it is
    0: then every row is ignored, and ignored rows write a gradient of 0 without it)."""
    if reduction != "mean":
        return 1.0
    return float("inf") if denominator == 0.0 else 1.0 / denominator


def linear_chunk_loss(loss: _spec.Loss, z: Any, targets: Any, reduced: bool,
                      grad_loss: Any) -> _spec.Loss:
    """The spec of ``linear_cross_entropy``'s loss on one chunk of rows: the logits ``z`` (rows
    of classes, the gradient written over them where one is wanted) and the chunk's
    ``targets``, summed where ``reduced`` (``grad_loss`` a number), else a loss a row
    (``grad_loss`` one a row, or None for 1s).  The chunk's loss comes back in float64, to be
    added to the other chunks' before the call rounds it once."""
    want_grad = loss.want_grad
    return _spec.loss(z, targets, None if loss.weight is None else loss.weight.data,
                      loss.ignore_index, "sum" if reduced else "none", loss.label_smoothing,
                      loss.z_loss, -1, want_grad, z if want_grad else None, False,
                      grad_loss=grad_loss if want_grad else None, softcap=loss.softcap or None,
                      loss_dtype=np.float64)


def class_indices_int64(flat: np.ndarray, ignore_index: int) -> np.ndarray:
    """Flat class indices (NumPy) as contiguous int64, for the kernels.

    uint64 values past int64's range would wrap to negative numbers, one of which may be
    ``ignore_index``: they become a value that is out of range for any class count and is not
    ``ignore_index``, so the check finds them (and names the original value).
    """
    if flat.dtype == np.uint64 and flat.size and flat.max() > _spec.INT64_MAX:
        beyond = _spec.INT64_MAX - (ignore_index == _spec.INT64_MAX)
        flat = np.minimum(flat, np.uint64(beyond))
    return np.ascontiguousarray(flat, dtype=np.int64)
