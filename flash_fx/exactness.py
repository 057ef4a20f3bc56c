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

from flash_fx.kernels.filled_rows import completed_rows
from flash_fx.kernels.schedule import per_tensor
from flash_fx.kernels.spec import AttentionSpec

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


def layout_is_exact(q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec, threshold: float) -> torch.Tensor:
    """Whether a block layout of the spec's bias (skipping entries at or below `threshold`) leaves eager's result
    exact, decided from the inputs alone (so the forward and the backward decide alike; where it does not, the
    schedule reads those tiles, which is exact): a 0-d bool tensor computed on the inputs' device, nothing read on
    the host (a call stays capturable in a CUDA graph).

    The layout keeps whole every query tile holding a row that the bias hides entirely. Any other row has a bias
    entry above the threshold; the entries it skips are at or below it, so their scores trail that entry's by at
    least the gap between the two bias values less twice a bound of the scores (Cauchy-Schwarz) and the position
    terms: more than UNDERFLOW_MARGIN (plus rounding slack) makes every skipped probability 0 in float32."""
    values = spec.bias.values.detach()
    if values.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=values.device)
    lowest, none_live = per_tensor(values, ("lowest live row max", threshold), lambda: _lowest_live_row(values,
                                                                                                        threshold))
    low, high = _score_range(q, k, spec)
    terms = (high - low) + _position_bound(q, k, spec)
    slack = ROUNDING * (lowest.abs() + abs(threshold))
    return (lowest - threshold - slack > terms + UNDERFLOW_MARGIN) | none_live


def _lowest_live_row(values: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest row maximum of a bias among its rows with an entry above ``threshold`` (+inf without one), and
    whether it has none (0-d tensors on its device)."""
    row_max = values.amax(-1).double()
    live = row_max > threshold  # NaN rows are not live: kept whole, they propagate NaN as eager does
    return torch.where(live, row_max, math.inf).amin(), ~live.any()


def check_call(lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec) -> None:
    """Record (note_inexact) when this call's result may differ from eager's.

    The spec's `excluded_fill` is the largest finite value eager gives an entry that the masks exclude (None: only -inf
    fills were excluded). An excluded entry's eager score is at most the fill plus a bound of the scores
    (Cauchy-Schwarz: scale * max |q_i| * max |k_j|, mapped through a score modification) plus the largest additive
    terms; the row's visible maximum is
    at least lse - log(Nk), less a few float32 units in the last place (so a row whose visible entries are
    themselves fills, dead by a combination of masks, never passes by rounding). With `structural` masks (which
    replace the scores they hide) a bias holding NaN or +inf is not proved either: eager spreads it where such a
    mask came first, the kernels do not. Which calls check anything is `AttentionSpec.is_checked`.
    """
    if not spec.is_checked:
        return
    bias, excluded_fill = None if spec.bias is None else spec.bias.values, spec.excluded_fill
    bias_max = 0.0
    if bias is not None and bias.numel():
        top = float(bias.detach().max())
        if math.isnan(top) or top == math.inf:
            note_inexact("the bias holds NaN or +inf beside masks that replace the scores")
            return
        bias_max = max(top, 0.0)
    if excluded_fill is None or lse.numel() == 0:
        return
    n_k = k.shape[-2]
    row_lse, scores = lse[..., 0], _score_range(q, k, spec)
    if spec.filled_rows is not None:
        completed = completed_rows(lse, spec)
        if bool(completed.any()) and not _rounds_to_fill(q, k, spec, scores):
            note_inexact("a row hidden entirely by a finite fill has entries that do not round to the fill")
            return
        row_lse = row_lse[~completed]
        if row_lse.numel() == 0:
            return
    bound = excluded_fill + bias_max + float(scores[1]) + float(_position_bound(q, k, spec))
    lowest = float(row_lse.min())
    # float32 rounding of the log-sum-exp and of the fills: a few units in the last place of the larger magnitude
    slack = ROUNDING * (abs(lowest) + abs(bound)) if math.isfinite(lowest) and math.isfinite(bound) else math.inf
    if not lowest - math.log(max(n_k, 1)) - UNDERFLOW_MARGIN - slack > bound:
        note_inexact("a row is hidden entirely by a finite fill, or a finite fill is not negligible beside its "
                     "row's scores")


def _rounds_to_fill(q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec, scores: tuple[float, float]) -> bool:
    """Whether every entry of a row that the masks hide entirely equals the fill in float32 (and so in any
    narrower dtype): what is added to the fill (the score where the fill was added, the bias and the position
    terms) is bounded below a quarter of the float32 spacing at the fill, so rounding takes it away."""
    fill = torch.tensor(spec.filled_rows.fill, dtype=torch.float32)
    spacing = float((fill - torch.nextafter(fill, torch.zeros(()))).abs())
    bound = float(_position_bound(q, k, spec))
    if spec.filled_rows.added:
        bound += float(torch.maximum(scores[0].abs(), scores[1].abs()))  # the scores' range (_score_range)
    if spec.bias is not None and spec.bias.values.numel():
        bound += float(spec.bias.values.detach().abs().max())
    return bound < spacing / 4


def _score_range(q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """An interval holding every score ``mod(q_i . k_j * scale)`` (Cauchy-Schwarz bounds the product; the score
    modification maps that interval), as 0-d float64 tensors on q's device."""
    bound = abs(spec.scale) * _row_norms(q).amax() * _row_norms(k).amax()
    mod = spec.score_mod
    if mod is None:
        return -bound, bound
    factors = None
    if mod.head_factor is not None and mod.head_factor.numel():
        factors = tuple(mod.head_factor.detach().double().aminmax())
    return mod.bounds(-bound, bound, factors)


def _position_bound(q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """A bound of the ALiBi and relative-position terms' magnitude (a 0-d float64 tensor on q's device)."""
    bound = torch.zeros((), dtype=torch.float64, device=q.device)
    if spec.alibi is not None and spec.alibi.slopes.numel():
        bound = bound + spec.alibi.slopes.detach().double().abs().amax() * (q.shape[-2] + k.shape[-2])
    if spec.relative is not None and spec.relative.values.numel():
        bound = bound + spec.relative.values.detach().double().abs().amax()
    return bound


def _row_norms(x: torch.Tensor) -> torch.Tensor:
    return x.detach().double().norm(dim=-1) if x.numel() else torch.zeros(1, dtype=torch.float64, device=x.device)
