"""Tests of fused attention dropout: the keep mask's statistics, Triton and tiled paths dropping the same
elements, forward and backward against eager attention with the materialized mask (SPEC.md's rule: error
at most 2x eager's in the same dtype plus 1e-6, against float64), and the op's seeding.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from flash_fx.kernels import dropout_keep_mask  # noqa: E402
from kernel_calls import backward as attention_backward  # noqa: E402
from kernel_calls import forward as attention_forward  # noqa: E402
from kernel_calls import tiled_backward, tiled_forward  # noqa: E402

from flash_fx import op  # noqa: E402, F401  (registers torch.ops.flash_fx)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def run_forward(q, k, v, *, triton, causal_offset=None, kv_heads_tiled=False, dropout_p, seed, offset=0):
    """The forward of the Triton path (interpreter) or of the tiled PyTorch path."""
    if triton:
        return attention_forward(q, k, v, scale=q.shape[-1] ** -0.5, causal_offset=causal_offset,
                                 kv_heads_tiled=kv_heads_tiled, dropout_p=dropout_p, seed=seed, offset=offset)
    return tiled_forward(q, k, v, scale=q.shape[-1] ** -0.5, causal_offset=causal_offset, block_n=16,
                         kv_heads_tiled=kv_heads_tiled, dropout_p=dropout_p, seed=seed, offset=offset)


def run_backward(grad_out, q, k, v, out, lse, *, triton, causal_offset=None, dropout_p, seed):
    if triton:
        return attention_backward(grad_out, q, k, v, out, lse, scale=q.shape[-1] ** -0.5, causal_offset=causal_offset,
                                  dropout_p=dropout_p, seed=seed)
    return tiled_backward(grad_out, q, k, v, out, lse, scale=q.shape[-1] ** -0.5, causal_offset=causal_offset,
                          block_n=16, dropout_p=dropout_p, seed=seed)


def eager_dropout_attention(q, k, v, keep, p, causal_offset=None):
    """``(softmax(q k^T * scale) * keep / (1 - p)) @ v`` in the inputs' dtype; ``keep`` is [B, H, Nq, Nk]."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal_offset is not None:
        causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(causal_offset)
        s = s.masked_fill(~causal, float("-inf"))
    return (s.softmax(-1) * keep / (1 - p)) @ v


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def assert_close(kernel, eager, ref, what):
    kernel_err, eager_err = rel_err(kernel, ref), rel_err(eager, ref)
    assert kernel_err <= 2 * eager_err + 1e-6, f"{what}: kernel error {kernel_err:.3g}, eager {eager_err:.3g}"


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate(p):
    keep = dropout_keep_mask(1234, 0, 4, 64, 64, p)
    n = keep.numel()
    assert keep.shape == (4, 64, 64) and keep.dtype == torch.bool
    std_err = (p * (1 - p) / n) ** 0.5
    assert abs(keep.float().mean().item() - (1 - p)) < 4 * std_err
    # Rows, columns and heads are not correlated in an obvious way: each has about the right rate.
    assert (keep.float().mean((1, 2)) - (1 - p)).abs().max() < 8 * (p * (1 - p) / (64 * 64)) ** 0.5
    other = dropout_keep_mask(1235, 0, 4, 64, 64, p)
    assert abs((keep == other).float().mean().item() - (p * p + (1 - p) ** 2)) < 8 * std_err
    assert torch.equal(dropout_keep_mask(1234, 0, 4, 64, 64, p), keep)


def test_offset_shifts_the_stream():
    """The counter is ``offset + (bh * Nq + i) * Nk + j``: an offset of Nq * Nk moves to the next head."""
    keep = dropout_keep_mask(7, 0, 3, 8, 8, 0.5)
    assert torch.equal(dropout_keep_mask(7, 64, 2, 8, 8, 0.5), keep[1:])


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "tiled"])
@pytest.mark.parametrize("kv_heads_tiled", [False, True], ids=["grouped", "kv_tiled"])
def test_kernels_drop_the_materialized_mask(triton, kv_heads_tiled):
    """With q = 0 every probability is 1/Nk, and with V = I the output row is the keep row, scaled.

    The offset makes the 64-bit counters cross 2**32 inside the call, so both words of the counter matter.
    """
    batch, heads, kv_heads, n_q, n = 2, 4, 2, 19, 32
    q = torch.zeros(batch, heads, n_q, n)
    k = torch.randn(batch, kv_heads, n, n, generator=torch.Generator().manual_seed(0))
    v = torch.eye(n).expand(batch, kv_heads, n, n)
    p, seed, offset = 0.3, 1, 2**32 - 1000
    out, _ = run_forward(q, k, v, triton=triton, kv_heads_tiled=kv_heads_tiled, dropout_p=p, seed=seed,
                         offset=offset)
    keep = dropout_keep_mask(seed, offset, batch * heads, n_q, n, p).view(batch, heads, n_q, n)
    assert torch.equal(out > 0, keep)
    torch.testing.assert_close(out, keep / (1 - p) / n)


