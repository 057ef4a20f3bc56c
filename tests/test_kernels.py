"""Tests of flash_fx.kernels: the Triton kernels (through Triton's interpreter) and the tiled PyTorch path.

Every check follows SPEC.md: against a float64 eager reference, the relative error ||x - ref|| / ||ref||
of the kernel must be at most 2x the error of eager attention computed in the same dtype, plus 1e-6,
for the output and for dq, dk, dv.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from flash_fx.kernels import attention_backward, attention_forward, config, tiled_torch, uses_triton  # noqa: E402

# The interpreter evaluates 0/0 and log(0) of fully masked rows with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NEG_INF = float("-inf")


def eager_attention(q, k, v, scale, causal_offset=None, bias=None, drop_masked_rows=False):
    """softmax(q k^T * scale + bias, causal -inf fill) v in the inputs' dtype, with GQA by repetition.

    With ``drop_masked_rows`` fully masked rows output 0 and pass no gradient, the convention the
    kernels' backward follows (plain eager gives NaN there).
    """
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(s.dtype)
    if causal_offset is not None:
        visible = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(causal_offset)
        s = s.masked_fill(~visible, NEG_INF)
    if not drop_masked_rows:
        return s.softmax(-1) @ v
    dead = (s == NEG_INF).all(-1, keepdim=True)
    return s.masked_fill(dead, 0.0).softmax(-1).masked_fill(dead, 0.0) @ v


def rel_err(x, ref):
    """Relative error over the entries where the reference is finite."""
    finite = torch.isfinite(ref)
    return ((x.double() - ref)[finite].norm() / ref[finite].norm()).item()


def assert_close(kernel, eager, ref, what):
    kernel_err, eager_err = rel_err(kernel, ref), rel_err(eager, ref)
    assert kernel_err <= 2 * eager_err + 1e-6, f"{what}: kernel error {kernel_err:.3g}, eager {eager_err:.3g}"


def random_inputs(shape_q, shape_kv, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(shape_q, generator=gen, dtype=torch.float64)
    k = torch.randn(shape_kv, generator=gen, dtype=torch.float64)
    v = torch.randn(shape_kv, generator=gen, dtype=torch.float64)
    return q, k, v


def check_attention(q, k, v, dtype, *, causal_offset=None, bias=None, triton=True, grad_out=None, **blocks):
    """Run forward + backward of the kernels on (q, k, v) cast to ``dtype`` and check both against float64.

    q, k, v are float64 tensors of any layout; the casts keep their strides.
    """
    forward = attention_forward if triton else tiled_torch.attention_forward
    backward = attention_backward if triton else tiled_torch.attention_backward
    if not triton:
        bias = None if bias is None else bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    scale = q.shape[-1] ** -0.5
    qx, kx, vx = (t.to(dtype) for t in (q, k, v))
    bias_x = None if bias is None else bias.to(dtype)
    out, lse = forward(qx, kx, vx, scale=scale, causal_offset=causal_offset, bias=bias_x, **blocks)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32

    ref = eager_attention(q, k, v, scale, causal_offset, bias)
    assert torch.equal(out.isnan(), ref.isnan()), "NaN rows differ from eager"
    assert_close(out, eager_attention(qx, kx, vx, scale, causal_offset, bias_x), ref, "out")
    rounded = [t.double() for t in (qx, kx, vx, bias_x) if t is not None] + [None]
    ref_lse = torch.logsumexp(_scores(rounded[0], rounded[1], scale, causal_offset, rounded[3]), -1)
    assert torch.allclose(lse.double(), ref_lse, rtol=1e-4, atol=1e-4)

    if grad_out is None:
        grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = backward(grad_out.to(dtype), qx, kx, vx, out, lse, scale=scale, causal_offset=causal_offset,
                     bias=bias_x, **blocks)
    for grad, t in zip(grads, (qx, kx, vx), strict=True):
        assert grad.shape == t.shape and grad.dtype == dtype
    ref_grads = _grads(q, k, v, grad_out, scale, causal_offset, bias)
    eager_grads = _grads(qx, kx, vx, grad_out.to(dtype), scale, causal_offset, bias_x)
    for name, grad, eager, ref_grad in zip(("dq", "dk", "dv"), grads, eager_grads, ref_grads, strict=True):
        assert not grad.isnan().any(), f"{name} has NaN"
        assert_close(grad, eager, ref_grad, name)
    return out, grads


def _scores(q, k, scale, causal_offset, bias):
    group = q.shape[1] // k.shape[1]
    s = (q @ k.repeat_interleave(group, 1).transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    if causal_offset is not None:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(causal_offset), NEG_INF)
    return s


def _grads(q, k, v, grad_out, scale, causal_offset, bias):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = eager_attention(*leaves, scale, causal_offset, bias, drop_masked_rows=True)
    return torch.autograd.grad(out, leaves, grad_out)


# ---------------------------------------------------------------------------------------------- Triton


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal_offset", [None, 0])
@pytest.mark.parametrize("n_q,n_k", [(37, 50), (33, 33)])
@pytest.mark.parametrize("head_dim", [16, 64])
def test_triton_grid(head_dim, n_q, n_k, causal_offset, dtype):
    q, k, v = random_inputs((2, 2, n_q, head_dim), (2, 2, n_k, head_dim))
    check_attention(q, k, v, dtype, causal_offset=causal_offset)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim,causal_offset", [(40, 0), (80, None), (96, 0), (128, None), (256, 0)])
def test_triton_head_dims(head_dim, causal_offset, dtype):
    q, k, v = random_inputs((1, 2, 37, head_dim), (1, 2, 50, head_dim))
    check_attention(q, k, v, dtype, causal_offset=causal_offset)


@pytest.mark.parametrize("block_m,block_n", [(16, 32), (32, 16)])
@pytest.mark.parametrize("causal_offset", [None, 0, -3, 7, 40])
def test_triton_uneven_tiles(block_m, block_n, causal_offset):
    q, k, v = random_inputs((1, 2, 45, 32), (1, 2, 70, 32))
    check_attention(q, k, v, torch.float16, causal_offset=causal_offset, block_m=block_m, block_n=block_n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("num_kv_heads", [2, 1])
def test_triton_gqa(num_kv_heads, dtype):
    q, k, v = random_inputs((2, 4, 29, 32), (2, num_kv_heads, 41, 32))
    check_attention(q, k, v, dtype, causal_offset=0)
    check_attention(q, k, v, dtype)


def strided_inputs(batch, heads, n_q, n_k, head_dim):
    """q, v and grad_out in a [B, N, H, D] layout transposed to [B, H, N, D]; k sliced from a wider last dim."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(batch, n_q, heads, head_dim, generator=gen, dtype=torch.float64).transpose(1, 2)
    k = torch.randn(batch, heads, n_k, 2 * head_dim, generator=gen, dtype=torch.float64)[..., head_dim:]
    v = torch.randn(batch, n_k, heads, head_dim, generator=gen, dtype=torch.float64).transpose(1, 2)
    grad_out = torch.randn(batch, n_q, heads, head_dim, generator=gen, dtype=torch.float64).transpose(1, 2)
    return q, k, v, grad_out


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "tiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous(dtype, triton):
    q, k, v, grad_out = strided_inputs(2, 2, 35, 47, 24)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or grad_out.is_contiguous())
    check_attention(q, k, v, dtype, causal_offset=0, grad_out=grad_out, triton=triton, block_n=16)


