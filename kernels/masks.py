"""The tile ranges the structural masks of a spec (:mod:`spec`) let the kernels skip.

The band ``i - lower <= j <= i + upper`` bounds the loops over tiles; document ids that are non-decreasing
along both sequences (``Documents.sorted``) bound them further (:func:`doc_bounds`); a key tile without a
valid key is skipped inside the loops. :func:`tile_density` reports the fraction of (query tile, key tile)
pairs the forward kernel visits under these rules.
"""

from __future__ import annotations

import math

import torch
from flash_fx.kernels.spec import AttentionSpec, Band

__all__ = ["doc_bounds", "tile_density"]


def doc_bounds(this_doc: torch.Tensor, other_doc: torch.Tensor, block: int) -> torch.Tensor:
    """Int32 [B, tiles, 2]: per tile of ``block`` positions of ``this_doc``, the index range [lo, hi) of
    ``other_doc`` whose ids lie within the tile's id range [first, last].

    Both id tensors must be sorted along dim 1. Tiles of the other axis that do not meet [lo, hi) hold
    no pair of equal ids, so the kernels skip them; the forward and dQ pass q_doc as ``this_doc``, the
    dK/dV kernel k_doc.
    """
    n = this_doc.shape[1]
    starts = torch.arange(0, n, block, device=this_doc.device)
    first = this_doc[:, starts]
    last = this_doc[:, (starts + block - 1).clamp(max=n - 1)]
    other = other_doc.contiguous()
    lo = torch.searchsorted(other, first.contiguous(), out_int32=True)
    hi = torch.searchsorted(other, last.contiguous(), right=True, out_int32=True)
    return torch.stack([lo, hi], dim=-1).contiguous()


def _band_key_ranges(n_q: int, n_k: int, band: Band, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query tile, the key index range [lo, hi) the causal/window band lets its rows see."""
    first = torch.arange(0, n_q, block_m)
    last = (first + block_m).clamp(max=n_q) - 1
    lo, hi = torch.zeros_like(first), torch.full_like(first, n_k)
    if band.lower is not None:
        lo = (first - band.lower).clamp(min=0)
    if band.upper is not None:
        hi = (last + band.upper + 1).clamp(min=0, max=n_k)
    return lo, hi


def tile_density(spec: AttentionSpec, n_q: int, n_k: int, block_m: int, block_n: int) -> float:
    """Fraction of (query tile, key tile) pairs the forward kernel visits under the structural masks of a
    validated ``spec``, averaged over the batch.

    A query tile visits the key tiles that meet the intersection of its band range and (sorted
    documents) its document range, minus the tiles without a valid key; the same rules bound the
    kernels' loops (:func:`triton_common.tile_stages`).
    """
    if n_q == 0 or n_k == 0:
        return 0.0
    documents = spec.documents
    batch = max([t.shape[0] for t in (spec.key_valid, documents and documents.q_ids) if t is not None], default=1)
    lo, hi = _band_key_ranges(n_q, n_k, spec.band, block_m)
    lo, hi = lo.expand(batch, -1), hi.expand(batch, -1)
    if documents is not None and documents.sorted:
        bounds = doc_bounds(documents.q_ids, documents.k_ids, block_m).cpu().long()
        lo, hi = torch.maximum(lo, bounds[..., 0]), torch.minimum(hi, bounds[..., 1])
    tile_starts = torch.arange(0, n_k, block_n)
    # Key tile [s, s + block_n) meets [lo, hi) iff s < hi and s + block_n > lo (and the range is not empty).
    visits = ((tile_starts < hi[..., None]) & (tile_starts + block_n > lo[..., None]) & (lo < hi)[..., None])
    if spec.key_valid is not None:
        padded = torch.nn.functional.pad(spec.key_valid.cpu(), (0, math.ceil(n_k / block_n) * block_n - n_k))
        visits = visits & padded.unflatten(1, (-1, block_n)).any(-1)[:, None, :]
    return visits.float().mean().item()
