"""Mask analysis: the mask subgraph of a matched attention -> typed mask parts, with their proofs.

A boolean visibility mask is split into the AND of its literals (through &, |, ~ by De Morgan, expand and
casts). Literals computed without input data (from shapes, aranges, buffers) are cut out of the model graph
(`MaskProgram`), evaluated on the example inputs and AND-ed; the result must equal the dense form of a
`Band` (causal, causal with an offset, sliding window). The same programs are re-evaluated at run time for
each new shape and each change of a buffer they read (`MaskProof`), so a rewrite can never outlive the fact
it rests on. Literals that read input data are used as they are, when their shape says what they are: a
[B, 1, 1, Nk] literal is key padding, `ids_q == ids_k` with [.., Nq, 1] and [.., 1, Nk] operands is a
document mask. Anything else leaves the whole mask to the dense "bias" variant.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from flash_fx.kernels.spec import Band
from flash_fx.patterns.canonical import constant_float
from flash_fx.patterns.mutation import is_written, unreplayed_writer
from torch import fx

from flash_fx.exactness import is_mask_fill


@dataclass(frozen=True)
class Literal:
    """One factor of a visibility mask: `node` (a boolean tensor), negated or not."""

    node: fx.Node
    negated: bool


_SIZE_QUERIES = {"size", "dim", "shape", torch.ops.aten.sym_size.int}


class MaskProgram:
    """The ancestors of a mask node, cut out into a standalone module over some graph inputs."""

    def __init__(self, graph: fx.Graph, mask: fx.Node):
        nodes = _ancestors(mask)
        self.input_nodes = [n for n in graph.nodes if n in nodes and n.op == "placeholder"]
        self.input_positions = [_placeholder_position(graph, n) for n in self.input_nodes]
        sub = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for node in graph.nodes:
            if node in nodes:
                env[node] = sub.node_copy(node, lambda n: env[n])
        sub.output(env[mask])
        owner = mask.graph.owning_module
        self.module = fx.GraphModule(owner if owner is not None else torch.nn.Module(), sub)
        self.value_read = [n is mask or _reads_values(n, nodes) for n in self.input_nodes]
        self.data_inputs = [n.name for n, read in zip(self.input_nodes, self.value_read, strict=True)
                            if read and not _is_module_state(n)]
        self.has_get_attr = any(n.op == "get_attr" for n in nodes)
        self.writer = unreplayed_writer(nodes)  # a write in place that the copy would not replay

    def evaluate(self, graph_args: list[Any] | None) -> torch.Tensor:
        """Run the mask subgraph on the graph's (concrete) arguments (None: a graph without concrete inputs,
        such as a higher-order op's body; only programs that read no input can run there)."""
        if graph_args is None and self.input_positions:
            raise ValueError("the mask reads inputs of a graph whose concrete inputs are unknown")
        return self.module(*(concrete(graph_args[p]) for p in self.input_positions))

    def inputs(self, graph_args: list[Any]) -> list[Any]:
        """What the program's value depends on among the graph's arguments: the tensors whose values it reads,
        the shapes of those it reads only the sizes of (q in `q.size(-2)`), concrete sizes for symbolic ones."""
        values = [concrete(graph_args[p]) for p in self.input_positions]
        return [v if read or not isinstance(v, torch.Tensor) else ("shape", tuple(v.shape))
                for v, read in zip(values, self.value_read, strict=True)]


class Snapshots:
    """The inputs a proof last held on, per input shape: a proof is re-checked whenever any input differs in
    shape, dtype or any value from those (whatever changed it: in place, `.data`, NumPy, a new tensor at a
    reused address). The check costs one comparison of each input tensor with its copy per call: a read of
    the mask buffers (a 1024 x 1024 bool buffer is 1 MB), no evaluation of the program."""

    def __init__(self) -> None:
        self._held: dict[tuple, list[Any]] = {}

    @staticmethod
    def _key(values: list[Any]) -> tuple:
        return tuple((tuple(v.shape), v.dtype, str(v.device)) if isinstance(v, torch.Tensor) else ("value", v)
                     for v in values)

    def holds(self, values: list[Any], check: Callable[[], bool]) -> bool:
        """True if `values` equal those a proof last held on, else the result of `check()` (remembered if True)."""
        key = self._key(values)
        held = self._held.get(key)
        if held is not None and all(torch.equal(v, h) if isinstance(v, torch.Tensor) else v == h
                                    for v, h in zip(values, held, strict=True)):
            return True
        ok = check()
        if ok:
            self._held[key] = [v.detach().clone() if isinstance(v, torch.Tensor) else v for v in values]
        return ok