def masked_bias(n_q, n_k, dead_rows):
    """A boolean-derived -inf bias [1, 1, Nq, Nk]: random holes, and ``dead_rows`` fully masked."""
    keep = torch.rand(n_q, n_k, generator=torch.Generator().manual_seed(3)) > 0.3
    keep[:, 0] = True
    keep[dead_rows] = False
    return torch.zeros(n_q, n_k, dtype=torch.float64).masked_fill(~keep, NEG_INF)[None, None]


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "tiled"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias(dtype, triton):
    q, k, v = random_inputs((2, 2, 37, 32), (2, 2, 50, 32))
    per_head = torch.randn(1, 2, 37, 50, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    expanded = per_head.expand(2, 2, 37, 50)
    assert expanded.stride(0) == 0
    check_attention(q, k, v, dtype, bias=expanded, triton=triton, block_n=16)
    check_attention(q, k, v, dtype, bias=masked_bias(37, 50, [5, 20]), causal_offset=0, triton=triton, block_n=16)


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "tiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fully_masked_rows_are_nan(dtype, triton):
    q, k, v = random_inputs((1, 2, 40, 32), (1, 2, 40, 32))
    out, (dq, _, _) = check_attention(q, k, v, dtype, causal_offset=-3, triton=triton, block_n=16)
    assert out[:, :, :3].isnan().all() and not out[:, :, 3:].isnan().any()
    assert (dq[:, :, :3] == 0).all()


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "tiled"])
def test_finfo_min_bias_gives_uniform_average(triton):
    """A row filled with finfo(float32).min averages v uniformly, as eager does (no overflow to -inf)."""
    q, k, v = (t.float() for t in random_inputs((1, 1, 20, 16), (1, 1, 30, 16)))
    bias = torch.zeros(1, 1, 20, 30)
    bias[:, :, 7] = torch.finfo(torch.float32).min
    forward = attention_forward if triton else tiled_torch.attention_forward
    out, _ = forward(q, k, v, scale=0.25, bias=bias)
    assert torch.allclose(out[0, 0, 7], v[0, 0].mean(0), atol=1e-5)
    assert torch.allclose(out, eager_attention(q, k, v, 0.25, bias=bias), atol=1e-5)


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "tiled"])
@pytest.mark.parametrize("causal_offset", [None, 49])
def test_decode_single_query(causal_offset, triton):
    q, k, v = random_inputs((2, 4, 1, 64), (2, 2, 50, 64))
    check_attention(q, k, v, torch.float16, causal_offset=causal_offset, triton=triton, block_n=16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal_offset", [None, 0])
def test_tiled_torch(causal_offset, dtype):
    q, k, v = random_inputs((2, 4, 37, 40), (2, 2, 50, 40))
    check_attention(q, k, v, dtype, causal_offset=causal_offset, triton=False, block_n=16)


def test_tiled_torch_matches_float64_exactly():
    """In float64 the tiled path is the same math as eager: only reassociation differs."""
    q, k, v = random_inputs((1, 2, 37, 16), (1, 2, 50, 16))
    out, _ = tiled_torch.attention_forward(q, k, v, scale=0.5, causal_offset=2, block_n=7)
    assert torch.allclose(out, eager_attention(q, k, v, 0.5, causal_offset=2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "tiled"])
def test_empty_shapes(triton, monkeypatch):
    if not triton:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = random_inputs((1, 2, 5, 16), (1, 2, 7, 16))
    out, lse = attention_forward(q[:, :, :0].float(), k.float(), v.float(), scale=1.0)
    assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)
    out, lse = attention_forward(q[:0].float(), k[:0].float(), v[:0].float(), scale=1.0)
    assert out.shape == (0, 2, 5, 16)
    no_keys = k[:, :, :0].float()
    out, lse = attention_forward(q.float(), no_keys, no_keys, scale=1.0)
    assert torch.equal(out, eager_attention(q.float(), no_keys, no_keys, 1.0)) and (lse == NEG_INF).all()
    dq, dk, dv = attention_backward(torch.ones_like(out), q.float(), no_keys, no_keys, out, lse, scale=1.0)
    assert (dq == 0).all() and dk.shape == dv.shape == no_keys.shape


