"""CPU kernels: plain Numba loops, one small function each.

Nothing here validates arguments: the dispatcher (:mod:`fastlsm._dispatch`) hands every kernel
C-ordered or strided 2-D float32/float64 arrays of shape ``(rows, classes)``.
"""
