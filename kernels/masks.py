"""Structural masks that the kernels evaluate from indices, and the tile ranges they allow to skip.

A key j is visible to query i (of batch row b) iff every given condition holds:

- ``causal_offset = c``: ``j <= i + c``;
- ``window = (left, right)``: ``i - left <= j <= i + right``;
- ``key_valid`` (bool [B, Nk]): ``key_valid[b, j]``;
- ``q_doc``, ``k_doc`` (integer [B, Nq], [B, Nk]): ``q_doc[b, i] == k_doc[b, j]``.

The first two form a band ``i - lower <= j <= i + upper`` (see :attr:`Masks.upper`, :attr:`Masks.lower`)
that bounds the loops over tiles. Document ids that are non-decreasing along both sequences
(:attr:`Masks.docs_sorted`) bound them further (:func:`doc_bounds`); a key tile without a valid key is
skipped inside the loops. Nothing of size Nq x Nk is ever read. :func:`tile_density` reports the
fraction of (query tile, key tile) pairs the forward kernel visits under these rules.

:class:`Alibi` is the other thing the kernels compute from indices: the ALiBi position bias
``slope[b, h] * (j - i)`` (or ``-slope[b, h] * |j - i|``), added to the scores; it hides no key and
bounds no loop. :class:`RelativeBias` (T5's bucketed relative positions) is read from a vector per
(batch, head) at the index ``j - i + Nq - 1``; it hides no key either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Alibi", "AttentionInputError", "Masks", "RelativeBias", "doc_bounds", "tile_density"]


class AttentionInputError(ValueError):
    """Inputs the attention kernels cannot take (a shape, dtype or device that does not fit). The backend
    catches it at run time and runs the original ops for that call instead."""


@dataclass(frozen=True)
class Masks:
    """The structural masks of one attention call; tensors are already [B, N] (possibly zero-stride)."""

    causal_offset: int | None = None
    window: tuple[int, int] | None = None
    key_valid: torch.Tensor | None = None
    q_doc: torch.Tensor | None = None
    k_doc: torch.Tensor | None = None
    docs_sorted: bool = False

    @staticmethod
    def build(
        batch: int,
        n_q: int,
        n_k: int,
        *,
        causal_offset: int | None = None,
        window: tuple[int, int] | None = None,
        key_valid: torch.Tensor | None = None,
        q_doc: torch.Tensor | None = None,
        k_doc: torch.Tensor | None = None,
    ) -> Masks:
        """Validate the masks, expand batch-1 ones to ``batch``, make document ids int32 and check their order.

        ``key_valid`` must be bool [B or 1, Nk]; ``q_doc`` and ``k_doc`` (both or neither) integer
        [B or 1, Nq] and [B or 1, Nk].
        """
        reach = n_q + n_k  # an offset beyond every index difference: the same band, and no int32 overflow
        if window is not None:
            window = (_clamp(window[0], reach), _clamp(window[1], reach))
        if causal_offset is not None:
            causal_offset = _clamp(causal_offset, reach)
        if key_valid is not None:
            if key_valid.dtype != torch.bool:
                raise AttentionInputError(f"key_valid must be a bool tensor, got {key_valid.dtype}")
            key_valid = _batch_rows(key_valid, batch, n_k, "key_valid")
        if (q_doc is None) != (k_doc is None):
            raise AttentionInputError("q_doc and k_doc must be given together")
        docs_sorted = False
        if q_doc is not None and k_doc is not None:
            q_doc, k_doc = _int32_ids(q_doc, k_doc)
            q_doc = _batch_rows(q_doc, batch, n_q, "q_doc")
            k_doc = _batch_rows(k_doc, batch, n_k, "k_doc")
            docs_sorted = bool((q_doc[:, 1:] >= q_doc[:, :-1]).all() and (k_doc[:, 1:] >= k_doc[:, :-1]).all())
        return Masks(causal_offset, window, key_valid, q_doc, k_doc, docs_sorted)

    @property
    def upper(self) -> int | None:
        """Band upper offset: key j is visible to query i only if ``j <= i + upper`` (None: no bound)."""
        bounds = [b for b in (self.causal_offset, None if self.window is None else self.window[1]) if b is not None]
        return min(bounds) if bounds else None

    @property
    def lower(self) -> int | None:
        """Band lower offset: key j is visible to query i only if ``j >= i - lower`` (None: no bound)."""
        return None if self.window is None else self.window[0]

    @property
    def may_skip(self) -> bool:
        """Whether some (query tile, key tile) pairs may be skipped (beyond those above a causal diagonal)."""
        return self.window is not None or self.key_valid is not None or self.docs_sorted

    def visible(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor | None:
        """Bool [B or 1, len(rows), len(cols)]: which (query ``rows``, key ``cols``) pairs may attend.

        None when no mask is set. ``rows`` and ``cols`` are 1-d index tensors.
        """
        i, j = rows[None, :, None], cols[None, None, :]
        ok = None
        if self.upper is not None:
            ok = j <= i + self.upper
        if self.lower is not None:
            ok = _and(ok, j >= i - self.lower)
        if self.key_valid is not None:
            ok = _and(ok, self.key_valid[:, None, cols])
        if self.q_doc is not None and self.k_doc is not None:
            ok = _and(ok, self.q_doc[:, rows, None] == self.k_doc[:, None, cols])
        return ok


@dataclass(frozen=True)
class Alibi:
    """The ALiBi bias of one attention call: ``slopes[b, h] * (j - i)`` for query i and key j (0-based), or
    ``slopes[b, h] * -|j - i|`` if ``symmetric``. ``slopes`` is float32 [B, Hq] (zero strides where it
    broadcasts); the slopes receive no gradient."""

    slopes: torch.Tensor
    symmetric: bool = False

    @staticmethod
    def build(slopes: torch.Tensor | None, symmetric: bool, batch: int, heads: int,
              device: torch.device) -> Alibi | None:
        """Validate ``slopes`` (a float tensor [B or 1, Hq or 1] on ``device``; None: no ALiBi, and
        ``symmetric`` is ignored), expand it to [B, Hq] and make it float32."""
        if slopes is None:
            return None
        _check_float_tensor("alibi_slopes", slopes)
        if slopes.dim() != 2 or slopes.shape[0] not in (1, batch) or slopes.shape[1] not in (1, heads):
            raise AttentionInputError(f"alibi_slopes must have shape [{batch} or 1, {heads} or 1], "
                                      f"got {tuple(slopes.shape)}")
        _check_device("alibi_slopes", slopes, device)
        return Alibi(slopes.detach().to(torch.float32).expand(batch, heads), bool(symmetric))

    def positions(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The position term [len(rows), len(cols)] (int64) that the slopes multiply: ``j - i`` or ``-|j - i|``
        for query ``rows`` i and key ``cols`` j (1-d index tensors)."""
        pos = cols[None, :] - rows[:, None]
        return -pos.abs() if self.symmetric else pos


