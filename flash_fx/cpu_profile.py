"""This machine's CPU as the cost model sees it, measured once per process.

A few short timings (about 0.1 s in all, on real tensors even while a graph is being compiled): the best of
batched float32 products of the shapes attention multiplies; causal attention [1, 4, 512, 64] through the unfused
ops (Q @ K^T, scale, mask, softmax, P @ V) and through the ``flash_fx::attention`` op, forward, best of a few
(from which the cost model derives the rates each side attains: the unfused ops' passes over scores run far
below a copy's bandwidth, as every one writes a fresh Nq x Nk tensor); and the fixed time of one attention call
at a tiny size, each side, forward and forward + backward (medians). The two sides are timed in turn, so a busy
moment weighs on both alike. The fixed times decide small attentions on a CPU, where one extra call costs as
much as the whole product.
"""

from __future__ import annotations

import functools
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

HEAD_DIM = 64
REFERENCE_N, REFERENCE_HEADS = 512, 4  # the causal attention both sides are timed on


@dataclass(frozen=True)
class CpuProfile:
    """Timings of this CPU (seconds) and its matrix throughput (FLOP/s); the cost model turns them into rates."""

    name: str
    matmul_flops_per_s: float  # the best of batched float32 products of attention's shapes
    reference: tuple[int, int, int]  # (heads, N, head dim) of the causal attention timed below, batch 1
    eager_reference_s: float  # its unfused ops, forward
    flash_reference_s: float  # the flash_fx op, forward
    eager_fixed_s: float  # the unfused ops at a tiny size, forward
    flash_fixed_s: float  # the flash_fx op at a tiny size, forward
    eager_fixed_training_s: float  # the same, forward + backward
    flash_fixed_training_s: float


def seconds_in_turn(*fns: Callable[[], object], reps: int, best: bool = False) -> tuple[float, ...]:
    """The median (or the best) of ``reps`` timings of each function, after a warm-up call of each, the functions
    timed in turn rep by rep in alternating order (so a busy moment of the machine, or going first, weighs on all
    alike)."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    for rep in range(reps):
        for index in order if rep % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            fns[index]()
            times[index].append(time.perf_counter() - start)
    pick = min if best else statistics.median
    return tuple(pick(record) for record in times)


def _attention(n: int, heads: int, training: bool) -> tuple[Callable[[], object], Callable[[], object]]:
    """The unfused ops and the flash_fx op on causal attention [1, heads, n, 64] (backward too if ``training``)."""
    from flash_fx import op  # noqa: F401  (registers torch.ops.flash_fx.attention)

    q, k, v = (torch.randn(1, heads, n, HEAD_DIM, requires_grad=training) for _ in range(3))
    hidden = torch.ones(n, n, dtype=torch.bool).triu(1)

    def unfused() -> None:
        scores = (q @ k.transpose(-2, -1)) * 0.125
        out = scores.masked_fill(hidden, float("-inf")).softmax(-1) @ v
        if training:
            out.sum().backward()

    def flash() -> None:
        out = torch.ops.flash_fx.attention(q, k, v, None, 0.125, 0)[0]
        if training:
            out.sum().backward()

    return unfused, flash


@functools.cache
def measure() -> CpuProfile:
    """This CPU's figures (measured on the first call of the process, then cached)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with (unset_fake_temporarily(), torch.inference_mode(False), torch.autocast("cpu", enabled=False),
          torch.random.fork_rng()):
        torch.manual_seed(0)
        a, b = torch.randn(16, 256, HEAD_DIM), torch.randn(16, HEAD_DIM, 256)
        (matmul_s,) = seconds_in_turn(lambda: torch.bmm(a, b), reps=9, best=True)
        fixed = {}
        for training in (False, True):
            with torch.enable_grad() if training else torch.no_grad():
                unfused, flash = _attention(16, 1, training)
                fixed[training] = seconds_in_turn(unfused, flash, reps=15)
        with torch.no_grad():
            reference = seconds_in_turn(*_attention(REFERENCE_N, REFERENCE_HEADS, False), reps=5, best=True)
    name = f"CPU {platform.machine() or 'unknown'}, {torch.get_num_threads()} threads"
    return CpuProfile(name, 2 * math.prod((16, 256, HEAD_DIM, 256)) / matmul_s,
                      (REFERENCE_HEADS, REFERENCE_N, HEAD_DIM), *reference, *fixed[False], *fixed[True])

