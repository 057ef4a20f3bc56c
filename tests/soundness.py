"""Shared checks of the soundness tests: a compiled program must compute what eager computes."""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch

import flash_fx
from flash_fx.verify import relative_error

RERAN = "original ops run at run time"


@contextmanager
def kernel_path(path: str):
    """Run attention on the Triton kernels (through the interpreter) for "triton", else on the CPU paths (PyTorch's
    C++ flash kernel where it serves the spec, the tiled PyTorch path otherwise)."""
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


def compare(fn: Callable, *inputs, path: str = "triton", tol: float = 1e-4, dead_rows: bool = False,
            reference64: bool = False, eager_context: Callable = nullcontext) -> list:
    """Compile `fn` (force=True, inner eager), compare outputs and input gradients with eager; return the
    reports. Fails if a Triton test ran the tiled fallback. dead_rows: rows that -inf hides entirely may have
    finite gradients where eager's are NaN (SPEC). reference64: a result that differs from eager's in float32 still
    passes within SPEC's bound against the program run in float64 (at most 2x eager's error + 1e-6; finite fills
    that the scores do not entirely absorb round differently in each implementation of eager, SDPA's included).
    eager_context: entered around eager's runs (e.g. SDPA's math backend, the definition flash_fx follows)."""
    torch._dynamo.reset()
    flash_fx.clear_reports()
    leaves = [x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x
              for x in inputs]
    twins = [x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x
             for x in inputs]
    with eager_context():
        expected = fn(*leaves)
    wide = [x.detach().double().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor)
            and x.dtype.is_floating_point else x for x in inputs] if reference64 else None
    with kernel_path(path):
        compiled = torch.compile(fn, backend="flash_fx", options={"inner": "eager", "report": False, "force": True})
        actual = compiled(*twins)
        pairs = {"out": (actual, expected, None)}
        if expected.requires_grad:
            grad = torch.randn_like(expected)
            expected.backward(grad)
            actual.backward(grad)
            if wide is not None:
                with eager_context():
                    reference = fn(*wide)
                reference.backward(grad.double())
                pairs["out"] = (actual, expected, reference)
            for i, (leaf, twin) in enumerate(zip(leaves, twins, strict=True)):
                if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                    pairs[f"grad {i}"] = (twin.grad, leaf.grad, wide[i].grad if wide is not None else None)
        errors = {name: _error(a, e, ref, finite_for_nan=dead_rows and name != "out", tol=tol)
                  for name, (a, e, ref) in pairs.items()}
    torch._dynamo.reset()
    assert flash_fx.kernels.triton_failure() is None, flash_fx.kernels.triton_failure()
    bad = {name: error for name, error in errors.items() if not error <= tol}
    assert not bad, f"compiled differs from eager: {bad}; reports: {flash_fx.reports()}"
    return flash_fx.reports()


def _error(actual, expected, reference, finite_for_nan: bool, tol: float) -> float:
    """0 when `actual` agrees with eager (or, given the float64 `reference`, is within SPEC's bound of it with
    eager's NaN positions), else the difference from eager."""
    error = max_error(actual, expected, finite_for_nan)
    if error <= tol or reference is None or actual is None or expected is None:
        return error
    if not finite_for_nan and not torch.equal(torch.isnan(actual), torch.isnan(expected)):
        return error
    keep = ~torch.isnan(expected)
    ours, eager = relative_error(actual[keep], reference[keep]), relative_error(expected[keep], reference[keep])
    return 0.0 if ours <= 2 * eager + 1e-6 else error


def variants(reports: list) -> list[str]:
    return [r.variant for report in reports for r in report.rewrites]


def skips(reports: list) -> list[str]:
    return [s.reason for report in reports for s in report.skipped]


def reran(reports: list) -> bool:
    """True if some call ran the original graph because the op could not prove its result exact."""
    return any(reason.startswith(RERAN) for reason in skips(reports))
