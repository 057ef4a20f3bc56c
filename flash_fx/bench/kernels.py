"""Kernel benchmark: flash_fx's attention against PyTorch's SDPA backends and eager attention, in TFLOP/s.

FLOPs are counted as 4 * B * H * Nq * Nk * d for the forward, 2.5 times that for the backward, halved under a
causal mask (the work an exact kernel must do, whatever it skips). Each call gets the next of a few input sets in
turn, so no input stays cached between timed calls. With the card's measured ceilings each row also gets its
floor (:mod:`flash_fx.bench.roofline`) and the fraction of it reached (``of_floor``, 1.0 = at the roofline).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

import flash_fx.op  # noqa: F401  (registers torch.ops.flash_fx.attention)
from flash_fx.bench.roofline import Ceilings, attention_min_bytes
from flash_fx.bench.timing import NO_DEADLINE, Deadline, median_seconds

ROTATION = 3  # input sets cycled through by successive calls


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """The three-op PyTorch form: scores, (masked) softmax, weighted sum."""
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        n_q, n_k = scores.shape[-2:]
        hidden = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu(n_k - n_q + 1)
        scores = scores.masked_fill(hidden, float("-inf"))
    return scores.softmax(-1) @ v


def flash_fx_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """The flash_fx op (forward and, through autograd, backward kernels)."""
    offset = k.shape[2] - q.shape[2] if causal else None
    return torch.ops.flash_fx.attention(q, k, v, None, q.shape[-1] ** -0.5, offset)[0]


def sdpa_methods(device: str) -> dict[str, Callable]:
    """SDPA pinned to each backend this device offers (one entry per backend), plus SDPA's own choice."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def pinned(backend: SDPBackend) -> Callable:
        def run(q, k, v, causal):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return run

    methods = {"sdpa (default)": lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal)}
    if device == "cuda":
        for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
            if hasattr(SDPBackend, name):
                methods[f"sdpa {name.lower().removesuffix('_attention')}"] = pinned(getattr(SDPBackend, name))
    return methods


def rotated_inputs(batch: int, heads: int, n: int, head_dim: int, device: str,
                   dtype: torch.dtype) -> list[list[torch.Tensor]]:
    """``ROTATION`` sets of random (q, k, v) leaves [batch, heads, n, head_dim] for :func:`timed_call` to cycle."""
    return [[torch.randn(batch, heads, n, head_dim, device=device, dtype=dtype, requires_grad=True)
             for _ in range(3)] for _ in range(ROTATION)]


def attention_flops(batch: int, heads: int, n: int, head_dim: int, causal: bool, mode: str) -> float:
    forward = 4 * batch * heads * n * n * head_dim / (2 if causal else 1)
    return {"forward": forward, "backward": 2.5 * forward, "forward+backward": 3.5 * forward}[mode]


def timed_call(method: Callable, inputs: list[list[torch.Tensor]], causal: bool, mode: str) -> Callable[[], None]:
    cycle = itertools.cycle(inputs)
    if mode == "forward":
        def forward() -> None:
            q, k, v = next(cycle)
            with torch.no_grad():
                method(q, k, v, causal)
        return forward
    if mode == "forward+backward":
        def step() -> None:
            q, k, v = next(cycle)
            out = method(q, k, v, causal)
            torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        return step
    # backward alone: the forward runs once per input set outside the timed region
    outs = [(method(q, k, v, causal), (q, k, v)) for q, k, v in inputs]
    ring = itertools.cycle(outs)

    def backward() -> None:
        out, leaves = next(ring)
        torch.autograd.grad(out, leaves, torch.ones_like(out), retain_graph=True)
    return backward


def _methods(device: str) -> dict[str, Callable]:
    return {"flash_fx": flash_fx_attention, **sdpa_methods(device), "eager": eager_attention}


def _fits(method: str, n: int, device: str) -> bool:
    """Whether to time ``method`` at length ``n``: the N x N methods (eager, SDPA's math backend) stop at 8K on a
    GPU, where they take seconds and tens of GB; they are the same algorithm at every N."""
    return device != "cuda" or n <= 8192 or method not in ("eager", "sdpa math")


def run(device: str, sizes: list[int], head_dims: list[int], dtypes: list[torch.dtype], tokens: int, heads: int,
        reps: int, modes: list[str], ceilings: Ceilings | None = None,
        deadline: Deadline = NO_DEADLINE) -> Iterator[dict]:
    """One row per (d, dtype, N, causal, mode, method), in that order of priority: median ms, TFLOP/s and, with
    ``ceilings``, the floor of that shape on this device and the fraction of it reached. Stops at ``deadline``."""
    for head_dim, dtype, n, causal in itertools.product(head_dims, dtypes, sizes, (False, True)):
        if deadline.expired():
            print(f"# kernels: deadline reached; skipped from d={head_dim} {dtype} N={n} causal={causal} on")
            return
        batch = max(1, tokens // n)
        inputs = rotated_inputs(batch, heads, n, head_dim, device, dtype)
        for mode, (name, method) in itertools.product(modes, _methods(device).items()):
            if not _fits(name, n, device):
                continue
            try:
                seconds = median_seconds(timed_call(method, inputs, causal, mode), device, reps)
            except Exception as error:  # a backend that does not support this shape/dtype is reported, not fatal
                print(f"# {name} {mode} N={n} d={head_dim} {dtype} causal={causal}: {type(error).__name__}: "
                      f"{str(error)[:120]}")
                seconds = float("nan")
            flop = attention_flops(batch, heads, n, head_dim, causal, mode)
            row = {"n": n, "head_dim": head_dim, "dtype": str(dtype).removeprefix("torch."), "causal": causal,
                   "batch": batch, "heads": heads, "mode": mode, "method": name, "ms": seconds * 1e3,
                   "tflops": flop / seconds / 1e12}
            if ceilings is not None:
                nbytes = attention_min_bytes(batch, heads, n, head_dim, dtype.itemsize, mode)
                floor = ceilings.floor_seconds(flop, nbytes)
                row.update(floor_ms=floor * 1e3, of_floor=floor / seconds)
            yield row
        del inputs
        if device == "cuda":
            torch.cuda.empty_cache()
