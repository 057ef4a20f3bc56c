"""Offline compile check of the Triton kernels' launch configurations, for a GPU this machine need not have.

    python -m flash_fx.bench.compile_check --arch 90 --head-dims 64 128 --dtypes float16 bfloat16

compiles the forward, dQ and dK/dV kernels of the table's configuration and its neighbours (the autotuner's
candidates before known spills are left out, :func:`flash_fx.kernels.tuning.neighbours`; ``--table-only``: the
table's configuration alone) for an sm_``arch`` target with
``triton.compile`` and the ptxas shipped with Triton, without a GPU and without running anything, and prints
one markdown row per (kernel, configuration): the shared memory the compiled kernel asks for (its metadata's
``shared``), registers and spilled bytes per thread (``ptxas -v``), and whether the shared memory fits the
card's per-block budget. These are compile-time resource checks, not timings.

It must run without ``TRITON_INTERPRET=1`` (the kernels are then compiled, not interpreted). The launches are
the real ones (:func:`triton_forward.attention_forward`, :func:`triton_backward.attention_backward` on small
CPU tensors) with each kernel swapped for a stand-in that records its arguments instead of launching.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from flash_fx.kernels import config, tuning
from flash_fx.kernels.config import Tiles

#: Kernels checked: (kernel attribute, name in the table); the forward first.
KERNELS = (("_attention_forward_kernel", "forward"), ("_dq_kernel", "dq"), ("_dkdv_kernel", "dkdv"))

#: Kernels whose launches are recorded instead of run, by module under flash_fx.kernels.
RECORDED = {"triton_forward": ("_attention_forward_kernel",),
            "triton_backward": ("_delta_kernel", "_dkdv_kernel", "_dq_kernel"),
            "triton_decode": ("_decode_kernel", "_merge_kernel")}

#: The decode check's shape: query heads, KV heads (GQA 8:1) and key splits of one decode step.
DECODE_HEADS, DECODE_KV_HEADS, DECODE_SPLITS = 32, 4, 4

#: Sequence length of the recorded launches (a multiple of 16, as most real lengths are: Triton specializes on it).
LENGTH = 256


@dataclass(frozen=True)
class Usage:
    """Compiled resources of one kernel in one configuration."""

    kernel: str
    tiles: Tiles
    shared: int  # bytes of shared memory per program
    registers: int  # per thread
    spill_stores: int  # bytes per thread
    spill_loads: int
    budget: int

    @property
    def fits(self) -> bool:
        """Whether the shared memory fits the card's per-block budget."""
        return self.shared <= self.budget


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records instead of launching."""

    def __init__(self, name: str, kernel: Any, calls: dict[str, tuple]):
        self.name, self.kernel, self.calls = name, kernel, calls

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def record(*args: Any, **kwargs: Any) -> None:
            self.calls[self.name] = (self.kernel, args, kwargs)

        return record


@contextlib.contextmanager
def _recording(modules: dict[str, ModuleType]) -> Iterator[dict[str, tuple]]:
    """While inside, the kernels of :data:`RECORDED` record their launches into the yielded dict, by name."""
    calls: dict[str, tuple] = {}
    swapped = [(modules[module], name, getattr(modules[module], name))
               for module, names in RECORDED.items() for name in names]
    try:
        for module, name, kernel in swapped:
            setattr(module, name, _Recorder(name, kernel, calls))
        yield calls
    finally:
        for module, name, kernel in swapped:
            setattr(module, name, kernel)


def _launches(tiles: Tiles, head_dim: int, dtype: torch.dtype, causal: bool, backward: bool,
              mod: str | None = None, value_dim: int | None = None, dropout: float = 0.0) -> dict[str, tuple]:
    """The recorded (kernel, args, kwargs) of one forward or backward launch with ``tiles``, by kernel name (``mod``:
    a score modification's steps, as the op's ``score_mod`` argument spells them)."""
    from flash_fx.kernels import triton_backward, triton_forward  # noqa: F401  (imported before recording)
    from flash_fx.kernels.schedule import schedule
    from flash_fx.kernels.spec import AttentionSpec, Band, Dropout, Saved, ScoreMod

    q = torch.randn(1, 2, LENGTH, head_dim).to(dtype)
    v = q if value_dim is None else torch.randn(1, 2, LENGTH, value_dim).to(dtype)
    score_mod = None if mod is None else ScoreMod.parse(mod, torch.ones(1, 2) if "mul_head" in mod else None)
    seed = torch.zeros(1, dtype=torch.int64)  # a device-side seed, as the op passes it
    spec = AttentionSpec(head_dim ** -0.5, band=Band(None, 0) if causal else Band(), score_mod=score_mod,
                         dropout=Dropout(dropout, seed) if dropout else Dropout()).validate(q, q, v)
    plan = schedule(spec, LENGTH, LENGTH, tiles.block_m, tiles.block_n)
    with _recording(_modules()) as calls:
        if backward:
            lse = torch.zeros(1, 2, LENGTH, 2)
            triton_backward.attention_backward(v, Saved(q, q, v, v, lse), spec, tiles, plan)
        else:
            triton_forward.attention_forward(q, q, v, spec, tiles, plan)
    return calls


def _modules() -> dict[str, ModuleType]:
    from flash_fx.kernels import triton_backward, triton_decode, triton_forward

    return {"triton_forward": triton_forward, "triton_backward": triton_backward, "triton_decode": triton_decode}


def check_decode(head_dim: int, dtype: torch.dtype, capability: int, splits: int = DECODE_SPLITS) -> list[Usage]:
    """The compiled resources of the decode and merge kernels at the GPU launch :func:`decode.tiles` gives one
    decode step (GQA 8:1, a static cache's key validity, ``splits`` key splits: the merge kernel's tile grows with
    them)."""
    from flash_fx.kernels import decode, triton_decode
    from flash_fx.kernels.schedule import schedule
    from flash_fx.kernels.spec import AttentionSpec

    q = torch.randn(1, DECODE_HEADS, 1, head_dim).to(dtype)
    k = torch.randn(1, DECODE_KV_HEADS, max(LENGTH, 64 * splits), head_dim).to(dtype)
    valid = torch.arange(k.shape[2])[None] < k.shape[2] // 4
    spec = AttentionSpec(head_dim ** -0.5, key_valid=valid).validate(q, k, k)
    launch = decode.tiles(decode.packed_rows(1, DECODE_HEADS, DECODE_KV_HEADS), config.padded_head_dim(head_dim),
                          dtype, on_gpu=True)._replace(splits=splits)
    plan = schedule(spec, 1, k.shape[2], 1, launch.block_n).by_kv_head(DECODE_HEADS, DECODE_KV_HEADS, False)
    with _recording(_modules()) as calls:
        triton_decode.attention_forward(q, k, k, spec, launch, plan)
    budget = config.sram_budget((capability // 10, capability % 10))
    usages = []
    for name in ("_decode_kernel", "_merge_kernel"):
        compiled = compile_for(*calls[name], capability)
        warps = compiled.metadata.num_warps
        tiles = Tiles(launch.block_m, launch.block_n, warps, launch.num_stages if name == "_decode_kernel" else 1)
        usages.append(Usage(name.strip("_").removesuffix("_kernel"), tiles, compiled.metadata.shared,
                            *ptxas_usage(compiled.asm["ptx"], capability), budget))
    return usages


def compile_for(kernel: Any, args: tuple, kwargs: dict, capability: int) -> Any:
    """``triton.compile`` of ``kernel`` specialized for these launch arguments, for an sm_``capability`` GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def ptxas_usage(ptx: str, capability: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) per thread that ``ptxas -v`` reports for ``ptx``."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as file:
            file.write(ptx)
        command = [get_ptxas(capability).path, "-v", "--regAllocOptLevel=2",
                   f"--gpu-name={sm_arch_from_capability(capability)}", source, "-o", os.path.join(folder, "k.o")]
        log = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(registers.group(1)) if registers else -1, *(int(g) for g in (spills.groups() if spills else (0, 0))))


