"""``fastlsm bench``: the entry points run, print the tables, and write JSON and PNG output."""

import json
import subprocess
import sys

import numpy as np
import pytest

from fastlsm import bench

TINY = ["--shapes", "64x10,4x300", "--repeat", "2", "--quiet"]


def table_rows(text: str) -> list[str]:
    return [line.split()[0] for line in text.splitlines() if line.startswith("  ")]


def test_main_prints_every_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert bench.main(TINY + ["--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("\nlog_softmax  64x10  float32") == 1
    assert out.count("\ncross_entropy_grad  4x300  float32") == 1
    rows = table_rows(out)
    assert rows.count("fastlsm") == 2 * len(bench.DEFAULT_OPS)
    assert "copy" in rows and "read" in rows            # "copy floor", "read floor"

    records = json.loads(path.read_text())
    assert {r["op"] for r in records} == set(bench.DEFAULT_OPS)
    assert {tuple(r["shape"]) for r in records} == {(64, 10), (4, 300)}
    for r in records:
        assert set(r) >= {"op", "shape", "dtype", "contender", "median_s", "gbps",
                          "floor_multiple", "speedup", "max_error"}
        assert r["dtype"] == "float32"
        assert r["median_s"] > 0 and r["gbps"] > 0 and r["floor_multiple"] > 0
        if r["kind"] == "floor":
            assert r["max_error"] is None and r["floor_multiple"] == 1.0
        else:
            assert 0 <= r["max_error"] < 1e-4
    ours = [r for r in records if r["contender"] == "fastlsm"]
    assert all(r["speedup"] == 1.0 for r in ours)


def test_every_table_starts_with_fastlsm(capsys):
    bench.main(["--ops", "logsumexp,cross_entropy", "--dtype", "float32,float64"] + TINY)
    lines = capsys.readouterr().out.splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("  contender")]
    assert len(headers) == 2 * 2 * 2
    assert all(lines[i + 1].split()[0] == "fastlsm" for i in headers)
    assert any(line.startswith("logsumexp  4x300  float64") for line in lines)


def test_cli_subcommand_in_a_subprocess(tmp_path):
    path = tmp_path / "b.json"
    done = subprocess.run(
        [sys.executable, "-m", "fastlsm.cli", "bench", "--ops", "log_softmax", "--shapes", "8x50",
         "--repeat", "1", "--threads", "1", "--json", str(path)],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "fastlsm" in table_rows(done.stdout) and "copy" in table_rows(done.stdout)
    assert "log_softmax 8x50 float32 fastlsm" in done.stderr    # progress goes to stderr
    assert json.loads(path.read_text())[0]["contender"] == "fastlsm"


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    bench.main(["--ops", "softmax,logsumexp"] + TINY + ["--plot", str(path)])
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_bad_options_are_refused(capsys):
    for argv in (["--ops", "nope"], ["--shapes", "12"], ["--shapes", "0x4"], ["--dtype", "int8"]):
        with pytest.raises(SystemExit) as exc:
            bench.main(argv)
        assert exc.value.code == 2
    assert bench.parse_shapes("8192x32000, 32x10") == [(8192, 32000), (32, 10)]


def test_slow_peers_are_skipped_only_past_the_run_budget():
    assert bench.skip_reason(1.0, spent_s=0.5, case_budget_s=2) is None
    assert "run budget" in bench.skip_reason(1.0, spent_s=1.5, case_budget_s=2)
    assert bench.skip_reason(0.001, spent_s=99, case_budget_s=2) is None     # cheap: never
    assert bench.skip_reason(5.0, spent_s=99, case_budget_s=0) is None       # 0: no cap


def test_measure_loops_tiny_calls_and_honours_repeat():
    timing = bench.measure(lambda: None, budget_s=0.01, repeat=3)
    assert timing.samples == 3 and timing.calls_per_sample > 1 and timing.median_s > 0


def test_reference_matches_a_known_answer():
    x = np.array([[2.0, 1.0, 0.1]])
    np.testing.assert_allclose(bench.np_log_softmax(x), [[-0.4170, -1.4170, -2.3170]], atol=1e-4)
    loss, grad = bench.np_cross_entropy_grad(x, np.array([0]))
    np.testing.assert_allclose(grad.sum(), 0, atol=1e-12)
    np.testing.assert_allclose(loss, 0.4170, atol=1e-4)
