"""Writes to tensors in a Dynamo graph: which nodes write which storages.

Dynamo graphs keep in-place operations (`m.tril_()`, `b.masked_fill_(...)`, `x[:, :3] = True`, `o.mul_(2)`,
`buf.copy_(x)`). A node's value is then not what its own op computed: a later write to its storage, through the
node or through any alias of it (a view, `.data`, an in-place result), changes it. Aliasing is read off the
example values: Dynamo's fake tensors share one storage between a tensor and its views, so two nodes alias
exactly when their example values share a storage.

Every analysis that recognizes a tensor by the op that made it (a constant, `zeros`, a mask or position
program cut out of the graph) asks :func:`is_written` first and treats a written tensor as unknown data; the
rewrite asks :meth:`Writes.written_after` before it moves a read of a tensor to another place in the program.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.multiprocessing.reductions import StorageWeakRef

_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                       operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
                       operator.irshift, operator.imatmul, operator.setitem}
_IN_PLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
                     "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__", "__setitem__"}
_PURE_OPERATORS = {operator.and_, operator.or_, operator.not_, operator.xor, operator.is_, operator.is_not}
_NOT_VALUE_WRITES = {"requires_grad_", "retain_grad", "share_memory_", "record_stream"}


def written_args(node: fx.Node) -> list[fx.Node]:
    """The tensor arguments that `node` writes in place (empty for a pure op)."""
    if node.op not in ("call_method", "call_function"):
        return []
    target = node.target
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    out = [a for a in _flat([node.kwargs.get("out")]) if isinstance(a, fx.Node)]
    if node.op == "call_method":
        name = str(target)
        if name.startswith("__"):
            return [first] if first is not None and name in _IN_PLACE_DUNDERS else []
        return [first] if first is not None and name.endswith("_") and name not in _NOT_VALUE_WRITES else []
    if isinstance(target, torch._ops.OpOverload):
        schema = target._schema.arguments
        mutated = [i for i, a in enumerate(schema) if a.alias_info is not None and a.alias_info.is_write]
        return [a for i, a in enumerate(node.args) if i in mutated and isinstance(a, fx.Node)] + out
    try:
        if target in _IN_PLACE_OPERATORS:
            return [first] if first is not None else []
    except TypeError:
        pass
    name = getattr(target, "__name__", "")
    in_place_name = name.endswith("_") and not name.startswith("__") and name not in _NOT_VALUE_WRITES
    if (in_place_name and target not in _PURE_OPERATORS) or node.kwargs.get("inplace") is True:
        return ([first] if first is not None else []) + out
    return out


def returns_self(node: fx.Node) -> fx.Node | None:
    """The argument an in-place node writes and returns as its own value (`x.add_(y)` is x), else None."""
    args = written_args(node)
    if len(args) != 1:
        return None
    value, written = node.meta.get("example_value"), args[0].meta.get("example_value")
    return args[0] if isinstance(value, torch.Tensor) and value is written else None


def _flat(values: Iterable) -> list:
    return [x for v in values for x in (v if isinstance(v, list | tuple) else [v])]


def storage(node: fx.Node) -> StorageWeakRef | None:
    """The storage of the node's example value (views share it), or None for non-tensors."""
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    if not isinstance(value, torch.Tensor) or value.is_sparse:
        return None
    try:
        return StorageWeakRef(value.untyped_storage())
    except (NotImplementedError, RuntimeError):
        return None


@dataclass
class Writes:
    """The in-place writes of one graph: for each written storage, the nodes (in program order) that write it."""

    graph: fx.Graph
    writers: dict[StorageWeakRef, list[fx.Node]] = field(default_factory=dict)
    position: dict[fx.Node, int] = field(default_factory=dict)  # program order of the graph's nodes

    @staticmethod
    def of(graph: fx.Graph) -> Writes:
        writes = Writes(graph, position={n: i for i, n in enumerate(graph.nodes)})
        for node in graph.nodes:
            for arg in written_args(node):
                key = storage(arg)
                writes.writers.setdefault(key, []).append(node)
        return writes

    def writers_of(self, node: fx.Node) -> list[fx.Node]:
        """The nodes that write the storage of `node` (an unknown storage counts as written by every writer)."""
        key = storage(node)
        if key is None:
            return [w for ws in self.writers.values() for w in ws] if self.writers and _is_tensor(node) else []
        return self.writers.get(key, []) + self.writers.get(None, [])

    def written_after(self, nodes: Iterable[fx.Node], start: fx.Node) -> fx.Node | None:
        """A node after `start` in program order that writes the storage of one of `nodes`, or None."""
        begin = self.position.get(start, -1)
        for node in nodes:
            for writer in self.writers_of(node):
                if self.position.get(writer, len(self.position)) > begin:
                    return writer
        return None


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("example_value"), torch.Tensor)


_CURRENT: weakref.WeakKeyDictionary[fx.Graph, Writes] = weakref.WeakKeyDictionary()


def writes_of(graph: fx.Graph) -> Writes:
    """The writes of `graph`, computed once per graph and kept until :func:`forget` (the pass calls it)."""
    writes = _CURRENT.get(graph)
    if writes is None:
        writes = _CURRENT[graph] = Writes.of(graph)
    return writes


def forget(graph: fx.Graph) -> None:
    """Drop the cached writes of `graph` (after it changed)."""
    _CURRENT.pop(graph, None)


def is_written(node: fx.Node) -> bool:
    """True if some node of the graph writes the storage of `node` in place (so its op does not tell its value)."""
    return isinstance(node, fx.Node) and bool(writes_of(node.graph).writers_of(node))


def unreplayed_writer(nodes: set[fx.Node]) -> fx.Node | None:
    """A write that a copy of the subgraph `nodes` would not replay faithfully, or None: a node outside it that
    writes one of its tensors, or a node inside it that writes a graph input (the copy runs before the graph and
    must not change its inputs). Writes between the subgraph's own nodes are replayed in program order."""
    for node in nodes:
        for writer in writes_of(node.graph).writers_of(node):
            if writer not in nodes or node.op in ("placeholder", "get_attr"):
                return writer
    return None


def forward_in_place_results(graph: fx.Graph) -> None:
    """Let the uses of `x` after `y = x.op_(...)` read `y` (the same tensor at run time), so that a chain
    written in place (`s.add_(b); s.softmax(-1)`) reads as the chain it is. Changes no value."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        source = returns_self(node)
        if source is None:
            continue
        after = order[node]
        source.replace_all_uses_with(node, delete_user_cb=lambda user, after=after: order.get(user, -1) > after)
    forget(graph)
