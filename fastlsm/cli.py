"""The ``fastlsm`` command line."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from fastlsm import info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fastlsm", description="fastlsm's command line: its facts, its cache, its benchmark.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="print versions, threads, threading layer, cache and CUDA status")
    compile_ = commands.add_parser(
        "compile", help="fill Numba's on-disk cache with every CPU kernel, ahead of time",
        description="Compile every CPU kernel for the given dtypes into Numba's cache "
                    "(NUMBA_CACHE_DIR, else beside the package), for images and CI caches.")
    compile_.add_argument("--dtype", default="float32,float64",
                          help="comma-separated dtypes (default: float32,float64)")
    from fastlsm import bench
    bench.add_arguments(commands.add_parser(
        "bench", help="time fastlsm beside NumPy, SciPy, PyTorch, JAX and the memory floors",
        description=bench.DESCRIPTION))
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench.run_args(args)
    if args.command == "compile":
        from fastlsm._precompile import fill_cache
        from fastlsm.backends import base
        dtypes = args.dtype.split(",")
        for name in dtypes:
            try:
                if np.dtype(name) not in (np.float16, np.float32, np.float64):
                    raise TypeError
            except TypeError:
                parser.error(f"--dtype: {name!r} is not float16, float32 or float64")
        seconds = fill_cache(dtypes, progress=print)
        cache = base.get("cpu").info()["numba cache"]
        print(f"{'total':<20} {sum(seconds.values()):7.2f} s, cache: {cache}")
        return 0
    if args.command == "info":
        facts = info()
        width = max(map(len, facts))
        for name, value in facts.items():
            print(f"{name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
