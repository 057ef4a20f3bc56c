"""Memory benchmark: peak GPU memory of one attention forward + backward against N, eager vs Inductor vs
flash_fx, up to the largest N each fits (CUDA only: the CPU has no peak-memory counter to compare)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

import flash_fx.op  # noqa: F401  (registers torch.ops.flash_fx.attention)
from flash_fx.bench.kernels import eager_attention
from flash_fx.bench.timing import NO_DEADLINE, Deadline


def _flash_fx(q, k, v, causal):
    return torch.ops.flash_fx.attention(q, k, v, None, q.shape[-1] ** -0.5, 0 if causal else None)[0]


def peak_bytes(method, n: int, heads: int, head_dim: int, dtype: torch.dtype) -> float:
    """Peak bytes allocated during forward + backward beyond the inputs (NaN when it runs out of memory)."""
    qkv = [torch.randn(1, heads, n, head_dim, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        out = method(*qkv, True)
        torch.autograd.grad(out, qkv, torch.ones_like(out))
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    except torch.OutOfMemoryError:
        return float("nan")
    finally:
        del qkv
        torch.cuda.empty_cache()


def run(sizes: list[int], heads: int, head_dim: int, dtype: torch.dtype,
        deadline: Deadline = NO_DEADLINE) -> Iterator[dict]:
    """One row per (N, method): peak MB; a method stops at the first N it cannot fit. Stops at ``deadline``."""
    methods = {"eager": eager_attention, "inductor": torch.compile(eager_attention, dynamic=True),
               "flash_fx": _flash_fx}
    failed = set()
    for n in sizes:
        if deadline.expired():
            print(f"# memory: deadline reached; skipped from N={n} on")
            return
        for name, method in methods.items():
            peak = float("nan") if name in failed else peak_bytes(method, n, heads, head_dim, dtype)
            if peak != peak:
                failed.add(name)
            yield {"n": n, "heads": heads, "head_dim": head_dim, "method": name, "peak_mb": peak / 2**20}
