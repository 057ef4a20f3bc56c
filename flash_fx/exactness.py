"""When a rewrite's result is exactly eager's: the one rule for fills and the run-time check that keeps it.

A fill hides a key exactly when its entry contributes what eager's does:

- ``-inf`` always does: eager's probability is 0 (or the row is NaN, as the kernels' is).
- A finite fill (``finfo.min``, ``-1e9``, ``-1e4``; after the scales applied after it) contributes 0 only where
  its row holds a visible entry that exceeds it by more than :data:`UNDERFLOW_MARGIN`: there eager's
  ``exp(fill - row max)`` underflows to 0 in float32, the kernels skip the entry, and no gradient flows through
  it either way. A row that every mask hides (a dead row), or a fill close to the scores, is different: eager
  averages over the fills. No compile-time analysis can prove that for data-dependent masks and scores, so the
  op proves it per call (:func:`check_call`), cheaply from the row log-sum-exps it computes anyway, and a call
  where it fails is reported and recomputed by the original graph (flash_fx.backend).

A fill is considered a mask at all only at or below :data:`LARGEST_MASK_FILL` (after its later scales);
above that it is part of the scores (the block is left as it was).
"""

from __future__ import annotations

import math
import threading

import torch

LARGEST_MASK_FILL = -1e4  # a masked_fill / where value (after later scales) at or below this may be a mask
UNDERFLOW_MARGIN = 110.0  # exp(-110) rounds to 0 in float32 (below half its smallest subnormal, e^-103.97)
ROUNDING = 2.0**-20  # relative slack for float32 rounding (8 units in the last place) in the check

_state = threading.local()


def is_mask_fill(fill: float) -> bool:
    """True for a fill value (after the scales applied after it) that may hide keys: -inf or a large negative."""
    return fill == -math.inf or fill <= LARGEST_MASK_FILL


def note_inexact(reason: str) -> None:
    """Record that a call of the op in this thread did not prove its result equal to eager's."""
    _state.reason = getattr(_state, "reason", None) or reason


def take_inexact() -> str | None:
    """The first reason recorded since the last call (and forget it)."""
    reason = getattr(_state, "reason", None)
    _state.reason = None
    return reason


def check_call(lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None,
               excluded_fill: float | None, alibi_slopes: torch.Tensor | None, rel_bias: torch.Tensor | None,
               layout_threshold: float | None = None) -> None:
    """Record (note_inexact) when this call's result may differ from eager's.

    `excluded_fill` is the largest finite value eager gives an entry that the masks exclude (None: only -inf
    fills were excluded); `layout_threshold` the bias value at or below which a block layout skips entries (None:
    no layout). An excluded entry's eager score is at most the fill plus a bound of the scores (Cauchy-Schwarz:
    scale * max |q_i| * max |k_j|) plus the largest additive terms; the row's visible maximum is at least
    lse - log(Nk), less a few float32 units in the last place (so a row whose visible entries are themselves fills,
    dead by a combination of masks, never passes by rounding). A layout skips nothing in a query tile holding a
    row that the bias hides entirely, so such rows are exact unless the masks exclude entries too. A bias holding
    NaN or +inf (which eager may overwrite, or spread from an entry the kernels exclude) is not proved either.
    """
    bias_max = 0.0
    if bias is not None and bias.numel():
        top = float(bias.detach().max())
        if math.isnan(top) or top == math.inf:
            note_inexact("the bias holds NaN or +inf")
            return
        bias_max = max(top, 0.0)
    fills = [f for f in (excluded_fill, layout_threshold) if f is not None]
    if not fills or lse.numel() == 0:
        return
    rows = lse[..., 0]
    if excluded_fill is None and bias is not None:  # only the layout excludes: rows it keeps whole are exact
        hidden_by_bias = bias.detach().amax(-1).expand(rows.shape) <= layout_threshold
        rows = rows[~hidden_by_bias]
        if rows.numel() == 0:
            return
    n_k = k.shape[-2]
    bound = max(fills) + bias_max + scale * float(_row_norms(q).max()) * float(_row_norms(k).max())
    if alibi_slopes is not None:
        bound += float(alibi_slopes.detach().abs().max()) * (q.shape[-2] + n_k)
    if rel_bias is not None and rel_bias.numel():
        bound += float(rel_bias.detach().abs().max())
    lowest = float(rows.min())
    # float32 rounding of the log-sum-exp and of the fills: a few units in the last place of the larger magnitude
    slack = ROUNDING * (abs(lowest) + abs(bound)) if math.isfinite(lowest) and math.isfinite(bound) else math.inf
    if not lowest - math.log(max(n_k, 1)) - UNDERFLOW_MARGIN - slack > bound:
        note_inexact("a row is hidden entirely by a finite fill, or a finite fill is not negligible beside its "
                     "row's scores")


def _row_norms(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().norm(dim=-1) if x.numel() else torch.zeros(1)
