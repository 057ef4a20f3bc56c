"""Tests of flash_fx.kernels: the Triton kernels (through Triton's interpreter) and the tiled PyTorch path.

Every check follows SPEC.md: against a float64 eager reference, the relative error ||x - ref|| / ||ref||
of the kernel must be at most 2x the error of eager attention computed in the same dtype, plus 1e-6,
for the output and for dq, dk, dv (and dbias / drel when the bias / relative-bias gradient is requested).
"""

import os
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from flash_fx.kernels import config, cpu_flash, dropout_keep_mask, tile_density, uses_triton  # noqa: E402
from flash_fx.kernels.schedule import EMPTY, FULL, PARTIAL  # noqa: E402
from kernel_calls import backward as attention_backward  # noqa: E402
from kernel_calls import density_spec, layout_of, spec_of, tiled_backward, tiled_forward  # noqa: E402
from kernel_calls import forward as attention_forward  # noqa: E402

# The interpreter evaluates 0/0 and log(0) of fully masked rows with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NEG_INF = float("-inf")
DROPOUT_SEED = 2024


def repeat_kv(x, group, kv_heads_tiled=False):
    """The KV heads repeated for GQA: ``repeat_interleave`` (grouped) or ``repeat`` (tiled)."""
    return x.repeat(1, group, 1, 1) if kv_heads_tiled else x.repeat_interleave(group, 1)


def eager_attention(q, k, v, scale, causal_offset=None, bias=None, drop_masked_rows=False, kv_heads_tiled=False,
                    visible=None, dropout=None, alibi=None, rel=None):
    """softmax(q k^T * scale + bias, causal and ``visible`` -inf fill) v in the inputs' dtype, with GQA by
    repetition; ``visible`` is a dense bool [B, Nq, Nk] mask. ``dropout = (keep, p)`` multiplies the
    probabilities by the bool [B, Hq, Nq, Nk] ``keep`` mask and 1 / (1 - p), as the kernels' dropout does.
    ``alibi = (slopes, symmetric)`` adds the dense ALiBi bias of :func:`alibi_bias`, ``rel`` (a relative-position
    vector [B or 1, H or 1, Nq + Nk - 1]) the dense bias of :func:`relative_bias`.

    With ``drop_masked_rows`` fully masked rows output 0 and pass no gradient, the convention the
    kernels' backward follows (plain eager gives NaN there).
    """
    group = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, group, kv_heads_tiled), repeat_kv(v, group, kv_heads_tiled)
    s = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(s.dtype)
    if alibi is not None:
        s = s + alibi_bias(*alibi, s.shape[-2], s.shape[-1], s.dtype)
    if rel is not None:
        s = s + relative_bias(rel, s.shape[-2], s.shape[-1], s.dtype)
    if causal_offset is not None:
        causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(causal_offset)
        s = s.masked_fill(~causal, NEG_INF)
    if visible is not None:
        s = s.masked_fill(~visible[:, None], NEG_INF)
    if not drop_masked_rows:
        return _dropped(s.softmax(-1), dropout) @ v
    dead = (s == NEG_INF).all(-1, keepdim=True)
    return _dropped(s.masked_fill(dead, 0.0).softmax(-1).masked_fill(dead, 0.0), dropout) @ v


def alibi_bias(slopes, symmetric, n_q, n_k, dtype):
    """The ALiBi bias [B or 1, H or 1, Nq, Nk] in ``dtype``: ``slopes[b, h] * (j - i)``, or ``* -|j - i|``."""
    pos = torch.arange(n_k)[None, :] - torch.arange(n_q)[:, None]
    if symmetric:
        pos = -pos.abs()
    return slopes.to(dtype)[:, :, None, None] * pos.to(dtype)


def relative_bias(rel, n_q, n_k, dtype):
    """The dense bias [B or 1, H or 1, Nq, Nk] in ``dtype`` of a relative-position vector ``rel``
    [B or 1, H or 1, Nq + Nk - 1]: ``rel[b, h, j - i + Nq - 1]`` (differentiable in ``rel``)."""
    index = torch.arange(n_k)[None, :] - torch.arange(n_q)[:, None] + n_q - 1
    return rel.to(dtype)[:, :, index]


def _dropped(p, dropout):
    if dropout is None:
        return p
    keep, drop_p = dropout
    return p * keep / (1 - drop_p)


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


def dense_mask(n_q, n_k, window=None, key_valid=None, q_doc=None, k_doc=None):
    """The structural masks materialized: bool [B or 1, Nq, Nk], True where key j is visible to query i."""
    i, j = torch.arange(n_q)[None, :, None], torch.arange(n_k)[None, None, :]
    visible = torch.ones(1, n_q, n_k, dtype=torch.bool)
    if window is not None:
        visible = visible & (j >= i - window[0]) & (j <= i + window[1])
    if key_valid is not None:
        visible = visible & key_valid[:, None, :]
    if q_doc is not None:
        visible = visible & (q_doc[:, :, None] == k_doc[:, None, :])
    return visible


