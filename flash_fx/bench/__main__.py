"""Command line of the benchmarks.

    python -m flash_fx.bench check     # the kernels against float64 on this device (run first by `all`)
    python -m flash_fx.bench kernels   # flash_fx vs SDPA backends vs eager, TFLOP/s and fraction of the roofline
    python -m flash_fx.bench autotune  # the table's launch configurations against the autotuner's (CUDA)
    python -m flash_fx.bench sparse    # block-sparse: time against tile density
    python -m flash_fx.bench models    # training step and inference of small transformers
    python -m flash_fx.bench memory    # peak memory of forward + backward against N (CUDA)
    python -m flash_fx.bench decode    # a decode step (GQA 8:1, d 128) against SDPA and torch.compile's default
    python -m flash_fx.bench cpu       # the CPU: the op against PyTorch's C++ flash kernel and SDPA, and models
                                       # against plain torch.compile (its own command; not part of `all`)
    python -m flash_fx.bench all --budget-s 300   # everything above in one folder within a time budget, then
                                                  # the performance bars: the one command for a GPU session

Each command writes a CSV (row by row, so a run cut short keeps what it measured), a markdown table (headed by
device, torch and Triton versions and commit) and, with matplotlib installed, plots, into
``<out>/<device>-<date>/``. ``--device cpu`` runs the same harness at small sizes (the tiled CPU path), which is
what CI smoke-tests; its timings say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from flash_fx.bench import autotune, bars, check, cpu, decode, kernels, memory, models, report, roofline, sparse
from flash_fx.bench.timing import NO_DEADLINE, Deadline, environment
from flash_fx.kernels import triton_interpreted as kernels_interpreted

GPU = torch.cuda.is_available()


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if GPU else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default: by device)")
    parser.add_argument("--out", default="bench_results", help="results root folder")


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _ceilings(args: argparse.Namespace, folder: Path, env: dict[str, str]) -> roofline.Ceilings:
    """The device's measured ceilings, once per run (in the first kernel dtype), written to ``ceilings.csv``."""
    if getattr(args, "ceilings", None) is None:
        dtype = _dtype((args.dtypes or ["float16"])[0]) if args.device == "cuda" else torch.float32
        args.ceilings = roofline.measure(args.device, dtype)
        _write("ceilings", [args.ceilings.row(env["device"], dtype)], folder, env)
    return args.ceilings


def check_command(args: argparse.Namespace, deadline: Deadline) -> Iterator[dict]:
    return check.run(args.device, deadline)


def kernels_command(args: argparse.Namespace, deadline: Deadline) -> Iterator[dict]:
    on_gpu = args.device == "cuda"
    sizes = args.sizes or ([2048, 4096, 8192, 1024, 16384, 512] if on_gpu else [128, 256])
    dtypes = [_dtype(d) for d in (args.dtypes or (["float16", "bfloat16"] if on_gpu else ["float32"]))]
    return kernels.run(args.device, sizes, args.head_dims or [128, 64], dtypes, args.tokens or (16384 if on_gpu
                       else 512), args.heads or (16 if on_gpu else 2), args.reps or (5 if on_gpu else 2), args.modes,
                       args.ceilings, deadline)


def autotune_command(args: argparse.Namespace, deadline: Deadline) -> Iterator[dict]:
    return autotune.run(args.device, 4096, args.tokens or 16384, args.heads or 16, args.reps or 5, deadline)


