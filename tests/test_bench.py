"""Smoke tests of the benchmark harness on the CPU (not timings: the harness runs end to end and writes its files)."""

import csv
import math
import os
import subprocess
import sys

import torch

from flash_fx.bench import bars, check
from flash_fx.bench.report import stream_csv
from flash_fx.bench.roofline import Ceilings, attention_min_bytes
from flash_fx.bench.sparse import block_layout
from flash_fx.bench.timing import Deadline


def test_block_layout_density():
    layout = block_layout(1000, 100, 0.3)
    assert layout.shape == (10, 10)
    assert layout.diagonal().all()
    assert layout.sum(1).tolist() == [3] * 10


def bench(tmp_path, *args):
    """Run `python -m flash_fx.bench ARGS --device cpu` (the tiled CPU path) and return (stdout, results folder)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    command = [sys.executable, "-m", "flash_fx.bench", *args, "--device", "cpu", "--reps", "1", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch:" in done.stdout and "commit:" in done.stdout
    (folder,) = tmp_path.iterdir()
    return done.stdout, folder


def rows(folder, name):
    with (folder / f"{name}.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_sparse_bench_cpu(tmp_path):
    _, folder = bench(tmp_path, "sparse", "--sizes", "96", "--batch-heads", "2", "--head-dim", "16", "--block", "16",
                      "--backward")
    found = rows(folder, "sparse")
    assert {row["method"] for row in found} == {"flash_fx sparse", "flash_fx bias", "flash_fx dense", "sdpa mask"}
    assert {row["mode"] for row in found} == {"forward", "forward+backward"}
    assert {float(row["density"]) for row in found} == {1.0, 0.5, 0.25, 0.1}
    assert all(float(row["ms"]) > 0 for row in found)
    assert "| n | density |" in (folder / "sparse.md").read_text()


def test_kernels_bench_cpu(tmp_path):
    _, folder = bench(tmp_path, "kernels", "--sizes", "48", "--head-dims", "16", "--heads", "1", "--tokens", "96")
    found = rows(folder, "kernels")
    assert {row["method"] for row in found} == {"flash_fx", "sdpa (default)", "eager"}
    assert {row["mode"] for row in found} == {"forward", "backward", "forward+backward"}
    assert {row["causal"] for row in found} == {"True", "False"}
    assert all(float(row["tflops"]) > 0 for row in found)
    assert all(0 < float(row["of_floor"]) and float(row["floor_ms"]) > 0 for row in found)
    (ceiling,) = rows(folder, "ceilings")
    assert float(ceiling["matmul_tflops"]) > 0 and float(ceiling["copy_tb_per_s"]) > 0


def test_check_cases_pass_on_cpu():
    """The bench's correctness check, on the kernels this process runs (the interpreter in the tests)."""
    case = check.Case("gqa window", torch.float32, 16, 37, heads=4, kv_heads=2, window=(9, 3))
    found = check.run_case(case, "cpu")
    assert [row["tensor"] for row in found] == ["out", "dq", "dk", "dv"]
    assert all(row["ok"] and 0 < row["flash_fx_error"] < 1e-5 for row in found), found


def test_check_reports_wrong_kernels(monkeypatch):
    """A kernel returning a wrong result fails the check instead of passing silently."""
    real = check.kernels.attention_forward

    def off_by_a_little(*args, **kwargs):
        out, lse = real(*args, **kwargs)
        return out * 1.001, lse

    monkeypatch.setattr(check.kernels, "attention_forward", off_by_a_little)
    found = check.run_case(check.Case("dense", torch.float32, 16, 20), "cpu")
    assert not found[0]["ok"] and found[0]["tensor"] == "out"


def test_floors():
    ceilings = Ceilings(flops_per_s=1e12, bytes_per_s=1e9)
    assert ceilings.floor_seconds(2e12, 1e9) == 2.0 and ceilings.floor_seconds(1e12, 4e9) == 4.0
    # forward: q, k, v read, o written (2 bytes each) and the float32 LSE
    assert attention_min_bytes(2, 3, 5, 8, 2, "forward") == 4 * 2 * 3 * 5 * 8 * 2 + 2 * 3 * 5 * 4


def test_stream_csv_keeps_rows_written_before_an_error(tmp_path):
    def measured():
        yield {"n": 1, "ms": 2.0}
        yield {"n": 2, "ms": 3.0}
        raise RuntimeError("cut short")

    path = tmp_path / "x.csv"
    try:
        stream_csv(measured(), path)
    except RuntimeError:
        pass
    assert path.read_text().splitlines() == ["n,ms", "1,2.0", "2,3.0"]


