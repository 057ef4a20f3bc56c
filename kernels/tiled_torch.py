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
LSE = -inf, no gradient contribution) and the structural masks of the spec (:mod:`spec`), which are materialized
one [B, Nq, block_n] tile at a time. Dropout regenerates the keep mask of each tile from its counters
with :func:`dropout.keep_tile`, the generator the Triton kernels implement bit for bit.

With a block-sparse layout (:mod:`layout`, ``sparse_bias``) both passes walk (query tile, key tile) pairs
instead: each query tile of ``layout.block_m`` rows runs its online softmax (forward) or accumulates its
dQ (backward) over the key tiles that are non-empty for at least one (batch, head) of the bias, adding the
bias and the band mask only where the tile is not full for every (batch, head), so the work follows the
layout's density.

The ALiBi bias (:class:`spec.Alibi`) is added to every score tile from its row and column indices (in full
tiles of a layout too, which only skip the bias), and so is a relative-position bias
(:class:`spec.RelativeTable`), gathered from its vector at ``j - i + Nq - 1``; on request the backward sums
each tile's dS along its diagonals into that vector's gradient (``index_add_``).
"""

from __future__ import annotations

import math

import torch
from flash_fx.kernels.dropout import keep_tile
from flash_fx.kernels.layout import EMPTY, FULL, BlockLayout
from flash_fx.kernels.spec import AttentionSpec, Band, Saved


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


def _key_tiles(n_q: int, n_k: int, block_n: int, spec: AttentionSpec) -> list[int]:
    """Start of every key tile that at least one query may see: tiles outside the band of all queries,
    and tiles without a valid key in any batch row, are skipped."""
    band = spec.band
    lo = 0 if band.lower is None else max(-band.lower, 0)
    hi = n_k if band.upper is None else min(n_k, max(n_q + band.upper, 0))
    if lo >= hi:
        return []
    starts = range(lo // block_n * block_n, hi, block_n)
    if spec.key_valid is None:
        return list(starts)
    return [start for start in starts if spec.key_valid[:, start : start + block_n].any()]


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
    bh = _grouped(torch.arange(batch * num_heads, device=q.device).view(batch, num_heads, 1, 1), num_kv_heads,
                  spec.kv_heads_tiled)
    row_index = _positions(slice(0, n_q) if rows is None else rows, q.device)[:, None]
    col_index = _positions(cols, q.device)[None, :]
    dropout = spec.dropout
    return keep_tile(dropout.seed, dropout.offset, bh, row_index, col_index, n_q, n_k, dropout.p)


def _tile_scores(q: torch.Tensor, k_tile: torch.Tensor, cols: Columns, spec: AttentionSpec, n_q: int,
                 rows: slice | None = None) -> torch.Tensor:
    """Scaled, biased and masked scores [B, Hkv, group, rows, cols] of the key columns ``cols`` (a range with
    explicit bounds or an index tensor; ``k_tile`` holds their keys); ``q`` holds the query ``rows`` (a range
    with explicit bounds; all if None) of the Nq = ``n_q`` queries. Every term of ``spec`` applies."""
    rows = slice(0, q.shape[-2]) if rows is None else rows
    num_kv_heads, tiled = k_tile.shape[1], spec.kv_heads_tiled
    s = torch.matmul(q, k_tile.unsqueeze(2).transpose(-1, -2)) * spec.scale
    if spec.bias is not None:
        s = s + _grouped(_take(spec.bias.values[..., rows, :], -1, cols), num_kv_heads, tiled).to(s.dtype)
    row_index, col_index = _positions(rows, q.device), _positions(cols, q.device)
    if spec.alibi is not None:
        slopes = _grouped(spec.alibi.slopes[:, :, None, None], num_kv_heads, tiled).to(s.dtype)
        s = s + slopes * spec.alibi.positions(row_index, col_index).to(s.dtype)
    if spec.relative is not None:
        s = s + _grouped(spec.relative.gather(row_index, col_index, n_q), num_kv_heads, tiled).to(s.dtype)
    visible = spec.visible(row_index, col_index)
    if visible is not None:
        s = s.masked_fill(~visible[:, None, None], float("-inf"))
    return s


def _full_tiles(spec: AttentionSpec) -> AttentionSpec:
    """``spec`` for the tiles a layout proves full: no bias read (it is 0 there) and no band (it covers them)."""
    return spec.replace(band=Band(), bias=None)


#: At most this many keys (gathered from the visited key tiles) make one step of the sparse passes.
_MAX_CHUNK = 512


def _sparse_plan(layout: BlockLayout, n_q: int, n_k: int, spec: AttentionSpec) -> list[tuple[slice, list]]:
    """The tile pairs the sparse passes visit: per query tile (its rows, a range of ``layout.block_m``), the
    key tiles that are non-empty for some (batch, head) and hold a valid key, gathered into chunks of at most
    ``_MAX_CHUNK`` keys (a range where the tiles are adjacent, else an index tensor), each with whether it
    reads the bias and the band mask: False for tiles full for every (batch, head) (their bias is 0 and the
    band covers them), which form their own chunks."""
    block_m, block_n = layout.block_m, layout.block_n
    classes = layout.classes.flatten(0, 1).cpu()
    visited = (classes != EMPTY).any(0)
    plain = (classes == FULL).all(0)
    if spec.key_valid is not None:
        padded = torch.nn.functional.pad(spec.key_valid.cpu(), (0, math.ceil(n_k / block_n) * block_n - n_k))
        visited &= padded.unflatten(1, (-1, block_n)).any(-1).any(0)[None, :]
    per_chunk = max(1, _MAX_CHUNK // block_n)
    plan = []
    for tile in range(visited.shape[0]):
        chunks: list[tuple[Columns, bool]] = []
        for reads_bias, tiles in ((True, visited[tile] & ~plain[tile]), (False, visited[tile] & plain[tile])):
            numbers = tiles.nonzero().flatten().tolist()
            for first in range(0, len(numbers), per_chunk):
                group = numbers[first : first + per_chunk]
                if group[-1] - group[0] == len(group) - 1:
                    cols: Columns = slice(group[0] * block_n, min((group[-1] + 1) * block_n, n_k))
                else:
                    cols = torch.cat([torch.arange(j * block_n, min((j + 1) * block_n, n_k)) for j in group])
                    cols = cols.to(layout.classes.device)
                chunks.append((cols, reads_bias))
        plan.append((slice(tile * block_m, min((tile + 1) * block_m, n_q)), chunks))
    return plan


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dS, dQ, dK, dV)`` of one score tile ``s`` [B, Hkv, group, rows, n] from the (grouped) rows' LSE pairs
    (see :func:`_lse_pair`; +inf for fully masked rows), dO, delta and Q and the tile's K, V [B, Hkv, n, D];
    ``drop`` is the dropout keep mask times 1 / (1 - p). dK, dV are summed over the group."""
    p = torch.exp((s - lse[..., 0, None]) - lse[..., 1, None])
    dp = torch.matmul(do, v_tile.unsqueeze(2).transpose(-1, -2))
    p_kept = p
    if drop is not None:
        p_kept, dp = p * drop, dp * drop
    dv = torch.matmul(p_kept.transpose(-1, -2), do).sum(2)
    ds = p * (dp - delta[..., None])
    dq = torch.matmul(ds, k_tile.unsqueeze(2)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q).sum(2) * scale
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


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, block_n: int = 256,
                      layout: BlockLayout | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiled forward of a validated ``spec``: ``(out [B, Hq, Nq, D] in q.dtype, lse [B, Hq, Nq, 2] float32
    pairs)`` (see :func:`_lse_pair`), walking key columns of ``block_n``. With a ``layout`` (of the bias) the pass
    walks its non-empty tile pairs instead (its own tile sizes; ``block_n`` is ignored)."""
    if layout is not None:
        return _sparse_forward(q, k, v, spec, layout)
    dtype = _compute_dtype(q.dtype)
    num_kv_heads, n_k = k.shape[1], k.shape[2]
    qg = _grouped(q.to(dtype), num_kv_heads, spec.kv_heads_tiled)
    row_max = qg.new_full(qg.shape[:-1], float("-inf"))
    row_sum = qg.new_zeros(qg.shape[:-1])
    acc = qg.new_zeros(qg.shape[:-1] + v.shape[-1:])
    for start in _key_tiles(q.shape[2], n_k, block_n, spec):
        k_tile = k[:, :, start : start + block_n].to(dtype)
        v_tile = v[:, :, start : start + block_n].to(dtype).unsqueeze(2)
        cols = slice(start, start + k_tile.shape[2])
        s = _tile_scores(qg, k_tile, cols, spec, q.shape[2])
        keep = _tile_keep(q, num_kv_heads, n_k, cols, spec) if spec.dropout.enabled else None
        row_max, row_sum, acc = _softmax_step(row_max, row_sum, acc, s, v_tile, keep)
    return _finish_forward(q, acc / row_sum[..., None], _lse_pair(row_max, row_sum), spec)


def _finish_forward(q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                    spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The grouped output (scaled for dropout) and LSE pairs back in q's head order and dtype."""
    if spec.dropout.enabled:
        out = out * spec.dropout.scale
    return _ungrouped(out, spec.kv_heads_tiled).to(q.dtype), _ungrouped(lse, spec.kv_heads_tiled)


