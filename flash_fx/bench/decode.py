"""The decode section of ``python -m flash_fx.bench``: one decode step (one query row per sequence against a KV
cache, GQA 8:1, head dim 128) on the device, flash_fx's op against PyTorch's baselines in the same run.

For each dtype, batch B and cache length Nk:

- full cache: the op (no mask) against SDPA without a mask, SDPA given the all-visible mask materialized, and
  :func:`cpu.decode_step` (transformers' ``repeat_kv`` + SDPA) compiled by ``torch.compile``'s default;
- static cache filled to 25%: the op with the cache's valid slots as key validity against SDPA given the same
  mask materialized (0 / -inf, [B, 1, 1, Nk]) and the compiled :func:`cpu.decode_step` with that mask.

SDPA gets the KV heads through ``enable_gqa`` (no copy). Rows carry ``ratio = baseline / flash_fx`` (above 1:
flash_fx is faster). On the CPU (``--device cpu``) the sizes are small: a smoke run of the harness, whose timings
are of the Triton interpreter or the C++ path, not of a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from flash_fx.bench.cpu import DECODE_FILLED, DECODE_HEAD_DIM, DECODE_HEADS, DECODE_KV_HEADS, decode_step
from flash_fx.bench.timing import NO_DEADLINE, Deadline, median_seconds


def _row(dtype: torch.dtype, batch: int, n_k: int, case: str, flash_s: float, baseline: str,
         baseline_s: float) -> dict:
    return {"dtype": str(dtype).removeprefix("torch."), "batch": batch, "n_k": n_k, "case": case,
            "flash_fx_ms": flash_s * 1e3, "baseline": baseline, "baseline_ms": baseline_s * 1e3,
            "ratio": baseline_s / flash_s}


def _inputs(batch: int, n_k: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype, generator=generator)

    q = randn(batch, DECODE_HEADS, 1, DECODE_HEAD_DIM)
    k, v = (randn(batch, DECODE_KV_HEADS, n_k, DECODE_HEAD_DIM) for _ in range(2))
    valid = (torch.arange(n_k, device=device) < max(1, int(n_k * DECODE_FILLED))).expand(batch, n_k).contiguous()
    return q, k, v, valid


def run(device: str, lengths: list[int], batches: list[int], dtypes: list[torch.dtype], reps: int,
        deadline: Deadline = NO_DEADLINE) -> Iterator[dict]:
    """The rows of every (dtype, batch, cache length) until ``deadline`` (see the module docstring)."""
    import flash_fx  # noqa: F401  (registers torch.ops.flash_fx.attention)

    compiled = {masked: torch.compile(decode_step, dynamic=True) for masked in (False, True)}
    for dtype in dtypes:
        for batch in batches:
            for n_k in lengths:
                if deadline.expired():
                    print(f"# decode: deadline reached; skipped from {dtype} B{batch} Nk {n_k} on")
                    return
                yield from _case_rows(dtype, batch, n_k, device, reps, compiled)


def _case_rows(dtype: torch.dtype, batch: int, n_k: int, device: str, reps: int,
               compiled: dict[bool, Callable]) -> Iterator[dict]:
    """The five rows of one (dtype, batch, cache length): the op at a full and a 25% filled cache against each
    baseline."""
    scale = DECODE_HEAD_DIM**-0.5
    q, k, v, valid = _inputs(batch, n_k, dtype, device)
    mask = torch.zeros(batch, 1, 1, n_k, device=device, dtype=dtype).masked_fill(~valid[:, None, None, :],
                                                                                float("-inf"))
    visible = torch.zeros_like(mask)

    def time(fn: Callable[[], object]) -> float:
        with torch.no_grad():
            return median_seconds(fn, device, reps)

    full = time(lambda: torch.ops.flash_fx.attention(q, k, v, None, scale, None))
    filled = time(lambda: torch.ops.flash_fx.attention(q, k, v, None, scale, None, key_valid=valid))
    partly = f"cache {DECODE_FILLED:.0%} filled"
    baselines = {
        ("full cache", "SDPA, no mask"): lambda: F.scaled_dot_product_attention(q, k, v, scale=scale,
                                                                               enable_gqa=True),
        ("full cache", "SDPA, same mask"): lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=visible, scale=scale, enable_gqa=True),
        ("full cache", "torch.compile default"): lambda: compiled[False](q, k, v, None),
        (partly, "SDPA, same mask"): lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                                            enable_gqa=True),
        (partly, "torch.compile default"): lambda: compiled[True](q, k, v, mask),
    }
    for (case, baseline), fn in baselines.items():
        yield _row(dtype, batch, n_k, case, full if case == "full cache" else filled, baseline, time(fn))
