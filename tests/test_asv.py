"""The asv suite (asv_bench/) runs, and the regression gate (asv_bench/regress.sh) works.

Everything runs through asv itself in the current environment (``-E existing``), at the suite's
tiny size (``FASTLSM_ASV_TINY=1``), with ``HOME`` in a scratch folder so that asv's machine file
stays out of the user's.  Skipped where asv is not installed (``pip install -e ".[asv]"``).
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("asv")

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "asv_bench"
SKIP_REASONS = ("has no", "is not installed", "float64 LLM")


def run(args, cwd, env, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("home")
    return {**os.environ, "FASTLSM_ASV_TINY": "1", "HOME": str(home), "PYTHON": sys.executable}


def test_every_benchmark_runs_once(tmp_path, env):
    """``asv run --quick`` runs each benchmark once, each in its own process, as asv does."""
    made = run([sys.executable, str(SUITE / "scratch_conf.py"), str(tmp_path)], ROOT, env)
    assert made.returncode == 0, made.stderr
    asv = [sys.executable, "-m", "asv"]
    conf = ["--config", made.stdout.strip()]
    machine = run([*asv, "machine", "--yes", *conf], ROOT, env)
    assert machine.returncode == 0, machine.stdout + machine.stderr
    done = run([*asv, "run", *conf, "-E", f"existing:{sys.executable}", "--quick",
                "--show-stderr"], ROOT, env)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out                      # 2 if any benchmark failed
    for name in ("ops.Time.time_op", "ops.FloorRatio.track_op", "ops.Layout.time_op",
                 "peers.Contenders.time_contender", "peers.PeakMem.peakmem_op",
                 "compile.FirstCalls.timeraw_first_calls", "compile.timeraw_import",
                 "linear.LinearLoss.time_call",
                 "linear.LinearLoss.track_matmul_ratio",
                 "linear.LinearLoss.track_extra_memory"):
        assert re.search(rf"\] ··· {re.escape(name)}\s+(ok|\d)", out), f"{name} did not run\n{out}"
    skips = re.findall(r"asv: skipped: NotImplementedError\('([^']*)'", out)
    assert skips and all(any(r in s for r in SKIP_REASONS) for s in skips), skips


# -------------------------------------------------------------------------------------------------
# The gate, on a throwaway repository: the working tree's package and suite committed as BASE,
# then commits that change nothing the benchmark sees, that slow log_softmax down, and that break
# it.  The gate measures log_softmax on (32, 10), float32 (the tiny suite's one dtype).
#
# On this project's shared 2-core VM an unchanged commit's times move by up to ~1.5x, and asv's
# statistics do not always call that noise, so these tests gate at a factor of 3.  The slowed
# commit adds 5 ms to a call of a few microseconds, hundreds of times more than either.

BENCH = r"ops.Time.time_op\('log_softmax', '32x10'"
SLOWED = '''
# Deliberately slowed for the regression gate's test.
import time as _time
_log_softmax = log_softmax


def log_softmax(*args, **kwargs):
    _time.sleep(0.005)
    return _log_softmax(*args, **kwargs)
'''
BROKEN = '''
# Deliberately broken for the regression gate's test.
def log_softmax(*args, **kwargs):
    raise RuntimeError("broken on purpose")
'''


def git(repo, *args) -> str:
    done = subprocess.run(["git", "-C", str(repo), "-c", "user.name=gate test",
                           "-c", "user.email=gate@test.invalid", *args],
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, dict]:
    """A git repository of the package and the suite; the SHAs of its commits by name."""
    repo = tmp_path_factory.mktemp("gate-repo")
    files = git(ROOT, "ls-files", "-co", "--exclude-standard", "--",
                "fastlsm", "asv_bench", "pyproject.toml", ".gitignore").splitlines()
    for name in files:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    git(repo, "init", "-q")
    shas = {}
    for name, path, text in (("base", None, None),
                             ("unchanged", "pyproject.toml", "\n"),
                             ("slowed", "fastlsm/__init__.py", SLOWED),
                             ("broken", "fastlsm/__init__.py", BROKEN)):
        if name == "broken":
            git(repo, "checkout", "-q", shas["unchanged"], "--", "fastlsm/__init__.py")
        if path:
            with open(repo / path, "a") as f:
                f.write(text)
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", name)
        shas[name] = git(repo, "rev-parse", "HEAD")
    return repo, shas


def gate(repo, env, base, head, *args) -> tuple[int, str]:
    done = run(["bash", "asv_bench/regress.sh", "--factor", "3", *args, base, head, "--",
                "-b", BENCH], repo, env)
    return done.returncode, done.stdout + done.stderr


def changed_rows(out: str) -> list[str]:
    return [line for line in out.splitlines() if re.match(r"\| *[-+!] *\|", line)]


def test_gate_fails_on_a_slowed_kernel(repo, env):
    path, shas = repo
    status, out = gate(path, env, shas["base"], shas["slowed"])
    assert status == 1, out
    rows = changed_rows(out)
    assert len(rows) == 1 and rows[0].startswith("| +"), out
    assert "FAILED: 1 benchmark(s) slower than a factor 3" in out


def test_gate_passes_on_an_unchanged_commit(repo, env):
    path, shas = repo
    status, out = gate(path, env, shas["base"], shas["unchanged"])
    assert status == 0, out
    assert not any(row.startswith(("| +", "| !")) for row in changed_rows(out)), out
    assert "passed: nothing slower than a factor 3" in out


def test_gate_fails_when_a_benchmark_breaks(repo, env):
    path, shas = repo
    status, out = gate(path, env, shas["base"], shas["broken"])
    assert status == 2, out
    assert "broken on purpose" in out
    assert "FAILED: benchmarks failed to run on HEAD" in out
