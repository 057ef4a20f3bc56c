"""The flash_fx graph pass: match every attention, analyze its masks, plan it (pure), apply the plan, report it."""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from flash_fx import cost
from flash_fx.exactness import is_mask_fill
from flash_fx.kernels import decode, tile_density
from flash_fx.kernels.spec import AttentionSpec, Band, Bias, FilledRows, ScoreMod
from flash_fx.mha import multi_head_attention
from flash_fx.options import Options
from flash_fx.patterns.canonical import AddBias, Cast, MaskedFill, PointwiseMod, Scale, canonicalize, constant_float
from flash_fx.patterns.masks import (
    ConstantMask,
    Literal,
    MaskAnalysis,
    MaskProof,
    Unrecognized,
    analyze_visibility,
    concrete,
    is_zeros,
    mask_bias_condition,
    strip_copies,
)
from flash_fx.patterns.match import (
    RSQRT_HEAD_DIM,
    AttentionMatch,
    NearMiss,
    ScoreTerm,
    anchor_nodes,
    location,
    match_anchor,
)
from flash_fx.patterns.mha import MhaMatch, is_mha_call, match_mha
from flash_fx.patterns.mutation import forget, forward_in_place_results, writes_of
from flash_fx.patterns.positions import (
    AlibiMatch,
    RelativeTableMatch,
    ValueProof,
    analyze_alibi,
    analyze_relative_table,
)
from flash_fx.patterns.uses import detach_side_uses
from flash_fx.report import Report, RewriteRecord, SkipRecord
from flash_fx.rewrite import KernelCall, replace_attention

Proof = MaskProof | ValueProof  # a fact about static mask/position subgraphs, re-checked at run time


@dataclass
class PassResult:
    """The report of one graph and the mask proofs its rewrites rest on."""

    report: Report
    proofs: list[Proof] = field(default_factory=list)


@dataclass
class MaskDecision:
    """How the masks of one match reach the kernel, and the proofs that must keep holding at run time."""

    band: Band | None
    bias_terms: list[ScoreTerm]
    parts: list[str]
    proofs: list[Proof]
    key_valid: Literal | None = None
    documents: tuple[fx.Node, fx.Node] | None = None
    masks_in_bias: int = 0  # how many bias terms are masks (their tiles that hide everything are skipped)
    constant_masks: list[torch.Tensor] = field(default_factory=list)  # values of the constant ones
    alibi: tuple[AlibiMatch, float] | None = None  # an ALiBi term the kernels compute, and the factor applied after it
    relative: tuple[RelativeTableMatch, float] | None = None  # a T5 table read per relative position, and its factor
    excluded_fill: float | None = None  # the largest finite fill the kernels exclude (proved per call)
    filled_rows: FilledRows | None = None  # rows the one finite fill hides entirely: eager's uniform average

    def exclude(self, fill: float) -> None:
        """Note that the kernels exclude entries filled with `fill` (as the softmax sees it)."""
        if fill != -math.inf:
            self.excluded_fill = fill if self.excluded_fill is None else max(self.excluded_fill, fill)

    @property
    def variant(self) -> str:
        """The report's variant name: the most specific structural mask, block_sparse when every dense term is
        a constant mask, or bias when other dense terms remain."""
        if self.bias_terms:
            return "block_sparse" if len(self.constant_masks) == len(self.bias_terms) else "bias"
        if self.documents is not None:
            return "document"
        if self.key_valid is not None:
            return "key_padding"
        return self.band.variant if self.band is not None else "dense"

    @property
    def description(self) -> str:
        return " + ".join(self.parts) or "none"


def run_attention_pass(gm: fx.GraphModule, example_inputs: list[Any], options: Options, graph_id: int,
                       apply: bool = True) -> PassResult:
    """Rewrite the attentions of `gm` in place (unless apply=False) and return what was done.

    The bodies of higher-order ops (activation checkpointing, wrap, ...) are GraphModules of their own: their
    attentions are rewritten too, with masks proved only where the proof needs no graph input there.
    """
    result = PassResult(Report(graph_id))
    _rewrite_graph(gm, example_inputs, options, apply, result)
    for body in _bodies(gm):
        _rewrite_graph(body, None, options, apply, result)
    return result


