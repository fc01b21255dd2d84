"""Checks shared by the test modules, and the backends that the shared tests run on."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest

from fastlsm import _spec
from fastlsm.backends.cpu import runtime

_RUN = runtime.run  # the CPU's one entry to its kernels, as it is before a test patches it


def _forbid_cpu_kernels(monkeypatch) -> None:
    def forbidden(kernel, *args):
        raise AssertionError(f"kernel {kernel} ran although the arguments are invalid")
    monkeypatch.setattr(runtime, "run", forbidden)


class Backend:
    """How a shared test runs on one backend: its arrays, its results, its kernels forbidden.

    ``array`` moves a NumPy array there (anything else, a list or a scalar, stays host data,
    which every backend takes), ``host`` brings such an array back as NumPy, ``result`` turns
    what a call returned into NumPy (computing it where it is lazy).  ``out_type`` is what the
    error for an ``out=`` that is not an array says it must be.
    """

    name = ""
    out_type = "a numpy.ndarray"
    # The ``device=`` that sends host data here (bfloat16, which only a PyTorch tensor holds on
    # a GPU); None: where the data lives.
    device = None

    def available(self) -> None:
        """Skips the test where this backend cannot run here."""

    def array(self, x):
        return x

    def host(self, a) -> np.ndarray:
        return np.asarray(a)

    def result(self, value):
        return value

    def forbid_kernels(self, monkeypatch) -> None:
        """Makes a kernel that starts fail the test (error tests: an error comes before any
        kernel runs)."""
        _forbid_cpu_kernels(monkeypatch)


class Cpu(Backend):
    name = "cpu"


# What a numba-cuda device array holds; the rest (object, str, longdouble, ...) a test passes
# as host data, as a caller would have to.
_DEVICE_DTYPES = frozenset(np.dtype(t) for t in (
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64, np.complex64, np.complex128))


class Cuda(Backend):
    """Numba device arrays (on the simulator where there is no GPU: conftest chooses)."""

    name = "cuda"
    out_type = "a device array for device input"
    device = "cuda"

    def available(self) -> None:
        cuda = pytest.importorskip("numba.cuda")
        if not cuda.is_available():
            pytest.skip("no CUDA device and no simulator")

    def array(self, x):
        if isinstance(x, np.ndarray) and x.dtype in _DEVICE_DTYPES:
            from numba import cuda
            return cuda.to_device(x)
        return x

    def host(self, a) -> np.ndarray:
        return a.copy_to_host() if _spec.is_cuda_array(a) else np.asarray(a)

    def result(self, value):
        if isinstance(value, tuple):
            return tuple(self.result(v) for v in value)
        if _spec.is_cuda_array(value):
            value = value.copy_to_host()
            return value[()] if value.ndim == 0 else value   # a 0-d result as NumPy's scalar
        return value

    def forbid_kernels(self, monkeypatch) -> None:
        """Every launch fails but those of the kernel that checks class-index targets (and sums
        the ``mean`` denominator) and of those it needs first, casts (of targets and weights,
        bfloat16 widened) and the weights' sum, all into scratch arrays: the targets' values
        are known only on the device, so these run before an out-of-range target raises."""
        super().forbid_kernels(monkeypatch)
        from fastlsm.backends.cuda import launch, rows
        from fastlsm.backends.cuda.kernels import reduce
        allowed = (reduce.check_targets, reduce.cast, reduce.widen_bfloat16, reduce.sum_rows)
        real = launch.launch

        def checked(kernel, blocks, threads, *args):
            if not any(kernel is k for k in allowed):
                raise AssertionError(f"kernel {kernel} ran although the arguments are invalid")
            real(kernel, blocks, threads, *args)
        monkeypatch.setattr(launch, "launch", checked)  # launch_rows and launch_segments too
        monkeypatch.setattr(rows, "launch", checked)    # imported by name there


def _chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Two chunks along every axis but the last (which is whole): rows are split across blocks,
    so a bad target's position is found in another block than the first; classes on the last
    axis give the whole-row graphs, classes on another axis the split-class ones."""
    return tuple(max(1, -(-n // 2)) for n in shape[:-1]) + shape[-1:]


def _computed_while_building(dsk, keys, **kwargs):
    raise AssertionError("a graph was computed while it was built")


class Dask(Backend):
    """Dask arrays of NumPy blocks, in two chunks along each axis but the last.

    A call only builds a graph: while it does, no kernel may run and nothing may be computed
    (the default scheduler fails), so every error the spec finds comes before any task, and
    building reads no target value.  ``result`` computes, kernels allowed: an out-of-range
    target is found only then, by the task that checks its block, and other blocks' tasks may
    have run by then (they write nothing of the caller's: Dask takes no ``out=``).
    """

    name = "dask"

    def available(self) -> None:
        pytest.importorskip("dask.array")

    def array(self, x):
        if isinstance(x, np.ndarray):
            import dask.array as da
            return da.from_array(x, chunks=_chunks(x.shape))
        return x

    def host(self, a) -> np.ndarray:
        return np.asarray(self.result(a))

    def result(self, value):
        import dask
        with mock.patch.object(runtime, "run", _RUN):
            return dask.compute(value, scheduler="synchronous")[0]

    def forbid_kernels(self, monkeypatch) -> None:
        super().forbid_kernels(monkeypatch)
        import dask
        monkeypatch.setitem(dask.config.config, "scheduler", _computed_while_building)


BACKENDS = (Cpu(), Cuda(), Dask())

# What a backend refuses, and the error it refuses it with: a case that asks for it expects this
# error on that backend (:func:`raises_on`).  By (backend, what is asked for).
GAPS = {
    ("dask", "out"): (TypeError, r"^out= is not supported for Dask arrays"),
    ("dask", "grad_out"): (TypeError, r"^grad_out= is not supported for Dask arrays"),
    # the kernels see a row as one C-ordered run of classes
    ("cuda", "non-adjacent axes"): (
        ValueError, r"^on a CUDA device the class axes of (x|grad_output) must be adjacent"),
    # Numba device arrays are read in place
    ("cuda", "not C-ordered"): (
        ValueError, r"^(x|grad_output) is a device array that is not C-contiguous"),
}


def raises_on(backend: Backend, exc, pattern: str, asks: str | None = None):
    """``pytest.raises`` for a case raising ``exc`` matching ``pattern``, or, where the case
    ``asks`` for what ``backend`` refuses, that refusal's error."""
    exc, pattern = GAPS.get((backend.name, asks), (exc, pattern))
    return pytest.raises(exc, match=pattern)


def only_on(*names: str):
    """Runs a test's ``backend`` only on the backends named."""
    chosen = [b for b in BACKENDS if b.name in names]
    return pytest.mark.parametrize("backend", chosen, ids=[b.name for b in chosen], indirect=True)


def assert_not_numba(excinfo):
    mod = type(excinfo.value).__module__
    assert not mod.startswith("numba"), f"a Numba error leaked: {excinfo.value!r}"
    assert "numba" not in str(excinfo.value).lower(), f"a Numba message leaked: {excinfo.value}"
    assert not isinstance(excinfo.value, AssertionError), "a kernel ran"


def assert_nonfinite_match(res, expected, what):
    """Same shape, nan at the same places, the same infinities, finite where ``expected`` is;
    returns the mask of finite expected values for the caller's tolerance check."""
    assert res.shape == expected.shape, f"{what}: shape {res.shape} != {expected.shape}"
    nan_res, nan_exp = np.isnan(res), np.isnan(expected)
    assert np.array_equal(nan_res, nan_exp), (
        f"{what}: nan positions differ; result nan at {np.argwhere(nan_res)[:10].tolist()}, "
        f"expected nan at {np.argwhere(nan_exp)[:10].tolist()}")
    inf = np.isinf(expected)
    assert np.array_equal(res[inf], expected[inf]), (
        f"{what}: infinities differ: got {res[inf][:10]}, expected {expected[inf][:10]}")
    finite = np.isfinite(expected)
    bad = ~np.isfinite(res[finite])
    assert not bad.any(), (f"{what}: non-finite result where the expected value is finite, at "
                           f"{np.argwhere(finite)[bad][:10].tolist()}")
    return finite


def logits(shape, dtype, rng, nonfinite=True):
    """Scaled normal logits; with ``nonfinite``, rows that are all -inf, hold +inf, hold a nan,
    and hold -inf beside finite values (as many of them as there are rows)."""
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    if nonfinite:
        specials = [np.full(shape[-1], -np.inf), None, None, None]
        row = x[0].copy()
        row[1] = np.inf
        specials[1] = row
        row = x[0].copy()
        row[-1] = np.nan
        specials[2] = row
        row = x[0].copy()
        row[: shape[-1] // 2] = -np.inf
        specials[3] = row
        for i, special in enumerate(specials[: shape[0]]):
            x[i] = special
    return x