def test_deadline():
    assert not Deadline(None).expired() and Deadline(None).left() == math.inf
    assert Deadline(-1).expired() and Deadline(-1).left() == 0
    assert not Deadline(60).expired()


def test_bars_from_rows():
    """Each bar is the worst ratio over the shapes it covers; missing measurements are reported as such."""
    kernel = dict(head_dim=128, dtype="float16", mode="forward")
    results = {
        "kernels": [
            {**kernel, "n": 2048, "causal": False, "method": "flash_fx", "ms": 1.0},
            {**kernel, "n": 2048, "causal": False, "method": "sdpa flash", "ms": 1.2},
            {**kernel, "n": 2048, "causal": False, "method": "sdpa cudnn", "ms": 0.9},
            {**kernel, "n": 2048, "causal": True, "method": "flash_fx", "ms": 0.5},
            {**kernel, "n": 2048, "causal": True, "method": "sdpa flash", "ms": 0.8},
            {**kernel, "n": 1024, "causal": False, "method": "flash_fx", "ms": 1.0},  # N < 2K: not in the bar
            {**kernel, "n": 1024, "causal": False, "method": "sdpa flash", "ms": 0.1},
        ],
        "memory": [{"n": n, "method": "flash_fx", "peak_mb": n / 8} for n in (1024, 8192)]
                  + [{"n": 8192, "method": "eager", "peak_mb": 8192.0}],
        "decode": [{"dtype": "float16", "batch": batch, "n_k": 8192, "case": "cache 25% filled",
                    "baseline": "SDPA, same mask", "ratio": ratio} for batch, ratio in ((1, 3.5), (8, 1.5))],
    }
    evaluated = bars.evaluate(results)

    def bar(start):
        (row,) = [row for row in evaluated if row["bar"].startswith(start)]
        return row

    forward = bar("forward, d=128, N>=2K, fp16/bf16")
    assert math.isclose(forward["measured (worst case)"], 0.9) and forward["met"] == "no"
    assert "causal=False" in forward["where"] and "n=2048" in forward["where"]
    causal = bar("forward, d=128, N>=2K: flash_fx non-causal")
    assert causal["measured (worst case)"] == 2.0 and causal["met"] == "yes"
    assert bar("memory, N=8K")["measured (worst case)"] == 8.0
    assert math.isclose(bar("memory: 1 / (exponent")["measured (worst case)"], 1.0)
    assert bar("GPT-2-small train step, N=1024: eager")["met"] == "not measured"
    filled = bar("decode step, static cache 25% filled")
    assert filled["measured (worst case)"] == 1.5 and "batch=8" in filled["where"] and filled["met"] == "no"
    assert bar("decode step, full cache: SDPA without")["met"] == "not measured"


def test_models_bench_cpu(tmp_path):
    _, folder = bench(tmp_path, "models", "--sizes", "32", "--kinds", "gpt", "packed", "--tokens", "64",
                      "--cost-device", "H100")  # planned as for a card: this CPU would keep attention this small
    found = rows(folder, "models")
    assert {(row["model"], row["backend"]) for row in found} == {
        (kind, backend) for kind in ("gpt", "packed") for backend in ("eager", "flash_fx")}
    rewritten = {row["model"]: row["attention rewritten"] for row in found if row["backend"] == "flash_fx"}
    # compiled per block: both blocks share one graph for training and one for inference
    assert rewritten == {"gpt": "2 causal", "packed": "2 document"}
    assert all(float(row["ms"]) > 0 for row in found)


def test_memory_bench_needs_cuda(tmp_path):
    out, _ = bench(tmp_path, "memory")
    assert "needs CUDA" in out


def test_all_within_a_budget(tmp_path):
    """`all` runs the chosen sections in order, skips what would start after its budget, and writes the bars."""
    out, folder = bench(tmp_path, "all", "--sections", "check", "autotune", "models", "--budget-s", "0")
    assert "check: deadline reached" in out and "models: deadline reached" in out
    assert "tuned on CUDA only" in out
    (bar_file,) = [p for p in folder.iterdir() if p.name == "bars.csv"]
    assert {row["met"] for row in rows(folder, "bars")} == {"not measured"}
    assert bar_file.exists()