def sparse_command(args: argparse.Namespace, deadline: Deadline) -> Iterator[dict]:
    on_gpu = args.device == "cuda"
    for n in args.sizes or ([4096, 16384] if on_gpu else [1024, 2048]):
        batch_heads = args.batch_heads or max(1, 16384 // n) * (16 if on_gpu else 1)
        dtype = _dtype(args.dtype or ("float16" if on_gpu else "float32"))
        yield from sparse.run(args.device, [n], batch_heads, args.head_dim, args.block, dtype,
                              args.reps or (5 if on_gpu else 3), args.backward, deadline)


def models_command(args: argparse.Namespace, deadline: Deadline) -> Iterator[dict]:
    on_gpu = args.device == "cuda"
    if on_gpu:
        width, heads, layers, tokens, vocab = 768, 12, 12, args.tokens or 8192, 50304
    else:
        width, heads, layers, tokens, vocab = 64, 2, 2, args.tokens or 256, 512
    if args.kinds or args.sizes:
        cases = [(kind, n) for kind in args.kinds or models.KINDS for n in args.sizes or ([1024, 4096] if on_gpu
                                                                                           else [128])]
    else:  # in the order of the performance bars
        cases = ([("gpt", 1024), ("gpt", 4096), ("sliding_window", 4096), ("packed", 4096), ("bert_padded", 1024)]
                 if on_gpu else [(kind, 128) for kind in models.KINDS])
    backends = args.backends or (["eager", "inductor", "flash_fx"] if on_gpu else ["eager", "flash_fx"])
    return models.run(args.device, cases, backends, width, heads, layers, tokens, vocab,
                      args.reps or (5 if on_gpu else 1), _dtype(args.dtype or ("bfloat16" if on_gpu else "float32")),
                      regional=not args.whole_model, deadline=deadline,
                      inner="inductor" if on_gpu else "aot_eager", cost_device=args.cost_device)


def memory_command(args: argparse.Namespace, deadline: Deadline) -> Iterator[dict]:
    if args.device != "cuda":
        print("# memory: peak GPU memory needs CUDA; nothing measured on the CPU")
        return iter(())
    sizes = args.sizes or [1024 * 2**i for i in range(8)]
    return memory.run(sizes, args.heads or 16, args.head_dim, _dtype(args.dtype or "float16"), deadline)


def decode_command(args: argparse.Namespace, deadline: Deadline) -> Iterator[dict]:
    on_gpu = args.device == "cuda"
    lengths = args.sizes or ([1024, 8192, 32768] if on_gpu else [64, 160])
    dtypes = [_dtype(d) for d in (args.dtypes or (["float16", "bfloat16"] if on_gpu else ["float32"]))]
    return decode.run(args.device, lengths, [1, 8] if on_gpu else [1, 2], dtypes, args.reps or (5 if on_gpu else 1),
                      deadline)


def cpu_command(args: argparse.Namespace, deadline: Deadline) -> Iterator[dict]:
    if args.device != "cpu":
        print("# cpu: run with --device cpu (the CPU section times the CPU)")
        return iter(())
    if kernels_interpreted():
        print("# cpu: TRITON_INTERPRET=1 would time the Triton interpreter; run without it")
        return iter(())
    cases = [(kind, n) for n in args.sizes or [2048, 4096] for kind in args.kinds or cpu.MODEL_KINDS]
    decode = [(batch, n_k) for batch in (1, 8) for n_k in args.decode_n]
    return cpu.run(args.op_n, [] if args.op_only else cases, args.reps or 5, deadline, decode)


#: Each command, and its share of ``all``'s budget (time a section leaves unused passes to the next).
COMMANDS: dict[str, tuple[Callable[[argparse.Namespace, Deadline], Iterator[dict]], float]] = {
    "check": (check_command, 0.08), "kernels": (kernels_command, 0.27), "autotune": (autotune_command, 0.05),
    "sparse": (sparse_command, 0.12), "memory": (memory_command, 0.05), "decode": (decode_command, 0.08),
    "models": (models_command, 0.35),
    "cpu": (cpu_command, 0.0),
}
GPU_SECTIONS = [name for name in COMMANDS if name != "cpu"]  # what `all` runs by default


def _write(name: str, rows: list[dict], folder: Path, env: dict[str, str], *, streamed: bool = False) -> None:
    """The CSV (unless ``streamed`` there already), markdown table and plot of one section."""
    if not rows:
        return
    if not streamed:
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
        if name in ("kernels", "autotune", "models", "all"):
            sub.add_argument("--tokens", type=int, default=None,
                             help="batch x N (default on a GPU: 16K for kernels, 8K for models)")
        if name in ("kernels", "decode", "all"):
            sub.add_argument("--dtypes", nargs="+", default=None, choices=("float16", "bfloat16", "float32"))
        if name in ("kernels", "all"):
            sub.add_argument("--head-dims", type=int, nargs="+", default=None)
            sub.add_argument("--modes", nargs="+", default=["forward", "backward", "forward+backward"])
        if name in ("sparse", "all"):
            sub.add_argument("--batch-heads", type=int, default=None)
            sub.add_argument("--block", type=int, default=128, help="layout block size (positions)")
            sub.add_argument("--backward", action="store_true", help="also time forward+backward")
        if name == "cpu":
            sub.add_argument("--op-n", type=int, default=2048, help="N of the op-level rows (masked ones at 2N)")
            sub.add_argument("--kinds", nargs="+", default=None, choices=models.KINDS,
                             help=f"model kinds (default {' '.join(cpu.MODEL_KINDS)}); --sizes: their N")
            sub.add_argument("--op-only", action="store_true", help="only the op-level (and decode) rows")
            sub.add_argument("--decode-n", type=int, nargs="*", default=[1024, 8192, 32768],
                             help="cache lengths of the decode rows, at batch 1 and 8 (none: no decode rows)")
        if name in ("models", "all"):
            sub.add_argument("--kinds", nargs="+", default=None, choices=models.KINDS)
            sub.add_argument("--backends", nargs="+", default=None, choices=("eager", "inductor", "flash_fx"))
            sub.add_argument("--cost-device", default=None, help="flash_fx's option device: what its cost model "
                             "predicts for (e.g. H100 to rewrite as on a card; default: where the model runs)")
            sub.add_argument("--whole-model", action="store_true",
                             help="compile the whole model instead of each block (slower first compiles)")
        if name == "all":
            sub.add_argument("--budget-s", type=float, default=300.0,
                             help="start nothing new after this many seconds (each section gets a share)")
            sub.add_argument("--sections", nargs="+", default=GPU_SECTIONS, choices=list(COMMANDS),
                             help="run only these sections (e.g. to rerun one that failed)")
    return parser


def _section(name: str, args: argparse.Namespace, deadline: Deadline, folder: Path,
             env: dict[str, str]) -> list[dict]:
    if name == "kernels":
        _ceilings(args, folder, env)
    command, _ = COMMANDS[name]
    rows = report.stream_csv(command(args, deadline), folder / f"{name}.csv")
    _write(name, rows, folder, env, streamed=True)
    if name == "check" and rows:
        failed = [r for r in rows if not r["ok"]]
        print(f"# check: {len(rows) - len(failed)} of {len(rows)} passed" + (
            "; FAILED: the timings of flash_fx below are of wrong results" if failed else ""))
    return rows


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    env = environment(args.device)
    print("# " + ", ".join(f"{k}: {v}" for k, v in env.items()))
    folder = report.results_dir(args.out, env["device"])
    if args.command != "all":
        _section(args.command, args, NO_DEADLINE, folder, env)
        return
    start, results, share_so_far = time.perf_counter(), {}, 0.0
    args.backward = True
    chosen = {name: share for name, (_, share) in COMMANDS.items() if name in args.sections}
    for name, share in chosen.items():
        share_so_far += share / sum(chosen.values())
        deadline = Deadline(start + args.budget_s * share_so_far - time.perf_counter())
        section = argparse.Namespace(**{**vars(args), "sizes": None})  # each section's own default sizes
        results[name] = _section(name, section, deadline, folder, env)
        args.ceilings = getattr(section, "ceilings", None)
    _write("bars", bars.evaluate(results), folder, env)
    print(f"# all: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
