"""The FlashAttention algorithm in plain PyTorch ops, for CPU tensors without Triton's interpreter.

Both passes walk the (query tile, key tile) pairs of the call's tile schedule (:mod:`schedule`), one query tile
at a time, with key tiles gathered into chunks of up to 512 keys, so at most one [rows, chunk] score tile per
(batch, head) is alive at a time and memory stays linear in the sequence length. The forward keeps an online
softmax (running row max and row sum) and returns the natural-log LSE; the backward recomputes the probabilities
of each tile from Q, K and the LSE. fp16/bf16 inputs are computed in float32, float32 in float32 and float64 in
float64. A key tile is visited if some (batch row, head) visits it, with every mask if it is partial for any of
them, with none (and no read of a mask bias) if it is full for all.

GQA is handled by viewing the query heads as [B, Hkv, group, Nq, D] (a view for both the grouped and
the tiled head mapping), so each KV head is read once and dK, dV come out summed over the group. On
request the backward also writes each tile's dS into the bias gradient (the one [Nq, Nk]-sized output,
and only when asked for). Semantics match the Triton kernels, including fully masked rows (NaN output,
LSE = -inf, no gradient contribution) and the structural masks of the spec (:mod:`spec`), which are
materialized one tile at a time. Dropout regenerates the keep mask of each tile from its counters with
:func:`dropout.keep_tile`, the generator the Triton kernels implement bit for bit. The ALiBi term and the
relative table are added to every score tile from its row and column indices; on request the backward sums each
tile's dS along its diagonals into the relative table's gradient (``index_add_``).
"""

from __future__ import annotations

import torch
from flash_fx.kernels.dropout import keep_tile
from flash_fx.kernels.schedule import TileSchedule
from flash_fx.kernels.spec import AttentionSpec, Band, Saved, group_heads, ungroup_heads


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


Columns = slice | torch.Tensor  # key indices of a tile: a range, or gathered (an int64 index tensor)


def _positions(index: Columns, device: torch.device) -> torch.Tensor:
    """The positions ``index`` (a range with explicit bounds, or an index tensor) as an index tensor."""
    if isinstance(index, torch.Tensor):
        return index
    return torch.arange(index.start, index.stop, device=device)


def _take(x: torch.Tensor, dim: int, index: Columns) -> torch.Tensor:
    """``x`` restricted to ``index`` along ``dim``: a view for a range, a gathered copy for an index tensor."""
    if isinstance(index, torch.Tensor):
        return x.index_select(dim, index)
    return x[(slice(None),) * (dim % x.dim()) + (index,)]


def _tile_keep(q: torch.Tensor, num_kv_heads: int, n_k: int, cols: Columns, spec: AttentionSpec,
               rows: slice | None = None) -> torch.Tensor:
    """Bool keep mask [B, Hkv, group, rows, cols] of the key columns ``cols`` and query ``rows`` (all if
    None); ``q`` is [B, Hq, Nq, D]."""
    batch, num_heads, n_q = q.shape[:3]
    bh = group_heads(torch.arange(batch * num_heads, device=q.device).view(batch, num_heads, 1, 1), num_kv_heads,
                  spec.kv_heads_tiled)
    row_index = _positions(slice(0, n_q) if rows is None else rows, q.device)[:, None]
    col_index = _positions(cols, q.device)[None, :]
    dropout = spec.dropout
    return keep_tile(dropout.seed, dropout.offset, bh, row_index, col_index, n_q, n_k, dropout.p)


