"""The CUDA backend: fastlsm's operations on NVIDIA GPUs (numba-cuda kernels), from their specs.

Kernels run on the legacy default stream, which waits for the work already queued on the
blocking streams (PyTorch's and CuPy's default streams among them), so device inputs are read
without a synchronisation per argument; work on a non-blocking stream must be synchronised by
the caller first.  Each operation runs inside one numba-cuda context scope
(:func:`~.arrays.one_context`) and first checks that a GPU is usable (a RuntimeError where not).
"""

from __future__ import annotations

from fastlsm import _spec
from fastlsm.backends.cuda import linear, loss, softmax
from fastlsm.backends.cuda.arrays import contiguous_in_place, library, one_context
from fastlsm.backends.cuda.kernels import backward as backward_kernels
from fastlsm.backends.cuda.kernels import softmax as softmax_kernels
from fastlsm.backends.cuda.rows import adjacent


def _arguments(spec) -> dict[str, _spec.Argument]:
    if isinstance(spec, _spec.Rowwise):
        return {"x": spec.x}
    if isinstance(spec, _spec.Backward):
        return {"grad_output": spec.grad_output, "output": spec.output}
    arguments = {"input": spec.input, "target": spec.target}
    return arguments if spec.weight is None else {**arguments, "weight": spec.weight}


class CudaBackend:
    """fastlsm on an NVIDIA GPU: device arrays of CuPy, PyTorch or Numba in, the same kind out;
    NumPy arrays copied over and back."""

    name = "cuda"

    def supports(self, spec) -> Exception | None:
        """The gaps: class axes that are not adjacent (the kernels see rows as one C-ordered
        run), Numba device arrays or outputs that are not C-ordered (read and written in
        place; CuPy and PyTorch inputs are made so by their own library), and
        ``linear_cross_entropy`` of NumPy input (its matmuls need the input's library: CuPy
        or PyTorch)."""
        if isinstance(spec, _spec.LinearLoss):
            if spec.input.placement == _spec.HOST:
                return TypeError("linear_cross_entropy on the CUDA backend takes CuPy arrays or "
                                 "PyTorch CUDA tensors (their library does the matmuls); NumPy "
                                 "input runs on the CPU, with device 'cpu' or 'auto'")
            return None
        axes = getattr(spec, "axes", None)
        if axes is not None and not adjacent(axes):
            name = "x" if isinstance(spec, _spec.Rowwise) else "grad_output"
            return ValueError(f"on a CUDA device the class axes of {name} must be adjacent, got "
                              f"{axes}")
        for name, arg in _arguments(spec).items():
            if (arg.placement == _spec.CUDA and library(arg.data) == "numba"
                    and not contiguous_in_place(arg.data)):
                return _spec.not_c_contiguous(name)
        name, out = (("grad_out", spec.grad_out) if isinstance(spec, _spec.Loss)
                     else ("out", getattr(spec, "out", None)))
        if out is not None and _spec.is_cuda_array(out) and not contiguous_in_place(out):
            return _spec.not_c_contiguous(name)
        return None

    @one_context
    def linear_cross_entropy(self, spec: _spec.LinearLoss):
        return linear.linear_cross_entropy(spec)

    @one_context
    def log_softmax(self, spec: _spec.Rowwise):
        return softmax.elementwise(softmax_kernels.LOG_SOFTMAX, spec)

    @one_context
    def softmax(self, spec: _spec.Rowwise):
        return softmax.elementwise(softmax_kernels.SOFTMAX, spec)

    @one_context
    def logsumexp(self, spec: _spec.Rowwise):
        return softmax.logsumexp(spec)

    @one_context
    def log_softmax_backward(self, spec: _spec.Backward):
        return softmax.backward_pass(backward_kernels.LOG_SOFTMAX_BACKWARD, spec)

    @one_context
    def softmax_backward(self, spec: _spec.Backward):
        return softmax.backward_pass(backward_kernels.SOFTMAX_BACKWARD, spec)

    @one_context
    def cross_entropy(self, spec: _spec.Loss):
        return loss.cross_entropy(spec)

    @one_context
    def nll_loss(self, spec: _spec.Loss):
        return loss.nll_loss(spec)

    def info(self) -> dict[str, str]:
        try:
            from numba import cuda
            if not cuda.is_available():
                return {"cuda usable": "no (no CUDA driver or GPU found)"}
            name = cuda.get_current_device().name
        except Exception as exc:  # any import or driver failure means "not usable", with the reason
            return {"cuda usable": f"no ({type(exc).__name__}: {exc})"}
        return {"cuda usable": f"yes ({name.decode() if isinstance(name, bytes) else name})"}


BACKEND = CudaBackend()
