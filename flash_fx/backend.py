"""The `flash_fx` torch.compile backend: run the attention pass, then hand the graph to the inner compiler.

Registered through the `torch_dynamo_backends` entry point, so `torch.compile(m, backend="flash_fx")`
works without importing flash_fx. The pass never breaks compilation: if it fails, the original graph
is compiled and the report says why. Rewrites that rest on a mask proof are guarded at run time: the
proof is re-checked for each new shape or buffer version, and a failed check runs the original graph.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from torch._guards import detect_fake_mode

from flash_fx import exactness
from flash_fx.attention_pass import PassResult, run_attention_pass
from flash_fx.cache_salt import inductor_config_patches
from flash_fx.kernels import AttentionInputError
from flash_fx.op import is_checked_call
from flash_fx.options import Options, parse_options
from flash_fx.patterns.mutation import Writes
from flash_fx.report import Report, SkipRecord, record
from flash_fx.verify import verify_outputs

_graph_ids = itertools.count()


def flash_fx_backend(gm: fx.GraphModule, example_inputs: list[Any], *, options: dict | None = None,
                     mode: str | None = None) -> Callable:
    """torch.compile backend entry point: `torch.compile(model, backend="flash_fx", options={...})`, or
    `mode="reduce-overhead"` etc. (passed to the inner Inductor; torch.compile takes a mode or options, so the two
    together are written `options={"mode": ..., ...}`)."""
    options = dict(options or {})
    if mode is not None:
        options["mode"] = mode
    return compile_graph(gm, example_inputs, parse_options(options))


def compile_graph(gm: fx.GraphModule, example_inputs: list[Any], options: Options) -> Callable:
    """Rewrite the attention of a Dynamo graph, report it, and compile the result with the inner compiler."""
    rewritten = copy_graph_module(gm)
    result = _run_pass_safely(rewritten, example_inputs, options, next(_graph_ids))
    record(result.report)
    rewrote = bool(result.report.rewrites)
    compiled = _inner_compile(options, rewritten if rewrote else gm, example_inputs, result.report)
    if options.prints_report:
        print(result.report)
        if options.report == "verbose":
            print("graph before flash_fx:", gm.code, "graph after flash_fx:", rewritten.code, sep="\n")
    return _Guarded(compiled, gm, result, options, rewritten) if rewrote else compiled


def explain(model: Callable, *example_inputs: Any, **options: Any) -> list[Report]:
    """The reports flash_fx would print for `model(*example_inputs)`, without running any kernel.

    The model runs once through Dynamo with its original ops; options are those of torch.compile's.
    """
    parsed = parse_options(options)
    reports: list[Report] = []

    def analyze_only(gm: fx.GraphModule, inputs: list[Any]) -> Callable:
        result = _run_pass_safely(copy_graph_module(gm), inputs, parsed, next(_graph_ids), apply=False)
        reports.append(result.report)
        return gm.forward

    # No torch._dynamo.reset(): the user's compiled code stays; Dynamo keys its cache entries by backend.
    torch.compile(model, backend=analyze_only)(*example_inputs)
    return reports


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule over a copy of gm's graph (node meta shared), so gm itself stays the original."""
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    return fx.GraphModule(gm, graph)


def _run_pass_safely(gm: fx.GraphModule, example_inputs: list[Any], options: Options, graph_id: int,
                     apply: bool = True) -> PassResult:
    try:
        return run_attention_pass(gm, example_inputs, options, graph_id, apply)
    except Exception as error:  # a bug in the pass must never fail the user's compilation
        report = Report(graph_id, skipped=[SkipRecord("<graph>", f"flash_fx pass failed, graph left as it was: "
                                                                 f"{type(error).__name__}: {error}")])
        return PassResult(report)


def _inner_compile(options: Options, gm: fx.GraphModule, example_inputs: list[Any],
                   report: Report | None = None) -> Callable:
    """The inner compiler's callable for ``gm``: Inductor with the mode's settings (as plain torch.compile applies
    them) and flash_fx's cache salt, AOTAutograd's eager, or the graph as it is. A graph whose attention calls
    read values on the host is compiled without CUDA graphs (which could not capture it), and ``report`` says so."""
    inner = options.inner
    if inner == "inductor":
        from torch._inductor import config, list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = {**list_mode_options(options.mode), **inductor_config_patches()}
        # the only calls that read values on the host: those proving their exclusions per call
        if _checks_at_run_time([gm.graph]) and patches.get("triton.cudagraphs", config.triton.cudagraphs):
            patches["triton.cudagraphs"] = False
            if report is not None:
                report.notes.append("CUDA graphs off for this graph: an attention call proves its finite-fill "
                                    "exclusions on the host")
        return compile_fx(gm, example_inputs, config_patches=patches)
    if inner == "aot_eager":
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    return gm.forward


