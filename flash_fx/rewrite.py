"""Graph surgery: replace the nodes of one AttentionMatch by a call of `flash_fx::attention`.

The new nodes bring q, k, v to the op's 4-d layout with views only (permute, transpose, reshape of batch
dims, unsqueeze), apply non-constant scale factors to q, build the additive bias of masks that have no
structural variant, call the op, and bring its output back to the layout and dtype of the original.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from flash_fx.kernels.spec import (
    Alibi,
    AttentionSpec,
    Band,
    Bias,
    Documents,
    Dropout,
    FilledRows,
    RelativeTable,
    ScoreMod,
)
from flash_fx.op import zero_dead_rows
from flash_fx.patterns.canonical import AddBias, MaskedFill, Operand
from flash_fx.patterns.masks import Literal
from flash_fx.patterns.match import RSQRT_HEAD_DIM, AttentionMatch, ScoreTerm
from flash_fx.patterns.positions import AlibiMatch, RelativeTableMatch
from flash_fx.patterns.uses import detach_side_uses, has_side_effects


@dataclass(frozen=True)
class KernelCall:
    """What the op is called with, apart from q, k, v: the scale and the masks in kernel form."""

    scale: float
    band: Band | None
    bias_terms: list[ScoreTerm]
    key_valid: Literal | None = None
    documents: tuple[fx.Node, fx.Node] | None = None
    bias_holds_masks: bool = False  # the kernels skip the bias's tiles that hide every key (spec.Bias.holds_masks)
    alibi: tuple[AlibiMatch, float] | None = None  # ALiBi computed in the kernels, and the factor applied after it
    relative: tuple[RelativeTableMatch, float] | None = None  # a T5 table read per relative position, and its factor
    copy_output: bool = False  # the program writes the output in place later: give it its own copy
    excluded_fill: float | None = None  # the largest finite fill the kernels exclude (the op proves it per call)
    filled_rows: FilledRows | None = None  # rows that finite fill hides entirely: eager's uniform average
    score_mod: ScoreMod | None = None  # pointwise steps on the scaled scores (its factor a graph node)
    sinks: fx.Node | None = None  # the sink column [.., Nq, 1] concatenated to the scores


def replace_attention(graph: fx.Graph, match: AttentionMatch, call: KernelCall) -> fx.Node:
    """Insert the op call before match.output, reroute its users to the call, erase the replaced nodes."""
    replaced = set(match.nodes)
    inputs = {i for node in match.nodes for i in node.all_input_nodes if i not in replaced}
    view = match.batch_view
    with graph.inserting_before(match.output):
        q = _to_op_layout(graph, _operand(graph, match.q), len(match.q_shape), view)
        for factor in match.dynamic_scales:
            q = _apply_dynamic_scale(graph, q, factor)
        k = _operand(graph, match.k)
        if match.k_is_transposed:
            k = graph.call_method("transpose", (k, -2, -1))
        k = _to_op_layout(graph, k, len(match.k_shape), view)
        v = _to_op_layout(graph, _operand(graph, match.v), len(match.v_shape), view)
        args, kwargs = _spec(graph, match, call).op_args()
        result = graph.call_function(torch.ops.flash_fx.attention.default, (q, k, v, *args), kwargs)
        out = graph.call_function(operator.getitem, (result, 0))
        if match.zero_dead_rows:
            out = graph.call_function(zero_dead_rows, (out, graph.call_function(operator.getitem, (result, 1))))
        if call.copy_output:  # the op keeps its output for the backward; a later write must not reach it
            out = graph.call_method("clone", (out,))
        out = _from_op_layout(graph, out, match)
    out.meta["example_value"] = match.output.meta["example_value"]  # later matches may read it
    match.output.replace_all_uses_with(out)
    for node in reversed(match.nodes):
        detach_side_uses(graph, node, replaced)  # dead uses erased, shape/dtype reads given a stand-in
        if not node.users:
            graph.erase_node(node)
    _erase_dead(graph, list(inputs))
    return result


def _operand(graph: fx.Graph, operand: Operand) -> fx.Node:
    if operand.perm is None:
        return operand.node
    return graph.call_method("permute", (operand.node, *operand.perm))


def _apply_dynamic_scale(graph: fx.Graph, q: fx.Node, factor: object) -> fx.Node:
    """q times a scale known only at run time (a 0-d tensor, a symbolic float, or 1/sqrt(head dim))."""
    if factor == RSQRT_HEAD_DIM:
        head_dim = graph.call_method("size", (q, -1))
        return graph.call_function(operator.mul, (q, graph.call_function(operator.pow, (head_dim, -0.5))))
    return graph.call_function(operator.truediv if factor.reciprocal else operator.mul, (q, factor.factor))


def _layout_rank(rank: int, view: tuple | None) -> int:
    return len(view) + 2 if view is not None else rank


def _to_op_layout(graph: fx.Graph, node: fx.Node, rank: int, view: tuple | None) -> fx.Node:
    """Regroup batch dims into the masks' view (if any), then prepend size-1 dims up to [batch, heads, N, d]."""
    if view is not None and rank != len(view) + 2:
        rows, cols = graph.call_method("size", (node, -2)), graph.call_method("size", (node, -1))
        node = graph.call_method("reshape", (node, *view, rows, cols))
    for _ in range(4 - _layout_rank(rank, view)):
        node = graph.call_method("unsqueeze", (node, 0))
    return node