def check_attention(q, k, v, dtype, *, causal_offset=None, bias=None, triton=True, grad_out=None,
                    bias_grad=False, kv_heads_tiled=False, masks=None, sparse=False, dropout_p=0.0, alibi=None,
                    rel_bias=None, rel_grad=False, **blocks):
    """Run forward + backward of the kernels on (q, k, v) cast to ``dtype`` and check both against float64.

    q, k, v are float64 tensors of any layout; the casts keep their strides. With ``bias_grad`` the
    backward also returns dbias, checked against the float64 gradient of a full-shape ``bias``.
    ``masks`` holds the structural mask keywords (window, key_valid, q_doc, k_doc), which the
    references apply as a dense mask. ``sparse`` runs the block-sparse path (``sparse_bias``; the tiled
    path gets the layout of ``block_m`` x ``block_n`` tiles, ``block_m`` defaulting to ``block_n``).
    ``dropout_p`` drops with seed ``DROPOUT_SEED``; the references apply the materialized keep mask.
    ``alibi = (slopes, symmetric)`` passes ``alibi_slopes`` / ``alibi_symmetric`` (the slopes as given: they
    should be float32-exact, since the kernels compute with float32 slopes); the references add the
    dense ALiBi bias. ``rel_bias`` (a relative-position vector [B or 1, H or 1, Nq + Nk - 1], float32-exact like
    the slopes) passes ``rel_bias``; the references add its dense form, and with ``rel_grad`` the backward's drel
    is checked against the gradient of the vector expanded to [B, H, Nq + Nk - 1]. Returns the output and the
    backward's (dq, dk, dv, dbias, drel).
    """
    masks = masks or {}
    options = dict(causal_offset=causal_offset, kv_heads_tiled=kv_heads_tiled)
    scale = q.shape[-1] ** -0.5
    qx, kx, vx = (t.to(dtype) for t in (q, k, v))
    bias_x = None if bias is None else bias.to(dtype)
    seed = DROPOUT_SEED if dropout_p else None
    kernel_options = dict(options, **masks, dropout_p=dropout_p, seed=seed, sparse_bias=sparse)
    if alibi is not None:
        kernel_options.update(alibi_slopes=alibi[0], alibi_symmetric=alibi[1])
    if rel_bias is not None:
        kernel_options["rel_bias"] = rel_bias
    backward_options = dict(rel_bias_requires_grad=rel_grad)
    if triton:
        forward, backward = attention_forward, attention_backward
    else:
        forward, backward = tiled_forward, tiled_backward
        block_m = blocks.pop("block_m", None)
        if sparse:
            blocks["block_n"] = blocks.get("block_n", 16)
            kernel_options["block_m"] = block_m or blocks["block_n"]
    if masks:
        options["visible"] = dense_mask(q.shape[2], k.shape[2], **masks)
    if dropout_p:
        batch, heads, n_q, n_k = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        keep = dropout_keep_mask(seed, 0, batch * heads, n_q, n_k, dropout_p).view(batch, heads, n_q, n_k)
        options["dropout"] = (keep, dropout_p)
    if alibi is not None:
        options["alibi"] = alibi
    if rel_bias is not None:
        options["rel"] = rel_bias
    out, lse = forward(qx, kx, vx, scale=scale, bias=bias_x, **kernel_options, **blocks)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (*q.shape[:3], 2) and lse.dtype == torch.float32

    ref = eager_attention(q, k, v, scale, bias=bias, **options)
    assert torch.equal(out.isnan(), ref.isnan()), "NaN rows differ from eager"
    assert_close(out, eager_attention(qx, kx, vx, scale, bias=bias_x, **options), ref, "out")
    rounded = [t.double() for t in (qx, kx, vx, bias_x) if t is not None] + [None]
    ref_lse = torch.logsumexp(_scores(rounded[0], rounded[1], scale, causal_offset, rounded[3], kv_heads_tiled,
                                      options.get("visible"), alibi, rel_bias), -1)
    assert torch.allclose(lse.double().sum(-1), ref_lse, rtol=1e-4, atol=1e-4)

    if grad_out is None:
        grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = backward(grad_out.to(dtype), qx, kx, vx, out, lse, scale=scale, bias=bias_x,
                     bias_requires_grad=bias_grad, **kernel_options, **backward_options, **blocks)
    assert len(grads) == 5
    for grad, t in zip(grads[:3], (qx, kx, vx), strict=True):
        assert grad.shape == t.shape and grad.dtype == dtype
    names, kernel_grads, inputs, ref_inputs = ["dq", "dk", "dv"], list(grads[:3]), [qx, kx, vx], [q, k, v]
    if bias_grad:
        full = ref.shape[:3] + k.shape[2:3]
        assert grads[3].shape == full and grads[3].dtype == torch.float32
        names.append("dbias")
        kernel_grads.append(grads[3])
        # The kernels return the gradient of the expanded bias.
        bias, bias_x = bias.expand(full), bias_x.expand(full)
        inputs.append(bias_x)
        ref_inputs.append(bias)
    else:
        assert grads[3] is None
    if rel_grad:
        full_rel = (*ref.shape[:2], q.shape[2] + k.shape[2] - 1)
        assert grads[4].shape == full_rel and grads[4].dtype == torch.float32
        names.append("drel")
        kernel_grads.append(grads[4])
        # ... and of the expanded relative-position vector.
        inputs.append(rel_bias.to(dtype).expand(full_rel))
        ref_inputs.append(rel_bias.double().expand(full_rel))
    else:
        assert grads[4] is None
    grad_options = dict(options, bias_grad=bias_grad, rel_grad=rel_grad)
    ref_grads = _grads(ref_inputs, grad_out, scale, bias, **grad_options)
    eager_grads = _grads(inputs, grad_out.to(dtype), scale, bias_x, **grad_options)
    for name, grad, eager, ref_grad in zip(names, kernel_grads, eager_grads, ref_grads, strict=True):
        assert not grad.isnan().any(), f"{name} has NaN"
        assert_close(grad, eager, ref_grad, name)
    return out, grads


def _scores(q, k, scale, causal_offset, bias, kv_heads_tiled=False, visible=None, alibi=None, rel=None):
    group = q.shape[1] // k.shape[1]
    s = (q @ repeat_kv(k, group, kv_heads_tiled).transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    if alibi is not None:
        s = s + alibi_bias(*alibi, s.shape[-2], s.shape[-1], s.dtype)
    if rel is not None:
        s = s + relative_bias(rel, s.shape[-2], s.shape[-1], s.dtype)
    if causal_offset is not None:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(causal_offset), NEG_INF)
    if visible is not None:
        s = s.masked_fill(~visible[:, None], NEG_INF)
    return s


def _grads(inputs, grad_out, scale, bias, bias_grad=False, rel_grad=False, **options):
    """Eager gradients w.r.t. ``inputs``: q, k, v, then the bias if ``bias_grad`` (which then replaces ``bias``),
    then the relative-position vector if ``rel_grad`` (which then replaces ``options["rel"]``)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    q, k, v, *rest = leaves
    if bias_grad:
        bias = rest.pop(0)
    if rel_grad:
        options["rel"] = rest.pop(0)
    out = eager_attention(q, k, v, scale, bias=bias, drop_masked_rows=True, **options)
    return torch.autograd.grad(out, leaves, grad_out)


# ---------------------------------------------------------------------------------------------- Triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("causal_offset", [None, 0])
@pytest.mark.parametrize("n_q,n_k", [(37, 50), (33, 33)])
@pytest.mark.parametrize("head_dim", [16, 64])
def test_triton_grid(head_dim, n_q, n_k, causal_offset, dtype):
    """bfloat16 is covered by the head-dim, bias, non-contiguous and tiled-path tests."""
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
    out, (dq, _, _, _, _) = check_attention(q, k, v, dtype, causal_offset=-3, triton=triton, block_n=16)
    assert out[:, :, :3].isnan().all() and not out[:, :, 3:].isnan().any()
    assert (dq[:, :, :3] == 0).all()


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "tiled"])
def test_finfo_min_bias_gives_uniform_average(triton):
    """A row filled with finfo(float32).min averages v uniformly, as eager does (no overflow to -inf)."""
    q, k, v = (t.float() for t in random_inputs((1, 1, 20, 16), (1, 1, 30, 16)))
    bias = torch.zeros(1, 1, 20, 30)
    bias[:, :, 7] = torch.finfo(torch.float32).min
    forward = attention_forward if triton else tiled_forward
    out, _ = forward(q, k, v, scale=0.25, bias=bias)
    assert torch.allclose(out[0, 0, 7], v[0, 0].mean(0), atol=1e-5)
    assert torch.allclose(out, eager_attention(q, k, v, 0.25, bias=bias), atol=1e-5)


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "tiled"])
def test_finfo_min_rows_backward_follows_eager(triton):
    """Rows hidden entirely by finfo.min get eager's gradients too: the saved LSE pair keeps log(n), which
    ``finfo.min + log(n)`` loses to rounding in float32 (GQA, ragged tiles, a partly hidden row beside them)."""
    q, k, v = random_inputs((2, 4, 37, 16), (2, 2, 29, 16), seed=44)
    bias = torch.randn(1, 4, 37, 29, generator=torch.Generator().manual_seed(45), dtype=torch.float64)
    bias[..., 7, :] = FINFO_MIN
    bias[:, 1, 20:, :] = FINFO_MIN
    bias[..., 3, 5:] = FINFO_MIN
    check_attention(q, k, v, torch.float32, bias=bias, bias_grad=True, triton=triton, block_n=16)


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
    out, _ = tiled_forward(q, k, v, scale=0.5, causal_offset=2, block_n=7)
    assert torch.allclose(out, eager_attention(q, k, v, 0.5, causal_offset=2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "tiled"])
def test_empty_shapes(triton, monkeypatch):
    if not triton:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = random_inputs((1, 2, 5, 16), (1, 2, 7, 16))
    out, lse = attention_forward(q[:, :, :0].float(), k.float(), v.float(), scale=1.0)
    assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0, 2)
    out, lse = attention_forward(q[:0].float(), k[:0].float(), v[:0].float(), scale=1.0)
    assert out.shape == (0, 2, 5, 16)
    no_keys = k[:, :, :0].float()
    out, lse = attention_forward(q.float(), no_keys, no_keys, scale=1.0)
    assert torch.equal(out, eager_attention(q.float(), no_keys, no_keys, 1.0)) and (lse.sum(-1) == NEG_INF).all()
    dq, dk, dv, dbias, drel = attention_backward(torch.ones_like(out), q.float(), no_keys, no_keys, out, lse,
                                                 scale=1.0, bias=torch.zeros(1, 1, 5, 0), bias_requires_grad=True)
    assert (dq == 0).all() and dk.shape == dv.shape == no_keys.shape and dbias.shape == (1, 2, 5, 0)
    assert drel is None


def test_dispatch(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert uses_triton(cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not uses_triton(cpu)
    q, k, v = (t.half() for t in random_inputs((1, 2, 20, 16), (1, 2, 20, 16)))
    # On the CPU a spec PyTorch's C++ flash kernel serves runs it; others run the tiled path.
    bias = torch.randn(20, 20, generator=torch.Generator().manual_seed(3)).half()
    for served in (dict(causal_offset=0), dict(causal_offset=0, bias=bias)):
        expected = cpu_flash.attention_forward(q, k, v, spec_of(0.3, **served).validate(q, k, v))[0]
        assert torch.equal(attention_forward(q, k, v, scale=0.3, **served)[0], expected)
    slopes = torch.tensor([[0.5, 0.25]])  # ALiBi: the tiled path
    expected, _ = tiled_forward(q, k, v, scale=0.3, causal_offset=0, alibi_slopes=slopes)
    assert torch.equal(attention_forward(q, k, v, scale=0.3, causal_offset=0, alibi_slopes=slopes)[0], expected)


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


def test_input_precision_new_tf32_api():
    """With PyTorch's fp32_precision API (after which reading allow_tf32 raises), in a fresh process: mixing the
    two APIs is sticky for the process."""
    script = """
