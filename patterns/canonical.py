"""Map the many spellings of a Dynamo graph node onto a small canonical vocabulary.

`canonicalize(node)` describes one FX node as one of the dataclasses below, or None when the node is
not part of the vocabulary. The matcher only ever reasons about these descriptions, so a new spelling
(another alias of matmul, another way to cast) is one table entry here, never a new pattern.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

Scalar = float | fx.Node  # a Python number, or a node producing a 0-d tensor / SymFloat / SymInt


@dataclass(frozen=True)
class Operand:
    """A matmul operand: `node`, permuted by `perm` first when perm is not None."""

    node: fx.Node
    perm: tuple[int, ...] | None = None


@dataclass(frozen=True)
class MatMul:
    """out = alpha * (permute(a) @ permute(b)) [+ beta * addend], permuted by out_perm when not None.

    alpha, beta and addend come from baddbmm; out_perm from an einsum's output order.
    """

    a: Operand
    b: Operand
    out_perm: tuple[int, ...] | None = None
    alpha: float = 1.0
    addend: fx.Node | None = None
    beta: float = 0.0


@dataclass(frozen=True)
class Scale:
    """out = x * factor (a division is recorded as its reciprocal)."""

    x: fx.Node
    factor: Scalar
    reciprocal: bool = False


@dataclass(frozen=True)
class Softmax:
    """out = softmax(x, dim), computed in `dtype` when given."""

    x: fx.Node
    dim: int
    dtype: torch.dtype | None


@dataclass(frozen=True)
class Cast:
    """out = x converted to dtype; dtype None means 'the dtype of the node `like`'."""

    x: fx.Node
    dtype: torch.dtype | None
    like: fx.Node | None = None


@dataclass(frozen=True)
class Identity:
    """out = x (contiguous, clone, dropout that drops nothing)."""

    x: fx.Node


@dataclass(frozen=True)
class Dropout:
    """out = dropout(x, p) in training mode with p that may be non-zero."""

    x: fx.Node
    p: Scalar


@dataclass(frozen=True)
class MaskedFill:
    """out = x where `mask` is False, `value` where it is True (inverted: where it is False)."""

    x: fx.Node
    mask: fx.Node
    value: float
    inverted: bool = False


@dataclass(frozen=True)
class AddBias:
    """out = x + factor * bias, with bias a tensor node."""

    x: fx.Node
    bias: fx.Node
    factor: float = 1.0


CanonOp = MatMul | Scale | Softmax | Cast | Identity | Dropout | MaskedFill | AddBias

_MATMULS = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm", "__matmul__"}
_SOFTMAXES = {F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax, "softmax"}
_EINSUMS = {torch.einsum, torch.functional.einsum}
_MULS = {operator.mul, operator.imul, torch.mul, "mul", "mul_", "__mul__"}
_DIVS = {operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "div_", "true_divide"}
_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_", "__add__"}
_IDENTITIES = {"contiguous", "clone", torch.clone}
_DROPOUTS = {F.dropout, torch.dropout, torch.nn.functional.dropout, "dropout"}
_MASKED_FILLS = {"masked_fill", "masked_fill_", torch.masked_fill}
_DTYPE_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}


def canonicalize(node: fx.Node) -> CanonOp | None:
    """Describe `node` in the canonical vocabulary, or return None if it is none of those ops."""
    if node.op not in ("call_function", "call_method"):
        return None
    target = node.target
    for handler_targets, handler in _HANDLERS:
        if _is_one_of(target, handler_targets):
            return handler(node)
    return None


def _is_one_of(target: Any, targets: set) -> bool:
    try:
        return target in targets
    except TypeError:  # unhashable target
        return False


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_tensor_node(x: Any) -> bool:
    return isinstance(x, fx.Node) and isinstance(x.meta.get("example_value"), torch.Tensor) and (
        x.meta["example_value"].dim() > 0
    )


def _scalar(x: Any) -> Scalar | None:
    """A Python number, or a node whose value is a scalar (0-d tensor, SymInt/SymFloat); else None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, int | float):
        return float(x)
    if isinstance(x, fx.Node):
        value = x.meta.get("example_value")
        if isinstance(value, torch.SymInt | torch.SymFloat | int | float):
            return x
        if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype.is_floating_point:
            return x
    return None


