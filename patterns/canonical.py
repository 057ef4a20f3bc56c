"""Map the many spellings of a Dynamo graph node onto a small canonical vocabulary.

`canonicalize(node)` describes one FX node as one of the dataclasses below, or None when the node is
not part of the vocabulary. The matcher only ever reasons about these descriptions, so a new spelling
(another alias of matmul, another way to cast) is one table entry here, never a new pattern.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from flash_fx.patterns.mutation import is_written
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

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
class RowMaxShift:
    """out = x - max(x, last dim, keepdim) (``.max(-1, keepdim=True).values``, ``amax``, optionally detached): a
    per-row constant, to which a softmax over the last dim is invariant. ``reduction`` holds the nodes computing the
    max, from the subtraction outward (detach, getitem, max)."""

    x: fx.Node
    reduction: tuple[fx.Node, ...]


@dataclass(frozen=True)
class PointwiseMod:
    """out = a pointwise function of x alone (a score modification step, kernels.spec.ModStep): ``tanh``,
    ``sigmoid``, ``relu``, ``clamp`` (``min(max(x, a), b)``), ``square``, or ``mul_head``: x times ``factor``, a
    tensor that broadcasts over the last two dims (one value per batch row and head)."""

    x: fx.Node
    op: str
    a: float = 0.0
    b: float = 0.0
    factor: fx.Node | None = None


@dataclass(frozen=True)
class SinkConcat:
    """out = cat([x, sink], last dim) with ``sink`` one column: a logit per row that joins the softmax (attention
    sinks, gpt-oss); the column is sliced away after it (:class:`DropLast`)."""

    x: fx.Node
    sink: fx.Node


@dataclass(frozen=True)
class DropLast:
    """out = x[..., :-1]: the last column of the last dim dropped (the sink column after the softmax)."""

    x: fx.Node


@dataclass(frozen=True)
class DropoutCall:
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


@dataclass(frozen=True)
class Reshape:
    """out = x viewed with new batch dims; the last two dims are unchanged. sizes: the target sizes as written."""

    x: fx.Node
    sizes: tuple


@dataclass(frozen=True)
class HeadExpand:
    """out = x [B, Hkv, N, d] with each KV head repeated `repeat` times along dim 1.

    grouped: query head h reads KV head h // repeat (repeat_interleave, expand at dim 2 + reshape);
    tiled: query head h reads KV head h % Hkv (repeat, expand at dim 1 + reshape).
    """

    x: fx.Node
    repeat: int | torch.SymInt
    tiled: bool


@dataclass(frozen=True)
class ScaledDotProductAttention:
    """An explicit F.scaled_dot_product_attention call."""

    q: fx.Node
    k: fx.Node
    v: fx.Node
    attn_mask: fx.Node | None
    dropout_p: Scalar
    is_causal: bool
    scale: Scalar | None


CanonOp = (MatMul | Scale | Softmax | Cast | Identity | DropoutCall | MaskedFill | AddBias | Reshape | HeadExpand
           | ScaledDotProductAttention | RowMaxShift | PointwiseMod | SinkConcat | DropLast)

_MATMULS = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm", "__matmul__"}
_SOFTMAXES = {F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax, "softmax"}
_EINSUMS = {torch.einsum, torch.functional.einsum}
_MULS = {operator.mul, operator.imul, torch.mul, "mul", "mul_", "__mul__"}
_DIVS = {operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "div_", "true_divide"}
_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_", "__add__"}
_IDENTITIES = {"contiguous", "clone", torch.clone}
_SUBS = {operator.sub, torch.sub, "sub", "__sub__"}
_DETACHES = {"detach", torch.detach}
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


def _expand_ellipsis(sa: str, sb: str, out: str, shapes: list) -> tuple[str, str, str] | None:
    """Spell out '...' as explicit batch letters (both operands must cover the same number of dims)."""
    if any(shape is None for shape in shapes) or "..." not in sa or "..." not in sb or "..." not in out:
        return None
    covered = {len(shape) - len(term.replace("...", "")) for shape, term in zip(shapes, (sa, sb), strict=True)}
    if len(covered) != 1:
        return None
    used = set(sa + sb + out)
    letters = "".join([c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in used][: covered.pop()])
    return sa.replace("...", letters), sb.replace("...", letters), out.replace("...", letters)


def _baddbmm(node: fx.Node) -> MatMul | None:
    """baddbmm(input, b1, b2, beta=, alpha=): an empty/zero input or beta=0 contributes nothing."""
    addend, a, b = (_arg(node, i, name) for i, name in enumerate(("input", "batch1", "batch2")))
    beta, alpha = constant_float(node.kwargs.get("beta", 1.0)), constant_float(node.kwargs.get("alpha", 1.0))
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
    if not isinstance(equation, str) or len(operands) != 2 or "->" not in equation:
        return None
    lhs, out = equation.replace(" ", "").split("->")
    terms = lhs.split(",")
    if len(terms) != 2:
        return None
    sa, sb = terms
    if "..." in equation:
        expanded = _expand_ellipsis(sa, sb, out, [_shape_of(o) for o in operands])
        if expanded is None:
            return None
        sa, sb, out = expanded
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


def _shape_of(node: Any) -> tuple | None:
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _sizes_argument(node: fx.Node) -> tuple:
    sizes = node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], list | tuple):
        sizes = tuple(sizes[0])
    return tuple(sizes) or tuple(node.kwargs.get("shape", node.kwargs.get("size", ())))


def _reshape(node: fx.Node) -> Reshape | HeadExpand | None:
    """view/reshape that only regroups batch dims, or the reshape that ends a head expansion."""
    x = node.args[0] if node.args else None
    before, after = _shape_of(x), _shape_of(node)
    if before is None or after is None or len(before) < 2 or len(after) < 2:
        return None
    expansion = _head_expansion(node, x, before, after)
    if expansion is not None:
        return expansion
    if not (statically_known_true(before[-1] == after[-1]) and statically_known_true(before[-2] == after[-2])):
        return None
    return Reshape(x, _sizes_argument(node))


def _head_expansion(node: fx.Node, expanded: fx.Node, before: tuple, after: tuple) -> HeadExpand | None:
    """reshape(expand(x.unsqueeze(p))) merging dims 1 and 2 of a 5-d expand of a 4-d x."""
    if len(before) != 5 or len(after) != 4 or expanded.op != "call_method" or expanded.target != "expand":
        return None
    source = expanded.args[0]
    inner = _shape_of(source)
    if inner is None or len(inner) != 5:
        return None
    merged = statically_known_true(after[1] == before[1] * before[2])
    if not merged or not all(statically_known_true(inner[i] == before[i]) for i in (3, 4)):
        return None  # the reshape must merge exactly dims 1 and 2; N and d must not be broadcast
    for position, tiled in ((2, False), (1, True)):
        if statically_known_true(inner[position] == 1) and not statically_known_true(before[position] == 1):
            x = _unsqueezed_input(source, position)
            if x is not None:  # the repeat may be a size of the graph (a group computed from shapes)
                return HeadExpand(x, before[position], tiled)
    return None


def _unsqueezed_input(node: fx.Node, position: int) -> fx.Node | None:
    """x if node is x.unsqueeze(position) or x[:, None] / x[:, :, None] (4-d x); else None."""
    x = node.args[0] if node.args else None
    if not isinstance(x, fx.Node) or len(_shape_of(x) or ()) != 4:
        return None
    if node.target in ("unsqueeze", torch.unsqueeze) and node.args[1:] in ((position,), (position - 5,)):
        return x
    if node.target is operator.getitem and isinstance(node.args[1], tuple):
        index = node.args[1]
        full = slice(None, None, None)
        if index[:position] == (full,) * position and len(index) > position and index[position] is None and all(
                i == full or i is Ellipsis for i in index[position + 1:]):
            return x
    return None


def _repeat_interleave(node: fx.Node) -> HeadExpand | None:
    x, repeats, dim = _arg(node, 0, "input"), _arg(node, 1, "repeats"), _arg(node, 2, "dim")
    if len(_shape_of(x) or ()) != 4 or not isinstance(repeats, int) or dim not in (1, -3):
        return None
    return HeadExpand(x, repeats, tiled=False)


def _repeat(node: fx.Node) -> HeadExpand | None:
    x = node.args[0] if node.args else None
    sizes = _sizes_argument(node)
    if len(_shape_of(x) or ()) != 4 or len(sizes) != 4 or not all(isinstance(s, int) for s in sizes):
        return None
    if sizes[0] != 1 or sizes[2:] != (1, 1):
        return None
    return HeadExpand(x, sizes[1], tiled=True)


def _sdpa(node: fx.Node) -> ScaledDotProductAttention | None:
    q, k, v = (_arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
    mask = _arg(node, 3, "attn_mask")
    dropout_p = _scalar(_arg(node, 4, "dropout_p", 0.0))
    is_causal = _arg(node, 5, "is_causal", False)
    scale = _arg(node, 6, "scale")
    enable_gqa = node.kwargs.get("enable_gqa", node.args[7] if len(node.args) > 7 else False)
    if not all(isinstance(x, fx.Node) for x in (q, k, v)) or not isinstance(is_causal, bool):
        return None
    if dropout_p is None or not isinstance(enable_gqa, bool) or (mask is not None and not isinstance(mask, fx.Node)):
        return None
    scale = None if scale is None else _scalar(scale)
    return ScaledDotProductAttention(q, k, v, mask, dropout_p, is_causal, scale)


def _softmax(node: fx.Node) -> Softmax | None:
    x = _arg(node, 0, "input")
    dim = _arg(node, 1, "dim")
    dtype = _arg(node, 3 if node.target is F.softmax else 2, "dtype")  # F.softmax has _stacklevel before dtype
    if not isinstance(x, fx.Node) or not isinstance(dim, int):
        return None
    return Softmax(x, dim, dtype if isinstance(dtype, torch.dtype) else None)


def _mul(node: fx.Node) -> Scale | PointwiseMod | None:
    a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
    if _is_tensor_node(a) and _scalar(b) is not None:
        return Scale(a, _scalar(b))
    if _is_tensor_node(b) and _scalar(a) is not None:
        return Scale(b, _scalar(a))
    if a is b and _is_tensor_node(a) and node.target not in ("mul_", operator.imul):
        return PointwiseMod(a, "square")
    if _is_tensor_node(a) and _is_tensor_node(b) and node.target not in ("mul_", operator.imul):
        for x, factor in ((a, b), (b, a)):
            if _per_head(factor, x):
                return PointwiseMod(x, "mul_head", factor=factor)
    return None


def _per_head(factor: fx.Node, x: fx.Node) -> bool:
    """True if ``factor`` broadcasts into ``x`` (rank 3 or 4) with size 1 along its last two dims."""
    f, v = factor.meta["example_value"], x.meta["example_value"]
    if not (f.dtype.is_floating_point and 2 <= f.dim() <= v.dim() and 3 <= v.dim() <= 4):
        return False
    sizes, target = tuple(f.shape), tuple(v.shape)
    if not (statically_known_true(sizes[-1] == 1) and statically_known_true(sizes[-2] == 1)):
        return False
    return all(statically_known_true(s == 1) or statically_known_true(s == t)
               for s, t in zip(reversed(sizes[:-2]), reversed(target[:-2]), strict=False))


def _unary(op: str) -> Any:
    """The handler of a pointwise function of one tensor (no other arguments)."""

    def handler(node: fx.Node) -> PointwiseMod | None:
        x = _arg(node, 0, "input")
        if not _is_tensor_node(x) or len(node.args) > 1 or node.kwargs.get("inplace", False):
            return None
        if set(node.kwargs) - {"inplace"}:
            return None
        return PointwiseMod(x, op)

    return handler


def _clamp(node: fx.Node) -> PointwiseMod | None:
    """clamp / clip with constant bounds (clamp_min, clamp_max: one side)."""
    x = _arg(node, 0, "input")
    if not _is_tensor_node(x) or set(node.kwargs) - {"min", "max"}:
        return None
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name in ("clamp_min", "clamp_max"):
        bound = _arg(node, 1, "min" if name == "clamp_min" else "max")
        low, high = (bound, None) if name == "clamp_min" else (None, bound)
    else:
        low, high = _arg(node, 1, "min"), _arg(node, 2, "max")
    if low is None and high is None:
        return None
    bounds = [math.inf * sign if v is None else constant_float(v) for v, sign in ((low, -1), (high, 1))]
    if any(v is None or math.isnan(v) for v in bounds):
        return None
    return PointwiseMod(x, "clamp", *bounds)


def _cat(node: fx.Node) -> SinkConcat | None:
    """cat([scores, sink], dim=-1) with a one-column sink of the scores' rank."""
    tensors, dim = _arg(node, 0, "tensors"), _arg(node, 1, "dim", 0)
    if not isinstance(tensors, list | tuple) or len(tensors) != 2 or not isinstance(dim, int):
        return None
    x, sink = tensors
    if not (_is_tensor_node(x) and _is_tensor_node(sink)):
        return None
    a, b = x.meta["example_value"], sink.meta["example_value"]
    if a.dim() != b.dim() or dim % a.dim() != a.dim() - 1 or not statically_known_true(b.shape[-1] == 1):
        return None
    return SinkConcat(x, sink)


