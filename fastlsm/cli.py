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


def info() -> dict[str, str]:
    """Versions, threading and cache facts, as ``name -> value``."""
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
