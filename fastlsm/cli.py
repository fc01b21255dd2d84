"""The ``fastlsm`` command line."""

from __future__ import annotations

import argparse
import sys

from fastlsm import info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastlsm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="print versions, threads, threading layer, cache and CUDA status")
    from fastlsm import bench
    bench.add_arguments(commands.add_parser(
        "bench", help="time fastlsm beside NumPy, SciPy, PyTorch, JAX and the memory floors",
        description=bench.DESCRIPTION))
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
