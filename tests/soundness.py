"""Shared checks of the soundness tests: a compiled program must compute what eager computes."""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager

import torch

import flash_fx

RERAN = "original ops run at run time"


@contextmanager
def kernel_path(path: str):
    """Run attention on the Triton kernels (through the interpreter) or on the tiled PyTorch path."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if path == "triton" else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


def max_error(actual: torch.Tensor | None, expected: torch.Tensor | None, finite_for_nan: bool = False) -> float:
    """Largest difference relative to eager's largest magnitude (at least 0.01), inf where NaN or infinity
    positions differ (NaN where eager has NaN is agreement).

    finite_for_nan: a finite value where eager has NaN is agreement too (the documented gradients of rows that
    -inf hides entirely: finite, where eager's are NaN)."""
    if actual is None or expected is None:
        return 0.0 if actual is None and expected is None else float("inf")
    if finite_for_nan:
        keep = ~torch.isnan(expected)
        actual, expected = actual[keep], expected[keep]
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    if not torch.equal(nan_a, nan_e):
        return float("inf")
    a, e = actual[~nan_a].double(), expected[~nan_e].double()
    if not torch.equal(torch.isinf(a), torch.isinf(e)) or not torch.equal(a[torch.isinf(a)], e[torch.isinf(e)]):
        return float("inf")
    finite = torch.isfinite(e)
    a, e = a[finite], e[finite]
    if e.numel() == 0:
        return 0.0
    return float((a - e).abs().max() / e.abs().max().clamp(min=1e-2))  # a floor: rounding noise of zero grads


def compare(fn: Callable, *inputs, path: str = "triton", tol: float = 1e-4, dead_rows: bool = False) -> list:
    """Compile `fn` (force=True, inner eager), compare outputs and input gradients with eager; return the
    reports. Fails if a Triton test ran the tiled fallback. dead_rows: rows that -inf hides entirely may have
    finite gradients where eager's are NaN (SPEC)."""
    torch._dynamo.reset()
    flash_fx.clear_reports()
    leaves = [x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x
              for x in inputs]
    twins = [x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x
             for x in inputs]
    expected = fn(*leaves)
    with kernel_path(path):
        compiled = torch.compile(fn, backend="flash_fx", options={"inner": "eager", "report": False, "force": True})
        actual = compiled(*twins)
        errors = {"out": max_error(actual, expected)}
        if expected.requires_grad:
            grad = torch.randn_like(expected)
            expected.backward(grad)
            actual.backward(grad)
            for i, (leaf, twin) in enumerate(zip(leaves, twins, strict=True)):
                if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                    errors[f"grad {i}"] = max_error(twin.grad, leaf.grad, finite_for_nan=dead_rows)
    torch._dynamo.reset()
    assert flash_fx.kernels.triton_failure() is None, flash_fx.kernels.triton_failure()
    bad = {name: error for name, error in errors.items() if not error <= tol}
    assert not bad, f"compiled differs from eager: {bad}; reports: {flash_fx.reports()}"
    return flash_fx.reports()


def variants(reports: list) -> list[str]:
    return [r.variant for report in reports for r in report.rewrites]


def skips(reports: list) -> list[str]:
    return [s.reason for report in reports for s in report.skipped]


def reran(reports: list) -> bool:
    """True if some call ran the original graph because the op could not prove its result exact."""
    return any(reason.startswith(RERAN) for reason in skips(reports))
