"""``fastlsm bench --device cuda``: the refusal without a GPU, the checks, the table and the JSON.

Without a GPU the whole pipeline of :func:`fastlsm.bench.cuda.run` runs on PyTorch CPU tensors,
with fastlsm's CPU kernels behind the interface the CUDA path has (torch tensors in, torch tensors
out) and a wall-clock timer in place of CUDA events.  On a GPU, one test runs the real thing.
"""

import argparse
import dataclasses
import json
import sys
import time
import types

import numpy as np
import pytest

import fastlsm
from fastlsm import bench, cli
from fastlsm.bench import cuda as bench_cuda
from fastlsm.bench import cuda_report, ops

ALL_OPS = list(ops.DEFAULT_OPS)
CASE_NAMES = [case.name for case in bench_cuda.cases(ALL_OPS)]


def torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def wall_time(call, reps):
    """:func:`bench_cuda.time_call` without CUDA events: on the CPU, the call's time and its
    time to return are one."""
    call()
    start = time.perf_counter()
    for _ in range(reps):
        call()
    seconds = (time.perf_counter() - start) / reps
    return bench_cuda.EventTiming(seconds, seconds)


def fastlsm_on_torch_cpu(torch, grad_offset=0.0):
    """fastlsm's CPU kernels with the CUDA path's interface; ``grad_offset`` spoils gradients."""
    def wrap(name):
        def call(x, out=None):
            assert out is None, "the CUDA run lets fastlsm allocate"
            return torch.from_numpy(getattr(fastlsm, name)(x.numpy()))
        return call

    def cross_entropy(x, target, return_grad=False, grad_out=None):
        result = fastlsm.cross_entropy(x.numpy(), target.numpy(), return_grad=return_grad,
                                       grad_out=None if grad_out is None else grad_out.numpy())
        if not isinstance(result, tuple):
            return torch.tensor(result)
        loss, grad = result
        grad = grad_out if grad_out is not None else torch.from_numpy(grad)
        return torch.tensor(loss), grad + grad_offset

    return types.SimpleNamespace(log_softmax=wrap("log_softmax"), softmax=wrap("softmax"),
                                 logsumexp=wrap("logsumexp"), cross_entropy=cross_entropy)


