"""Uses of a tensor that read none of its values: the one rule of which uses of attention's scores and
probabilities a rewrite may drop or detach.

A use reads no values when it is

- dead: its result is never used and it writes nothing (a ``scores.clone()`` left over, say), recursively, or
- a metadata read: the tensor appears only where an op reads its shape, dtype or device (``x.reshape_as(s)``,
  ``p.type_as(s)``, ``torch.zeros_like(s)``, ``s.new_zeros(...)``), at a static shape.

The rewrite (:func:`flash_fx.rewrite.replace_attention`) erases the dead uses and gives each metadata read a
stand-in of the same shape, dtype and device that holds one element (:func:`stand_in_args`), so no Nq x Nk tensor
is computed for it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from flash_fx.patterns.mutation import written_args
from torch import fx

#: Methods that read only the shape, dtype or device of the argument at this position.
METADATA_METHODS = {"reshape_as": 1, "view_as": 1, "expand_as": 1, "type_as": 1, "new_zeros": 0,
                    "new_ones": 0, "new_empty": 0, "new_full": 0}
#: Functions that read only the shape, dtype and device of their first argument.
LIKE_FUNCTIONS = (torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like)


#: Methods and functions that draw from a random generator (FX does not count all of them impure): erasing one,
#: even unused, would shift the stream every later random op draws from.
RANDOM_METHODS = {"bernoulli", "bernoulli_", "uniform_", "normal_", "random_", "exponential_", "geometric_",
                  "cauchy_", "log_normal_", "multinomial"}
RANDOM_FUNCTIONS = {torch.bernoulli, torch.multinomial, torch.normal, torch.poisson, torch.rand, torch.rand_like,
                    torch.randn, torch.randn_like, torch.randint, torch.randint_like, torch.randperm, torch.dropout,
                    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                    F.rrelu, F.gumbel_softmax, F.scaled_dot_product_attention}


def has_side_effects(node: fx.Node) -> bool:
    """Whether ``node`` does more than compute its result: an impure op, a write to an argument or a draw from a
    random generator."""
    return node.is_impure() or bool(written_args(node)) or _draws_random(node)


def _draws_random(node: fx.Node) -> bool:
    target = node.target
    if node.op == "call_method":
        return target in RANDOM_METHODS
    if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        overloads = [target] if isinstance(target, torch._ops.OpOverload) else [
            getattr(target, name) for name in target.overloads()]
        return any(torch.Tag.nondeterministic_seeded in overload.tags for overload in overloads)
    return node.op == "call_function" and target in RANDOM_FUNCTIONS


def is_dead(node: fx.Node) -> bool:
    """Whether ``node``'s result is never used and computing it writes nothing (recursively through its users)."""
    if node.op != "call_function" and node.op != "call_method" or has_side_effects(node):
        return False
    return all(is_dead(user) for user in node.users)


def reads_metadata_only(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` reads only the shape, dtype or device of ``node`` (at a static shape)."""
    value = node.meta.get("example_value")
    if not isinstance(value, torch.Tensor) or not all(isinstance(size, int) for size in value.shape):
        return False
    if user.op == "call_method" and user.target in METADATA_METHODS:
        position = METADATA_METHODS[user.target]
    elif user.op == "call_function" and user.target in LIKE_FUNCTIONS:
        position = 0
    else:
        return False
    args = list(user.args)
    others = args[:position] + args[position + 1:] + list(user.kwargs.values())
    return len(args) > position and args[position] is node and not any(_refers_to(a, node) for a in others)


def reads_no_values(user: fx.Node, node: fx.Node) -> bool:
    """Whether the use ``user`` of ``node`` reads none of its values (see the module docstring)."""
    return is_dead(user) or reads_metadata_only(user, node)


def value_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its values."""
    return [user for user in node.users if not reads_no_values(user, node)]


def stand_in(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """A graph node (inserted at the graph's insertion point) with ``node``'s shape, dtype and device and one
    element's storage: what a metadata read of ``node`` may read instead."""
    value = node.meta["example_value"]
    scalar = graph.call_function(torch.zeros, ((),), {"dtype": value.dtype, "device": value.device})
    expanded = graph.call_method("expand", (scalar, *value.shape))
    expanded.meta["example_value"] = value.new_zeros(()).expand(value.shape)
    return expanded


def detach_side_uses(graph: fx.Graph, node: fx.Node, keep: set[fx.Node]) -> None:
    """Before ``node`` is erased: erase its dead users and point its metadata reads at one stand-in (users in
    ``keep``, the nodes the rewrite removes anyway, are left alone)."""
    substitute = None
    for user in list(node.users):
        if user in keep:
            continue
        if is_dead(user):
            _erase_dead_chain(graph, user)
        elif reads_metadata_only(user, node):
            if substitute is None:
                with graph.inserting_before(node):
                    substitute = stand_in(graph, node)
            user.replace_input_with(node, substitute)


def _erase_dead_chain(graph: fx.Graph, node: fx.Node) -> None:
    for user in list(node.users):
        _erase_dead_chain(graph, user)
    graph.erase_node(node)


def _refers_to(value: Any, node: fx.Node) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_refers_to(v, node) for v in value)
    if isinstance(value, dict):
        return any(_refers_to(v, node) for v in value.values())
    return value is node
