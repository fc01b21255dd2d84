import os
import shutil
import sys
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
    at a barrier of their own: each posts its value, waits for the others and reads its
    partner's.  Shuffles alternate between two sets of slots, so a lane posting to a set again
    (two shuffles later) has passed the barrier of the shuffle between, which every lane reaches
    only after reading that set: one barrier a shuffle, not two (the barriers are most of the
    simulator's time in these kernels).
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
                warps[index] = (threading.Barrier(lanes), ([None] * 32, [None] * 32))
        return thread.thread_id % 32, *warps[index]

    def shfl_xor_sync(self, mask, value, lane_mask):
        lane, barrier, slot_sets = warp()
        thread = threading.current_thread()
        phase = thread.__dict__.get("fastlsm_phase", 0)
        thread.fastlsm_phase = 1 - phase
        slots = slot_sets[phase]
        slots[lane] = value
        barrier.wait()
        return slots[lane ^ lane_mask]

    def syncwarp(self, mask=0xFFFFFFFF):
        warp()[1].wait()

    kernelapi.FakeCUDAModule.shfl_xor_sync = shfl_xor_sync
    kernelapi.FakeCUDAModule.syncwarp = syncwarp


def _create_shared_arrays_once() -> None:
    """Make the simulator create each ``cuda.shared.array`` of a block once.

    Its ``FakeCUDAShared.array`` looks the block's array up by source line and creates it if it
    is missing, without a lock. Two threads can each create one. The thread left holding the
    discarded array writes where nobody reads, so a shared tile reads back ``np.empty``'s
    garbage: ``test_axes_and_keepdims[cuda-0]`` and ``test_gaps``' ``grad_out`` case failed 1
    run in ~8, with the short switch interval set below making the race likely. This is the
    same lookup, made under a lock. The caller's line is taken one frame up, as the original
    takes it.
    """
    from numba.core import types
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    lock = threading.Lock()
    unlocked = kernelapi.FakeCUDAShared.array

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory, or the refusal
            return unlocked(self, shape, dtype, alignment)
        frame = sys._getframe(1)
        caller = (frame.f_code.co_filename, frame.f_lineno)
        with lock:
            found = self._allocations.get(caller)
            if found is None:
                if isinstance(dtype, types.Type):
                    dtype = numpy_support.as_dtype(dtype)
                found = self._allocations[caller] = np.empty(shape, dtype)
        return found

    kernelapi.FakeCUDAShared.array = array


if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    _simulate_warp_intrinsics()
    _create_shared_arrays_once()
    # The simulated threads of a block hand the GIL on at every barrier, and a woken thread can
    # wait out the holder's switch interval (5 ms by default) first.  Measured: a split-row
    # log_softmax test took 42 s at the default and 11.6 s at 0.1 ms.
    sys.setswitchinterval(1e-4)

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
