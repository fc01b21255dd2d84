"""Numba CPU kernels, by family; :mod:`.stats` holds the statistics pass they share."""