def _from_op_layout(graph: fx.Graph, out: fx.Node, match: AttentionMatch) -> fx.Node:
    """The op's [B, H, Nq, d] output in the original output's layout and dtype."""
    layout_rank = _layout_rank(max(len(match.q_shape), len(match.k_shape), len(match.v_shape)), match.batch_view)
    for _ in range(4 - layout_rank):
        out = graph.call_method("squeeze", (out, 0))
    original = match.output.meta["example_value"]
    if original.dim() < layout_rank:  # the masks' view split batch dims that the output keeps merged
        out = graph.call_method("flatten", (out, 0, layout_rank - original.dim()))
    if match.out_perm is not None:
        out = graph.call_method("permute", (out, *match.out_perm))
    if original.dtype != match.dtype:
        out = graph.call_method("to", (out, original.dtype))
    return out


def _spec(graph: fx.Graph, match: AttentionMatch, call: KernelCall) -> AttentionSpec:
    """The attention spec of the op call, its tensors as new graph nodes in the op's layout."""
    bias = _bias(graph, call.bias_terms, match.batch_view)
    key_valid = documents = alibi = relative = None
    if call.key_valid is not None:
        valid = _per_batch(graph, call.key_valid.node, key_axis=True)
        key_valid = graph.call_function(operator.invert, (valid,)) if call.key_valid.negated else valid
    if call.documents is not None:
        q_ids, k_ids = call.documents
        documents = Documents(_per_batch(graph, q_ids, key_axis=False), _per_batch(graph, k_ids, key_axis=True))
    if call.alibi is not None:
        found, factor = call.alibi
        alibi = Alibi(_slopes(graph, found.slopes, found.sign * factor), found.symmetric)
    if call.relative is not None:
        relative = RelativeTable(_relative_vector(graph, *call.relative))
    return AttentionSpec(
        scale=call.scale, band=call.band or Band(), key_valid=key_valid, documents=documents,
        bias=None if bias is None else Bias(bias, holds_masks=call.bias_holds_masks), alibi=alibi, relative=relative,
        dropout=Dropout(match.dropout_p), kv_heads_tiled=match.kv_heads_tiled, excluded_fill=call.excluded_fill,
        filled_rows=call.filled_rows, score_mod=_score_mod(graph, call.score_mod),
        sinks=None if call.sinks is None else _per_row(graph, call.sinks))


def _relative_vector(graph: fx.Graph, table: RelativeTableMatch, factor: float) -> fx.Node:
    """The table looked up at the Nq + Nk - 1 relative positions j - i = -(Nq - 1) .. Nk - 1, as [1, H, L].

    The buckets depend on j - i only (proved), so their first column read upwards and their first row after
    its first entry list every relative position once."""
    full = slice(None, None, None)
    up = graph.call_method("flip", (graph.call_function(operator.getitem, (table.buckets, (full, 0))), 0))
    right = graph.call_function(operator.getitem, (table.buckets, (0, slice(1, None, None))))
    positions = graph.call_function(torch.cat, ([up, right],))
    lookup = table.lookup
    values = graph.call_function(lookup.target, (positions, *lookup.args[1:]), dict(lookup.kwargs))
    vector = graph.call_method("unsqueeze", (graph.call_method("permute", (values, 1, 0)), 0))
    if factor != 1.0:
        vector = graph.call_function(operator.mul, (vector, factor))
    return vector


def _score_mod(graph: fx.Graph, mod: ScoreMod | None) -> ScoreMod | None:
    """The score modification with its head factor as a float32 [B or 1, H or 1] graph node."""
    if mod is None or mod.head_factor is None:
        return mod
    return ScoreMod(mod.steps, _slopes(graph, mod.head_factor, 1.0))