def _rewrite_graph(gm: fx.GraphModule, example_inputs: list[Any] | None, options: Options, apply: bool,
                   result: PassResult) -> None:
    """Match, plan and rewrite every attention of one graph, adding to `result`."""
    rewrites = len(result.report.rewrites)
    forward_in_place_results(gm.graph)
    for call in [node for node in gm.graph.nodes if is_mha_call(node)]:
        mha = match_mha(call)
        planned = _plan_mha(mha, options)
        if isinstance(planned, SkipRecord):
            result.report.skipped.append(planned)
            continue
        record, dropout_p = planned
        result.report.rewrites.append(record)
        if apply:
            _apply_mha(mha, dropout_p)
    for anchor in anchor_nodes(gm.graph):
        found = match_anchor(anchor)
        if isinstance(found, NearMiss):
            result.report.skipped.append(SkipRecord(found.location, found.reason))
            continue
        planned = plan_attention(gm.graph, found, example_inputs, options)
        if isinstance(planned, str):
            result.report.skipped.append(SkipRecord(found.location, planned))
            continue
        result.report.rewrites.append(planned.record)
        result.proofs += planned.proofs
        if apply:
            replace_attention(gm.graph, planned.match, planned.call)
    forget(gm.graph)
    if apply and len(result.report.rewrites) > rewrites:
        gm.graph.lint()
        gm.recompile()