import torch
from flash_fx.kernels import config
matmul = torch.backends.cuda.matmul
matmul.fp32_precision = "ieee"
assert config.input_precision(torch.float32) == "ieee"
matmul.fp32_precision = "tf32"
assert config.input_precision(torch.float32) == "tf32"
matmul.fp32_precision, torch.backends.fp32_precision = "none", "tf32"
assert config.input_precision(torch.float32) == "tf32"
assert config.input_precision(torch.bfloat16) == "ieee"
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


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
    _, (_, _, _, dbias, _) = check_attention(q, k, v, torch.float32, bias=bias, bias_grad=True, triton=triton)
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
    key_valid, docs = torch.tensor([[True] * 8 + [False]]), torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2]])
    torch.library.opcheck(op, (q, k, v, None, 0.25, 0, False, [3, 1], key_valid, docs[:, :7], docs),
                          test_utils=quick)


# -------------------------------------------------------------------- structural masks (from indices)

SEQ = 45  # ragged against the interpreter's 16 x 16 tiles


def padding_mask():
    """key_valid [3, SEQ]: batch 0 all valid, batch 1 with 7 trailing padding keys, batch 2 with a whole
    padding tile (keys 16..31) and 5 trailing padding keys."""
    key_valid = torch.ones(3, SEQ, dtype=torch.bool)
    key_valid[1, 38:] = False
    key_valid[2, 16:32] = False
    key_valid[2, 40:] = False
    return key_valid


def sorted_docs():
    """Document ids [2, SEQ] of 3 packed documents of ragged lengths per batch row (12/20/13, 7/30/8)."""
    lengths = [(12, 20, 13), (7, 30, 8)]
    return torch.stack([torch.repeat_interleave(torch.arange(3), torch.tensor(n)) for n in lengths])


