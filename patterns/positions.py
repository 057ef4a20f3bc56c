"""Position biases the kernels compute from indices: ALiBi's ``slope[h] * (j - i)`` and ``-slope[h] * |j - i|``,
and T5's learned relative buckets (read per relative position: Nq + Nk - 1 values per head).

A bias term ``slopes * positions`` qualifies when ``positions`` is computed without input data (aranges,
shapes, buffers) and is a full [Nq, Nk] plane, and ``slopes`` varies only over batch and heads
([.., H, 1, 1]). The positions are cut out of the graph (`MaskProgram`) and evaluated on the example
inputs: they must equal ``(j - i)``, ``-|j - i|`` or the negation of either, plus any per-row constant
(which softmax ignores). As for masks, the check is repeated at run time for each new shape or buffer
version (`ValueProof`). The kernels then read H slopes instead of an Nq x Nk bias. Per-key biases such
as MPT's ``slopes * arange`` row ([H, 1, Nk]) need nothing of this: the kernels already read them as one row
per head.

T5's bias is ``embedding(buckets, table).permute(2, 0, 1).unsqueeze(0)`` with data-free buckets: when the
buckets are constant along every diagonal (a function of j - i, checked like the positions above), the lookup is
done only at the Nq + Nk - 1 relative positions, and the kernels read that [H, Nq + Nk - 1] vector.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from flash_fx.patterns.masks import MaskProgram, Snapshots, strip_copies
from torch import fx

_MUL = {operator.mul, torch.mul, "mul", "__mul__"}


@dataclass(frozen=True)
class PositionForm:
    """What a position plane is, up to a per-row constant: ``sign * (j - i)``, or ``-sign * |j - i|`` if symmetric."""

    sign: float
    symmetric: bool


@dataclass
class ValueProof:
    """A data-free program whose value must keep passing `check` (re-checked per shape and buffer version)."""

    program: MaskProgram
    check: Callable[[torch.Tensor], bool]
    _held: Snapshots = field(default_factory=Snapshots)

    def holds(self, graph_args: list[Any]) -> bool:
        """True if the program's value passes the check on these arguments (re-evaluated when an input changed)."""
        return self._held.holds(self.program.inputs(graph_args),
                                lambda: self.check(self.program.evaluate(graph_args)))


@dataclass(frozen=True)
class AlibiMatch:
    """A recognized ALiBi term: the kernels add ``slope * (j - i)`` (or ``-slope * |j - i|``) to the scores,
    with ``slope = slopes[b, h] * sign`` (sign from the position plane)."""

    slopes: fx.Node
    form: PositionForm
    proof: ValueProof  # the positions keep having `form`

    @property
    def sign(self) -> float:
        return self.form.sign

    @property
    def symmetric(self) -> bool:
        return self.form.symmetric

    def describe(self) -> str:
        return f"alibi({'-|j - i|' if self.symmetric else 'j - i'}, slopes {self.slopes.name}, from indices)"


def analyze_alibi(graph: fx.Graph, bias: fx.Node, nq: int, nk: int, graph_args: list[Any] | None) -> AlibiMatch | str:
    """The ALiBi form of the bias node, or why it is not one."""
    if bias.op not in ("call_function", "call_method") or not _is_mul(bias.target) or len(bias.args) != 2:
        return "not a product of slopes and positions"
    for slopes, positions in (bias.args, reversed(bias.args)):
        if not isinstance(slopes, fx.Node) or not isinstance(positions, fx.Node):
            continue
        slope_value, position_value = slopes.meta.get("example_value"), positions.meta.get("example_value")
        if not isinstance(slope_value, torch.Tensor) or not isinstance(position_value, torch.Tensor):
            continue
        if slope_value.dim() < 2 or tuple(slope_value.shape[-2:]) != (1, 1) or slope_value.dim() > 4:
            continue
        if slope_value.requires_grad:
            return "learned ALiBi slopes (their gradient needs the dense bias)"
        program = MaskProgram(graph, positions)
        if program.data_inputs or program.has_get_attr or program.writer is not None:
            continue
        try:
            value = program.evaluate(graph_args)
        except Exception as error:  # the analysis must never break compilation
            return f"position bias could not be evaluated ({type(error).__name__})"
        if value.dim() < 2 or tuple(value.shape[-2:]) != (nq, nk):
            return "positions are not a full [Nq, Nk] plane"
        form = position_form(value)
        if form is None:
            return "positions are not j - i or |j - i| (up to a per-row constant)"
        return AlibiMatch(slopes, form, ValueProof(program, lambda planes, form=form: position_form(planes) == form))
    return "no factor of the product is a per-head slope times data-free positions"