def _bodies(gm: fx.GraphModule) -> list[fx.GraphModule]:
    """The GraphModules that `gm`'s graph reads as attributes (higher-order op bodies), recursively."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            child = getattr(gm, str(node.target), None)
            if isinstance(child, fx.GraphModule) and child not in found:
                found += [child, *(b for b in _bodies(child) if b not in found)]
    return found


@dataclass
class BlockPlan:
    """The rewrite planned for one attention: the op call that replaces it, its report line and the proofs the
    rewrite rests on (re-checked at run time)."""

    match: AttentionMatch
    call: KernelCall
    record: RewriteRecord
    proofs: list[Proof]


def plan_attention(graph: fx.Graph, match: AttentionMatch, example_inputs: list[Any] | None,
                   options: Options) -> BlockPlan | str:
    """The plan for one match if its masks are supported and the cost model predicts a win; else the reason. Reads
    the graph, never changes it (:func:`flash_fx.rewrite.replace_attention` applies the plan)."""
    nq, nk = concrete(match.q_shape[-2]), concrete(match.k_shape[-2])
    masks = _decide_masks(graph, match, example_inputs, nq, nk)
    if isinstance(masks, str):
        return masks
    moved = _moved_read(match, masks)
    if moved is not None:
        return moved
    if (match.score_mod_factor is not None or match.sinks is not None) and match.batch_view is not None:
        return "a per-head factor or sink logits combined with views that regroup batch and heads"
    variant = masks.variant
    if variant not in options.variants:
        return _not_allowed(variant, options)
    device = cost.device_for(match.device_type, options.device)
    tiles = options.tiles or cost.model_tiles(device, concrete(match.q_shape[-1]), match.dtype)
    band_density = _band_density(masks.band, nq, nk, tiles)
    holds_masks = masks.masks_in_bias > 0  # the kernels reduce the masks in the bias to a tile layout
    density = _layout_density(masks, nq, nk, tiles) if holds_masks else band_density
    # A run-time mask is reduced to its tile layout at every call; a constant one (density known) on its first
    # call only (kernels.schedule.per_tensor), after which its layout is used where it reads less than the bias.
    plan = _plan(match, masks, options, device, density, layout_pass=holds_masks and density is None)
    sparse_note = []
    if holds_masks and density is not None:
        dense_bias = _plan(match, masks, options, device, band_density, layout_pass=False)
        if dense_bias.hbm_after <= plan.hbm_after:
            sparse_note = ["block layout not used: the mask empties no tile"]
            plan, density, holds_masks, variant = dense_bias, band_density, False, "bias"
            if variant not in options.variants:
                return _not_allowed(variant, options)
    if not plan.rewrite:
        return plan.reason
    copy_output = writes_of(graph).written_after([match.output], match.output) is not None
    score_mod = ScoreMod(match.score_mod, match.score_mod_factor) if match.score_mod else None
    call = KernelCall(match.scale, masks.band, masks.bias_terms, masks.key_valid, masks.documents,
                      bias_holds_masks=holds_masks, alibi=masks.alibi, relative=masks.relative, copy_output=copy_output,
                      excluded_fill=masks.excluded_fill, filled_rows=masks.filled_rows, score_mod=score_mod,
                      sinks=match.sinks)
    decode_group = _decode_group(match)
    scale = f"{match.scale:.4g}" + "".join(
        " / sqrt(head_dim)" if d == RSQRT_HEAD_DIM else f" {'/' if d.reciprocal else '*'} {d.factor.name}"
        for d in match.dynamic_scales)
    record = RewriteRecord(
        variant=variant, location=match.location,
        q_shape=_concrete_shape(match.q_shape), k_shape=_concrete_shape(match.k_shape),
        v_shape=_concrete_shape(match.v_shape), dtype=str(match.dtype).removeprefix("torch."),
        scale=scale, mask=masks.description,
        notes="; ".join([*match.notes, *([f"scores modified: {score_mod.describe()}"] if score_mod else []),
                         *(["attention sinks: a logit per row joins the softmax"] if match.sinks is not None else []),
                         *_dropout_note(match.dropout_p), *sparse_note, *_decode_note(decode_group, device),
                         plan.reason]),
        tile_density=density, kernel="decode" if decode_group else "prefill", **_plan_fields(plan),
    )
    return BlockPlan(match, call, record, masks.proofs)


def _moved_read(match: AttentionMatch, masks: MaskDecision) -> str | None:
    """Why the rewrite may not read this attention's tensors where the op call stands, or None.

    The op reads q, k, v (after looking through their scales, views and head expansion), the masks, biases,
    ids and position terms where P @ V stood, and keeps some for the backward; eager reads them between Q @ K^T
    and P @ V. A write to one of them (or an alias) before Q @ K^T reaches both alike; one after it would change
    what the op reads or the tensors its backward needs. (In-place ops are never looked through: `q.mul_(c)` is
    the operand itself, see patterns.match._strip_scales.)"""
    reads = [match.q.node, match.k.node, match.v.node, *(term.tensor for term in match.terms)]
    reads += [f.factor for f in match.dynamic_scales if isinstance(getattr(f, "factor", None), fx.Node)]
    reads += [n for n in (match.score_mod_factor, match.sinks) if n is not None]
    reads += [masks.key_valid.node] if masks.key_valid is not None else []
    reads += list(masks.documents or ())
    reads += [masks.alibi[0].slopes] if masks.alibi is not None else []
    if masks.relative is not None:
        reads += [a for a in masks.relative[0].lookup.all_input_nodes]
    writes = writes_of(match.anchor.graph)
    first = writes.position[match.nodes[0]]
    for node in reads:  # (a node's own in-place write is its value: only later writes count)
        writer = writes.written_after([node], max(node, match.nodes[0], key=lambda n: writes.position.get(n, first)))
        if writer is not None:
            return (f"an input of the attention ({node.name}) is written in place at {location(writer)} "
                    f"({writer.name}) while the attention reads it")
    return None


def _plan(match: AttentionMatch, masks: MaskDecision, options: Options, device: cost.Device,
          density: float | None, layout_pass: bool) -> cost.Plan:
    """The cost model's decision for one match, with sizes as the graph's symbols (hints: example sizes);
    ``layout_pass``: each call reduces its mask bias to a tile layout."""
    sizes = [*match.q_shape, *match.k_shape, *match.output.meta["example_value"].shape]
    shape = _cost_shape(match, masks, 1.0 if density is None else density, layout_pass)
    return cost.plan(shape, _size_hints(sizes), device=device, force=options.force,
                     min_speedup=options.min_speedup, tiles=options.tiles)


def _plan_fields(plan: cost.Plan) -> dict[str, Any]:
    """The report fields a plan fills."""
    return dict(hbm_before=plan.hbm_before, hbm_after=plan.hbm_after, time_before=plan.time_before,
                time_after=plan.time_after, flops_before=plan.flops_before, flops_after=plan.flops_after,
                hbm_formula=plan.hbm_formula, tiles=plan.tiles, device=plan.device)


def _symbolic(size: Any) -> cost.Size:
    """A size as the cost model takes it: a SymInt's sympy expression, else the int."""
    return size.node.expr if isinstance(size, torch.SymInt) else int(size)