STRUCTURAL_CASES = {
    "causal_window": (0, dict(window=(5, 0))),
    "two_sided_window": (None, dict(window=(3, 2))),
    "padding": (None, dict(key_valid=padding_mask())),
    "sorted_docs": (None, dict(q_doc=sorted_docs(), k_doc=sorted_docs())),
    "sorted_docs_causal": (0, dict(q_doc=sorted_docs(), k_doc=sorted_docs().long())),
    "unsorted_docs": (None, dict(q_doc=torch.randint(0, 3, (2, SEQ), generator=torch.Generator().manual_seed(14)),
                                 k_doc=torch.randint(0, 3, (2, SEQ), generator=torch.Generator().manual_seed(15)))),
}


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "tiled"])
@pytest.mark.parametrize("case", list(STRUCTURAL_CASES))
def test_structural_masks(case, triton):
    """Window, padding and document masks evaluated from indices match eager with the dense mask."""
    causal_offset, masks = STRUCTURAL_CASES[case]
    batch = masks["key_valid"].shape[0] if "key_valid" in masks else 2
    q, k, v = random_inputs((batch, 2, SEQ, 16), (batch, 2, SEQ, 16), seed=16)
    check_attention(q, k, v, torch.float32, causal_offset=causal_offset, masks=masks, triton=triton,
                    block_n=16)


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "tiled"])
def test_structural_masks_fp16_gqa(triton):
    """fp16, GQA and a bias together with a causal window, padding and sorted documents."""
    q, k, v = random_inputs((2, 4, SEQ, 32), (2, 2, SEQ, 32), seed=17)
    bias = torch.randn(2, 4, SEQ, SEQ, generator=torch.Generator().manual_seed(18), dtype=torch.float64)
    masks = dict(window=(20, 0), key_valid=padding_mask()[1:], q_doc=sorted_docs(), k_doc=sorted_docs())
    check_attention(q, k, v, torch.float16, causal_offset=0, bias=bias, bias_grad=True, masks=masks, triton=triton,
                    block_n=16)


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "tiled"])
def test_padding_fully_masked_rows(triton):
    """Rows whose window holds only padding keys, and a batch row without valid keys, are NaN as in eager;
    they pass no gradient, and keys nobody sees get zero dK, dV."""
    key_valid = torch.ones(2, SEQ, dtype=torch.bool)
    key_valid[0, 18:34] = False
    key_valid[1] = False
    q, k, v = random_inputs((2, 2, SEQ, 16), (2, 2, SEQ, 16), seed=19)
    out, (dq, dk, dv, _, _) = check_attention(q, k, v, torch.float32, causal_offset=0,
                                              masks=dict(window=(2, 0), key_valid=key_valid), triton=triton,
                                              block_n=16)
    assert out[0, :, 20:34].isnan().all() and not out[0, :, :20].isnan().any() and out[1].isnan().all()
    assert (dq[0, :, 20:34] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()


def visited_tiles_brute_force(visible, block_m, block_n):
    """Fraction of (query tile, key tile) pairs of a dense [B, Nq, Nk] mask that hold a visible entry."""
    batch, n_q, n_k = visible.shape
    padded = torch.zeros(batch, -(-n_q // block_m) * block_m, -(-n_k // block_n) * block_n, dtype=torch.bool)
    padded[:, :n_q, :n_k] = visible
    tiles = padded.unflatten(2, (-1, block_n)).unflatten(1, (-1, block_m)).any(4).any(2)
    return tiles.float().mean().item()


@pytest.mark.parametrize(
    "n_q,n_k,causal_offset,masks",
    [
        (SEQ, SEQ, 0, dict(window=(5, 0))),
        (SEQ, SEQ, None, dict(window=(3, 2))),
        (70, 45, 25, dict(window=(40, 30))),
        (SEQ, SEQ, None, dict(key_valid=padding_mask())),
        (SEQ, SEQ, None, dict(q_doc=sorted_docs(), k_doc=sorted_docs())),
        (SEQ, SEQ, 0, dict()),
    ],
    ids=["causal_window", "two_sided_window", "cross_window", "padding", "sorted_docs", "causal"],
)
@pytest.mark.parametrize("block_m,block_n", [(16, 16), (16, 8)])
def test_tile_density_counts_visible_tiles(n_q, n_k, causal_offset, masks, block_m, block_n):
    """The tiles the kernels visit are exactly the tile pairs with a visible entry (for these masks alone)."""
    visible = dense_mask(n_q, n_k, **masks)
    if causal_offset is not None:
        visible = visible & torch.ones(n_q, n_k, dtype=torch.bool).tril(causal_offset)
    density = tile_density(density_spec(n_q, n_k, causal_offset=causal_offset, **masks), n_q, n_k, block_m, block_n)
    assert density == pytest.approx(visited_tiles_brute_force(visible, block_m, block_n))
    assert density < 1


def test_tile_density_unsorted_docs_visit_everything():
    _, masks = STRUCTURAL_CASES["unsorted_docs"]
    assert tile_density(density_spec(SEQ, SEQ, **masks), SEQ, SEQ, 16, 16) == 1.0


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "tiled"])
def test_op_structural_masks(triton, monkeypatch):
    """The op takes window / key_valid / document masks (batch-1 masks broadcast); q, k, v gradients match."""
    if not triton:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    gen = torch.Generator().manual_seed(20)
    q, k, v, grad_out = (torch.randn(2, 2, 21, 16, generator=gen, dtype=torch.float64) for _ in range(4))
    key_valid = torch.ones(1, 21, dtype=torch.bool)
    key_valid[0, 17:] = False
    docs = torch.tensor([[0] * 9 + [1] * 12])
    masks = dict(key_valid=key_valid, q_doc=docs, k_doc=docs)
    visible = dense_mask(21, 21, window=(4, 4), **masks)

    def run(attention, *inputs):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = attention(*leaves)
        return out, torch.autograd.grad(out, leaves, grad_out.to(out.dtype))

    def flash(q, k, v):
        return torch.ops.flash_fx.attention(q, k, v, None, 0.25, 0, False, [4, 4], **masks)[0]

    def eager(q, k, v):
        return eager_attention(q, k, v, 0.25, causal_offset=0, visible=visible)

    floats = [t.float() for t in (q, k, v)]
    (out, grads), (eager_out, eager_grads) = run(flash, *floats), run(eager, *floats)
    ref_out, ref_grads = run(eager, q, k, v)
    assert_close(out, eager_out, ref_out, "out")
    for name, grad, eager_grad, ref_grad in zip("qkv", grads, eager_grads, ref_grads, strict=True):
        assert_close(grad, eager_grad, ref_grad, f"d{name}")


@pytest.mark.parametrize(
    "masks",
    [dict(window=(3, 2)), dict(q_doc=torch.zeros(1, 16, dtype=torch.int32), k_doc=(torch.arange(64) >= 20).int()[None]),
     dict(key_valid=torch.arange(64)[None] < 30)],
    ids=["window", "sorted_docs", "padding"],
)
def test_skipped_tiles_are_not_read(masks):
    """K and V are NaN in the key tiles 32..63 that no query may see: the Triton kernels never read them
    (a visited tile would spread NaN through ``0 * NaN``), and those keys get zero dK, dV."""
    q, k, v = (t.float() for t in random_inputs((1, 1, 16, 16), (1, 1, 64, 16), seed=21))
    k[:, :, 32:], v[:, :, 32:] = float("nan"), float("nan")
    out, lse = attention_forward(q, k, v, scale=0.25, block_m=16, block_n=16, **masks)
    dq, dk, dv, _, _ = attention_backward(torch.ones_like(out), q, k, v, out, lse, scale=0.25, block_m=16,
                                          block_n=16, **masks)
    assert out.isfinite().all() and dq.isfinite().all()
    assert (dk[:, :, 32:] == 0).all() and (dv[:, :, 32:] == 0).all()


# ------------------------------------------------------------- block-sparse bias layouts (sparse_bias)


def block_mask_bias(shape, seed, fill=NEG_INF, noise=True):
    """A mask-like float64 bias of ``shape`` [b, h, Nq, Nk]: 0 where visible, ``fill`` where hidden, in random
    8 x 8 blocks whose visibility rate is drawn per 16 x 16 tile from {0, 1/2, 1}, so that the kernels'
    16 x 16 tiles come out empty, full and partial (Nq, Nk need not be multiples of 16). With ``noise``
    the visible entries of the rate-1/2 tiles carry a random bias (partial tiles need not be 0 / fill)."""
    gen = torch.Generator().manual_seed(seed)
    *lead, n_q, n_k = shape
    tiles = (*lead, -(-n_q // 16), -(-n_k // 16))
    rate = torch.tensor([0.0, 0.5, 1.0])[torch.randint(0, 3, tiles, generator=gen)]
    rate = rate.repeat_interleave(2, -1).repeat_interleave(2, -2)
    visible = torch.rand(rate.shape, generator=gen) < rate
    visible = visible.repeat_interleave(8, -1).repeat_interleave(8, -2)[..., :n_q, :n_k]
    bias = torch.zeros(shape, dtype=torch.float64)
    if noise:
        half = (rate == 0.5).repeat_interleave(8, -1).repeat_interleave(8, -2)[..., :n_q, :n_k]
        bias = torch.where(half, torch.randn(shape, generator=gen, dtype=torch.float64), bias)
    return bias.masked_fill(~visible, fill)


FINFO_MIN = torch.finfo(torch.float32).min


def finite_fill_case():
    """A finfo(float32).min-filled block bias with row 7 entirely masked by that finite fill (eager averages
    it uniformly, forward and backward; its query tile keeps every key tile)."""
    q, k, v = random_inputs((1, 2, 45, 16), (1, 2, 61, 16), seed=38)
    bias = block_mask_bias((1, 1, 45, 61), 39, fill=FINFO_MIN)
    bias[..., 7, :] = FINFO_MIN
    return (q, k, v), dict(bias=bias, bias_grad=True)


def dead_row_case():
    """Ragged Nq = 45, Nk = 61, a bias shared by batch and heads, row 9 fully masked with -inf."""
    q, k, v = random_inputs((2, 2, 45, 16), (2, 2, 61, 16), seed=30)
    bias = block_mask_bias((1, 1, 45, 61), seed=31)
    bias[..., 9, :] = NEG_INF
    return (q, k, v), dict(bias=bias, bias_grad=True)


SPARSE_CASES = {
    "ragged_dead_row": dead_row_case,
    "per_head_causal_fp16": lambda: (random_inputs((2, 2, 50, 16), (2, 2, 50, 16), seed=32),
                                     dict(bias=block_mask_bias((2, 2, 50, 50), 33), causal_offset=0,
                                          bias_grad=True, dtype=torch.float16)),
    "gqa_batch_bias": lambda: (random_inputs((2, 4, 40, 32), (2, 2, 57, 32), seed=34),
                               dict(bias=block_mask_bias((2, 1, 40, 57), 35), bias_grad=True)),
    "gqa_kv_tiled": lambda: (random_inputs((1, 4, 40, 32), (1, 2, 57, 32), seed=34),
                             dict(bias=block_mask_bias((1, 4, 40, 57), 35), kv_heads_tiled=True, causal_offset=16)),
    "key_padding": lambda: (random_inputs((3, 2, SEQ, 16), (3, 2, SEQ, 16), seed=36),
                            dict(bias=block_mask_bias((1, 2, SEQ, SEQ), 37), masks=dict(key_valid=padding_mask()),
                                 bias_grad=True)),
    "docs_window": lambda: (random_inputs((2, 2, SEQ, 16), (2, 2, SEQ, 16), seed=41),
                            dict(bias=block_mask_bias((1, 1, SEQ, SEQ), 42),
                                 masks=dict(window=(20, 4), q_doc=sorted_docs(), k_doc=sorted_docs()))),
    "finite_fill": finite_fill_case,
    "dropout": lambda: (random_inputs((1, 2, 45, 16), (1, 2, 61, 16), seed=43),
                        dict(bias=block_mask_bias((1, 2, 45, 61), 40), causal_offset=10, dropout_p=0.3)),
}


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "tiled"])
@pytest.mark.parametrize("case", list(SPARSE_CASES))
def test_sparse_bias(case, triton):
    """sparse_bias: the kernels visit only the non-empty 16 x 16 tiles of a random block mask (empty, full
    and partial tiles, ragged edges) and match the float64 reference, forward and backward."""
    (q, k, v), options = SPARSE_CASES[case]()
    dtype = options.pop("dtype", torch.float32)
    bias = options["bias"]
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    classes = layout_of(bias.expand(full), 16, 16).classes
    assert {EMPTY, PARTIAL, FULL} <= set(classes.unique().tolist())
    check_attention(q, k, v, dtype, triton=triton, sparse=True, block_n=16, **options)


def handcrafted_bias():
    """Bias [1, 1, 4, 7] for 2 x 3 tiles (the last key tile ragged, 1 key wide)."""
    return torch.tensor([
        [0.0, 0.0, 0.0, NEG_INF, NEG_INF, NEG_INF, 0.0],
        [0.0, 0.0, 0.0, NEG_INF, NEG_INF, NEG_INF, 0.0],
        [0.0, NEG_INF, 0.0, 0.0, 0.0, 0.0, NEG_INF],
        [0.5, 0.0, 0.0, 0.0, 0.0, 0.0, NEG_INF],
    ])[None, None]


@pytest.mark.parametrize(
    "case,expected",
    [
        # Zeros: full; all -inf: empty; the ragged last key tile is never full; a 0.5 or -inf makes it partial.
        ("plain", [[FULL, EMPTY, PARTIAL], [PARTIAL, FULL, EMPTY]]),
        # The causal band folded in: tiles it cuts are partial, tiles above it empty.
        ("causal", [[PARTIAL, EMPTY, EMPTY], [PARTIAL, PARTIAL, EMPTY]]),
        # Row 1 masked with a finite fill: eager averages it over every key, so its query tile skips nothing.
        ("finite_dead_row", [[PARTIAL, PARTIAL, PARTIAL], [PARTIAL, FULL, EMPTY]]),
        # A float16 bias: float16's most negative value counts as masked.
        ("float16", [[FULL, EMPTY, PARTIAL], [PARTIAL, FULL, EMPTY]]),
    ],
)
def test_bias_layout_classes(case, expected):
    bias, causal_offset = handcrafted_bias(), None
    if case == "causal":
        causal_offset = 0
    elif case == "finite_dead_row":
        bias[0, 0, 1] = FINFO_MIN
    elif case == "float16":
        bias = bias.clamp(min=torch.finfo(torch.float16).min).half()
    layout = layout_of(bias.expand(3, 2, 4, 7), 2, 3, causal_offset)
    assert layout.classes.dtype == torch.int8 and (layout.block_m, layout.block_n) == (2, 3)
    assert torch.equal(layout.classes, torch.tensor(expected, dtype=torch.int8)[None, None])


def test_bias_layout_lists_and_density():
    """Per query tile and per key tile: (#partial, #full) and the tile numbers, partial first, then full,
    then the empty rest; the batch / head dims are the bias's own (1 where it broadcasts)."""
    per_head = torch.cat([handcrafted_bias(), torch.zeros(1, 1, 4, 7)], dim=1)
    layout = layout_of(per_head.expand(3, 2, 4, 7), 2, 3)
    assert layout.classes.shape == (1, 2, 2, 3)
    counts, indices = layout.by_query_tile()
    assert counts.dtype == indices.dtype == torch.int32
    assert counts[0, 0].tolist() == [[1, 1], [1, 1]] and indices[0, 0].tolist() == [[2, 0, 1], [0, 1, 2]]
    assert counts[0, 1].tolist() == [[1, 2], [1, 2]] and indices[0, 1].tolist() == [[2, 0, 1], [2, 0, 1]]
    counts, indices = layout.by_key_tile()
    assert counts.shape == (1, 2, 3, 2) and indices.shape == (1, 2, 3, 2)
    assert counts[0, 0].tolist() == [[1, 1], [0, 1], [1, 0]] and indices[0, 0].tolist() == [[1, 0], [1, 0], [0, 1]]
    assert layout.density == pytest.approx((4 + 6) / 12)
    assert layout_of(torch.zeros(1, 1, 0, 5), 2, 3).density == 0.0


@pytest.mark.parametrize("causal_offset", [None, 0])
@pytest.mark.parametrize("block_m,block_n", [(16, 16), (16, 8), (32, 16)])
def test_bias_layout_density_counts_visible_tiles(block_m, block_n, causal_offset):
    """The density is the fraction of tile pairs holding a visible entry (-inf masks, no finite-fill rows)."""
    bias = block_mask_bias((1, 1, 70, 45), seed=44, noise=False)
    visible = bias[0] == 0
    if causal_offset is not None:
        visible = visible & torch.ones(70, 45, dtype=torch.bool).tril(causal_offset)
    density = layout_of(bias, block_m, block_n, causal_offset).density
    assert density == pytest.approx(visited_tiles_brute_force(visible, block_m, block_n))
    assert 0 < density < 1


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "tiled"])
def test_sparse_bias_skips_empty_tiles(triton):
    """K and V are NaN in keys 32..63, which only empty tiles cover: with sparse_bias the kernels (the Triton
    kernels, the tiled path) never read them (a visited tile would spread NaN through ``0 * NaN``); those keys get
    zero dK, dV and dbias."""
    q, k, v = (t.float() for t in random_inputs((1, 2, 40, 16), (1, 2, 64, 16), seed=45))
    bias = block_mask_bias((1, 1, 40, 64), seed=46).float()
    bias[..., 32:] = NEG_INF
    k[:, :, 32:], v[:, :, 32:] = float("nan"), float("nan")
    blocks = dict(block_m=16, block_n=16)
    run_forward, run_backward = (attention_forward, attention_backward) if triton else (tiled_forward, tiled_backward)
    out, lse = run_forward(q, k, v, scale=0.25, bias=bias, sparse_bias=True, **blocks)
    dq, dk, dv, dbias, _ = run_backward(torch.ones_like(out), q, k, v, out, lse, scale=0.25, bias=bias,
                                        bias_requires_grad=True, sparse_bias=True, **blocks)
    dead = (bias[0, 0] == NEG_INF).all(-1)
    assert out[:, :, ~dead].isfinite().all() and out[:, :, dead].isnan().all() and dq.isfinite().all()
    assert (dk[:, :, 32:] == 0).all() and (dv[:, :, 32:] == 0).all() and (dbias[..., 32:] == 0).all()
    assert dk[:, :, :32].isfinite().all() and dbias.isfinite().all()


