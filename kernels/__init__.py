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

ALiBi (``alibi_slopes``, float [B or 1, Hq or 1]) adds ``slope[b, h] * (j - i)`` to the scores of query i
and key j (0-based), or ``slope[b, h] * -|j - i|`` with ``alibi_symmetric=True``, computed from indices inside
the kernels (no N x N tensor; see :class:`flash_fx.kernels.masks.Alibi`). It combines with the bias, the
masks, dropout, ``sparse_bias`` and both GQA mappings; the slopes get no gradient, and ``dbias`` stays the
gradient of the bias alone. The backward must get the forward's slopes.

A relative-position bias (``rel_bias``, float [B or 1, Hq or 1, Nq + Nk - 1], any float dtype, read as float32)
adds ``rel_bias[b, h, j - i + Nq - 1]`` to the scores of query i and key j (0-based): a bias that depends only on
(head, j - i), such as T5's learned bucketed relative positions looked up at every relative position
``-(Nq - 1) .. Nk - 1``. It is gathered inside the kernels (no N x N tensor; see
:class:`flash_fx.kernels.masks.RelativeBias`), in natural units like the bias, and combines with everything
above. The backward must get the forward's vector; with ``rel_bias_requires_grad`` it also returns the float32
[B, Hq, Nq + Nk - 1] gradient of the expanded vector, ``drel[b, h, r]`` = the sum of dS over the (i, j) with
``j - i + Nq - 1 = r`` (the caller sums it down to its own shape). The Triton dQ kernel accumulates it with
float32 atomics, so its last bits vary from run to run; the tiled path is deterministic.

Dropout (``dropout_p > 0``) drops attention probabilities inside the kernels, as FlashAttention does:
``out = (softmax(scores) * keep / (1 - p)) @ v`` with the normalization of the undropped softmax (what
eager ``F.dropout(F.softmax(s, -1), p) @ v`` computes). The keep mask is never stored: it is a pure
function of ``(seed, offset, b * Hq + h, i, j)`` (a counter hash, see :mod:`flash_fx.kernels.dropout`),
generated on chip in the forward and regenerated identically by the backward, which must get the same
``dropout_p``, ``seed`` and ``offset``. The tiled PyTorch path uses the same generator, so both paths
drop the same elements; :func:`dropout_keep_mask` materializes the mask. ``dropout_p == 0`` compiles
kernels without any dropout code.

Block-sparse bias (``sparse_bias=True``): the bias comes from a mask, 0 where a key is visible and ``-inf``
or a huge negative fill (such as ``finfo.min``) where it is hidden. The kernels then sort the tiles they
use (forward tiles in the forward, backward tiles in the backward) into empty, partial and full ones with
:func:`flash_fx.kernels.layout.bias_layout` (the causal/window band folded in) and visit only the
non-empty ones: partial tiles with the bias and the band mask, full ones with neither (no bias read). Key
padding, documents and dropout still apply in every visited tile. The results equal those of the dense
path to rounding, fully masked rows included; the work falls with the layout's density. It needs a
``bias`` (a ValueError otherwise). The tiled PyTorch path then walks (query tile, key tile) pairs of
``block_m`` x ``block_n`` (128 x 128 unless given; ``block_m`` defaults to ``block_n``) instead of whole
key columns.

Launch configurations (tile sizes, warps, stages) come from :func:`config.choose_tiles`, a table per GPU compute
capability. With autotuning on (``FLASH_FX_AUTOTUNE=1`` for CUDA tensors, or :func:`set_autotune`) and no
``block_m`` / ``block_n`` given, the first call of each :class:`tuning.TuneKey` times a few candidates around the
table's entry and later calls use the fastest; :func:`tuned_configs` lists the choices and their times.

If a Triton kernel fails to compile or launch on this machine (an error raised by Triton), the entry point warns
once for that configuration (entry, dtype, head dim, features) and runs it on the tiled PyTorch path from then on
(:func:`triton_failures` lists them); results are the same, and other configurations keep the Triton kernels.

