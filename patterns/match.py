"""The attention matcher: anchored on each softmax (and each explicit SDPA call), walk back to Q @ K^T and
forward to P @ V.

Works only on canonical descriptions (patterns.canonical), so every spelling of a matmul, a scale, a
cast, a view or a softmax is matched by the same walk. Returns an AttentionMatch, or a NearMiss that says
why this softmax was left alone, in words a user can act on.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from flash_fx.kernels.spec import MAX_MOD_STEPS, ModStep
from flash_fx.patterns.canonical import (
    AddBias,
    Cast,
    DropLast,
    DropoutCall,
    HeadExpand,
    Identity,
    MaskedFill,
    MatMul,
    Operand,
    PointwiseMod,
    Reshape,
    RowMaxShift,
    Scale,
    ScaledDotProductAttention,
    SinkConcat,
    Softmax,
    canonicalize,
    swapped_last_two,
)
from flash_fx.patterns.masks import concrete
from flash_fx.patterns.mutation import returns_self
from flash_fx.patterns.uses import value_users
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from flash_fx import kernels

RSQRT_HEAD_DIM = "rsqrt_head_dim"  # a dynamic scale: 1 / sqrt(q.size(-1)), for symbolic head dims
WEIGHTS_HINT = ("; if these are returned attention weights, pass output_attentions=False "
                "(or stop returning them) to let flash_fx fuse this block")


@dataclass
class ScoreTerm:
    """A mask or bias applied to the scores (of shape scores_shape), and the constant factor after it."""

    op: MaskedFill | AddBias
    scores_shape: tuple
    factor_after: float = 1.0
    merged: bool = False  # applied in the [B*H, Nq, Nk] layout while the match's batch view is [B, H, Nq, Nk]

    @property
    def tensor(self) -> fx.Node:
        """The mask or bias tensor node."""
        return self.op.mask if isinstance(self.op, MaskedFill) else self.op.bias


@dataclass
class AttentionMatch:
    """softmax(scale * Q @ K^T + masks) @ V found in a graph: everything the rewrite needs."""

    anchor: fx.Node  # the softmax (or SDPA) node: where the report points
    output: fx.Node  # the node whose value the kernel call replaces (P @ V, or the SDPA call)
    nodes: list[fx.Node]  # the nodes from Q @ K^T to P @ V that the rewrite removes
    q: Operand
    k: Operand  # K itself [..., Nk, d] when `k_is_transposed` is False, else K^T [..., d, Nk]
    k_is_transposed: bool
    v: Operand
    kv_heads_tiled: bool  # GQA K/V un-expanded: query head h reads KV head h % Hkv (else h // group)
    scale: float  # constant part of the scale
    dynamic_scales: list  # Scale descriptions with non-constant factors, or RSQRT_HEAD_DIM; applied to q
    terms: list[ScoreTerm]  # masks and biases in program order
    causal: bool  # an explicit causal flag (SDPA is_causal)
    batch_view: tuple | None  # sizes of the batch layout the masks see, when views regroup batch and heads
    out_perm: tuple[int, ...] | None  # einsum output order of the P @ V product
    q_shape: tuple  # [..., Nq, d] after the operand's permute
    k_shape: tuple  # [..., Nk, d]
    v_shape: tuple  # [..., Nk, d]
    dtype: torch.dtype
    device_type: str  # "cpu" or "cuda": where the kernels run, which the cost model predicts for
    location: str
    zero_dead_rows: bool = False  # fully masked rows give 0 (SDPA) instead of NaN (softmax)
    dropout_p: float = 0.0  # dropout on the probabilities in training, fused into the kernels
    score_mod: tuple[ModStep, ...] = ()  # pointwise steps on the scaled scores before every term (kernels.spec)
    score_mod_factor: fx.Node | None = None  # the per-(batch, head) factor of a mul_head step
    sinks: fx.Node | None = None  # the one-column logits [.., Nq, 1] concatenated to the scores (attention sinks)
    notes: list[str] = field(default_factory=list)


@dataclass
class NearMiss:
    """A softmax that was not rewritten, and why."""

    node: fx.Node
    reason: str
    location: str


def anchor_nodes(graph: fx.Graph) -> list[fx.Node]:
    """The matcher's anchors in graph order: softmax nodes and explicit SDPA calls."""
    return [node for node in graph.nodes if isinstance(canonicalize(node), Softmax | ScaledDotProductAttention)]


