"""Mask analysis: the mask subgraph of a matched attention -> a typed MaskSpec, with its proof.

A boolean mask applied with masked_fill/where is recognized as causal only after a proof: the mask
subgraph is cut out of the model graph (`MaskProgram`), evaluated on the example inputs, and compared
with the dense form of `Causal(offset).materialize`. The same program is re-evaluated at run time for
each new shape and each change of a buffer it reads (`MaskProof`), so a rewrite can never outlive the
fact it rests on. Masks that are not recognized are passed to the kernel as a dense additive bias.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx


@dataclass(frozen=True)
class NoMask:
    """Every key is visible to every query."""

    def describe(self) -> str:
        return "none"


@dataclass(frozen=True)
class Causal:
    """Key j is visible to query i iff j <= i + offset."""

    offset: int = 0

    def materialize(self, nq: int, nk: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The dense [nq, nk] boolean visibility this spec stands for."""
        return torch.ones(nq, nk, dtype=torch.bool, device=device).tril(self.offset)

    def describe(self) -> str:
        return "causal" if self.offset == 0 else f"causal(offset={self.offset})"


MaskSpec = NoMask | Causal

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
        self.buffer_positions = [p for n, p in zip(self.input_nodes, self.input_positions, strict=True)
                                 if _is_module_state(n)]
        self.data_inputs = [n.name for n in self.input_nodes if _reads_values(n, nodes) and not _is_module_state(n)]
        self.has_get_attr = any(n.op == "get_attr" for n in nodes)

    def evaluate(self, graph_args: list[Any]) -> torch.Tensor:
        """Run the mask subgraph on the graph's (concrete) arguments."""
        return self.module(*(concrete(graph_args[p]) for p in self.input_positions))

    def cache_key(self, graph_args: list[Any]) -> tuple:
        """What the mask's value can depend on: symbolic sizes, shapes and buffer identities/versions."""
        key = []
        for position in self.input_positions:
            value = graph_args[position]
            if isinstance(value, torch.Tensor):
                key.append((tuple(value.shape), value.data_ptr(), value._version))
            else:
                key.append(concrete(value))
        return tuple(key)


@dataclass
class MaskProof:
    """A recognized structural mask that must keep holding on the real inputs (checked per cache key)."""

    program: MaskProgram
    spec: Causal
    inverted: bool
    description: str
    _proven: set = field(default_factory=set)  # cache keys already checked

    def holds(self, graph_args: list[Any]) -> bool:
        """True if the mask equals the spec on these arguments (cached per shape and buffer version)."""
        key = self.program.cache_key(graph_args)
        if key in self._proven:
            return True
        ok = _is_causal_with(self.program.evaluate(graph_args), self.inverted, self.spec.offset)
        if ok:
            self._proven.add(key)
        return ok


@dataclass(frozen=True)
class Unrecognized:
    """A boolean mask that is not a structural pattern (or cannot be proven one), with the reason."""

    reason: str


def analyze_boolean_mask(graph: fx.Graph, mask: fx.Node, inverted: bool, nq: int, nk: int,
                         graph_args: list[Any]) -> MaskProof | Unrecognized:
    """Try to prove that `mask` (True = hidden, or True = visible when inverted) is causal.

    nq, nk: the concrete score shape. graph_args: the example inputs of the graph.
    """
    program = MaskProgram(graph, mask)
    if program.data_inputs:
        return Unrecognized(f"mask reads input data ({', '.join(program.data_inputs)})")
    if program.has_get_attr:
        return Unrecognized("mask reads module attributes the proof cannot track")
    try:
        value = program.evaluate(graph_args)
    except Exception as error:  # the proof must never break compilation
        return Unrecognized(f"mask could not be evaluated for the proof ({type(error).__name__})")
    if value.dtype != torch.bool or value.dim() < 2 or tuple(value.shape[-2:]) != (nq, nk):
        return Unrecognized("mask is not a boolean [.., Nq, Nk] tensor")
    offset = _causal_offset(value, inverted)
    if offset is None:
        return Unrecognized("mask is not causal")
    spec = Causal(offset)
    return MaskProof(program, spec, inverted, spec.describe())


def _causal_offset(value: torch.Tensor, inverted: bool) -> int | None:
    """The offset c such that the mask is Causal(c), or None."""
    visible = value if inverted else ~value
    plane = visible.reshape(-1, *visible.shape[-2:])
    nq, nk = plane.shape[-2:]
    if not bool((plane == plane[:1]).all()):
        return None
    counts = plane[0].sum(dim=-1)
    rows_with_keys = torch.nonzero(counts).flatten()
    if rows_with_keys.numel() == 0:
        return None
    first = int(rows_with_keys[0])
    offset = int(counts[first]) - 1 - first
    return offset if _is_causal_with(value, inverted, offset) else None


def _is_causal_with(value: torch.Tensor, inverted: bool, offset: int) -> bool:
    if value.dtype != torch.bool or value.dim() < 2:
        return False
    visible = value if inverted else ~value
    expected = Causal(offset).materialize(*visible.shape[-2:], device=visible.device)
    return bool((visible == expected).all())


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
