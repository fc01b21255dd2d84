"""NVIDIA GPU kernels (numba-cuda).  Imported only by a call that runs on a CUDA device."""
