"""`verify=True`: compare a rewritten graph's outputs with the original graph's, with SPEC.md's bound.

The bound: ||ours - ref|| / ||ref|| <= 2 * ||eager - ref|| / ||ref|| + 1e-6, where ref is the original
graph run in float64 and eager is the original graph run in the inputs' own dtypes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| over the finite entries of ref (NaN/inf positions must agree separately).

    Where ref is exactly zero (e.g. dq with a single key), the error is absolute: ||x||.
    """
    finite = torch.isfinite(ref)
    x, ref = x.detach().double()[finite], ref.detach().double()[finite]
    norm = ref.norm()
    return float((x - ref).norm() / (norm if norm > 0 else 1.0))


def verify_outputs(original: Callable, args: tuple, outputs: Any) -> str | None:
    """None if `outputs` of the rewritten graph are within the bound on `args`, else what differs."""
    with torch.no_grad():
        eager = original(*args)
        reference = original(*tree_map(_to_float64, args))
    for index, (ours, mine_eager, ref) in enumerate(zip(*(tree_flatten(x)[0] for x in (outputs, eager, reference)),
                                                        strict=True)):
        if not isinstance(ours, torch.Tensor) or not ours.dtype.is_floating_point:
            continue
        if not torch.equal(torch.isnan(ours), torch.isnan(ref)):
            return f"output {index}: NaN positions differ from the float64 reference"
        error, eager_error = relative_error(ours, ref), relative_error(mine_eager, ref)
        if error > 2 * eager_error + 1e-6:
            return f"output {index}: relative error {error:.3g} > 2 x eager's {eager_error:.3g} + 1e-6"
    return None


def _to_float64(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.dtype.is_floating_point:
        return x.detach().double()
    return x
