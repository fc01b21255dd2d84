"""``fastlsm bench``: the entry points run, print the tables, and write JSON and PNG output; the
op table's calls agree with its references."""

import json
import subprocess
import sys

import numpy as np
import pytest

from fastlsm import bench
from fastlsm.bench import command, cpu, floors, ops, timing

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
    assert rows.count("fastlsm") == 2 * len(ops.DEFAULT_OPS)
    assert "copy" in rows and "read" in rows            # "copy floor", "read floor"

    records = json.loads(path.read_text())
    assert {r["op"] for r in records} == set(ops.DEFAULT_OPS)
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
    for argv in (["--ops", "nope"], ["--shapes", "12"], ["--shapes", "0x4"], ["--dtype", "int8"],
                 ["--repeat", "0"], ["--repeat", "-1"], ["--threads", "0"], ["--budget", "-1"],
                 ["--budget", "nan"]):
        with pytest.raises(SystemExit) as exc:
            bench.main(argv)
        assert exc.value.code == 2, argv
    assert command.parse_shapes("8192x32000, 32x10") == [(8192, 32000), (32, 10)]


def test_outputs_it_cannot_write_are_refused_before_the_run(tmp_path, monkeypatch):
    """Refused before anything is timed: an unwritable path, an output the run does not make,
    a shape larger than the machine's memory."""
    monkeypatch.setattr(command.cpu, "run", lambda *a, **k: pytest.fail("the run started"))
    cases = [(["--json", str(tmp_path / "missing" / "x.json")], "not a file in a writable"),
             (["--plot", str(tmp_path)], "not a file in a writable"),
             (["--dask", "--json", str(tmp_path / "x.json")], "--json is not supported with"),
             (["--ops", "linear_cross_entropy", "--plot", str(tmp_path / "x.png")],
              "--plot is not supported with"),
             (["--shapes", "99999999999x99999999999"], "GiB an array; this machine has")]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            bench.main(argv)


def test_dask_refuses_the_options_it_would_ignore(monkeypatch):
    monkeypatch.setattr(command.cluster, "run", lambda *a, **k: pytest.fail("the run started"))
    for extra, named in ((["--ops", "softmax"], "--ops"), (["--device", "cuda"], "--device cuda"),
                         (["--threads", "1"], "--threads"), (["--budget", "5"], "--budget"),
                         (["--shapes", "8x10,4x10"], "a second --shapes entry"),
                         (["--dtype", "float32,float64"], "a second --dtype")):
        with pytest.raises(SystemExit, match=f"it does not take {named}$"):
            bench.main(["--dask", *extra])


