"""The `flash_fx::attention` custom op that rewritten graphs call.

`torch.ops.flash_fx.attention(q, k, v, bias, scale, causal_offset, kv_heads_tiled=False, window=None,
key_valid=None, q_doc=None, k_doc=None, dropout_p=0.0, sparse_bias=False, alibi_slopes=None,
alibi_symmetric=False, rel_bias=None, excluded_fill=None, filled_rows=None, filled_rows_added=False,
score_mod=None, score_mod_factor=None, sinks=None) -> (out, lse, seed)` computes what the
`AttentionSpec` of its arguments stands for (flash_fx.kernels.spec states the contract;
`AttentionSpec.op_args` / `from_op_args` convert). q [Bq, H, Nq, d], k [Bk, Hk, Nk, d] and v [Bv, Hv, Nk, d]
may have any strides; batch sizes of 1 broadcast to the others' B, a k or v with one head to the other's head
count, and a one-head q to the KV heads (as views, without copies). It has a fake implementation (shapes only,
symbolic sizes welcome) and a registered autograd formula whose backward is the `flash_fx::attention_backward`
op, so AOTAutograd and Inductor treat both as opaque kernels. q, k, v, the bias, `rel_bias` and the sinks receive
gradients (the sinks' from PyTorch ops in the autograd formula, kernels.sinks.sink_grad),
summed back over whatever was broadcast; the masks, the ALiBi slopes and the score modification's head factor
none.

Dropout: with `dropout_p > 0` every call draws a fresh seed, `torch.randint(0, 2**31 - 1, (1,))` from the default
generator of q's device, at run time (inside the op, never baked into a graph), so results differ between calls
and are reproducible under `torch.manual_seed`. The seed stays on the device: the kernels read it there, so no
call reads anything on the host for it, and a captured CUDA graph draws a fresh one at each replay, as
PyTorch's own fused dropout does. The third output, that int64 tensor of shape [1] on q's device (0 without
dropout), lets the backward regenerate the same mask (`flash_fx.kernels.dropout_keep_mask(int(seed), 0, B * H,
Nq, Nk, dropout_p)` is that mask). The op is tagged `nondeterministic_seeded`, so graph passes neither
merge nor recompute it.
"""

from __future__ import annotations

import dataclasses

import torch

from flash_fx import exactness, kernels
from flash_fx.kernels.schedule import masked_threshold
from flash_fx.kernels.sinks import sink_grad
from flash_fx.kernels.spec import OP_ARGUMENTS, AttentionSpec, Saved