def test_sparse_bias_api(monkeypatch):
    """sparse_bias needs a bias; on the tiled path (128 x 128 tile pairs by default) it equals the dense pass."""
    q, k, v = (t.float() for t in random_inputs((1, 2, 300, 16), (1, 2, 290, 16), seed=47))
    with pytest.raises(ValueError, match="sparse_bias"):
        attention_forward(q, k, v, scale=0.25, sparse_bias=True)
    with pytest.raises(ValueError, match="sparse_bias"):
        attention_backward(q, q, k, v, q, q[..., :2], scale=0.25, sparse_bias=True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    visible = torch.rand(3, 3, generator=torch.Generator().manual_seed(48)) < 0.5
    visible[:, 0] = True
    bias = torch.zeros(300, 290).masked_fill(~visible.repeat_interleave(100, 0).repeat_interleave(100, 1)[:300, :290],
                                             NEG_INF)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(49))
    results = []
    for sparse in (False, True):
        out, lse = attention_forward(q, k, v, scale=0.25, bias=bias, causal_offset=40, sparse_bias=sparse)
        grads = attention_backward(grad_out, q, k, v, out, lse, scale=0.25, bias=bias, causal_offset=40,
                                   bias_requires_grad=True, sparse_bias=sparse)
        results.append((out, lse, *grads))
    for dense, sparse in zip(*results, strict=True):
        torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5, equal_nan=True)


