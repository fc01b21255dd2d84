"""The Dask backend: fastlsm's operations on ``dask.array.Array`` inputs as lazy graphs, for any
Dask scheduler (the threaded one, or a ``dask.distributed`` cluster alike).

Every operation returns a lazy Dask array: of the input's shape, of its shape without the class
axes, or 0-d for a reduced loss.  Nothing is computed until the caller computes it.  How the
graph is built depends on how the class axes are chunked (:mod:`.softmax`, :mod:`.loss`): whole
rows in a block run the operation of the block's own backend (CuPy blocks on the GPU); a class
axis split across chunks runs the CPU's split-row kernels, which need NumPy blocks.  Dask is an
optional dependency (``pip install "fastlsm[dask]"``), imported only once a Dask array is seen.
"""

from __future__ import annotations

from fastlsm import _spec
from fastlsm.backends.dask import linear, loss, softmax


class DaskBackend:
    """fastlsm on Dask arrays: lazy graphs of fastlsm's kernels, one task a block."""

    name = "dask"

    def supports(self, spec) -> Exception | None:
        """Every spec: ``out=`` and ``grad_out=``, which make no sense for a lazy result, are
        refused by the spec for Dask input, and a class axis split across chunks of blocks that
        are not NumPy arrays (the split-row kernels are CPU kernels) when the graph is built
        (:func:`.graph.classes_split`)."""
        return None

    def log_softmax(self, spec: _spec.Rowwise):
        return softmax.log_softmax(spec)

    def softmax(self, spec: _spec.Rowwise):
        return softmax.softmax(spec)

    def logsumexp(self, spec: _spec.Rowwise):
        return softmax.logsumexp(spec)

    def log_softmax_backward(self, spec: _spec.Backward):
        return softmax.log_softmax_backward(spec)

    def softmax_backward(self, spec: _spec.Backward):
        return softmax.softmax_backward(spec)

    def cross_entropy(self, spec: _spec.Loss):
        return loss.cross_entropy(spec)

    def nll_loss(self, spec: _spec.Loss):
        return loss.nll_loss(spec)

    def linear_cross_entropy(self, spec: _spec.LinearLoss):
        return linear.linear_cross_entropy(spec)

    def info(self) -> dict[str, str]:
        from importlib import metadata
        try:
            return {"dask": metadata.version("dask")}
        except metadata.PackageNotFoundError:
            return {"dask": "not installed"}


BACKEND = DaskBackend()
