"""Command line of the benchmarks.

    python -m flash_fx.bench kernels   # flash_fx vs SDPA backends vs eager, TFLOP/s
    python -m flash_fx.bench sparse    # block-sparse: time against tile density
    python -m flash_fx.bench models    # training step and inference of small transformers
    python -m flash_fx.bench memory    # peak memory of forward + backward against N (CUDA)
    python -m flash_fx.bench all --budget-s 480   # everything above, one folder, within a time budget (GPU runs)

Each command writes a CSV, a markdown table (headed by device, torch and Triton versions and commit) and, with
matplotlib installed, plots, into ``<out>/<device>-<date>/``. ``--device cpu`` runs the same harness at small
sizes (the tiled CPU path), which is what CI smoke-tests; its timings say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from flash_fx.bench import kernels, memory, models, report, sparse
from flash_fx.bench.timing import environment

GPU = torch.cuda.is_available()


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if GPU else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default: by device)")
    parser.add_argument("--out", default="bench_results", help="results root folder")


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def kernels_command(args: argparse.Namespace) -> list[dict]:
    on_gpu = args.device == "cuda"
    sizes = args.sizes or ([512, 1024, 2048, 4096, 8192, 16384] if on_gpu else [128, 256])
    dtypes = [_dtype(d) for d in (args.dtypes or (["float16", "bfloat16"] if on_gpu else ["float32"]))]
    return kernels.run(args.device, sizes, args.head_dims or [64, 128], dtypes, args.tokens or (16384 if on_gpu
                       else 512), args.heads or (16 if on_gpu else 2), args.reps or (10 if on_gpu else 2), args.modes)


def sparse_command(args: argparse.Namespace) -> list[dict]:
    on_gpu = args.device == "cuda"
    rows = []
    for n in args.sizes or ([4096, 16384] if on_gpu else [1024, 2048]):
        batch_heads = args.batch_heads or max(1, 16384 // n) * (16 if on_gpu else 1)
        dtype = _dtype(args.dtype or ("float16" if on_gpu else "float32"))
        rows += sparse.run(args.device, [n], batch_heads, args.head_dim, args.block, dtype,
                           args.reps or (10 if on_gpu else 3), args.backward)
    return rows


def models_command(args: argparse.Namespace) -> list[dict]:
    on_gpu = args.device == "cuda"
    if on_gpu:
        width, heads, layers, batch, vocab = 768, 12, 12, args.batch or 8, 50304
    else:
        width, heads, layers, batch, vocab = 64, 2, 2, args.batch or 2, 512
    backends = args.backends or (["eager", "inductor", "flash_fx"] if on_gpu else ["eager", "flash_fx"])
    return models.run(args.device, args.kinds or list(models.KINDS), args.sizes or ([1024, 4096] if on_gpu else [128]),
                      backends, width, heads, layers, batch, vocab, args.reps or (5 if on_gpu else 1),
                      _dtype(args.dtype or ("bfloat16" if on_gpu else "float32")))


def memory_command(args: argparse.Namespace) -> list[dict]:
    if args.device != "cuda":
        print("# memory: peak GPU memory needs CUDA; nothing measured on the CPU")
        return []
    sizes = args.sizes or [1024 * 2**i for i in range(8)]
    return memory.run(sizes, args.heads or 16, args.head_dim, _dtype(args.dtype or "float16"))


COMMANDS: dict[str, Callable[[argparse.Namespace], list[dict]]] = {
    "kernels": kernels_command, "sparse": sparse_command, "models": models_command, "memory": memory_command,
}


def _write(name: str, rows: list[dict], folder: Path, env: dict[str, str]) -> None:
    if not rows:
        return
    report.write_csv(rows, folder / f"{name}.csv")
    table = report.markdown_table(rows, env)
    (folder / f"{name}.md").write_text(table)
    plotted = report.plot(name, rows, folder / f"{name}.png", f"{name}, {env['device']}")
    print(table)
    print(f"# wrote {folder / name}.csv, .md" + (", .png" if plotted else ""))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flash_fx.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in (*COMMANDS, "all"):
        sub = commands.add_parser(name)
        _common(sub)
        sub.add_argument("--sizes", type=int, nargs="+", default=None, help="sequence lengths")
        sub.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32"))
        sub.add_argument("--heads", type=int, default=None)
        sub.add_argument("--head-dim", type=int, default=64)
        if name in ("kernels", "all"):
            sub.add_argument("--head-dims", type=int, nargs="+", default=None)
            sub.add_argument("--dtypes", nargs="+", default=None, choices=("float16", "bfloat16", "float32"))
            sub.add_argument("--tokens", type=int, default=None, help="batch x N (default 16K on a GPU)")
            sub.add_argument("--modes", nargs="+", default=["forward", "backward", "forward+backward"])
        if name in ("sparse", "all"):
            sub.add_argument("--batch-heads", type=int, default=None)
            sub.add_argument("--block", type=int, default=128, help="layout block size (positions)")
            sub.add_argument("--backward", action="store_true", help="also time forward+backward")
        if name in ("models", "all"):
            sub.add_argument("--kinds", nargs="+", default=None, choices=models.KINDS)
            sub.add_argument("--backends", nargs="+", default=None, choices=("eager", "inductor", "flash_fx"))
            sub.add_argument("--batch", type=int, default=None)
        if name == "all":
            sub.add_argument("--budget-s", type=float, default=480.0, help="skip what would start after this")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    env = environment(args.device)
    print("# " + ", ".join(f"{k}: {v}" for k, v in env.items()))
    folder = report.results_dir(args.out, env["device"])
    if args.command != "all":
        _write(args.command, COMMANDS[args.command](args), folder, env)
        return
    start = time.perf_counter()
    for name, command in COMMANDS.items():
        if time.perf_counter() - start > args.budget_s:
            print(f"# {name}: skipped, the {args.budget_s:.0f} s budget is spent")
            continue
        if name == "sparse":
            args.backward = True
        section = argparse.Namespace(**{**vars(args), "sizes": None})  # each section's own default sizes
        _write(name, command(section), folder, env)
    print(f"# all: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
