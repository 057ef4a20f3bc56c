"""The CPU path through PyTorch's own C++ flash kernel, for the specs it can serve exactly.

``aten._scaled_dot_product_flash_attention_for_cpu`` (and its backward) computes dense or top-left causal
attention and returns the row log-sum-exp. A band with only an upper bound (causal with any offset, bottom-right
included) is two such calls over disjoint key ranges, merged by their log-sum-exps (exact):

- keys ``[0, u)`` are visible to every query row that sees any key (a dense call);
- keys ``[u, u + Nq)`` are visible to row i up to ``u + i``: top-left causal on that chunk.

Rows that see no key (``i + u < 0``) are not passed to the kernel: they give NaN and an LSE of -inf, as the
contract says (flash_fx.kernels.spec). GQA runs one call per member of each KV head's query group on views of q
(no copy of K or V). The backward calls the C++ backward per chunk with the whole rows' output and log-sum-exp, so
each chunk's probabilities and ``delta`` are the full softmax's, and sums the chunks' dQ.

Served: no bias, ALiBi, relative table, key validity, documents, dropout (its stream is flash_fx's own) or lower
band bound; :func:`serves` says so, and the tiled PyTorch path runs the rest.
"""

from __future__ import annotations

import torch
from flash_fx.kernels.spec import AttentionSpec, Saved

__all__ = ["attention_backward", "attention_forward", "serves"]

_FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def serves(spec: AttentionSpec, q: torch.Tensor) -> bool:
    """Whether this path computes a validated ``spec`` on CPU tensors like ``q`` exactly."""
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and spec.bias is None and spec.alibi is None and spec.relative is None and spec.key_valid is None
            and spec.documents is None and not spec.dropout.enabled and spec.band.lower is None)


def _chunks(n_q: int, n_k: int, upper: int | None) -> tuple[int, list[tuple[int, int, bool]]]:
    """The first query row that sees a key, and the key chunks ``(start, stop, causal)`` all later rows share."""
    if upper is None:
        return 0, [(0, n_k, False)]
    first_row = max(0, -upper)
    chunks = []
    if upper > 0:
        chunks.append((0, min(upper, n_k), False))
    causal_start = max(upper, 0)
    causal_stop = min(n_k, upper + n_q)
    if causal_start < causal_stop:
        chunks.append((causal_start, causal_stop, True))
    return first_row, chunks


def _groups(q: torch.Tensor, num_kv_heads: int, tiled: bool) -> list[slice]:
    """Per member r of the query groups, the query heads it holds, in KV-head order (views of q)."""
    group = q.shape[1] // num_kv_heads
    if tiled:
        return [slice(r * num_kv_heads, (r + 1) * num_kv_heads) for r in range(group)]
    return [slice(r, None, group) for r in range(group)]


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse pairs)`` of a validated ``spec`` that :func:`serves` accepts, on non-empty inputs."""
    n_q, n_k = q.shape[2], k.shape[2]
    first_row, chunks = _chunks(n_q, n_k, spec.band.upper)
    if first_row == 0 and len(chunks) == 1 and q.shape[1] == k.shape[1]:  # one call: its results as they are
        start, stop, causal = chunks[0]
        out, lse = _FORWARD(q, k[:, :, start:stop], v[:, :, start:stop], 0.0, causal, scale=spec.scale)
        return out, torch.stack([lse, torch.zeros_like(lse)], -1)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    lse = torch.zeros((*q.shape[:3], 2), dtype=torch.float32)
    lse[..., 0] = float("-inf")
    if not chunks or first_row >= n_q:
        return out, lse
    for heads in _groups(q, k.shape[1], spec.kv_heads_tiled):
        rows = q[:, heads, first_row:]
        merged_out, merged_lse = None, None
        for start, stop, causal in chunks:
            part_out, part_lse = _FORWARD(rows, k[:, :, start:stop], v[:, :, start:stop], 0.0, causal,
                                          scale=spec.scale)
            merged_out, merged_lse = _merge(merged_out, merged_lse, part_out.float(), part_lse)
        out[:, heads, first_row:] = merged_out.to(q.dtype)
        lse[:, heads, first_row:, 0] = merged_lse
    return out, lse


def _merge(out: torch.Tensor | None, lse: torch.Tensor | None, part_out: torch.Tensor,
           part_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two softmax-weighted averages over disjoint keys as one (every row has a finite LSE in both)."""
    if out is None:
        return part_out, part_lse
    total = torch.logaddexp(lse, part_lse)
    weight = torch.exp(lse - total)[..., None]
    return out * weight + part_out * (1 - weight), total


def attention_backward(grad_out: torch.Tensor, saved: Saved, spec: AttentionSpec) -> tuple[torch.Tensor, ...]:
    """``(dq, dk, dv, None, None)`` of a validated ``spec`` that :func:`serves` accepts, from the forward's outputs."""
    q, k, v, out, lse = saved
    n_q, n_k = q.shape[2], k.shape[2]
    first_row, chunks = _chunks(n_q, n_k, spec.band.upper)
    dq = torch.zeros(q.shape, dtype=torch.float32)
    dk = torch.zeros(k.shape, dtype=torch.float32)
    dv = torch.zeros(v.shape, dtype=torch.float32)
    if chunks and first_row < n_q:
        for heads in _groups(q, k.shape[1], spec.kv_heads_tiled):
            rows = q[:, heads, first_row:]
            row_out, row_grad = out[:, heads, first_row:], grad_out[:, heads, first_row:]
            row_lse = lse[:, heads, first_row:, 0].contiguous()
            for start, stop, causal in chunks:
                dq_part, dk_part, dv_part = _BACKWARD(row_grad, rows, k[:, :, start:stop], v[:, :, start:stop],
                                                      row_out, row_lse, 0.0, causal, scale=spec.scale)
                dq[:, heads, first_row:] += dq_part
                dk[:, :, start:stop] += dk_part
                dv[:, :, start:stop] += dv_part
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None
