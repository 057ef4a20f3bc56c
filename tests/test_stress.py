"""Training under stress: recompiles and dynamic shapes, graph breaks, autocast, activation checkpointing, NaN/Inf
and empty inputs, export of the op. (Distributed training is in test_distributed.py.)"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flash_fx


def causal_attention(q, k, v):
    n = q.size(-2)
    hidden = torch.triu(torch.ones(n, n, dtype=torch.bool, device=q.device), diagonal=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    return scores.masked_fill(hidden, float("-inf")).softmax(-1) @ v


def qkv(n, batch=2, heads=2, dim=16, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed + n)
    return [torch.randn(batch, heads, n, dim, generator=generator, dtype=dtype).requires_grad_() for _ in range(3)]


LENGTHS = (17, 23, 40, 57, 100)  # not multiples of a tile (and not the head dim: duck sizing would tie them)


def compiled_graphs(dynamic):
    """(graphs compiled, variants) after calling the compiled attention at every length, checking each result."""
    flash_fx.clear_reports()
    torch._dynamo.reset()
    compiled = torch.compile(causal_attention, backend="flash_fx", dynamic=dynamic,
                             options={"inner": "eager", "report": False})
    for n in LENGTHS:
        q, k, v = qkv(n, batch=1, heads=1)
        out = compiled(q, k, v)
        torch.testing.assert_close(out, causal_attention(q, k, v), atol=2e-5, rtol=2e-5)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        expected = torch.autograd.grad(causal_attention(q, k, v).sum(), (q, k, v))
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    torch._dynamo.reset()
    reports = flash_fx.reports()
    return len(reports), [r.variant for report in reports for r in report.rewrites]


def test_recompiles_for_five_lengths():
    """dynamic=True: one graph for all five lengths; default (automatic dynamic): a static graph for the first
    length, then one dynamic graph for the rest. Every graph is rewritten; no recompile per length."""
    assert compiled_graphs(dynamic=True) == (1, ["causal"])
    assert compiled_graphs(dynamic=None) == (2, ["causal", "causal"])
    assert compiled_graphs(dynamic=False) == (len(LENGTHS), ["causal"] * len(LENGTHS))


class TwoBlocksWithBreak(nn.Module):
    def __init__(self, width=32, heads=2):
        super().__init__()
        self.heads = heads
        self.first, self.second = nn.Linear(width, 3 * width), nn.Linear(width, 3 * width)

    def attend(self, x, proj):
        b, n, c = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in proj(x).split(c, -1))
        return causal_attention(q, k, v).transpose(1, 2).reshape(b, n, c)

    def forward(self, x):
        x = x + self.attend(x, self.first)
        torch._dynamo.graph_break()
        return x + self.attend(x, self.second)


def test_graph_break_each_graph_rewritten_and_reported():
    model = TwoBlocksWithBreak()
    x = torch.randn(2, 19, 32)
    flash_fx.clear_reports()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="flash_fx", options={"inner": "aot_eager", "report": False})
    torch.testing.assert_close(compiled(x), model(x), atol=2e-5, rtol=2e-5)
    reports = flash_fx.reports()
    assert len(reports) == 2 and len({r.graph_id for r in reports}) == 2
    assert [[r.variant for r in report.rewrites] for report in reports] == [["causal"], ["causal"]]
    # a repeated call adds no report; a guard failure (a new length) compiles fresh graphs with fresh reports
    compiled(x)
    assert len(flash_fx.reports()) == 2
    longer = torch.randn(2, 27, 32)
    torch.testing.assert_close(compiled(longer), model(longer), atol=2e-5, rtol=2e-5)
    new = flash_fx.reports()[2:]
    assert [[r.variant for r in report.rewrites] for report in new] == [["causal"], ["causal"]]
    assert len({r.graph_id for r in flash_fx.reports()}) == 4
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(dtype):
    """Under autocast the matmuls run in the low dtype: the match sees the dtypes autocast produces, and the
    result matches eager under the same autocast."""
    model = TwoBlocksWithBreak()
    x = torch.randn(2, 21, 32)
    with torch.autocast("cpu", dtype=dtype):
        expected = model(x)
    flash_fx.clear_reports()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="flash_fx", options={"inner": "eager", "report": False})
    with torch.autocast("cpu", dtype=dtype):
        actual = compiled(x)
    torch._dynamo.reset()
    rewrites = [r for report in flash_fx.reports() for r in report.rewrites]
    assert [r.dtype for r in rewrites] == [str(dtype).removeprefix("torch.")] * 2
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual.float(), expected.float(), atol=3e-2, rtol=3e-2)


def test_activation_checkpointing():
    block = TwoBlocksWithBreak()

    def run(x):
        return torch.utils.checkpoint.checkpoint(block.attend, x, block.first, use_reentrant=False)

    x = torch.randn(2, 17, 32, requires_grad=True)
    expected = run(x)
    grad = torch.randn_like(expected)
    (expected_dx,) = torch.autograd.grad(expected, x, grad)
    flash_fx.clear_reports()
    torch._dynamo.reset()
    compiled = torch.compile(run, backend="flash_fx", options={"inner": "aot_eager", "report": False})
    actual = compiled(x)
    (actual_dx,) = torch.autograd.grad(actual, x, grad)
    torch._dynamo.reset()
    assert [r.variant for report in flash_fx.reports() for r in report.rewrites] == ["causal"]
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(actual_dx, expected_dx, atol=2e-5, rtol=2e-5)


def test_nan_and_inf_propagate_as_in_eager():
    q, k, v = qkv(20)
    with torch.no_grad():
        q[0, 0, 3, 1] = float("nan")  # one query row: NaN in its output row only
        v[1, 1, 5, 2] = float("inf")  # one value: inf/NaN where it is weighted
    expected = causal_attention(q, k, v)
    torch._dynamo.reset()
    actual = torch.compile(causal_attention, backend="flash_fx", options={"inner": "eager", "report": False})(q, k, v)
    torch._dynamo.reset()
    assert torch.equal(actual.isnan(), expected.isnan()) and torch.equal(actual.isinf(), expected.isinf())
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=2e-5, equal_nan=True)


@pytest.mark.parametrize("shape", [(0, 2, 8, 16), (2, 2, 0, 16)])
def test_empty_inputs(shape):
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))

    def dense(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1) @ v

    torch._dynamo.reset()
    actual = torch.compile(dense, backend="flash_fx", options={"inner": "eager", "report": False, "force": True})(
        q, k, v)
    torch._dynamo.reset()
    expected = dense(q, k, v)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected)
    actual.sum().backward()
    assert q.grad.shape == q.shape


class OpModule(nn.Module):
    """A module calling the flash_fx op directly, as a rewritten graph does."""

    def forward(self, q, k, v):
        return torch.ops.flash_fx.attention(q, k, v, None, 0.25, 0)[0]


def test_export_and_reload(tmp_path):
    q, k, v = qkv(21)
    with torch.no_grad():
        exported = torch.export.export(OpModule(), (q.detach(), k.detach(), v.detach()))
    assert "flash_fx.attention" in str(exported.graph)
    path = tmp_path / "attention.pt2"
    torch.export.save(exported, path)
    reloaded = torch.export.load(path)
    out = reloaded.module()(q.detach(), k.detach(), v.detach())
    torch.testing.assert_close(out, causal_attention(q, k, v).detach(), atol=2e-5, rtol=2e-5)


def test_sdpa_under_compile_with_dropout_is_reproducible():
    """Training-mode dropout inside the kernels: the same seed gives the same output."""
    q, k, v = qkv(33)

    def dropped(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True)

    torch._dynamo.reset()
    compiled = torch.compile(dropped, backend="flash_fx", options={"inner": "eager", "report": False})
    compiled(q, k, v)  # compile first: compilation may draw from the generator too
    torch.manual_seed(7)
    first = compiled(q, k, v)
    torch.manual_seed(7)
    second = compiled(q, k, v)
    torch._dynamo.reset()
    torch.testing.assert_close(first, second, atol=0, rtol=0)


def test_kernel_failure_falls_back_to_the_tiled_path(monkeypatch):
    """A Triton kernel that cannot compile on this machine (here: injected out-of-resources) sends its
    configuration to the tiled PyTorch path with one warning, same values; other configurations keep Triton."""
    from flash_fx.kernels import triton_forward
    from triton.runtime.errors import OutOfResources

    from flash_fx import kernels

    def fails(*args, **kwargs):
        raise OutOfResources(300000, 232448, "shared memory")

    monkeypatch.setattr(triton_forward, "attention_forward", fails)
    monkeypatch.setattr(kernels, "_TRITON_FAILURES", {})
    q, k, v = qkv(23)
    torch._dynamo.reset()
    compiled = torch.compile(causal_attention, backend="flash_fx", options={"inner": "eager", "report": False})
    with pytest.warns(UserWarning, match="Triton attention kernels failed .*OutOfResources") as caught:
        out = compiled(q, k, v)
        out.sum().backward()
        compiled(q, k, v)
    torch._dynamo.reset()
    assert len([w for w in caught if "Triton attention kernels failed" in str(w.message)]) == 1
    (failed,) = kernels.triton_failures()  # the forward's configuration only: the backward kept its kernels
    assert failed[0] == "attention_forward" and "OutOfResources" in kernels.triton_failure()
    torch.testing.assert_close(out, causal_attention(q, k, v), atol=2e-5, rtol=2e-5)