@dataclass
class MaskProof:
    """Static mask literals whose AND must keep equalling `spec` on the real inputs (checked per cache key)."""

    programs: list[tuple[MaskProgram, bool]]  # (program, negated)
    spec: Band
    _held: Snapshots = field(default_factory=Snapshots)

    def holds(self, graph_args: list[Any]) -> bool:
        """True if the literals equal the spec on these arguments (re-evaluated when an input changed)."""
        values = [x for program, _ in self.programs for x in program.inputs(graph_args)]
        return self._held.holds(values, lambda: _band_of(_and_of(self.programs, graph_args)) == self.spec)


@dataclass(frozen=True)
class Unrecognized:
    """A boolean mask that is not a structural pattern (or cannot be proven one), with the reason."""

    reason: str


@dataclass(frozen=True)
class ConstantMask:
    """A boolean mask computed without input data that is not a band: a constant block-sparse layout.

    `visible` is its value on the example inputs ([.., Nq, Nk], True = key visible); the kernels get the
    mask as a bias and skip its empty tiles (see flash_fx.kernels.schedule)."""

    visible: torch.Tensor

    def describe(self) -> str:
        """"prefix_lm(prefix=P)" for a causal mask whose first P keys every query sees, else "constant mask"."""
        planes = self.visible.reshape(-1, *self.visible.shape[-2:])
        plane = planes[0]
        if plane.dim() == 2 and bool((planes == plane).all()):
            prefix = int(plane.all(0).int().cumprod(0).sum())
            i = torch.arange(plane.shape[0])[:, None]
            j = torch.arange(plane.shape[1])[None, :]
            if 0 < prefix < plane.shape[1] and bool((plane == ((j <= i) | (j < prefix))).all()):
                return f"prefix_lm(prefix={prefix})"
        return "constant mask"


@dataclass
class MaskAnalysis:
    """A visibility mask as kernel inputs: a proven band, key padding, document ids (each optional)."""

    band: MaskProof | None
    key_valid: Literal | None  # [B?, 1, 1, Nk]-shaped literal: True = key takes part (after negation)
    documents: tuple[fx.Node, fx.Node] | None  # (ids of the queries [.., Nq, 1], ids of the keys [.., 1, Nk])

    def describe(self) -> str:
        parts = [self.band.spec.describe()] if self.band else []
        parts += ["key_padding"] if self.key_valid else []
        parts += ["document"] if self.documents else []
        return " & ".join(parts) or "none"


def analyze_visibility(graph: fx.Graph, visible: fx.Node, negated: bool, nq: int, nk: int,
                       graph_args: list[Any] | None) -> MaskAnalysis | ConstantMask | Unrecognized:
    """Split the boolean mask `visible` (negated: True means hidden) into kernel-evaluable parts.

    nq, nk: the concrete score shape. graph_args: the example inputs of the graph. A mask computed without
    input data that is not a band comes back as a ConstantMask (its value on the example inputs).
    """
    static: list[tuple[MaskProgram, bool]] = []
    key_valid, documents = None, None
    for literal in _literals(visible, negated):
        value = literal.node.meta.get("example_value")
        if not isinstance(value, torch.Tensor) or value.dtype != torch.bool:
            return Unrecognized(f"mask factor {literal.node.name} is not a boolean tensor")
        program = MaskProgram(graph, literal.node)
        if program.has_get_attr:
            return Unrecognized("mask reads module attributes the proof cannot track")
        if program.writer is not None:
            return Unrecognized(f"mask is written in place ({program.writer.name}): read as a tensor")
        if not program.data_inputs:
            static.append((program, literal.negated))
            continue
        shape = _right_aligned(value.shape)
        if key_valid is None and _is_one(shape[1]) and _is_one(shape[2]) and concrete(shape[3]) == nk:
            key_valid = literal
            continue
        ids = _document_ids(literal)
        if documents is None and ids is not None:
            documents = ids
            continue
        return Unrecognized(f"mask reads input data ({', '.join(program.data_inputs)}) in a form that is neither "
                            "key padding nor document ids")
    band = None
    if static:
        try:
            dense = _and_of(static, graph_args)
        except Exception as error:  # the proof must never break compilation
            return Unrecognized(f"mask could not be evaluated for the proof ({type(error).__name__})")
        if dense.dim() < 2 or tuple(dense.shape[-2:]) not in ((nq, nk), (1, nk), (nq, 1), (1, 1)):
            return Unrecognized("static mask is not a [.., Nq, Nk] tensor")
        spec = _band_of(dense.expand(*dense.shape[:-2], nq, nk))
        if spec is None:
            if key_valid is None and documents is None:
                return ConstantMask(dense)
            return Unrecognized("static mask is not a causal or sliding-window band (dense path)")
        if spec != Band(None, None):
            band = MaskProof(static, spec)
    return MaskAnalysis(band, key_valid, documents)


