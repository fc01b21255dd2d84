"""Time to the first results in a fresh process: Numba compiling (cold) or loading its cache (warm).

asv times the code a ``timeraw_`` benchmark returns in a new Python process per sample; the
setup part of that code runs untimed in the same process.  ``import fastlsm`` does not import
Numba, so the timed part holds Numba's import and every kernel the first calls need.
"""

import shutil
import subprocess
import sys
import tempfile
import textwrap

# Untimed: make the inputs.
_SETUP = textwrap.dedent("""
    import numpy as np
    import fastlsm
    x = np.random.default_rng(0).standard_normal((32, 10), dtype=np.float32)
    t = np.zeros(32, dtype=np.int64)
""")
# Timed: the first call of each public operation (small inputs: the serial kernels).
_FIRST_CALLS = textwrap.dedent("""
    y = fastlsm.log_softmax(x)
    p = fastlsm.softmax(x)
    fastlsm.logsumexp(x)
    fastlsm.log_softmax_backward(x, y)
    fastlsm.softmax_backward(x, p)
    fastlsm.cross_entropy(x, t)
    fastlsm.cross_entropy(x, t, return_grad=True)
    fastlsm.nll_loss(y, t)
""")


class FirstCalls:
    """Every public operation's first call, float32.

    ``cold``: an empty ``NUMBA_CACHE_DIR`` of its own for every sample.  ``warm``: Numba's cache
    where the suite runs (``NUMBA_CACHE_DIR`` or beside fastlsm's source), filled by ``setup()``.
    """

    params = ["cold", "warm"]
    param_names = ["cache"]
    timeout = 600
    rounds = 1
    repeat = 3
    warmup_time = 0   # a warm-up sample would be one more compile

    def setup(self, cache):
        self.scratch = tempfile.mkdtemp(prefix="fastlsm-asv-numba-")   # for the cold caches
        if cache == "warm":
            subprocess.run([sys.executable, "-c", _SETUP + _FIRST_CALLS], check=True)

    def teardown(self, cache):
        shutil.rmtree(self.scratch, ignore_errors=True)

    def timeraw_first_calls(self, cache):
        # asv asks for the code once per sample (and runs setup() only once before them all).
        if cache == "warm":
            return _FIRST_CALLS, _SETUP
        folder = tempfile.mkdtemp(dir=self.scratch)
        return _FIRST_CALLS, f"import os\nos.environ['NUMBA_CACHE_DIR'] = {folder!r}\n{_SETUP}"


def timeraw_import():
    """``import fastlsm`` alone: it must stay cheap (Numba is imported on the first call)."""
    return "import fastlsm"