def _size_hints(sizes: list[Any]) -> dict:
    """The example value of every size symbol the SymInts among `sizes` use."""
    hints: dict = {}
    for size in sizes:
        if isinstance(size, torch.SymInt):
            env = size.node.shape_env
            hints.update(getattr(env, "backed_var_to_val", None) or env.var_to_val)
    return hints


def _not_allowed(variant: str, options: Options) -> str:
    return f"variant {variant!r} is not in the allowed variants {list(options.variants)}"


def _plan_mha(match: MhaMatch | str, options: Options) -> tuple[RewriteRecord, float] | SkipRecord:
    """The report line and dropout probability of routing an nn.MultiheadAttention call's attention to the kernels
    (masks as a bias), or why not."""
    if isinstance(match, str):
        return SkipRecord("<nn.MultiheadAttention>", match)
    args = match.arguments
    masks = [name for name in ("attn_mask", "key_padding_mask") if args[name] is not None]
    variant = "bias" if masks else "dense"
    if variant not in options.variants:
        return SkipRecord(match.location, _not_allowed(variant, options))
    batch, heads, nq, nk, head_dim = (concrete(s) for s in match.shape)
    shape = cost.AttentionShape(batch_heads=_symbolic(match.shape[0]) * _symbolic(match.shape[1]),
                                nq=_symbolic(match.shape[2]), nk=_symbolic(match.shape[3]),
                                head_dim=_symbolic(match.shape[4]), dtype=match.dtype, density=1.0,
                                elementwise_passes=1, mask_bytes_per_score=4.0 * bool(masks),
                                training=torch.is_grad_enabled())
    plan = cost.plan(shape, _size_hints(list(match.shape)), device=cost.device_for(match.device_type, options.device),
                     force=options.force, min_speedup=options.min_speedup, tiles=options.tiles)
    if not plan.rewrite:
        return SkipRecord(match.location, plan.reason)
    dropout_p = float(args["dropout_p"]) if args["training"] is not False else 0.0
    record = RewriteRecord(
        variant=variant, location=match.location, q_shape=(batch, heads, nq, head_dim),
        k_shape=(batch, heads, nk, head_dim), v_shape=(batch, heads, nk, head_dim),
        dtype=str(match.dtype).removeprefix("torch."), scale=f"{head_dim ** -0.5:.4g}",
        mask=" + ".join(masks) or "none",
        notes="; ".join(["nn.MultiheadAttention", *_dropout_note(dropout_p), plan.reason]), **_plan_fields(plan),
    )
    return record, dropout_p


def _apply_mha(match: MhaMatch, dropout_p: float) -> None:
    """Point the call at flash_fx.mha.multi_head_attention (same inputs; its attention on the op, no weights: unused
    weight reads are erased)."""
    detach_side_uses(match.node.graph, match.node, set())
    args = match.arguments
    match.node.target = multi_head_attention
    names = ("query", "key", "value", "num_heads", "in_proj_weight", "in_proj_bias", "out_proj_weight",
             "out_proj_bias", "key_padding_mask", "attn_mask", "q_proj_weight", "k_proj_weight", "v_proj_weight")
    match.node.args = (*(args[name] for name in names), dropout_p)
    match.node.kwargs = {}


