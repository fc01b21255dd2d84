"""The CPU backend (:mod:`.backend`), its layouts, runtime and Numba kernels; the Dask backend
uses its split-row API (:mod:`.split`).  Importing it imports Numba."""

from fastlsm.backends.cpu.backend import BACKEND

__all__ = ["BACKEND"]