# ------------------------------------------------------------------------- ALiBi (from indices)


def alibi_slopes(shape, seed, low=0.05, high=0.6):
    """Random float32 slopes of ``shape`` in [low, high) (float32-exact, so the float64 references use the
    kernels' very slopes)."""
    gen = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(shape, generator=gen, dtype=torch.float32)


def alibi_dead_row_case():
    """A per-head bias (-inf block mask, one fully masked row) read through a block-sparse layout, key
    padding, causal, GQA; symmetric per-head slopes."""
    q, k, v = random_inputs((3, 4, SEQ, 16), (3, 2, SEQ, 16), seed=53)
    bias = block_mask_bias((1, 4, SEQ, SEQ), seed=54)
    bias[..., 9, :] = NEG_INF
    return (q, k, v), dict(bias=bias, bias_grad=True, sparse=True, causal_offset=10,
                           masks=dict(key_valid=padding_mask()), alibi=(alibi_slopes((1, 4), 55), True))


def steep_padded_rows_case():
    """Slopes 4 and 2, 5 queries, 50 keys, a bias hiding the keys j > i + 2 from every query. The 11 padded
    query rows of the interpreter's 16-row tiles read bias 0, so there ``slope * (j - i)`` reaches 176 and
    ``exp`` of it overflows float32 (inf * 0 = NaN in dK, dV) unless the kernels zero the ALiBi term out of
    range, as they do with the bias. (The queries' own scores stay small: an LSE-based backward loses
    ``|S| * 2**-24`` of relative precision on scores of magnitude |S|, as eager's max-subtracted softmax does not.)"""
    q, k, v = random_inputs((1, 2, 5, 16), (1, 2, 50, 16), seed=74)
    visible = torch.arange(50)[None, :] <= torch.arange(5)[:, None] + 2
    bias = torch.zeros(1, 1, 5, 50, dtype=torch.float64).masked_fill(~visible, NEG_INF)
    return (q, k, v), dict(bias=bias, bias_grad=True, alibi=(torch.tensor([[4.0, 2.0]]), False))


ALIBI_CASES = {
    "per_head": lambda: (random_inputs((2, 2, 37, 16), (2, 2, 50, 16), seed=50),
                         dict(alibi=(alibi_slopes((1, 2), 51), False))),
    "symmetric": lambda: (random_inputs((2, 2, 37, 16), (2, 2, 50, 16), seed=52),
                          dict(alibi=(alibi_slopes((1, 2), 53), True))),
    # Given as float64 (float32-exact values): the API converts them.
    "per_batch_head_f64": lambda: (random_inputs((2, 3, 50, 32), (2, 3, 37, 32), seed=56),
                                   dict(alibi=(alibi_slopes((2, 3), 57).double(), False))),
    "per_batch_docs": lambda: (random_inputs((2, 2, SEQ, 16), (2, 2, SEQ, 16), seed=58),
                               dict(alibi=(alibi_slopes((2, 1), 59), True),
                                    masks=dict(q_doc=sorted_docs(), k_doc=sorted_docs()))),
    "causal_bottom_right": lambda: (random_inputs((1, 2, 37, 16), (1, 2, 50, 16), seed=60),
                                    dict(causal_offset=13, alibi=(alibi_slopes((1, 2), 61), False))),
    "window_symmetric": lambda: (random_inputs((2, 2, 61, 16), (2, 2, 61, 16), seed=62),
                                 dict(masks=dict(window=(20, 7)), alibi=(alibi_slopes((1, 2), 63), True))),
    "gqa_grouped_bias": lambda: (random_inputs((2, 4, 29, 32), (2, 2, 41, 32), seed=64),
                                 dict(bias=torch.randn(2, 4, 29, 41, generator=torch.Generator().manual_seed(65),
                                                       dtype=torch.float64),
                                      bias_grad=True, alibi=(alibi_slopes((1, 4), 66), False))),
    "gqa_kv_tiled_causal": lambda: (random_inputs((1, 6, 21, 16), (1, 2, 27, 16), seed=67),
                                    dict(kv_heads_tiled=True, causal_offset=0, alibi=(alibi_slopes((1, 6), 68), False))),
    "sparse_bias_padding_dead_row": alibi_dead_row_case,
    "dropout": lambda: (random_inputs((1, 2, 45, 16), (1, 2, 61, 16), seed=69),
                        dict(dropout_p=0.3, causal_offset=10, alibi=(alibi_slopes((1, 2), 70), False))),
    "sparse_dropout": lambda: (random_inputs((1, 2, 45, 16), (1, 2, 61, 16), seed=43),
                               dict(bias=block_mask_bias((1, 2, 45, 61), 40), sparse=True, dropout_p=0.3,
                                    alibi=(alibi_slopes((1, 2), 71), True))),
    "causal_fp16": lambda: (random_inputs((2, 2, 45, 32), (2, 2, 45, 32), seed=72),
                            dict(causal_offset=0, dtype=torch.float16, alibi=(alibi_slopes((1, 2), 73), False))),
    "steep_symmetric": lambda: (random_inputs((1, 2, 5, 16), (1, 2, 50, 16), seed=74),
                                dict(alibi=(torch.tensor([[4.0, 2.0]]), True))),
    "steep_padded_rows": steep_padded_rows_case,
}


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "tiled"])
@pytest.mark.parametrize("case", list(ALIBI_CASES))
def test_alibi(case, triton):
    """ALiBi slopes computed from indices, alone and with every other feature, forward and backward (dq, dk, dv
    and dbias: the gradient of the bias alone) against the float64 reference with the dense ALiBi bias."""
    (q, k, v), options = ALIBI_CASES[case]()
    dtype = options.pop("dtype", torch.float32)
    check_attention(q, k, v, dtype, triton=triton, block_n=16, **options)


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "tiled"])
def test_alibi_changes_scores_per_head(triton, monkeypatch):
    """Each query head of a GQA group gets its own slope: swapping two heads' slopes swaps their outputs and
    the heads' dK/dV contributions (zero slopes give exactly the plain kernels' results)."""
    if not triton:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = (t.float() for t in random_inputs((1, 2, 20, 16), (1, 1, 33, 16), seed=75))
    q = q[:, :1].expand(1, 2, 20, 16)  # both query heads equal: only their slopes tell them apart
    grad_out = torch.randn(1, 2, 20, 16, generator=torch.Generator().manual_seed(76))
    grad_out = grad_out[:, :1].expand(1, 2, 20, 16)

    def run(slopes):
        out, lse = attention_forward(q, k, v, scale=0.25, alibi_slopes=slopes)
        return out, attention_backward(grad_out, q, k, v, out, lse, scale=0.25, alibi_slopes=slopes)

    out, (dq, dk, dv, _, _) = run(torch.tensor([[0.3, 0.0]]))
    swapped, (dq_s, dk_s, dv_s, _, _) = run(torch.tensor([[0.0, 0.3]]))
    plain, _ = (attention_forward if triton else tiled_forward)(q, k, v, scale=0.25)  # (CPU: dense runs C++)
    assert torch.equal(out[:, 1], plain[:, 1]) and not torch.allclose(out[:, 0], plain[:, 0])
    torch.testing.assert_close(out.flip(1), swapped)
    torch.testing.assert_close(dq.flip(1), dq_s)
    torch.testing.assert_close(dk, dk_s)
    torch.testing.assert_close(dv, dv_s)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_alibi_validation(backward):
    """alibi_slopes must be a float tensor of shape [B or 1, Hq or 1] on q's device."""
    q, k, v = (t.float() for t in random_inputs((2, 4, 5, 16), (2, 2, 7, 16)))

    def call(slopes):
        if backward:
            return attention_backward(q, q, k, v, q, q[..., :2], scale=0.25, alibi_slopes=slopes)
        return attention_forward(q, k, v, scale=0.25, alibi_slopes=slopes)

    bad = [
        (torch.ones(4), r"alibi_slopes must have shape \[2 or 1, 4 or 1\], got \(4,\)"),
        (torch.ones(1, 1, 4), r"must have shape \[2 or 1, 4 or 1\], got \(1, 1, 4\)"),
        (torch.ones(3, 4), r"must have shape \[2 or 1, 4 or 1\], got \(3, 4\)"),
        (torch.ones(2, 2), r"must have shape \[2 or 1, 4 or 1\], got \(2, 2\)"),
        (torch.ones(1, 4, dtype=torch.int64), "alibi_slopes must be a float tensor, got torch.int64"),
        ([[0.5] * 4], "alibi_slopes must be a float tensor, got list"),
        (torch.ones(1, 4, device="meta"), "alibi_slopes must be on cpu, like q, got meta"),
    ]
    for slopes, message in bad:
        with pytest.raises(ValueError, match=message):
            call(slopes)
    for good in (torch.ones(2, 4), torch.ones(1, 1), torch.ones(2, 1, dtype=torch.float16)):
        call(good)