Fully masked rows give a NaN output row and LSE -inf, as eager softmax does after a ``-inf`` fill;
in the backward they contribute no gradient (their dq and dbias rows are 0). Rows hidden entirely by a finite
fill (finfo.min) are eager's uniform average over their keys, forward and backward: the saved LSE is a pair
(rounded value, rounding residual), so their normalizer survives the rounding of ``fill + log(n)`` to ``fill``.
"""

from __future__ import annotations

import contextvars
import functools
import os
import warnings
from collections.abc import Callable

import torch
from flash_fx.kernels import config, tiled_torch, tuning
from flash_fx.kernels.config import Tiles
from flash_fx.kernels.dropout import Dropout, dropout_keep_mask
from flash_fx.kernels.layout import bias_layout
from flash_fx.kernels.masks import Alibi, AttentionInputError, Masks, RelativeBias, tile_density
from flash_fx.kernels.tuning import set_autotune, tuned_configs

__all__ = ["AttentionInputError", "attention_backward", "attention_forward", "dropout_keep_mask", "set_autotune",
           "tile_density", "triton_failure", "triton_failures", "tuned_configs", "uses_triton"]

_TRITON_FAILURES: dict[tuple, str] = {}  # configuration (see _configuration) -> why its Triton kernels failed
_FORCED_TILED = contextvars.ContextVar("flash_fx_forced_tiled", default=False)


def uses_triton(t: torch.Tensor) -> bool:
    """True if attention on ``t`` runs the Triton kernels: CUDA tensors, or CPU ones with TRITON_INTERPRET=1,
    unless the call's configuration failed in Triton before in this process (see :func:`triton_failures`)."""
    on_device = t.is_cuda or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    return on_device and not _FORCED_TILED.get()


def triton_failures() -> dict[tuple, str]:
    """The configurations whose Triton kernels failed in this process, and why (their errors)."""
    return dict(_TRITON_FAILURES)


def triton_failure() -> str | None:
    """Why a Triton kernel first failed in this process, or None while none has."""
    return next(iter(_TRITON_FAILURES.values()), None)


def _configuration(entry: Callable, args: tuple, kwargs: dict) -> tuple:
    """What selects a compiled Triton kernel: the entry, the dtype, the head dim and the features given."""
    q = args[1] if entry.__name__ == "attention_backward" else args[0]
    features = tuple(sorted(name for name, value in kwargs.items() if name != "scale" and value is not None
                            and not (isinstance(value, bool | int | float) and not value)))
    return entry.__name__, str(q.dtype), q.shape[-1], q.device.type, features


def _falls_back_to_tiled(entry: Callable) -> Callable:
    """Run ``entry``; if a Triton kernel fails to compile or launch (an error raised by Triton itself: an old GPU
    architecture, too little shared memory, a Triton version the kernels do not support), warn once for that
    configuration and run it, then and later, on the tiled PyTorch path: the same algorithm and semantics
    (dropout stream included), in PyTorch ops. Other configurations keep the Triton kernels."""

    def tiled(*args, **kwargs):
        token = _FORCED_TILED.set(True)
        try:
            return entry(*args, **kwargs)
        finally:
            _FORCED_TILED.reset(token)

    @functools.wraps(entry)
    def run(*args, **kwargs):
        key = _configuration(entry, args, kwargs)
        if key in _TRITON_FAILURES:
            return tiled(*args, **kwargs)
        try:
            return entry(*args, **kwargs)
        except Exception as error:
            if _FORCED_TILED.get() or not tuning.is_triton_error(error):
                raise
            _TRITON_FAILURES[key] = f"{type(error).__name__}: {error}"[:500]
            warnings.warn(f"flash_fx: the Triton attention kernels failed ({_TRITON_FAILURES[key]}) for {key}; "
                          "this configuration runs the tiled PyTorch implementation of the same algorithm from now "
                          "on", stacklevel=2)
            return tiled(*args, **kwargs)

    return run


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise AttentionInputError(f"expected 4-d q, k, v; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise AttentionInputError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise AttentionInputError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")


