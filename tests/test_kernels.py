"""Tests of flash_fx.kernels: the Triton kernels (through Triton's interpreter) and the tiled PyTorch path.

Every check follows SPEC.md: against a float64 eager reference, the relative error ||x - ref|| / ||ref||
of the kernel must be at most 2x the error of eager attention computed in the same dtype, plus 1e-6,
for the output and for dq, dk, dv (and dbias when the bias gradient is requested).
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


def repeat_kv(x, group, kv_heads_tiled=False):
    """The KV heads repeated for GQA: ``repeat_interleave`` (grouped) or ``repeat`` (tiled)."""
    return x.repeat(1, group, 1, 1) if kv_heads_tiled else x.repeat_interleave(group, 1)


def eager_attention(q, k, v, scale, causal_offset=None, bias=None, drop_masked_rows=False, kv_heads_tiled=False):
    """softmax(q k^T * scale + bias, causal -inf fill) v in the inputs' dtype, with GQA by repetition.

    With ``drop_masked_rows`` fully masked rows output 0 and pass no gradient, the convention the
    kernels' backward follows (plain eager gives NaN there).
    """
    group = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, group, kv_heads_tiled), repeat_kv(v, group, kv_heads_tiled)
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


def check_attention(q, k, v, dtype, *, causal_offset=None, bias=None, triton=True, grad_out=None,
                    bias_grad=False, kv_heads_tiled=False, **blocks):
    """Run forward + backward of the kernels on (q, k, v) cast to ``dtype`` and check both against float64.

    q, k, v are float64 tensors of any layout; the casts keep their strides. With ``bias_grad`` the
    backward also returns dbias, checked against the float64 gradient of a full-shape ``bias``.
    Returns the output and the backward's (dq, dk, dv, dbias).
    """
    options = dict(causal_offset=causal_offset, kv_heads_tiled=kv_heads_tiled)
    forward = attention_forward if triton else tiled_torch.attention_forward
    backward = attention_backward if triton else tiled_torch.attention_backward
    if not triton:
        bias = None if bias is None else bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    scale = q.shape[-1] ** -0.5
    qx, kx, vx = (t.to(dtype) for t in (q, k, v))
    bias_x = None if bias is None else bias.to(dtype)
    out, lse = forward(qx, kx, vx, scale=scale, bias=bias_x, **options, **blocks)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32

    ref = eager_attention(q, k, v, scale, bias=bias, **options)
    assert torch.equal(out.isnan(), ref.isnan()), "NaN rows differ from eager"
    assert_close(out, eager_attention(qx, kx, vx, scale, bias=bias_x, **options), ref, "out")
    rounded = [t.double() for t in (qx, kx, vx, bias_x) if t is not None] + [None]
    ref_lse = torch.logsumexp(_scores(rounded[0], rounded[1], scale, causal_offset, rounded[3], kv_heads_tiled), -1)
    assert torch.allclose(lse.double(), ref_lse, rtol=1e-4, atol=1e-4)

    if grad_out is None:
        grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = backward(grad_out.to(dtype), qx, kx, vx, out, lse, scale=scale, bias=bias_x,
                     bias_requires_grad=bias_grad, **options, **blocks)
    for grad, t in zip(grads[:3], (qx, kx, vx), strict=True):
        assert grad.shape == t.shape and grad.dtype == dtype
    names, inputs = ["dq", "dk", "dv"], [qx, kx, vx]
    if bias_grad:
        assert grads[3].shape == ref.shape[:3] + k.shape[2:3] and grads[3].dtype == torch.float32
        names.append("dbias")
        inputs.append(bias_x)
    else:
        assert grads[3] is None
    ref_grads = _grads([q, k, v, bias][: len(names)], grad_out, scale, bias, **options)
    eager_grads = _grads(inputs, grad_out.to(dtype), scale, bias_x, **options)
    for name, grad, eager, ref_grad in zip(names, grads[: len(names)], eager_grads, ref_grads, strict=True):
        assert not grad.isnan().any(), f"{name} has NaN"
        assert_close(grad, eager, ref_grad, name)
    return out, grads


def _scores(q, k, scale, causal_offset, bias, kv_heads_tiled=False):
    group = q.shape[1] // k.shape[1]
    s = (q @ repeat_kv(k, group, kv_heads_tiled).transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    if causal_offset is not None:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(causal_offset), NEG_INF)
    return s


def _grads(inputs, grad_out, scale, bias, **options):
    """Eager gradients w.r.t. ``inputs``: q, k, v and optionally the bias (which then replaces ``bias``)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    q, k, v = leaves[:3]
    bias = leaves[3] if len(leaves) == 4 else bias
    out = eager_attention(q, k, v, scale, bias=bias, drop_masked_rows=True, **options)
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
    out, (dq, _, _, _) = check_attention(q, k, v, dtype, causal_offset=-3, triton=triton, block_n=16)
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
    dq, dk, dv, dbias = attention_backward(torch.ones_like(out), q.float(), no_keys, no_keys, out, lse, scale=1.0,
                                           bias_requires_grad=True)
    assert (dq == 0).all() and dk.shape == dv.shape == no_keys.shape and dbias.shape == (1, 2, 5, 0)


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