def match_anchor(node: fx.Node) -> AttentionMatch | NearMiss:
    """The attention around the anchor `node`, or a NearMiss saying why there is none."""
    desc = canonicalize(node)
    result = _match_sdpa(node, desc) if isinstance(desc, ScaledDotProductAttention) else _match_softmax(node, desc)
    return result if isinstance(result, AttentionMatch) else NearMiss(node, result, location(node))


def location(node: fx.Node) -> str:
    """'file:line' of the model source that produced `node`, or its graph name when unknown."""
    trace = node.stack_trace or node.meta.get("stack_trace") or ""
    lines = [line.strip() for line in trace.splitlines() if line.strip().startswith("File ")]
    if not lines:
        return f"<graph node {node.name}>"
    last = lines[-1]  # File "path", line N, in fn
    parts = last.split('"')
    path = parts[1] if len(parts) > 2 else "?"
    line = last.split("line ")[-1].split(",")[0]
    return f"{path.rsplit('/', 1)[-1]}:{line}"


def _value(node: fx.Node) -> torch.Tensor | None:
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _shape(node: fx.Node) -> tuple:
    return tuple(_value(node).shape)


def _only_value_user(node: fx.Node) -> fx.Node | None:
    """The one user that reads ``node``'s values (dead uses and reads of its shape or dtype aside), else None."""
    users = value_users(node)
    return users[0] if len(users) == 1 else None


