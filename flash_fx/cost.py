"""HBM traffic model: bytes moved by eager attention vs the flash kernels, and the rewrite decision.

Counts follow the loop structure of the kernels in flash_fx.kernels: the forward streams K and V once
per query tile; the backward's dK/dV kernel streams Q, dO, LSE and delta once per key tile, its dQ
kernel K and V once per query tile. Eager attention writes and re-reads the Nq x Nk scores at every
elementwise step (scale, mask, softmax, cast), and in training keeps the probabilities for the backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# A reference card for the time estimate (H100 SXM: HBM bandwidth and dense fp16 matrix throughput).
HBM_BYTES_PER_S = 3.0e12
MATMUL_FLOPS_PER_S = 7.9e14
LAUNCH_OVERHEAD_S = 5e-6
FORWARD_TILE_M = 128  # query rows per program in the forward (and the dQ kernel)
BACKWARD_TILE_N = 64  # key rows per program in the dK/dV kernel


@dataclass(frozen=True)
class AttentionShape:
    """The sizes the cost depends on (concrete example values)."""

    batch_heads: int
    nq: int
    nk: int
    head_dim: int
    dtype: torch.dtype
    density: float  # fraction of (query tile, key tile) pairs the flash kernels visit (1.0 dense)
    elementwise_passes: int  # eager's passes over the scores: scale, masks, casts
    mask_bytes_per_score: float  # bytes of mask/bias read per score element by eager (after broadcasting)
    training: bool


@dataclass(frozen=True)
class Plan:
    """The decision for one match: bytes and time before and after, and whether to rewrite."""

    hbm_before: float
    hbm_after: float
    time_before: float
    time_after: float
    rewrite: bool
    reason: str


def eager_bytes(s: AttentionShape) -> float:
    """HBM bytes of the unfused ops: Q@K^T, elementwise passes over the scores, softmax, P@V (+ backward)."""
    e = s.dtype.itemsize
    scores = s.nq * s.nk
    qkv = (2 * s.nq + 2 * s.nk) * s.head_dim  # read q, k, v, write out
    forward = qkv * e + scores * e  # the two products and the scores they write
    forward += s.elementwise_passes * 2 * scores * e + scores * s.mask_bytes_per_score
    forward += 2 * scores * e + scores * e  # softmax reads and writes; P @ V reads P
    if not s.training:
        return s.batch_heads * forward
    # dV = P^T dO, dP = dO V^T, softmax backward (reads P, dP, writes dS), dQ = dS K, dK = dS^T Q,
    # and the masks/scale passes again on dS.
    backward = (4 * s.nq + 4 * s.nk) * s.head_dim * e + scores * e * (1 + 1 + 3 + 2)
    backward += s.elementwise_passes * 2 * scores * e
    return s.batch_heads * (forward + backward)


def flash_bytes(s: AttentionShape, tile_m: int = FORWARD_TILE_M, tile_n: int = BACKWARD_TILE_N) -> float:
    """HBM bytes of the flash kernels for the same attention (+ backward when training)."""
    e = s.dtype.itemsize
    d = s.head_dim
    visible = s.density  # fraction of tiles the loop bounds visit (causal ~0.5, windows less)
    q_tiles = math.ceil(s.nq / tile_m)
    k_tiles = math.ceil(s.nk / tile_n)
    mask = s.nq * s.nk * s.mask_bytes_per_score * visible
    forward = (2 * s.nq * d + max(1.0, q_tiles * visible) * 2 * s.nk * d) * e + 4 * s.nq + mask
    if not s.training:
        return s.batch_heads * forward
    preprocess = 2 * s.nq * d * e + 4 * s.nq
    dkdv = 4 * s.nk * d * e + max(1.0, k_tiles * visible) * (2 * s.nq * d * e + 8 * s.nq) + mask
    dq = 2 * s.nq * d * e + max(1.0, q_tiles * visible) * 2 * s.nk * d * e + 8 * s.nq + mask
    return s.batch_heads * (forward + preprocess + dkdv + dq)


def flops(s: AttentionShape, recompute: bool) -> float:
    """Matrix FLOPs: 4*Nq*Nk*d forward, 2.5x that again for the backward (plus the flash recomputation)."""
    forward = 4 * s.nq * s.nk * s.head_dim * (s.density if recompute else 1.0)
    total = forward * (1 + (2.5 if recompute else 2.0)) if s.training else forward
    return s.batch_heads * total


def estimate_time(bytes_moved: float, flop_count: float) -> float:
    """Roofline time on the reference card plus one launch."""
    return max(bytes_moved / HBM_BYTES_PER_S, flop_count / MATMUL_FLOPS_PER_S) + LAUNCH_OVERHEAD_S


def plan(s: AttentionShape, force: bool) -> Plan:
    """Decide a rewrite: flash must move fewer bytes and be predicted no slower (or `force`)."""
    before, after = eager_bytes(s), flash_bytes(s)
    time_before = estimate_time(before, flops(s, recompute=False))
    time_after = estimate_time(after, flops(s, recompute=True))
    wins = after < before and time_after <= time_before
    if wins:
        reason = f"flash moves {before / after:.1f}x fewer HBM bytes"
    elif force:
        reason = "forced: the model predicts no win"
    else:
        reason = f"kept: flash would move {after:.3g} B vs {before:.3g} B, no predicted win"
    return Plan(before, after, time_before, time_after, wins or force, reason)