def test_python_m_fastlsm_bench():
    done = subprocess.run([sys.executable, "-m", "fastlsm.bench", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "--device" in done.stdout, done.stderr


def test_slow_peers_get_one_sample_only_past_the_run_budget():
    assert not cpu.one_sample(0.1, spent_s=0.1, case_budget_s=2)
    assert cpu.one_sample(1.0, spent_s=0.5, case_budget_s=2)       # 5 more would overrun
    assert not cpu.one_sample(0.001, spent_s=99, case_budget_s=2)  # cheap: never
    assert not cpu.one_sample(5.0, spent_s=99, case_budget_s=0)    # 0: no cap


def test_every_peer_is_timed_even_past_the_budget(capsys):
    bench.main(["--ops", "logsumexp", "--shapes", "64x10", "--repeat", "2", "--quiet",
                "--budget", "1e-9", "--json", "/dev/null"])
    out = capsys.readouterr().out
    present = [name for name, version in ops.available_peers().items() if version]
    assert set(present) <= set(table_rows(out))
    summary = out[out.index("summary:"):].splitlines()
    assert summary[1].split()[:4] == ["op", "shape", "dtype", "fastlsm"]
    assert all(f"vs {name}" in summary[1] for name in present)
    assert summary[2].split()[:3] == ["logsumexp", "64x10", "float32"]


def test_the_floors_compute_what_they_time():
    x = ops.make_inputs((300, 500), np.float32)
    y = np.random.default_rng(3).standard_normal(x.x.shape).astype(np.float32)
    floors.parallel_copy(x.x, x.out)
    np.testing.assert_array_equal(x.out, x.x)
    np.testing.assert_array_equal(floors.parallel_add(x.x, y), x.x + y)
    np.testing.assert_allclose(floors.parallel_sum(x.x), x.x.sum(dtype=np.float64), rtol=1e-5)
    with pytest.raises(ValueError, match="C-contiguous"):
        floors.parallel_sum(x.x[:, ::2])
    for floor in ops.FLOORS.values():
        name, call = ops.fastest_way(floor, ops.for_op(ops.OPS["log_softmax_backward"], x),
                                     budget_s=0.001)
        assert ops.floor_ways(floor)[name] is call
    assert "np.copyto" in ops.floor_ways(ops.FLOORS["copy"])
    assert "numba prange" in ops.floor_ways(ops.FLOORS["read"])


def test_measure_loops_tiny_calls_and_honours_repeat():
    measured = timing.measure(lambda: None, budget_s=0.01, repeat=3)
    assert measured.samples == 3 and measured.calls_per_sample > 1 and measured.median_s > 0


def test_reference_matches_a_known_answer():
    x = np.array([[2.0, 1.0, 0.1]])
    np.testing.assert_allclose(ops.np_log_softmax(x), [[-0.4170, -1.4170, -2.3170]], atol=1e-4)
    loss, grad = ops.np_cross_entropy_grad(x, np.array([0]))
    np.testing.assert_allclose(grad.sum(), 0, atol=1e-12)
    np.testing.assert_allclose(loss, 0.4170, atol=1e-4)


@pytest.mark.parametrize("name", list(ops.OPS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_op_matches_its_reference_and_peers(name, dtype):
    """The table's fastlsm call, its NumPy reference on exact inputs and every installed peer
    compute the same thing: a wrong row in the table would make the benchmark time (or check
    against) something else."""
    op = ops.OPS[name]
    inputs = ops.for_op(op, ops.make_inputs((33, 70), np.dtype(dtype)))
    expected = op.reference(ops.reference_inputs(inputs))
    tolerance = 1e-5 if dtype == "float32" else 1e-12
    available = ops.available_peers()
    results = {"fastlsm": op.call(inputs)}
    results.update((peer, call(inputs)) for peer, call in ops.peers_of(op).items()
                   if available[peer])
    for contender, result in results.items():
        assert cpu.max_error(result, expected) < tolerance, contender


def test_bytes_moved_counts_reads_writes_and_targets():
    n, c = 1000, 50
    assert ops.bytes_moved(ops.OPS["log_softmax"], (n, c), "float32") == 2 * n * c * 4
    assert ops.bytes_moved(ops.OPS["logsumexp"], (n, c), "float64") == (n * c + n) * 8
    assert ops.bytes_moved(ops.OPS["cross_entropy_grad"], (n, c), "float32") == (
        (2 * n * c + 1) * 4 + 8 * n)
    assert ops.bytes_moved(ops.FLOORS["copy"], (n, c), "float32") == 2 * n * c * 4
    assert ops.bytes_moved(ops.FLOORS["read"], (n, c), "float32") == n * c * 4
    # (16384, 131072) float32: 8.6 GB an array
    assert ops.bytes_moved(ops.OPS["logsumexp"], (16384, 131072), "float32") == 2 ** 33 + 16384 * 4
    assert {op.floor for op in ops.OPS.values()} <= set(ops.FLOORS)


def test_linear_cross_entropy_beside_its_matmuls(tmp_path, capsys):
    path = tmp_path / "linear.json"
    assert bench.main(["--ops", "linear_cross_entropy", "--shapes", "64x8x300", "--repeat", "2",
                       "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "linear_cross_entropy 64x8x300 float32" in out and "numpy matmuls" in out
    [record] = json.loads(path.read_text())
    assert record["shape"] == [64, 8, 300] and record["logits_bytes"] == 64 * 300 * 4
    assert record["extra_peak_bytes"] > 0  # one chunk here: the logits' size, and a little
    assert {"fastlsm", "numpy matmuls"} <= set(record["seconds"])


def test_linear_cross_entropy_options_are_checked():
    for argv in (["--ops", "linear_cross_entropy,softmax"],
                 ["--ops", "linear_cross_entropy", "--shapes", "64x300"],
                 ["--ops", "softmax", "--shapes", "64x8x300"]):
        with pytest.raises(SystemExit, match="linear_cross_entropy|ROWSxCOLS"):
            bench.main(argv)
    with pytest.raises(SystemExit, match=r"--threads must be in 1\.\."):
        bench.main(["--ops", "linear_cross_entropy", "--shapes", "4x3x5", "--threads", "9999"])
    assert command.parse_shapes("4096x512x32000") == [(4096, 512, 32000)]
