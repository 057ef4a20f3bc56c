"""The `flash_fx::attention` custom op that rewritten graphs call.

`torch.ops.flash_fx.attention(q, k, v, bias, scale, causal_offset, kv_heads_tiled=False, window=None,
key_valid=None, q_doc=None, k_doc=None, dropout_p=0.0, sparse_bias=False, alibi_slopes=None,
alibi_symmetric=False, rel_bias=None) -> (out, lse, seed)` takes 4-d
q [Bq, H, Nq, d], k [Bk, Hk, Nk, d] and v [Bv, Hv, Nk, d] (any strides), an optional additive bias
broadcastable to [B, H, Nq, Nk] and the optional structural masks of `flash_fx.kernels` (evaluated from
indices: a `[left, right]` sliding window, bool key validity [B or 1, Nk], integer document ids [B or 1, Nq]
and [B or 1, Nk]), which receive no gradient. Batch sizes of 1 broadcast to the others' B, and a k or v
with one head to the other's head count (as views, without copies); query head h then reads KV head
`h // (H // Hkv)`, or `h % Hkv` with `kv_heads_tiled`. It has a fake implementation (shapes only,
symbolic sizes welcome) and a registered autograd formula whose backward is the
`flash_fx::attention_backward` op, so AOTAutograd and Inductor treat both as opaque kernels. q, k, v
and the bias all receive gradients, summed back over whatever was broadcast. Device dispatch lives in
flash_fx.kernels: Triton on CUDA (and on CPU under TRITON_INTERPRET=1), the tiled PyTorch
implementation of the same algorithm otherwise.

Dropout: with `dropout_p > 0` every call draws a fresh seed, `torch.randint(0, 2**31 - 1, (1,))` from torch's
default CPU generator, at run time (inside the op, never baked into a graph), so results differ between calls
and are reproducible under `torch.manual_seed`. The attention probabilities are dropped inside the kernels
with the counter-based stream of `flash_fx.kernels.dropout` for that seed (offset 0); the third output, the
seed as an int64 CPU tensor of shape [1] (0 without dropout), lets the backward regenerate the same mask
(`flash_fx.kernels.dropout_keep_mask(seed, 0, B * H, Nq, Nk, dropout_p)` is that mask). `sparse_bias=True`
says the bias holds masks (0 visible, -inf or a huge negative fill hidden): the kernels then skip its tiles
that hide every key and read no bias in tiles that hide none (flash_fx.kernels.layout). `alibi_slopes` (float
[B or 1, H or 1]) adds `slope * (j - i)` to the scores, or `-slope * |j - i|` with `alibi_symmetric`, computed
in the kernels from indices. `rel_bias` (float [B or 1, H or 1, Nq + Nk - 1], with gradient) adds `rel_bias[b,
h, j - i + Nq - 1]`: a learned relative-position bias (T5) read per relative position. The op is tagged
`nondeterministic_seeded`, so graph passes neither merge nor recompute it.
"""

from __future__ import annotations

import torch

from flash_fx import exactness, kernels
from flash_fx.kernels.layout import masked_threshold
from flash_fx.kernels.masks import AttentionInputError


