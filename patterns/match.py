"""The attention matcher: anchored on each softmax, walk back to Q @ K^T and forward to P @ V.

Works only on canonical descriptions (patterns.canonical), so every spelling of a matmul, a scale, a
cast or a softmax is matched by the same walk. Returns an AttentionMatch, or a NearMiss that says why
this softmax was left alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from flash_fx.patterns.canonical import (
    AddBias,
    Cast,
    Dropout,
    Identity,
    MaskedFill,
    MatMul,
    Operand,
    Scale,
    Softmax,
    canonicalize,
)
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


@dataclass
class ScoreTerm:
    """A mask or bias applied to the scores, with the constant factor the scores get after it."""

    op: MaskedFill | AddBias
    factor_after: float = 1.0


@dataclass
class AttentionMatch:
    """softmax(scale * Q @ K^T + masks) @ V found in a graph; everything the rewrite needs."""

    softmax: fx.Node
    qk: fx.Node
    pv: fx.Node
    q: Operand
    kt: Operand  # K^T as the matmul sees it: [..., d, Nk]
    v: Operand
    scale: float  # constant part of the scale
    dynamic_scales: list[fx.Node]  # non-constant factors (0-d tensors, symbolic floats), applied to q
    terms: list[ScoreTerm]  # masks and biases in program order
    out_perm: tuple[int, ...] | None  # einsum output order of the P @ V product
    nodes: list[fx.Node]  # the nodes from Q @ K^T to P @ V that the rewrite replaces
    q_shape: tuple  # [..., Nq, d] after the operand's permute
    k_shape: tuple  # [..., Nk, d]
    v_shape: tuple  # [..., Nk, d]
    dtype: torch.dtype
    location: str
    notes: list[str] = field(default_factory=list)


@dataclass
class NearMiss:
    """A softmax that was not rewritten, and why."""

    node: fx.Node
    reason: str
    location: str


def find_attention(graph: fx.Graph) -> list[AttentionMatch | NearMiss]:
    """Every softmax of `graph`, as an AttentionMatch or a NearMiss, in graph order."""
    return [match_softmax(node) for node in softmax_nodes(graph)]


def softmax_nodes(graph: fx.Graph) -> list[fx.Node]:
    """The softmax nodes of `graph` (the matcher's anchors), in graph order."""
    return [node for node in graph.nodes if isinstance(canonicalize(node), Softmax)]


def match_softmax(node: fx.Node) -> AttentionMatch | NearMiss:
    """The attention around the softmax `node`, or a NearMiss saying why there is none."""
    result = _match_softmax(node, canonicalize(node))
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
    value = node.meta.get("example_value")
    return value if isinstance(value, torch.Tensor) else None


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _match_softmax(softmax: fx.Node, canon: Softmax) -> AttentionMatch | str:
    scores = _value(canon.x)
    if scores is None or scores.dim() < 2:
        return "softmax input has no tensor example value"
    if canon.dim not in (-1, scores.dim() - 1):
        return f"softmax over dim {canon.dim}, not the key axis (last dim)"

    # Walk back from the softmax to the Q @ K^T product.
    back: list[fx.Node] = []
    terms_reversed: list = []
    node = canon.x
    while True:
        desc = canonicalize(node)
        if isinstance(desc, MatMul):
            break
        if desc is None or isinstance(desc, Softmax | Dropout):
            return f"scores come from {_op_name(node)}, not from a Q @ K^T product"
        if _only_user(node) is None:
            return f"scores ({node.name}) are also used outside the attention"
        back.append(node)
        terms_reversed.append(desc)
        node = desc.x
    qk, qk_desc = node, desc
    if _only_user(qk) is None:
        return f"scores ({qk.name}) are also used outside the attention"
    if qk_desc.out_perm is not None:
        return "Q @ K^T einsum writes its output transposed"
    if qk_desc.addend is not None:  # baddbmm's input is an additive bias on the scores
        terms_reversed.append(AddBias(qk, qk_desc.addend, factor=qk_desc.beta))

    # Walk forward from the softmax to the P @ V product.
    forward: list[fx.Node] = []
    node = softmax
    while True:
        user = _only_user(node)
        if user is None:
            return f"probabilities ({node.name}) are used outside the attention"
        desc = canonicalize(user)
        if isinstance(desc, MatMul):
            break
        if isinstance(desc, Dropout):
            return f"dropout (p={desc.p}) in training mode: fused dropout is not available yet"
        if not isinstance(desc, Cast | Identity):
            return f"probabilities go to {_op_name(user)}, not to a P @ V product"
        forward.append(user)
        node = user
    pv, pv_desc = user, desc
    if pv_desc.a.node is not node or pv_desc.a.perm is not None:
        return "probabilities are not the left operand of the P @ V product"
    if pv_desc.alpha != 1.0 or pv_desc.addend is not None:
        return "the P @ V product is scaled or has an addend"

    q, kt = qk_desc.a, qk_desc.b
    scale, dynamic_scales, terms = qk_desc.alpha, [], []
    q, q_factor = _absorb_operand_scale(q)
    kt, k_factor = _absorb_operand_scale(kt)
    scale *= q_factor * k_factor
    for desc in reversed(terms_reversed):  # program order: from Q @ K^T towards the softmax
        if isinstance(desc, Scale):
            if isinstance(desc.factor, float):
                factor = 1.0 / desc.factor if desc.reciprocal else desc.factor
                if terms and factor <= 0:
                    return "non-positive scale applied after a mask"
                scale *= factor
                for term in terms:
                    term.factor_after *= factor
            elif terms:
                return "non-constant scale applied after a mask or bias"
            else:
                dynamic_scales.append(desc)
        elif isinstance(desc, MaskedFill | AddBias):
            terms.append(ScoreTerm(desc, getattr(desc, "factor", 1.0)))
    if not math.isfinite(scale) or scale == 0:
        return f"scale {scale} is not a finite non-zero number"

    shapes = _operand_shapes(q, kt, pv_desc.b)
    if isinstance(shapes, str):
        return shapes
    q_shape, k_shape, v_shape, dtype = shapes
    return AttentionMatch(
        softmax=softmax, qk=qk, pv=pv, q=q, kt=kt, v=pv_desc.b, scale=scale,
        dynamic_scales=dynamic_scales, terms=terms, out_perm=pv_desc.out_perm,
        nodes=[qk, *reversed(back), softmax, *forward, pv],
        q_shape=q_shape, k_shape=k_shape, v_shape=v_shape, dtype=dtype, location=location(softmax),
    )


def _absorb_operand_scale(operand: Operand) -> tuple[Operand, float]:
    """Fold a constant scale on q (or on K^T) that only feeds this product into the attention scale."""
    desc = canonicalize(operand.node)
    if isinstance(desc, Scale) and isinstance(desc.factor, float) and _only_user(operand.node) is not None:
        factor = 1.0 / desc.factor if desc.reciprocal else desc.factor
        if math.isfinite(factor) and factor != 0:
            return Operand(desc.x, operand.perm), factor
    return operand, 1.0


def _permuted_shape(operand: Operand) -> tuple | None:
    value = _value(operand.node)
    if value is None:
        return None
    shape = tuple(value.shape)
    return tuple(shape[i] for i in operand.perm) if operand.perm is not None else shape


def _operand_shapes(q: Operand, kt: Operand, v: Operand) -> tuple[tuple, tuple, tuple, torch.dtype] | str:
    """Shapes of q [..., Nq, d], k [..., Nk, d], v [..., Nk, d] and their dtype, or why they do not fit."""
    values = [_value(o.node) for o in (q, kt, v)]
    if any(v is None for v in values):
        return "an operand has no tensor example value"
    dtypes = {v.dtype for v in values}
    if len(dtypes) != 1:
        return f"q, k, v have different dtypes {sorted(map(str, dtypes))}"
    dtype = dtypes.pop()
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} is not supported by the kernels (fp16, bf16, fp32)"
    devices = {v.device.type for v in values}
    if not devices <= {"cpu", "cuda"}:
        return f"device {sorted(devices)} is neither CUDA nor CPU"
    q_shape, kt_shape, v_shape = (_permuted_shape(o) for o in (q, kt, v))
    if min(len(q_shape), len(kt_shape), len(v_shape)) < 2:
        return "an operand has fewer than 2 dims"
    k_shape = (*kt_shape[:-2], kt_shape[-1], kt_shape[-2])
    batch_rank = max(len(q_shape), len(k_shape), len(v_shape)) - 2
    if batch_rank > 2:
        return f"{batch_rank} batch dims (at most 2: batch and heads)"
    head_dim, value_dim = q_shape[-1], v_shape[-1]
    if not _same(head_dim, value_dim):
        return f"value head dim {value_dim} differs from the query head dim {head_dim}"
    if isinstance(head_dim, int) and head_dim > MAX_HEAD_DIM:
        return f"head dim {head_dim} is over {MAX_HEAD_DIM}"
    return q_shape, k_shape, v_shape, dtype


def _same(a: object, b: object) -> bool:
    """a == b for sizes that may be symbolic, without adding a guard (unknown counts as different)."""
    return statically_known_true(a == b)


def _op_name(node: fx.Node) -> str:
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    return f"{name} ({node.name})" if node.op != "placeholder" else f"graph input {node.name}"
