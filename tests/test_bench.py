"""Smoke tests of the benchmark harness on the CPU (not timings: the harness runs end to end and writes its files)."""

import csv
import os
import subprocess
import sys

from flash_fx.bench.sparse import block_layout


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


def test_models_bench_cpu(tmp_path):
    _, folder = bench(tmp_path, "models", "--sizes", "32", "--kinds", "gpt", "packed")
    found = rows(folder, "models")
    assert {(row["model"], row["backend"]) for row in found} == {
        (kind, backend) for kind in ("gpt", "packed") for backend in ("eager", "flash_fx")}
    rewritten = {row["model"]: row["attention rewritten"] for row in found if row["backend"] == "flash_fx"}
    assert rewritten == {"gpt": "4 causal", "packed": "4 document"}  # 2 layers, training and inference graphs
    assert all(float(row["ms"]) > 0 for row in found)


def test_memory_bench_needs_cuda(tmp_path):
    out, _ = bench(tmp_path, "memory")
    assert "needs CUDA" in out