def _decide_masks(graph: fx.Graph, match: AttentionMatch, example_inputs: list[Any] | None, nq: int,
                  nk: int) -> MaskDecision | str:
    """Sort the score terms into structural kernel inputs (one mask) and dense bias terms, or say why not."""
    decision = MaskDecision(band=Band(None, 0) if match.causal else None, bias_terms=[], parts=[],
                            proofs=[])
    if match.causal:
        decision.parts.append("causal")
    terms = _split_sums(match.terms)
    # Rows a finite fill hides entirely are eager's uniform average when that fill is the only mask of the block
    # (kernels.filled_rows); beside another mask, under dropout or beside sinks, eager's rows are not that.
    one_fill = not match.causal and not match.dropout_p and match.sinks is None and sum(
        isinstance(_mask_condition(term), tuple) for term in terms) == 1
    for term in terms:
        op, tensor = term.op, term.tensor.meta["example_value"]
        if not _broadcasts_into(tuple(tensor.shape), term.scores_shape):
            return (f"mask/bias of shape {_concrete_shape(tensor.shape)} does not broadcast to the scores' "
                    f"shape {_concrete_shape(term.scores_shape)}")
        shape = "x".join(map(str, _concrete_shape(tensor.shape)))
        if term.merged:  # in the [B*H, Nq, Nk] layout beside a [B, H, Nq, Nk] one: read as it is, as a bias
            if not isinstance(op, AddBias) or not tensor.dtype.is_floating_point:
                return "a mask is applied in the merged batch*heads layout beside the split one"
            decision.bias_terms.append(term)
            decision.parts.append(f"bias[{shape}] (batch*heads layout)")
            continue
        condition = _mask_condition(term)
        if condition is None:
            if not tensor.dtype.is_floating_point:
                return f"additive term of dtype {tensor.dtype} is not a float bias"
            if is_zeros(strip_copies(term.tensor)) and not tensor.requires_grad:
                decision.parts.append(f"zero bias[{shape}] dropped")
                continue
            alibi = analyze_alibi(graph, term.tensor, nq, nk, example_inputs) if decision.alibi is None else None
            if isinstance(alibi, AlibiMatch):
                decision.alibi = (alibi, term.factor_after)
                decision.proofs.append(alibi.proof)
                decision.parts.append(alibi.describe())
                continue
            table = (analyze_relative_table(graph, term.tensor, nq, nk, example_inputs)
                     if decision.relative is None else None)
            if isinstance(table, RelativeTableMatch):
                decision.relative = (table, term.factor_after)
                decision.proofs.append(table.proof)
                decision.parts.append(table.describe())
                continue
            decision.bias_terms.append(term)
            if not tensor.requires_grad and _per_key(tuple(tensor.shape), match.k_shape[-2]):
                # a per-key float bias (a padding or static-cache mask passed in as 0 / finfo.min): the kernels
                # skip the tiles of the keys it masks, where the op finds that exact per call
                decision.masks_in_bias += 1
                decision.parts.append(f"bias[{shape}] (per key: tiles of the keys it masks skipped at run time)")
                continue
            learned = " (learned: its gradient is written as dS)" if tensor.requires_grad else ""
            decision.parts.append(f"bias[{shape}]{learned}")
            continue
        if isinstance(condition, str):
            return condition
        mask, hidden_when_true, fill = condition
        replaces = isinstance(op, MaskedFill)  # masked_fill / where replace the score; an added mask adds to it
        analysis = analyze_visibility(graph, mask, hidden_when_true, nq, nk, example_inputs)
        if isinstance(analysis, ConstantMask):
            decision.bias_terms.append(term)
            decision.masks_in_bias += 1
            decision.constant_masks.append(analysis.visible)
            decision.parts.append(f"{analysis.describe()}[{shape}] (block layout)")
        else:
            why = _use_structural(decision, analysis, fill, replaces, one_fill, match.sinks is not None)
            if why is None:
                decision.exclude(fill)
                continue
            decision.bias_terms.append(term)
            decision.masks_in_bias += 1
            decision.parts.append(f"mask[{shape}] ({why}; empty tiles skipped at run time)")
        if replaces:  # the bias holds -inf where it hides: the kernels exclude those entries
            decision.exclude(fill)
    return decision