_AND = {operator.and_, operator.iand, torch.logical_and, torch.bitwise_and, "__and__", "logical_and", "bitwise_and"}
_OR = {operator.or_, operator.ior, torch.logical_or, torch.bitwise_or, "__or__", "logical_or", "bitwise_or"}
_NOT = {operator.invert, torch.logical_not, torch.bitwise_not, "__invert__", "logical_not", "bitwise_not"}
_SAME_VALUES = {"expand", "contiguous", "bool", "to", torch.broadcast_to}


def _literals(node: fx.Node, negated: bool) -> list[Literal]:
    """The factors whose AND is `node` (or ~node when negated), looking through ~, &, | and value-preserving ops."""
    target = node.target if node.op in ("call_function", "call_method") else None
    inputs = [a for a in node.args if isinstance(a, fx.Node)]
    if _is_in(target, _NOT) and len(inputs) == 1:
        return _literals(inputs[0], not negated)
    if _is_in(target, _AND if not negated else _OR) and len(inputs) == 2:
        return _literals(inputs[0], negated) + _literals(inputs[1], negated)
    if _is_in(target, _SAME_VALUES) and inputs and _is_bool(inputs[0]) and _is_bool(node):
        return _literals(inputs[0], negated)
    if target is torch.Tensor.new_ones or (target == "new_ones" and _is_bool(node)):
        return []  # all True
    return [Literal(node, negated)]


def _is_in(target: Any, targets: set) -> bool:
    try:
        return target in targets
    except TypeError:
        return False


def _is_bool(node: fx.Node) -> bool:
    value = node.meta.get("example_value")
    return isinstance(value, torch.Tensor) and value.dtype == torch.bool


def _is_one(size: Any) -> bool:
    return isinstance(size, int) and size == 1


def _right_aligned(shape: torch.Size) -> tuple:
    shape = tuple(shape)
    return (1,) * (4 - len(shape)) + shape[-4:]


def _document_ids(literal: Literal) -> tuple[fx.Node, fx.Node] | None:
    """(query ids, key ids) if the literal is `ids_q == ids_k` shaped [.., Nq, 1] and [.., 1, Nk]."""
    node = literal.node
    equal = node.target in (operator.eq, torch.eq, "eq", "__eq__")
    not_equal = node.target in (operator.ne, torch.ne, "ne", "__ne__")
    # ids_q == ids_k as a visible literal, or ~(ids_q != ids_k)
    if not ((equal and not literal.negated) or (not_equal and literal.negated)) or len(node.args) != 2:
        return None
    a, b = node.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    shapes = [a.meta.get("example_value"), b.meta.get("example_value")]
    if not all(isinstance(x, torch.Tensor) for x in shapes):
        return None
    if any(x.dtype.is_floating_point or x.dtype.is_complex for x in shapes):
        return None  # float ids (NaN never equals itself): the mask stays a tensor
    (_, ha, qa, ka), (_, hb, qb, kb) = (_right_aligned(x.shape) for x in shapes)
    if _is_one(ha) and _is_one(hb) and _is_one(ka) and _is_one(qb):
        return a, b
    if _is_one(ha) and _is_one(hb) and _is_one(kb) and _is_one(qa):
        return b, a
    return None


def _and_of(programs: list[tuple[MaskProgram, bool]], graph_args: list[Any] | None) -> torch.Tensor:
    """The AND of the static literals' values on these arguments."""
    result = None
    for program, negated in programs:
        value = program.evaluate(graph_args).bool()
        value = ~value if negated else value
        result = value if result is None else result & value
    return result


