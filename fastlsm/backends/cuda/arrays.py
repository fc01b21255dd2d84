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

_TORCH_DTYPES = ("float16", "float32", "float64", "int64", "bfloat16")

BFLOAT16_WORDS = np.dtype(np.uint16)
"""How a bfloat16 array is seen on the device: as its 16-bit words.  Numba has no bfloat16, and
PyTorch's bfloat16 tensors have no ``__cuda_array_interface__``; their ``uint16`` views have.
The words are widened to float32 to compute (:func:`.rows.values`) and results rounded back to
them (:func:`.rows.cast_into`).  fastlsm's results are floating point, so a result or output view
of this dtype holds a bfloat16 result."""


def device_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype an array of ``dtype`` has on the device: :data:`BFLOAT16_WORDS` for bfloat16."""
    return BFLOAT16_WORDS if _spec.is_bfloat16(dtype) else dtype


def _interfaced(tensor):
    """A PyTorch tensor as one with a ``__cuda_array_interface__``: bfloat16 as its words."""
    import torch
    return tensor.view(torch.uint16) if tensor.dtype == torch.bfloat16 else tensor


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
    bfloat16: bool = False  # ``view`` holds the words of bfloat16 values (BFLOAT16_WORDS)


def on_device(arg: _spec.Argument) -> DeviceArray:
    """An argument on the device, C-ordered: host data is copied over; CuPy and PyTorch arrays
    that are not C-ordered are made so by their own library, on the device (a Numba device
    array is, as the backend's ``supports`` checked)."""
    x = arg.data
    bfloat16 = _spec.is_bfloat16(arg.dtype)
    if arg.placement == _spec.HOST:
        host = x if x.flags.c_contiguous else x.copy()
        view = cuda().to_device(host.view(device_dtype(host.dtype)))
        return DeviceArray(view, "numpy", host, bfloat16)
    whose = library(x)
    owner = x
    if whose == "torch":
        owner = x.detach()
        if not owner.is_contiguous():
            owner = owner.contiguous()
        return DeviceArray(cuda().as_cuda_array(_interfaced(owner), sync=False), whose, owner,
                           bfloat16)
    if whose == "cupy" and not x.flags.c_contiguous:
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
        return result, cuda().as_cuda_array(_interfaced(result), sync=False)
    result = cuda().device_array(shape, device_dtype(dtype))
    return result, result


def scratch(shape: tuple[int, ...], dtype, like: DeviceArray):
    """A device array for intermediate results, from ``like``'s library: PyTorch's and CuPy's
    allocators keep freed memory for reuse, where a Numba allocation is a cudaMalloc each time."""
    return empty(shape, dtype, like)[1]


def handed_back(result, like: DeviceArray, dtype: np.dtype):
    """The result (of ``dtype``) as the caller gets it: copied to the host for NumPy input."""
    if like.library == "numpy":
        host = result.copy_to_host().view(dtype)
        return host[()] if host.ndim == 0 else host
    return result


def out_view(out, shape: tuple[int, ...], dtype: np.dtype, like: DeviceArray,
             source) -> tuple[Any, bool]:
    """``(view, apart)``: the device view to write for a caller's ``out`` (checked by the spec),
    and whether it is a buffer apart that :func:`deliver` copies into ``out``: for a NumPy
    ``out`` of NumPy input, and for an ``out`` over other elements of the input ``source``,
    whose rows, run in parallel, would be overwritten before they are read (``out`` may be
    ``source`` itself, which costs no check)."""
    if like.library == "numpy":
        return cuda().device_array(shape, device_dtype(dtype)), True
    if (out is not source and _spec.shares_memory(out, source)
            and not _spec.same_device_elements(out, source)):
        return scratch(shape, device_dtype(dtype), like), True
    return _own_view(out), False


def _own_view(out):
    owner = _interfaced(out.detach()) if library(out) == "torch" else out
    return (cuda().as_cuda_array(owner, sync=False) if hasattr(owner, "__cuda_array_interface__")
            else owner)


def deliver(view, apart: bool, out, like: DeviceArray):
    """Hand back the caller's ``out``, filled from ``view`` where that is a buffer ``apart``
    (:func:`out_view`)."""
    if apart and like.library == "numpy":
        view.copy_to_host(out.view(view.dtype))
    elif apart:
        _own_view(out).copy_to_device(view)
    return out