def _sparse_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
                    layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention_forward` over the non-empty tile pairs of ``layout``, one query tile at a time."""
    dtype = _compute_dtype(q.dtype)
    num_kv_heads, n_k = k.shape[1], k.shape[2]
    qg = _grouped(q.to(dtype), num_kv_heads, spec.kv_heads_tiled)
    out = qg.new_empty(qg.shape[:-1] + v.shape[-1:])
    lse = qg.new_empty(qg.shape[:-1] + (2,), dtype=torch.float32)
    full_spec = _full_tiles(spec)
    for rows, chunks in _sparse_plan(layout, q.shape[2], n_k, spec):
        q_tile = qg[..., rows, :]
        row_max = q_tile.new_full(q_tile.shape[:-1], float("-inf"))
        row_sum = q_tile.new_zeros(q_tile.shape[:-1])
        acc = q_tile.new_zeros(q_tile.shape[:-1] + v.shape[-1:])
        for cols, reads_bias in chunks:
            k_tile = _take(k, 2, cols).to(dtype)
            v_tile = _take(v, 2, cols).to(dtype).unsqueeze(2)
            s = _tile_scores(q_tile, k_tile, cols, spec if reads_bias else full_spec, q.shape[2], rows)
            keep = _tile_keep(q, num_kv_heads, n_k, cols, spec, rows) if spec.dropout.enabled else None
            row_max, row_sum, acc = _softmax_step(row_max, row_sum, acc, s, v_tile, keep)
        # No visited tile (or no visible key): 0 / 0 = NaN and LSE -inf, as in the dense pass.
        out[..., rows, :] = acc / row_sum[..., None]
        lse[..., rows, :] = _lse_pair(row_max, row_sum)
    return _finish_forward(q, out, lse, spec)


def attention_backward(grad_out: torch.Tensor, saved: Saved, spec: AttentionSpec, block_n: int = 256,
                       layout: BlockLayout | None = None) -> tuple[torch.Tensor, ...]:
    """Tiled backward of a validated ``spec`` from the forward's ``saved`` tensors: ``(dq, dk, dv, dbias, drel)``.

    The keep mask of dropout is regenerated per tile. With a ``layout`` (of the bias, for the backward's tiles)
    only its non-empty tile pairs are visited, one query tile at a time. dq, dk, dv have the dtypes of q, k, v.
    dbias is None unless the spec's bias requires grad; then it is the float32 [B, Hq, Nq, Nk] gradient of the
    expanded bias, ``dS = P * (dP - delta)``. drel likewise for the relative table: float32 [B, Hq, Nq + Nk - 1],
    entry ``j - i + Nq - 1`` the sum of dS over its diagonal (accumulated in the compute dtype).
    """
    q, k, v, out, lse = saved
    dtype = _compute_dtype(q.dtype)
    num_kv_heads, n_q, n_k = k.shape[1], q.shape[2], k.shape[2]
    tiled = spec.kv_heads_tiled

    def grouped(x: torch.Tensor) -> torch.Tensor:
        return _grouped(x, num_kv_heads, tiled)

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
    dbias = q.new_zeros((*q.shape[:3], n_k), dtype=torch.float32) if spec.features()["bias_grad"] else None
    drel = q.new_zeros((*q.shape[:2], n_q + n_k - 1), dtype=dtype) if spec.features()["rel_grad"] else None

    def add_drel(ds: torch.Tensor, rows: slice, cols: Columns) -> None:
        if drel is not None:
            spec.relative.add_diagonal_sums(drel, _ungrouped(ds, tiled), _positions(rows, q.device),
                                            _positions(cols, q.device), n_q)

    def keep(cols: Columns, rows: slice | None = None) -> torch.Tensor | None:
        if not spec.dropout.enabled:
            return None
        return _tile_keep(q, num_kv_heads, n_k, cols, spec, rows) * spec.dropout.scale

    if layout is None:
        for start in _key_tiles(n_q, n_k, block_n, spec):
            cols = slice(start, min(start + block_n, n_k))
            k_tile, v_tile = k[:, :, cols].to(dtype), v[:, :, cols].to(dtype)
            s = _tile_scores(qg, k_tile, cols, spec, n_q)
            ds, dq_tile, dk[:, :, cols], dv[:, :, cols] = _tile_grads(s, lse_g, dog, delta, qg, k_tile, v_tile,
                                                                      keep(cols), spec.scale)
            if dbias is not None:
                grouped(dbias)[..., cols] = ds
            add_drel(ds, slice(0, n_q), cols)
            dq += dq_tile
    else:
        full_spec = _full_tiles(spec)
        for rows, chunks in _sparse_plan(layout, n_q, n_k, spec):
            q_tile, do_tile = qg[..., rows, :], dog[..., rows, :]
            for cols, reads_bias in chunks:
                k_tile, v_tile = _take(k, 2, cols).to(dtype), _take(v, 2, cols).to(dtype)
                s = _tile_scores(q_tile, k_tile, cols, spec if reads_bias else full_spec, n_q, rows)
                ds, dq_tile, dk_tile, dv_tile = _tile_grads(s, lse_g[..., rows, :], do_tile, delta[..., rows],
                                                            q_tile, k_tile, v_tile, keep(cols, rows), spec.scale)
                if dbias is not None:
                    _add_at(grouped(dbias)[..., rows, :], -1, cols, ds)  # each entry is written once: += 0 is =
                add_drel(ds, rows, cols)
                dq[..., rows, :] += dq_tile
                _add_at(dk, 2, cols, dk_tile)
                _add_at(dv, 2, cols, dv_tile)
    return (_ungrouped(dq, tiled).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias,
            None if drel is None else drel.to(torch.float32))