def _broadcast_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of q, k, v with one batch size, k and v with one head count, and a one-head q against several KV
    heads broadcast to them (size-1 dims expanded, as eager's matmul broadcasts)."""
    batch, kv_heads = max(q.shape[0], k.shape[0], v.shape[0]), max(k.shape[1], v.shape[1])
    heads = kv_heads if q.shape[1] == 1 else q.shape[1]
    if (q.shape[0], q.shape[1], k.shape[0], k.shape[1], v.shape[0], v.shape[1]) == (
            batch, heads, batch, kv_heads, batch, kv_heads):
        return q, k, v
    for name, size, sizes in (("batch", batch, (q.shape[0], k.shape[0], v.shape[0])),
                              ("KV head", kv_heads, (k.shape[1], v.shape[1]))):
        if any(s not in (1, size) for s in sizes):
            raise RuntimeError(f"flash_fx::attention: the {name} sizes {sizes} do not broadcast")
    return q.expand(batch, heads, -1, -1), k.expand(batch, kv_heads, -1, -1), v.expand(batch, kv_heads, -1, -1)


def draw_seed(device: torch.device) -> torch.Tensor:
    """A dropout seed in [0, 2**31 - 1), an int64 tensor [1] drawn on ``device`` by its default generator: on a
    GPU nothing is read on the host, and a captured CUDA graph draws a fresh one at every replay."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


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
    filled_rows: float | None = None,
    filled_rows_added: bool = False,
    score_mod: str | None = None,
    score_mod_factor: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, the row log-sum-exp pairs of the undropped softmax (float32), the dropout seed) of the spec of these
    arguments; each call proves its exclusions exact or records why not (flash_fx.exactness)."""
    q, k, v = _broadcast_qkv(q, k, v)
    seed = draw_seed(q.device) if dropout_p > 0 else torch.zeros(1, dtype=torch.int64, device=q.device)
    spec = AttentionSpec.from_op_args(bias, scale, causal_offset, kv_heads_tiled, window, key_valid, q_doc, k_doc,
                                      dropout_p, sparse_bias, alibi_slopes, alibi_symmetric, rel_bias, excluded_fill,
                                      filled_rows, filled_rows_added, score_mod, score_mod_factor, sinks,
                                      seed=seed if dropout_p > 0 else None)
    spec = _exact_layout(q, k, spec)
    out, lse = kernels.attention_forward(q, k, v, spec)
    exactness.check_call(lse, q, k, spec)
    return out.contiguous(), lse.contiguous(), seed


def is_checked_call(args: tuple, kwargs: dict) -> bool:
    """Whether an op call with these arguments after q, k, v (graph nodes or values) proves its result at run
    time, and so may ask for the original ops (flash_fx.exactness)."""
    return AttentionSpec.from_op_args(*args, **kwargs).is_checked


def _exact_layout(q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec) -> AttentionSpec:
    """``spec`` whose mask bias carries, as a device-side flag, whether skipping its masked tiles is exact on these
    inputs (the forward and the backward decide alike from the same inputs; where it is not, the schedule reads
    those tiles)."""
    bias = spec.bias
    if bias is None or not bias.holds_masks:
        return spec
    exact = exactness.layout_is_exact(q, k, spec, masked_threshold(bias.values.dtype))
    return spec.replace(bias=dataclasses.replace(bias, layout_exact=exact))


@attention.register_fake
def _attention_fake(q, k, v, *args, **kwargs):
    q, k, v = _broadcast_qkv(q, k, v)
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    lse = q.new_empty((*q.shape[:-1], 2), dtype=torch.float32)
    return out, lse, torch.empty(1, dtype=torch.int64, device=q.device)


@torch.library.custom_op("flash_fx::attention_backward", mutates_args=())
def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    seed: torch.Tensor,
    bias_requires_grad: bool,
    rel_bias_requires_grad: bool,
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
    filled_rows: float | None = None,
    filled_rows_added: bool = False,
    score_mod: str | None = None,
    score_mod_factor: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dbias, drel) of `attention` (whose arguments follow the requested gradients), recomputed tile by
    tile from q, k, v and the saved lse; `seed` (the forward's third output) regenerates its dropout mask.

    dq, dk, dv have the broadcast shapes of `_broadcast_qkv`. dbias is the float32 gradient of the bias expanded to
    [B, H, Nq, Nk] if `bias_requires_grad`, else an empty tensor; drel likewise that of `rel_bias` expanded to
    [B, H, Nq + Nk - 1] if `rel_bias_requires_grad`.
    """
    q, k, v = _broadcast_qkv(q, k, v)
    spec = AttentionSpec.from_op_args(bias, scale, causal_offset, kv_heads_tiled, window, key_valid, q_doc, k_doc,
                                      dropout_p, sparse_bias, alibi_slopes, alibi_symmetric, rel_bias, excluded_fill,
                                      filled_rows, filled_rows_added, score_mod, score_mod_factor, sinks,
                                      seed=seed.reshape(1) if dropout_p > 0 else None)
    spec = _exact_layout(q, k, spec).with_grads(bias_requires_grad, rel_bias_requires_grad)
    dq, dk, dv, dbias, drel = kernels.attention_backward(grad_out, Saved(q, k, v, out, lse), spec)
    dbias = q.new_empty(0) if dbias is None else dbias
    drel = q.new_empty(0) if drel is None else drel
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dbias.contiguous(), drel.contiguous()


@attention_backward.register_fake
def _attention_backward_fake(grad_out, q, k, v, out, lse, seed, bias_requires_grad, rel_bias_requires_grad, *args,
                             **kwargs):
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


_BIAS, _REL, _SINKS = OP_ARGUMENTS.index("bias"), OP_ARGUMENTS.index("rel_bias"), OP_ARGUMENTS.index("sinks")


def _setup_context(ctx, inputs, output):
    q, k, v, *arguments = inputs
    out, lse, seed = output
    tensors = [i for i, a in enumerate(arguments) if isinstance(a, torch.Tensor)]
    ctx.save_for_backward(q, k, v, out, lse, seed, *(arguments[i] for i in tensors))
    ctx.tensor_positions = tensors
    ctx.arguments = [None if isinstance(a, torch.Tensor) else a for a in arguments]
    ctx.mark_non_differentiable(lse, seed)


def _backward(ctx, grad_out, _grad_lse, _grad_seed):
    q, k, v, out, lse, seed, *tensors = ctx.saved_tensors
    arguments = list(ctx.arguments)
    for position, tensor in zip(ctx.tensor_positions, tensors, strict=True):
        arguments[position] = tensor
    needs = ctx.needs_input_grad[3:]  # as long as the call's arguments (trailing defaults may be left out)
    bias_requires_grad, rel_requires_grad = needs[_BIAS], len(needs) > _REL and needs[_REL]
    dq, dk, dv, dbias, drel = torch.ops.flash_fx.attention_backward(
        grad_out, q, k, v, out, lse, seed, bias_requires_grad, rel_requires_grad, *arguments)
    # Inputs broadcast in the forward (batch or head dims of size 1) get their gradients summed back.
    grads = [None] * len(needs)
    if bias_requires_grad:
        bias = arguments[_BIAS]
        grads[_BIAS] = dbias.sum_to_size(bias.shape).to(bias.dtype)
    if rel_requires_grad:
        rel_bias = arguments[_REL]
        grads[_REL] = drel.sum_to_size(rel_bias.shape).to(rel_bias.dtype)
    if len(needs) > _SINKS and needs[_SINKS]:
        sinks = arguments[_SINKS]
        dsinks = sink_grad(grad_out, out, lse, sinks.expand(*lse.shape[:3]))
        grads[_SINKS] = dsinks.sum_to_size(sinks.shape).to(sinks.dtype)
    return dq.sum_to_size(q.shape), dk.sum_to_size(k.shape), dv.sum_to_size(v.shape), *grads


attention.register_autograd(_backward, setup_context=_setup_context)


def zero_dead_rows(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """`out` with 0 in the rows that no key reaches (log-sum-exp -inf), as scaled_dot_product_attention and
    nn.MultiheadAttention give them (softmax would give NaN)."""
    return torch.where(lse.narrow(-1, 0, 1) == float("-inf"), 0.0, out)
