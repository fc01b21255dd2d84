"""The CUDA backend's arrays: the caller's device arrays (CuPy, PyTorch, Numba) seen as Numba
device arrays in place, NumPy data copied over, and results made by the input's own library.

Device inputs are used in place (no host round-trip) and results are allocated by the input's
own library, so they come back as the same kind of array: CuPy in, CuPy out; PyTorch in, PyTorch
out; a Numba device array otherwise.  NumPy input (``device="cuda"``) is copied over and its
results copied back.  Targets, weights and probability targets given on the host follow the
logits to the GPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastlsm import _spec

_TORCH_DTYPES = ("float16", "float32", "float64", "int64")


@functools.cache
def cuda():
    """``numba.cuda``, once it is known to reach a GPU (or the simulator)."""
    try:
        from numba import cuda
    except ImportError as exc:  # pragma: no cover - numba always ships numba.cuda
        raise RuntimeError(f"device='cuda' needs numba-cuda ({exc}); pip install "
                           "'fastlsm[cuda]'") from None
    if not cuda.is_available():
        raise RuntimeError("device='cuda' was asked for, but no usable CUDA GPU and driver were "
                           "found (numba.cuda.is_available() is False); use device='cpu'")
    return cuda


def one_context(entry_point):
    """``entry_point`` run inside one numba-cuda context scope (``cuda.require_context``).
    Outside a scope, each of numba's API calls in it (``as_cuda_array``, ``device_array``,
    copies) asks the driver for the current context and looks up its primary context again;
    inside one they find both in thread-local storage."""
    @functools.wraps(entry_point)
    def call(*args, **kwargs):
        return _scoped(entry_point)(*args, **kwargs)
    return call


@functools.cache
def _scoped(entry_point):
    return cuda().require_context(entry_point)


def library(x) -> str:
    """Whose array ``x`` is: ``"torch"``, ``"cupy"`` or ``"numba"`` (a device array), or
    ``"numpy"`` (host data)."""
    module = type(x).__module__
    if type(x) is np.ndarray:
        return "numpy"
    if module.startswith("torch"):
        return "torch"
    if module.startswith("cupy"):
        return "cupy"
    return "numba"


def contiguous_in_place(x) -> bool:
    """Whether a device array can be read and written where it is: C-ordered, or one whose own
    library makes it so on the device (CuPy, PyTorch) when it is only read."""
    whose = library(x)
    if whose == "torch":
        return x.is_contiguous()
    if whose == "cupy":
        return x.flags.c_contiguous
    return x.is_c_contiguous()


@dataclass
class DeviceArray:
    """A caller's array seen as a C-ordered device array (``view``), and whose it was."""
    view: Any       # numba device array (the simulator's in CI)
    library: str    # "numpy" (copied over), "numba", "cupy" or "torch"
    owner: Any      # the caller's object, or the contiguous copy made of it


def on_device(arg: _spec.Argument) -> DeviceArray:
    """An argument on the device, C-ordered: host data is copied over; CuPy and PyTorch arrays
    that are not C-ordered are made so by their own library, on the device (a Numba device
    array is, as the backend's ``supports`` checked)."""
    x = arg.data
    if arg.placement == _spec.HOST:
        host = x if x.flags.c_contiguous else x.copy()
        return DeviceArray(cuda().to_device(host), "numpy", host)
    whose = library(x)
    owner = x
    if whose == "torch":
        owner = x.detach()
        if not owner.is_contiguous():
            owner = owner.contiguous()
    elif whose == "cupy" and not x.flags.c_contiguous:
        import cupy
        owner = cupy.ascontiguousarray(x)
    view = (cuda().as_cuda_array(owner, sync=False) if hasattr(owner, "__cuda_array_interface__")
            else owner)
    return DeviceArray(view, whose, owner)


def empty(shape: tuple[int, ...], dtype, like: DeviceArray):
    """``(result, view)``: a new array of ``like``'s library and its device view."""
    dtype = np.dtype(dtype)
    if like.library == "cupy":
        import cupy
        result = cupy.empty(shape, dtype)
        return result, cuda().as_cuda_array(result, sync=False)
    if like.library == "torch" and dtype.name in _TORCH_DTYPES:
        import torch
        result = torch.empty(shape, dtype=getattr(torch, dtype.name), device=like.owner.device)
        return result, cuda().as_cuda_array(result, sync=False)
    result = cuda().device_array(shape, dtype)
    return result, result


def scratch(shape: tuple[int, ...], dtype, like: DeviceArray):
    """A device array for intermediate results, from ``like``'s library: PyTorch's and CuPy's
    allocators keep freed memory for reuse, where a Numba allocation is a cudaMalloc each time."""
    return empty(shape, dtype, like)[1]


def handed_back(result, like: DeviceArray):
    """The result as the caller gets it: copied to the host for NumPy input."""
    if like.library == "numpy":
        host = result.copy_to_host()
        return host[()] if host.ndim == 0 else host
    return result


def out_view(out, shape: tuple[int, ...], dtype: np.dtype, like: DeviceArray):
    """The device view to write for a caller's ``out`` (checked by the spec): a NumPy ``out``
    for NumPy input gets a device buffer, copied into it by :func:`deliver`."""
    if like.library == "numpy":
        return cuda().device_array(shape, dtype)
    owner = out.detach() if library(out) == "torch" else out
    return (cuda().as_cuda_array(owner, sync=False) if hasattr(owner, "__cuda_array_interface__")
            else owner)


def deliver(view, out, like: DeviceArray):
    """Hand back the caller's ``out``, filled from ``view`` where it is a host array."""
    if like.library == "numpy":
        view.copy_to_host(out)
    return out
