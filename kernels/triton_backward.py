"""FlashAttention-2 backward kernels in Triton.

Three launches, none of which materializes an N x N tensor (other than the bias gradient, an output, when
it is requested) or needs atomics (other than for the relative-position bias gradient, when requested):

1. ``_delta_kernel``: ``delta = rowsum(dO * O)`` in float32 (the softmax-backward correction).
2. ``_dkdv_kernel``: each program owns a key tile of one (batch, KV head), loops over the query heads
   of its GQA group (grouped or tiled mapping, see :func:`triton_common.query_head`) and their query
   tiles, recomputes ``P = exp(S - LSE)`` and accumulates dK, dV.
3. ``_dq_kernel``: each program owns a query tile and loops over key tiles, accumulating dQ. When the
   bias gradient is requested it also stores every tile of ``dS = P * (dP - delta)``, which is the
   gradient of the (expanded) bias, since the bias enters the scores unscaled.

Rows that were fully masked in the forward (LSE = -inf) contribute no gradient: their dQ and dbias
rows are 0. Both loops visit the tile pairs of the tile schedule (:mod:`schedule`, built for the backward's own
tile sizes), partial ones with every mask and full ones with none: the dK/dV kernel its per-key-tile lists, the
dQ kernel its per-query-tile lists.
With ALiBi (``HAS_ALIBI``) both recompute the forward's scores with the ALiBi term (the dK/dV kernel with the
slope of each query head of its group); dS, hence dbias, is unchanged in form. The same holds for a
relative-position bias (``HAS_REL``, a vector per (batch, query head) read at ``j - i + Nq - 1``). Its gradient
(``WRITE_DREL``) sums dS along diagonals: the dQ kernel adds each visited tile's dS to the zeroed float32
[B, Hq, Nq + Nk - 1] output with ``tl.atomic_add`` at ``j - i + Nq - 1``. Programs of different query tiles
add to the same entries, so the order of those float32 sums, hence the last bits of drel, varies from run to
run; skipped tiles add nothing, which is right since dS is 0 there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from flash_fx.kernels import triton_launch as args
from flash_fx.kernels.config import Tiles
from flash_fx.kernels.schedule import TileSchedule
from flash_fx.kernels.spec import AttentionSpec, Saved
from flash_fx.kernels.triton_common import (
    add_relative_grad,
    alibi_slope,
    apply_dropout,
    band_visible,
    dot,
    dropout_keep,
    head_factor,
    kv_head,
    load_ids,
    load_lse,
    load_rows,
    load_seed,
    probabilities,
    query_head,
    scores,
    store_rows,
    structural_mask,
    tile_list,
)


@triton.jit
def _delta_kernel(
    Out, DOut, Lse, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    num_heads, n_q,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid: (query tiles, batch * heads). Fully masked rows (LSE = -inf, O = NaN) get delta = 0."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // num_heads
    h = bh % num_heads
    offs_d = tl.arange(0, BLOCK_D)
    o = load_rows(Out + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_om, stride_od, n_q, HEAD_DIM, True)
    do = load_rows(DOut + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dom, stride_dod, n_q, HEAD_DIM,
                   True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse = tl.load(Lse + (bh * n_q + offs_m) * 2, mask=offs_m < n_q, other=0.0)
    delta = tl.where(lse == float("-inf"), 0.0, delta)
    tl.store(Delta + bh * n_q + offs_m, delta, mask=offs_m < n_q)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, k_ids, key_ok, q_base, do_base, bias_base, lse_base, delta_base, q_doc_base, tiles,
                first, last, offs_m, offs_n, offs_d, stride_qm, stride_qd, stride_dom, stride_dod, stride_bm, stride_bn,
                stride_qdm, n_q, n_k, sm_scale, slope, rel_base, stride_rel, upper, lower, bh, seed, offset, threshold,
                drop_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, PARTIAL: tl.constexpr,
                LOAD_BIAS: tl.constexpr, HAS_UPPER: tl.constexpr, HAS_LOWER: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_KEY_VALID: tl.constexpr, HAS_DOCS: tl.constexpr, DROPOUT: tl.constexpr,
                UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, HAS_ALIBI: tl.constexpr,
                ALIBI_SYMMETRIC: tl.constexpr, HAS_REL: tl.constexpr, mod_params, factor, MOD: tl.constexpr,
                offs_dv, HEAD_DIM_V: tl.constexpr):
    """Accumulate the query tiles numbered ``tiles[first:last]`` into dK, dV (transposed [keys, queries]).

    ``PARTIAL`` tiles get the band, key-validity and document masks; full ones none. ``LOAD_BIAS`` false skips
    reading a bias known to be 0 there (see :func:`triton_common.scores`). With ``DROPOUT`` the forward's keep mask
    of query head ``bh`` is regenerated: dV takes the dropped, scaled probabilities and dS = P * (dropped, scaled
    dP - delta). ``slope`` and ``rel_base`` are query head ``bh``'s ALiBi slope and relative vector.
    """
    for pos in range(first, last):
        rows = tl.load(tiles + pos) * BLOCK_M + offs_m
        q = load_rows(q_base, rows, offs_d, stride_qm, stride_qd, n_q, HEAD_DIM, True)
        do = load_rows(do_base, rows, offs_dv, stride_dom, stride_dod, n_q, HEAD_DIM_V, True)
        lse_hi, lse_lo = load_lse(lse_base, rows, n_q, HAS_BIAS)
        delta = tl.load(delta_base + rows, mask=rows < n_q, other=0.0)
        s_t, mod_t = scores(dot(k, tl.trans(q), UPCAST_DOT, INPUT_PRECISION), bias_base, rows[None, :],
                            offs_n[:, None], stride_bm, stride_bn, n_q, n_k, sm_scale, slope, rel_base, stride_rel,
                            mod_params, factor, HAS_BIAS, LOAD_BIAS, HAS_ALIBI, ALIBI_SYMMETRIC, HAS_REL, MOD)
        if PARTIAL:
            s_t = tl.where(band_visible(rows[None, :], offs_n[:, None], n_k, upper, lower, HAS_UPPER, HAS_LOWER),
                           s_t, float("-inf"))
            q_ids = load_ids(q_doc_base, rows, stride_qdm, n_q, HAS_DOCS)
            s_t = structural_mask(s_t, q_ids[None, :], k_ids[:, None], key_ok[:, None], HAS_DOCS, HAS_KEY_VALID)
        p_t = probabilities(s_t, lse_hi[None, :], lse_lo[None, :], HAS_BIAS)
        dp_t = dot(v, tl.trans(do), UPCAST_DOT, INPUT_PRECISION)
        p_kept = p_t
        if DROPOUT:
            keep = dropout_keep(seed, offset, bh, rows[None, :], offs_n[:, None], n_q, n_k, threshold)
            p_kept = apply_dropout(p_t, keep, drop_scale)
            dp_t = apply_dropout(dp_t, keep, drop_scale)
        dv += dot(p_kept.to(do.dtype), do, UPCAST_DOT, INPUT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if MOD != 0:  # dS reaches the scaled score through the modification's derivative
            ds_t = ds_t * mod_t
        dk += dot(ds_t.to(q.dtype), q, UPCAST_DOT, INPUT_PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Q, K, V, Bias, Slopes, Rel, KeyValid, QDoc, KDoc, Counts, Indices, DOut, Lse, Delta, DK, DV, ModParams,
    ModFactor,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_sb, stride_sh, stride_rb, stride_rh, stride_rr,
    stride_kvb, stride_kvn, stride_qdb, stride_qdm, stride_kdb, stride_kdn,
    stride_cb, stride_ch, stride_ib, stride_ih,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd, stride_mfb, stride_mfh,
    num_heads, num_kv_heads, group_size, n_q, n_k, sm_scale, upper, lower, SeedPtr, offset, threshold, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_UPPER: tl.constexpr, HAS_LOWER: tl.constexpr, HAS_BIAS: tl.constexpr, FULL_READS_BIAS: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr, HAS_DOCS: tl.constexpr, KV_TILED: tl.constexpr, DROPOUT: tl.constexpr,
    UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, HAS_ALIBI: tl.constexpr, ALIBI_SYMMETRIC: tl.constexpr,
    HAS_REL: tl.constexpr, MOD: tl.constexpr,
):
    """Grid: (key tiles, batch * KV heads). dK, dV sum over the ``group_size`` query heads of the KV head, each
    over the query tiles of the schedule's per-key-tile lists (Counts int32 [SB, SH, key tiles, 2], Indices int32
    [SB, SH, key tiles, query tiles]; :meth:`schedule.TileSchedule.by_key_tile`), with its own ALiBi slope and
    relative vector. A key tile that no query sees writes zeros.
    """
    tile = tl.program_id(0)
    bh_kv = tl.program_id(1).to(tl.int64)
    b = bh_kv // num_kv_heads
    h_kv = bh_kv % num_kv_heads
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    key_ok = load_ids(KeyValid + b * stride_kvb, offs_n, stride_kvn, n_k, HAS_KEY_VALID)
    k = load_rows(K + b * stride_kb + h_kv * stride_kh, offs_n, offs_d, stride_kn, stride_kd, n_k, HEAD_DIM, True)
    v = load_rows(V + b * stride_vb + h_kv * stride_vh, offs_n, offs_dv, stride_vn, stride_vd, n_k, HEAD_DIM_V,
                  True)
    k_ids = load_ids(KDoc + b * stride_kdb, offs_n, stride_kdn, n_k, HAS_DOCS)
    q_doc_base = QDoc + b * stride_qdb
    n_query_tiles = tl.cdiv(n_q, BLOCK_M)
    seed = load_seed(SeedPtr, DROPOUT)
    for r in range(group_size):
        h = query_head(h_kv, r, num_kv_heads, group_size, KV_TILED)
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DOut + b * stride_dob + h * stride_doh
        bias_base = Bias + b * stride_bb + h * stride_bh
        slope = alibi_slope(Slopes, b, h, stride_sb, stride_sh, HAS_ALIBI)
        rel_base = Rel + b * stride_rb + h * stride_rh
        factor = head_factor(ModFactor, b, h, stride_mfb, stride_mfh, MOD)
        bh = b * num_heads + h
        lse_base = Lse + bh * n_q * 2
        delta_base = Delta + bh * n_q
        tiles, n_partial, n_full = tile_list(Counts, Indices, stride_cb, stride_ch, stride_ib, stride_ih, b, h, tile,
                                             n_query_tiles)
        dk, dv = _dkdv_tiles(dk, dv, k, v, k_ids, key_ok, q_base, do_base, bias_base, lse_base, delta_base,
                             q_doc_base, tiles, 0, n_partial, offs_m, offs_n, offs_d, stride_qm, stride_qd, stride_dom,
                             stride_dod, stride_bm, stride_bn, stride_qdm, n_q, n_k, sm_scale, slope, rel_base,
                             stride_rr, upper, lower, bh, seed, offset, threshold, drop_scale, HEAD_DIM, BLOCK_M, True,
                             True, HAS_UPPER, HAS_LOWER, HAS_BIAS, HAS_KEY_VALID, HAS_DOCS, DROPOUT, UPCAST_DOT,
                             INPUT_PRECISION, HAS_ALIBI, ALIBI_SYMMETRIC, HAS_REL, ModParams, factor, MOD, offs_dv,
                             HEAD_DIM_V)
        dk, dv = _dkdv_tiles(dk, dv, k, v, k_ids, key_ok, q_base, do_base, bias_base, lse_base, delta_base,
                             q_doc_base, tiles, n_partial, n_partial + n_full, offs_m, offs_n, offs_d, stride_qm,
                             stride_qd, stride_dom, stride_dod, stride_bm, stride_bn, stride_qdm, n_q, n_k, sm_scale,
                             slope, rel_base, stride_rr, upper, lower, bh, seed, offset, threshold, drop_scale,
                             HEAD_DIM, BLOCK_M, False, FULL_READS_BIAS, HAS_UPPER, HAS_LOWER, HAS_BIAS, HAS_KEY_VALID,
                             HAS_DOCS, DROPOUT, UPCAST_DOT, INPUT_PRECISION, HAS_ALIBI, ALIBI_SYMMETRIC, HAS_REL,
                             ModParams, factor, MOD, offs_dv, HEAD_DIM_V)
    store_rows(DK + b * stride_dkb + h_kv * stride_dkh, dk * sm_scale, offs_n, offs_d, stride_dkn, stride_dkd, n_k,
               HEAD_DIM)
    store_rows(DV + b * stride_dvb + h_kv * stride_dvh, dv, offs_n, offs_dv, stride_dvn, stride_dvd, n_k,
               HEAD_DIM_V)


@triton.jit
def _dq_tiles(dq, q, q_ids, do, lse_hi, lse_lo, delta, k_base, v_base, bias_base, dbias_base, key_valid_base,
              k_doc_base, tiles, first, last, offs_m, offs_n, offs_d, stride_kn, stride_kd, stride_vn, stride_vd,
              stride_bm, stride_bn, stride_dbm, stride_dbn, stride_kvn, stride_kdn, n_q, n_k, sm_scale, slope, rel_base,
              stride_rel, drel_base, stride_drel, upper, lower, bh, seed, offset, threshold, drop_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PARTIAL: tl.constexpr, LOAD_BIAS: tl.constexpr,
              HAS_UPPER: tl.constexpr, HAS_LOWER: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KEY_VALID: tl.constexpr,
              HAS_DOCS: tl.constexpr, WRITE_DBIAS: tl.constexpr, DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr,
              INPUT_PRECISION: tl.constexpr, HAS_ALIBI: tl.constexpr, ALIBI_SYMMETRIC: tl.constexpr,
              HAS_REL: tl.constexpr, WRITE_DREL: tl.constexpr, mod_params, factor, MOD: tl.constexpr, offs_dv,
              HEAD_DIM_V: tl.constexpr):
    """Accumulate the key tiles numbered ``tiles[first:last]`` into dQ (unscaled); store their dS if asked.

    ``PARTIAL`` tiles get every mask and range-checked loads, full ones neither. ``LOAD_BIAS`` false skips reading
    a bias known to be 0 there (see :func:`triton_common.scores`). With ``DROPOUT`` dP is dropped and scaled with
    the forward's regenerated keep mask before ``dS = P * (dP - delta)``. dS is the bias gradient (the ALiBi term
    is no input); with ``WRITE_DREL`` it is added to the relative table's gradient at ``drel_base`` along the
    tile's diagonals (float32 atomics).
    """
    for pos in range(first, last):
        cols = tl.load(tiles + pos) * BLOCK_N + offs_n
        k = load_rows(k_base, cols, offs_d, stride_kn, stride_kd, n_k, HEAD_DIM, PARTIAL)
        v = load_rows(v_base, cols, offs_dv, stride_vn, stride_vd, n_k, HEAD_DIM_V, PARTIAL)
        s, mod_s = scores(dot(q, tl.trans(k), UPCAST_DOT, INPUT_PRECISION), bias_base, offs_m[:, None],
                          cols[None, :], stride_bm, stride_bn, n_q, n_k, sm_scale, slope, rel_base, stride_rel,
                          mod_params, factor, HAS_BIAS, LOAD_BIAS, HAS_ALIBI, ALIBI_SYMMETRIC, HAS_REL, MOD)
        if PARTIAL:
            s = tl.where(band_visible(offs_m[:, None], cols[None, :], n_k, upper, lower, HAS_UPPER, HAS_LOWER),
                         s, float("-inf"))
            key_ok = load_ids(key_valid_base, cols, stride_kvn, n_k, HAS_KEY_VALID)
            k_ids = load_ids(k_doc_base, cols, stride_kdn, n_k, HAS_DOCS)
            s = structural_mask(s, q_ids[:, None], k_ids[None, :], key_ok[None, :], HAS_DOCS, HAS_KEY_VALID)
        p = probabilities(s, lse_hi[:, None], lse_lo[:, None], HAS_BIAS)
        dp = dot(do, tl.trans(v), UPCAST_DOT, INPUT_PRECISION)
        if DROPOUT:
            keep = dropout_keep(seed, offset, bh, offs_m[:, None], cols[None, :], n_q, n_k, threshold)
            dp = apply_dropout(dp, keep, drop_scale)
        ds = p * (dp - delta[:, None])
        if WRITE_DBIAS:
            tl.store(dbias_base + offs_m[:, None] * stride_dbm + cols[None, :] * stride_dbn, ds,
                     mask=(offs_m[:, None] < n_q) & (cols[None, :] < n_k))
        if WRITE_DREL:
            add_relative_grad(drel_base, ds, offs_m[:, None], cols[None, :], stride_drel, n_q, n_k)
        if MOD != 0:  # dS reaches the scaled score through the modification's derivative
            ds = ds * mod_s
        dq += dot(ds.to(k.dtype), k, UPCAST_DOT, INPUT_PRECISION)
    return dq


@triton.jit
def _dq_kernel(
    Q, K, V, Bias, Slopes, Rel, KeyValid, QDoc, KDoc, Counts, Indices, DOut, Lse, Delta, DQ, DBias, DRel,
    ModParams, ModFactor,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_sb, stride_sh, stride_rb, stride_rh, stride_rr,
    stride_kvb, stride_kvn, stride_qdb, stride_qdm, stride_kdb, stride_kdn,
    stride_cb, stride_ch, stride_ib, stride_ih,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dbb, stride_dbh, stride_dbm, stride_dbn, stride_drb, stride_drh, stride_drr, stride_mfb, stride_mfh,
    num_heads, num_kv_heads, group_size, n_q, n_k, sm_scale, upper, lower, SeedPtr, offset, threshold, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_UPPER: tl.constexpr, HAS_LOWER: tl.constexpr, HAS_BIAS: tl.constexpr, FULL_READS_BIAS: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr, HAS_DOCS: tl.constexpr, KV_TILED: tl.constexpr, WRITE_DBIAS: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, HAS_ALIBI: tl.constexpr,
    ALIBI_SYMMETRIC: tl.constexpr, HAS_REL: tl.constexpr, WRITE_DREL: tl.constexpr, MOD: tl.constexpr,
):
    """Grid: (query tiles, batch * query heads); visits the key tiles of the schedule's per-query-tile lists, as
    the forward does. With WRITE_DBIAS, DBias is a float32 [B, Hq, Nq, Nk] tensor that is zero wherever no key tile
    is stored (skipped tiles). With WRITE_DREL, DRel is a zeroed float32 [B, Hq, Nq + Nk - 1] tensor to which every
    visited tile adds its dS along its diagonals (atomically: programs of different query tiles share entries, so
    the order of the float32 sums is not deterministic)."""
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
    do = load_rows(DOut + b * stride_dob + h * stride_doh, offs_m, offs_dv, stride_dom, stride_dod, n_q, HEAD_DIM_V,
                   True)
    lse_hi, lse_lo = load_lse(Lse + bh * n_q * 2, offs_m, n_q, HAS_BIAS)
    delta = tl.load(Delta + bh * n_q + offs_m, mask=offs_m < n_q, other=0.0)
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    bias_base = Bias + b * stride_bb + h * stride_bh
    dbias_base = DBias + b * stride_dbb + h * stride_dbh
    key_valid_base = KeyValid + b * stride_kvb
    k_doc_base = KDoc + b * stride_kdb
    slope = alibi_slope(Slopes, b, h, stride_sb, stride_sh, HAS_ALIBI)
    rel_base = Rel + b * stride_rb + h * stride_rh
    drel_base = DRel + b * stride_drb + h * stride_drh
    factor = head_factor(ModFactor, b, h, stride_mfb, stride_mfh, MOD)
    seed = load_seed(SeedPtr, DROPOUT)
    tiles, n_partial, n_full = tile_list(Counts, Indices, stride_cb, stride_ch, stride_ib, stride_ih, b, h, tile,
                                         tl.cdiv(n_k, BLOCK_N))

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_tiles(dq, q, q_ids, do, lse_hi, lse_lo, delta, k_base, v_base, bias_base, dbias_base, key_valid_base,
                   k_doc_base, tiles, 0, n_partial, offs_m, offs_n, offs_d, stride_kn, stride_kd, stride_vn, stride_vd,
                   stride_bm, stride_bn, stride_dbm, stride_dbn, stride_kvn, stride_kdn, n_q, n_k, sm_scale, slope,
                   rel_base, stride_rr, drel_base, stride_drr, upper, lower, bh, seed, offset, threshold, drop_scale,
                   HEAD_DIM, BLOCK_N, True, True, HAS_UPPER, HAS_LOWER, HAS_BIAS, HAS_KEY_VALID, HAS_DOCS,
                   WRITE_DBIAS, DROPOUT, UPCAST_DOT, INPUT_PRECISION, HAS_ALIBI, ALIBI_SYMMETRIC, HAS_REL, WRITE_DREL,
                   ModParams, factor, MOD, offs_dv, HEAD_DIM_V)
    dq = _dq_tiles(dq, q, q_ids, do, lse_hi, lse_lo, delta, k_base, v_base, bias_base, dbias_base, key_valid_base,
                   k_doc_base, tiles, n_partial, n_partial + n_full, offs_m, offs_n, offs_d, stride_kn, stride_kd,
                   stride_vn, stride_vd, stride_bm, stride_bn, stride_dbm, stride_dbn, stride_kvn, stride_kdn, n_q,
                   n_k, sm_scale, slope, rel_base, stride_rr, drel_base, stride_drr, upper, lower, bh, seed, offset,
                   threshold, drop_scale, HEAD_DIM, BLOCK_N, False, FULL_READS_BIAS, HAS_UPPER, HAS_LOWER, HAS_BIAS,
                   HAS_KEY_VALID, HAS_DOCS, WRITE_DBIAS, DROPOUT, UPCAST_DOT, INPUT_PRECISION, HAS_ALIBI,
                   ALIBI_SYMMETRIC, HAS_REL, WRITE_DREL, ModParams, factor, MOD, offs_dv, HEAD_DIM_V)
    store_rows(DQ + b * stride_dqb + h * stride_dqh, dq * sm_scale, offs_m, offs_d, stride_dqm, stride_dqd, n_q,
               HEAD_DIM)


def attention_backward(grad_out: torch.Tensor, saved: Saved, spec: AttentionSpec, tiles: Tiles,
                       schedule: TileSchedule) -> tuple[torch.Tensor, ...]:
    """Launch the three backward kernels on non-empty inputs for a validated ``spec``; ``saved.lse`` is contiguous.

    The dK/dV kernel visits the query tiles of the ``schedule``'s per-key-tile lists and the dQ kernel the key tiles
    of its per-query-tile lists (built for these tiles). Returns ``(dq, dk, dv, dbias, drel)`` as
    :func:`flash_fx.kernels.attention_backward` describes (drel summed with atomics: not bitwise deterministic).
    """
    q, k, v, out, lse = saved
    batch, num_heads, n_q = q.shape[:3]
    num_kv_heads, n_k = k.shape[1], k.shape[2]
    features = spec.features()
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    dbias = None
    if features["bias_grad"]:
        # Skipped key tiles are never stored: start from zeros there.
        skips = spec.structural or spec.bias.holds_masks
        alloc = torch.zeros if skips else torch.empty
        dbias = alloc((batch, num_heads, n_q, n_k), dtype=torch.float32, device=q.device)
    drel = None
    if features["rel_grad"]:
        drel = torch.zeros((batch, num_heads, n_q + n_k - 1), dtype=torch.float32, device=q.device)
    delta = torch.empty_like(lse)
    common = {**args.inputs(q, k, v), **args.shapes(q, k, v, spec), **args.terms(spec, q),
              **args.dropout_group(spec, q), **args.mod(spec, q),
              **args.tensor("DOut", "stride_dob,stride_doh,stride_dom,stride_dod", grad_out, q), "Lse": lse,
              "Delta": delta, "BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n, "num_warps": tiles.num_warps,
              "num_stages": tiles.num_stages}

    _delta_kernel[(triton.cdiv(n_q, tiles.block_m), batch * num_heads)](
        out, grad_out, lse, delta, *out.stride(), *grad_out.stride(), num_heads, n_q,
        HEAD_DIM=common["HEAD_DIM_V"], BLOCK_M=tiles.block_m, BLOCK_D=common["BLOCK_DV"], num_warps=tiles.num_warps,
    )
    _dkdv_kernel[(triton.cdiv(n_k, tiles.block_n), batch * num_kv_heads)](
        **common, **args.masks(spec, q), **args.schedule(schedule, q, by_keys=True),
        **args.tensor("DK", "stride_dkb,stride_dkh,stride_dkn,stride_dkd", dk, q),
        **args.tensor("DV", "stride_dvb,stride_dvh,stride_dvn,stride_dvd", dv, q),
    )
    _dq_kernel[(triton.cdiv(n_q, tiles.block_m), batch * num_heads)](
        **common, **args.masks(spec, q), **args.schedule(schedule, q, by_keys=False),
        **args.tensor("DQ", "stride_dqb,stride_dqh,stride_dqm,stride_dqd", dq, q),
        **args.tensor("DBias", "stride_dbb,stride_dbh,stride_dbm,stride_dbn", dbias, q),
        **args.tensor("DRel", "stride_drb,stride_drh,stride_drr", drel, q),
        WRITE_DBIAS=dbias is not None, WRITE_DREL=drel is not None,
    )
    return dq, dk, dv, dbias, drel
