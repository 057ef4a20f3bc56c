"""Shared test helpers: capture the graph before and after the flash_fx pass, compare with eager."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from flash_fx.attention_pass import run_attention_pass
from flash_fx.backend import copy_graph_module
from flash_fx.options import parse_options
from flash_fx.report import Report


@dataclass
class Captured:
    """The Dynamo graph(s) of a function before and after the pass, and the pass reports."""

    before: str
    after: str
    reports: list[Report]

    @property
    def variants(self) -> list[str]:
        return [r.variant for report in self.reports for r in report.rewrites]

    @property
    def skip_reasons(self) -> list[str]:
        return [s.reason for report in self.reports for s in report.skipped]


def tidy(code: str) -> str:
    """Graph code without blank lines and the `x = None` clean-up statements."""
    lines = []
    for line in code.splitlines():
        line = re.sub(r";\s+[\w ,=]+ = None$", "", line.rstrip())
        if line.strip():
            lines.append(line)
    return "\n".join(lines) + "\n"


def capture(fn, *inputs, dynamic: bool | None = None, **options) -> Captured:
    """Run `fn(*inputs)` through Dynamo and the flash_fx pass (graphs executed unrewritten)."""
    parsed = parse_options(options)
    befores, afters, reports = [], [], []

    def backend(gm, example_inputs):
        befores.append(tidy(gm.code))
        rewritten = copy_graph_module(gm)
        reports.append(run_attention_pass(rewritten, example_inputs, parsed, graph_id=len(reports)).report)
        afters.append(tidy(rewritten.code))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, dynamic=dynamic)(*inputs)
    torch._dynamo.reset()
    return Captured("".join(befores), "".join(afters), reports)


def compiled_matches_eager(fn, *inputs, inner: str = "eager", dynamic: bool | None = None, atol: float = 2e-5,
                           rtol: float = 2e-5, **options) -> list[Report]:
    """Compile `fn` with flash_fx (extra backend `options` allowed), compare outputs and input gradients with eager;
    return the new reports."""
    import flash_fx

    flash_fx.clear_reports()
    torch._dynamo.reset()
    leaves = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    expected = fn(*leaves)
    compiled = torch.compile(fn, backend="flash_fx", dynamic=dynamic,
                             options={"inner": inner, "report": False, **options})
    twins = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    actual = compiled(*twins)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    if expected.requires_grad:
        grad = torch.randn_like(expected)
        expected.backward(grad)
        actual.backward(grad)
        for leaf, twin in zip(leaves, twins, strict=True):
            if leaf.requires_grad:
                torch.testing.assert_close(twin.grad, leaf.grad, atol=atol, rtol=rtol)
    torch._dynamo.reset()
    return flash_fx.reports()
