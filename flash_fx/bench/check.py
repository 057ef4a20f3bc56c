"""Correctness before speed: the kernels against a float64 reference on the device about to be timed.

Each case runs flash_fx's forward and backward (``flash_fx.kernels``) and eager three-op attention in the same
dtype on fresh random inputs at ragged sizes, and measures both against float64 attention as the relative
Frobenius error ``||x - ref|| / ||ref||`` of out, dq, dk and dv. A case passes when flash_fx's error is at most
twice eager's plus 1e-6 (the SPEC's bound). The cases use the shapes and variants the timed sections then run,
so their compiled kernels are reused.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from flash_fx import kernels
from flash_fx.bench.timing import NO_DEADLINE, Deadline
from flash_fx.kernels.spec import AttentionSpec, Saved


@dataclass(frozen=True)
class Case:
    name: str
    dtype: torch.dtype
    head_dim: int
    n: int
    heads: int = 4
    kv_heads: int = 4
    causal: bool = False
    window: tuple[int, int] | None = None
    sparse_block: int | None = None  # a random block layout of this block size, as a -inf bias
    n_q: int | None = None  # query rows when fewer than the keys (a decode step; causal is then bottom-right)

    @property
    def queries(self) -> int:
        return self.n if self.n_q is None else self.n_q

    def extra(self, device: str) -> dict:
        """The keyword arguments of the kernels' entry points for this case (the bias built on ``device``)."""
        extra: dict = {"causal_offset": self.n - self.queries if self.causal else None, "window": self.window}
        if self.sparse_block:
            blocks = -(-self.n // self.sparse_block)
            generator = torch.Generator().manual_seed(1)
            layout = torch.rand(blocks, blocks, generator=generator) < 0.5
            layout.fill_diagonal_(True)
            visible = layout.repeat_interleave(self.sparse_block, 0).repeat_interleave(self.sparse_block, 1)
            visible = visible[: self.n, : self.n].to(device)
            extra["bias"] = torch.zeros(visible.shape, device=device).masked_fill(~visible, float("-inf"))
            extra["sparse_bias"] = True
        return extra


def cases(device: str) -> list[Case]:
    """On a GPU: the dtypes and head dims the kernel benchmark times, the GQA, window and block-sparse variants;
    on the CPU: small float32 versions of the same."""
    if device != "cuda":
        f32 = torch.float32
        return [Case("dense", f32, 32, 77), Case("causal", f32, 32, 77, causal=True),
                Case("gqa causal", f32, 16, 45, heads=4, kv_heads=2, causal=True),
                Case("window", f32, 16, 61, window=(20, 0)), Case("block sparse", f32, 16, 70, sparse_block=16),
                Case("decode gqa", f32, 32, 150, heads=8, kv_heads=2, n_q=1)]
    f16, bf16 = torch.float16, torch.bfloat16
    return [Case("dense", f16, 128, 1000), Case("causal", f16, 128, 1000, causal=True),
            Case("dense", bf16, 128, 1000), Case("causal", bf16, 128, 1000, causal=True),
            Case("causal", f16, 64, 1000, causal=True), Case("gqa causal", bf16, 64, 777, heads=8, kv_heads=2,
                                                             causal=True),
            Case("window", bf16, 64, 1000, window=(256, 0)), Case("block sparse", f16, 64, 1000, sparse_block=128),
            Case("decode gqa", f16, 128, 4000, heads=32, kv_heads=4, n_q=1),
            Case("decode gqa causal", bf16, 128, 3001, heads=32, kv_heads=4, causal=True, n_q=4)]


def reference_attention(q, k, v, *, scale: float, causal_offset: int | None = None,
                        window: tuple[int, int] | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dense attention in the inputs' dtype: KV heads repeated for GQA, masks as a -inf fill, softmax, weighted sum."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    i = torch.arange(q.shape[2], device=q.device)[:, None]
    j = torch.arange(k.shape[2], device=q.device)[None, :]
    hidden = torch.zeros(i.shape[0], j.shape[1], dtype=torch.bool, device=q.device)
    if causal_offset is not None:
        hidden |= j > i + causal_offset
    if window is not None:
        hidden |= (j < i - window[0]) | (j > i + window[1])
    return scores.masked_fill(hidden, float("-inf")).softmax(-1) @ v


def _fields(case: Case) -> dict:
    """The columns that name a case in its rows."""
    return {"case": case.name, "dtype": str(case.dtype).removeprefix("torch."), "head_dim": case.head_dim,
            "n": case.n, "n_q": case.queries, "heads": f"{case.heads}/{case.kv_heads}"}


def _relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def _reference_and_eager(q, k, v, grad, scale: float, extra: dict) -> tuple[list, list]:
    masks = {key: extra[key] for key in ("causal_offset", "window", "bias") if key in extra}
    results = []
    for dtype in (torch.float64, q.dtype):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        out = reference_attention(*leaves, scale=scale, **masks)
        results.append([out, *torch.autograd.grad(out, leaves, grad.to(dtype))])
    return results[0], results[1]


def run_case(case: Case, device: str, seed: int = 0) -> list[dict]:
    """Rows of ``case``: one per tensor (out, dq, dk, dv) with both errors, the bound and whether it holds."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(heads: int, n: int) -> torch.Tensor:
        return torch.randn(2, heads, n, case.head_dim, device=device, dtype=case.dtype, generator=generator)

    q, grad = randn(case.heads, case.queries), randn(case.heads, case.queries)
    k, v = randn(case.kv_heads, case.n), randn(case.kv_heads, case.n)
    scale, extra = case.head_dim**-0.5, case.extra(device)
    spec = AttentionSpec.from_op_args(extra.get("bias"), scale, extra["causal_offset"], window=extra["window"],
                                      sparse_bias=extra.get("sparse_bias", False))
    out, lse = kernels.attention_forward(q, k, v, spec)
    dq, dk, dv, _, _ = kernels.attention_backward(grad, Saved(q, k, v, out, lse), spec)
    reference, eager = _reference_and_eager(q, k, v, grad, scale, extra)
    rows = []
    for name, mine, ref, theirs in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), reference, eager, strict=True):
        error, eager_error = _relative_error(mine, ref), _relative_error(theirs, ref)
        bound = 2 * eager_error + 1e-6
        rows.append({**_fields(case), "tensor": name, "flash_fx_error": error, "eager_error": eager_error,
                     "bound": bound, "ok": error <= bound})
    return rows


def run(device: str, deadline: Deadline = NO_DEADLINE) -> Iterator[dict]:
    """Every case of :func:`cases`, in order, until ``deadline``; a case that raises is a failed row."""
    for case in cases(device):
        if deadline.expired():
            print(f"# check: deadline reached; skipped from {case.name} {case.dtype} d={case.head_dim} on")
            return
        try:
            yield from run_case(case, device)
        except Exception as error:  # reported as a failure, and the timings go on
            yield {**_fields(case), "tensor": f"raised {type(error).__name__}: {str(error)[:120]}",
                   "flash_fx_error": float("nan"), "eager_error": float("nan"), "bound": float("nan"), "ok": False}