def check(tiles: Tiles, head_dim: int, dtype: torch.dtype, causal: bool, capability: int, *,
          backward: bool, mod: str | None = None, value_dim: int | None = None, dropout: float = 0.0) -> list[Usage]:
    """The compiled resources of the forward kernel (or the dQ and dK/dV kernels) with ``tiles``."""
    budget = config.sram_budget((capability // 10, capability % 10))
    calls = _launches(tiles, head_dim, dtype, causal, backward, mod, value_dim, dropout)
    usages = []
    for attribute, name in KERNELS[1:] if backward else KERNELS[:1]:
        compiled = compile_for(*calls[attribute], capability)
        usages.append(Usage(name, tiles, compiled.metadata.shared, *ptxas_usage(compiled.asm["ptx"], capability),
                            budget))
    return usages


def sweep(capability: int, head_dims: list[int], dtypes: list[torch.dtype], causal: list[bool], *,
          table_only: bool, mod: str | None = None, value_dim: int | None = None,
          dropout: float = 0.0) -> Iterator[tuple[int, torch.dtype, bool, bool, list[Usage]]]:
    """(head dim, dtype, causal, is the table's entry, usages) for each configuration checked, table entry first."""
    card = (capability // 10, capability % 10)
    for head_dim in head_dims:
        for dtype in dtypes:
            for is_causal in causal:
                for backward in (False, True):
                    widest = max(head_dim, value_dim or head_dim)  # the kernels' tiles are chosen for it
                    found = tuning.neighbours(widest, dtype, card, backward=backward, on_gpu=True)
                    for index, tiles in enumerate(found[:1] if table_only else found):
                        yield head_dim, dtype, is_causal, index == 0, check(tiles, head_dim, dtype, is_causal,
                                                                             capability, backward=backward, mod=mod,
                                                                             value_dim=value_dim, dropout=dropout)


def markdown_rows(capability: int, head_dim: int, dtype: torch.dtype, causal: bool, in_table: bool,
                  usages: list[Usage]) -> list[str]:
    """One markdown row per usage; the table's own entries are marked with a star."""
    rows = []
    for usage in usages:
        tiles = usage.tiles
        estimate = config.sram_bytes(*tiles[:2], head_dim, dtype, tiles.num_stages, backward=usage.kernel != "forward")
        cells = [f"sm_{capability}", usage.kernel, head_dim, str(dtype).removeprefix("torch."),
                 "yes" if causal else "no", f"{tiles.block_m} x {tiles.block_n}{' *' if in_table else ''}",
                 tiles.num_warps, tiles.num_stages, estimate // 1024, f"{usage.shared / 1024:g}", usage.registers,
                 f"{usage.spill_stores}/{usage.spill_loads}", "yes" if usage.fits else "**no**"]
        rows.append("| " + " | ".join(map(str, cells)) + " |")
    return rows


HEADER = ("| target | kernel | head dim | dtype | causal | BLOCK_M x BLOCK_N | warps | stages | estimate KB | "
          "shared KB | registers | spill st/ld B | fits |\n" + "| --- " * 13 + "|")


def main(argv: list[str] | None = None) -> None:
    """Compile the candidate configurations for the target and print the markdown table of their resources."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an integer: 80, 90, ...")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    parser.add_argument("--causal", choices=("no", "yes", "both"), default="both")
    parser.add_argument("--table-only", action="store_true", help="only the table's entry, not its neighbours")
    parser.add_argument("--value-dim", type=int, default=None, help="v's head dim where it differs (MLA: 128)")
    parser.add_argument("--dropout", type=float, default=0.0, help="the variant with fused dropout of this p")
    parser.add_argument("--score-mod", default=None,
                        help='a score modification\'s steps, e.g. "mul(0.02);tanh;mul(50.0)" (soft-capping)')
    parser.add_argument("--decode", action="store_true",
                        help="the decode and merge kernels (GQA 8:1, one query row) instead")
    parser.add_argument("--splits", type=int, default=DECODE_SPLITS, help="the decode check's key splits")
    args = parser.parse_args(argv)
    if config.interpreter_active():
        raise SystemExit("compile_check compiles the kernels: run it without TRITON_INTERPRET=1")
    if args.decode:
        print(HEADER, flush=True)
        for head_dim in args.head_dims:
            for dtype in (getattr(torch, name) for name in args.dtypes):
                print("\n".join(markdown_rows(args.arch, head_dim, dtype, False, True,
                                               check_decode(head_dim, dtype, args.arch, args.splits))),
                      flush=True)
        return
    causal = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    dtypes = [getattr(torch, name) for name in args.dtypes]
    print(HEADER, flush=True)
    for found in sweep(args.arch, args.head_dims, dtypes, causal, table_only=args.table_only, mod=args.score_mod,
                       value_dim=args.value_dim, dropout=args.dropout):
        print("\n".join(markdown_rows(args.arch, *found)), flush=True)


if __name__ == "__main__":
    main()
