"""nn.MultiheadAttention's computation with its attention on `flash_fx::attention`.

Rewritten graphs call `multi_head_attention` in place of F.multi_head_attention_forward (same inputs and
projections; Inductor traces through it, so only the attention becomes a kernel call).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flash_fx.kernels.spec import AttentionSpec, Bias, Dropout
from flash_fx.op import zero_dead_rows


def multi_head_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    num_heads: int,
    in_proj_weight: torch.Tensor | None,
    in_proj_bias: torch.Tensor | None,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    q_proj_weight: torch.Tensor | None,
    k_proj_weight: torch.Tensor | None,
    v_proj_weight: torch.Tensor | None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, None]:
    """(attention output [L, N, E], None) for sequence-first inputs, as F.multi_head_attention_forward."""
    length, batch, width = query.shape
    head_dim = width // num_heads
    weights = (q_proj_weight, k_proj_weight, v_proj_weight) if in_proj_weight is None else in_proj_weight.chunk(3)
    biases = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)

    def heads(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        projected = F.linear(x, weight, bias)
        return projected.view(x.shape[0], batch, num_heads, head_dim).permute(1, 2, 0, 3)  # [N, H, L, d]

    q, k, v = (heads(x, w, b) for x, w, b in zip((query, key, value), weights, biases, strict=True))
    bias = _mask_bias(attn_mask, key_padding_mask, batch, num_heads, query.dtype)
    args, kwargs = AttentionSpec(head_dim**-0.5, bias=None if bias is None else Bias(bias),
                                 dropout=Dropout(dropout_p)).op_args()
    out, lse, _ = torch.ops.flash_fx.attention(q, k, v, *args, **kwargs)
    out = zero_dead_rows(out, lse)
    out = out.permute(2, 0, 1, 3).reshape(length, batch, width)
    return F.linear(out, out_proj_weight, out_proj_bias), None


def _as_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = not allowed) as an additive -inf bias; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _mask_bias(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, batch: int, heads: int,
               dtype: torch.dtype) -> torch.Tensor | None:
    """attn_mask ([L, S] or [N*H, L, S]) and key_padding_mask ([N, S]) as one bias broadcastable to [N, H, L, S]."""
    bias = None
    if attn_mask is not None:
        bias = _as_bias(attn_mask, dtype)
        if bias.dim() == 3:
            bias = bias.view(batch, heads, *bias.shape[1:])
    if key_padding_mask is not None:
        padding = _as_bias(key_padding_mask, dtype)[:, None, None, :]
        bias = padding if bias is None else bias + padding
    return bias
