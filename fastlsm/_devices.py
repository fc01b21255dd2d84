"""Which device runs a call: the ``device=`` keyword, :func:`set_default_device`, ``FASTLSM_DEVICE``.

``None`` / ``"auto"`` follows the data: the CUDA path for an array that lives on an NVIDIA GPU
(anything exposing ``__cuda_array_interface__``: CuPy arrays, Numba device arrays, PyTorch CUDA
tensors), the Dask path for a ``dask.array.Array``, the CPU for everything else.  Only the first
array argument (``x``, ``input``, ``grad_output``) decides; the others follow it to its device
(:mod:`fastlsm._cuda` copies host targets and weights over).  Nothing here imports Numba's CUDA
support, so importing fastlsm, or calling it on NumPy data, never initialises CUDA.
"""

from __future__ import annotations

import os
import sys

DEVICES = ("auto", "cpu", "cuda")


def _check(device, name: str) -> str | None:
    if device is None:
        return None
    if not isinstance(device, str) or device.lower() not in DEVICES:
        raise ValueError(f"{name} must be one of {DEVICES} or None, got {device!r}")
    device = device.lower()
    return None if device == "auto" else device


# Read once at import; set_default_device() changes it.
default_device: str | None = _check(os.environ.get("FASTLSM_DEVICE") or None, "FASTLSM_DEVICE")


def set_default_device(device: str | None) -> None:
    """Device for calls that pass no ``device=``: ``"cpu"``, ``"cuda"``, or ``"auto"``/None
    (the default: follow the data).  Starts from the ``FASTLSM_DEVICE`` environment variable."""
    global default_device
    default_device = _check(device, "device")


def get_default_device() -> str:
    """The device set by :func:`set_default_device` or ``FASTLSM_DEVICE``; ``"auto"`` if none."""
    return default_device or "auto"


def is_cuda_array(x) -> bool:
    """``x`` lives on an NVIDIA GPU (checked without importing or initialising CUDA)."""
    if type(x).__module__.startswith("torch"):
        return bool(getattr(x, "is_cuda", False))  # its interface raises for tensors with grad
    if hasattr(x, "__cuda_array_interface__"):
        return True
    # The CUDA simulator's device arrays carry no interface; they exist only once it is loaded.
    simulator = sys.modules.get("numba.cuda.simulator.cudadrv.devicearray")
    return simulator is not None and isinstance(x, simulator.FakeCUDAArray)


def is_dask_array(x) -> bool:
    """``x`` is a ``dask.array.Array`` (checked without importing Dask: an array can only be one
    once ``dask.array`` is imported)."""
    dask_array = sys.modules.get("dask.array")
    return (dask_array is not None and type(x).__module__.startswith("dask")
            and isinstance(x, dask_array.Array))


def backend(x, device):
    """The module that serves a call on ``x``: :mod:`fastlsm._cuda`, :mod:`fastlsm._dask`, or
    None for the CPU path (the caller's own code)."""
    device = _check(device, "device") or default_device
    if is_dask_array(x):
        if device is not None:
            raise ValueError(f"device={device!r} does not apply to a Dask array: each chunk runs "
                             "where its data lives (CuPy chunks on the GPU)")
        from fastlsm import _dask
        return _dask
    if device == "cuda" or (device is None and is_cuda_array(x)):
        from fastlsm import _cuda
        return _cuda
    if device == "cpu" and is_cuda_array(x):
        raise ValueError("device='cpu' was asked for, but the input lives on a CUDA device; copy "
                         "it to the host first (.get() for CuPy, .cpu() for PyTorch)")
    return None
