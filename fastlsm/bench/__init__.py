"""``fastlsm bench``: fastlsm timed beside its peers and the memory floors.

Modules, each with one job:

* :mod:`~fastlsm.bench.ops`: the op table (call, NumPy reference, bytes moved, floor, peers) that
  the CPU and CUDA runs, the asv suite (``asv_bench/``) and the tests share;
* :mod:`~fastlsm.bench.timing`: host timing and how times print;
* :mod:`~fastlsm.bench.cpu`, :mod:`~fastlsm.bench.cuda`, :mod:`~fastlsm.bench.cluster`: the
  CPU run, the ``--device cuda`` run and the ``--dask`` run;
* :mod:`~fastlsm.bench.command`: the options, and which run they ask for.

The benchmark reaches fastlsm through its public API only.
"""

from fastlsm.bench.command import DESCRIPTION, add_arguments, main, run_args

__all__ = ["DESCRIPTION", "add_arguments", "main", "run_args"]