def test_cpu_section_op_rows(tmp_path):
    """`python -m flash_fx.bench cpu` at a tiny size: every op row with its baseline and positive times."""
    _, folder = bench(tmp_path, "cpu", "--op-n", "48", "--op-only", "--decode-n")
    found = rows(folder, "cpu")
    assert {(row["level"], row["case"], row["mode"], row["baseline"]) for row in found} == {
        ("op", "causal", "forward", "C++ CPU flash kernel"), ("op", "causal", "forward", "flash_fx tiled path (before)"),
        ("op", "causal", "forward+backward", "SDPA is_causal"),
        *(("op", kind, "forward", "C++ CPU flash kernel, dense mask") for kind in ("sliding window", "documents")),
        *(("op", kind, "forward+backward", "SDPA, dense mask") for kind in ("sliding window", "documents"))}
    assert all(float(row["flash_fx_ms"]) > 0 and float(row["baseline_ms"]) > 0 for row in found)
    assert all(math.isclose(float(row["ratio"]), float(row["baseline_ms"]) / float(row["flash_fx_ms"]), rel_tol=1e-3)
               for row in found)


def test_cpu_section_decode_rows():
    """The decode rows: a full cache against SDPA without a mask, a 25%-filled static cache against SDPA with the
    same mask, each pair timed in the same run."""
    from soundness import kernel_path

    from flash_fx.bench import cpu

    with kernel_path("cpu"):
        found = list(cpu.decode_rows([(1, 64), (2, 96)], reps=1))
    assert [(row["level"], row["n"], row["baseline"]) for row in found] == [
        ("decode", 64, "SDPA, no mask"), ("decode", 64, "SDPA, same mask"),
        ("decode", 96, "SDPA, no mask"), ("decode", 96, "SDPA, same mask")]
    assert all(row["flash_fx_ms"] > 0 and math.isclose(row["ratio"], row["baseline_ms"] / row["flash_fx_ms"])
               for row in found)


def test_cpu_section_model_rows_pair_each_mode_with_plain_compile(monkeypatch):
    """The model rows put flash_fx and torch.compile's default of one model, N and mode side by side (the models
    themselves are smoke-tested by test_models_bench_cpu; Inductor's CPU compiles are too slow for CI)."""
    from flash_fx.bench import cpu, models

    def timed(device, cases, backends, *args, **kwargs):
        assert device == "cpu" and backends == ["inductor", "flash_fx"]
        for kind, n in cases:
            for backend, ms in (("inductor", 300.0), ("flash_fx", 200.0)):
                for mode in ("train step", "inference"):
                    yield {"model": kind, "n": n, "backend": backend, "mode": mode, "ms": ms + (mode == "inference"),
                           "attention rewritten": "2 causal" if backend == "flash_fx" else "-"}

    monkeypatch.setattr(models, "run", timed)
    found = list(cpu.model_rows([("gpt", 2048), ("packed", 4096)]))
    assert [(row["case"], row["n"], row["mode"]) for row in found] == [
        ("gpt (2 causal)", 2048, "train step"), ("gpt (2 causal)", 2048, "inference"),
        ("packed (2 causal)", 4096, "train step"), ("packed (2 causal)", 4096, "inference")]
    assert math.isclose(found[0]["ratio"], 1.5)
    assert math.isclose(found[1]["flash_fx_ms"], 201.0) and math.isclose(found[1]["baseline_ms"], 301.0)


def test_decode_section_rows():
    """The decode section's five rows per (dtype, batch, cache length), each baseline timed in the same run (here
    on the CPU, the compiled baselines replaced by the function they compile, so no Inductor compile runs)."""
    from flash_fx.bench import cpu, decode

    found = list(decode._case_rows(torch.float32, 2, 96, "cpu", 1, {False: cpu.decode_step, True: cpu.decode_step}))
    assert [(row["case"], row["baseline"]) for row in found] == [
        ("full cache", "SDPA, no mask"), ("full cache", "SDPA, same mask"), ("full cache", "torch.compile default"),
        ("cache 25% filled", "SDPA, same mask"), ("cache 25% filled", "torch.compile default")]
    assert all(row["flash_fx_ms"] > 0 and math.isclose(row["ratio"], row["baseline_ms"] / row["flash_fx_ms"])
               for row in found)


def test_check_decode_case_passes_on_cpu():
    """The bench's decode check (one query row against 150 keys, GQA 8:2) within the bound, on the decode kernels."""
    (case,) = [case for case in check.cases("cpu") if case.n_q == 1]
    found = check.run_case(case, "cpu")
    assert all(row["ok"] for row in found) and {row["n_q"] for row in found} == {1}, found
