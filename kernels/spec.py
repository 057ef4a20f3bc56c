"""The attention spec: one typed description of an attention call, from the graph pass to the kernels.

This module states the op contract once; every other docstring refers here. For q [B, Hq, Nq, D], k [B, Hkv,
Nk, D] and v [B, Hkv, Nk, Dv] (``Hq % Hkv == 0``; Dv may differ from D, as in MLA), an :class:`AttentionSpec`
stands for::

    scores[b, h, i, j] = mod(q[b, h, i] . k[b, kv(h), j] * scale) + terms[b, h, i, j]
    out[b, h, i]       = sum_j dropout(softmax_j(scores[b, h, i]))[j] * v[b, kv(h), j]

where ``kv(h) = h // (Hq // Hkv)`` (KV heads "grouped", what ``repeat_interleave`` or expand + reshape
produce) or ``h % Hkv`` with ``kv_heads_tiled`` (what ``k.repeat(1, Hq // Hkv, 1, 1)`` produces), and
``mod`` is the identity or a :class:`ScoreMod` (a chain of pointwise steps: soft-capping, clamps, gates), and
``terms`` is what :meth:`AttentionSpec.materialize` builds:

- the :class:`Bias` (any float tensor broadcastable to [B, Hq, Nq, Nk]); with ``holds_masks`` it comes from
  masks (0 where visible, ``-inf`` or a huge negative fill where hidden) and the kernels skip the tiles it
  hides entirely (:mod:`layout`);
- :class:`Alibi`: ``slopes[b, h] * (j - i)``, or ``slopes[b, h] * -|j - i|`` if symmetric (no gradient);
- :class:`RelativeTable`: ``values[b, h, j - i + Nq - 1]`` (T5's bucketed relative positions, looked up at
  every relative position ``-(Nq - 1) .. Nk - 1``);
- ``-inf`` where the structural masks hide key j from query i: the :class:`Band` (``i - lower <= j <= i +
  upper``: causal with an offset, sliding windows), key validity (bool [B or 1, Nk]) and :class:`Documents`
  (integer ids [B or 1, Nq] / [B or 1, Nk]; only keys of the query's document are visible). These are
  evaluated from indices (nothing of size Nq x Nk is read) and let whole tiles be skipped.

:class:`Dropout` drops probabilities with a counter-based stream (:mod:`dropout`) and scales kept ones by
``1 / (1 - p)``; the log-sum-exp is that of the undropped softmax. Fully masked rows give NaN outputs and an
LSE of -inf (eager softmax after ``-inf`` fills) and no gradient; rows hidden entirely by a finite fill are
eager's uniform average over their keys, forward and backward. With no keys (Nk == 0) the output is zeros.
``sinks`` (one logit per batch row, head and query) join each row's softmax without a value (:mod:`sinks`).
``excluded_fill`` is the largest finite value eager gave an entry the masks exclude (None: only ``-inf``); the
op proves such exclusions exact per call (flash_fx.exactness). With :class:`FilledRows` the structural masks
stand for one finite fill, and a row they hide entirely is eager's uniform average over all Nk keys instead
(:mod:`filled_rows`).

Tensor slots hold tensors at run time and graph nodes in the pass: :meth:`AttentionSpec.op_args` and
:meth:`AttentionSpec.from_op_args` are the only conversion to and from the custom op's flat schema. A new
score term (a score modification, say) is a new frozen dataclass here, a field of :class:`AttentionSpec`, its
case in :meth:`~AttentionSpec.materialize`, :meth:`~AttentionSpec.validate` and the op schema, and its code in
the two kernel paths (see the README's architecture section).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

__all__ = ["OP_ARGUMENTS", "UNBOUNDED", "Alibi", "AttentionInputError", "AttentionSpec", "Band", "Bias", "Documents",
           "Dropout", "FilledRows", "Launch", "ModStep", "RelativeTable", "Saved", "ScoreMod"]

UNBOUNDED = 2**31 - 1  # a window side without a limit, in the op's `[left, right]` list

#: The custom op's arguments after q, k, v, in schema order (:meth:`AttentionSpec.from_op_args`).
OP_ARGUMENTS = ("bias", "scale", "causal_offset", "kv_heads_tiled", "window", "key_valid", "q_doc", "k_doc",
                "dropout_p", "sparse_bias", "alibi_slopes", "alibi_symmetric", "rel_bias", "excluded_fill",
                "filled_rows", "filled_rows_added", "score_mod", "score_mod_factor", "sinks")


class AttentionInputError(ValueError):
    """Inputs the attention kernels cannot take (a shape, dtype or device that does not fit). The backend
    catches it at run time and runs the original ops for that call instead."""


class Saved(NamedTuple):
    """What the backward needs of a forward call: its inputs and its outputs (``lse`` the [B, Hq, Nq, 2] pairs
    of the forward)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor


class Launch(NamedTuple):
    """Launch choices of a call: tile sizes (None: the table's, or autotuned) and the decode kernels' key splits
    per KV head (None: from the card's size, :func:`decode.plan`)."""

    block_m: int | None = None
    block_n: int | None = None
    splits: int | None = None


@dataclass(frozen=True)
class Band:
    """Key j is visible to query i iff ``i - lower <= j <= i + upper`` (None: unbounded on that side).

    ``Band(None, 0)`` is causal, ``Band(None, c)`` causal with offset c (bottom-right causal when ``c = Nk - Nq``),
    ``Band(w, 0)`` a causal sliding window; ``Band()`` hides nothing.
    """

    lower: int | None = None
    upper: int | None = None

    @property
    def bounded(self) -> bool:
        """Whether the band hides anything."""
        return self.upper is not None or self.lower is not None

    @property
    def variant(self) -> str:
        """The kernel variant's name in reports."""
        return "causal" if self.lower is None else "sliding_window"

    def describe(self) -> str:
        """The band in a report line."""
        if self.lower is None:
            return "causal" if self.upper == 0 else f"causal(offset={self.upper})"
        return f"sliding_window(left={self.lower}, right={self.upper})"

    def clamped(self, reach: int) -> Band:
        """The same band with offsets clamped to ``[-reach, reach]`` (beyond every index difference when
        ``reach = Nq + Nk``: the same visibility, and no int32 overflow in the kernels)."""
        return Band(None if self.lower is None else _clamp(self.lower, reach),
                    None if self.upper is None else _clamp(self.upper, reach))

    def visible(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor | None:
        """Bool [len(rows), len(cols)] of the pairs inside the band (None when unbounded)."""
        i, j = rows[:, None], cols[None, :]
        ok = None if self.upper is None else j <= i + self.upper
        if self.lower is not None:
            ok = _and(ok, j >= i - self.lower)
        return ok

    def materialize(self, n_q: int, n_k: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The dense [Nq, Nk] boolean visibility of the band."""
        visible = self.visible(torch.arange(n_q, device=device), torch.arange(n_k, device=device))
        return torch.ones(n_q, n_k, dtype=torch.bool, device=device) if visible is None else visible


@dataclass(frozen=True, eq=False)
class Documents:
    """Document ids: key j is visible to query i of batch row b iff ``q_ids[b, i] == k_ids[b, j]``. After
    :meth:`AttentionSpec.validate` both are [B, N] integer tensors of one dtype: int32 for ids up to 32 bits wide
    (bools included), int64 ids as they are (nothing about their values is read on the host)."""

    q_ids: Any
    k_ids: Any


@dataclass(frozen=True, eq=False)
class Bias:
    """An additive score term of any float dtype broadcastable to [B, Hq, Nq, Nk] ("the bias"). ``holds_masks``:
    it comes from masks, so its empty and full tiles may be skipped or read as zeros (:mod:`layout`).
    ``requires_grad``: the backward returns the float32 gradient of its expanded [B, Hq, Nq, Nk] form.
    ``layout_exact``: whether skipping the empty tiles is exact on this call's inputs, a 0-d bool tensor on the
    device (:func:`flash_fx.exactness.layout_is_exact`, no host read); where it is false the schedule reads them as
    partial tiles (None: skipping them is exact)."""

    values: Any
    holds_masks: bool = False
    requires_grad: bool = False
    layout_exact: Any = None  # a 0-d bool tensor from the op's per-call proof: false reads the masked tiles too


@dataclass(frozen=True, eq=False)
class Alibi:
    """The ALiBi term ``slopes[b, h] * (j - i)`` (``* -|j - i|`` if ``symmetric``); float slopes [B or 1,
    Hq or 1], float32 [B, Hq] after validation. The slopes get no gradient."""

    slopes: Any
    symmetric: bool = False

    def positions(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The int64 position term [len(rows), len(cols)] the slopes multiply: ``j - i`` or ``-|j - i|``."""
        pos = cols[None, :] - rows[:, None]
        return -pos.abs() if self.symmetric else pos


@dataclass(frozen=True, eq=False)
class RelativeTable:
    """A term that depends only on (batch row, query head, ``j - i``): ``values[b, h, j - i + Nq - 1]``, values a
    float tensor [B or 1, Hq or 1, Nq + Nk - 1] (read as float32 by the Triton kernels). ``requires_grad``: the
    backward returns the float32 gradient of its expanded vector (the sums of dS along the diagonals; the Triton
    kernels add them with atomics, so the last bits vary from run to run)."""

    values: Any
    requires_grad: bool = False

    @staticmethod
    def index(rows: torch.Tensor, cols: torch.Tensor, n_q: int) -> torch.Tensor:
        """The int64 [len(rows), len(cols)] indices ``j - i + Nq - 1`` of query ``rows`` i and key ``cols`` j."""
        return cols[None, :] - rows[:, None] + (n_q - 1)

    def gather(self, rows: torch.Tensor, cols: torch.Tensor, n_q: int) -> torch.Tensor:
        """The dense term [B, Hq, len(rows), len(cols)], gathered once per batch row / head the validated values
        do not broadcast over (zero strides along the others)."""
        values = self.values
        own = values[: 1 if values.stride(0) == 0 else None, : 1 if values.stride(1) == 0 else None]
        return own[:, :, self.index(rows, cols, n_q)].expand(*values.shape[:2], len(rows), len(cols))

    def add_diagonal_sums(self, grad: torch.Tensor, ds: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                          n_q: int) -> None:
        """``grad[b, h, r] += sum of ds[b, h, i, j]`` over the pairs with ``j - i + Nq - 1 = r``, in place."""
        grad.index_add_(2, self.index(rows, cols, n_q).flatten(), ds.reshape(*ds.shape[:2], -1).to(grad.dtype))


@dataclass(frozen=True, eq=False)
class Dropout:
    """Dropout of the probabilities with probability ``p`` from the stream of ``seed`` and ``offset``. The seed is an
    int, or an int64 tensor of one element on the inputs' device (the op's: drawn and read there, never on the
    host)."""

    p: float = 0.0
    seed: Any = None
    offset: int = 0

    @property
    def enabled(self) -> bool:
        """Whether anything is dropped (``p > 0``)."""
        return self.p > 0.0

    @property
    def scale(self) -> float:
        """The factor of kept probabilities, ``1 / (1 - p)``."""
        return 1.0 / (1.0 - self.p)

    def validated(self) -> Dropout:
        """Checked: ``0 <= p < 1``; a positive ``p`` needs a seed in [0, 2**31) and a non-negative offset."""
        if not 0.0 <= self.p < 1.0:
            raise AttentionInputError(f"dropout_p must lie in [0, 1), got {self.p}")
        if self.p == 0.0:
            return Dropout()
        if self.offset < 0:
            raise AttentionInputError(f"the dropout offset must be non-negative, got {self.offset}")
        if isinstance(self.seed, torch.Tensor):  # its value is not read here: no host synchronisation
            if self.seed.dtype != torch.int64 or self.seed.numel() != 1:
                raise AttentionInputError(f"a seed tensor must be int64 with one element, got {self.seed.dtype} "
                                          f"{tuple(self.seed.shape)}")
            return Dropout(float(self.p), self.seed.reshape(1), int(self.offset))
        if self.seed is None or not 0 <= self.seed < 2**31:
            raise AttentionInputError(f"dropout_p > 0 needs a seed in [0, 2**31), got {self.seed}")
        return Dropout(float(self.p), int(self.seed), int(self.offset))


#: The pointwise steps a :class:`ScoreMod` chains, with their Triton opcodes (kernels.triton_common.mod_step).
MOD_OPS = {"mul": 1, "add": 2, "tanh": 3, "sigmoid": 4, "relu": 5, "clamp": 6, "square": 7, "mul_head": 8}
MAX_MOD_STEPS = 6


@dataclass(frozen=True)
class ModStep:
    """One pointwise step of a :class:`ScoreMod`: ``mul`` (x * a), ``add`` (x + a), ``tanh``, ``sigmoid``,
    ``relu``, ``clamp`` (``min(max(x, a), b)``, inf for an open side), ``square`` (x * x), ``mul_head`` (x times the
    mod's per-(batch, head) factor)."""

    op: str
    a: float = 0.0
    b: float = 0.0

    def text(self) -> str:
        """The step as the op's ``score_mod`` string spells it."""
        if self.op in ("mul", "add"):
            return f"{self.op}({self.a!r})"
        if self.op == "clamp":
            return f"clamp({self.a!r},{self.b!r})"
        return self.op

    @staticmethod
    def parse(text: str) -> ModStep:
        """The step of its :meth:`text`."""
        name, _, rest = text.strip().partition("(")
        values = [float(x) for x in rest.rstrip(")").split(",")] if rest else []
        if name not in MOD_OPS or len(values) != {"mul": 1, "add": 1, "clamp": 2}.get(name, 0):
            raise AttentionInputError(f"unknown score modification step {text!r}")
        return ModStep(name, *values)


@dataclass(frozen=True, eq=False)
class ScoreMod:
    """A pointwise function of the scaled score ``s = q . k * scale``, applied before the other terms are added:
    ``scores = mod(s) + terms``. Soft-capping is ``mul(1 / cap), tanh, mul(cap)``. ``head_factor``: the factor of a
    ``mul_head`` step, a float tensor [B or 1, Hq or 1] (float32 [B, Hq] after validation; no gradient)."""

    steps: tuple[ModStep, ...]
    head_factor: Any = None

    def text(self) -> str:
        """The steps as the op's ``score_mod`` argument: ``"mul(0.02);tanh;mul(50.0)"``."""
        return ";".join(step.text() for step in self.steps)

    @staticmethod
    def parse(text: str, head_factor: Any = None) -> ScoreMod:
        """The mod of its :meth:`text` and factor."""
        return ScoreMod(tuple(ModStep.parse(part) for part in text.split(";")), head_factor)

    def describe(self) -> str:
        """The function in a report line, applied to ``s``."""
        x = "s"
        for step in self.steps:
            x = {"mul": f"{x} * {step.a:g}", "add": f"{x} + {step.a:g}", "square": f"({x})^2",
                 "mul_head": f"{x} * factor[h]", "clamp": f"clamp({x}, {step.a:g}, {step.b:g})"}.get(
                step.op, f"{step.op}({x})")
        return x

    def apply(self, x: torch.Tensor, factor: torch.Tensor | None = None,
              derivative: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``mod(x)`` with PyTorch's own ops (``factor`` broadcast against x for ``mul_head``), and with
        ``derivative`` its derivative in x as PyTorch's backward formulas give it."""
        grad = torch.ones_like(x) if derivative else None
        for step in self.steps:
            if step.op == "mul":
                x, local = x * step.a, step.a
            elif step.op == "add":
                x, local = x + step.a, 1.0
            elif step.op == "mul_head":
                x, local = x * factor, factor
            elif step.op == "tanh":
                x = torch.tanh(x)
                local = 1 - x * x
            elif step.op == "sigmoid":
                x = torch.sigmoid(x)
                local = x * (1 - x)
            elif step.op == "relu":
                x, local = torch.relu(x), (x > 0).to(x.dtype)
            elif step.op == "clamp":
                x, local = torch.clamp(x, step.a, step.b), ((x >= step.a) & (x <= step.b)).to(x.dtype)
            else:  # square
                x, local = x * x, 2 * x
            if grad is not None:
                grad = grad * local
        return (x, grad) if derivative else x

    def bounds(self, low: torch.Tensor, high: torch.Tensor,
               factor: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """An interval holding ``mod(x)`` for every x in [low, high] (0-d float64 tensors, on any device: computed
        there, nothing read on the host; ``factor``: the range of the head factor, default 1)."""
        for step in self.steps:
            if step.op in ("mul", "mul_head"):
                values = (step.a, step.a) if step.op == "mul" else factor or (1.0, 1.0)
                ends = torch.stack([e * f for e in (low, high) for f in values])
                low, high = ends.amin(), ends.amax()
            elif step.op == "add":
                low, high = low + step.a, high + step.a
            elif step.op == "tanh":
                low, high = torch.tanh(low), torch.tanh(high)
            elif step.op == "sigmoid":
                low, high = torch.sigmoid(low), torch.sigmoid(high)
            elif step.op == "relu":
                low, high = low.clamp_min(0.0), high.clamp_min(0.0)
            elif step.op == "clamp":
                low, high = low.clamp(step.a, step.b), high.clamp(step.a, step.b)
            else:  # square
                low_sq, high_sq = low * low, high * high
                spans_zero = (low <= 0.0) & (high >= 0.0)
                low, high = torch.where(spans_zero, 0.0, torch.minimum(low_sq, high_sq)), torch.maximum(low_sq, high_sq)
        return low, high


@dataclass(frozen=True)
class FilledRows:
    """The structural masks stand for one finite ``fill`` (transformers' ``finfo.min``): a row they hide entirely
    holds the fill in every entry, so it is eager's uniform average over all Nk keys, LSE ``fill + log(Nk)``.
    ``added``: the fill was added to the scores, so they get the uniform softmax's gradient (reaching q, k, the
    bias and the relative table); otherwise it replaced them (masked_fill) and only v gets a gradient."""

    fill: float
    added: bool = False


@dataclass(frozen=True, eq=False)
class AttentionSpec:
    """Everything an attention call computes besides q, k, v (the module docstring states the contract)."""

    scale: float
    band: Band = Band()
    key_valid: Any = None
    documents: Documents | None = None
    bias: Bias | None = None
    alibi: Alibi | None = None
    relative: RelativeTable | None = None
    dropout: Dropout = Dropout()
    kv_heads_tiled: bool = False
    excluded_fill: float | None = None
    filled_rows: FilledRows | None = None
    score_mod: ScoreMod | None = None
    sinks: Any = None  # float logits [B or 1, Hq or 1, Nq or 1] that join each row's softmax (float32 [B, Hq, Nq])

    # ---- questions the op, the kernels and the cost model ask ----

    @property
    def structural(self) -> bool:
        """Whether structural masks hide keys (they replace the scores they hide, as masked_fill does)."""
        return self.band.bounded or self.key_valid is not None or self.documents is not None

    @property
    def is_checked(self) -> bool:
        """Whether a call proves its exclusions exact at run time (flash_fx.exactness), and so may ask for the
        original ops: a finite fill was excluded, or a bias sits beside masks that replace the scores."""
        return self.excluded_fill is not None or (self.bias is not None and self.structural)

    def features(self) -> dict[str, bool]:
        """The features that select a compiled kernel and change its cost (autotuning keys, fallback records)."""
        return dict(causal=self.band.upper is not None, window=self.band.lower is not None,
                    sparse=self.bias is not None and self.bias.holds_masks, bias=self.bias is not None,
                    dropout=self.dropout.enabled, key_padding=self.key_valid is not None,
                    documents=self.documents is not None, alibi=self.alibi is not None,
                    rel=self.relative is not None, kv_tiled=self.kv_heads_tiled,
                    bias_grad=self.bias is not None and self.bias.requires_grad, mod=self.score_mod is not None,
                    rel_grad=self.relative is not None and self.relative.requires_grad)

    def replace(self, **changes: Any) -> AttentionSpec:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def with_grads(self, bias: bool, relative: bool) -> AttentionSpec:
        """The spec whose backward also returns the bias's and the relative table's gradients as asked."""
        return self.replace(
            bias=None if self.bias is None else dataclasses.replace(self.bias, requires_grad=bias),
            relative=None if self.relative is None else dataclasses.replace(self.relative, requires_grad=relative))

    # ---- validation ----

    def validate(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> AttentionSpec:
        """Check the call against q, k, v (an :class:`AttentionInputError` naming what does not fit) and return the
        spec the kernels read: band clamped, key validity and documents as [B, N] (documents int32, ``sorted``
        set), the bias expanded to [B, Hq, Nq, Nk], ALiBi slopes float32 [B, Hq], the relative vector [B, Hq,
        Nq + Nk - 1], dropout checked (expanded tensors are views with zero strides)."""
        _check_qkv(q, k, v)
        batch, heads, n_q, n_k = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        key_valid = self.key_valid
        if key_valid is not None:
            if not isinstance(key_valid, torch.Tensor) or key_valid.dtype != torch.bool:
                got = getattr(key_valid, "dtype", key_valid)
                raise AttentionInputError(f"key_valid must be a bool tensor, got {got}")
            key_valid = _batch_rows(key_valid, batch, n_k, "key_valid")
        if self.filled_rows is not None and (self.dropout.p > 0 or not math.isfinite(self.filled_rows.fill)
                                             or self.sinks is not None):
            raise AttentionInputError("filled rows need a finite fill, no dropout and no sinks")
        return self.replace(band=self.band.clamped(n_q + n_k), key_valid=key_valid,
                            documents=_documents(self.documents, batch, n_q, n_k), bias=_bias(self.bias, q, k),
                            alibi=_alibi(self.alibi, batch, heads, q.device),
                            relative=_relative(self.relative, batch, heads, n_q, n_k, q.device),
                            score_mod=_score_mod(self.score_mod, batch, heads, q.device),
                            sinks=_sinks(self.sinks, batch, heads, n_q, q.device),
                            dropout=self.dropout.validated())

    # ---- the dense meaning ----

    def visible(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor | None:
        """Bool [B or 1, len(rows), len(cols)]: which (query ``rows``, key ``cols``) pairs the structural masks of
        a validated spec let attend (None without structural masks)."""
        band = self.band.visible(rows, cols)
        ok = None if band is None else band[None]
        if self.key_valid is not None:
            ok = _and(ok, self.key_valid[:, None, cols])
        if self.documents is not None:
            ok = _and(ok, self.documents.q_ids[:, rows, None] == self.documents.k_ids[:, None, cols])
        return ok

    def kv_index(self, heads: int, kv_heads: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The KV head each of ``heads`` query heads reads: ``h // (heads // kv_heads)``, or ``h % kv_heads`` with
        ``kv_heads_tiled`` (int64 [heads])."""
        h = torch.arange(heads, device=device)
        return h % kv_heads if self.kv_heads_tiled else h // (heads // kv_heads)

    def modified(self, scores: torch.Tensor) -> torch.Tensor:
        """``mod(scores)`` of the spec's score modification (scores [B, Hq, ...] of a validated spec; unchanged
        without one)."""
        if self.score_mod is None:
            return scores
        factor = self.score_mod.head_factor
        if factor is not None:
            factor = factor.to(scores.dtype).reshape(*factor.shape, *(1,) * (scores.dim() - 2))
        return self.score_mod.apply(scores, factor)

    def materialize(self, q: torch.Tensor, k: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense [B, Hq, Nq, Nk] ``terms`` of a validated spec (bias + ALiBi + relative table, ``-inf`` where
        the structural masks hide a key) in ``dtype``: what the kernels add to ``q @ k^T * scale``."""
        batch, heads, n_q, n_k = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        rows, cols = torch.arange(n_q, device=q.device), torch.arange(n_k, device=q.device)
        terms = torch.zeros((batch, heads, n_q, n_k), dtype=dtype, device=q.device)
        if self.bias is not None:
            terms = terms + self.bias.values.to(dtype)
        if self.alibi is not None:
            terms = terms + self.alibi.slopes.to(dtype)[:, :, None, None] * self.alibi.positions(rows, cols).to(dtype)
        if self.relative is not None:
            terms = terms + self.relative.gather(rows, cols, n_q).to(dtype)
        visible = self.visible(rows, cols)
        if visible is not None:
            terms = terms.masked_fill(~visible[:, None], float("-inf"))
        return terms

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The output this spec stands for, computed densely in float64 (tests' reference; q, k, v as for
        :meth:`validate`, the spec validated)."""
        from flash_fx.kernels.dropout import dropout_keep_mask

        kv = self.kv_index(q.shape[1], k.shape[1], q.device)
        k64, v64 = k.double()[:, kv], v.double()[:, kv]
        scores = self.modified(q.double() @ k64.transpose(-1, -2) * self.scale) + self.materialize(q, k)
        if self.sinks is not None:  # one more logit per row in the softmax, without a value
            p = torch.cat([scores, self.sinks.double()[..., None]], -1).softmax(-1)[..., :-1]
        else:
            p = scores.softmax(-1)
        if self.filled_rows is not None:  # rows the masks hide entirely: uniform, with eager's gradient
            unmasked = self.modified(q.double() @ k64.transpose(-1, -2) * self.scale) + self.replace(
                band=Band(), key_valid=None, documents=None).materialize(q, k)
            if not self.filled_rows.added:
                unmasked = unmasked.detach()
            dead = (scores == float("-inf")).all(-1, keepdim=True)
            uniform = (unmasked - unmasked.detach()).softmax(-1)
            p = torch.where(dead, uniform, scores.masked_fill(dead, 0.0).softmax(-1))
        if self.dropout.enabled:
            keep = dropout_keep_mask(self.dropout.seed, self.dropout.offset, q.shape[0] * q.shape[1], q.shape[2],
                                     k.shape[2], self.dropout.p, q.device).view_as(p)
            p = p * keep * self.dropout.scale
        return p @ v64

    # ---- the custom op's flat schema ----

    def op_args(self) -> tuple[tuple, dict[str, Any]]:
        """``(args, kwargs)`` after q, k, v of ``torch.ops.flash_fx.attention`` for this spec (kwargs only where
        they differ from the schema's defaults). Dropout's seed is the op's own: only ``p`` is passed."""
        kwargs: dict[str, Any] = {}
        if self.kv_heads_tiled:
            kwargs["kv_heads_tiled"] = True
        if self.band.lower is not None:
            kwargs["window"] = [self.band.lower, UNBOUNDED if self.band.upper is None else self.band.upper]
        if self.key_valid is not None:
            kwargs["key_valid"] = self.key_valid
        if self.documents is not None:
            kwargs["q_doc"], kwargs["k_doc"] = self.documents.q_ids, self.documents.k_ids
        if self.dropout.enabled:
            kwargs["dropout_p"] = self.dropout.p
        if self.bias is not None and self.bias.holds_masks:
            kwargs["sparse_bias"] = True
        if self.alibi is not None:
            kwargs["alibi_slopes"] = self.alibi.slopes
            if self.alibi.symmetric:
                kwargs["alibi_symmetric"] = True
        if self.relative is not None:
            kwargs["rel_bias"] = self.relative.values
        if self.excluded_fill is not None:
            kwargs["excluded_fill"] = self.excluded_fill
        if self.score_mod is not None:
            kwargs["score_mod"] = self.score_mod.text()
            if self.score_mod.head_factor is not None:
                kwargs["score_mod_factor"] = self.score_mod.head_factor
        if self.sinks is not None:
            kwargs["sinks"] = self.sinks
        if self.filled_rows is not None:
            kwargs["filled_rows"] = self.filled_rows.fill
            if self.filled_rows.added:
                kwargs["filled_rows_added"] = True
        bias = None if self.bias is None else self.bias.values
        return (bias, self.scale, self.band.upper), kwargs

    @staticmethod
    def from_op_args(bias: Any, scale: float, causal_offset: int | None, kv_heads_tiled: bool = False,
                     window: list[int] | tuple[int, int] | None = None, key_valid: Any = None, q_doc: Any = None,
                     k_doc: Any = None, dropout_p: float = 0.0, sparse_bias: bool = False, alibi_slopes: Any = None,
                     alibi_symmetric: bool = False, rel_bias: Any = None, excluded_fill: float | None = None,
                     filled_rows: float | None = None, filled_rows_added: bool = False,
                     score_mod: str | None = None, score_mod_factor: Any = None, sinks: Any = None,
                     seed: int | None = None) -> AttentionSpec:
        """The spec of an op call's arguments after q, k, v (``seed``: the call's dropout seed)."""
        if window is not None and len(window) != 2:
            raise AttentionInputError(f"window must be [left, right], got {window}")
        if (q_doc is None) != (k_doc is None):
            raise AttentionInputError("q_doc and k_doc must be given together")
        if sparse_bias and bias is None:
            raise AttentionInputError("sparse_bias=True needs a bias (the mask whose empty tiles are skipped)")
        lower, right = (None, None) if window is None else (window[0], window[1])
        return AttentionSpec(
            scale=scale,
            band=Band(lower, _tighter(causal_offset, right)),
            key_valid=key_valid,
            documents=None if q_doc is None else Documents(q_doc, k_doc),
            bias=None if bias is None else Bias(bias, holds_masks=bool(sparse_bias)),
            alibi=None if alibi_slopes is None else Alibi(alibi_slopes, bool(alibi_symmetric)),
            relative=None if rel_bias is None else RelativeTable(rel_bias),
            dropout=Dropout(float(dropout_p), seed),
            kv_heads_tiled=bool(kv_heads_tiled),
            excluded_fill=excluded_fill,
            filled_rows=None if filled_rows is None else FilledRows(float(filled_rows), bool(filled_rows_added)),
            score_mod=None if score_mod is None else ScoreMod.parse(score_mod, score_mod_factor),
            sinks=sinks,
        )


def _tighter(a: int | None, b: int | None) -> int | None:
    """The smaller of two upper offsets (None: no bound)."""
    return b if a is None else a if b is None else min(a, b)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise AttentionInputError(f"expected 4-d q, k, v; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise AttentionInputError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise AttentionInputError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")


def _documents(documents: Documents | None, batch: int, n_q: int, n_k: int) -> Documents | None:
    if documents is None:
        return None
    q_ids, k_ids = _integer_ids(documents.q_ids, documents.k_ids)
    return Documents(_batch_rows(q_ids, batch, n_q, "q_doc"), _batch_rows(k_ids, batch, n_k, "k_doc"))


def _bias(bias: Bias | None, q: torch.Tensor, k: torch.Tensor) -> Bias | None:
    if bias is None:
        return None
    _check_float_tensor("bias", bias.values)
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    try:
        values = bias.values.expand(shape)
    except RuntimeError as error:
        raise AttentionInputError(f"the bias {tuple(bias.values.shape)} does not broadcast to {shape}") from error
    _check_device("bias", values, q.device)
    return dataclasses.replace(bias, values=values)


def _alibi(alibi: Alibi | None, batch: int, heads: int, device: torch.device) -> Alibi | None:
    if alibi is None:
        return None
    slopes = alibi.slopes
    _check_float_tensor("alibi_slopes", slopes)
    if slopes.dim() != 2 or slopes.shape[0] not in (1, batch) or slopes.shape[1] not in (1, heads):
        raise AttentionInputError(f"alibi_slopes must have shape [{batch} or 1, {heads} or 1], "
                                  f"got {tuple(slopes.shape)}")
    _check_device("alibi_slopes", slopes, device)
    return Alibi(slopes.detach().to(torch.float32).expand(batch, heads), bool(alibi.symmetric))


def _score_mod(mod: ScoreMod | None, batch: int, heads: int, device: torch.device) -> ScoreMod | None:
    if mod is None:
        return None
    if not 0 < len(mod.steps) <= MAX_MOD_STEPS:
        raise AttentionInputError(f"a score modification has 1 to {MAX_MOD_STEPS} steps, got {len(mod.steps)}")
    if sum(step.op == "mul_head" for step in mod.steps) != (mod.head_factor is not None):
        raise AttentionInputError("a score modification multiplies by its head factor exactly once if it has one")
    factor = mod.head_factor
    if factor is None:
        return mod
    _check_float_tensor("score_mod_factor", factor)
    if factor.dim() != 2 or factor.shape[0] not in (1, batch) or factor.shape[1] not in (1, heads):
        raise AttentionInputError(f"score_mod_factor must have shape [{batch} or 1, {heads} or 1], "
                                  f"got {tuple(factor.shape)}")
    _check_device("score_mod_factor", factor, device)
    return ScoreMod(mod.steps, factor.detach().to(torch.float32).expand(batch, heads))


def _sinks(sinks: Any, batch: int, heads: int, n_q: int, device: torch.device) -> torch.Tensor | None:
    if sinks is None:
        return None
    _check_float_tensor("sinks", sinks)
    shape = (batch, heads, n_q)
    if sinks.dim() != 3 or any(s not in (1, n) for s, n in zip(sinks.shape, shape, strict=True)):
        raise AttentionInputError(f"sinks must have shape [{batch} or 1, {heads} or 1, {n_q} or 1], "
                                  f"got {tuple(sinks.shape)}")
    _check_device("sinks", sinks, device)
    return sinks.detach().to(torch.float32).expand(shape)


def _relative(table: RelativeTable | None, batch: int, heads: int, n_q: int, n_k: int,
              device: torch.device) -> RelativeTable | None:
    if table is None:
        return None
    values = table.values
    _check_float_tensor("rel_bias", values)
    length = max(n_q + n_k - 1, 0)
    if (values.dim() != 3 or values.shape[0] not in (1, batch) or values.shape[1] not in (1, heads)
            or values.shape[2] != length):
        raise AttentionInputError(f"rel_bias must have shape [{batch} or 1, {heads} or 1, {length}] (the "
                                  f"Nq + Nk - 1 = {n_q} + {n_k} - 1 relative positions), got {tuple(values.shape)}")
    _check_device("rel_bias", values, device)
    return RelativeTable(values.detach().expand(batch, heads, length), table.requires_grad)


def _check_float_tensor(name: str, value: object) -> None:
    if not isinstance(value, torch.Tensor):
        raise AttentionInputError(f"{name} must be a float tensor, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise AttentionInputError(f"{name} must be a float tensor, got {value.dtype}")


def _check_device(name: str, value: torch.Tensor, device: torch.device) -> None:
    if value.device != device:
        raise AttentionInputError(f"{name} must be on {device}, like q, got {value.device}")


def _clamp(offset: int, reach: int) -> int:
    return max(-reach, min(int(offset), reach))


def _integer_ids(q_doc: torch.Tensor, k_doc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer (or bool) document ids in one dtype with the same equalities: int64 if either is int64 (or
    uint32/uint64, whose values may not fit int32), else int32; exact, decided from the dtypes alone (float ids are
    refused)."""
    for name, ids in (("q_doc", q_doc), ("k_doc", k_doc)):
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype.is_complex:
            raise AttentionInputError(f"{name} must hold integer ids, got {getattr(ids, 'dtype', ids)}")
    narrow = (torch.bool, torch.int8, torch.uint8, torch.int16, torch.uint16, torch.int32)
    if q_doc.dtype in narrow and k_doc.dtype in narrow:
        return q_doc.to(torch.int32), k_doc.to(torch.int32)
    if torch.uint64 in (q_doc.dtype, k_doc.dtype):
        raise AttentionInputError("document ids of dtype uint64 are not supported (int64 ids are)")
    return q_doc.to(torch.int64), k_doc.to(torch.int64)


def group_heads(x: torch.Tensor, num_kv_heads: int, tiled: bool) -> torch.Tensor:
    """View [B, Hq, N, ...] as [B, Hkv, group, N, ...]: the query heads each KV head serves (the mapping of
    :meth:`AttentionSpec.kv_index`: ``h // group``, or ``h % Hkv`` if ``tiled``)."""
    group = x.shape[1] // num_kv_heads
    if tiled:
        return x.unflatten(1, (group, num_kv_heads)).transpose(1, 2)
    return x.unflatten(1, (num_kv_heads, group))


def ungroup_heads(x: torch.Tensor, tiled: bool) -> torch.Tensor:
    """Inverse of :func:`group_heads`: [B, Hkv, group, N, ...] back to [B, Hq, N, ...]."""
    return x.transpose(1, 2).flatten(1, 2) if tiled else x.flatten(1, 2)


def _and(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else a & b


def _batch_rows(x: torch.Tensor, batch: int, n: int, name: str) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] != n or x.shape[0] not in (1, batch):
        raise AttentionInputError(f"{name} must have shape [{batch} or 1, {n}], got {tuple(x.shape)}")
    return x.expand(batch, n)