# ------------------------------------------------------------------------------------- bias gradient


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "tiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("causal_offset", [None, 0])
def test_bias_grad(causal_offset, dtype, triton):
    """dbias (= dS of the expanded bias) of a learned full-shape bias, with GQA and ragged tiles."""
    q, k, v = random_inputs((1, 4, 19, 16), (1, 2, 23, 16), seed=5)
    bias = torch.randn(1, 4, 19, 23, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    check_attention(q, k, v, dtype, causal_offset=causal_offset, bias=bias, bias_grad=True, triton=triton,
                    block_n=16)


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "tiled"])
def test_bias_grad_fully_masked_row(triton):
    """A row that a -inf bias masks entirely gets a zero dbias row, where eager's gradient is NaN."""
    q, k, v = random_inputs((1, 1, 9, 16), (1, 1, 12, 16), seed=7)
    noise = torch.randn(9, 12, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    bias = masked_bias(9, 12, [4]) + noise
    _, (_, _, _, dbias) = check_attention(q, k, v, torch.float32, bias=bias, bias_grad=True, triton=triton)
    assert (dbias[0, 0, 4] == 0).all()
    leaf = bias.clone().requires_grad_()
    eager_attention(q, k, v, 0.25, bias=leaf).sum().backward()
    assert leaf.grad[0, 0, 4].isnan().all()


# ------------------------------------------------------------------------------ tiled GQA head mapping


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "tiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("num_kv_heads", [2, 3])
def test_kv_heads_tiled(num_kv_heads, dtype, triton):
    """Query head h reads KV head h % Hkv, as after ``k.repeat(1, Hq // Hkv, 1, 1)``."""
    q, k, v = random_inputs((1, 6, 21, 16), (1, num_kv_heads, 27, 16), seed=9)
    check_attention(q, k, v, dtype, causal_offset=0, kv_heads_tiled=True, triton=triton, block_n=16)


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "tiled"])
def test_kv_heads_tiled_with_bias_grad(triton):
    q, k, v = random_inputs((2, 6, 19, 16), (2, 2, 23, 16), seed=10)
    bias = torch.randn(2, 6, 19, 23, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    check_attention(q, k, v, torch.float32, bias=bias, bias_grad=True, kv_heads_tiled=True, triton=triton,
                    block_n=16)


# ------------------------------------------------------------------------- the flash_fx::attention op


def _op_grads(op, q, k, v, bias, grad_out):
    """Output of ``op(q, k, v, bias)`` and the gradients of all four inputs under ``grad_out``."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, bias)]
    out = op(*leaves)
    return out, torch.autograd.grad(out, leaves, grad_out)


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "tiled"])
@pytest.mark.parametrize(
    "shape_k,shape_v,kv_heads_tiled",
    [((1, 2, 23, 16), (1, 2, 23, 16), False), ((2, 1, 23, 16), (1, 2, 23, 16), True)],
    ids=["kv_batch_1", "k_one_head"],
)
def test_op_broadcasts_inputs(shape_k, shape_v, kv_heads_tiled, triton, monkeypatch):
    """The op broadcasts batch-1 (and k or v with one head) inputs and a [1, H, Nq, Nk] learned bias;
    their gradients come back summed over the broadcast dims."""
    if not triton:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    gen = torch.Generator().manual_seed(12)
    q, k, v, bias = (torch.randn(shape, generator=gen, dtype=torch.float64)
                     for shape in ((2, 4, 19, 16), shape_k, shape_v, (1, 4, 19, 23)))
    grad_out = torch.randn(2, 4, 19, 16, generator=gen, dtype=torch.float64)
    scale, causal_offset = 0.25, 2

    def flash(q, k, v, bias):
        return torch.ops.flash_fx.attention(q, k, v, bias, scale, causal_offset, kv_heads_tiled)[0]

    def eager(q, k, v, bias):
        heads = max(k.shape[1], v.shape[1])
        k, v = k.expand(-1, heads, -1, -1), v.expand(-1, heads, -1, -1)
        return eager_attention(q, k, v, scale, causal_offset, bias, kv_heads_tiled=kv_heads_tiled)

    floats = [t.float() for t in (q, k, v, bias, grad_out)]
    out, grads = _op_grads(flash, *floats)
    eager_out, eager_grads = _op_grads(eager, *floats)
    ref_out, ref_grads = _op_grads(eager, q, k, v, bias, grad_out)
    assert out.shape == ref_out.shape
    assert_close(out, eager_out, ref_out, "out")
    for name, grad, eager_grad, ref_grad, t in zip("qkvb", grads, eager_grads, ref_grads, floats, strict=False):
        assert grad.shape == t.shape and grad.dtype == t.dtype
        assert_close(grad, eager_grad, ref_grad, f"d{name}")


def test_opcheck():
    """torch.library.opcheck: schema, autograd registration, fake tensors (and, with a learned bias, AOT
    dispatch, which also runs the backward op and its fake)."""
    gen = torch.Generator().manual_seed(13)
    q, k, v, bias = (torch.randn(shape, generator=gen, requires_grad=True)
                     for shape in ((2, 4, 7, 16), (1, 2, 9, 16), (1, 2, 9, 16), (1, 4, 7, 9)))
    quick = ("test_schema", "test_autograd_registration", "test_faketensor")
    op = torch.ops.flash_fx.attention.default
    torch.library.opcheck(op, (q, k, v, bias, 0.25, 0, True), test_utils=(*quick, "test_aot_dispatch_dynamic"))
    torch.library.opcheck(op, (q, k, v, None, 0.25, None, False), test_utils=quick)