@dataclass(frozen=True)
class RelativeBias:
    """A bias that depends only on (batch row, query head, ``j - i``), such as T5's learned bucketed relative
    positions: ``values[b, h, j - i + Nq - 1]`` is added to the score of query i and key j (0-based).
    ``values`` is a float tensor [B, Hq, Nq + Nk - 1] of the caller's dtype (zero strides where it
    broadcasts), read as float32 by the Triton kernels; ``n_q`` is Nq."""

    values: torch.Tensor
    n_q: int

    @staticmethod
    def build(rel_bias: torch.Tensor | None, batch: int, heads: int, n_q: int, n_k: int,
              device: torch.device) -> RelativeBias | None:
        """Validate ``rel_bias`` (a float tensor [B or 1, Hq or 1, Nq + Nk - 1] on ``device``; None: no relative
        bias) and expand its batch and head dims (zero strides)."""
        if rel_bias is None:
            return None
        _check_float_tensor("rel_bias", rel_bias)
        length = max(n_q + n_k - 1, 0)
        if (rel_bias.dim() != 3 or rel_bias.shape[0] not in (1, batch) or rel_bias.shape[1] not in (1, heads)
                or rel_bias.shape[2] != length):
            raise AttentionInputError(f"rel_bias must have shape [{batch} or 1, {heads} or 1, {length}] (the "
                                      f"Nq + Nk - 1 = {n_q} + {n_k} - 1 relative positions), got "
                                      f"{tuple(rel_bias.shape)}")
        _check_device("rel_bias", rel_bias, device)
        return RelativeBias(rel_bias.detach().expand(batch, heads, length), n_q)

    def index(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The int64 [len(rows), len(cols)] indices ``j - i + Nq - 1`` into ``values`` of query ``rows`` i and key
        ``cols`` j (1-d index tensors)."""
        return cols[None, :] - rows[:, None] + (self.n_q - 1)

    def gather(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The dense term [B, Hq, len(rows), len(cols)] of query ``rows`` and key ``cols``, gathered once per
        batch row / head that the values do not broadcast over (zero strides along the others)."""
        values = self.values
        own = values[: 1 if values.stride(0) == 0 else None, : 1 if values.stride(1) == 0 else None]
        return own[:, :, self.index(rows, cols)].expand(*values.shape[:2], len(rows), len(cols))

    def add_diagonal_sums(self, grad: torch.Tensor, ds: torch.Tensor, rows: torch.Tensor,
                          cols: torch.Tensor) -> None:
        """``grad[b, h, r] += sum of ds[b, h, i, j]`` over the (query ``rows`` i, key ``cols`` j) pairs with
        ``j - i + Nq - 1 = r``, in place; ``grad`` is [B, Hq, Nq + Nk - 1], ``ds`` [B, Hq, len(rows), len(cols)]."""
        grad.index_add_(2, self.index(rows, cols).flatten(), ds.reshape(*ds.shape[:2], -1).to(grad.dtype))


def _check_float_tensor(name: str, value: object) -> None:
    if not isinstance(value, torch.Tensor):
        raise AttentionInputError(f"{name} must be a float tensor, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise AttentionInputError(f"{name} must be a float tensor, got {value.dtype}")


def _check_device(name: str, value: torch.Tensor, device: torch.device) -> None:
    if value.device != device:
        raise AttentionInputError(f"{name} must be on {device}, like q, got {value.device}")


def _clamp(offset: int, reach: int) -> int:
    return max(-reach, min(int(offset), reach))


def _int32_ids(q_doc: torch.Tensor, k_doc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer (or bool) document ids as int32 with the same equalities and order: ids outside int32's range
    are replaced by their ranks among all ids (a ValueError for float ids)."""
    for name, ids in (("q_doc", q_doc), ("k_doc", k_doc)):
        if ids.dtype.is_floating_point or ids.dtype.is_complex:
            raise AttentionInputError(f"{name} must hold integer ids, got {ids.dtype}")
    if q_doc.dtype == torch.bool or k_doc.dtype == torch.bool:
        return q_doc.to(torch.int32), k_doc.to(torch.int32)
    both = torch.cat([q_doc.reshape(-1).long(), k_doc.reshape(-1).long()])
    info = torch.iinfo(torch.int32)
    if both.numel() and (int(both.min()) < info.min or int(both.max()) > info.max):
        ranks = torch.unique(both, return_inverse=True)[1].to(torch.int32)
        return ranks[: q_doc.numel()].view(q_doc.shape), ranks[q_doc.numel():].view(k_doc.shape)
    return q_doc.to(torch.int32), k_doc.to(torch.int32)


def _and(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else a & b


def _batch_rows(x: torch.Tensor, batch: int, n: int, name: str) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] != n or x.shape[0] not in (1, batch):
        raise AttentionInputError(f"{name} must have shape [{batch} or 1, {n}], got {tuple(x.shape)}")
    return x.expand(batch, n)


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


def _band_key_ranges(n_q: int, n_k: int, masks: Masks, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query tile, the key index range [lo, hi) the causal/window band lets its rows see."""
    first = torch.arange(0, n_q, block_m)
    last = (first + block_m).clamp(max=n_q) - 1
    lo, hi = torch.zeros_like(first), torch.full_like(first, n_k)
    if masks.lower is not None:
        lo = (first - masks.lower).clamp(min=0)
    if masks.upper is not None:
        hi = (last + masks.upper + 1).clamp(min=0, max=n_k)
    return lo, hi


def tile_density(
    nq: int,
    nk: int,
    *,
    causal_offset: int | None = None,
    window: tuple[int, int] | None = None,
    key_valid: torch.Tensor | None = None,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
    block_m: int,
    block_n: int,
) -> float:
    """Fraction of (query tile, key tile) pairs the forward kernel visits, averaged over the batch.

    A query tile visits the key tiles that meet the intersection of its band range and (sorted
    documents) its document range, minus the tiles without a valid key; the same rules bound the
    kernels' loops (:func:`triton_common.tile_stages`).
    """
    if nq == 0 or nk == 0:
        return 0.0
    batch = max([t.shape[0] for t in (key_valid, q_doc, k_doc) if t is not None], default=1)
    masks = Masks.build(batch, nq, nk, causal_offset=causal_offset, window=window, key_valid=key_valid,
                        q_doc=q_doc, k_doc=k_doc)
    lo, hi = _band_key_ranges(nq, nk, masks, block_m)
    lo, hi = lo.expand(batch, -1), hi.expand(batch, -1)
    if masks.docs_sorted:
        bounds = doc_bounds(masks.q_doc, masks.k_doc, block_m).cpu().long()
        lo, hi = torch.maximum(lo, bounds[..., 0]), torch.minimum(hi, bounds[..., 1])
    tile_starts = torch.arange(0, nk, block_n)
    # Key tile [s, s + block_n) meets [lo, hi) iff s < hi and s + block_n > lo (and the range is not empty).
    visits = ((tile_starts < hi[..., None]) & (tile_starts + block_n > lo[..., None]) & (lo < hi)[..., None])
    if masks.key_valid is not None:
        padded = torch.nn.functional.pad(masks.key_valid.cpu(), (0, math.ceil(nk / block_n) * block_n - nk))
        visits = visits & padded.unflatten(1, (-1, block_n)).any(-1)[:, None, :]
    return visits.float().mean().item()