CASES = [
    (torch.float32, None, 0.1),
    (torch.float32, 0, 0.5),
    (torch.float16, 0, 0.3),
]


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "tiled"])
@pytest.mark.parametrize(("dtype", "causal_offset", "p"), CASES, ids=["fp32", "fp32-causal", "fp16-causal"])
def test_matches_eager_with_mask(triton, dtype, causal_offset, p):
    """Forward and dq, dk, dv against eager with the materialized mask, ragged Nq = 19, Nk = 23."""
    gen = torch.Generator().manual_seed(3)
    batch, heads, n_q, n_k, d = 2, 2, 19, 23, 16
    q, k, v = (torch.randn(batch, heads, n, d, generator=gen, dtype=torch.float64) for n in (n_q, n_k, n_k))
    grad_out = torch.randn(batch, heads, n_q, d, generator=gen, dtype=torch.float64)
    seed = 2024
    keep = dropout_keep_mask(seed, 0, batch * heads, n_q, n_k, p).view(batch, heads, n_q, n_k)

    qx, kx, vx = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = run_forward(qx.detach(), kx.detach(), vx.detach(), triton=triton, causal_offset=causal_offset,
                           dropout_p=p, seed=seed)
    grads = run_backward(grad_out.to(dtype), qx.detach(), kx.detach(), vx.detach(), out, lse, triton=triton,
                         causal_offset=causal_offset, dropout_p=p, seed=seed)

    q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
    ref = eager_dropout_attention(q64, k64, v64, keep, p, causal_offset)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out)
    eager = eager_dropout_attention(qx, kx, vx, keep, p, causal_offset)
    eager_grads = torch.autograd.grad(eager, (qx, kx, vx), grad_out.to(dtype))
    assert_close(out, eager, ref, "out")
    for name, grad, eager_grad, ref_grad in zip("qkv", grads[:3], eager_grads, ref_grads, strict=True):
        assert grad.dtype == dtype
        assert_close(grad, eager_grad, ref_grad, f"d{name}")


def test_triton_and_tiled_agree():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 3, 21, 16, generator=gen) for _ in range(3))
    triton_out, _ = run_forward(q, k, v, triton=True, causal_offset=0, dropout_p=0.2, seed=17)
    tiled_out, _ = run_forward(q, k, v, triton=False, causal_offset=0, dropout_p=0.2, seed=17)
    torch.testing.assert_close(triton_out, tiled_out, rtol=1e-5, atol=1e-6)


def test_invalid_arguments():
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="dropout_p"):
        attention_forward(q, q, q, scale=1.0, dropout_p=1.0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        attention_forward(q, q, q, scale=1.0, dropout_p=0.5)


def call_op(q, k, v, p):
    return torch.ops.flash_fx.attention(q, k, v, None, q.shape[-1] ** -0.5, None, dropout_p=p)


def test_op_seeding_is_reproducible():
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 17, 16, generator=gen) for _ in range(3))
    torch.manual_seed(0)
    first, _, seed_a = call_op(q, k, v, 0.4)
    second, _, seed_b = call_op(q, k, v, 0.4)
    assert seed_a.dtype == torch.int64 and seed_a.shape == (1,)
    assert seed_a.item() != seed_b.item() and not torch.equal(first, second)
    torch.manual_seed(0)
    again, _, seed_c = call_op(q, k, v, 0.4)
    assert seed_c.item() == seed_a.item() and torch.equal(again, first)
    assert call_op(q, k, v, 0.0)[2].item() == 0


def test_op_autograd_matches_eager():
    gen = torch.Generator().manual_seed(8)
    shape = (2, 2, 19, 16)
    q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    grad_out = torch.randn(shape, generator=gen, dtype=torch.float64)
    p = 0.25
    qx, kx, vx = (t.float().requires_grad_() for t in (q, k, v))
    out, _, seed = call_op(qx, kx, vx, p)
    out.backward(grad_out.float())

    keep = dropout_keep_mask(int(seed.item()), 0, 4, 19, 19, p).view(2, 2, 19, 19)
    q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
    ref = eager_dropout_attention(q64, k64, v64, keep, p)
    ref.backward(grad_out)
    eager = eager_dropout_attention(*(t.detach().float().requires_grad_() for t in (q, k, v)), keep, p)
    assert_close(out, eager, ref, "out")
    for name, x, r in zip("qkv", (qx, kx, vx), (q64, k64, v64), strict=True):
        assert rel_err(x.grad, r.grad) < 1e-5, f"d{name}"
