"""Rows that a finite fill hides entirely: eager's uniform average, completed after the kernels.

When one mask term hides keys with a finite fill (transformers' ``where(visible, 0, finfo.min)``, a
``masked_fill(hidden, -1e9)``), a query row whose every key is hidden holds the fill in every entry (the
scores, far smaller, round away), so eager's softmax is uniform over all Nk keys: its output is the mean of v
over every key and its log-sum-exp ``fill + log(Nk)``. The kernels see such a row as one without keys (LSE
-inf, no output, no gradient); this module turns their result into eager's, in O(Nq + Nk) work per head
(forward) and O((Nq + Nk) * D^2) (backward), without reading anything of size Nq x Nk:

- forward: ``out = mean_j v[j]``, LSE pair ``(fill, log Nk)`` on those rows;
- backward: v gets ``sum_i dO_i / Nk`` at every key; where the fill was *added* to the scores (gradients flow
  through an addition), the scores also get the uniform softmax's gradient ``dS_ij = (dO_i . v_j - dO_i .
  out_i) / Nk``, which reaches q, k, the bias and the relative table; where it *replaced* them (masked_fill,
  where) they get none, as eager's masked_fill passes none. Under a score modification that gradient reaches the
  scaled scores times the modification's derivative, entry by entry: those rows are recomputed densely (the query
  rows in steps holding completed rows only).

The op proves per call that every entry of such a row does round to the fill (flash_fx.exactness).
"""

from __future__ import annotations

import math

import torch
from flash_fx.kernels.spec import AttentionSpec


def _to_kv_heads(x: torch.Tensor, spec: AttentionSpec, kv_heads: int) -> torch.Tensor:
    """Sum per-query-head values [B, Hq, ...] into their KV heads [B, Hkv, ...]."""
    out = x.new_zeros((x.shape[0], kv_heads, *x.shape[2:]))
    return out.index_add_(1, spec.kv_index(x.shape[1], kv_heads, x.device), x)


def completed_rows(lse: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """Bool [B, Hq, Nq]: the rows :func:`complete_forward` completed (their LSE pair starts with the fill; a row
    with a visible key has a larger LSE, which the op proves per call)."""
    return lse[..., 0] == torch.tensor(spec.filled_rows.fill, dtype=lse.dtype)


def complete_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, out: torch.Tensor,
                     lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) with the rows without keys replaced by eager's uniform average (module docstring)."""
    dead = (lse[..., 0] == float("-inf"))[..., None]  # the rows the kernels found without keys
    index = spec.kv_index(q.shape[1], k.shape[1], q.device)
    mean_v = v.float().mean(2, keepdim=True)[:, index]  # [B, Hq, 1, D]
    out = torch.where(dead, mean_v.to(out.dtype), out)
    pair = torch.tensor([spec.filled_rows.fill, math.log(k.shape[2])], dtype=lse.dtype, device=lse.device)
    return out, torch.where(dead, pair, lse)


def kernel_lse(lse: torch.Tensor, spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(the LSE pairs as the kernels gave them, with -inf on the completed rows; those rows [B, Hq, Nq])."""
    dead = completed_rows(lse, spec)
    minus_inf = torch.tensor([float("-inf"), 0.0], dtype=lse.dtype, device=lse.device)
    return torch.where(dead[..., None], minus_inf, lse), dead


def complete_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      out: torch.Tensor, dead: torch.Tensor, spec: AttentionSpec,
                      grads: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The kernels' ``(dq, dk, dv, dbias, drel)`` plus what the completed rows ``dead`` [B, Hq, Nq] pass back."""
    dq, dk, dv, dbias, drel = grads
    n_k, kv_heads = k.shape[2], k.shape[1]
    index = spec.kv_index(q.shape[1], kv_heads, q.device)
    rows = dead[..., None].float()
    g = grad_out.float() * rows  # dO on the completed rows, 0 elsewhere  [B, Hq, Nq, Dv]
    dv = dv + (_to_kv_heads(g.sum(2, keepdim=True), spec, kv_heads) / n_k).to(dv.dtype)
    if not spec.filled_rows.added:
        return dq, dk, dv, dbias, drel
    kf, vf = k.float()[:, index], v.float()[:, index]  # views per query head  [B, Hq, Nk, D]
    delta = (g * out.float()).sum(-1, keepdim=True)  # dO_i . out_i  [B, Hq, Nq, 1]
    if spec.score_mod is None:
        scale = spec.scale / n_k
        # dq_i = scale / Nk * sum_j (dO_i . v_j - delta_i) k_j
        dq = dq + (scale * (g @ (vf.transpose(-1, -2) @ kf) - delta * kf.sum(2, keepdim=True))).to(dq.dtype)
        # dk_j = scale / Nk * sum_i (dO_i . v_j - delta_i) q_i over the completed rows i
        qd = q.float() * rows
        dk_heads = scale * (vf @ (g.transpose(-1, -2) @ qd) - (delta * qd).sum(2, keepdim=True))
        dk = dk + _to_kv_heads(dk_heads, spec, kv_heads).to(dk.dtype)
    else:
        dq, dk = _through_modification(q, kf, vf, g, delta, dead, spec, dq, dk)
    if dbias is not None or drel is not None:  # the scores' own gradient, [B, Hq, Nq, Nk] like dbias
        ds = (g @ vf.transpose(-1, -2) - delta) * rows / n_k
        if dbias is not None:
            dbias = dbias + ds
        if drel is not None:
            positions_q = torch.arange(q.shape[2], device=q.device)
            positions_k = torch.arange(n_k, device=q.device)
            drel = drel.clone()
            spec.relative.add_diagonal_sums(drel, ds, positions_q, positions_k, q.shape[2])
    return dq, dk, dv, dbias, drel


#: Query rows per step of :func:`_through_modification`.
ROWS_PER_STEP = 256


def _through_modification(q: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, g: torch.Tensor, delta: torch.Tensor,
                          dead: torch.Tensor, spec: AttentionSpec, dq: torch.Tensor,
                          dk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dq, dk plus the completed rows' share when a score modification lies between them and the fill: dS_ij
    reaches the scaled score times the modification's derivative there, which differs per entry, so the rows are
    recomputed densely, ROWS_PER_STEP at a time, and only the steps holding completed rows (none: no work)."""
    n_k = kf.shape[2]
    factor = spec.score_mod.head_factor
    factor = None if factor is None else factor[:, :, None, None]
    dq_extra = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk_heads = torch.zeros(kf.shape, dtype=torch.float32, device=q.device)
    for first in range(0, q.shape[2], ROWS_PER_STEP):
        rows = slice(first, first + ROWS_PER_STEP)
        here = dead[:, :, rows, None].float()
        if not bool(here.any()):
            continue
        q_rows = q[:, :, rows].float()
        _, derivative = spec.score_mod.apply(q_rows @ kf.transpose(-1, -2) * spec.scale, factor, derivative=True)
        ds = (g[:, :, rows] @ vf.transpose(-1, -2) - delta[:, :, rows]) * here * derivative / n_k
        dq_extra[:, :, rows] = spec.scale * (ds @ kf)
        dk_heads += spec.scale * (ds.transpose(-1, -2) @ q_rows)
    return dq + dq_extra.to(dq.dtype), dk + _to_kv_heads(dk_heads, spec, dk.shape[1]).to(dk.dtype)