def position_form(value: torch.Tensor) -> PositionForm | None:
    """Which form the [.., Nq, Nk] planes (all equal) of `value` have, or None."""
    planes = value.reshape(-1, *value.shape[-2:]).double()
    plane = planes[0]
    if not bool((planes == plane).all()):
        return None
    nq, nk = plane.shape
    relative = torch.arange(nk, dtype=torch.float64)[None, :] - torch.arange(nq, dtype=torch.float64)[:, None]
    for symmetric in (False, True):
        base = -relative.abs() if symmetric else relative
        for sign in (1.0, -1.0):
            rest = plane - sign * base
            if bool((rest == rest[:, :1]).all()):
                return PositionForm(sign, symmetric)
    return None


def _is_mul(target: Any) -> bool:
    try:
        return target in _MUL
    except TypeError:
        return False


@dataclass(frozen=True)
class RelativeTableMatch:
    """A learned relative-position bias (T5): ``table[bucket[i, j], h]`` with data-free buckets that depend on
    j - i only. The kernels read the table at the Nq + Nk - 1 relative positions instead of an Nq x Nk bias."""

    lookup: fx.Node  # embedding(buckets, table, ...): its other arguments are reused as they are
    proof: ValueProof  # the buckets keep depending on j - i only

    @property
    def buckets(self) -> fx.Node:
        return self.lookup.args[0]

    def describe(self) -> str:
        return "relative_table(T5 buckets, read per relative position)"


_EMBEDDING = {torch.nn.functional.embedding, torch.embedding}


def analyze_relative_table(graph: fx.Graph, bias: fx.Node, nq: int, nk: int,
                           graph_args: list[Any] | None) -> RelativeTableMatch | str:
    """The RelativeTableMatch behind a bias written as ``embedding(buckets, table).permute(2, 0, 1).unsqueeze(0)``."""
    node = strip_copies(bias)
    if node.target == "unsqueeze" and node.args[1:] == (0,):
        node = node.args[0]
    if node.target != "permute" or tuple(_flat(node.args[1:])) != (2, 0, 1):
        return "not a permuted embedding lookup"
    lookup = node.args[0]
    if not isinstance(lookup, fx.Node) or lookup.op != "call_function" or lookup.target not in _EMBEDDING:
        return "not a permuted embedding lookup"
    buckets = lookup.args[0]
    if not isinstance(buckets, fx.Node):
        return "not a permuted embedding lookup"
    program = MaskProgram(graph, buckets)
    if program.data_inputs or program.has_get_attr or program.writer is not None:
        return "relative buckets read input data or are written in place"
    try:
        value = program.evaluate(graph_args)
    except Exception as error:  # the analysis must never break compilation
        return f"relative buckets could not be evaluated ({type(error).__name__})"
    if value.dim() != 2 or tuple(value.shape) != (nq, nk):
        return "relative buckets are not an [Nq, Nk] plane"
    if not is_toeplitz(value):
        return "buckets do not depend on j - i alone"
    return RelativeTableMatch(lookup, ValueProof(program, is_toeplitz))


def is_toeplitz(value: torch.Tensor) -> bool:
    """True if the [Nq, Nk] tensor is constant along every diagonal (a function of j - i)."""
    return value.dim() == 2 and bool((value[1:, 1:] == value[:-1, :-1]).all())


def _flat(args: tuple) -> list:
    return [x for a in args for x in (a if isinstance(a, list | tuple) else [a])]