_ADD = {operator.add, torch.add, "add", "__add__"}


def _split_sums(terms: list[ScoreTerm]) -> list[ScoreTerm]:
    """Additive terms as one term per part, so each part is analyzed on its own: a sum of two float tensors
    (e.g. a position bias plus a mask, added before they reach the scores) gives its summands, and
    `where(visible, bias, fill)` gives the bias and a mask term (bias + fill is fill for a mask fill)."""
    split: list[ScoreTerm] = []
    for term in terms:
        if not isinstance(term.op, AddBias):
            split.append(term)
            continue
        node = strip_copies(term.tensor)
        if _is_float_sum(node):
            parts = [dataclasses.replace(term, op=AddBias(term.op.x, part, term.op.factor)) for part in node.args]
            split += _split_sums(parts)
            continue
        masked = _masked_bias(node)
        if masked is None:
            split.append(term)
            continue
        visible, bias, fill = masked
        split += _split_sums([dataclasses.replace(term, op=AddBias(term.op.x, bias, term.op.factor))])
        split.append(dataclasses.replace(term, op=MaskedFill(term.op.x, visible, fill, inverted=True)))
    return split


def _masked_bias(node: fx.Node) -> tuple[fx.Node, fx.Node, float] | None:
    """(visible, bias, fill) for `torch.where(visible, bias, fill)` with a float tensor bias and a mask fill."""
    if node.target is not torch.where or len(node.args) != 3 or node.kwargs:
        return None
    visible, bias, fill = node.args
    if not isinstance(visible, fx.Node) or not isinstance(bias, fx.Node) or is_zeros(bias):
        return None  # where(visible, 0, fill) is a mask alone (mask_bias_condition)
    mask_value, bias_value = visible.meta.get("example_value"), bias.meta.get("example_value")
    fill = constant_float(fill)
    if not isinstance(mask_value, torch.Tensor) or mask_value.dtype != torch.bool:
        return None
    if not isinstance(bias_value, torch.Tensor) or not bias_value.dtype.is_floating_point or fill is None:
        return None
    if not is_mask_fill(fill):  # (a sum's factor is applied to both parts alike: the check is repeated later)
        return None
    return visible, bias, fill


def _is_float_sum(node: fx.Node) -> bool:
    """True for `a + b` of two floating-point tensor nodes (no alpha)."""
    if node.op not in ("call_function", "call_method") or node.kwargs or len(node.args) != 2:
        return False
    try:
        if node.target not in _ADD:
            return False
    except TypeError:
        return False
    values = [a.meta.get("example_value") if isinstance(a, fx.Node) else None for a in node.args]
    return all(isinstance(v, torch.Tensor) and v.dtype.is_floating_point for v in values)


def _mask_condition(term: ScoreTerm) -> tuple[fx.Node, bool, float] | str | None:
    """(boolean mask, True if it marks hidden entries, fill as the scores see it) for a mask term; None for a
    genuine bias; a reason for a fill that is part of the scores (the block is left alone)."""
    op = term.op
    if isinstance(op, MaskedFill):
        fill = op.value * term.factor_after
        if not is_mask_fill(fill):
            return (f"masked_fill with value {op.value} (as the softmax sees it: {fill:g}) is not a mask fill (-inf "
                    "or a large negative number)")
        return op.mask, not op.inverted, fill
    found = mask_bias_condition(op.bias, term.factor_after)  # factor_after includes the term's own factor
    return None if found is None else (*found[:2], found[2] * term.factor_after)