def _tile_scores(q: torch.Tensor, k_tile: torch.Tensor, cols: Columns, spec: AttentionSpec, n_q: int,
                 rows: slice | None = None, derivative: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled, modified, biased and masked scores [B, Hkv, group, rows, cols] of the key columns ``cols`` (a range
    with explicit bounds or an index tensor; ``k_tile`` holds their keys); ``q`` holds the query ``rows`` (a
    range with explicit bounds; all if None) of the Nq = ``n_q`` queries. Every term of ``spec`` applies. Second,
    if asked: the derivative of the score modification in the scaled score (else None)."""
    rows = slice(0, q.shape[-2]) if rows is None else rows
    num_kv_heads, tiled = k_tile.shape[1], spec.kv_heads_tiled
    s = torch.matmul(q, k_tile.unsqueeze(2).transpose(-1, -2)) * spec.scale
    mod_derivative = None
    if spec.score_mod is not None:
        factor = spec.score_mod.head_factor
        if factor is not None:
            factor = group_heads(factor[:, :, None, None], num_kv_heads, tiled).to(s.dtype)
        if derivative:
            s, mod_derivative = spec.score_mod.apply(s, factor, derivative=True)
        else:
            s = spec.score_mod.apply(s, factor)
    if spec.bias is not None:
        s = s + group_heads(_take(spec.bias.values[..., rows, :], -1, cols), num_kv_heads, tiled).to(s.dtype)
    row_index, col_index = _positions(rows, q.device), _positions(cols, q.device)
    if spec.alibi is not None:
        slopes = group_heads(spec.alibi.slopes[:, :, None, None], num_kv_heads, tiled).to(s.dtype)
        s = s + slopes * spec.alibi.positions(row_index, col_index).to(s.dtype)
    if spec.relative is not None:
        s = s + group_heads(spec.relative.gather(row_index, col_index, n_q), num_kv_heads, tiled).to(s.dtype)
    visible = spec.visible(row_index, col_index)
    if visible is not None:
        s = s.masked_fill(~visible[:, None, None], float("-inf"))
    return s, mod_derivative


def _full_tiles(spec: AttentionSpec) -> AttentionSpec:
    """``spec`` for the tiles its schedule proves full: no structural mask (none hides anything there), and no
    bias read for a mask bias (it is 0 there)."""
    bias = None if spec.bias is None or spec.bias.holds_masks else spec.bias
    return spec.replace(band=Band(), key_valid=None, documents=None, bias=bias)


#: At most this many keys (gathered from the visited key tiles) make one step of the passes.
_MAX_CHUNK = 512


def _chunks(plan: TileSchedule, n_q: int, n_k: int) -> list[tuple[slice, list[tuple[Columns, bool]]]]:
    """The steps of the tiled passes: per query tile (its rows), the key tiles its schedule visits for some
    (batch row, head), gathered into chunks of at most ``_MAX_CHUNK`` keys (a range where the tiles are adjacent,
    else an index tensor), each with whether it is partial (every mask) or full for all of them (none)."""
    block_m, block_n = plan.block_m, plan.block_n
    per_chunk = max(1, _MAX_CHUNK // block_n)
    steps = []
    for tile, partial, full in plan.plan():
        chunks: list[tuple[Columns, bool]] = []
        for is_partial, numbers in ((True, partial), (False, full)):
            for first in range(0, len(numbers), per_chunk):
                group = numbers[first : first + per_chunk]
                if group[-1] - group[0] == len(group) - 1:
                    cols: Columns = slice(group[0] * block_n, min((group[-1] + 1) * block_n, n_k))
                else:
                    cols = torch.cat([torch.arange(j * block_n, min((j + 1) * block_n, n_k)) for j in group])
                    cols = cols.to(plan.classes.device)
                chunks.append((cols, is_partial))
        steps.append((slice(tile * block_m, min((tile + 1) * block_m, n_q)), chunks))
    return steps


def _add_at(x: torch.Tensor, dim: int, index: Columns, values: torch.Tensor) -> None:
    """``x[index along dim] += values`` in place."""
    if isinstance(index, torch.Tensor):
        x.index_add_(dim, index, values)
    else:
        _take(x, dim, index).add_(values)


def _softmax_step(
    row_max: torch.Tensor, row_sum: torch.Tensor, acc: torch.Tensor, s: torch.Tensor, v_tile: torch.Tensor,
    keep: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold one score tile ``s`` (with its values [B, Hkv, 1, n, D] and dropout ``keep`` mask) into the
    running row max, row sum and accumulator; the row sum takes every probability, the accumulator the kept
    ones."""
    new_max = torch.maximum(row_max, s.amax(-1))
    # Rows with no visible key so far keep max = -inf; subtract 0 there instead of -inf - -inf = NaN.
    safe_max = new_max.masked_fill(new_max == float("-inf"), 0.0)
    p = torch.exp(s - safe_max[..., None])
    alpha = torch.exp(row_max - safe_max)
    row_sum = row_sum * alpha + p.sum(-1)
    if keep is not None:
        p = p * keep
    acc = acc * alpha[..., None] + torch.matmul(p, v_tile)
    return new_max, row_sum, acc


def _tile_grads(
    s: torch.Tensor, lse: torch.Tensor, do: torch.Tensor, delta: torch.Tensor, q: torch.Tensor,
    k_tile: torch.Tensor, v_tile: torch.Tensor, drop: torch.Tensor | None, scale: float,
    mod_derivative: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dS, dQ, dK, dV)`` of one score tile ``s`` [B, Hkv, group, rows, n] from the (grouped) rows' LSE pairs
    (see :func:`_lse_pair`; +inf for fully masked rows), dO, delta and Q and the tile's K, V [B, Hkv, n, D];
    ``drop`` is the dropout keep mask times 1 / (1 - p); ``mod_derivative`` that of the score modification (dS
    reaches q and k through it). dK, dV are summed over the group."""
    p = torch.exp((s - lse[..., 0, None]) - lse[..., 1, None])
    dp = torch.matmul(do, v_tile.unsqueeze(2).transpose(-1, -2))
    p_kept = p
    if drop is not None:
        p_kept, dp = p * drop, dp * drop
    dv = torch.matmul(p_kept.transpose(-1, -2), do).sum(2)
    ds = p * (dp - delta[..., None])
    ds_scaled = ds if mod_derivative is None else ds * mod_derivative
    dq = torch.matmul(ds_scaled, k_tile.unsqueeze(2)) * scale
    dk = torch.matmul(ds_scaled.transpose(-1, -2), q).sum(2) * scale
    return ds, dq, dk, dv


def _lse_pair(row_max: torch.Tensor, row_sum: torch.Tensor) -> torch.Tensor:
    """The rows' natural-log LSE as float32 ``[..., 2]`` pairs ``(hi, lo)``: ``hi`` the rounded LSE, ``lo`` what
    rounding lost. ``lo`` keeps ``log(row_sum)`` of a row hidden entirely by a finite fill, whose ``hi`` is its max:
    the backward computes ``exp((s - hi) - lo)``. Fully masked rows get ``(-inf, 0)``."""
    log_sum = torch.log(row_sum)
    hi = (row_max + log_sum).to(torch.float32)
    lo = (row_max - hi.to(row_max.dtype)) + log_sum
    lo = lo.masked_fill(hi == float("-inf"), 0.0).to(torch.float32)
    return torch.stack([hi, lo], -1)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
                      plan: TileSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiled forward of a validated ``spec`` over the tile pairs of ``plan``, one query tile at a time: ``(out
    [B, Hq, Nq, D] in q.dtype, lse [B, Hq, Nq, 2] float32 pairs)`` (see :func:`_lse_pair`)."""
    dtype = _compute_dtype(q.dtype)
    num_kv_heads, n_q, n_k = k.shape[1], q.shape[2], k.shape[2]
    qg = group_heads(q.to(dtype), num_kv_heads, spec.kv_heads_tiled)
    out = qg.new_empty(qg.shape[:-1] + v.shape[-1:])
    lse = qg.new_empty(qg.shape[:-1] + (2,), dtype=torch.float32)
    full_spec = _full_tiles(spec)
    for rows, chunks in _chunks(plan, n_q, n_k):
        q_tile = qg[..., rows, :]
        row_max = q_tile.new_full(q_tile.shape[:-1], float("-inf"))
        row_sum = q_tile.new_zeros(q_tile.shape[:-1])
        acc = q_tile.new_zeros(q_tile.shape[:-1] + v.shape[-1:])
        for cols, partial in chunks:
            k_tile = _take(k, 2, cols).to(dtype)
            v_tile = _take(v, 2, cols).to(dtype).unsqueeze(2)
            s, _ = _tile_scores(q_tile, k_tile, cols, spec if partial else full_spec, n_q, rows)
            keep = _tile_keep(q, num_kv_heads, n_k, cols, spec, rows) if spec.dropout.enabled else None
            row_max, row_sum, acc = _softmax_step(row_max, row_sum, acc, s, v_tile, keep)
        # No visited tile (or no visible key): 0 / 0 = NaN and LSE -inf, as eager softmax after -inf fills.
        out[..., rows, :] = acc / row_sum[..., None]
        lse[..., rows, :] = _lse_pair(row_max, row_sum)
    if spec.dropout.enabled:
        out = out * spec.dropout.scale
    return ungroup_heads(out, spec.kv_heads_tiled).to(q.dtype), ungroup_heads(lse, spec.kv_heads_tiled)


def attention_backward(grad_out: torch.Tensor, saved: Saved, spec: AttentionSpec,
                       plan: TileSchedule) -> tuple[torch.Tensor, ...]:
    """Tiled backward of a validated ``spec`` from the forward's ``saved`` tensors over the tile pairs of ``plan``,
    one query tile at a time: ``(dq, dk, dv, dbias, drel)``.

    The keep mask of dropout is regenerated per tile. dq, dk, dv have the dtypes of q, k, v.
    dbias is None unless the spec's bias requires grad; then it is the float32 [B, Hq, Nq, Nk] gradient of the
    expanded bias, ``dS = P * (dP - delta)``. drel likewise for the relative table: float32 [B, Hq, Nq + Nk - 1],
    entry ``j - i + Nq - 1`` the sum of dS over its diagonal (accumulated in the compute dtype).
    """
    q, k, v, out, lse = saved
    dtype = _compute_dtype(q.dtype)
    num_kv_heads, n_q, n_k = k.shape[1], q.shape[2], k.shape[2]
    tiled = spec.kv_heads_tiled

    def grouped(x: torch.Tensor) -> torch.Tensor:
        return group_heads(x, num_kv_heads, tiled)

    qg = grouped(q.to(dtype))
    dog = grouped(grad_out.to(dtype))
    lse_hi, lse_lo = grouped(lse.to(dtype)).unbind(-1)
    fully_masked = lse_hi == float("-inf")
    # Fully masked rows get probability 0 everywhere (LSE -> +inf) and delta 0: no gradient flows from them.
    lse_g = torch.stack([lse_hi.masked_fill(fully_masked, float("inf")), lse_lo], -1)
    delta = (dog * grouped(out.to(dtype))).sum(-1).masked_fill(fully_masked, 0.0)
    dq = torch.zeros_like(qg)
    dk = k.new_zeros(k.shape, dtype=dtype)
    dv = v.new_zeros(v.shape, dtype=dtype)
    # Zeros stay in the skipped key tiles.
    features = spec.features()
    dbias = q.new_zeros((*q.shape[:3], n_k), dtype=torch.float32) if features["bias_grad"] else None
    drel = q.new_zeros((*q.shape[:2], n_q + n_k - 1), dtype=dtype) if features["rel_grad"] else None

    def add_drel(ds: torch.Tensor, rows: slice, cols: Columns) -> None:
        if drel is not None:
            spec.relative.add_diagonal_sums(drel, ungroup_heads(ds, tiled), _positions(rows, q.device),
                                            _positions(cols, q.device), n_q)

    def keep(cols: Columns, rows: slice | None = None) -> torch.Tensor | None:
        if not spec.dropout.enabled:
            return None
        return _tile_keep(q, num_kv_heads, n_k, cols, spec, rows) * spec.dropout.scale

    full_spec = _full_tiles(spec)
    for rows, chunks in _chunks(plan, n_q, n_k):
        q_tile, do_tile = qg[..., rows, :], dog[..., rows, :]
        for cols, partial in chunks:
            k_tile, v_tile = _take(k, 2, cols).to(dtype), _take(v, 2, cols).to(dtype)
            s, mod_derivative = _tile_scores(q_tile, k_tile, cols, spec if partial else full_spec, n_q, rows,
                                             derivative=True)
            ds, dq_tile, dk_tile, dv_tile = _tile_grads(s, lse_g[..., rows, :], do_tile, delta[..., rows], q_tile,
                                                        k_tile, v_tile, keep(cols, rows), spec.scale, mod_derivative)
            if dbias is not None:
                _add_at(grouped(dbias)[..., rows, :], -1, cols, ds)  # each entry is written once: += 0 is =
            add_drel(ds, rows, cols)
            dq[..., rows, :] += dq_tile
            _add_at(dk, 2, cols, dk_tile)
            _add_at(dv, 2, cols, dv_tile)
    return (ungroup_heads(dq, tiled).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias,
            None if drel is None else drel.to(torch.float32))
