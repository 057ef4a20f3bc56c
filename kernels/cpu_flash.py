"""The CPU path through PyTorch's own C++ flash kernel, for the specs it can serve exactly.

``aten._scaled_dot_product_flash_attention_for_cpu`` (and its backward) computes dense or top-left causal
attention, optionally with an additive mask, and returns the row log-sum-exp. A spec's attention is a few such
calls over disjoint key ranges of a block of query rows, merged by their log-sum-exps (exact):

- a band with only an upper bound (causal with any offset, bottom-right included) is at most two calls for all
  rows: keys ``[0, u)``, visible to every row that sees a key (dense), and keys ``[u, u + Nq)``, visible to row i
  up to ``u + i`` (top-left causal on that chunk);
- anything else structural (a window's lower bound, key validity, documents) follows the tile schedule
  (:mod:`schedule`) per block of query rows: runs of full tiles are dense calls, runs of partial tiles calls with
  the 0 / -inf mask of that chunk; empty tiles are not read;
- with a bias (a mask bias included), one call per block of query rows over the keys from the first to the last
  tile the schedule visits, with the bias chunk (float32) as the mask and -inf where structural masks hide: a
  row's whole softmax in one call, so a row that large finite values hide entirely is eager's uniform average.

The C++ kernel gives a row that its mask hides entirely an output of 0 and a log-sum-exp of 0, not -inf: such rows
of a chunk are found from the mask and get -inf before merging. Rows that see no key at all give NaN and an LSE
of -inf, as the contract says (flash_fx.kernels.spec). GQA packs the query heads sharing a KV head into the rows of one
call for short queries (decode steps; :func:`_calls`), else runs one call per member of each KV head's query group
on views of q; K and V are never copied. The backward calls the C++ backward per chunk with the whole rows' output and
log-sum-exp (+inf for rows without keys, so they pass no gradient), so each chunk's probabilities and ``delta`` are
the full softmax's, and sums the chunks' gradients.

Served: no ALiBi, relative table, dropout (its stream is flash_fx's own) or bias that needs a gradient (the C++
backward returns none): :func:`serves` says so, and the tiled PyTorch path runs the rest. The C++ backward takes a
float32 log-sum-exp, without the residual the spec's pairs keep: a call whose log-sum-exps reach beyond
:data:`LARGE_LSE` (rows hidden entirely by large finite values) runs on the tiled path instead
(:func:`keeps_precision`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from flash_fx.kernels.schedule import EMPTY, FULL, PARTIAL, schedule
from flash_fx.kernels.spec import AttentionSpec, Saved, group_heads, ungroup_heads

__all__ = ["attention_backward", "attention_forward", "serves"]

_FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
BLOCK = 256  # query rows per step, and the key tiles of the schedule a structural spec is split by
LARGE_LSE = 2.0**12  # a log-sum-exp beyond this lost the log of its row's count to rounding (see keeps_precision)


def serves(spec: AttentionSpec, q: torch.Tensor) -> bool:
    """Whether this path computes a validated ``spec`` on CPU tensors like ``q`` (see the module docstring)."""
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and not (spec.bias is not None and spec.bias.requires_grad) and spec.alibi is None
            and spec.relative is None and not spec.dropout.enabled and spec.score_mod is None)


def keeps_precision(lse: torch.Tensor) -> bool:
    """Whether float32 log-sum-exps ``lse`` [..., 2] (hi, lo) are exact enough for the C++ backward, which takes
    the rounded value alone: no finite one is far beyond the scores' scale (a row hidden entirely by a large
    finite value, whose ``fill + log(n)`` rounds to the fill)."""
    low, high = lse[..., 0].aminmax()
    if low.item() >= -LARGE_LSE and high.item() <= LARGE_LSE:  # one reduction in the common case
        return True
    total = lse[..., 0]
    return not bool(((total.abs() > LARGE_LSE) & total.isfinite()).any())


class Part(NamedTuple):
    """One C++ call of a step: keys ``[start, stop)``, top-left causal or not, with an additive mask or not (built
    when the step runs, :func:`_mask`, so one step's masks live at a time)."""

    start: int
    stop: int
    causal: bool = False
    masked: bool = False


class Step(NamedTuple):
    """A block of query rows of some batch rows and the calls that cover the keys they see."""

    batch: slice
    rows: slice
    parts: list[Part]


def _steps(spec: AttentionSpec, batch: int, n_q: int, n_k: int) -> list[Step]:
    """The calls a validated spec is made of (see the module docstring)."""
    band = spec.band
    if band.lower is None and spec.key_valid is None and spec.documents is None and spec.bias is None:
        return _band_steps(band.upper, batch, n_q, n_k)
    classes = schedule(spec, n_q, n_k, BLOCK, BLOCK).classes  # [SB, SH, Tq, Tk]
    per_batch = classes.shape[0] > 1
    steps = []
    for b in range(classes.shape[0]):
        batch_rows = slice(b, b + 1) if per_batch else slice(0, batch)
        for tile in range(classes.shape[2]):
            rows = slice(tile * BLOCK, min(n_q, (tile + 1) * BLOCK))
            tiles = classes[b, :, tile]  # [SH, Tk]

            def part(start: int, stop: int, masked: bool) -> Part:
                return Part(start * BLOCK, min(n_k, stop * BLOCK), masked=masked)

            if spec.bias is None:  # structural masks only: no head varies
                parts = [part(start, stop, False) for start, stop in _runs(tiles[0] == FULL)]
                parts += [part(start, stop, True) for start, stop in _runs(tiles[0] == PARTIAL)]
            else:  # one call over the keys any head visits: a row's whole softmax in one call, never merged
                visited = (tiles != EMPTY).any(0).nonzero()
                parts = [part(int(visited[0]), int(visited[-1]) + 1, True)] if len(visited) else []
            if parts:
                steps.append(Step(batch_rows, rows, parts))
    return steps


Mask = tuple[torch.Tensor, torch.Tensor] | tuple[None, None]


def _mask(spec: AttentionSpec, step: Step, part: Part, dtype: torch.dtype) -> Mask:
    """``(mask, alive)`` of a part: the additive mask [batch rows, heads or 1, rows, keys] (the bias chunk, float32,
    where the structural masks let attend and -inf elsewhere, or without a bias 0 / -inf in q's ``dtype``) and the
    rows it leaves a key; ``(None, None)`` for an unmasked part."""
    if not part.masked:
        return None, None
    batch_rows, rows, cols = step.batch, step.rows, slice(part.start, part.stop)
    visible = spec.visible(torch.arange(rows.start, rows.stop), torch.arange(cols.start, cols.stop))
    if visible is not None:
        visible = (visible[batch_rows] if visible.shape[0] > 1 else visible)[:, None]
    if spec.bias is None:
        mask = torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, float("-inf"))
    else:
        values = _broadcast_dims_kept(spec.bias.values)
        values = values[batch_rows] if values.shape[0] > 1 else values
        mask = values[:, :, rows, cols].float()
        mask = mask if visible is None else mask.masked_fill(~visible, float("-inf"))
    return mask, ~(mask == float("-inf")).all(-1)


