"""The package as a user meets it: import cost, the CLI, and the threading-layer fallback."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})


def test_import_does_not_load_numba():
    proc = run_python("""
        import sys, fastlsm
        print("numba" in sys.modules)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_calls_do_not_import_ml_dtypes():
    """bfloat16 is known by its dtype's name: a call on other data leaves ml_dtypes unloaded."""
    proc = run_python("""
        import sys, numpy as np, fastlsm
        fastlsm.log_softmax(np.ones((2, 3)))
        fastlsm.cross_entropy(np.ones((2, 3)), np.array([0, 1]), label_smoothing=0.1)
        print("ml_dtypes" in sys.modules)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_cli_info_reports_versions_threads_and_cache():
    proc = subprocess.run([sys.executable, "-m", "fastlsm.cli", "info"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    facts = dict(line.split(None, 1) if not line.startswith(("threading layer", "numba cache",
                                                              "cuda usable"))
                 else line.rsplit("  ", 1) for line in proc.stdout.splitlines())
    facts = {k.strip(): v.strip() for k, v in facts.items()}
    for name in ("fastlsm", "numpy", "numba", "llvmlite", "threads", "threading layer",
                 "numba cache", "cuda usable"):
        assert facts.get(name), (name, proc.stdout)
    assert int(facts["threads"]) >= 1
    assert facts["threading layer"] in {"omp", "tbb", "workqueue"}


@pytest.mark.parametrize("layer", ["bogus", "tbb"])
def test_cli_info_says_why_a_threading_layer_does_not_load(layer):
    """NUMBA_THREADING_LAYER naming a layer that does not load (tbb where it is not installed):
    ``fastlsm info`` still prints, and says why."""
    env = dict(os.environ, NUMBA_THREADING_LAYER=layer)
    proc = subprocess.run([sys.executable, "-m", "fastlsm.cli", "info"], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("threading layer"))
    assert line.split(None, 2)[2].startswith(("none: ", "tbb")), line


def test_cli_compile_refuses_dtypes_fastlsm_does_not_take():
    for name in ("longdouble", "int32", "complex64", "nope"):
        proc = subprocess.run([sys.executable, "-m", "fastlsm.cli", "compile", "--dtype", name],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "is not float16, float32 or float64" in proc.stderr, (
            name, proc.stderr)


def test_cli_compile_fills_the_cache_that_later_processes_load():
    """After ``fastlsm compile``, another process's calls -- other shapes, options, targets and
    layouts on the same kernel paths -- compile nothing: Numba's cache gains no file.  (The
    suite's own cache: in a run of the whole suite most of these kernels are there already.)"""
    proc = subprocess.run([sys.executable, "-m", "fastlsm.cli", "compile", "--dtype", "float32"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for layout in ("short rows", "rows", "columns", "strided", "total"):
        assert layout in proc.stdout, proc.stdout
    cache = Path(proc.stdout.rsplit("cache: ", 1)[1].strip())
    compiled = set(cache.rglob("*.nbc"))
    assert compiled, cache
    later = run_python("""
        import numpy as np, fastlsm
        rng = np.random.default_rng(1)
        for shape in [(3, 7), (50000, 12), (7, 333), (300, 2000)]:
            x = rng.standard_normal(shape).astype(np.float32)
            t = rng.integers(0, shape[1], shape[0])
            w = rng.random(shape[1]).astype(np.float32)
            fastlsm.log_softmax(x, out=np.empty_like(x))
            fastlsm.logsumexp(x.reshape(1, *shape), keepdims=True)
            fastlsm.softmax(x.T, axis=0)
            fastlsm.log_softmax(x[:, ::2])
            fastlsm.cross_entropy(x, t, w, label_smoothing=0.1, reduction="none")
            fastlsm.cross_entropy(x, t.astype(np.int32), ignore_index=1, z_loss=1e-4,
                                  return_grad=True)
            fastlsm.cross_entropy(x.T[None], t[None], grad_out=np.empty_like(x.T[None]))
            fastlsm.nll_loss(fastlsm.log_softmax(x.astype(np.float16)), t, w, reduction="sum")
    """)
    assert later.returncode == 0, later.stderr
    assert set(cache.rglob("*.nbc")) == compiled


def test_workqueue_layer_serialises_concurrent_calls_instead_of_aborting():
    # workqueue aborts the process when two threads enter parallel code at once; the dispatcher
    # must keep that from happening, and every result must still be right.
    proc = run_python("""
        from concurrent.futures import ThreadPoolExecutor
        import numpy as np, fastlsm
        from fastlsm.backends.cpu import runtime
        x = np.random.default_rng(0).standard_normal((512, 1000)).astype(np.float32)
        expected = fastlsm.log_softmax(x)
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: fastlsm.log_softmax(x), range(64)))
        assert all(np.array_equal(r, expected) for r in results)
        print(runtime.threading_layer())
    """, NUMBA_THREADING_LAYER="workqueue")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "workqueue"
