import os
import shutil
import threading

import numpy as np
import pytest


def _has_nvidia_gpu() -> bool:
    return os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") is not None


# The GPU tests run everywhere: on a real GPU where there is one, else under Numba's CUDA
# simulator, which must be chosen before Numba is imported.
if "NUMBA_ENABLE_CUDASIM" not in os.environ and not _has_nvidia_gpu():
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"


def _simulate_warp_intrinsics() -> None:
    """Give the CUDA simulator the warp intrinsics fastlsm's kernels use, which it lacks
    (numba issue 8433): ``shfl_xor_sync`` and ``syncwarp``.

    The simulator runs each CUDA thread of a block as a Python thread.  The lanes of a warp meet
    at a barrier of their own: each posts its value, waits for the others, reads its partner's,
    and waits again so that no lane overwrites a value another has yet to read.
    """
    from numba.cuda.simulator import kernelapi

    lock = threading.Lock()

    def warp():
        thread = threading.current_thread()
        manager = thread._manager
        index = thread.thread_id // 32
        with lock:
            warps = manager.__dict__.setdefault("fastlsm_warps", {})
            if index not in warps:
                lanes = min(32, int(np.prod(manager._block_dim)) - 32 * index)
                warps[index] = (threading.Barrier(lanes), [None] * 32)
        return thread.thread_id % 32, *warps[index]

    def shfl_xor_sync(self, mask, value, lane_mask):
        lane, barrier, slots = warp()
        slots[lane] = value
        barrier.wait()
        partner = slots[lane ^ lane_mask]
        barrier.wait()
        return partner

    def syncwarp(self, mask=0xFFFFFFFF):
        warp()[1].wait()

    kernelapi.FakeCUDAModule.shfl_xor_sync = shfl_xor_sync
    kernelapi.FakeCUDAModule.syncwarp = syncwarp


if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    _simulate_warp_intrinsics()

from checks import BACKENDS  # noqa: E402  (imports Numba: after the simulator is chosen)


@pytest.fixture(params=BACKENDS, ids=[b.name for b in BACKENDS])
def backend(request, monkeypatch):
    """Each backend in turn, its kernels forbidden (a test that runs kernels calls
    ``monkeypatch.undo()``)."""
    request.param.available()
    request.param.forbid_kernels(monkeypatch)
    return request.param


@pytest.fixture(params=BACKENDS, ids=[b.name for b in BACKENDS])
def on(request):
    """Each backend in turn, computing: for the tests of values (a backend that cannot run here
    is skipped)."""
    request.param.available()
    return request.param


@pytest.fixture
def rng():
    """A generator with a fixed seed, fresh for every test, so failures reproduce."""
    return np.random.default_rng(20240607)