def _matmul(node: fx.Node) -> MatMul | None:
    a, b = _arg(node, 0, "input"), _arg(node, 1, "other", _arg(node, 1, "mat2"))
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    return MatMul(Operand(a), Operand(b))


def _baddbmm(node: fx.Node) -> MatMul | None:
    """baddbmm(input, b1, b2, beta=, alpha=): an empty/zero input or beta=0 contributes nothing."""
    addend, a, b = (_arg(node, i, name) for i, name in enumerate(("input", "batch1", "batch2")))
    beta, alpha = _constant_float(node.kwargs.get("beta", 1.0)), _constant_float(node.kwargs.get("alpha", 1.0))
    if not all(isinstance(x, fx.Node) for x in (addend, a, b)) or beta is None or alpha is None:
        return None
    if beta == 0 or (addend.op == "call_function" and addend.target in (torch.zeros, torch.zeros_like)):
        return MatMul(Operand(a), Operand(b), alpha=alpha)
    return MatMul(Operand(a), Operand(b), alpha=alpha, addend=addend, beta=beta)


def _einsum(node: fx.Node) -> MatMul | None:
    """Describe a two-operand einsum that is a batched matrix product as permutes around a matmul."""
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], list | tuple):
        operands = list(operands[0])
    if not isinstance(equation, str) or len(operands) != 2 or "->" not in equation or "." in equation:
        return None
    lhs, out = equation.replace(" ", "").split("->")
    terms = lhs.split(",")
    if len(terms) != 2:
        return None
    sa, sb = terms
    if len(set(sa)) != len(sa) or len(set(sb)) != len(sb) or len(set(out)) != len(out):
        return None
    contracted = [c for c in sa if c in sb and c not in out]
    row = [c for c in sa if c not in sb]
    col = [c for c in sb if c not in sa]
    batch = [c for c in out if c in sa and c in sb]
    if len(contracted) != 1 or len(row) != 1 or len(col) != 1 or set(out) != set(batch + row + col):
        return None
    a_order = batch + row + contracted
    b_order = batch + contracted + col
    mm_out = batch + row + col
    a_perm = tuple(sa.index(c) for c in a_order)
    b_perm = tuple(sb.index(c) for c in b_order)
    out_perm = tuple(mm_out.index(c) for c in out)

    def identity_or(perm: tuple[int, ...]) -> tuple[int, ...] | None:
        return None if perm == tuple(range(len(perm))) else perm

    return MatMul(Operand(operands[0], identity_or(a_perm)), Operand(operands[1], identity_or(b_perm)),
                  identity_or(out_perm))


def _softmax(node: fx.Node) -> Softmax | None:
    x = _arg(node, 0, "input")
    dim = _arg(node, 1, "dim")
    dtype = _arg(node, 3 if node.target is F.softmax else 2, "dtype")  # F.softmax has _stacklevel before dtype
    if not isinstance(x, fx.Node) or not isinstance(dim, int):
        return None
    return Softmax(x, dim, dtype if isinstance(dtype, torch.dtype) else None)


def _mul(node: fx.Node) -> Scale | None:
    a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
    if _is_tensor_node(a) and _scalar(b) is not None:
        return Scale(a, _scalar(b))
    if _is_tensor_node(b) and _scalar(a) is not None:
        return Scale(b, _scalar(a))
    return None


def _div(node: fx.Node) -> Scale | None:
    a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
    if node.kwargs.get("rounding_mode") is not None:
        return None
    if _is_tensor_node(a) and _scalar(b) is not None:
        return Scale(a, _scalar(b), reciprocal=True)
    return None


def _add(node: fx.Node) -> AddBias | None:
    a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
    if node.kwargs.get("alpha", 1) != 1 or not (_is_tensor_node(a) and _is_tensor_node(b)):
        return None
    return AddBias(a, b)


