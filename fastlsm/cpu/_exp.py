"""Element-wise exp used inside the kernels (placeholder until the vectorised version lands)."""

import math

from numba import njit


@njit(inline="always")
def exp(x):
    return math.exp(x)
