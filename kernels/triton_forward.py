"""FlashAttention-2 forward kernel in Triton.

Each program owns ``BLOCK_M`` query rows of one (batch, query head) and streams the key/value tiles
of that head's KV head (grouped or tiled GQA mapping, see :func:`triton_common.kv_head`) through an
online softmax, so the N x N score matrix never exists. It writes
the output (input dtype) and the natural-log log-sum-exp of every row (float32) for the backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from flash_fx.kernels import config
from flash_fx.kernels.triton_common import (
    LN2,
    dot,
    exp_units,
    key_stages,
    kv_head,
    load_rows,
    scores,
    store_rows,
    visible,
)


@triton.jit
def _forward_tiles(acc, l_i, m_i, q, k_base, v_base, bias_base, key_start, key_end, offs_m, offs_n, offs_d,
                   stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn, n_q, n_k, sm_scale,
                   causal_offset, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                   IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST_DOT: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr):
    """Fold the key tiles in ``[key_start, key_end)`` into the running (acc, row sum, row max)."""
    for start_n in range(key_start, key_end, BLOCK_N):
        cols = start_n + offs_n
        k = load_rows(k_base, cols, offs_d, stride_kn, stride_kd, n_k, HEAD_DIM, MASKED)
        qk = dot(q, tl.trans(k), UPCAST_DOT, INPUT_PRECISION)
        s = scores(qk, bias_base, offs_m[:, None], cols[None, :], stride_bm, stride_bn, n_q, n_k, sm_scale,
                   HAS_BIAS)
        if MASKED:
            s = tl.where(visible(offs_m[:, None], cols[None, :], n_k, causal_offset, IS_CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows with no visible key so far keep m = -inf; subtract 0 there instead of -inf - -inf = NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = exp_units(s - m_safe[:, None], HAS_BIAS)
        alpha = exp_units(m_i - m_safe, HAS_BIAS)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_rows(v_base, cols, offs_d, stride_vn, stride_vd, n_k, HEAD_DIM, MASKED)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, UPCAST_DOT, INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_forward_kernel(
    Q, K, V, Bias, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_ob, stride_oh, stride_om, stride_od,
    num_heads, num_kv_heads, group_size, n_q, n_k, sm_scale, causal_offset,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, KV_TILED: tl.constexpr, UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Grid: (query tiles, batch * query heads). Lse is a contiguous [B, Hq, Nq] float32 tensor."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b = bh // num_heads
    h = bh % num_heads
    h_kv = kv_head(h, num_kv_heads, group_size, KV_TILED)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q = load_rows(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qm, stride_qd, n_q, HEAD_DIM, True)
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    bias_base = Bias + b * stride_bb + h * stride_bh

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    unmasked_end, end = key_stages(start_m, n_k, causal_offset, BLOCK_M, BLOCK_N, IS_CAUSAL)
    acc, l_i, m_i = _forward_tiles(acc, l_i, m_i, q, k_base, v_base, bias_base, 0, unmasked_end, offs_m, offs_n,
                                   offs_d, stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn, n_q,
                                   n_k, sm_scale, causal_offset, HEAD_DIM, BLOCK_N, False, IS_CAUSAL, HAS_BIAS,
                                   UPCAST_DOT, INPUT_PRECISION)
    acc, l_i, m_i = _forward_tiles(acc, l_i, m_i, q, k_base, v_base, bias_base, unmasked_end, end, offs_m, offs_n,
                                   offs_d, stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn, n_q,
                                   n_k, sm_scale, causal_offset, HEAD_DIM, BLOCK_N, True, IS_CAUSAL, HAS_BIAS,
                                   UPCAST_DOT, INPUT_PRECISION)

    # A fully masked row has l = 0 and acc = 0: 0 / 0 = NaN, as eager softmax gives; its LSE is -inf.
    out = acc / l_i[:, None]
    if HAS_BIAS:
        lse = m_i + tl.log(l_i)
    else:
        lse = (m_i + tl.log2(l_i)) * LN2
    store_rows(Out + b * stride_ob + h * stride_oh, out, offs_m, offs_d, stride_om, stride_od, n_q, HEAD_DIM)
    tl.store(Lse + bh * n_q + offs_m, lse, mask=offs_m < n_q)


def bias_arguments(bias: torch.Tensor | None, fallback: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A 4-d bias (or bias gradient) pointer and its 4 strides; without one, a dummy pointer and zero strides."""
    if bias is None:
        return fallback, (0, 0, 0, 0)
    return bias, tuple(bias.stride())


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal_offset: int | None,
    bias: torch.Tensor | None,
    kv_heads_tiled: bool,
    block_m: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on non-empty inputs; ``bias`` is already expanded to [B, Hq, Nq, Nk]."""
    batch, num_heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, num_heads, n_q), dtype=torch.float32, device=q.device)
    bias_ptr, bias_strides = bias_arguments(bias, q)
    grid = (triton.cdiv(n_q, block_m), batch * num_heads)
    _attention_forward_kernel[grid](
        q, k, v, bias_ptr, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *bias_strides, *out.stride(),
        num_heads, k.shape[1], num_heads // k.shape[1], n_q, n_k, scale, causal_offset or 0,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=config.padded_head_dim(head_dim),
        IS_CAUSAL=causal_offset is not None, HAS_BIAS=bias is not None, KV_TILED=kv_heads_tiled,
        UPCAST_DOT=config.upcast_dot(q.dtype), INPUT_PRECISION=config.input_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse
