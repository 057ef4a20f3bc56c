"""Kernel calls for tests, spelled with the op's keyword arguments: each builds the AttentionSpec they stand for
(through `AttentionSpec.from_op_args`, the one conversion) and calls the entry points with it."""

from __future__ import annotations

import torch
from flash_fx.kernels import tiled_torch
from flash_fx.kernels.schedule import TileSchedule, bias_classes, schedule
from flash_fx.kernels.spec import AttentionSpec, Dropout, Launch, Saved

from flash_fx import kernels


def spec_of(scale: float, *, causal_offset: int | None = None, bias: torch.Tensor | None = None,
            seed: int | None = None, offset: int = 0, bias_requires_grad: bool = False,
            rel_bias_requires_grad: bool = False, **op_kwargs) -> AttentionSpec:
    """The spec of an op call with these arguments (and a dropout seed and offset, gradients asked for)."""
    spec = AttentionSpec.from_op_args(bias, scale, causal_offset, **op_kwargs)
    spec = spec.replace(dropout=Dropout(spec.dropout.p, seed, offset))
    return spec.with_grads(bias_requires_grad, rel_bias_requires_grad)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_m: int | None = None,
            block_n: int | None = None, **spec_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels.attention_forward of the spec these keywords describe."""
    return kernels.attention_forward(q, k, v, spec_of(**spec_kwargs), Launch(block_m, block_n))


def backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, *, block_m: int | None = None, block_n: int | None = None,
             **spec_kwargs) -> tuple[torch.Tensor, ...]:
    """kernels.attention_backward of the spec these keywords describe."""
    return kernels.attention_backward(grad_out, Saved(q, k, v, out, lse), spec_of(**spec_kwargs),
                                      Launch(block_m, block_n))


def tiled_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_m: int | None = None,
                  block_n: int = 256, **spec_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiled PyTorch path itself, over the schedule of ``block_m`` (all rows if None) x ``block_n`` tiles."""
    spec = spec_of(**spec_kwargs).validate(q, k, v)
    plan = schedule(spec, q.shape[2], k.shape[2], block_m or q.shape[2], block_n)
    return tiled_torch.attention_forward(q, k, v, spec, plan)


def tiled_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, *, block_m: int | None = None, block_n: int = 256,
                   **spec_kwargs) -> tuple[torch.Tensor, ...]:
    """The tiled PyTorch path's backward itself."""
    spec = spec_of(**spec_kwargs).validate(q, k, v)
    plan = schedule(spec, q.shape[2], k.shape[2], block_m or q.shape[2], block_n)
    return tiled_torch.attention_backward(grad_out, Saved(q, k, v, out, lse), spec, plan)


def layout_of(bias: torch.Tensor, block_m: int, block_n: int, causal_offset: int | None = None) -> TileSchedule:
    """The tile classes of an expanded [B, H, Nq, Nk] mask bias under a causal band, as a schedule."""
    spec = spec_of(1.0, bias=bias, causal_offset=causal_offset, sparse_bias=True)
    spec = spec.replace(band=spec.band.clamped(bias.shape[2] + bias.shape[3]))
    return TileSchedule(bias_classes(spec, block_m, block_n), block_m, block_n)


def density_spec(n_q: int, n_k: int, **op_kwargs) -> AttentionSpec:
    """A validated spec of these structural masks for ``n_q`` queries and ``n_k`` keys (for tile_density)."""
    batch = max([t.shape[0] for t in op_kwargs.values() if isinstance(t, torch.Tensor)], default=1)
    q, k = torch.empty(batch, 1, n_q, 1), torch.empty(batch, 1, n_k, 1)
    return spec_of(1.0, **op_kwargs).validate(q, k, k)
