"""FlashAttention-2 forward kernel in Triton.

Each program owns ``BLOCK_M`` query rows of one (batch, query head) and streams the key/value tiles
of that head's KV head (grouped or tiled GQA mapping, see :func:`triton_common.kv_head`) through an
online softmax, so the N x N score matrix never exists. It writes
the output (input dtype) and the natural-log log-sum-exp of every row (float32) for the backward.

The key tiles come from the tile schedule (:mod:`schedule`): the query tile's partial key tiles, with every
term and mask, then its full ones, with no mask code and (for a bias that holds masks) no bias read; empty
tiles are not in its list. ALiBi (``HAS_ALIBI``) adds ``slope * (j - i)`` (or ``slope * -|j - i|``) from indices
to every tile's scores, with the program's slope loaded once; a relative-position table (``HAS_REL``) adds
``rel[b, h, j - i + Nq - 1]``, gathered from the program's vector of Nq + Nk - 1 entries.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from flash_fx.kernels import triton_launch as args
from flash_fx.kernels.config import Tiles
from flash_fx.kernels.schedule import TileSchedule
from flash_fx.kernels.spec import AttentionSpec
from flash_fx.kernels.triton_common import (
    alibi_slope,
    band_visible,
    dot,
    dropout_keep,
    exp_units,
    head_factor,
    kv_head,
    load_ids,
    load_rows,
    load_seed,
    scores,
    split_lse,
    store_rows,
    structural_mask,
    tile_list,
)


@triton.jit
def _forward_tiles(acc, l_i, m_i, q, q_ids, k_base, v_base, bias_base, key_valid_base, k_doc_base, tiles, first,
                   last, offs_m, offs_n, offs_d, stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
                   stride_kvn, stride_kdn, n_q, n_k, sm_scale, slope, rel_base, stride_rel, upper, lower, bh, seed,
                   offset, threshold,
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PARTIAL: tl.constexpr, LOAD_BIAS: tl.constexpr,
                   HAS_UPPER: tl.constexpr, HAS_LOWER: tl.constexpr, HAS_BIAS: tl.constexpr,
                   HAS_KEY_VALID: tl.constexpr, HAS_DOCS: tl.constexpr, DROPOUT: tl.constexpr,
                   UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, HAS_ALIBI: tl.constexpr,
                   ALIBI_SYMMETRIC: tl.constexpr, HAS_REL: tl.constexpr, mod_params, factor, MOD: tl.constexpr,
                   offs_dv, HEAD_DIM_V: tl.constexpr):
    """Fold the key tiles numbered ``tiles[first:last]`` into the running (acc, row sum, row max).

    ``PARTIAL`` tiles get the band, key-validity and document masks and range-checked loads; full ones none.
    ``LOAD_BIAS`` false skips reading a bias known to be 0 there (see :func:`triton_common.scores`). With
    ``DROPOUT`` the row sum takes every probability but the accumulator only the kept ones (unscaled; the caller
    scales by 1 / (1 - p)). ``slope`` and ``rel_base`` are this head's ALiBi slope and relative vector.
    """
    for pos in range(first, last):
        cols = tl.load(tiles + pos) * BLOCK_N + offs_n
        k = load_rows(k_base, cols, offs_d, stride_kn, stride_kd, n_k, HEAD_DIM, PARTIAL)
        qk = dot(q, tl.trans(k), UPCAST_DOT, INPUT_PRECISION)
        s, _ = scores(qk, bias_base, offs_m[:, None], cols[None, :], stride_bm, stride_bn, n_q, n_k, sm_scale,
                      slope, rel_base, stride_rel, mod_params, factor, HAS_BIAS, LOAD_BIAS, HAS_ALIBI,
                      ALIBI_SYMMETRIC, HAS_REL, MOD)
        if PARTIAL:
            s = tl.where(band_visible(offs_m[:, None], cols[None, :], n_k, upper, lower, HAS_UPPER, HAS_LOWER),
                         s, float("-inf"))
            key_ok = load_ids(key_valid_base, cols, stride_kvn, n_k, HAS_KEY_VALID)
            k_ids = load_ids(k_doc_base, cols, stride_kdn, n_k, HAS_DOCS)
            s = structural_mask(s, q_ids[:, None], k_ids[None, :], key_ok[None, :], HAS_DOCS, HAS_KEY_VALID)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows with no visible key so far keep m = -inf; subtract 0 there instead of -inf - -inf = NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = exp_units(s - m_safe[:, None], HAS_BIAS)
        alpha = exp_units(m_i - m_safe, HAS_BIAS)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(dropout_keep(seed, offset, bh, offs_m[:, None], cols[None, :], n_q, n_k, threshold), p, 0.0)
        v = load_rows(v_base, cols, offs_dv, stride_vn, stride_vd, n_k, HEAD_DIM_V, PARTIAL)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, UPCAST_DOT, INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_forward_kernel(
    Q, K, V, Bias, Slopes, Rel, KeyValid, QDoc, KDoc, Counts, Indices, Out, Lse, ModParams, ModFactor,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_sb, stride_sh, stride_rb, stride_rh, stride_rr,
    stride_kvb, stride_kvn, stride_qdb, stride_qdm, stride_kdb, stride_kdn,
    stride_cb, stride_ch, stride_ib, stride_ih,
    stride_ob, stride_oh, stride_om, stride_od, stride_mfb, stride_mfh,
    num_heads, num_kv_heads, group_size, n_q, n_k, sm_scale, upper, lower, SeedPtr, offset, threshold, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_UPPER: tl.constexpr, HAS_LOWER: tl.constexpr, HAS_BIAS: tl.constexpr, FULL_READS_BIAS: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr, HAS_DOCS: tl.constexpr, KV_TILED: tl.constexpr, DROPOUT: tl.constexpr,
    UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, HAS_ALIBI: tl.constexpr, ALIBI_SYMMETRIC: tl.constexpr,
    HAS_REL: tl.constexpr, MOD: tl.constexpr,
):
    """Grid: (query tiles, batch * query heads). Lse is a contiguous [B, Hq, Nq, 2] float32 tensor (see
    :func:`triton_common.split_lse`). Counts (int32 [SB, SH, query tiles, 2]) and Indices (int32 [SB, SH, query
    tiles, key tiles]) are the schedule's per-query-tile lists (:meth:`schedule.TileSchedule.by_query_tile`).

    With ``DROPOUT`` probabilities are dropped as :func:`triton_common.dropout_keep` says for (``seed``,
    ``offset``, ``threshold``) and kept ones scaled by ``drop_scale``; the LSE stays that of the undropped
    softmax. ``FULL_READS_BIAS``: full tiles read the bias too (it is not a mask bias). Slopes is float32 [B, Hq];
    Rel a float vector [B, Hq, Nq + Nk - 1] of any float dtype, read as float32."""
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // num_heads
    h = bh % num_heads
    h_kv = kv_head(h, num_kv_heads, group_size, KV_TILED)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q = load_rows(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qm, stride_qd, n_q, HEAD_DIM, True)
    q_ids = load_ids(QDoc + b * stride_qdb, offs_m, stride_qdm, n_q, HAS_DOCS)
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    bias_base = Bias + b * stride_bb + h * stride_bh
    key_valid_base = KeyValid + b * stride_kvb
    k_doc_base = KDoc + b * stride_kdb
    slope = alibi_slope(Slopes, b, h, stride_sb, stride_sh, HAS_ALIBI)
    rel_base = Rel + b * stride_rb + h * stride_rh
    factor = head_factor(ModFactor, b, h, stride_mfb, stride_mfh, MOD)
    seed = load_seed(SeedPtr, DROPOUT)
    tiles, n_partial, n_full = tile_list(Counts, Indices, stride_cb, stride_ch, stride_ib, stride_ih, b, h, tile,
                                         tl.cdiv(n_k, BLOCK_N))

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _forward_tiles(acc, l_i, m_i, q, q_ids, k_base, v_base, bias_base, key_valid_base, k_doc_base,
                                   tiles, 0, n_partial, offs_m, offs_n, offs_d, stride_kn, stride_kd, stride_vn,
                                   stride_vd, stride_bm, stride_bn, stride_kvn, stride_kdn, n_q, n_k, sm_scale, slope,
                                   rel_base, stride_rr, upper, lower, bh, seed, offset, threshold, HEAD_DIM, BLOCK_N,
                                   True, True, HAS_UPPER, HAS_LOWER, HAS_BIAS, HAS_KEY_VALID, HAS_DOCS, DROPOUT,
                                   UPCAST_DOT, INPUT_PRECISION, HAS_ALIBI, ALIBI_SYMMETRIC, HAS_REL, ModParams,
                                   factor, MOD, offs_dv, HEAD_DIM_V)
    acc, l_i, m_i = _forward_tiles(acc, l_i, m_i, q, q_ids, k_base, v_base, bias_base, key_valid_base, k_doc_base,
                                   tiles, n_partial, n_partial + n_full, offs_m, offs_n, offs_d, stride_kn, stride_kd,
                                   stride_vn, stride_vd, stride_bm, stride_bn, stride_kvn, stride_kdn, n_q, n_k,
                                   sm_scale, slope, rel_base, stride_rr, upper, lower, bh, seed, offset, threshold,
                                   HEAD_DIM, BLOCK_N, False, FULL_READS_BIAS, HAS_UPPER, HAS_LOWER, HAS_BIAS,
                                   HAS_KEY_VALID, HAS_DOCS, DROPOUT, UPCAST_DOT, INPUT_PRECISION, HAS_ALIBI,
                                   ALIBI_SYMMETRIC, HAS_REL, ModParams, factor, MOD, offs_dv, HEAD_DIM_V)

    # A fully masked row has l = 0 and acc = 0: 0 / 0 = NaN, as eager softmax gives; its LSE is -inf.
    out = acc / l_i[:, None]
    if DROPOUT:
        out = out * drop_scale
    lse_hi, lse_lo = split_lse(m_i, l_i, HAS_BIAS)
    store_rows(Out + b * stride_ob + h * stride_oh, out, offs_m, offs_dv, stride_om, stride_od, n_q, HEAD_DIM_V)
    tl.store(Lse + (bh * n_q + offs_m) * 2, lse_hi, mask=offs_m < n_q)
    tl.store(Lse + (bh * n_q + offs_m) * 2 + 1, lse_lo, mask=offs_m < n_q)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, tiles: Tiles,
                      schedule: TileSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on non-empty inputs for a validated ``spec`` over the key tiles of ``schedule``
    (built for these tiles)."""
    batch, num_heads, n_q = q.shape[:3]
    out = torch.empty((*q.shape[:3], v.shape[-1]), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, num_heads, n_q, 2), dtype=torch.float32, device=q.device)
    _attention_forward_kernel[(triton.cdiv(n_q, tiles.block_m), batch * num_heads)](
        **args.inputs(q, k, v), **args.shapes(q, k, v, spec), **args.terms(spec, q), **args.masks(spec, q),
        **args.schedule(schedule, q, by_keys=False), **args.dropout_group(spec, q), **args.mod(spec, q),
        **args.tensor("Out", "stride_ob,stride_oh,stride_om,stride_od", out, q), Lse=lse,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out, lse
