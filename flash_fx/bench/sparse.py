"""Block-sparse benchmark: kernel time against the fraction of non-empty tiles of a constant block layout.

For each sequence length and density it builds a random block layout (blocks of ``--block`` x ``--block``
positions, the diagonal block always kept so no row is empty, the same layout for every batch entry and
head) and times, in the same run on the same device:

- ``flash_fx sparse``: the mask as a bias with ``sparse_bias=True`` (empty tiles skipped, full tiles unmasked);
- ``flash_fx bias``: the same bias without the layout (every tile visited and masked);
- ``flash_fx dense``: no mask at all, the reference the ratios are taken against;
- ``sdpa mask``: ``F.scaled_dot_product_attention`` with the boolean mask;
- ``flex``: (CUDA only) compiled ``flex_attention`` with the equivalent ``BlockMask``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from flash_fx import kernels
from flash_fx.bench.timing import NO_DEADLINE, Deadline, median_seconds
from flash_fx.kernels.spec import AttentionSpec, Bias

DENSITIES = (1.0, 0.5, 0.25, 0.1)


def block_layout(n: int, block: int, density: float, seed: int = 0) -> torch.Tensor:
    """Bool [blocks, blocks]: per block row the diagonal block and random others, ``density`` of them in all."""
    blocks = math.ceil(n / block)
    per_row = max(1, round(density * blocks))
    generator = torch.Generator().manual_seed(seed)
    layout = torch.zeros(blocks, blocks, dtype=torch.bool)
    for row in range(blocks):
        others = [c for c in torch.randperm(blocks, generator=generator).tolist() if c != row]
        layout[row, [row, *others[: per_row - 1]]] = True
    return layout


def _attention_calls(q, k, v, bias, visible, device: str) -> dict[str, Callable[[], torch.Tensor]]:
    scale = q.shape[-1] ** -0.5
    calls = {
        "flash_fx sparse": lambda: kernels.attention_forward(q, k, v, AttentionSpec(scale, bias=Bias(bias, True)))[0],
        "flash_fx bias": lambda: kernels.attention_forward(q, k, v, AttentionSpec(scale, bias=Bias(bias)))[0],
        "flash_fx dense": lambda: kernels.attention_forward(q, k, v, AttentionSpec(scale))[0],
        "sdpa mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale),
    }
    if device == "cuda":
        calls["flex"] = _flex_call(q, k, v, visible, scale)
    return calls


def _flex_call(q, k, v, visible, scale) -> Callable[[], torch.Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    plane = visible[0, 0]

    def mask_mod(b, h, q_idx, kv_idx):
        return plane[q_idx, kv_idx]

    n_q, n_k = plane.shape
    block_mask = create_block_mask(mask_mod, None, None, n_q, n_k, device=q.device)
    compiled = torch.compile(flex_attention)
    return lambda: compiled(q, k, v, block_mask=block_mask, scale=scale)


def _with_backward(call: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        out = call()
        grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
        del grads

    return step


def run(device: str, sizes: list[int], batch_heads: int, head_dim: int, block: int, dtype: torch.dtype,
        reps: int, backward: bool, deadline: Deadline = NO_DEADLINE) -> Iterator[dict]:
    """Time every method at every (N, density): one row per measurement. Stops at ``deadline``."""
    for n in sizes:
        for density in DENSITIES:
            if deadline.expired():
                print(f"# sparse: deadline reached; skipped from N={n}, density={density} on")
                return
            layout = block_layout(n, block, density)
            visible = layout.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :n]
            visible = visible.to(device)[None, None]
            bias = torch.zeros(visible.shape, dtype=torch.float32, device=device).masked_fill(~visible,
                                                                                              float("-inf"))
            qkv = [torch.randn(1, batch_heads, n, head_dim, device=device, dtype=dtype) for _ in range(3)]
            modes = [("forward", False)] + ([("forward+backward", True)] if backward else [])
            for mode, with_grad in modes:
                if with_grad:
                    qkv = [x.requires_grad_() for x in qkv]
                calls = _attention_calls(*qkv, bias, visible, device)
                times = {}
                for method, call in calls.items():
                    fn = _with_backward(call, qkv) if with_grad else call
                    try:
                        times[method] = median_seconds(fn, device, reps)
                    except Exception as error:  # a baseline that cannot run this shape is reported, not fatal
                        times[method] = float("nan")
                        print(f"# {method} failed at N={n}, density={density}: {type(error).__name__}: {error}")
                for method, seconds in times.items():
                    yield {
                        "n": n, "density": density, "layout_density": round(layout.float().mean().item(), 4),
                        "mode": mode, "method": method, "ms": seconds * 1e3,
                        "vs_flash_fx_dense": times["flash_fx dense"] / seconds,
                    }