def _cast(node: fx.Node) -> Cast | None:
    x = node.args[0] if node.args else None
    if not isinstance(x, fx.Node):
        return None
    if node.target in _DTYPE_METHODS:
        return Cast(x, _DTYPE_METHODS[node.target])
    if node.target == "type_as":
        return Cast(x, None, like=node.args[1])
    rest = [*node.args[1:], node.kwargs.get("dtype")]
    dtypes = [a for a in rest if isinstance(a, torch.dtype)]
    others = [a for a in node.args[1:] if not isinstance(a, torch.dtype)]
    if node.target in ("to", "type") and len(dtypes) == 1 and not others and set(node.kwargs) <= {"dtype"}:
        return Cast(x, dtypes[0])
    if node.target == "to" and len(node.args) == 2 and isinstance(node.args[1], fx.Node) and not node.kwargs:
        return Cast(x, None, like=node.args[1])  # x.to(other_tensor)
    return None


def _identity(node: fx.Node) -> Identity | None:
    x = node.args[0] if node.args else None
    if not isinstance(x, fx.Node) or set(node.kwargs) - {"memory_format"}:
        return None
    return Identity(x)


def _dropout(node: fx.Node) -> Identity | Dropout | None:
    x = _arg(node, 0, "input")
    p = _arg(node, 1, "p", 0.5)
    training = _arg(node, 2, "training", True if node.op == "call_function" else True)
    if not isinstance(x, fx.Node):
        return None
    if training is False or (isinstance(p, int | float) and p == 0):
        return Identity(x)
    return Dropout(x, p)


def _masked_fill(node: fx.Node) -> MaskedFill | None:
    x, mask, value = _arg(node, 0, "input"), _arg(node, 1, "mask"), _arg(node, 2, "value")
    value = _constant_float(value)
    if not isinstance(x, fx.Node) or not isinstance(mask, fx.Node) or value is None:
        return None
    return MaskedFill(x, mask, value)


def _where(node: fx.Node) -> MaskedFill | None:
    cond, a, b = (_arg(node, i, name) for i, name in enumerate(("condition", "input", "other")))
    if not isinstance(cond, fx.Node):
        return None
    if _is_tensor_node(a) and _constant_float(b) is not None:
        return MaskedFill(a, cond, _constant_float(b), inverted=True)
    if _is_tensor_node(b) and _constant_float(a) is not None:
        return MaskedFill(b, cond, _constant_float(a))
    return None


def _constant_float(value: Any) -> float | None:
    """A Python number, or a `torch.tensor(c)` / `torch.full([], c)` node with a constant c; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, fx.Node) and value.op == "call_function":
        if value.target is torch.tensor and value.args and not isinstance(value.args[0], fx.Node):
            return _constant_float(value.args[0])
        if value.target is torch.full and len(value.args) >= 2 and tuple(value.args[0]) == ():
            return _constant_float(value.args[1])
    return None


_HANDLERS: list[tuple[set, Any]] = [
    (_MATMULS, _matmul),
    (_EINSUMS, _einsum),
    ({torch.baddbmm, "baddbmm"}, _baddbmm),
    (_SOFTMAXES, _softmax),
    (_MULS, _mul),
    (_DIVS, _div),
    (_ADDS, _add),
    ({"float", "half", "bfloat16", "double", "to", "type", "type_as"}, _cast),
    (_IDENTITIES, _identity),
    (_DROPOUTS, _dropout),
    (_MASKED_FILLS, _masked_fill),
    ({torch.where}, _where),
]



def swapped_last_two(node: fx.Node) -> fx.Node | None:
    """x if `node` is x with its last two dims swapped (transpose, permute, .mT, .T on 2-d); else None."""
    value = node.meta.get("example_value")
    if not isinstance(value, torch.Tensor) or value.dim() < 2 or node.op not in ("call_function", "call_method"):
        return None
    rank = value.dim()
    x = node.args[0] if node.args else None
    if not isinstance(x, fx.Node):
        return None
    target, rest = node.target, node.args[1:]
    if target is getattr and rest in (("mT",), ("T",) if rank == 2 else ("mT",)):
        return x
    if target in ("transpose", torch.transpose) and len(rest) == 2 and all(isinstance(d, int) for d in rest):
        if sorted(d % rank for d in rest) == [rank - 2, rank - 1]:
            return x
    if target in ("permute", torch.permute):
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], list | tuple) else rest
        swap = (*range(rank - 2), rank - 1, rank - 2)
        if len(dims) == rank and all(isinstance(d, int) for d in dims) and tuple(d % rank for d in dims) == swap:
            return x
    return None
