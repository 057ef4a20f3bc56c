"""`F.multi_head_attention_forward` calls (what nn.MultiheadAttention runs; Dynamo keeps it as one call).

The call is matched as a whole: `match_mha(node)` returns an MhaMatch when its attention can run on the
flash kernels (weights not requested, no bias_k/bias_v, no zero-attention column, no dropout in
training, batched inputs), else the reason it cannot.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from flash_fx.patterns.masks import concrete
from flash_fx.patterns.match import location
from flash_fx.patterns.uses import is_dead
from torch import fx

from flash_fx import kernels

_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


@dataclass
class MhaMatch:
    """A multi_head_attention_forward call and its arguments by name."""

    node: fx.Node
    arguments: dict
    location: str
    shape: tuple  # (batch, heads, Nq, Nk, head_dim) at the example
    dtype: torch.dtype
    device_type: str


def is_mha_call(node: fx.Node) -> bool:
    """True for call_function nodes of F.multi_head_attention_forward."""
    return node.op == "call_function" and node.target is F.multi_head_attention_forward


def _weight_users(node: fx.Node) -> list[fx.Node]:
    """The uses of a multi_head_attention_forward call's second result (the weights) that read it: every user but
    the output's getitem and dead weight reads (erased by the rewrite)."""
    return [user for user in node.users
            if not (user.op == "call_function" and user.target is operator.getitem
                    and (user.args[1] == 0 or is_dead(user)))]


def match_mha(node: fx.Node) -> MhaMatch | str:
    """The MhaMatch of `node`, or why its attention stays as it is."""
    try:
        bound = _SIGNATURE.bind(*node.args, **node.kwargs)
    except TypeError:
        return "multi_head_attention_forward called with arguments that do not bind"
    bound.apply_defaults()
    args = dict(bound.arguments)
    weight_users = _weight_users(node)
    if args["need_weights"] is not False and weight_users:
        return (f"nn.MultiheadAttention returns the attention weights, which {weight_users[0].name} at "
                f"{location(weight_users[0])} reads; pass need_weights=False if they are not needed")
    unsupported = [name for name in ("bias_k", "bias_v", "static_k", "static_v") if args[name] is not None]
    if unsupported or args["add_zero_attn"]:
        return f"nn.MultiheadAttention with {unsupported or ['add_zero_attn']} is not supported"
    if args["training"] is not False and not isinstance(args["dropout_p"], float | int):
        return f"nn.MultiheadAttention dropout={args['dropout_p']} is not a constant"
    query, key = (n.meta.get("example_value") if isinstance(n, fx.Node) else None for n in (args["query"], args["key"]))
    if not isinstance(query, torch.Tensor) or not isinstance(key, torch.Tensor) or query.dim() != 3:
        return "unbatched nn.MultiheadAttention input"
    heads = args["num_heads"]
    head_dim = concrete(query.shape[2]) // heads
    reasons = kernels.supports(head_dim, head_dim, query.dtype, query.device.type)
    if reasons:
        return reasons[0]
    return MhaMatch(node, args, location(node), (query.shape[1], heads, query.shape[0], key.shape[0], head_dim),
                    query.dtype, query.device.type)