def _use_structural(decision: MaskDecision, analysis: MaskAnalysis | Unrecognized, fill: float,
                    replaces: bool, one_fill: bool, sinks: bool) -> str | None:
    """Record the analyzed mask as kernel inputs; or return why it stays in the bias. `one_fill`: this mask is
    the block's only one, so rows its finite fill hides entirely can be completed as eager computes them;
    `sinks`: such rows put all their weight on the sink (the op proves the fill negligible beside it per call)."""
    if isinstance(analysis, Unrecognized):
        return analysis.reason
    if decision.band is not None or decision.key_valid is not None or decision.documents is not None:
        return "a second structural mask is streamed as a bias"
    band = analysis.band.spec if analysis.band else None
    dead_rows = fill != -math.inf and not _no_dead_rows(band, analysis)
    if dead_rows and not replaces and not one_fill and not sinks:
        # an added finite fill beside other masks keeps eager's gradient and dead rows exactly in the bias
        return "added finite fill beside other masks, and rows that may be fully masked"
    decision.band = band
    decision.key_valid = analysis.key_valid
    decision.documents = analysis.documents
    decision.proofs += [analysis.band] if analysis.band else []
    decision.parts.append(analysis.describe())
    if dead_rows and one_fill:
        decision.filled_rows = FilledRows(fill, added=not replaces)
        decision.parts.append(f"fully hidden rows: uniform average ({'added' if not replaces else 'filled'} "
                              f"{fill:.3g})")
    return None


def _per_key(shape: tuple, nk: Any) -> bool:
    """True for a [.., 1, 1, Nk]-shaped term (at least 3 dims): one value per (batch row, key); ``nk`` as the graph
    has it (a symbolic size under dynamic shapes)."""
    return len(shape) >= 3 and all(statically_known_true(s == 1) for s in shape[-3:-1]) and _same(shape[-1], nk)


def _no_dead_rows(band: Band | None, analysis: MaskAnalysis) -> bool:
    """True when every query row keeps at least its own key (band through the diagonal, shared doc ids)."""
    if analysis.key_valid is not None:
        return False
    if band is not None and not ((band.upper is None or band.upper >= 0) and (band.lower is None or band.lower >= 0)):
        return False
    return analysis.documents is None or _same_ids(*analysis.documents)


def _same_ids(a: fx.Node, b: fx.Node) -> bool:
    """True when both id tensors are views (None-indexing, unsqueeze, view) of one tensor: queries are keys."""
    def base(node: fx.Node) -> fx.Node:
        while node.target in (operator.getitem, "unsqueeze") and isinstance(node.args[0], fx.Node):
            index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
            if node.target is operator.getitem and not all(i is None or i == slice(None) for i in index):
                break
            node = node.args[0]
        return node

    return base(a) is base(b)


def _broadcasts_into(shape: tuple, target: tuple) -> bool:
    """True if `shape` broadcasts to `target` without changing it (sizes may be symbolic)."""
    if len(shape) > len(target):
        return False
    return all(statically_known_true(a == 1) or statically_known_true(a == b)
               for a, b in zip(reversed(shape), reversed(target), strict=False))