# ------------------------------------------------------- relative-position bias (a vector per j - i)


def rel_vector(shape, seed, scale=1.0):
    """A random float32 relative-position vector of ``shape`` [B or 1, H or 1, Nq + Nk - 1] (float32-exact, so the
    float64 references add the kernels' very values)."""
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def rel_huge_padded_rows_case():
    """5 queries, 50 keys, relative positions j - i > 2 set to 100 and hidden from every query by a -inf bias.
    The 11 padded query rows of the interpreter's 16-row tiles would read 100 at many of their (in-vector)
    indices ``j - i + Nq - 1``, and ``exp`` of it overflows float32 (inf * 0 = NaN in dK, dV), unless the kernels
    read the term as 0 out of range, as they do the bias."""
    q, k, v = random_inputs((1, 2, 5, 16), (1, 2, 50, 16), seed=96)
    rel = rel_vector((1, 2, 54), 97)
    rel[..., 4 + 3:] = 100.0
    visible = torch.arange(50)[None, :] <= torch.arange(5)[:, None] + 2
    bias = torch.zeros(1, 1, 5, 50, dtype=torch.float64).masked_fill(~visible, NEG_INF)
    return (q, k, v), dict(bias=bias, bias_grad=True, rel_bias=rel, rel_grad=True)


