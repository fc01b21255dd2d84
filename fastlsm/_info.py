"""What this installation runs on: versions, threads, the threading layer, the cache, CUDA."""

from __future__ import annotations

import platform
from importlib import metadata


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def info() -> dict[str, str]:
    """Versions, threading, cache and CUDA facts, as ``name -> value``.

    Each backend reports its own facts; a backend that cannot load says why instead.

    Returns
    -------
    dict of str to str
        What ``fastlsm info`` prints, in that order.

    Examples
    --------
    >>> import fastlsm
    >>> facts = fastlsm.info()
    >>> facts["fastlsm"] == fastlsm.__version__ and "threading layer" in facts
    True
    """
    from fastlsm.backends import base
    return {
        "fastlsm": _version("fastlsm"),
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "numba": _version("numba"),
        "llvmlite": _version("llvmlite"),
        **base.get("cpu").info(),
        **_cuda_info(),
    }


def _cuda_info() -> dict[str, str]:
    from fastlsm.backends import base
    try:
        return base.get("cuda").info()
    except Exception as exc:  # a broken numba-cuda install: CUDA is not usable, and why
        return {"cuda usable": f"no ({type(exc).__name__}: {exc})"}