def _cost_shape(match: AttentionMatch, masks: MaskDecision, density: float, layout_pass: bool) -> cost.AttentionShape:
    out_shape = match.output.meta["example_value"].shape
    batch_heads = math.prod(_symbolic(s) for s in out_shape[:-2])
    nq, nk = _symbolic(match.q_shape[-2]), _symbolic(match.k_shape[-2])
    values = [o.node.meta["example_value"] for o in (match.q, match.k, match.v)]
    scores = max(1, math.prod(concrete(s) for s in out_shape[:-2]) * concrete(match.q_shape[-2])
                 * concrete(match.k_shape[-2]))
    mask_bytes = 0.0
    for term in match.terms:
        tensor = term.tensor.meta["example_value"]
        mask_bytes += concrete(tensor.numel()) * tensor.element_size() / scores
    kernel_bias_bytes = 0.0  # the one bias the kernels read: the broadcast sum of the dense terms, float32
    if masks.bias_terms:
        shapes = [_concrete_shape(term.tensor.meta["example_value"].shape) for term in masks.bias_terms]
        kernel_bias_bytes = 4.0 * math.prod(torch.broadcast_shapes(*shapes)) / scores
    passes = sum(isinstance(desc, Scale | Cast | MaskedFill | AddBias | PointwiseMod) for desc in _chain_descs(match))
    return cost.AttentionShape(
        batch_heads=batch_heads, nq=nq, nk=nk, head_dim=_symbolic(match.q_shape[-1]), dtype=match.dtype,
        value_dim=None if _same(match.v_shape[-1], match.q_shape[-1]) else _symbolic(match.v_shape[-1]),
        density=density, elementwise_passes=passes, mask_bytes_per_score=mask_bytes,
        kernel_bias_bytes_per_score=kernel_bias_bytes,
        training=torch.is_grad_enabled() and any(v.requires_grad for v in values), layout_pass=layout_pass,
        kv_group=max(1, _decode_group(match)),
    )


def _decode_group(match: AttentionMatch) -> int:
    """The query heads per KV head the decode kernels pack into one tile at the example shape
    (:func:`flash_fx.kernels.decode.chooses`), 0 when the call runs the prefill kernels."""
    if len(match.q_shape) < 4 or len(match.k_shape) < 4:  # merged [B * H, N, d] layouts: the kernels split them
        return 0
    n_q, heads, kv_heads = (concrete(s) for s in (match.q_shape[-2], match.q_shape[-3], match.k_shape[-3]))
    return heads // kv_heads if decode.chooses(n_q, heads, kv_heads, match.dropout_p > 0) else 0


def _decode_note(group: int, device: cost.Device) -> list[str]:
    if not group:
        return []
    where = "one C++ call" if device.is_cpu else "one tile, keys split across programs"
    return [f"decode kernels: {group} query head{'s' if group > 1 else ''} per KV head in {where}"]


def _same(a: Any, b: Any) -> bool:
    """a == b for sizes that may be symbolic, without adding a guard."""
    return statically_known_true(a == b)


def _dropout_note(p: float) -> list[str]:
    return [f"dropout p={p:g} fused (its own random stream, reproducible under torch.manual_seed)"] if p else []


def _band_density(band: Band | None, nq: int, nk: int, tiles: tuple[int, int]) -> float:
    """Fraction of (Br x Bc) tiles the kernels visit under a causal/window band (1.0 without one)."""
    if band is None:
        return 1.0
    return tile_density(AttentionSpec(1.0, band=band), nq, nk, *tiles)


def _layout_density(masks: MaskDecision, nq: int, nk: int, tiles: tuple[int, int]) -> float | None:
    """Fraction of tiles the kernels visit with a block layout: from the constant masks' value on the example
    inputs and the band; None when masks in the bias are known only at run time."""
    if masks.masks_in_bias > len(masks.constant_masks):
        return None
    visible = masks.constant_masks[0]
    for other in masks.constant_masks[1:]:
        visible = visible & other
    planes = visible.expand(*visible.shape[:-2], nq, nk).reshape(1, -1, nq, nk)  # every [Nq, Nk] plane
    bias = torch.zeros(planes.shape).masked_fill(~planes, float("-inf"))
    spec = AttentionSpec(1.0, band=masks.band or Band(), bias=Bias(bias, holds_masks=True))
    return tile_density(spec, nq, nk, *tiles)


def _chain_descs(match: AttentionMatch) -> list:
    return [canonicalize(n) for n in match.nodes[1:-1] if n is not match.anchor]


def _concrete_shape(shape: Any) -> tuple:
    return tuple(concrete(s) for s in shape)