@pytest.fixture
def torch_cpu(monkeypatch):
    """PyTorch, with the op table's fastlsm calls set to run on its CPU tensors."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(ops, "fastlsm", fastlsm_on_torch_cpu(torch))
    monkeypatch.setattr(bench_cuda, "time_call", wall_time)
    return torch


def run_on_cpu(shapes, dtypes=("float32",), ops=ALL_OPS):
    lines = []
    records = bench_cuda.run(shapes, dtypes, ops, reps=2, emit=lines.append, device="cpu")
    return records, "\n".join(lines)


# -------------------------------------------------------------------------------------------------
# Refusals


def test_refuses_with_exit_2_and_one_line_when_torch_sees_no_gpu(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert cli.main(["bench", "--device", "cuda"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err
    assert lines[0].startswith("fastlsm bench --device cuda: ")
    assert "torch.cuda.is_available() is False" in lines[0]


def test_refuses_with_exit_2_without_torch(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)   # import torch now raises ImportError
    assert bench.main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "needs PyTorch with CUDA support" in err and "Traceback" not in err


def test_refuses_the_cuda_simulator(monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    import numba
    if not numba.config.ENABLE_CUDASIM:
        pytest.skip("the CUDA simulator is off")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert bench.main(["--device", "cuda"]) == 2
    assert "simulator" in capsys.readouterr().err


def test_refuses_plot(capsys, tmp_path):
    assert bench.main(["--device", "cuda", "--plot", str(tmp_path / "p.png")]) == 2
    assert "--plot is not supported with --device cuda" in capsys.readouterr().err


def test_shapes_default_per_device():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args([])
    assert args.device == "cpu" and args.shapes is None
    args = parser.parse_args(["--device", "cuda", "--shapes", "64x1000,8x40000"])
    assert args.device == "cuda" and args.shapes == [(64, 1000), (8, 40000)]
    assert bench_cuda.DEFAULT_SHAPES == ((8192, 32000), (65536, 1000), (16384, 131072),
                                              (4096, 262144))
    with pytest.raises(SystemExit):
        parser.parse_args(["--device", "tpu"])


# -------------------------------------------------------------------------------------------------
# Pure helpers


def test_cases_follow_ops_names():
    assert CASE_NAMES == ["log_softmax", "softmax", "logsumexp", "cross_entropy",
                          "cross_entropy_grad", "cross_entropy_grad_inplace"]
    assert [case.name for case in bench_cuda.cases(["cross_entropy_grad"])] == [
        "cross_entropy_grad", "cross_entropy_grad_inplace"]


def test_refuses_ops_pytorch_lacks(capsys):
    assert bench.main(["--device", "cuda", "--ops", "softmax_backward"]) == 2
    assert "PyTorch has no softmax_backward" in capsys.readouterr().err


def test_check_rows_takes_both_ends_once():
    assert cuda_report.check_rows(3) == [0, 1, 2]
    assert cuda_report.check_rows(300, count=256) == list(range(300))
    rows = cuda_report.check_rows(10000, count=4)
    assert rows == [0, 1, 2, 3, 9996, 9997, 9998, 9999]


def test_checks_scale_their_limits():
    torch = pytest.importorskip("torch")
    logs = torch.tensor([-30.0, -2.0])
    check = cuda_report.array_check("abs", logs + 1e-3, logs, 1e-4, log_scale=True)
    assert check.ok and check.limit == pytest.approx(3e-3)
    # a gradient missing its -1 at the target is off by about 1/N: over a limit scaled to it
    n = 65536
    grad = torch.tensor([1 / n, -1 / n])
    assert not cuda_report.array_check("grad", grad + 1 / n, grad, 1e-4, log_scale=False).ok
    assert not cuda_report.array_check("abs", logs * np.nan, logs, 1e-4, log_scale=True).ok
    assert cuda_report.loss_check(torch.tensor(10.0005), torch.tensor(10.0), 1e-4).ok
    assert not cuda_report.loss_check(torch.tensor(10.002), torch.tensor(10.0), 1e-4).ok
    assert not cuda_report.loss_check(float("nan"), 10.0, 1e-4).ok


def test_out_of_memory_is_recognised():
    class OutOfMemoryError(RuntimeError):
        pass
    assert bench_cuda.is_out_of_memory(OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert bench_cuda.is_out_of_memory(
        RuntimeError("[2] Call to cuMemAlloc results in CUDA_ERROR_OUT_OF_MEMORY"))
    assert not bench_cuda.is_out_of_memory(ValueError("bad shape"))


def fake_records():
    Check, Record = cuda_report.Check, cuda_report.CudaRecord

    def moved(name, shape, dtype):
        return ops.bytes_moved(ops.FLOORS[name] if name == "copy" else ops.OPS[name], shape, dtype)
    return [
        Record("copy", [8192, 32000], "float32", moved("copy", (8192, 32000), "float32"),
               time_s=1e-3, host_s=12e-6, copy_s=1e-3),
        Record("log_softmax", [8192, 32000], "float32",
               moved("log_softmax", (8192, 32000), "float32"), time_s=1.25e-3, host_s=150e-6,
               torch_s=2.5e-3, copy_s=1e-3, checks=[Check("abs", 2.4e-6, 3e-3)]),
        Record("cross_entropy_grad", [8192, 32000], "float32",
               moved("cross_entropy_grad", (8192, 32000), "float32"), time_s=2e-3, host_s=0.56e-3,
               torch_s=None, copy_s=1e-3, checks=[Check("loss", 1e-7, 1e-4), Check("grad", 5e-5, 1e-8)],
               notes=["torch: oom"]),
        Record("softmax", [8192, 32000], "float32", moved("softmax", (8192, 32000), "float32"),
               copy_s=1e-3, notes=["fastlsm: RuntimeError: boom"], crashed=True),
    ]


def test_format_rows():
    text = cuda_report.format_rows(fake_records())
    header, copy, log_softmax, grad, softmax = text.splitlines()
    assert header.split()[:5] == ["op", "shape", "dtype", "fastlsm", "host"]
    assert "x copy (r+w)" in header and header.endswith("err vs torch")
    assert copy.split() == ["copy", "8192x32000", "float32", "1.00", "ms", "12.0", "us", "2097.2",
                            "1.00x", "-", "-", "-"]
    assert log_softmax.split() == ["log_softmax", "8192x32000", "float32", "1.25", "ms", "150.0",
                                   "us", "1677.7", "1.25x", "2.50", "ms", "2.00x", "2.4e-06"]
    assert grad.split()[:12] == ["cross_entropy_grad", "8192x32000", "float32", "2.00", "ms",
                                 "560.0", "us", "1048.6", "2.00x", "oom", "-", "loss"]
    assert "grad 5.0e-05 FAIL (limit 1.0e-08)" in grad and grad.endswith("[torch: oom]")
    assert softmax.split()[3:9] == ["error", "error", "-", "-", "-", "-"]
    assert "[fastlsm: RuntimeError: boom]" in softmax
    # the columns line up
    assert len({line.index("float32") for line in text.splitlines()[1:]}) == 1


def test_records_pass_and_fail_and_write_json(tmp_path):
    records = fake_records()
    assert [r.passed for r in records] == [True, True, False, False]
    assert cuda_report.exit_status(records[:2]) == 0 and cuda_report.exit_status(records) == 1
    assert records[1].speedup == 2.0 and records[1].copy_multiple == 1.25
    path = tmp_path / "cuda.json"
    cuda_report.write_json(records, str(path))
    loaded = json.loads(path.read_text())
    assert [r["op"] for r in loaded] == ["copy", "log_softmax", "cross_entropy_grad", "softmax"]
    assert loaded[1]["gbps"] == pytest.approx(records[1].gbps)
    assert loaded[2]["checks"][1] == {"name": "grad", "error": 5e-5, "limit": 1e-8, "ok": False}
    assert loaded[2]["passed"] is False and loaded[2]["torch_s"] is None


# -------------------------------------------------------------------------------------------------
# The pipeline on PyTorch CPU tensors


def test_pipeline_checks_and_times_every_op(torch_cpu, tmp_path):
    records, text = run_on_cpu([(64, 1000), (600, 50)], dtypes=("float32", "float64"))
    per_input = ["copy", *CASE_NAMES]
    assert [r.op for r in records] == per_input * 4
    for record in records:
        assert record.passed, record
        assert record.time_s > 0 and record.copy_s > 0 and record.gbps > 0
        assert record.host_s == record.time_s  # wall_time's: one clock on the CPU
        if record.op == "copy":
            assert record.checks == [] and record.torch_s is None
        else:
            assert record.torch_s > 0 and record.checks and not record.notes
            for check in record.checks:
                assert 0 <= check.error <= check.limit
    grad = next(r for r in records if r.op == "cross_entropy_grad_inplace")
    assert [c.name for c in grad.checks] == ["loss", "grad"]
    assert len(text.splitlines()) == 1 + len(records)
    assert cuda_report.exit_status(records) == 0


def test_pipeline_flags_a_wrong_gradient(torch_cpu, monkeypatch):
    # off by 1/N, as a gradient that lost its -1 at the target would be
    n = 4096
    monkeypatch.setattr(ops, "fastlsm", fastlsm_on_torch_cpu(torch_cpu, grad_offset=1 / n))
    records, text = run_on_cpu([(n, 100)], ops=["cross_entropy_grad"])
    assert [r.passed for r in records] == [True, False, False]
    assert cuda_report.exit_status(records) == 1
    assert text.count("FAIL") == 2


def test_pipeline_goes_on_after_oom_and_errors(torch_cpu, monkeypatch, capsys):
    def out_of_memory(inputs):
        raise torch_cpu.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    def broken(*args):
        raise ValueError("kernel launch failed")

    table = ops.OPS
    monkeypatch.setitem(table, "softmax", dataclasses.replace(
        table["softmax"], peers={**table["softmax"].peers, "torch": out_of_memory}))
    monkeypatch.setitem(table, "logsumexp", dataclasses.replace(table["logsumexp"], call=broken))
    records, text = run_on_cpu([(32, 100)], ops=["log_softmax", "softmax", "logsumexp",
                                                 "cross_entropy"])
    by_op = {r.op: r for r in records}
    # the check runs PyTorch's call on the same input: out of memory there too
    assert by_op["softmax"].torch_s is None
    assert by_op["softmax"].notes == ["check: oom", "torch: oom"]
    assert by_op["softmax"].passed and by_op["softmax"].time_s > 0
    assert by_op["logsumexp"].crashed and not by_op["logsumexp"].passed
    assert by_op["logsumexp"].notes == ["check: ValueError: kernel launch failed",
                                        "fastlsm: ValueError: kernel launch failed"]
    assert by_op["logsumexp"].torch_s > 0                        # the other steps still ran
    assert by_op["cross_entropy"].passed and by_op["cross_entropy"].time_s > 0
    err = capsys.readouterr().err
    assert err.count("ValueError: kernel launch failed") == 1   # one traceback for both calls
    assert cuda_report.exit_status(records) == 1
    softmax_row = next(line for line in text.splitlines() if line.startswith("softmax "))
    assert softmax_row.split()[9] == "oom"


# -------------------------------------------------------------------------------------------------
# On a GPU


@pytest.mark.skipif(not torch_cuda_available(), reason="needs PyTorch with a CUDA GPU")
def test_on_the_gpu(tmp_path, capsys):
    path = tmp_path / "cuda.json"
    code = cli.main(["bench", "--device", "cuda", "--shapes", "64x1000,8x40000", "--repeat", "3",
                     "--json", str(path)])
    out = capsys.readouterr().out
    assert code == 0, out
    records = json.loads(path.read_text())
    assert [r["op"] for r in records] == ["copy", *CASE_NAMES] * 2
    for record in records:
        assert record["passed"] and not record["notes"], record
        assert record["time_s"] > 0 and record["host_s"] > 0
        if record["op"] != "copy":
            assert record["torch_s"] > 0 and record["checks"]
    assert "every check within its limit" in out
