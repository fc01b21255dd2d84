"""Checks shared by the test modules."""

import numpy as np
import pytest

from fastlsm.backends.cpu import runtime


@pytest.fixture(autouse=True)
def no_kernel(monkeypatch):
    """Imported by a module, makes every call there fail if it reaches a kernel: for error tests,
    which must raise before any kernel starts."""
    def forbidden(kernel, *args):
        raise AssertionError(f"kernel {kernel} ran although the arguments are invalid")
    monkeypatch.setattr(runtime, "run", forbidden)


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