def _band_of(visible: torch.Tensor) -> Band | None:
    """The Band that `visible` [..., Nq, Nk] is (the same plane for every batch entry), or None."""
    plane = visible.reshape(-1, *visible.shape[-2:])
    if not bool((plane == plane[:1]).all()):
        return None
    plane = plane[0]
    nq, nk = plane.shape
    has_key = plane.any(dim=1)
    if not bool(has_key.any()):
        return None
    rows, kept = torch.arange(nq)[has_key], plane[has_key].int()
    last = nk - 1 - kept.flip(1).argmax(dim=1)
    first = kept.argmax(dim=1)
    right = None if bool((last == nk - 1).all()) else int((last - rows)[last < nk - 1].max())
    left = None if bool((first == 0).all()) else int((rows - first)[first > 0].max())
    spec = Band(left, right)
    return spec if bool((spec.materialize(nq, nk) == plane).all()) else None


def concrete(value: Any) -> Any:
    """A concrete Python int/float for a SymInt/SymFloat example value (its hint); other values unchanged."""
    if isinstance(value, torch.SymInt | torch.SymFloat):
        hint = value.node.hint
        if hint is None:
            raise ValueError("symbolic size without a hint")
        return hint
    return value


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        stack.extend(current.all_input_nodes)
    return seen


def _placeholder_position(graph: fx.Graph, node: fx.Node) -> int:
    return [n for n in graph.nodes if n.op == "placeholder"].index(node)


def _is_module_state(node: fx.Node) -> bool:
    """True for graph inputs that are buffers or parameters of the compiled module."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    name = source.name if isinstance(getattr(source, "name", None), str) else None
    if name is None and source is not None:
        name = source.name() if callable(source.name) else str(source)
    return name is not None and ("_buffers" in name or "_parameters" in name)


def _reads_values(node: fx.Node, within: set[fx.Node]) -> bool:
    """True if a tensor input is used for more than its sizes inside the mask subgraph."""
    value = node.meta.get("example_value")
    if not isinstance(value, torch.Tensor):
        return False
    for user in node.users:
        if user not in within:
            continue
        if user.target in _SIZE_QUERIES or (user.target is getattr and user.args[1] in ("shape", "ndim")):
            continue
        return True
    return False


def mask_bias_condition(bias: fx.Node, factor: float = 1.0) -> tuple[fx.Node, bool, float] | None:
    """(boolean mask, True if it marks hidden entries, fill) when an additive bias only encodes a mask.

    Recognizes `where(visible, 0, fill)`, `where(hidden, fill, 0)` and `zeros.masked_fill(hidden, fill)`,
    with `fill * factor` (the fill as the softmax sees it) a mask fill (transformers builds its masks this way).
    """
    def _is_fill(value: float) -> bool:
        return is_mask_fill(value * factor)

    if bias.op not in ("call_function", "call_method"):
        return None
    args = bias.args
    if bias.target is torch.where and len(args) == 3 and isinstance(args[0], fx.Node) and _is_bool(args[0]):
        a, b = constant_float(args[1]), constant_float(args[2])
        if a == 0.0 and b is not None and _is_fill(b):
            return args[0], False, b
        if b == 0.0 and a is not None and _is_fill(a):
            return args[0], True, a
    if bias.target in ("masked_fill", torch.masked_fill) and len(args) == 3 and isinstance(args[1], fx.Node):
        fill = constant_float(args[2])
        if is_zeros(args[0]) and fill is not None and _is_fill(fill):
            return args[1], True, fill
    return None


def strip_copies(node: fx.Node) -> fx.Node:
    """`node` with value-preserving copies (`.contiguous()`, `.clone()`) looked through."""
    while (node.op == "call_method" and node.target in ("contiguous", "clone") and len(node.args) == 1
           and not is_written(node)):
        node = node.args[0]
    return node


def is_zeros(node: Any) -> bool:
    """True for a `torch.zeros` / `torch.zeros_like` / `new_zeros` node that nothing writes in place."""
    if not isinstance(node, fx.Node) or is_written(node):
        return False
    return ((node.op == "call_function" and node.target in (torch.zeros, torch.zeros_like))
            or (node.op == "call_method" and node.target == "new_zeros"))