class _Guarded:
    """The compiled rewritten graph, behind the run-time checks its rewrites rest on. Each call that a check
    does not pass runs the original graph instead (that call only; later calls are checked again):

    - proofs of static masks and positions: re-checked for each new shape and buffer contents;
    - exactness (flash_fx.exactness): the ops prove their excluded finite fills negligible per call; the
      graph's own writes to its inputs are undone before the original graph reruns;
    - verify: on the first call, compare with the original graph (SPEC.md tolerances).

    Calls on fake tensors (shape propagation) run the compiled graph unchecked: they carry no values.
    """

    def __init__(self, compiled: Callable, original: fx.GraphModule, result: PassResult, options: Options,
                 rewritten: fx.GraphModule):
        self.compiled = compiled
        self.original = original
        self.result = result
        self.options = options
        self.use_original = False
        self.verified = not options.verify
        # inputs the graph writes are copied before each call, to restore them for a rerun, only where an op
        # checks its result at run time (a copy of a static KV cache per call is not free)
        written = written_inputs(original)
        self.writes_inputs = bool(written)
        self.written_inputs = written if written and _checks_at_run_time(
            [m.graph for m in rewritten.modules() if isinstance(m, fx.GraphModule)]) else []
        self.reported: set[str] = set()

    def __call__(self, *args: Any) -> Any:
        if self.use_original:
            return self.original(*args)
        if detect_fake_mode(args) is not None:
            # Shape propagation over fake tensors (DDP's graph splitter runs each compiled piece this way while
            # compiling): no data to check or compare, and the first real call must still be checked and verified.
            return self.compiled(*args)
        if not all(proof.holds(list(args)) for proof in self.result.proofs):
            self._note("a mask or position proof does not hold on these inputs (buffer changed?)")
            return self.original(*args)
        saved = [(args[i], args[i].detach().clone()) for i in self.written_inputs]
        exactness.take_inexact()
        try:
            outputs = self._verified_call(args) if not self.verified else self.compiled(*args)
            why = exactness.take_inexact()
        except AttentionInputError as error:
            if self.writes_inputs and not saved:  # its writes to its inputs cannot be undone
                raise RuntimeError(f"flash_fx: {self._input_error(error)}") from error
            outputs, why = None, self._input_error(error)
        if why is None:
            return outputs
        del outputs
        with torch.no_grad():
            for tensor, before in saved:
                tensor.copy_(before)
        self._note(why)
        return self.original(*args)

    def _verified_call(self, args: tuple) -> Any:
        self.verified = True
        outputs = self.compiled(*args)
        dropout = [r for r in self.result.report.rewrites if "dropout p=" in r.notes]
        if dropout:  # two dropout draws differ: a comparison would pass or fail by chance, so none is made
            where = ", ".join(r.location for r in dropout)
            self.result.report.skipped.append(SkipRecord("<graph>", f"verify: not compared, the graph drops "
                                                                    f"probabilities at random ({where})"))
            return outputs
        problem = verify_outputs(self.original, args, outputs)
        if problem is None:
            return outputs
        where = ", ".join(f"{r.variant} at {r.location}" for r in self.result.report.rewrites)
        message = f"flash_fx verify: graph {self.result.report.graph_id} ({where}) differs from eager: {problem}"
        if self.options.verify != "fallback":
            raise RuntimeError(message)
        self._note(message)
        self.use_original = True
        return self.original(*args)

    def _input_error(self, error: AttentionInputError) -> str:
        """The report line for a call whose inputs the kernels could not take (its original ops run instead)."""
        blocks = ", ".join(f"{r.variant} attention at {r.location}" for r in self.result.report.rewrites)
        variants = sorted({r.variant for r in self.result.report.rewrites})
        return (f"the kernels cannot take these inputs of the {blocks} ({error}); to keep flash_fx off such blocks, "
                f"leave their variant out of options={{'variants': [...]}} (here {variants})")

    def _note(self, why: str) -> None:
        """Warn and add a report line, once per reason, that a call ran the original graph."""
        if why in self.reported:
            return
        self.reported.add(why)
        warnings.warn(f"flash_fx: graph {self.result.report.graph_id} ran its original ops on a call: {why}",
                      stacklevel=3)
        self.result.report.skipped.append(SkipRecord("<graph>", f"original ops run at run time when: {why}"))


def _attention_calls(graphs: list[fx.Graph]) -> list[fx.Node]:
    return [node for graph in graphs for node in graph.nodes if node.target is torch.ops.flash_fx.attention.default]


def _checks_at_run_time(graphs: list[fx.Graph]) -> bool:
    """Whether some attention op call of these graphs proves its result at run time (flash_fx.exactness)."""
    return any(is_checked_call(node.args[3:], node.kwargs) for node in _attention_calls(graphs))


def written_inputs(gm: fx.GraphModule) -> list[int]:
    """Positions of the graph inputs that the graph writes in place (restored before a rerun)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    writes = Writes.of(gm.graph)
    return [i for i, node in enumerate(placeholders) if writes.writers_of(node)
            and isinstance(node.meta.get("example_value"), torch.Tensor)]
