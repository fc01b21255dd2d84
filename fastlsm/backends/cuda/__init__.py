"""The CUDA backend (:mod:`.backend`): host interop (:mod:`.arrays`), launch policy
(:mod:`.launch`), the ``(rows, classes)`` view (:mod:`.rows`), the operations (:mod:`.softmax`,
:mod:`.loss`) and the numba-cuda kernels (:mod:`.kernels`).  Imported only by a call that runs
on a CUDA device; a GPU is looked for on the first such call."""

from fastlsm.backends.cuda.backend import BACKEND

__all__ = ["BACKEND"]
