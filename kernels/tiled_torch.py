"""The FlashAttention algorithm in plain PyTorch ops, for CPU tensors without Triton's interpreter.

Both passes walk the key axis in tiles of ``block_n`` keys, so at most one [Nq, block_n] score tile per
(batch, head) is alive at a time and memory stays linear in the sequence length. The forward keeps an
online softmax (running row max and row sum) and returns the natural-log LSE; the backward recomputes
the probabilities of each tile from Q, K and the LSE. fp16/bf16 inputs are computed in float32,
float32 in float32 and float64 in float64.

GQA is handled by viewing the query heads as [B, Hkv, group, Nq, D] (a view for both the grouped and
the tiled head mapping), so each KV head is read once and dK, dV come out summed over the group. On
request the backward also writes each tile's dS into the bias gradient (the one [Nq, Nk]-sized output,
and only when asked for). Semantics match the Triton kernels, including fully masked rows (NaN output,
LSE = -inf, no gradient contribution) and the structural masks of :mod:`masks`, which are materialized
one [B, Nq, block_n] tile at a time. Dropout regenerates the keep mask of each tile from its counters
with :func:`dropout.keep_tile`, the generator the Triton kernels implement bit for bit.
"""

from __future__ import annotations

import torch
from flash_fx.kernels.dropout import Dropout, keep_tile
from flash_fx.kernels.masks import Masks

NO_MASKS = Masks()
NO_DROPOUT = Dropout()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(x: torch.Tensor, num_kv_heads: int, tiled: bool) -> torch.Tensor:
    """View [B, Hq, Nq, ...] as [B, Hkv, group, Nq, ...].

    Query head h belongs to KV head ``h // group`` (grouped) or ``h % Hkv`` (``tiled``).
    """
    group = x.shape[1] // num_kv_heads
    if tiled:
        return x.unflatten(1, (group, num_kv_heads)).transpose(1, 2)
    return x.unflatten(1, (num_kv_heads, group))


def _ungrouped(x: torch.Tensor, tiled: bool) -> torch.Tensor:
    """Inverse of :func:`_grouped`: [B, Hkv, group, Nq, ...] back to [B, Hq, Nq, ...]."""
    return x.transpose(1, 2).flatten(1, 2) if tiled else x.flatten(1, 2)


