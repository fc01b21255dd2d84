"""The Dask backend (:mod:`.backend`): graphs built of blockwise layers (:mod:`.graph`) for the
softmax family (:mod:`.softmax`) and the losses (:mod:`.loss`)."""

from fastlsm.backends.dask.backend import BACKEND

__all__ = ["BACKEND"]
