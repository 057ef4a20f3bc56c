"""The `flash_fx::attention` custom op that rewritten graphs call.

`torch.ops.flash_fx.attention(q, k, v, bias, scale, causal_offset) -> (out, lse)` takes 4-d
q [B, H, Nq, d], k and v [B, Hkv, Nk, d] (any strides) and an optional additive bias broadcastable to
[B, H, Nq, Nk]. It has a fake implementation (shapes only, symbolic sizes welcome) and a registered
autograd formula whose backward is the `flash_fx::attention_backward` op, so AOTAutograd and Inductor
treat both as opaque kernels. Device dispatch lives in flash_fx.kernels: Triton on CUDA (and on CPU
under TRITON_INTERPRET=1), the tiled PyTorch implementation of the same algorithm otherwise.
"""

from __future__ import annotations

import torch

from flash_fx import kernels


@torch.library.custom_op("flash_fx::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    causal_offset: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q @ k^T * scale + bias, causal) @ v, and the row log-sum-exp (float32) for the backward."""
    out, lse = kernels.attention_forward(q, k, v, scale=scale, causal_offset=causal_offset, bias=bias)
    return out.contiguous(), lse.contiguous()


@attention.register_fake
def _attention_fake(q, k, v, bias, scale, causal_offset):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    return out, lse


@torch.library.custom_op("flash_fx::attention_backward", mutates_args=())
def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    causal_offset: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `attention`, recomputed tile by tile from q, k, v and the saved lse."""
    dq, dk, dv = kernels.attention_backward(
        grad_out, q, k, v, out, lse, scale=scale, causal_offset=causal_offset, bias=bias
    )
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@attention_backward.register_fake
def _attention_backward_fake(grad_out, q, k, v, out, lse, bias, scale, causal_offset):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, bias, scale, causal_offset = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias)
    ctx.scale, ctx.causal_offset = scale, causal_offset
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, bias = ctx.saved_tensors
    dq, dk, dv = torch.ops.flash_fx.attention_backward(
        grad_out, q, k, v, out, lse, bias, ctx.scale, ctx.causal_offset
    )
    return dq, dk, dv, None, None, None


attention.register_autograd(_backward, setup_context=_setup_context)
