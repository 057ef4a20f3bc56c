"""The tile schedule: which (query tile, key tile) pairs a call visits, and which of them need masks.

One rule, read by the Triton kernels, the tiled PyTorch path, the report's density and the cost model. Every
pair of a ``block_m`` x ``block_n`` tiling of the scores is

- **empty** when the spec hides every entry: outside the band, no valid key, no two ids of one document (sorted
  documents), or a bias that holds masks hides it all (:func:`bias_classes`): skipped, reading neither
  K, V nor anything else;
- **full** when the spec hides no entry and its bias (if it holds masks) is 0 over the whole tile: visited with
  no mask code at all and, for a mask bias, without reading it. The ragged last key tile is never full (its
  loads need the range check);
- **partial** otherwise: visited with every term and mask.

Skipping an empty tile is exact: its probabilities are ``exp(-inf) = 0`` (structural masks), and a mask bias
keeps whole every query tile holding a row it hides with a finite fill (:func:`bias_classes`). The classes have the
batch and head dims of what they depend on (1 where nothing does: the band alone gives [1, 1, Tq, Tk]); the
kernels index them with the real batch row and query head through zero strides. A structural schedule is built
with tensor ops on the inputs' device (no host synchronisation); one of the band alone is cached per shape, and a
mask bias's classes once per tensor contents (:func:`per_tensor`: a constant mask is reduced on its first call).
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from flash_fx.kernels.spec import AttentionSpec, Band

__all__ = ["EMPTY", "FULL", "PARTIAL", "TileSchedule", "bias_classes", "masked_threshold", "per_tensor", "schedule"]

EMPTY, PARTIAL, FULL = 0, 1, 2

T = TypeVar("T")

#: Results kept by :func:`per_tensor` (least recently used dropped first).
PER_TENSOR_ENTRIES = 16
_PER_TENSOR: OrderedDict[tuple, tuple[torch.Tensor, object]] = OrderedDict()


def per_tensor(values: torch.Tensor, key: tuple, compute: Callable[[], T]) -> T:
    """``compute()``, a function of ``values``'s contents (and of ``key``), computed once per contents: kept per
    (memory, view, version, key). The entry holds ``values``, so no other tensor can take its memory while it is
    kept, and an in-place write bumps the version, so written contents are computed anew. Inference tensors (no
    version counter), tensors without storage of their own (a wrapper subclass) and calls inside a CUDA-graph
    capture (whose replays must recompute) are never kept."""
    if values.is_cuda and torch.cuda.is_current_stream_capturing():
        return compute()
    try:
        full_key = (values.data_ptr(), values.storage_offset(), tuple(values.shape), values.stride(), values.dtype,
                    values.device, values._version, key)
    except RuntimeError:  # an inference tensor (no version counter), a tensor without storage of its own
        return compute()
    found = _PER_TENSOR.get(full_key)
    if found is not None:
        _PER_TENSOR.move_to_end(full_key)
        return found[1]
    result = compute()
    _PER_TENSOR[full_key] = (values, result)
    while len(_PER_TENSOR) > PER_TENSOR_ENTRIES:
        _PER_TENSOR.popitem(last=False)
    return result


def masked_threshold(dtype: torch.dtype) -> float:
    """Bias entries at or below this count as masked: float16's most negative finite value for a float16
    bias (transformers' fill there), else ``finfo(float32).min / 64``, far below any real score yet above
    the fills used for float32 and bfloat16 masks (``finfo.min`` and fractions of it down to /8)."""
    if dtype == torch.float16:
        return torch.finfo(torch.float16).min
    return torch.finfo(torch.float32).min / 64


@dataclass(frozen=True)
class TileSchedule:
    """Tile classes (int8 [SB, SH, query tiles, key tiles] of EMPTY / PARTIAL / FULL) for ``block_m`` x ``block_n``
    tiles; SB and SH are 1 where the classes do not depend on the batch row or the head."""

    classes: torch.Tensor
    block_m: int
    block_n: int

    @property
    def density(self) -> float:
        """Fraction of tile pairs visited (averaged over the batch rows and heads it depends on)."""
        return (self.classes != EMPTY).float().mean().item() if self.classes.numel() else 0.0

    def by_query_tile(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(counts, indices)`` for the forward and dQ kernels: ``counts`` int32 [SB, SH, Tq, 2] holds the number
        of partial and of full key tiles of each query tile, ``indices`` int32 [SB, SH, Tq, Tk] their key-tile
        numbers, partial ones first (ascending), then full ones (ascending). Built once per schedule."""
        return self._query_lists

    def by_key_tile(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The same lists per key tile (for the dK/dV kernel): [SB, SH, Tk, 2] and [SB, SH, Tk, Tq]."""
        return self._key_lists

    def by_kv_head(self, num_heads: int, num_kv_heads: int, kv_heads_tiled: bool) -> TileSchedule:
        """The schedule of the decode kernels' programs, one per KV head (:mod:`decode`): a tile is full when it is
        for every query head reading that KV head, empty when it is for all of them, else partial. Itself when the
        classes do not depend on the head."""
        if self.classes.shape[1] == 1:
            return self
        group = num_heads // num_kv_heads
        classes = self.classes.expand(-1, num_heads, -1, -1)
        grouped = (classes.unflatten(1, (group, num_kv_heads)).transpose(1, 2) if kv_heads_tiled
                   else classes.unflatten(1, (num_kv_heads, group)))
        return TileSchedule(_classes((grouped != EMPTY).any(2), (grouped == FULL).all(2)), self.block_m, self.block_n)

    @functools.cached_property
    def _query_lists(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _tile_lists(self.classes)

    @functools.cached_property
    def _key_lists(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _tile_lists(self.classes.transpose(-1, -2))

    def plan(self) -> list[tuple[int, list[int], list[int]]]:
        """Per query tile: its number, the key tiles some (batch row, head) visits that are not full for all of
        them (partial), and those full for all of them (host lists, for the tiled PyTorch path)."""
        classes = self.classes.flatten(0, 1).cpu()
        visited, full = (classes != EMPTY).any(0), (classes == FULL).all(0)
        return [(tile, (visited[tile] & ~full[tile]).nonzero().flatten().tolist(),
                 (visited[tile] & full[tile]).nonzero().flatten().tolist()) for tile in range(classes.shape[1])]


def schedule(spec: AttentionSpec, n_q: int, n_k: int, block_m: int, block_n: int,
             device: torch.device | None = None) -> TileSchedule:
    """The tile schedule of a validated ``spec`` for ``n_q`` queries and ``n_k`` keys, on ``device`` (the inputs'
    device; default: that of the spec's tensors, else the CPU). A band alone gives a schedule cached per shape,
    whose tile lists are then built once."""
    device = device or _device(spec)
    if spec.key_valid is None and spec.documents is None and not (spec.bias is not None and spec.bias.holds_masks):
        return _band_schedule(spec.band, n_q, n_k, block_m, block_n, device)
    classes = _band_classes(spec.band, n_q, n_k, block_m, block_n, device)
    if spec.key_valid is not None:
        classes = _combine(classes, _key_classes(spec.key_valid, block_n)[:, None, None, :])
    if spec.documents is not None:
        classes = _combine(classes, _document_classes(spec, block_m, block_n)[:, None])
    if spec.bias is not None and spec.bias.holds_masks:
        layout = per_tensor(spec.bias.values, ("classes", spec.band, block_m, block_n),
                            lambda: bias_classes(spec, block_m, block_n))
        exact = spec.bias.layout_exact
        if exact is not None:  # where skipping is not proven exact, the masked tiles are read (on the device)
            layout = torch.where(exact.to(layout.device) | (layout != EMPTY), layout, PARTIAL).to(torch.int8)
        classes = _combine(classes, layout)
    return TileSchedule(classes, block_m, block_n)


@functools.lru_cache(maxsize=256)
def _band_schedule(band: Band, n_q: int, n_k: int, block_m: int, block_n: int, device: torch.device) -> TileSchedule:
    return TileSchedule(_band_classes(band, n_q, n_k, block_m, block_n, device), block_m, block_n)


def _device(spec: AttentionSpec) -> torch.device:
    for tensor in (spec.key_valid, spec.documents and spec.documents.q_ids, spec.bias and spec.bias.values):
        if tensor is not None:
            return tensor.device
    return torch.device("cpu")


def _combine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Classes of two conditions that must both hold: empty if either is, full if both are (broadcast)."""
    return torch.minimum(a, b.to(a.device))


def _tile_lists(classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Sort key: partial (2) before full (1) before empty (0); a stable sort keeps tile order within a class.
    rank = torch.where(classes == PARTIAL, 2, torch.where(classes == FULL, 1, 0)).to(torch.int8)
    order = torch.sort(rank, dim=-1, descending=True, stable=True).indices
    counts = torch.stack([(classes == PARTIAL).sum(-1), (classes == FULL).sum(-1)], dim=-1)
    return counts.to(torch.int32).contiguous(), order.to(torch.int32).contiguous()


@functools.lru_cache(maxsize=256)
def _band_classes(band: Band, n_q: int, n_k: int, block_m: int, block_n: int, device: torch.device) -> torch.Tensor:
    """[1, 1, Tq, Tk] classes of the band: a tile is empty when no pair lies inside it, full when all do (and it
    is not the ragged last key tile)."""
    tiles_q, tiles_k = math.ceil(n_q / block_m), math.ceil(n_k / block_n)
    first_q = torch.arange(tiles_q, device=device)[:, None] * block_m
    last_q = torch.clamp(first_q + block_m, max=n_q) - 1
    first_k = torch.arange(tiles_k, device=device)[None, :] * block_n
    last_k = torch.clamp(first_k + block_n, max=n_k) - 1
    # The pairs (i, j) of a tile inside i - lower <= j <= i + upper: some iff the tile's extreme pairs allow it.
    some = torch.ones(tiles_q, tiles_k, dtype=torch.bool, device=device)
    every = torch.ones_like(some)
    if band.upper is not None:
        some &= first_k <= last_q + band.upper
        every &= last_k <= first_q + band.upper
    if band.lower is not None:
        some &= last_k >= first_q - band.lower
        every &= first_k >= last_q - band.lower
    if n_k % block_n:
        every[:, -1] = False
    return _classes(some, every)[None, None]


def _key_classes(key_valid: torch.Tensor, block_n: int) -> torch.Tensor:
    """[B, Tk] classes of key validity: empty without a valid key, full when every key of the tile is valid."""
    n_k = key_valid.shape[1]
    pad = math.ceil(n_k / block_n) * block_n - n_k
    tiles = F.pad(key_valid, (0, pad), value=False).unflatten(1, (-1, block_n))
    return _classes(tiles.any(-1), tiles.all(-1))


def _document_classes(spec: AttentionSpec, block_m: int, block_n: int) -> torch.Tensor:
    """[B, Tq, Tk] classes of document ids: full when the query and key tiles hold one and the same document;
    empty when their id ranges do not meet (then no id is shared, in any order; with sorted ids, as packed
    documents are, this finds every empty tile); otherwise partial."""
    documents = spec.documents
    q_lo, q_hi = _tile_id_range(documents.q_ids, block_m)
    k_lo, k_hi = _tile_id_range(documents.k_ids, block_n)
    one_document = (q_lo == q_hi)[:, :, None] & (k_lo == k_hi)[:, None, :] & (q_lo[:, :, None] == k_lo[:, None, :])
    some = (q_lo[:, :, None] <= k_hi[:, None, :]) & (k_lo[:, None, :] <= q_hi[:, :, None])
    every = one_document
    n_k = documents.k_ids.shape[1]
    if n_k % block_n:
        every[..., -1] = False
    return _classes(some, every)


def _tile_id_range(ids: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile of ``block`` positions, the smallest and largest id ([B, tiles] each)."""
    n = ids.shape[1]
    pad = math.ceil(n / block) * block - n
    info = torch.iinfo(ids.dtype)

    def padded(value: int) -> torch.Tensor:  # exact for int64 (F.pad's float value would round int64's extremes)
        return torch.cat([ids, torch.full((ids.shape[0], pad), value, dtype=ids.dtype, device=ids.device)], 1)

    low = padded(info.max).unflatten(1, (-1, block)).amin(-1)
    high = padded(info.min).unflatten(1, (-1, block)).amax(-1)
    return low, high


def bias_classes(spec: AttentionSpec, block_m: int, block_n: int) -> torch.Tensor:
    """Tile classes (int8 [LB, LH, Tq, Tk]) of the mask bias of a validated ``spec`` (an expanded [B, H, Nq, Nk]
    view, zero strides where it broadcasts; LB, LH its own batch and head sizes) under its band.

    One reduction over the bias in its own, unexpanded shape (a mask shared by the batch and the heads is reduced
    once): a tile is empty when every entry is at or below :func:`masked_threshold` or outside the band, full when
    every entry is exactly 0 (band-hidden entries count as -inf) and it is not the ragged last key tile. A query
    tile holding a row that the bias hides entirely with a finite fill keeps every tile the band lets it see:
    eager averages such a row over all its keys."""
    bias = spec.bias.values
    batch = 1 if bias.stride(0) == 0 else bias.shape[0]
    heads = 1 if bias.stride(1) == 0 else bias.shape[1]
    n_q, n_k = bias.shape[2], bias.shape[3]
    tiles_q, tiles_k = math.ceil(n_q / block_m), math.ceil(n_k / block_n)
    if n_q == 0 or n_k == 0:
        return torch.zeros((batch, heads, tiles_q, tiles_k), dtype=torch.int8, device=bias.device)
    own = bias[:batch, :heads].float()
    threshold = masked_threshold(bias.dtype)
    band = spec.band.visible(torch.arange(n_q, device=bias.device), torch.arange(n_k, device=bias.device))
    if band is not None:
        own = own.masked_fill(~band, float("-inf"))
    # Reduce over each tile's keys first (the inner, contiguous axis), then over its rows: much faster than
    # one reduction over both. The key axis is padded with -inf, which leaves the maxima alone and makes the
    # ragged last key tile's minimum -inf (that tile is never full anyway).
    key_pad = tiles_k * block_n - n_k
    padded = F.pad(own, (0, key_pad), value=float("-inf")) if key_pad else own
    row_tiles = padded.view(batch, heads, n_q, tiles_k, block_n)
    row_max, row_min = row_tiles.amax(-1), row_tiles.amin(-1)  # (faster than torch.aminmax on CPU)
    finite_dead_row = row_max.amax(-1)
    finite_dead_row = (finite_dead_row <= threshold) & (finite_dead_row > float("-inf"))

    query_pad = (0, 0, 0, tiles_q * block_m - n_q)
    tiled = (batch, heads, tiles_q, block_m, tiles_k)
    tile_max = F.pad(row_max, query_pad, value=float("-inf")).view(tiled).amax(3)
    tile_min = F.pad(row_min, query_pad, value=float("inf")).view(tiled).amin(3)

    empty = tile_max <= threshold
    if band is None:
        band_empty = torch.zeros_like(empty)
    else:
        pad = (0, key_pad, 0, tiles_q * block_m - n_q)
        band_pad = F.pad(band, pad, value=False).view(tiles_q, block_m, tiles_k, block_n)
        band_empty = ~band_pad.any(3).any(1)
    # A query tile with a row masked by a finite fill keeps every tile the band lets it see.
    keeps_all = finite_dead_row.view(batch, heads, n_q)
    keeps_all = F.pad(keeps_all, (0, tiles_q * block_m - n_q)).view(batch, heads, tiles_q, -1)
    empty = torch.where(keeps_all.any(-1)[..., None], band_empty, empty | band_empty)
    # All entries 0 (band-hidden entries are -inf, so a full tile lies inside the band).
    full = (tile_max == 0) & (tile_min == 0)
    if n_k % block_n:
        full[..., -1] = False  # the ragged last key tile needs its key-range check
    classes = torch.full(empty.shape, PARTIAL, dtype=torch.int8, device=bias.device)
    classes[full] = FULL
    classes[empty] = EMPTY
    return classes


def _classes(some: torch.Tensor, every: torch.Tensor) -> torch.Tensor:
    """int8 classes from "some pair visible" and "every pair visible"."""
    return torch.where(every & some, FULL, torch.where(some, PARTIAL, EMPTY)).to(torch.int8)