REL_CASES = {
    # [1, H, L]: shared by the batch; ragged Nq < Nk.
    "per_head": lambda: (random_inputs((2, 2, 37, 16), (2, 2, 50, 16), seed=80),
                         dict(rel_bias=rel_vector((1, 2, 86), 81), rel_grad=True)),
    # [B, H, L] with Nq > Nk, head dim 32.
    "per_batch_head": lambda: (random_inputs((2, 2, 50, 32), (2, 2, 37, 32), seed=82),
                               dict(rel_bias=rel_vector((2, 2, 86), 83), rel_grad=True)),
    # [B, 1, L] with GQA (grouped), a learned full bias and its gradient.
    "per_batch_gqa_bias": lambda: (random_inputs((2, 4, 29, 16), (2, 2, 41, 16), seed=84),
                                   dict(rel_bias=rel_vector((2, 1, 69), 85), rel_grad=True,
                                        bias=torch.randn(2, 4, 29, 41, generator=torch.Generator().manual_seed(86),
                                                         dtype=torch.float64), bias_grad=True)),
    # Bottom-right causal with Nq != Nk.
    "causal_bottom_right": lambda: (random_inputs((1, 2, 37, 16), (1, 2, 50, 16), seed=87),
                                    dict(causal_offset=13, rel_bias=rel_vector((1, 2, 86), 88), rel_grad=True)),
    # A two-sided window (whole key tiles skipped); the recomputation only, no drel.
    "window_no_grad": lambda: (random_inputs((2, 2, 61, 16), (2, 2, 61, 16), seed=89),
                               dict(masks=dict(window=(20, 7)), rel_bias=rel_vector((1, 2, 121), 90))),
    "window_causal": lambda: (random_inputs((1, 2, 61, 16), (1, 2, 61, 16), seed=89),
                              dict(causal_offset=0, masks=dict(window=(20, 0)), rel_bias=rel_vector((1, 2, 121), 91),
                                   rel_grad=True)),
    # A -inf block-mask bias read through a block-sparse layout (empty, partial and full tiles), a dead row.
    "sparse_bias": lambda: (random_inputs((2, 2, 45, 16), (2, 2, 61, 16), seed=30),
                            dict(bias=dead_row_case()[1]["bias"], bias_grad=True, sparse=True,
                                 rel_bias=rel_vector((2, 2, 105), 92), rel_grad=True)),
    "alibi": lambda: (random_inputs((2, 2, 37, 16), (2, 2, 50, 16), seed=93),
                      dict(alibi=(alibi_slopes((1, 2), 94), True), rel_bias=rel_vector((1, 2, 86), 95), rel_grad=True)),
    "dropout": lambda: (random_inputs((1, 2, 45, 16), (1, 2, 61, 16), seed=98),
                        dict(dropout_p=0.3, causal_offset=16, rel_bias=rel_vector((1, 2, 105), 99), rel_grad=True)),
    "sparse_dropout_alibi": lambda: (random_inputs((1, 2, 45, 16), (1, 2, 61, 16), seed=43),
                                     dict(bias=block_mask_bias((1, 2, 45, 61), 40), sparse=True, dropout_p=0.3,
                                          alibi=(alibi_slopes((1, 2), 71), False),
                                          rel_bias=rel_vector((1, 2, 105), 100), rel_grad=True)),
    "key_padding": lambda: (random_inputs((3, 2, SEQ, 16), (3, 2, SEQ, 16), seed=101),
                            dict(masks=dict(key_valid=padding_mask()), rel_bias=rel_vector((3, 1, 89), 102),
                                 rel_grad=True)),
    "sorted_docs": lambda: (random_inputs((2, 2, SEQ, 16), (2, 2, SEQ, 16), seed=103),
                            dict(masks=dict(q_doc=sorted_docs(), k_doc=sorted_docs()), causal_offset=0,
                                 rel_bias=rel_vector((1, 2, 89), 104), rel_grad=True)),
    "gqa_kv_tiled_causal": lambda: (random_inputs((1, 6, 21, 16), (1, 2, 27, 16), seed=105),
                                    dict(kv_heads_tiled=True, causal_offset=0, rel_bias=rel_vector((1, 6, 47), 106),
                                         rel_grad=True)),
    "causal_fp16": lambda: (random_inputs((2, 2, 45, 32), (2, 2, 45, 32), seed=107),
                            dict(causal_offset=0, dtype=torch.float16, rel_bias=rel_vector((1, 2, 89), 108),
                                 rel_grad=True)),
    "single_query": lambda: (random_inputs((2, 2, 1, 16), (2, 2, 50, 16), seed=109),
                             dict(causal_offset=49, rel_bias=rel_vector((1, 2, 50), 110), rel_grad=True)),
    "huge_padded_rows": rel_huge_padded_rows_case,
}


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "tiled"])
@pytest.mark.parametrize("case", list(REL_CASES))
def test_rel_bias(case, triton):
    """A relative-position vector read at j - i + Nq - 1, alone and with every other feature, forward and backward
    (dq, dk, dv, drel: the gradient of the expanded vector, and dbias) against the float64 reference with its
    dense bias."""
    (q, k, v), options = REL_CASES[case]()
    dtype = options.pop("dtype", torch.float32)
    check_attention(q, k, v, dtype, triton=triton, block_n=16, **options)


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "tiled"])
def test_rel_bias_dtypes_and_zero_grad(triton, monkeypatch):
    """Any float dtype is read as float32 (a bfloat16 vector gives the results of its float32 copy); a zero vector
    gives the plain kernels' results; drel sums to the sum of dS, which is 0 on every row (softmax rows are
    shift-invariant)."""
    if not triton:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = (t.float() for t in random_inputs((1, 2, 20, 16), (1, 2, 33, 16), seed=111))
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(112))
    rel = rel_vector((1, 2, 52), 113).bfloat16()

    def run(rel_bias):
        out, lse = attention_forward(q, k, v, scale=0.25, rel_bias=rel_bias)
        grads = attention_backward(grad_out, q, k, v, out, lse, scale=0.25, rel_bias=rel_bias,
                                   rel_bias_requires_grad=rel_bias is not None)
        return out, grads

    out, grads = run(rel)
    out_f32, grads_f32 = run(rel.float())
    torch.testing.assert_close(out, out_f32, rtol=0, atol=0)
    for grad, grad_f32 in zip(grads[:3], grads_f32[:3], strict=True):
        torch.testing.assert_close(grad, grad_f32, rtol=0, atol=0)
    torch.testing.assert_close(grads[4], grads_f32[4], rtol=1e-5, atol=1e-6)  # atomics: order may differ
    assert grads[4].shape == (1, 2, 52) and grads[4].dtype == torch.float32
    assert grads[4].sum(-1).abs().max() < 1e-4
    zero_out, zero_grads = run(torch.zeros(1, 1, 52))
    plain_out, plain_grads = run(None)
    torch.testing.assert_close(zero_out, plain_out)
    for grad, plain in zip(zero_grads[:3], plain_grads[:3], strict=True):
        torch.testing.assert_close(grad, plain)
    assert plain_grads[4] is None


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "tiled"])
def test_rel_bias_empty_shapes(triton, monkeypatch):
    """No keys: drel is all zeros of shape [B, Hq, Nq - 1]."""
    if not triton:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(2, 2, 5, 16)
    no_keys = q[:, :, :0]
    rel = torch.randn(1, 2, 4)
    out, lse = attention_forward(q, no_keys, no_keys, scale=0.25, rel_bias=rel)
    assert (out == 0).all() and (lse.sum(-1) == NEG_INF).all()
    *_, drel = attention_backward(torch.ones_like(out), q, no_keys, no_keys, out, lse, scale=0.25, rel_bias=rel,
                                  rel_bias_requires_grad=True)
    assert drel.shape == (2, 2, 4) and (drel == 0).all()


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_rel_bias_validation(backward):
    """rel_bias must be a float tensor of shape [B or 1, Hq or 1, Nq + Nk - 1] on q's device; its gradient needs it."""
    q, k, v = (t.float() for t in random_inputs((2, 4, 5, 16), (2, 2, 7, 16)))

    def call(rel, **kwargs):
        if backward:
            return attention_backward(q, q, k, v, q, q[..., :2], scale=0.25, rel_bias=rel, **kwargs)
        return attention_forward(q, k, v, scale=0.25, rel_bias=rel)

    shape = r"rel_bias must have shape \[2 or 1, 4 or 1, 11\] \(the Nq \+ Nk - 1 = 5 \+ 7 - 1 relative positions\)"
    bad = [
        (torch.ones(4, 11), shape + r", got \(4, 11\)"),
        (torch.ones(1, 4, 12), shape + r", got \(1, 4, 12\)"),
        (torch.ones(1, 4, 10), r"got \(1, 4, 10\)"),
        (torch.ones(3, 4, 11), r"got \(3, 4, 11\)"),
        (torch.ones(2, 2, 11), r"got \(2, 2, 11\)"),
        (torch.ones(1, 1, 1, 11), r"got \(1, 1, 1, 11\)"),
        (torch.ones(1, 4, 11, dtype=torch.int64), "rel_bias must be a float tensor, got torch.int64"),
        ([[[0.5] * 11] * 4], "rel_bias must be a float tensor, got list"),
        (torch.ones(1, 4, 11, device="meta"), "rel_bias must be on cpu, like q, got meta"),
    ]
    for rel, message in bad:
        with pytest.raises(ValueError, match=message):
            call(rel)
    for good in (torch.ones(2, 4, 11), torch.ones(1, 1, 11), torch.ones(2, 1, 11, dtype=torch.float16),
                 torch.ones(1, 4, 11, dtype=torch.float64)):
        call(good)


@pytest.mark.parametrize("path", ["triton", "cpu"])
def test_int64_document_ids_beyond_int32_stay_distinct(path):
    """Document ids that differ only above bit 31 are different documents: kept as int64 (no host read of their
    range), never narrowed, on both paths; unsorted ids too (a tile is skipped only when its id ranges do not meet)."""
    from flash_fx.kernels import attention_forward as kernels_forward
    from flash_fx.kernels.spec import AttentionSpec, Documents
    from soundness import kernel_path

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    big = 2**40
    ids = torch.tensor([[big] * 13 + [big + 2**32] * 14 + [big] * 13])  # same low 32 bits, unsorted
    spec = AttentionSpec(0.25, documents=Documents(ids, ids))
    reference = spec.validate(q, k, v).reference(q, k, v)
    with kernel_path(path):
        out, _ = kernels_forward(q, k, v, spec)
    assert spec.validate(q, k, v).documents.q_ids.dtype == torch.int64
    torch.testing.assert_close(out.double(), reference, atol=2e-5, rtol=2e-5)
