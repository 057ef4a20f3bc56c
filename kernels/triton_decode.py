"""Decode kernels in Triton: the query heads sharing a KV head packed into one tile, the keys split across
programs (flash-decoding), the partial results merged by their log-sum-exps. When and with which launch:
:mod:`decode`.

``_decode_kernel`` (grid: key splits, B * Hkv) gives packed row ``p`` of a KV head's tile the query head
``query_head(h_kv, p // Nq)`` and the query position ``p % Nq``; rows past the group's last repeat it (computed,
never stored). Every per-head term takes a vector of heads: the bias rows, the ALiBi slopes, the relative vectors
and a modification's head factor are gathered per row. The program folds its share of the KV head's tile list
(:mod:`schedule`, partial tiles with every mask first, then full ones; split evenly by the list's own length, so
a static cache's unfilled slots cost no split) through :func:`triton_forward._forward_tiles`, the prefill
kernel's own loop, and writes its rows' normalized output and (hi, lo) log-sum-exp pair. ``_merge_kernel`` (grid:
B * Hkv * packed rows) weighs each split's output by ``exp(lse_s - max)`` (the pair's low part included, so rows
a finite fill hides entirely keep their counts) and writes the row's output and LSE pair in the layout of the
prefill kernel. With one split the first kernel writes them itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from flash_fx.kernels import triton_launch as args
from flash_fx.kernels.decode import DecodePlan, packed_rows
from flash_fx.kernels.schedule import TileSchedule
from flash_fx.kernels.spec import AttentionSpec
from flash_fx.kernels.triton_common import load_ids, query_head, split_lse, tile_list
from flash_fx.kernels.triton_forward import _forward_tiles


@triton.jit
def _per_row(base, b, h, stride_b, stride_h, ENABLED: tl.constexpr):
    """float32 ``base[b, h]`` for a vector of heads ``h``, as a column [rows, 1]; 0.0 (nothing read) if not
    ``ENABLED``."""
    if ENABLED:
        out = tl.load(base + b * stride_b + h * stride_h).to(tl.float32)[:, None]
    else:
        out = 0.0
    return out


@triton.jit
def _packed(h_kv, num_kv_heads, group_size, n_q, rows, BLOCK_M: tl.constexpr, KV_TILED: tl.constexpr):
    """``(heads, positions, stored)`` of a decode tile's rows (see the module docstring)."""
    p = tl.arange(0, BLOCK_M)
    stored = p < rows
    p = tl.minimum(p, rows - 1)
    return query_head(h_kv, p // n_q, num_kv_heads, group_size, KV_TILED), p % n_q, stored


@triton.jit
def _decode_kernel(
    Q, K, V, Bias, Slopes, Rel, KeyValid, QDoc, KDoc, Counts, Indices, Out, Lse, PartOut, PartLse, ModParams,
    ModFactor,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_sb, stride_sh, stride_rb, stride_rh, stride_rr,
    stride_kvb, stride_kvn, stride_qdb, stride_qdm, stride_kdb, stride_kdn,
    stride_cb, stride_ch, stride_ib, stride_ih,
    stride_ob, stride_oh, stride_om, stride_od, stride_mfb, stride_mfh,
    num_heads, num_kv_heads, group_size, n_q, n_k, sm_scale, upper, lower, rows,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, SPLITS: tl.constexpr,
    HAS_UPPER: tl.constexpr, HAS_LOWER: tl.constexpr, HAS_BIAS: tl.constexpr, FULL_READS_BIAS: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr, HAS_DOCS: tl.constexpr, KV_TILED: tl.constexpr,
    UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, HAS_ALIBI: tl.constexpr, ALIBI_SYMMETRIC: tl.constexpr,
    HAS_REL: tl.constexpr, MOD: tl.constexpr,
):
    """Grid: (SPLITS, B * Hkv). Counts/Indices are the schedule's lists of its one query tile per (batch row, KV
    head) (:meth:`schedule.TileSchedule.by_kv_head`). With one split, Out [B, Hq, Nq, Dv] and Lse [B, Hq, Nq, 2]
    get the rows; else PartOut (float32 [B * Hkv, SPLITS, rows, Dv]) and PartLse (float32 [B * Hkv, SPLITS, rows,
    2])."""
    split = tl.program_id(0)
    bkv = tl.program_id(1).to(tl.int64)
    b = bkv // num_kv_heads
    h_kv = bkv % num_kv_heads
    h, offs_m, stored = _packed(h_kv, num_kv_heads, group_size, n_q, rows, BLOCK_M, KV_TILED)
    h = h.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    q_ids = load_ids(QDoc + b * stride_qdb, offs_m, stride_qdm, n_q, HAS_DOCS)
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    bias_base = Bias + b * stride_bb + h[:, None] * stride_bh
    slope = _per_row(Slopes, b, h, stride_sb, stride_sh, HAS_ALIBI)
    rel_base = Rel + b * stride_rb + h[:, None] * stride_rh
    factor = _per_row(ModFactor, b, h, stride_mfb, stride_mfh, MOD != 0)
    tiles, n_partial, n_full = tile_list(Counts, Indices, stride_cb, stride_ch, stride_ib, stride_ih, b, h_kv, 0,
                                         tl.cdiv(n_k, BLOCK_N))
    total = n_partial + n_full
    per_split = tl.cdiv(total, SPLITS)
    first = split * per_split
    last = tl.minimum(first + per_split, total)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _forward_tiles(acc, l_i, m_i, q, q_ids, k_base, v_base, bias_base, KeyValid + b * stride_kvb,
                                   KDoc + b * stride_kdb, tiles, first, tl.minimum(last, n_partial), offs_m, offs_n,
                                   offs_d, stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
                                   stride_kvn, stride_kdn, n_q, n_k, sm_scale, slope, rel_base, stride_rr, upper,
                                   lower, 0, 0, 0, 0, HEAD_DIM, BLOCK_N, True, True, HAS_UPPER, HAS_LOWER, HAS_BIAS,
                                   HAS_KEY_VALID, HAS_DOCS, False, UPCAST_DOT, INPUT_PRECISION, HAS_ALIBI,
                                   ALIBI_SYMMETRIC, HAS_REL, ModParams, factor, MOD, offs_dv, HEAD_DIM_V)
    acc, l_i, m_i = _forward_tiles(acc, l_i, m_i, q, q_ids, k_base, v_base, bias_base, KeyValid + b * stride_kvb,
                                   KDoc + b * stride_kdb, tiles, tl.maximum(first, n_partial), last, offs_m, offs_n,
                                   offs_d, stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
                                   stride_kvn, stride_kdn, n_q, n_k, sm_scale, slope, rel_base, stride_rr, upper,
                                   lower, 0, 0, 0, 0, HEAD_DIM, BLOCK_N, False, FULL_READS_BIAS, HAS_UPPER,
                                   HAS_LOWER, HAS_BIAS, HAS_KEY_VALID, HAS_DOCS, False, UPCAST_DOT, INPUT_PRECISION,
                                   HAS_ALIBI, ALIBI_SYMMETRIC, HAS_REL, ModParams, factor, MOD, offs_dv, HEAD_DIM_V)
    lse_hi, lse_lo = split_lse(m_i, l_i, HAS_BIAS)
    if SPLITS == 1:  # the rows' results as the prefill kernel writes them (rows without keys: 0 / 0 = NaN)
        out = acc / l_i[:, None]
        ptrs = Out + b * stride_ob + h[:, None] * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
        tl.store(ptrs, out.to(Out.dtype.element_ty), mask=stored[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
        lse_rows = Lse + ((b * num_heads + h) * n_q + offs_m) * 2
    else:  # this split's normalized partial (0 where it saw no key) and its LSE pair
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        part_rows = (bkv * SPLITS + split) * rows + tl.arange(0, BLOCK_M)
        tl.store(PartOut + part_rows[:, None] * BLOCK_DV + offs_dv[None, :], out, mask=stored[:, None])
        lse_rows = PartLse + part_rows * 2
    tl.store(lse_rows, lse_hi, mask=stored)
    tl.store(lse_rows + 1, lse_lo, mask=stored)


@triton.jit
def _merge_kernel(PartOut, PartLse, Out, Lse, stride_ob, stride_oh, stride_om, stride_od,
                  num_heads, num_kv_heads, group_size, n_q, rows,
                  HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
                  KV_TILED: tl.constexpr):
    """Grid: (B * Hkv * rows). One packed row's splits merged: output ``sum_s w_s out_s / sum_s w_s`` with
    ``w_s = exp((hi_s - max hi) + lo_s)``, LSE ``max hi + log(sum w)`` as a (hi, lo) pair; a row no split saw a
    key of gets NaN and (-inf, 0), as the prefill kernel gives it."""
    pid = tl.program_id(0).to(tl.int64)
    bkv = pid // rows
    p = pid % rows
    b = bkv // num_kv_heads
    h = query_head(bkv % num_kv_heads, p // n_q, num_kv_heads, group_size, KV_TILED)
    i = p % n_q
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    part = (bkv * SPLITS + offs_s) * rows + p
    hi = tl.load(PartLse + part * 2, mask=offs_s < SPLITS, other=float("-inf"))
    lo = tl.load(PartLse + part * 2 + 1, mask=offs_s < SPLITS, other=0.0)
    top = tl.max(hi, 0)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    weights = tl.where(hi == float("-inf"), 0.0, tl.exp((hi - top_safe) + lo))
    outs = tl.load(PartOut + part[:, None] * BLOCK_DV + offs_dv[None, :], mask=(offs_s < SPLITS)[:, None], other=0.0)
    total = tl.sum(weights, 0)
    out = tl.sum(weights[:, None] * outs, 0) / total  # total 0 (no key): 0 / 0 = NaN
    tl.store(Out + b * stride_ob + h * stride_oh + i * stride_om + offs_dv * stride_od,
             out.to(Out.dtype.element_ty), mask=offs_dv < HEAD_DIM_V)
    lse_hi, lse_lo = split_lse(top, total, True)  # natural units
    lse_rows = Lse + ((b * num_heads + h) * n_q + i) * 2
    tl.store(lse_rows, lse_hi)
    tl.store(lse_rows + 1, lse_lo)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, launch: DecodePlan,
                      schedule: TileSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the decode kernels on non-empty inputs for a validated ``spec`` without dropout, over ``schedule``'s
    lists per KV head (:meth:`schedule.TileSchedule.by_kv_head`: one query tile holding every query row, key tiles
    of ``launch.block_n``)."""
    batch, num_heads, n_q = q.shape[:3]
    num_kv_heads, value_dim = k.shape[1], v.shape[-1]
    rows = packed_rows(n_q, num_heads, num_kv_heads)
    out = torch.empty((batch, num_heads, n_q, value_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, num_heads, n_q, 2), dtype=torch.float32, device=q.device)
    shapes = args.shapes(q, k, v, spec)
    splits = launch.splits
    parts = (batch * num_kv_heads, splits, rows) if splits > 1 else (0, 0, 0)
    part_out = torch.empty((*parts, shapes["BLOCK_DV"]), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((*parts, 2), dtype=torch.float32, device=q.device)
    out_strides = args.tensor("Out", "stride_ob,stride_oh,stride_om,stride_od", out, q)
    _decode_kernel[(splits, batch * num_kv_heads)](
        **args.inputs(q, k, v), **shapes, **args.terms(spec, q), **args.masks(spec, q),
        **args.schedule(schedule, q, by_keys=False), **args.mod(spec, q), **out_strides,
        Lse=lse, PartOut=part_out, PartLse=part_lse, rows=rows, SPLITS=splits, BLOCK_M=launch.block_m,
        BLOCK_N=launch.block_n, num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    if splits > 1:
        _merge_kernel[(batch * num_kv_heads * rows,)](
            part_out, part_lse, **out_strides, Lse=lse, num_heads=num_heads, num_kv_heads=num_kv_heads,
            group_size=num_heads // num_kv_heads, n_q=n_q, rows=rows, HEAD_DIM_V=value_dim,
            BLOCK_DV=shapes["BLOCK_DV"], SPLITS=splits, BLOCK_S=max(2, triton.next_power_of_2(splits)),
            KV_TILED=spec.kv_heads_tiled, num_warps=launch.num_warps,
        )
    return out, lse
