"""A value head dim different from the query/key head dim (DeepSeek's MLA: 192 / 128; wider values too): the kernels
on both paths against the spec's float64 reference forward and backward, and compiled programs against eager."""

import pytest
import torch
from flash_fx.kernels.spec import AttentionSpec, Band, FilledRows, Saved
from soundness import compare, kernel_path

from flash_fx import kernels

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.mark.parametrize("path", ["triton", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim,value_dim", [(24, 16), (12, 40)], ids=["mla_narrow_values", "wide_values"])
@pytest.mark.parametrize("masks", ["causal_gqa", "padding_completed_rows"])
def test_kernels_match_the_float64_reference(masks, head_dim, value_dim, dtype, path):
    g = torch.Generator().manual_seed(0)
    shapes = ((2, 4, 19, head_dim), (2, 2, 23, head_dim), (2, 2, 23, value_dim))
    q, k, v = (torch.randn(s, generator=g).to(dtype) for s in shapes)
    if masks == "causal_gqa":
        spec = AttentionSpec(head_dim ** -0.5, band=Band(None, 4))
    else:
        valid = torch.ones(2, 23, dtype=torch.bool)
        valid[1, :9] = False
        spec = AttentionSpec(head_dim ** -0.5, band=Band(None, 0), key_valid=valid, excluded_fill=-3e38,
                             filled_rows=FilledRows(-3e38, added=True))
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = spec.validate(*leaves).reference(*leaves)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = torch.autograd.grad(ref, leaves, grad_out)
    with kernel_path(path):
        out, lse = kernels.attention_forward(q, k, v, spec)
        grads = kernels.attention_backward(grad_out.to(dtype), Saved(q, k, v, out, lse), spec)
    assert out.shape == (2, 4, 19, value_dim)
    tolerance = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), ref.detach(), atol=tolerance, rtol=tolerance)
    for name, mine, want in zip(["dq", "dk", "dv"], grads[:3], expected, strict=True):
        assert mine.shape == want.shape, name
        error = float((mine.double() - want).abs().max()) / float(want.abs().max())
        assert error < tolerance * 10, (name, error)


def mla_attention(q_nope, q_rope, k_nope, k_rope, v):
    """DeepSeek's eager MLA attention: q and k concatenated from a plain and a rotary part (192 = 128 + 64 in
    DeepSeek V3; here 16 + 8), values of another width (16), causal."""
    q = torch.cat([q_nope, q_rope], dim=-1)
    k = torch.cat([k_nope, k_rope.expand(-1, q.shape[1], -1, -1)], dim=-1)
    n = q.shape[-2]
    scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


@pytest.mark.parametrize("path", ["triton", "cpu"])
def test_compiled_mla_equals_eager(path):
    torch.manual_seed(0)
    shapes = ((2, 3, 10, 16), (2, 3, 10, 8), (2, 3, 10, 16), (2, 1, 10, 8), (2, 3, 10, 16))
    inputs = [torch.randn(s, requires_grad=True) for s in shapes]
    reports = compare(mla_attention, *inputs, path=path)
    (rewrite,) = [r for report in reports for r in report.rewrites]
    assert rewrite.variant == "causal" and rewrite.q_shape[-1] == 24 and rewrite.v_shape[-1] == 16