def _per_row(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """A [B?, H?, Nq?, 1] column (any rank from 2 to 4) as [B or 1, H or 1, Nq or 1] (the op's sinks)."""
    for _ in range(4 - node.meta["example_value"].dim()):
        node = graph.call_method("unsqueeze", (node, 0))
    full = slice(None, None, None)
    return graph.call_function(operator.getitem, (node, (full, full, full, 0)))


def _slopes(graph: fx.Graph, node: fx.Node, factor: float) -> fx.Node:
    """A [B?, H?, 1, 1]-shaped slope tensor (any rank from 2 to 4) as float32 [B or 1, H or 1], times factor."""
    for _ in range(4 - node.meta["example_value"].dim()):
        node = graph.call_method("unsqueeze", (node, 0))
    node = graph.call_function(operator.getitem, (node, (slice(None, None, None), slice(None, None, None), 0, 0)))
    node = graph.call_method("float", (node,))
    if factor != 1.0:
        node = graph.call_function(operator.mul, (node, factor))
    return node


def _per_batch(graph: fx.Graph, node: fx.Node, key_axis: bool) -> fx.Node:
    """A [B?, 1, Nq, 1] or [B?, 1, 1, Nk] mask factor (any rank up to 4) as a [B or 1, N] tensor (the op
    broadcasts a batch of 1)."""
    for _ in range(4 - node.meta["example_value"].dim()):
        node = graph.call_method("unsqueeze", (node, 0))
    full = slice(None, None, None)
    index = (full, 0, 0, full) if key_axis else (full, 0, full, 0)
    return graph.call_function(operator.getitem, (node, index))


def _bias(graph: fx.Graph, terms: list[ScoreTerm], view: tuple | None = None) -> fx.Node | None:
    """The bias the kernels add to the scores: the score terms replayed in program order on zero scores, with
    the scales between them where the program applies them (so sums overflow where eager's overflow).

    An added term adds; a masked_fill / where term overwrites what came before it with -inf where it hides (so a
    NaN it hides never reaches the kernels), which the pass proves exact (finite fills: flash_fx.exactness, per
    call). A term applied in the merged [B*H, ..] layout is viewed in the match's batch ``view`` first."""
    total, scale_after = None, 1.0
    for term in terms:
        op = term.op
        own = op.factor if isinstance(op, AddBias) else 1.0  # baddbmm's beta scales its own input only
        after = term.factor_after / own
        if total is not None and after != scale_after:
            total = graph.call_function(operator.mul, (total, scale_after / after))
        scale_after = after
        if isinstance(op, MaskedFill):
            kept = total if total is not None else 0.0
            hidden = float("-inf")
            args = (op.mask, kept, hidden) if op.inverted else (op.mask, hidden, kept)
            total = graph.call_function(torch.where, args)
        else:
            part = _split_layout(graph, op.bias, view) if term.merged else op.bias
            part = part if own == 1.0 else graph.call_function(operator.mul, (part, own))
            total = part if total is None else graph.call_function(operator.add, (total, part))
    if total is not None and scale_after != 1.0:
        total = graph.call_function(operator.mul, (total, scale_after))
    return total


def _split_layout(graph: fx.Graph, node: fx.Node, view: tuple) -> fx.Node:
    """A tensor applied to [B*H, Nq, Nk] scores, as applied to their [*view, Nq, Nk] view: a rank-3 tensor of
    first dim B*H reshaped, one of first dim 1 given one more leading 1 (lower ranks broadcast alike)."""
    value = node.meta["example_value"]
    if value.dim() < 3:
        return node
    if statically_known_true(value.shape[0] == 1):
        return graph.call_method("unsqueeze", (node, 0))
    rows, cols = graph.call_method("size", (node, -2)), graph.call_method("size", (node, -1))
    return graph.call_method("reshape", (node, *view, rows, cols))


def _erase_dead(graph: fx.Graph, candidates: list[fx.Node]) -> None:
    """Remove the replaced nodes' former inputs (transposes, absorbed scales, mask subgraphs) left unused."""
    erased: set[fx.Node] = set()
    while candidates:
        node = candidates.pop()
        if node in erased or node.op in ("placeholder", "output", "get_attr") or node.users:
            continue
        if has_side_effects(node):
            continue
        inputs = list(node.all_input_nodes)
        graph.erase_node(node)
        erased.add(node)
        candidates.extend(inputs)

