"""FlashAttention kernels behind flash_fx's rewrites.

``attention_forward`` / ``attention_backward`` run the Triton kernels when :func:`uses_triton` says so
(CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) and the tiled PyTorch implementation
otherwise. Shapes: q [B, Hq, Nq, D], k and v [B, Hkv, Nk, D] with ``Hq % Hkv == 0``; any strides.
Query head h uses KV head ``h // (Hq // Hkv)`` ("grouped", what ``repeat_interleave`` or
expand + reshape of the KV heads produce) or, with ``kv_heads_tiled=True``, KV head ``h % Hkv``
("tiled", what ``k.repeat(1, Hq // Hkv, 1, 1)`` produces). ``scores = q @ k^T * scale (+ bias)``; with
``causal_offset = c`` key j is visible to query i iff ``j <= i + c``. ``bias`` is any float tensor
broadcastable to [B, Hq, Nq, Nk]; the backward returns the gradient of its expanded
[B, Hq, Nq, Nk] form on request (the caller sums it down to the bias's own shape).

Structural masks, evaluated from indices inside the kernels (nothing of size Nq x Nk is read), narrow
the visible keys further (see :mod:`flash_fx.kernels.masks`): ``window = (left, right)`` keeps keys
``i - left <= j <= i + right``; ``key_valid`` (bool [B, Nk]) drops padding keys; ``q_doc``/``k_doc``
(integer [B, Nq] / [B, Nk]) keep keys of the query's document. Whole tiles that these masks hide are
skipped; :func:`tile_density` gives the fraction of tile pairs the forward visits.

Dropout (``dropout_p > 0``) drops attention probabilities inside the kernels, as FlashAttention does:
``out = (softmax(scores) * keep / (1 - p)) @ v`` with the normalization of the undropped softmax (what
eager ``F.dropout(F.softmax(s, -1), p) @ v`` computes). The keep mask is never stored: it is a pure
function of ``(seed, offset, b * Hq + h, i, j)`` (a counter hash, see :mod:`flash_fx.kernels.dropout`),
generated on chip in the forward and regenerated identically by the backward, which must get the same
``dropout_p``, ``seed`` and ``offset``. The tiled PyTorch path uses the same generator, so both paths
drop the same elements; :func:`dropout_keep_mask` materializes the mask. ``dropout_p == 0`` compiles
kernels without any dropout code.

Fully masked rows give a NaN output row and LSE -inf, as eager softmax does after a ``-inf`` fill;
in the backward they contribute no gradient (their dq and dbias rows are 0).
"""

from __future__ import annotations

import os

import torch
from flash_fx.kernels import config, tiled_torch
from flash_fx.kernels.dropout import Dropout, dropout_keep_mask
from flash_fx.kernels.masks import Masks, tile_density

__all__ = ["attention_backward", "attention_forward", "dropout_keep_mask", "tile_density", "uses_triton"]


def uses_triton(t: torch.Tensor) -> bool:
    """True if attention on ``t`` runs the Triton kernels: CUDA tensors, or CPU ones with TRITON_INTERPRET=1."""
    return t.is_cuda or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected 4-d q, k, v; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")