def test_dispatch(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert uses_triton(cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not uses_triton(cpu)
    q, k, v = (t.half() for t in random_inputs((1, 2, 20, 16), (1, 2, 20, 16)))
    expected, _ = tiled_torch.attention_forward(q, k, v, scale=0.3, causal_offset=0)
    out, _ = attention_forward(q, k, v, scale=0.3, causal_offset=0)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [16, 40, 64, 96, 128, 256])
def test_choose_tiles(head_dim, dtype):
    assert config.choose_tiles(head_dim, dtype, on_gpu=False) == (16, 16, 1, 1)
    for backward in (False, True):
        block_m, block_n, num_warps, num_stages = config.choose_tiles(head_dim, dtype, True, backward=backward)
        for size in (block_m, block_n, num_warps):
            assert size & (size - 1) == 0
        assert block_m >= 16 and block_n >= 16 and num_stages >= 1
        assert config.sram_bytes(block_m, block_n, head_dim, dtype, num_stages) <= config.SRAM_BUDGET_BYTES


def test_input_precision():
    matmul = torch.backends.cuda.matmul
    allowed = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert config.input_precision(torch.float32) == "ieee"
        matmul.allow_tf32 = True
        assert config.input_precision(torch.float32) == "tf32"
        assert config.input_precision(torch.float16) == "ieee"
    finally:
        matmul.allow_tf32 = allowed