def _broadcast_dims_kept(values: torch.Tensor) -> torch.Tensor:
    """A [B, H, Nq, Nk] view whose broadcast batch and head dims (stride 0) are narrowed to size 1."""
    for dim in (0, 1):
        if values.stride(dim) == 0:
            values = values.narrow(dim, 0, 1)
    return values


def _band_steps(upper: int | None, batch: int, n_q: int, n_k: int) -> list[Step]:
    """At most two calls for all rows that see a key under a band with only an upper bound."""
    if upper is None:
        return [Step(slice(0, batch), slice(0, n_q), [Part(0, n_k)])]
    first_row = max(0, -upper)
    if n_q - first_row == 1:  # one row (a decode step): one dense call over the keys it sees
        stop = min(n_k, upper + n_q)
        return [Step(slice(0, batch), slice(first_row, n_q), [Part(0, stop)])] if stop > 0 else []
    parts = []
    if upper > 0:
        parts.append(Part(0, min(upper, n_k)))
    if max(upper, 0) < min(n_k, upper + n_q):
        parts.append(Part(max(upper, 0), min(n_k, upper + n_q), causal=True))
    return [Step(slice(0, batch), slice(first_row, n_q), parts)] if parts and first_row < n_q else []


def _runs(flags: torch.Tensor) -> list[tuple[int, int]]:
    """Maximal runs ``[start, stop)`` of True in a 1-d bool tensor."""
    runs, start = [], None
    for index, on in enumerate(flags.tolist() + [False]):
        if on and start is None:
            start = index
        elif not on and start is not None:
            runs.append((start, index))
            start = None
    return runs


