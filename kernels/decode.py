"""When and how a call runs the decode kernels (:mod:`triton_decode`): few query rows against many keys.

The prefill kernels give every (batch row, query head, tile of ``BLOCK_M`` query rows) a program that streams all
of its KV head's keys. A decode step (one query row, or a few in speculative decoding) then launches B * Hq
programs whose tiles are nearly all padding, reads each KV head's K and V once per query head of its group (8
times under GQA 8:1) and leaves most of a GPU idle when B is small.

The decode kernels pack the ``group * Nq`` query rows that read one KV head into the rows of one tile and split
that KV head's key tiles across ``splits`` programs (flash-decoding); each program writes its rows' partial
output and log-sum-exp, and a second kernel merges the partials by their log-sum-exps (exact). K and V are read
once per KV head: ``group`` times fewer bytes than the prefill kernels, and B * Hkv * splits programs.

:func:`chooses` is the rule (the graph pass names the variant in its report with it, the kernels' entry point
dispatches with it): at most :data:`MAX_QUERY_ROWS` query rows, the packed rows fit :data:`MAX_ROWS`, and the call
has no dropout (whose stream is numbered per query head and row). :func:`plan` sizes the launch.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from flash_fx.kernels import config

#: Most packed rows (query heads per KV head x query rows) of a decode tile.
MAX_ROWS = 64

#: Most query rows of a decode call (a decode step, or a few speculated tokens); longer queries are prefill.
MAX_QUERY_ROWS = 16

#: Most key splits per KV head (the merge kernel walks them in a loop).
MAX_SPLITS = 64

#: Fewest key tiles a split should get: fewer makes the merge cost more than the parallelism gains.
MIN_TILES_PER_SPLIT = 4

#: Programs to aim for per streaming multiprocessor (enough to hide memory latency).
PROGRAMS_PER_SM = 2

#: The SM count assumed under Triton's interpreter (small, so test shapes get several splits).
INTERPRETER_SMS = 2


class DecodePlan(NamedTuple):
    """A decode launch: the packed rows' tile height, the key tile width, the key splits per KV head, warps and
    pipeline stages."""

    block_m: int
    block_n: int
    splits: int
    num_warps: int
    num_stages: int


def packed_rows(n_q: int, num_heads: int, num_kv_heads: int) -> int:
    """Rows of one decode tile: the query rows of every query head that reads one KV head."""
    return n_q * (num_heads // num_kv_heads)


def chooses(n_q: int, num_heads: int, num_kv_heads: int, dropout: bool) -> bool:
    """Whether a call with these sizes runs the decode kernels (see the module docstring)."""
    return not dropout and 0 < n_q <= MAX_QUERY_ROWS and packed_rows(n_q, num_heads, num_kv_heads) <= MAX_ROWS


@functools.lru_cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def tiles(rows: int, width: int, dtype: torch.dtype, on_gpu: bool) -> DecodePlan:
    """The tiles of a decode launch with one split: the packed ``rows`` rounded up to a power of two (at least 16,
    a dot's smallest) by 64 keys, halved from a padded head ``width`` over 128 and again for float32 (whose
    d128 tile of 64 keys spills registers on sm_90, ``compile_check --decode``); 16 x 16 under the interpreter."""
    block_m = max(16, 1 << (rows - 1).bit_length())
    if not on_gpu:
        return DecodePlan(block_m, 16, 1, num_warps=1, num_stages=1)
    block_n = 64 // (2 if width > 128 else 1) // (2 if dtype.itemsize >= 4 else 1)
    return DecodePlan(block_m, block_n, 1, num_warps=4, num_stages=3)


def plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, splits: int | None = None) -> DecodePlan:
    """The launch of a decode call on these inputs: :func:`tiles`, and enough key splits to give the card
    :data:`PROGRAMS_PER_SM` programs per SM, each split at least :data:`MIN_TILES_PER_SPLIT` key tiles (``splits``
    given: that many), at most the key tiles and :data:`MAX_SPLITS`."""
    rows = packed_rows(q.shape[2], q.shape[1], k.shape[1])
    launch = tiles(rows, config.padded_head_dim(max(q.shape[-1], v.shape[-1])), q.dtype, q.is_cuda)
    key_tiles = -(-k.shape[2] // launch.block_n)
    if splits is None:
        programs = k.shape[0] * k.shape[1]
        sms = _multiprocessors(q.device) if q.is_cuda else INTERPRETER_SMS
        splits = min(-(-PROGRAMS_PER_SM * sms // programs), -(-key_tiles // MIN_TILES_PER_SPLIT))
    return launch._replace(splits=max(1, min(splits, key_tiles, MAX_SPLITS)))