def _drop_last(node: fx.Node) -> DropLast | None:
    """x[..., :-1] (or with explicit full slices before the last dim)."""
    x, index = node.args if len(node.args) == 2 else (None, None)
    if not _is_tensor_node(x) or not isinstance(index, tuple) or not index:
        return None
    last, before = index[-1], index[:-1]
    if last != slice(None, -1, None):
        return None
    rank = x.meta["example_value"].dim()
    if before == (Ellipsis,) or (len(before) == rank - 1 and all(i == slice(None) for i in before)):
        return DropLast(x)
    return None


def _pow(node: fx.Node) -> PointwiseMod | None:
    """x ** 2 (pow with the exponent 2)."""
    x, exponent = _arg(node, 0, "input"), _arg(node, 1, "exponent")
    if not _is_tensor_node(x) or isinstance(exponent, bool) or exponent != 2:
        return None
    return PointwiseMod(x, "square")


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


def _row_max_shift(node: fx.Node) -> RowMaxShift | None:
    x, shift = _arg(node, 0, "input"), _arg(node, 1, "other")
    if node.kwargs.get("alpha", 1) != 1 or not _is_tensor_node(x) or not isinstance(shift, fx.Node):
        return None
    reduction, m = [], shift
    if m.op in ("call_function", "call_method") and _is_one_of(m.target, _DETACHES) and len(m.args) == 1:
        reduction.append(m)
        m = m.args[0]
    if m.op == "call_function" and m.target is operator.getitem and m.args[1] == 0:  # max(...).values
        reduction.append(m)
        m = m.args[0]
        maxes = {"max", torch.max}
    else:
        maxes = {"amax", torch.amax}
    if not isinstance(m, fx.Node) or m.op not in ("call_function", "call_method") or not _is_one_of(m.target, maxes):
        return None
    dim, keepdim = _arg(m, 1, "dim"), _arg(m, 2, "keepdim", False)
    dim = dim[0] if isinstance(dim, list | tuple) and len(dim) == 1 else dim
    rank = x.meta["example_value"].dim()
    if m.args[0] is not x or not isinstance(dim, int) or dim % rank != rank - 1 or keepdim is not True:
        return None
    return RowMaxShift(x, (*reduction, m))


