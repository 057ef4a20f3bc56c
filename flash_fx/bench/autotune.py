"""Autotuning benchmark: the launch configurations of the table against the autotuner's, on this card.

For a few kernel-benchmark shapes it times flash_fx's forward + backward with the table's configurations
(:mod:`flash_fx.kernels.config`), then with autotuning on (:mod:`flash_fx.kernels.tuning`: the first call times
the candidates around the table's entry and keeps the fastest), and records which configurations won. The rows
are what the table should be updated from (CUDA only: the interpreter's timings say nothing about a GPU).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from flash_fx.bench.kernels import flash_fx_attention, rotated_inputs, timed_call
from flash_fx.bench.timing import NO_DEADLINE, Deadline, median_seconds
from flash_fx.kernels import tuning

#: (head dim, dtype, causal) tuned at N = 4096, in order of priority.
SHAPES = ((128, torch.float16, False), (128, torch.float16, True), (64, torch.float16, False),
          (64, torch.float16, True), (128, torch.bfloat16, False), (64, torch.bfloat16, True))


def _config(row: dict) -> str:
    return f"{row['block_m']}x{row['block_n']} w{row['num_warps']} s{row['num_stages']}"


def run(device: str, n: int, tokens: int, heads: int, reps: int,
        deadline: Deadline = NO_DEADLINE) -> Iterator[dict]:
    """One row per shape of :data:`SHAPES`: forward + backward ms with the table's and the tuned configurations and
    the winners with every candidate's time."""
    if device != "cuda":
        print("# autotune: launch configurations are tuned on CUDA only; nothing measured on the CPU")
        return
    for head_dim, dtype, causal in SHAPES:
        if deadline.expired():
            print(f"# autotune: deadline reached; skipped from d={head_dim} {dtype} causal={causal} on")
            return
        inputs = rotated_inputs(max(1, tokens // n), heads, n, head_dim, device, dtype)
        step = timed_call(flash_fx_attention, inputs, causal, "forward+backward")
        try:
            tuning.set_autotune(False)
            table = median_seconds(step, device, reps)
            tuning.clear_tuned_configs()
            tuning.set_autotune(True)
            tuned = median_seconds(step, device, reps)  # its first, untimed call tunes
            chosen = {row["kernel"]: row for row in tuning.tuned_configs()}
        finally:
            tuning.set_autotune(None)
        row = {"n": n, "head_dim": head_dim, "dtype": str(dtype).removeprefix("torch."), "causal": causal,
               "table_ms": table * 1e3, "tuned_ms": tuned * 1e3, "speedup": table / tuned}
        for kernel in ("forward", "backward"):
            won = chosen.get(kernel)
            row[f"{kernel} config"] = _config(won) if won else "-"
            row[f"{kernel} candidates"] = "; ".join(
                f"{_config(c)}: {c['ms']:.3f} ms" for c in won["candidates"]) if won else "-"
        yield row
        del inputs
        torch.cuda.empty_cache()
