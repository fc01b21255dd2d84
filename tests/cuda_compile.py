"""Compile every CUDA kernel to PTX for real hardware, with or without a GPU here.

Usage: ``python tests/cuda_compile.py 8.0 9.0`` (compute capabilities).  Prints one
``compiled <kernel> <dtype> sm_<cc>`` line per kernel, dtype and target; exits non-zero on the
first kernel that fails to compile, or if a kernel keeps a local array in local memory instead
of registers.  Run without the CUDA simulator (``NUMBA_ENABLE_CUDASIM=0``).
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
from numba import types
from numba.np.numpy_support import from_dtype


def signatures(dtype) -> dict[str, tuple]:
    """The argument types each kernel of fastlsm.backends.cuda.kernels is launched with, by the
    kernel's ``module.name``."""
    f = from_dtype(np.dtype(dtype))
    matrix, vector = types.Array(f, 2, "C"), types.Array(f, 1, "C")
    per_row, targets = types.Array(types.float64, 1, "C"), types.Array(types.int64, 1, "C")
    partials = types.Array(types.float64, 3, "C")
    flag, real, index = types.boolean, types.float64, types.int64
    return {
        "softmax.log_softmax_rows": (matrix, matrix, flag),
        "softmax.softmax_rows": (matrix, matrix, flag),
        "softmax.logsumexp_rows": (matrix, vector, flag),
        "softmax.segment_stats": (matrix, partials),
        "softmax.log_softmax_segments": (matrix, partials, matrix),
        "softmax.softmax_segments": (matrix, partials, matrix),
        "softmax.logsumexp_segments": (partials, vector),
        "backward.log_softmax_backward_rows": (matrix, matrix, matrix, flag),
        "backward.softmax_backward_rows": (matrix, matrix, matrix, flag),
        "backward.backward_segment_sums": (matrix, matrix, flag, partials),
        "backward.log_softmax_backward_segments": (matrix, matrix, partials, matrix),
        "backward.softmax_backward_segments": (matrix, matrix, partials, matrix),
        **_loss_signatures(matrix, vector, per_row, targets, partials, flag, real, index,
                           types.none),
        # The soft cap is a specialisation of its own (a float where the others have None).
        **{f"{name}{SOFTCAP}": signature for name, signature in _loss_signatures(
            matrix, vector, per_row, targets, partials, flag, real, index, real).items()
           if name != "loss.nll_loss_rows"},
        "reduce.check_targets": (targets, vector, index, per_row),
        "reduce.sum_rows": (per_row, real, vector),
        "reduce.swap_last_axes": (types.Array(f, 3, "C"), types.Array(f, 3, "C")),
        "reduce.cast": (vector, per_row),
        "reduce.widen_bfloat16": (types.Array(types.uint16, 1, "C"), vector),
        "reduce.round_to_bfloat16": (vector, types.Array(types.uint16, 1, "C")),
    }


SOFTCAP = "[softcap]"  # a signature key's suffix: the kernel compiled with a soft cap
# A coefficient of the soft cap's tanh series (2/15) as PTX writes it: in every kernel compiled
# with a soft cap, and in none compiled with None, whose cap numba-cuda must prune away.
SOFTCAP_MARK = {np.dtype(np.float32): "0f3E088889", np.dtype(np.float64): "0d3FC1111111111111"}


def _loss_signatures(matrix, vector, per_row, targets, partials, flag, real, index, softcap):
    return {
        "loss.cross_entropy_rows": (matrix, targets, vector, real, index, real, real, real,
                                    per_row, softcap, per_row, vector, matrix, flag),
        "loss.cross_entropy_segment_stats": (matrix, targets, vector, real, softcap, partials),
        "loss.cross_entropy_segments": (matrix, targets, vector, real, index, real, real, real,
                                        per_row, softcap, partials, per_row, vector, matrix),
        "loss.cross_entropy_probs_rows": (matrix, matrix, vector, real, real, real, per_row,
                                          softcap, per_row, vector, matrix, flag),
        "loss.cross_entropy_probs_segment_stats": (matrix, matrix, vector, real, softcap,
                                                   partials),
        "loss.cross_entropy_probs_segments": (matrix, matrix, vector, real, real, real, per_row,
                                              softcap, partials, per_row, vector, matrix),
        "loss.nll_loss_rows": (matrix, targets, vector, index, real, per_row, per_row, matrix,
                               flag),
    }


def kernels() -> dict[str, object]:
    """Every kernel (not device function) of the kernel modules, by ``module.name``."""
    import importlib

    from numba.cuda.dispatcher import CUDADispatcher
    found = {}
    for module in ("softmax", "backward", "loss", "reduce"):
        namespace = importlib.import_module(f"fastlsm.backends.cuda.kernels.{module}")
        for name, value in vars(namespace).items():
            if (isinstance(value, CUDADispatcher) and value.__module__ == namespace.__name__
                    and not value.targetoptions.get("device")):
                found[f"{module}.{name}"] = value
    return found


# Every kernel's local arrays (a thread's cached part of a row, its chunks) must stay in
# registers: local memory would be a second trip through L1.  A loop the compiler does not unroll
# whole, indexing one of them, puts it there.


def main(ccs: list[str]) -> int:
    from numba import cuda
    from numba.cuda import dispatcher

    found = kernels()
    missing = sorted(set(found) ^ {name.removesuffix(SOFTCAP) for name in signatures(np.float32)})
    if missing:
        print(f"FAILED: kernels and signatures differ: {missing}")
        return 1
    failures = 0
    for text in ccs:
        cc = tuple(int(part) for part in text.split("."))
        # Device functions are compiled for the current device's compute capability, and with no
        # GPU there is none: name the target instead (compile_ptx itself takes `cc`).
        dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=cc)
        for dtype in (np.float32, np.float64):
            for name, signature in signatures(dtype).items():
                kernel = found[name.removesuffix(SOFTCAP)]
                ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=cc)
                target = f"sm_{cc[0]}{cc[1]}"
                if f".target {target}" not in ptx:
                    print(f"FAILED {name} {np.dtype(dtype)}: the PTX is not for {target}")
                    failures += 1
                elif ".local" in ptx:
                    print(f"FAILED {name} {np.dtype(dtype)} {target}: uses local memory")
                    failures += 1
                elif name.startswith("loss.cross_entropy") and (
                        (SOFTCAP_MARK[np.dtype(dtype)] in ptx) != name.endswith(SOFTCAP)):
                    print(f"FAILED {name} {np.dtype(dtype)} {target}: the soft cap is "
                          f"{'missing' if name.endswith(SOFTCAP) else 'compiled in'}")
                    failures += 1
                else:
                    print(f"compiled {name} {np.dtype(dtype)} {target}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