def _expand_bias(bias: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """The bias as a (zero-stride where broadcast) [B, Hq, Nq, Nk] view."""
    if bias is None:
        return None
    return bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


@functools.lru_cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _cost_flags(q: torch.Tensor, k: torch.Tensor, masks: Masks, bias: torch.Tensor | None, sparse_bias: bool,
                dropout: Dropout, alibi: Alibi | None, rel: RelativeBias | None) -> dict[str, bool]:
    """The specialization flags of a call that change the kernels' cost (part of :class:`tuning.TuneKey`)."""
    return dict(causal=masks.causal_offset is not None, window=masks.window is not None, sparse=sparse_bias,
                bias=bias is not None, dropout=dropout.enabled, gqa=q.shape[1] != k.shape[1],
                key_padding=masks.key_valid is not None, documents=masks.q_doc is not None, alibi=alibi is not None,
                rel=rel is not None)


def _launch_tiles(q: torch.Tensor, k: torch.Tensor, block_m: int | None, block_n: int | None,
                  run: Callable[[Tiles], object], *, backward: bool, **flags: bool) -> Tiles:
    """The launch configuration: the table's for this card, with the caller's block sizes if given; with
    autotuning on and no block size given, the fastest candidate for the call's :class:`tuning.TuneKey`."""
    capability = _capability(q.device) if q.is_cuda else None
    head_dim, on_gpu = q.shape[-1], q.is_cuda
    if block_m is None and block_n is None and tuning.autotune_enabled(q.device):
        key = tuning.TuneKey(backward, capability, head_dim, str(q.dtype).removeprefix("torch."),
                             tuning.bucket(q.shape[2]), tuning.bucket(k.shape[2]), **flags)
        found = tuning.candidates(head_dim, q.dtype, capability, backward=backward, on_gpu=on_gpu)
        return tuning.tune(key, found, run, q.device)
    tiles = config.choose_tiles(head_dim, q.dtype, on_gpu, backward=backward, capability=capability)
    return tiles._replace(block_m=block_m or tiles.block_m, block_n=block_n or tiles.block_n)


def _check_sparse_bias(sparse_bias: bool, bias: torch.Tensor | None) -> None:
    if sparse_bias and bias is None:
        raise AttentionInputError("sparse_bias=True needs a bias (the mask whose empty tiles are skipped)")


def _tiled_blocks(block_m: int | None, block_n: int | None, sparse_bias: bool) -> tuple[int, int]:
    """Tile sizes of the tiled PyTorch path: key columns of 256, or 128 x 128 tile pairs with a sparse bias."""
    if not sparse_bias:
        return block_m or 0, block_n or 256
    block_n = block_n or 128
    return block_m or block_n, block_n


def _check_triton_head_dim(q: torch.Tensor) -> None:
    if q.shape[-1] > config.MAX_HEAD_DIM:
        raise AttentionInputError(f"the Triton kernels support head dims up to {config.MAX_HEAD_DIM}, "
                                  f"got {q.shape[-1]}")


@_falls_back_to_tiled
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
    sparse_bias: bool = False,
    alibi_slopes: torch.Tensor | None = None,
    alibi_symmetric: bool = False,
    rel_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out [B,Hq,Nq,D] in q.dtype, lse [B,Hq,Nq,2] float32).

    ``lse[..., 0] + lse[..., 1]`` is each row's natural-log log-sum-exp as an unevaluated sum: ``lse[..., 0]`` is
    the rounded float32 value and ``lse[..., 1]`` what rounding lost, which keeps the normalizer of a row hidden
    entirely by a finite fill (finfo.min), whose log-sum-exp ``fill + log(n)`` rounds to ``fill`` in float32.

    ``block_m`` / ``block_n`` override the tile sizes (the tiled PyTorch path uses only ``block_n``, and
    ``block_m`` too with ``sparse_bias``). ``sparse_bias`` skips the tiles a mask-like ``bias`` hides
    entirely (see the module docstring).
    ``dropout_p`` in [0, 1) drops probabilities with the stream of ``seed`` (in [0, 2**31), required when
    ``dropout_p > 0``) and ``offset`` (>= 0); the LSE is that of the undropped softmax.
    ``alibi_slopes`` (float [B or 1, Hq or 1], a ValueError otherwise) adds ``slope * (j - i)`` to the scores,
    ``slope * -|j - i|`` with ``alibi_symmetric`` (ignored without slopes).
    ``rel_bias`` (float [B or 1, Hq or 1, Nq + Nk - 1], a ValueError otherwise) adds ``rel_bias[b, h, j - i + Nq - 1]``.
    With no keys (Nk == 0) the output is zeros and the LSE -inf (pairs (-inf, 0)), as eager ``softmax(...) @ v``
    gives.
    """
    _check_inputs(q, k, v)
    _check_sparse_bias(sparse_bias, bias)
    bias = _expand_bias(bias, q, k)
    masks = Masks.build(q.shape[0], q.shape[2], k.shape[2], causal_offset=causal_offset, window=window,
                        key_valid=key_valid, q_doc=q_doc, k_doc=k_doc)
    dropout = Dropout.build(dropout_p, seed, offset)
    alibi = Alibi.build(alibi_slopes, alibi_symmetric, q.shape[0], q.shape[1], q.device)
    rel = RelativeBias.build(rel_bias, q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.device)
    n_k = k.shape[2]
    if q.numel() == 0 or n_k == 0:
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.zeros((*q.shape[:3], 2), dtype=torch.float32, device=q.device)
        lse[..., 0] = float("-inf")
        return out, lse
    if not uses_triton(q):
        block_m, block_n = _tiled_blocks(block_m, block_n, sparse_bias)
        layout = bias_layout(bias, masks, block_m, block_n) if sparse_bias else None
        return tiled_torch.attention_forward(
            q, k, v, scale=scale, masks=masks, bias=bias, kv_heads_tiled=kv_heads_tiled, block_n=block_n,
            dropout=dropout, layout=layout, alibi=alibi, rel=rel,
        )
    _check_triton_head_dim(q)
    # Imported here: Triton decides at decoration time whether kernels run compiled or interpreted.
    from flash_fx.kernels import triton_forward

    def run(tiles: Tiles) -> tuple[torch.Tensor, torch.Tensor]:
        layout = bias_layout(bias, masks, tiles.block_m, tiles.block_n) if sparse_bias else None
        return triton_forward.attention_forward(
            q, k, v, scale=scale, masks=masks, bias=bias, kv_heads_tiled=kv_heads_tiled, dropout=dropout,
            layout=layout, alibi=alibi, rel=rel, **tiles._asdict(),
        )

    flags = _cost_flags(q, k, masks, bias, sparse_bias, dropout, alibi, rel)
    return run(_launch_tiles(q, k, block_m, block_n, run, backward=False, **flags))


@_falls_back_to_tiled
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
    sparse_bias: bool = False,
    alibi_slopes: torch.Tensor | None = None,
    alibi_symmetric: bool = False,
    rel_bias: torch.Tensor | None = None,
    rel_bias_requires_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Returns (dq, dk, dv, dbias, drel); dq, dk, dv have the shapes and dtypes of q, k, v.

    ``out`` and ``lse`` are what :func:`attention_forward` returned for the same arguments (the same
    ``dropout_p``, ``seed`` and ``offset`` included: the keep mask is regenerated from them). With
    ``sparse_bias`` the backward builds the layout of its own tiles and skips their empty ones (dbias is 0
    there). ``alibi_slopes``, ``alibi_symmetric`` and ``rel_bias`` must be the forward's. ``dbias``
    is None unless ``bias_requires_grad``; then it is the float32 [B, Hq, Nq, Nk] gradient of the
    expanded bias (``P * (dP - delta)``, zero where a key is masked and on fully masked rows). ``drel`` is None
    unless ``rel_bias_requires_grad`` (a ValueError without ``rel_bias``); then it is the float32
    [B, Hq, Nq + Nk - 1] gradient of the expanded ``rel_bias``: entry r sums ``P * (dP - delta)`` over the pairs
    with ``j - i + Nq - 1 = r`` (in the Triton kernels with float32 atomics: not bitwise deterministic).
    """
    _check_inputs(q, k, v)
    if tuple(lse.shape) != (*q.shape[:3], 2):
        raise AttentionInputError(f"lse must be the forward's [B, Hq, Nq, 2] log-sum-exp pairs "
                                  f"{(*q.shape[:3], 2)}, got {tuple(lse.shape)}")
    _check_sparse_bias(sparse_bias, bias)
    bias = _expand_bias(bias, q, k)
    masks = Masks.build(q.shape[0], q.shape[2], k.shape[2], causal_offset=causal_offset, window=window,
                        key_valid=key_valid, q_doc=q_doc, k_doc=k_doc)
    dropout = Dropout.build(dropout_p, seed, offset)
    alibi = Alibi.build(alibi_slopes, alibi_symmetric, q.shape[0], q.shape[1], q.device)
    rel = RelativeBias.build(rel_bias, q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.device)
    if rel_bias_requires_grad and rel is None:
        raise AttentionInputError("rel_bias_requires_grad=True needs a rel_bias")
    if q.numel() == 0 or k.numel() == 0:
        dbias = drel = None
        if bias_requires_grad:
            dbias = torch.zeros((*q.shape[:3], k.shape[2]), dtype=torch.float32, device=q.device)
        if rel_bias_requires_grad:
            drel = torch.zeros(rel.values.shape, dtype=torch.float32, device=q.device)
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dbias, drel
    if not uses_triton(q):
        block_m, block_n = _tiled_blocks(block_m, block_n, sparse_bias)
        layout = bias_layout(bias, masks, block_m, block_n) if sparse_bias else None
        return tiled_torch.attention_backward(
            grad_out, q, k, v, out, lse, scale=scale, masks=masks, bias=bias,
            bias_requires_grad=bias_requires_grad, kv_heads_tiled=kv_heads_tiled, block_n=block_n,
            dropout=dropout, layout=layout, alibi=alibi, rel=rel, rel_requires_grad=rel_bias_requires_grad,
        )
    _check_triton_head_dim(q)
    from flash_fx.kernels import triton_backward

    lse = lse.contiguous()

    def run(tiles: Tiles) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None,
                                   torch.Tensor | None]:
        layout = bias_layout(bias, masks, tiles.block_m, tiles.block_n) if sparse_bias else None
        return triton_backward.attention_backward(
            grad_out, q, k, v, out, lse, scale=scale, masks=masks, bias=bias, bias_requires_grad=bias_requires_grad,
            kv_heads_tiled=kv_heads_tiled, dropout=dropout, layout=layout, alibi=alibi, rel=rel,
            rel_requires_grad=rel_bias_requires_grad, **tiles._asdict(),
        )

    flags = _cost_flags(q, k, masks, bias, sparse_bias, dropout, alibi, rel)
    return run(_launch_tiles(q, k, block_m, block_n, run, backward=True, bias_grad=bias_requires_grad,
                             rel_grad=rel_bias_requires_grad, **flags))