def _cast(node: fx.Node) -> Cast | None:
    """A conversion to a floating-point dtype (a cast through an integer or bool dtype changes values)."""
    x = node.args[0] if node.args else None
    value = node.meta.get("example_value")
    if not isinstance(x, fx.Node) or not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
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


def _dropout(node: fx.Node) -> Identity | DropoutCall | None:
    x = _arg(node, 0, "input")
    p = _arg(node, 1, "p", 0.5)
    training = _arg(node, 2, "train" if node.target is torch.dropout else "training", True)
    if not isinstance(x, fx.Node) or not isinstance(training, bool) or _arg(node, 3, "inplace", False):
        return None
    if training is False or (isinstance(p, int | float) and p == 0):
        return Identity(x)
    return DropoutCall(x, float(p) if isinstance(p, int | float) else p)


def _masked_fill(node: fx.Node) -> MaskedFill | None:
    x, mask, value = _arg(node, 0, "input"), _arg(node, 1, "mask"), _arg(node, 2, "value")
    value = constant_float(value)
    if not isinstance(x, fx.Node) or not isinstance(mask, fx.Node) or value is None:
        return None
    return MaskedFill(x, mask, value)


def _where(node: fx.Node) -> MaskedFill | None:
    cond, a, b = (_arg(node, i, name) for i, name in enumerate(("condition", "input", "other")))
    if not isinstance(cond, fx.Node):
        return None
    if _is_tensor_node(a) and constant_float(b) is not None:
        return MaskedFill(a, cond, constant_float(b), inverted=True)
    if _is_tensor_node(b) and constant_float(a) is not None:
        return MaskedFill(b, cond, constant_float(a))
    return None


