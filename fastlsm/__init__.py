"""fastlsm: fast, numerically stable log_softmax, softmax, logsumexp and cross-entropy kernels.

Importing fastlsm is cheap: Numba and the kernels load on the first call.
"""

from fastlsm._info import info
from fastlsm._linear import linear_cross_entropy
from fastlsm._loss import cross_entropy, nll_loss
from fastlsm._softmax import (
    log_softmax,
    log_softmax_backward,
    logsumexp,
    softmax,
    softmax_backward,
)
from fastlsm.backends.base import get_default_device, set_default_device

__version__ = "0.1.0"

__all__ = [
    "get_default_device",
    "info",
    "set_default_device",
    "cross_entropy",
    "linear_cross_entropy",
    "nll_loss",
    "log_softmax",
    "log_softmax_backward",
    "logsumexp",
    "softmax",
    "softmax_backward",
]
