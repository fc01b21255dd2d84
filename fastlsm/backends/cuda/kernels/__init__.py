"""numba-cuda kernels, by family; :mod:`.primitives` holds what they share."""
