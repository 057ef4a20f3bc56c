"""Attention sinks: a logit per (batch row, head, query row) that joins each row's softmax without a value.

``softmax(cat([scores, sink], -1))[..., :-1] @ v`` (gpt-oss) is the kernels' attention rescaled: with ``L`` the
row's log-sum-exp over its keys and ``L' = logaddexp(L, sink)`` the one over keys and sink, every probability is
``exp(s - L')``, so ``out' = out * exp(L - L') = out * sigmoid(L - sink)`` and the LSE is ``L'``. A row without
visible keys gets ``out' = 0`` (all its weight on the sink) and ``L' = sink``.

The backward is the kernels' own, given ``out'`` and ``L'``: they recompute ``exp(s - L')`` (the probabilities
with the sink in the denominator) and ``delta = dO . out'``, which is what the chain rule through the sink column
gives (its value is 0, so its ``dP`` is 0). The sink logits' gradient is that column's dS, ``-exp(sink - L') *
delta`` (:func:`sink_grad`, PyTorch ops in the op's autograd formula).
"""

from __future__ import annotations

import torch


def complete_forward(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out', LSE pairs of L') from the kernels' ``out`` [B, Hq, Nq, D], ``lse`` pairs [B, Hq, Nq, 2] and the
    validated ``sinks`` [B, Hq, Nq] (float32)."""
    row = lse[..., 0] + lse[..., 1]  # the kernels' L
    total = torch.logaddexp(row, sinks.float())
    weight = torch.exp(row - total)  # sigmoid(L - sink): 0 on rows without keys (L = -inf)
    out = torch.where(weight[..., None] == 0, 0.0, out.float() * weight[..., None]).to(out.dtype)
    return out, torch.stack([total, torch.zeros_like(total)], -1)


def sink_grad(grad_out: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """The gradient of the sink logits (float32 [B, Hq, Nq]) from the forward's ``out'``, LSE pairs of ``L'`` and
    ``sinks`` [B, Hq, Nq]: ``-exp(sink - L') * (dO . out')``."""
    delta = (grad_out.float() * out.float()).sum(-1)
    total = lse[..., 0] + lse[..., 1]
    return -torch.exp(sinks.float() - total) * delta