def _broadcast_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of q, k, v with one batch size, k and v with one head count, and a one-head q against several KV
    heads broadcast to them (size-1 dims expanded, as eager's matmul broadcasts)."""
    batch = torch.broadcast_shapes(q.shape[:1], k.shape[:1], v.shape[:1])[0]
    kv_heads = torch.broadcast_shapes(k.shape[1:2], v.shape[1:2])[0]
    heads = kv_heads if q.shape[1] == 1 else q.shape[1]
    return q.expand(batch, heads, -1, -1), k.expand(batch, kv_heads, -1, -1), v.expand(batch, kv_heads, -1, -1)


def draw_seed() -> int:
    """A dropout seed in [0, 2**31 - 1) from torch's default CPU generator."""
    return int(torch.randint(0, 2**31 - 1, (1,), device="cpu"))


@torch.library.custom_op("flash_fx::attention", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    causal_offset: int | None,
    kv_heads_tiled: bool = False,
    window: list[int] | None = None,
    key_valid: torch.Tensor | None = None,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    sparse_bias: bool = False,
    alibi_slopes: torch.Tensor | None = None,
    alibi_symmetric: bool = False,
    rel_bias: torch.Tensor | None = None,
    excluded_fill: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dropout(softmax(q @ k^T * scale + bias, masks), dropout_p) @ v, the row log-sum-exp (float32) of the
    undropped softmax, and the dropout seed (int64 [1] on the CPU; 0 without dropout) for the backward.

    `excluded_fill`: the largest finite value eager gives an entry the masks exclude (None: only -inf fills);
    each call proves its exclusions exact or records why not (flash_fx.exactness)."""
    q, k, v = _broadcast_qkv(q, k, v)
    seed = draw_seed() if dropout_p > 0 else 0
    sparse_bias = _layout_is_exact(q, k, scale, bias, sparse_bias, alibi_slopes, rel_bias)
    out, lse = kernels.attention_forward(
        q, k, v, scale=scale, causal_offset=causal_offset, bias=bias, kv_heads_tiled=kv_heads_tiled,
        window=_window(window), key_valid=key_valid, q_doc=q_doc, k_doc=k_doc, dropout_p=dropout_p, seed=seed,
        sparse_bias=sparse_bias, alibi_slopes=alibi_slopes, alibi_symmetric=alibi_symmetric, rel_bias=rel_bias,
    )
    exactness.check_call(lse, q, k, scale, bias, excluded_fill, alibi_slopes, rel_bias,
                         _replaces_scores(causal_offset, window, key_valid, q_doc))
    return out.contiguous(), lse.contiguous(), torch.tensor([seed], dtype=torch.int64)


def _replaces_scores(causal_offset: int | None, window: list[int] | None, key_valid: torch.Tensor | None,
                     q_doc: torch.Tensor | None) -> bool:
    """Whether a call has structural masks (which replace the scores they hide, -inf or a finite fill)."""
    return causal_offset is not None or window is not None or key_valid is not None or q_doc is not None


def is_checked_call(bias: object, causal_offset: int | None, window: list[int] | None = None,
                    key_valid: object = None, q_doc: object = None, excluded_fill: float | None = None) -> bool:
    """Whether a call with these arguments (graph nodes or values) proves its result at run time, and so may ask
    for the original ops (flash_fx.exactness)."""
    return exactness.is_checked(excluded_fill, bias is not None,
                                _replaces_scores(causal_offset, window, key_valid, q_doc))


def _layout_is_exact(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None, sparse_bias: bool,
                     alibi_slopes: torch.Tensor | None, rel_bias: torch.Tensor | None) -> bool:
    """Whether this call skips the bias's empty tiles: asked for, and exact on these inputs (else the dense bias
    pass runs; the forward and the backward decide alike from the same inputs)."""
    if not sparse_bias or bias is None:
        return False
    return exactness.layout_is_exact(q, k, scale, bias, alibi_slopes, rel_bias, masked_threshold(bias.dtype))


def _window(window: list[int] | None) -> tuple[int, int] | None:
    """The op's `[left, right]` window list as the kernels' tuple."""
    if window is None:
        return None
    if len(window) != 2:
        raise AttentionInputError(f"window must be [left, right], got {window}")
    return window[0], window[1]


@attention.register_fake
def _attention_fake(q, k, v, bias, scale, causal_offset, kv_heads_tiled=False, window=None, key_valid=None,
                    q_doc=None, k_doc=None, dropout_p=0.0, sparse_bias=False, alibi_slopes=None,
                    alibi_symmetric=False, rel_bias=None, excluded_fill=None):
    q, k, v = _broadcast_qkv(q, k, v)
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    lse = q.new_empty((*q.shape[:-1], 2), dtype=torch.float32)
    return out, lse, torch.empty(1, dtype=torch.int64, device="cpu")


@torch.library.custom_op("flash_fx::attention_backward", mutates_args=())
def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    causal_offset: int | None,
    bias_requires_grad: bool,
    kv_heads_tiled: bool = False,
    window: list[int] | None = None,
    key_valid: torch.Tensor | None = None,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    sparse_bias: bool = False,
    alibi_slopes: torch.Tensor | None = None,
    alibi_symmetric: bool = False,
    rel_bias: torch.Tensor | None = None,
    rel_bias_requires_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dbias, drel) of `attention`, recomputed tile by tile from q, k, v and the saved lse.

    `dropout_p` and `seed` (the forward's third output) regenerate the forward's dropout mask.
    dq, dk, dv have the broadcast shapes of `_broadcast_qkv`. dbias is the float32 gradient of the bias
    expanded to [B, H, Nq, Nk] if `bias_requires_grad`, else an empty tensor; drel likewise that of `rel_bias`
    expanded to [B, H, Nq + Nk - 1] if `rel_bias_requires_grad`.
    """
    q, k, v = _broadcast_qkv(q, k, v)
    sparse_bias = _layout_is_exact(q, k, scale, bias, sparse_bias, alibi_slopes, rel_bias)
    dq, dk, dv, dbias, drel = kernels.attention_backward(
        grad_out, q, k, v, out, lse, scale=scale, causal_offset=causal_offset, bias=bias,
        bias_requires_grad=bias_requires_grad, kv_heads_tiled=kv_heads_tiled, window=_window(window),
        key_valid=key_valid, q_doc=q_doc, k_doc=k_doc, dropout_p=dropout_p,
        seed=None if seed is None else int(seed.reshape(-1)[0]), sparse_bias=sparse_bias, alibi_slopes=alibi_slopes,
        alibi_symmetric=alibi_symmetric, rel_bias=rel_bias, rel_bias_requires_grad=rel_bias_requires_grad,
    )
    dbias = q.new_empty(0) if dbias is None else dbias
    drel = q.new_empty(0) if drel is None else drel
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dbias.contiguous(), drel.contiguous()


@attention_backward.register_fake
def _attention_backward_fake(
    grad_out, q, k, v, out, lse, bias, scale, causal_offset, bias_requires_grad, kv_heads_tiled=False, window=None,
    key_valid=None, q_doc=None, k_doc=None, dropout_p=0.0, seed=None, sparse_bias=False, alibi_slopes=None,
    alibi_symmetric=False, rel_bias=None, rel_bias_requires_grad=False,
):
    q, k, v = _broadcast_qkv(q, k, v)
    if bias_requires_grad:
        dbias = q.new_empty((*q.shape[:3], k.shape[2]), dtype=torch.float32)
    else:
        dbias = q.new_empty(0)
    if rel_bias_requires_grad:
        drel = q.new_empty((*q.shape[:2], q.shape[2] + k.shape[2] - 1), dtype=torch.float32)
    else:
        drel = q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias, drel


def _setup_context(ctx, inputs, output):
    q, k, v, bias, scale, causal_offset, kv_heads_tiled, window, key_valid, q_doc, k_doc, dropout_p = inputs[:12]
    sparse_bias, alibi_slopes, alibi_symmetric, rel_bias = inputs[12:16]
    out, lse, seed = output
    ctx.save_for_backward(q, k, v, out, lse, bias, key_valid, q_doc, k_doc, seed, alibi_slopes, rel_bias)
    ctx.scale, ctx.causal_offset, ctx.kv_heads_tiled, ctx.window = scale, causal_offset, kv_heads_tiled, window
    ctx.dropout_p, ctx.sparse_bias, ctx.alibi_symmetric = dropout_p, sparse_bias, alibi_symmetric
    ctx.mark_non_differentiable(lse, seed)


def _backward(ctx, grad_out, _grad_lse, _grad_seed):
    q, k, v, out, lse, bias, key_valid, q_doc, k_doc, seed, alibi_slopes, rel_bias = ctx.saved_tensors
    needs = ctx.needs_input_grad  # as long as the call's arguments (trailing defaults may be left out)
    bias_requires_grad, rel_bias_requires_grad = needs[3], len(needs) > 15 and needs[15]
    dq, dk, dv, dbias, drel = torch.ops.flash_fx.attention_backward(
        grad_out, q, k, v, out, lse, bias, ctx.scale, ctx.causal_offset, bias_requires_grad, ctx.kv_heads_tiled,
        ctx.window, key_valid, q_doc, k_doc, ctx.dropout_p, seed, ctx.sparse_bias, alibi_slopes, ctx.alibi_symmetric,
        rel_bias, rel_bias_requires_grad,
    )
    # Inputs broadcast in the forward (batch or head dims of size 1) get their gradients summed back.
    dq, dk, dv = dq.sum_to_size(q.shape), dk.sum_to_size(k.shape), dv.sum_to_size(v.shape)
    dbias = dbias.sum_to_size(bias.shape).to(bias.dtype) if bias_requires_grad else None
    drel = drel.sum_to_size(rel_bias.shape).to(rel_bias.dtype) if rel_bias_requires_grad else None
    # The masks (window, key_valid, q_doc, k_doc), dropout_p, sparse_bias and the ALiBi slopes get no gradient.
    return dq, dk, dv, dbias, None, None, None, None, None, None, None, None, None, None, None, drel, None


attention.register_autograd(_backward, setup_context=_setup_context)


def zero_dead_rows(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """`out` with 0 in the rows that no key reaches (log-sum-exp -inf), as scaled_dot_product_attention and
    nn.MultiheadAttention give them (softmax would give NaN)."""
    return torch.where(lse.narrow(-1, 0, 1) == float("-inf"), 0.0, out)