def constant_float(value: Any) -> float | None:
    """A Python number, or a 0-d `torch.tensor(c)` / `torch.full([], c)` / `torch.zeros(())` node; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, fx.Node) and value.op == "call_function" and not is_written(value):
        if value.target is torch.tensor and value.args and not isinstance(value.args[0], fx.Node):
            return constant_float(value.args[0])
        if value.target is torch.full and len(value.args) >= 2 and tuple(value.args[0]) == ():
            return constant_float(value.args[1])
        example = value.meta.get("example_value")
        if value.target in (torch.zeros, torch.zeros_like) and isinstance(example, torch.Tensor) and example.dim() == 0:
            return 0.0
    return None


_HANDLERS: list[tuple[set, Any]] = [
    (_MATMULS, _matmul),
    (_EINSUMS, _einsum),
    ({torch.baddbmm, "baddbmm"}, _baddbmm),
    (_SOFTMAXES, _softmax),
    (_MULS, _mul),
    (_DIVS, _div),
    (_ADDS, _add),
    (_SUBS, _row_max_shift),
    ({"float", "half", "bfloat16", "double", "to", "type", "type_as"}, _cast),
    (_IDENTITIES, _identity),
    (_DROPOUTS, _dropout),
    (_MASKED_FILLS, _masked_fill),
    ({torch.where}, _where),
    ({"view", "reshape", torch.reshape}, _reshape),
    ({"repeat_interleave", torch.repeat_interleave}, _repeat_interleave),
    ({"repeat"}, _repeat),
    ({F.scaled_dot_product_attention}, _sdpa),
    ({torch.tanh, F.tanh, "tanh"}, _unary("tanh")),
    ({torch.sigmoid, F.sigmoid, torch.special.expit, "sigmoid"}, _unary("sigmoid")),
    ({torch.relu, F.relu, "relu"}, _unary("relu")),
    ({torch.square, "square"}, _unary("square")),
    ({torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max, "clamp", "clip", "clamp_min", "clamp_max"}, _clamp),
    ({torch.pow, operator.pow, "pow", "__pow__"}, _pow),
    ({torch.cat, torch.concat, torch.concatenate}, _cat),
    ({operator.getitem}, _drop_last),
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