def _expand_bias(bias: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """The bias as a (zero-stride where broadcast) [B, Hq, Nq, Nk] view."""
    if bias is None:
        return None
    return bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _tiles(
    q: torch.Tensor, block_m: int | None, block_n: int | None, *, backward: bool
) -> tuple[int, int, int, int]:
    default_m, default_n, num_warps, num_stages = config.choose_tiles(
        q.shape[-1], q.dtype, q.is_cuda, backward=backward
    )
    return block_m or default_m, block_n or default_n, num_warps, num_stages


def _check_triton_head_dim(q: torch.Tensor) -> None:
    if q.shape[-1] > config.MAX_HEAD_DIM:
        raise ValueError(f"the Triton kernels support head dims up to {config.MAX_HEAD_DIM}, got {q.shape[-1]}")


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal_offset: int | None = None,
    bias: torch.Tensor | None = None,
    kv_heads_tiled: bool = False,
    window: tuple[int, int] | None = None,
    key_valid: torch.Tensor | None = None,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out [B,Hq,Nq,D] in q.dtype, lse [B,Hq,Nq] float32).

    ``block_m`` / ``block_n`` override the tile sizes (the tiled PyTorch path uses only ``block_n``).
    ``dropout_p`` in [0, 1) drops probabilities with the stream of ``seed`` (in [0, 2**31), required when
    ``dropout_p > 0``) and ``offset`` (>= 0); the LSE is that of the undropped softmax.
    With no keys (Nk == 0) the output is zeros and the LSE -inf, as eager ``softmax(...) @ v`` gives.
    """
    _check_inputs(q, k, v)
    bias = _expand_bias(bias, q, k)
    masks = Masks.build(q.shape[0], q.shape[2], k.shape[2], causal_offset=causal_offset, window=window,
                        key_valid=key_valid, q_doc=q_doc, k_doc=k_doc)
    dropout = Dropout.build(dropout_p, seed, offset)
    n_k = k.shape[2]
    if q.numel() == 0 or n_k == 0:
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        return out, torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
    if not uses_triton(q):
        return tiled_torch.attention_forward(
            q, k, v, scale=scale, masks=masks, bias=bias, kv_heads_tiled=kv_heads_tiled, block_n=block_n or 256,
            dropout=dropout,
        )
    _check_triton_head_dim(q)
    # Imported here: Triton decides at decoration time whether kernels run compiled or interpreted.
    from flash_fx.kernels import triton_forward

    block_m, block_n, num_warps, num_stages = _tiles(q, block_m, block_n, backward=False)
    return triton_forward.attention_forward(
        q, k, v, scale=scale, masks=masks, bias=bias, kv_heads_tiled=kv_heads_tiled, block_m=block_m,
        block_n=block_n, num_warps=num_warps, num_stages=num_stages, dropout=dropout,
    )


def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    causal_offset: int | None = None,
    bias: torch.Tensor | None = None,
    bias_requires_grad: bool = False,
    kv_heads_tiled: bool = False,
    window: tuple[int, int] | None = None,
    key_valid: torch.Tensor | None = None,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Returns (dq, dk, dv, dbias); dq, dk, dv have the shapes and dtypes of q, k, v.

    ``out`` and ``lse`` are what :func:`attention_forward` returned for the same arguments (the same
    ``dropout_p``, ``seed`` and ``offset`` included: the keep mask is regenerated from them). ``dbias``
    is None unless ``bias_requires_grad``; then it is the float32 [B, Hq, Nq, Nk] gradient of the
    expanded bias (``P * (dP - delta)``, zero where a key is masked and on fully masked rows).
    """
    _check_inputs(q, k, v)
    bias = _expand_bias(bias, q, k)
    masks = Masks.build(q.shape[0], q.shape[2], k.shape[2], causal_offset=causal_offset, window=window,
                        key_valid=key_valid, q_doc=q_doc, k_doc=k_doc)
    dropout = Dropout.build(dropout_p, seed, offset)
    if q.numel() == 0 or k.numel() == 0:
        dbias = None
        if bias_requires_grad:
            dbias = torch.zeros((*q.shape[:3], k.shape[2]), dtype=torch.float32, device=q.device)
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dbias
    if not uses_triton(q):
        return tiled_torch.attention_backward(
            grad_out, q, k, v, out, lse, scale=scale, masks=masks, bias=bias,
            bias_requires_grad=bias_requires_grad, kv_heads_tiled=kv_heads_tiled, block_n=block_n or 256,
            dropout=dropout,
        )
    _check_triton_head_dim(q)
    from flash_fx.kernels import triton_backward

    block_m, block_n, num_warps, num_stages = _tiles(q, block_m, block_n, backward=True)
    return triton_backward.attention_backward(
        grad_out, q, k, v, out, lse.contiguous(), scale=scale, masks=masks, bias=bias,
        bias_requires_grad=bias_requires_grad, kv_heads_tiled=kv_heads_tiled,
        block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages, dropout=dropout,
    )
