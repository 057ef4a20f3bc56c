"""Graph surgery: replace the nodes of one AttentionMatch by a call of `flash_fx::attention`.

The new nodes bring q, k, v to the op's 4-d layout with views only (permute, transpose, unsqueeze),
apply the non-constant scale factors to q, build the additive bias of masks that have no structural
variant, call the op, and bring its output back to the layout and dtype of the original P @ V.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from flash_fx.patterns.canonical import AddBias, MaskedFill, Operand, swapped_last_two
from flash_fx.patterns.match import AttentionMatch, ScoreTerm

# Finite mask fills (finfo.min, -1e9, ...) become this bias: large enough to absorb any score, small
# enough that several overlapping masks do not overflow to -inf (a fully masked row stays uniform).
FINITE_FILL = torch.finfo(torch.float32).min / 8


@dataclass(frozen=True)
class KernelCall:
    """What the op is called with, apart from q, k, v: the scale, the causal offset, the bias terms."""

    scale: float
    causal_offset: int | None
    bias_terms: list[ScoreTerm]


def replace_attention(graph: fx.Graph, match: AttentionMatch, call: KernelCall) -> fx.Node:
    """Insert the op call before match.pv, reroute the users of match.pv to it, erase the old nodes."""
    rank = max(len(match.q_shape), len(match.k_shape), len(match.v_shape))
    replaced = set(match.nodes)
    inputs = {i for node in match.nodes for i in node.all_input_nodes if i not in replaced}
    with graph.inserting_before(match.pv):
        q = _to_4d(graph, _operand(graph, match.q), len(match.q_shape))
        for desc in match.dynamic_scales:
            q = graph.call_function(operator.truediv if desc.reciprocal else operator.mul, (q, desc.factor))
        k = _to_4d(graph, _k_from_kt(graph, match.kt), len(match.k_shape))
        v = _to_4d(graph, _operand(graph, match.v), len(match.v_shape))
        bias = _bias(graph, call.bias_terms)
        result = graph.call_function(
            torch.ops.flash_fx.attention.default, (q, k, v, bias, call.scale, call.causal_offset)
        )
        out = graph.call_function(operator.getitem, (result, 0))
        for _ in range(4 - rank):
            out = graph.call_method("squeeze", (out, 0))
        if match.out_perm is not None:
            out = graph.call_method("permute", (out, *match.out_perm))
        out_dtype = match.pv.meta["example_value"].dtype
        if out_dtype != match.dtype:
            out = graph.call_method("to", (out, out_dtype))
    match.pv.replace_all_uses_with(out)
    for node in reversed(match.nodes):
        if not node.users:
            graph.erase_node(node)
    _erase_dead(graph, list(inputs))
    return result


def _operand(graph: fx.Graph, operand: Operand) -> fx.Node:
    if operand.perm is None:
        return operand.node
    return graph.call_method("permute", (operand.node, *operand.perm))


def _k_from_kt(graph: fx.Graph, kt: Operand) -> fx.Node:
    """K itself when K^T was written as a swap of K's last two dims, else a transpose of K^T."""
    if kt.perm is None and (k := swapped_last_two(kt.node)) is not None:
        return k
    return graph.call_method("transpose", (_operand(graph, kt), -2, -1))


def _to_4d(graph: fx.Graph, node: fx.Node, rank: int) -> fx.Node:
    """Prepend size-1 dims so that every operand is [batch, heads, N, d] (the op broadcasts them)."""
    for _ in range(4 - rank):
        node = graph.call_method("unsqueeze", (node, 0))
    return node


def _bias(graph: fx.Graph, terms: list[ScoreTerm]) -> fx.Node | None:
    """The sum of the additive terms (masks as 0 / fill, biases times the scale applied after them)."""
    total = None
    for term in terms:
        op = term.op
        if isinstance(op, MaskedFill):
            fill = op.value if op.value == float("-inf") else FINITE_FILL
            hidden, visible = (0.0, fill) if op.inverted else (fill, 0.0)
            part = graph.call_function(torch.where, (op.mask, hidden, visible))
        else:
            assert isinstance(op, AddBias)
            part = op.bias
            if term.factor_after != 1.0:
                part = graph.call_function(operator.mul, (part, term.factor_after))
        total = part if total is None else graph.call_function(operator.add, (total, part))
    return total


def _erase_dead(graph: fx.Graph, candidates: list[fx.Node]) -> None:
    """Remove the replaced nodes' former inputs (transposes, absorbed scales, mask subgraphs) left unused."""
    erased: set[fx.Node] = set()
    while candidates:
        node = candidates.pop()
        if node in erased or node.op in ("placeholder", "output", "get_attr") or node.users:
            continue
        if _has_side_effects(node):
            continue
        inputs = list(node.all_input_nodes)
        graph.erase_node(node)
        erased.add(node)
        candidates.extend(inputs)


def _has_side_effects(node: fx.Node) -> bool:
    return node.is_impure() or (node.op == "call_method" and str(node.target).endswith("_"))