def _multiplies(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` is a product whose left operand is ``node`` (the P @ V the walk looks for)."""
    desc = canonicalize(user)
    return isinstance(desc, MatMul) and desc.a.node is node


def _used_outside(node: fx.Node, inside: set[fx.Node]) -> bool:
    """Whether a use of ``node`` that reads its values lies outside the pattern's nodes ``inside``."""
    return any(user not in inside for user in value_users(node))


def _escape(what: str, node: fx.Node, inside: set[fx.Node]) -> str:
    """Why ``node`` (scores or probabilities) cannot be fused: the users outside ``inside`` that read its values,
    named with their model lines; the hint about returned weights only when one of them is the graph's output."""
    others = [user for user in value_users(node) if user not in inside and not _multiplies(user, node)]
    returned = any(user.op == "output" for user in others)
    named = ", ".join("the graph's outputs" if user.op == "output" else f"{_op_name(user)} at {location(user)}"
                      for user in others[:3])
    return f"{what} ({node.name}) are also used outside the attention, by {named}" + (WEIGHTS_HINT if returned else "")


def _same(a: object, b: object) -> bool:
    """a == b for sizes that may be symbolic, without adding a guard (unknown counts as different)."""
    return statically_known_true(a == b)


def _match_softmax(softmax: fx.Node, canon: Softmax) -> AttentionMatch | str:
    scores = _value(canon.x)
    if scores is None or scores.dim() < 2:
        return "softmax input has no tensor example value"
    if canon.dim not in (-1, scores.dim() - 1):
        return f"softmax over dim {canon.dim}, not the key axis (last dim)"

    # Walk back from the softmax to the Q @ K^T product.
    back: list[fx.Node] = []
    inside = {softmax}  # the nodes of the pattern so far: the only users the scores may have
    node = canon.x
    while not isinstance(desc := canonicalize(node), MatMul):
        if desc is None and (factor := _non_scalar_factor(node)) is not None:
            return f"scores are multiplied by a non-scalar tensor of shape {factor} (the kernel applies one scale)"
        if desc is None or isinstance(desc, Softmax | DropoutCall | HeadExpand | ScaledDotProductAttention | DropLast):
            return f"scores come from {_op_name(node)}, not from a Q @ K^T product"
        if _used_outside(node, inside):
            return _escape("scores", node, inside)
        if isinstance(desc, Cast) and _narrows(desc.x, node):
            return f"scores are cast to {_value(node).dtype} ({node.name}), which rounds them before the softmax"
        back.append(node)
        inside.add(node)
        if isinstance(desc, RowMaxShift):  # softmax is invariant to it: its max joins the pattern, dropped
            for reduction in desc.reduction:
                if _used_outside(reduction, inside):
                    return _escape("the scores' row max", reduction, inside)
                back.append(reduction)
                inside.add(reduction)
        node = desc.x
    qk, qk_desc = node, desc
    if _used_outside(qk, inside):
        return _escape("scores", qk, inside)
    if qk_desc.out_perm is not None:
        return "the Q @ K^T einsum writes its output transposed"
    back.reverse()  # program order: from Q @ K^T towards the softmax

    # Walk forward from the softmax to the P @ V product.
    sinks = next((d.sink for d in map(canonicalize, back) if isinstance(d, SinkConcat)), None)
    forward: list[fx.Node] = []
    dropout_p, dropped_sink = 0.0, False
    node = softmax
    while True:
        user = _only_value_user(node)
        if user is None:
            return _escape("attention probabilities", node, set())
        desc = canonicalize(user)
        if isinstance(desc, MatMul):
            break
        if isinstance(desc, DropoutCall):
            why = _fusable_dropout(desc.p, dropout_p)
            if why is not None:
                return why
            dropout_p = desc.p
        elif isinstance(desc, DropLast) and sinks is not None and not dropped_sink:
            dropped_sink = True
        elif not isinstance(desc, Cast | Identity | Reshape):
            return f"probabilities go to {_op_name(user)}, not to a P @ V product"
        forward.append(user)
        node = user
    pv, pv_desc = user, desc
    if sinks is not None and not dropped_sink:
        return "the sink column of the probabilities is not sliced away before the P @ V product"
    if pv_desc.a.node is not node or pv_desc.a.perm is not None:
        return "probabilities are not the left operand of the P @ V product (it must contract over the keys)"
    if pv_desc.alpha != 1.0 or pv_desc.addend is not None:
        return "the P @ V product is scaled or has an addend"

    score_ops = [canonicalize(n) for n in back]
    if qk_desc.addend is not None:  # baddbmm's input is an additive bias on the scores
        score_ops.insert(0, AddBias(qk, qk_desc.addend, factor=qk_desc.beta))
    folded = _fold_score_ops(score_ops, qk_desc.alpha)
    if isinstance(folded, str):
        return folded
    scale, dynamic_scales, terms, mod = folded

    views = [desc for desc in score_ops if isinstance(desc, Reshape)]
    views += [d for d in map(canonicalize, forward) if isinstance(d, Reshape)]
    batch_view = None
    if views:
        widest_shape = max((_shape(n) for n in [*back, *forward] if isinstance(canonicalize(n), Reshape)), key=len)
        batch_view = _batch_view(views, terms, qk_desc, pv_desc, widest_shape)
        if isinstance(batch_view, str):
            return batch_view
    return _finish(
        anchor=softmax, output=pv, nodes=[qk, *back, softmax, *forward, pv], q=qk_desc.a, k=qk_desc.b,
        k_is_transposed=True, v=pv_desc.b, scale=scale, dynamic_scales=dynamic_scales, terms=terms, causal=False,
        batch_view=batch_view, out_perm=pv_desc.out_perm, dropout_p=dropout_p, score_mod=tuple(mod.steps),
        score_mod_factor=mod.factor, sinks=sinks,
    )


def _narrows(source: fx.Node, cast: fx.Node) -> bool:
    """True if the cast from `source` to `cast` loses range or precision (float32 -> float16, ...)."""
    before, after = _value(source), _value(cast)
    if before is None or after is None or before.dtype == after.dtype:
        return False
    return torch.finfo(after.dtype).bits <= torch.finfo(before.dtype).bits  # float16 <-> bfloat16 included


def _non_scalar_factor(node: fx.Node) -> tuple | None:
    """The shape of the smaller factor when `node` multiplies or divides two tensors with >0 dims."""
    if node.target not in ("mul", "div", torch.mul, torch.div, operator.mul, operator.truediv):
        return None
    shapes = [tuple(_value(a).shape) for a in node.args[:2] if _value(a) is not None]
    return min(shapes, key=len) if len(shapes) == 2 and all(shapes) else None


def _fusable_dropout(p: object, earlier: float) -> str | None:
    """None if dropout with probability p can run inside the kernels, else why not."""
    if not isinstance(p, float):
        return f"dropout probability {p} is not a constant"
    if not 0.0 <= p < 1.0:
        return f"dropout probability {p} is not in [0, 1)"
    if earlier:
        return "two dropouts on the probabilities"
    return None


@dataclass
class _Mod:
    """The score modification collected by :func:`_fold_score_ops`."""

    steps: list[ModStep] = field(default_factory=list)
    factor: fx.Node | None = None


def _fold_score_ops(score_ops: list, alpha: float) -> tuple[float, list, list[ScoreTerm], _Mod] | str:
    """Fold the scales before any pointwise function into one constant (plus dynamic factors), collect the score
    modification (pointwise functions and the scales after the first of them) and the masks and biases after it."""
    scale, dynamic_scales, terms, mod, shifted, sunk = alpha, [], [], _Mod(), False, False
    for desc in score_ops:
        if sunk and desc is not None and not isinstance(desc, RowMaxShift | Cast | Identity | SinkConcat):
            return "the scores change after the sink logits are appended to them"
        if isinstance(desc, SinkConcat):
            if sunk:
                return "two sink columns are appended to the scores"
            sunk = True
        elif isinstance(desc, Scale):
            if isinstance(desc.factor, float):
                factor = 1.0 / desc.factor if desc.reciprocal else desc.factor
                if terms and factor <= 0:
                    return "a non-positive scale is applied after a mask"
                if mod.steps:
                    mod.steps.append(ModStep("mul", factor))
                else:
                    scale *= factor
                for term in terms:
                    term.factor_after *= factor
            elif terms or mod.steps:
                return "a non-constant scale is applied after a mask, bias or score modification"
            else:
                dynamic_scales.append(desc)
        elif isinstance(desc, PointwiseMod):
            why = _mod_step_refused(desc, terms, mod, shifted)
            if why is not None:
                return why
            mod.steps.append(ModStep(desc.op, desc.a, desc.b))
            mod.factor = desc.factor if desc.op == "mul_head" else mod.factor
        elif isinstance(desc, RowMaxShift):
            shifted = True
        elif isinstance(desc, MaskedFill | AddBias):
            terms.append(ScoreTerm(desc, _shape(desc.x), getattr(desc, "factor", 1.0)))
    if not math.isfinite(scale) or scale == 0:
        return f"scale {scale} is not a finite non-zero number"
    return scale, dynamic_scales, terms, mod


def _mod_step_refused(desc: PointwiseMod, terms: list[ScoreTerm], mod: _Mod, shifted: bool) -> str | None:
    """Why a pointwise function of the scores cannot join the score modification (kernels.spec.ScoreMod)."""
    what = f"{desc.op} of the scores"
    if terms:
        return f"{what} is applied after a mask or bias (the kernels apply score modifications before them)"
    if shifted:
        return f"{what} is applied after a row-max subtraction (it is not invariant to that shift)"
    if len(mod.steps) >= MAX_MOD_STEPS:
        return f"the scores go through more than {MAX_MOD_STEPS} pointwise steps"
    if desc.op == "mul_head":
        if mod.factor is not None:
            return "the scores are multiplied by two per-head tensors"
        if desc.factor.meta["example_value"].requires_grad:
            return (f"the scores are multiplied by a per-head tensor ({desc.factor.name}) that needs a gradient "
                    "(the kernels give a score modification's factor none)")
    return None


def _batch_view(views: list[Reshape], terms: list[ScoreTerm], qk: MatMul, pv: MatMul,
                widest_shape: tuple) -> tuple | str:
    """The sizes of the widest batch layout the scores take between the products (views regroup B and H); terms
    applied in the merged [B*H, ..] layout beside a [B, H, ..] view are marked ``merged``."""
    if pv.out_perm is not None:
        return "batch views between the products combined with a permuted einsum output"
    widest = max(views, key=lambda view: len(view.sizes))
    rank = len(widest.sizes)
    for term in terms:
        if len(term.scores_shape) == rank:
            continue
        if not _merged_layout(term, widest_shape):
            return "a mask or bias is applied in a different batch layout than the widest view"
        term.merged = True
    if len(_shape(pv.b.node)) not in (3, rank):
        return "views between the products leave V in an unsupported layout"
    return tuple(widest.sizes[:-2])


def _merged_layout(term: ScoreTerm, sizes: tuple) -> bool:
    """Whether ``term`` is applied to the [B*H, Nq, Nk] scores of a [B, H, Nq, Nk] view (of shape ``sizes``) with
    a tensor of rank at most 3 whose first dim (at rank 3) is 1 or B*H: the rewrite can view it split."""
    if len(sizes) != 4 or len(term.scores_shape) != 3 or not _same(term.scores_shape[0], sizes[0] * sizes[1]):
        return False
    shape = _shape(term.tensor)
    return len(shape) < 3 or (len(shape) == 3 and (_same(shape[0], 1) or _same(shape[0], sizes[0] * sizes[1])))


def _match_sdpa(node: fx.Node, desc: ScaledDotProductAttention) -> AttentionMatch | str:
    why = _fusable_dropout(desc.dropout_p, 0.0)
    if why is not None:
        return why
    if desc.is_causal and desc.attn_mask is not None:
        return "scaled_dot_product_attention with both attn_mask and is_causal"
    q_shape = _shape(desc.q)
    scores_shape = (*q_shape[:-1], _shape(desc.k)[-2])
    terms = []
    if desc.attn_mask is not None:
        mask = _value(desc.attn_mask)
        op = (MaskedFill(node, desc.attn_mask, -math.inf, inverted=True) if mask.dtype == torch.bool
              else AddBias(node, desc.attn_mask))
        terms.append(ScoreTerm(op, scores_shape))
    scale, dynamic_scales = 1.0, []
    if desc.scale is None:
        head_dim = q_shape[-1]
        if isinstance(head_dim, int):
            scale = head_dim**-0.5
        else:
            dynamic_scales.append(RSQRT_HEAD_DIM)
    elif isinstance(desc.scale, float):
        scale = desc.scale
    else:
        dynamic_scales.append(Scale(desc.q, desc.scale))
    return _finish(
        anchor=node, output=node, nodes=[node], q=Operand(desc.q), k=Operand(desc.k), k_is_transposed=False,
        v=Operand(desc.v), scale=scale, dynamic_scales=dynamic_scales, terms=terms, causal=desc.is_causal,
        batch_view=None, out_perm=None, zero_dead_rows=True, dropout_p=desc.dropout_p,
    )


def _finish(*, anchor: fx.Node, q: Operand, k: Operand, k_is_transposed: bool, v: Operand, scale: float,
            batch_view: tuple | None, **fields) -> AttentionMatch | str:
    """Simplify the operands (fold their constant scales, undo GQA head expansion), check shapes, build the match."""
    notes = []
    q, q_factor = _strip_scales(q)
    k, k_is_transposed, k_factor = _plain_key(k, k_is_transposed)
    scale *= q_factor * k_factor
    kv_heads_tiled = False
    if batch_view is None and not k_is_transposed:
        k, v, kv_heads_tiled, note = _undo_head_expansion(k, v)
        notes += [note] if note else []
    shapes = _operand_shapes(q, k, k_is_transposed, v)
    if isinstance(shapes, str):
        return shapes
    q_shape, k_shape, v_shape, dtype, device_type = shapes
    return AttentionMatch(
        anchor=anchor, q=q, k=k, k_is_transposed=k_is_transposed, v=v, kv_heads_tiled=kv_heads_tiled, scale=scale,
        batch_view=batch_view, q_shape=q_shape, k_shape=k_shape, v_shape=v_shape, dtype=dtype, device_type=device_type,
        location=location(anchor), notes=notes, **fields,
    )


def _constant_factor(desc: object) -> float | None:
    if isinstance(desc, Scale) and isinstance(desc.factor, float):
        factor = 1.0 / desc.factor if desc.reciprocal else desc.factor
        if math.isfinite(factor) and factor != 0:
            return factor
    return None


def _strip_scales(operand: Operand) -> tuple[Operand, float]:
    """Fold constant scales on an operand (q * d**-0.5, k / 2, ...) into the attention scale."""
    node, factor = operand.node, 1.0
    # an in-place scale (`q.mul_(c)`) is q itself afterwards: reading its input would read the scaled q again
    while returns_self(node) is None and (f := _constant_factor(canonicalize(node))) is not None:
        factor *= f
        node = canonicalize(node).x
    return Operand(node, operand.perm), factor


def _plain_key(k: Operand, transposed: bool) -> tuple[Operand, bool, float]:
    """K itself when K^T is a swap of K's last two dims (after constant scales), with the scales folded."""
    k, factor = _strip_scales(k)
    rank = len(k.perm) if k.perm is not None else 0
    if transposed and k.perm is not None and k.perm == (*range(rank - 2), rank - 1, rank - 2):
        return Operand(k.node), False, factor  # an einsum reading K^T: K itself
    if transposed and k.perm is None and (source := swapped_last_two(k.node)) is not None:
        k, more = _strip_scales(Operand(source))
        return k, False, factor * more
    return k, transposed, factor


def _undo_head_expansion(k: Operand, v: Operand) -> tuple[Operand, Operand, bool, str | None]:
    """Read shared KV heads directly when K and V were both expanded to the query heads the same way."""
    if k.perm is not None or v.perm is not None:
        return k, v, False, None
    ek, ev = canonicalize(k.node), canonicalize(v.node)
    if (isinstance(ek, HeadExpand) and isinstance(ev, HeadExpand) and ek.tiled == ev.tiled
            and statically_known_true(ek.repeat == ev.repeat)):
        mode = "h % kv_heads" if ek.tiled else "h // group"
        return Operand(ek.x), Operand(ev.x), ek.tiled, f"GQA: KV heads shared x{ek.repeat} ({mode}), read once"
    return k, v, False, None


def _permuted_shape(operand: Operand) -> tuple:
    shape = _shape(operand.node)
    return tuple(shape[i] for i in operand.perm) if operand.perm is not None else shape


def _operand_shapes(q: Operand, k: Operand, k_is_transposed: bool,
                    v: Operand) -> tuple[tuple, tuple, tuple, torch.dtype, str] | str:
    """Shapes of q [..., Nq, d], k [..., Nk, d], v [..., Nk, d], their dtype and device type, or why they do not
    fit."""
    values = [_value(o.node) for o in (q, k, v)]
    if any(v is None for v in values):
        return "an operand has no tensor example value"
    dtypes = {v.dtype for v in values}
    if len(dtypes) != 1:
        return f"q, k, v have different dtypes {sorted(map(str, dtypes))}"
    dtype = dtypes.pop()
    devices = {v.device.type for v in values}
    if len(devices) != 1:
        return f"q, k, v are on different devices {sorted(devices)}"
    device_type = devices.pop()
    q_shape, k_shape, v_shape = (_permuted_shape(o) for o in (q, k, v))
    if min(len(q_shape), len(k_shape), len(v_shape)) < 2:
        return "an operand has fewer than 2 dims"
    if k_is_transposed:
        k_shape = (*k_shape[:-2], k_shape[-1], k_shape[-2])
    batch_rank = max(len(q_shape), len(k_shape), len(v_shape)) - 2
    if batch_rank > 2:
        return f"{batch_rank} batch dims (at most 2: batch and heads)"
    reasons = kernels.supports(concrete(q_shape[-1]), concrete(v_shape[-1]), dtype, device_type)
    if reasons:
        return reasons[0]
    return q_shape, k_shape, v_shape, dtype, device_type


def _op_name(node: fx.Node) -> str:
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    return f"{name} ({node.name})" if node.op != "placeholder" else f"graph input {node.name}"
