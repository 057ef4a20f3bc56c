"""Block-sparse tile layouts: which (query tile, key tile) pairs a masked bias lets the kernels skip.

A bias that comes from a mask holds 0 where keys are visible and ``-inf`` (or a huge negative fill such
as ``finfo.min``) where they are hidden. One reduction over the bias (in its own, unexpanded shape, so a
mask shared by the batch and the heads is reduced once) sorts every tile into three classes:

- **empty**: every entry is masked (at or below :func:`masked_threshold`), or the causal/window band
  hides the whole tile: the kernels skip it, reading neither K, V nor the bias;
- **full**: every entry is exactly 0, the band covers the tile and it is not the ragged last key tile:
  the kernels run it without any mask code and without reading the bias;
- **partial**: anything else: the kernels read its bias tile and apply the band mask.

Skipping an empty tile is exact: its probabilities are ``exp(masked - row max)``, which underflows to 0
as soon as the row holds one visible entry, and a row whose entries are all ``-inf`` gives NaN either
way. A row whose entries are all masked with a *finite* fill is different: eager softmax spreads it
uniformly over every key, so a query tile holding such a row skips nothing on account of the bias.

The kernels iterate, per query tile (forward, dQ) or per key tile (dK/dV), over the lists of
:meth:`BlockLayout.by_query_tile` / :meth:`BlockLayout.by_key_tile`: partial tiles first, then full
ones, so their work scales with the fraction of non-empty tiles (:attr:`BlockLayout.density`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from flash_fx.kernels.spec import AttentionSpec, Band

__all__ = ["EMPTY", "FULL", "PARTIAL", "BlockLayout", "bias_layout", "masked_threshold"]

EMPTY, PARTIAL, FULL = 0, 1, 2


def masked_threshold(dtype: torch.dtype) -> float:
    """Bias entries at or below this count as masked: float16's most negative finite value for a float16
    bias (transformers' fill there), else ``finfo(float32).min / 64``, far below any real score yet above
    the fills used for float32 and bfloat16 masks (``finfo.min`` and fractions of it down to /8)."""
    if dtype == torch.float16:
        return torch.finfo(torch.float16).min
    return torch.finfo(torch.float32).min / 64


@dataclass(frozen=True)
class BlockLayout:
    """Tile classes (int8 [LB, LH, query tiles, key tiles] of EMPTY / PARTIAL / FULL) of a bias whose own
    batch and head sizes are LB and LH (1 where the bias broadcasts), for ``block_m`` x ``block_n`` tiles."""

    classes: torch.Tensor
    block_m: int
    block_n: int

    @property
    def density(self) -> float:
        """Fraction of tile pairs that are not empty (what the kernels visit)."""
        return (self.classes != EMPTY).float().mean().item() if self.classes.numel() else 0.0

    def by_query_tile(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(counts, indices)`` for the forward and dQ kernels: ``counts`` int32 [LB, LH, Tq, 2] holds the
        number of partial and of full key tiles of each query tile, ``indices`` int32 [LB, LH, Tq, Tk] their
        key-tile numbers, partial ones first (ascending), then full ones (ascending)."""
        return _tile_lists(self.classes)

    def by_key_tile(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The same lists per key tile (for the dK/dV kernel): [LB, LH, Tk, 2] and [LB, LH, Tk, Tq]."""
        return _tile_lists(self.classes.transpose(-1, -2))


def _tile_lists(classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Sort key: partial (2) before full (1) before empty (0); a stable sort keeps tile order within a class.
    rank = torch.where(classes == PARTIAL, 2, torch.where(classes == FULL, 1, 0)).to(torch.int8)
    order = torch.sort(rank, dim=-1, descending=True, stable=True).indices
    counts = torch.stack([(classes == PARTIAL).sum(-1), (classes == FULL).sum(-1)], dim=-1)
    return counts.to(torch.int32).contiguous(), order.to(torch.int32).contiguous()


def bias_layout(spec: AttentionSpec, block_m: int, block_n: int) -> BlockLayout:
    """The tile layout of the bias of a validated ``spec`` (an expanded [B, H, Nq, Nk] view, zero strides where
    it broadcasts) under its band (key padding and documents are not part of the layout: the kernels apply them
    in every visited tile)."""
    bias = spec.bias.values
    batch = 1 if bias.stride(0) == 0 else bias.shape[0]
    heads = 1 if bias.stride(1) == 0 else bias.shape[1]
    n_q, n_k = bias.shape[2], bias.shape[3]
    tiles_q, tiles_k = math.ceil(n_q / block_m), math.ceil(n_k / block_n)
    if n_q == 0 or n_k == 0:
        return BlockLayout(torch.zeros((batch, heads, tiles_q, tiles_k), dtype=torch.int8, device=bias.device),
                           block_m, block_n)
    own = bias[:batch, :heads].float()
    threshold = masked_threshold(bias.dtype)
    band = _band_visible(n_q, n_k, spec.band, bias.device)
    if band is not None:
        own = own.masked_fill(~band, float("-inf"))
    # Reduce over each tile's keys first (the inner, contiguous axis), then over its rows: much faster than
    # one reduction over both. The key axis is padded with -inf, which leaves the maxima alone and makes the
    # ragged last key tile's minimum -inf (that tile is never full anyway).
    key_pad = tiles_k * block_n - n_k
    padded = torch.nn.functional.pad(own, (0, key_pad), value=float("-inf")) if key_pad else own
    row_tiles = padded.view(batch, heads, n_q, tiles_k, block_n)
    row_max, row_min = row_tiles.amax(-1), row_tiles.amin(-1)  # (faster than torch.aminmax on CPU)
    finite_dead_row = row_max.amax(-1)
    finite_dead_row = (finite_dead_row <= threshold) & (finite_dead_row > float("-inf"))

    query_pad = (0, 0, 0, tiles_q * block_m - n_q)
    tiled = (batch, heads, tiles_q, block_m, tiles_k)
    tile_max = torch.nn.functional.pad(row_max, query_pad, value=float("-inf")).view(tiled).amax(3)
    tile_min = torch.nn.functional.pad(row_min, query_pad, value=float("inf")).view(tiled).amin(3)

    empty = tile_max <= threshold
    if band is None:
        band_empty = torch.zeros_like(empty)
    else:
        pad = (0, key_pad, 0, tiles_q * block_m - n_q)
        band_pad = torch.nn.functional.pad(band, pad, value=False).view(tiles_q, block_m, tiles_k, block_n)
        band_empty = ~band_pad.any(3).any(1)
    # A query tile with a row masked by a finite fill keeps every tile the band lets it see.
    keeps_all = finite_dead_row.view(batch, heads, n_q)
    keeps_all = torch.nn.functional.pad(keeps_all, (0, tiles_q * block_m - n_q)).view(batch, heads, tiles_q, -1)
    empty = torch.where(keeps_all.any(-1)[..., None], band_empty, empty | band_empty)
    # All entries 0 (band-hidden entries are -inf, so a full tile lies inside the band).
    full = (tile_max == 0) & (tile_min == 0)
    if n_k % block_n:
        full[..., -1] = False  # the ragged last key tile needs its key-range check
    classes = torch.full(empty.shape, PARTIAL, dtype=torch.int8, device=bias.device)
    classes[full] = FULL
    classes[empty] = EMPTY
    return BlockLayout(classes, block_m, block_n)


def _band_visible(n_q: int, n_k: int, band: Band, device: torch.device) -> torch.Tensor | None:
    """Bool [Nq, Nk]: the pairs ``band`` lets attend (None without a band)."""
    return band.visible(torch.arange(n_q, device=device), torch.arange(n_k, device=device))