class Heads(NamedTuple):
    """The query heads of one C++ call: ``heads`` (a slice of q's heads, each reading its own KV head), or, when
    ``packed`` > 1, every query head, the ``packed`` heads that share a KV head stacked in the rows of one call
    (GQA packing: one matrix product per KV head instead of one matrix-vector product per query head)."""

    heads: slice
    packed: int = 1
    tiled: bool = False
    rows: int = 1  # query rows per head (of a packed call)

    def pack(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """The call's part of ``x`` [b, Hq or 1, n, ...] (every query head, or broadcast over heads): its heads, or
        packed, [b, Hkv or 1, packed * n, ...] (row ``r * n + i`` is row i of the group's r-th query head, and a
        head-broadcast tensor such as a mask is repeated over the group)."""
        if x is None or self.packed == 1:
            return x if x is None or x.shape[1] == 1 else x[:, self.heads]
        if x.shape[1] == 1 and x.shape[2] == 1:  # the same for every row (a key mask): it broadcasts as it is
            return x
        x = x.expand(*x.shape[:2], self.rows, *x.shape[3:])
        if x.shape[1] == 1:
            # contiguous: a one-row x would flatten to a row stride of 0, which the C++ kernel divides by
            return x.unsqueeze(2).expand(x.shape[0], 1, self.packed, *x.shape[2:]).flatten(2, 3).contiguous()
        return group_heads(x, x.shape[1] // self.packed, self.tiled).flatten(2, 3)

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        """A call's result in the layout of q's rows at :meth:`index` (packed [b, Hkv, packed * n, ...] becomes
        [b, Hq, n, ...])."""
        if self.packed == 1:
            return y
        return ungroup_heads(y.unflatten(2, (self.packed, -1)), self.tiled)

    def index(self, step: Step) -> tuple[slice, slice, slice]:
        """The (batch, head, row) index of q's rows this call of ``step`` covers."""
        return step.batch, slice(None) if self.packed > 1 else self.heads, step.rows


#: At most this many rows (query rows x packed heads) per packed call: decode steps and other short queries.
PACK_ROWS = 256


def _calls(q: torch.Tensor, num_kv_heads: int, tiled: bool, step: Step) -> list[Heads]:
    """The query heads of each call of ``step``: GQA-packed into one call when the group shares a KV head, no part
    is causal (its triangle is per row) and the packed rows stay short; else one call per member r of the query
    groups, on views of q (in KV-head order)."""
    group = q.shape[1] // num_kv_heads
    n_rows = step.rows.stop - step.rows.start
    if group > 1 and n_rows * group <= PACK_ROWS and not any(part.causal for part in step.parts):
        return [Heads(slice(None), group, tiled, n_rows)]
    if tiled:
        return [Heads(slice(r * num_kv_heads, (r + 1) * num_kv_heads)) for r in range(group)]
    return [Heads(slice(r, None, group)) for r in range(group)]


def _widened(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` with zero columns appended to its last dim up to ``width`` (itself when already that wide)."""
    return x if x.shape[-1] == width else torch.nn.functional.pad(x, (0, width - x.shape[-1]))


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(out, lse pairs)`` of a validated ``spec`` that :func:`serves` accepts, on non-empty inputs; None when a
    row's log-sum-exp came out beyond :func:`keeps_precision` (the tiled path then runs the call).

    The C++ kernel takes one head dim: a v narrower or wider than q and k (MLA) runs with the narrower side padded
    by zero columns, which changes no product (q . k, or the output's first Dv columns)."""
    width, value_dim = max(q.shape[-1], v.shape[-1]), v.shape[-1]
    if q.shape[-1] != value_dim:
        result = _forward(_widened(q, width), _widened(k, width), _widened(v, width), spec)
        return None if result is None else (result[0][..., :value_dim], result[1])
    return _forward(q, k, v, spec)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor] | None:
    steps = _steps(spec, q.shape[0], q.shape[2], k.shape[2])
    part = _single_call(steps, q, k)
    if part is not None:  # one call: its results as they are
        out, lse = _FORWARD(q, k[:, :, part.start:part.stop], v[:, :, part.start:part.stop], 0.0, part.causal,
                            scale=spec.scale)
        lse = torch.stack([lse, torch.zeros_like(lse)], -1)
        return (out, lse) if keeps_precision(lse) else None
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    lse = torch.zeros((*q.shape[:3], 2), dtype=torch.float32)
    lse[..., 0] = float("-inf")
    for step in steps:
        keys, values = k[step.batch], v[step.batch]
        masks = [_mask(spec, step, part, q.dtype) for part in step.parts]
        for call in _calls(q, k.shape[1], spec.kv_heads_tiled, step):
            index, every_head = call.index(step), (step.batch, slice(None), step.rows)
            rows = call.pack(q[every_head])
            merged_out = merged_lse = None
            for part, (mask, alive) in zip(step.parts, masks, strict=True):
                part_out, part_lse = _FORWARD(rows, keys[:, :, part.start:part.stop],
                                              values[:, :, part.start:part.stop], 0.0, part.causal,
                                              attn_mask=call.pack(mask), scale=spec.scale)
                if alive is not None:  # rows the mask hides entirely: the C++ kernel says 0, not -inf
                    part_lse = part_lse.masked_fill(~call.pack(alive), float("-inf"))
                merged_out, merged_lse = _merge(merged_out, merged_lse, part_out.float(), part_lse)
            merged_out, merged_lse = call.unpack(merged_out), call.unpack(merged_lse)
            dead = merged_lse == float("-inf")
            out[index] = merged_out.masked_fill(dead[..., None], float("nan")).to(q.dtype)
            lse[(*index, 0)] = merged_lse
    return (out, lse) if keeps_precision(lse) else None


def _single_call(steps: list[Step], q: torch.Tensor, k: torch.Tensor) -> Part | None:
    """The one unmasked call over every row and key that ``steps`` amount to (heads matched one to one), else None."""
    if len(steps) != 1 or len(steps[0].parts) != 1 or q.shape[1] != k.shape[1]:
        return None
    part = steps[0].parts[0]
    whole = steps[0].rows == slice(0, q.shape[2]) and (part.start, part.stop) == (0, k.shape[2])
    return part if whole and not part.masked else None


def _merge(out: torch.Tensor | None, lse: torch.Tensor | None, part_out: torch.Tensor,
           part_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two softmax-weighted averages over disjoint keys as one; a side with LSE -inf weighs nothing."""
    if out is None:
        return part_out, part_lse
    total = torch.logaddexp(lse, part_lse)
    safe = total.masked_fill(total == float("-inf"), 0.0)
    weight, part_weight = torch.exp(lse - safe)[..., None], torch.exp(part_lse - safe)[..., None]
    return out * weight + part_out * part_weight, total


def attention_backward(grad_out: torch.Tensor, saved: Saved, spec: AttentionSpec) -> tuple[torch.Tensor, ...]:
    """``(dq, dk, dv, None, None)`` of a validated ``spec`` that :func:`serves` accepts, from the forward's outputs
    when their log-sum-exps pass :func:`keeps_precision` (head dims widened as in :func:`attention_forward`)."""
    q, k, v, out, lse = saved
    head_dim, value_dim = q.shape[-1], v.shape[-1]
    if head_dim == value_dim:
        return _backward(grad_out, saved, spec)
    width = max(head_dim, value_dim)
    wide = Saved(*(_widened(x, width) for x in (q, k, v, out)), lse)
    dq, dk, dv, _, _ = _backward(_widened(grad_out, width), wide, spec)
    return dq[..., :head_dim], dk[..., :head_dim], dv[..., :value_dim], None, None


def _backward(grad_out: torch.Tensor, saved: Saved, spec: AttentionSpec) -> tuple[torch.Tensor, ...]:
    q, k, v, out, lse = saved
    steps = _steps(spec, q.shape[0], q.shape[2], k.shape[2])
    part = _single_call(steps, q, k)
    # Rows without keys: output 0 and LSE +inf, so every probability of theirs is 0 and they pass no gradient.
    dead = lse[..., 0] == float("-inf")
    if part is not None and not bool(dead.any()):  # one call: its gradients as they are
        return (*_BACKWARD(grad_out, q, k, v, out, lse[..., 0].contiguous(), 0.0, part.causal, scale=spec.scale),
                None, None)
    out = out.masked_fill(dead[..., None], 0.0)
    row_lse = lse[..., 0].masked_fill(dead, float("inf"))
    dq = torch.zeros(q.shape, dtype=torch.float32)
    dk = torch.zeros(k.shape, dtype=torch.float32)
    dv = torch.zeros(v.shape, dtype=torch.float32)
    for step in steps:
        keys, values = k[step.batch], v[step.batch]
        masks = [_mask(spec, step, part, q.dtype)[0] for part in step.parts]
        for call in _calls(q, k.shape[1], spec.kv_heads_tiled, step):
            index, every_head = call.index(step), (step.batch, slice(None), step.rows)
            rows, rows_out, rows_grad = (call.pack(x[every_head]) for x in (q, out, grad_out))
            rows_lse = call.pack(row_lse[every_head]).contiguous()
            for part, mask in zip(step.parts, masks, strict=True):
                keys_part = slice(part.start, part.stop)
                dq_part, dk_part, dv_part = _BACKWARD(rows_grad, rows, keys[:, :, keys_part], values[:, :, keys_part],
                                                      rows_out, rows_lse, 0.0, part.causal,
                                                      attn_mask=call.pack(mask), scale=spec.scale)
                dq[index] += call.unpack(dq_part)
                dk[step.batch, :, keys_part] += dk_part
                dv[step.batch, :, keys_part] += dv_part
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None
