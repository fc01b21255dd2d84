"""The ``fastlsm`` command line."""

from __future__ import annotations

import argparse
import platform
import sys
from importlib import metadata


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cuda_status() -> str:
    try:
        from numba import cuda
        if cuda.is_available():
            name = cuda.get_current_device().name
            return f"yes ({name.decode() if isinstance(name, bytes) else name})"
        return "no (no CUDA driver or GPU found)"
    except Exception as exc:  # any import or driver failure means "not usable", with the reason
        return f"no ({type(exc).__name__}: {exc})"


def info() -> dict[str, str]:
    """Versions, threading and cache facts, as ``name -> value``."""
    import numba

    from fastlsm import _dispatch
    cache = getattr(_dispatch.kernel("log_softmax_rows").parallel, "_cache", None)
    return {
        "fastlsm": _version("fastlsm"),
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "numba": _version("numba"),
        "llvmlite": _version("llvmlite"),
        "threads": str(numba.get_num_threads()),
        "threading layer": _dispatch.threading_layer(),
        "numba cache": getattr(cache, "_cache_path", "unknown (this Numba hides it)"),
        "cuda usable": _cuda_status(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastlsm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="print versions, threads, threading layer, cache and CUDA status")
    from fastlsm import bench
    bench.add_arguments(commands.add_parser(
        "bench", help="time fastlsm beside NumPy, SciPy, PyTorch and the memory floors",
        description=bench.__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench.run_args(args)
    if args.command == "info":
        facts = info()
        width = max(map(len, facts))
        for name, value in facts.items():
            print(f"{name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