def _key_tiles(n_q: int, n_k: int, block_n: int, masks: Masks) -> list[int]:
    """Start of every key tile that at least one query may see: tiles outside the band of all queries,
    and tiles without a valid key in any batch row, are skipped."""
    lo = 0 if masks.lower is None else max(-masks.lower, 0)
    hi = n_k if masks.upper is None else min(n_k, max(n_q + masks.upper, 0))
    if lo >= hi:
        return []
    starts = range(lo // block_n * block_n, hi, block_n)
    if masks.key_valid is None:
        return list(starts)
    return [start for start in starts if masks.key_valid[:, start : start + block_n].any()]


def _tile_keep(q: torch.Tensor, num_kv_heads: int, n_k: int, start: int, stop: int, dropout: Dropout,
               kv_heads_tiled: bool) -> torch.Tensor:
    """Bool keep mask [B, Hkv, group, Nq, stop - start] of key tile ``[start, stop)``; ``q`` is [B, Hq, Nq, D]."""
    batch, num_heads, n_q = q.shape[:3]
    bh = _grouped(torch.arange(batch * num_heads, device=q.device).view(batch, num_heads, 1, 1), num_kv_heads,
                  kv_heads_tiled)
    rows = torch.arange(n_q, device=q.device)[:, None]
    cols = torch.arange(start, stop, device=q.device)[None, :]
    return keep_tile(dropout.seed, dropout.offset, bh, rows, cols, n_q, n_k, dropout.p)


def _tile_scores(
    q: torch.Tensor,
    k_tile: torch.Tensor,
    start: int,
    *,
    scale: float,
    masks: Masks,
    bias: torch.Tensor | None,
    kv_heads_tiled: bool,
) -> torch.Tensor:
    """Scaled, biased and masked scores [B, Hkv, group, Nq, n] of one key tile."""
    stop = start + k_tile.shape[-2]
    s = torch.matmul(q, k_tile.unsqueeze(2).transpose(-1, -2)) * scale
    if bias is not None:
        s = s + _grouped(bias[..., start:stop], k_tile.shape[1], kv_heads_tiled).to(s.dtype)
    visible = masks.visible(torch.arange(q.shape[-2], device=q.device), torch.arange(start, stop, device=q.device))
    if visible is not None:
        s = s.masked_fill(~visible[:, None, None], float("-inf"))
    return s


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    masks: Masks = NO_MASKS,
    bias: torch.Tensor | None = None,
    kv_heads_tiled: bool = False,
    block_n: int = 256,
    dropout: Dropout = NO_DROPOUT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiled forward: ``(out [B, Hq, Nq, D] in q.dtype, lse [B, Hq, Nq] float32)``.

    ``bias``, if given, is broadcastable to [B, Hq, Nq, Nk] and already expanded to that shape.
    ``masks`` are the structural masks (:meth:`Masks.build`); ``kv_heads_tiled`` selects the GQA head
    mapping (see :func:`_grouped`). With ``dropout`` the output uses the dropped, rescaled
    probabilities; the LSE is that of the undropped softmax.
    """
    dtype = _compute_dtype(q.dtype)
    num_kv_heads, n_k = k.shape[1], k.shape[2]
    qg = _grouped(q.to(dtype), num_kv_heads, kv_heads_tiled)
    row_max = qg.new_full(qg.shape[:-1], float("-inf"))
    row_sum = qg.new_zeros(qg.shape[:-1])
    acc = qg.new_zeros(qg.shape[:-1] + v.shape[-1:])
    for start in _key_tiles(q.shape[2], n_k, block_n, masks):
        k_tile = k[:, :, start : start + block_n].to(dtype)
        v_tile = v[:, :, start : start + block_n].to(dtype).unsqueeze(2)
        s = _tile_scores(qg, k_tile, start, scale=scale, masks=masks, bias=bias,
                         kv_heads_tiled=kv_heads_tiled)
        new_max = torch.maximum(row_max, s.amax(-1))
        # Rows with no visible key so far keep max = -inf; subtract 0 there instead of -inf - -inf = NaN.
        safe_max = new_max.masked_fill(new_max == float("-inf"), 0.0)
        p = torch.exp(s - safe_max[..., None])
        alpha = torch.exp(row_max - safe_max)
        row_sum = row_sum * alpha + p.sum(-1)
        if dropout.enabled:
            p = p * _tile_keep(q, num_kv_heads, n_k, start, start + k_tile.shape[2], dropout, kv_heads_tiled)
        acc = acc * alpha[..., None] + torch.matmul(p, v_tile)
        row_max = new_max
    out = acc / row_sum[..., None]
    if dropout.enabled:
        out = out * dropout.scale
    lse = row_max + torch.log(row_sum)
    return _ungrouped(out, kv_heads_tiled).to(q.dtype), _ungrouped(lse, kv_heads_tiled).to(torch.float32)


def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    masks: Masks = NO_MASKS,
    bias: torch.Tensor | None = None,
    bias_requires_grad: bool = False,
    kv_heads_tiled: bool = False,
    block_n: int = 256,
    dropout: Dropout = NO_DROPOUT,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Tiled backward from the saved ``out`` and ``lse``: ``(dq, dk, dv, dbias)``.

    ``dropout`` must be the forward's: its keep mask is regenerated per tile.

    dq, dk, dv have the dtypes of q, k, v. dbias is None unless ``bias_requires_grad``; then it is the
    float32 [B, Hq, Nq, Nk] gradient of the expanded bias, ``dS = P * (dP - delta)``.
    """
    dtype = _compute_dtype(q.dtype)
    num_kv_heads, n_k = k.shape[1], k.shape[2]

    def grouped(x: torch.Tensor) -> torch.Tensor:
        return _grouped(x, num_kv_heads, kv_heads_tiled)

    qg = grouped(q.to(dtype))
    dog = grouped(grad_out.to(dtype))
    lse_g = grouped(lse.to(dtype))
    fully_masked = lse_g == float("-inf")
    # Fully masked rows get probability 0 everywhere (LSE -> +inf) and delta 0: no gradient flows from them.
    lse_g = lse_g.masked_fill(fully_masked, float("inf"))
    delta = (dog * grouped(out.to(dtype))).sum(-1).masked_fill(fully_masked, 0.0)
    dq = torch.zeros_like(qg)
    dk = k.new_zeros(k.shape, dtype=dtype)
    dv = v.new_zeros(v.shape, dtype=dtype)
    dbias = None
    if bias_requires_grad:
        # Zeros stay in the skipped key tiles.
        dbias = q.new_zeros((*q.shape[:3], n_k), dtype=torch.float32)
    for start in _key_tiles(q.shape[2], n_k, block_n, masks):
        stop = min(start + block_n, n_k)
        k_tile = k[:, :, start:stop].to(dtype)
        v_tile = v[:, :, start:stop].to(dtype)
        s = _tile_scores(qg, k_tile, start, scale=scale, masks=masks, bias=bias,
                         kv_heads_tiled=kv_heads_tiled)
        p = torch.exp(s - lse_g[..., None])
        dp = torch.matmul(dog, v_tile.unsqueeze(2).transpose(-1, -2))
        p_kept = p
        if dropout.enabled:
            drop = _tile_keep(q, num_kv_heads, n_k, start, stop, dropout, kv_heads_tiled) * dropout.scale
            p_kept, dp = p * drop, dp * drop
        dv[:, :, start:stop] = torch.matmul(p_kept.transpose(-1, -2), dog).sum(2)
        ds = p * (dp - delta[..., None])
        if dbias is not None:
            grouped(dbias)[..., start:stop] = ds
        dq += torch.matmul(ds, k_tile.unsqueeze(2)) * scale
        dk[:, :, start:stop] = torch.matmul(ds.transpose(-1, -2), qg).sum(2) * scale
    return _ungrouped(dq, kv_heads_tiled).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias
