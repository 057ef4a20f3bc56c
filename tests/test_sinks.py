"""Attention sinks (kernels.sinks): a logit per (batch row, head, query row) that joins the softmax without a value,
as gpt-oss writes it (`cat([scores, sinks], -1)`, a row-max subtraction, softmax, `[..., :-1]`): the kernels against
the spec's float64 reference forward and backward (the sink logits' gradient included) on both paths, compiled
programs against eager, and the forms left alone."""

import pytest
import torch
from flash_fx.kernels.sinks import sink_grad
from flash_fx.kernels.spec import AttentionSpec, Band, Dropout, Saved
from helpers import capture
from soundness import compare, kernel_path

from flash_fx import kernels

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.mark.parametrize("path", ["triton", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["per_head_causal_padding", "per_row_window", "no_keys"])
def test_kernels_match_the_float64_reference(case, dtype, path):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, generator=g).to(dtype) for s in ((2, 4, 19, 16), (2, 2, 23, 16), (2, 2, 23, 16)))
    valid = torch.ones(2, 23, dtype=torch.bool)
    valid[1, :9] = False  # with the causal band, batch row 1's first rows see no key: all weight on the sink
    if case == "per_head_causal_padding":
        sinks = torch.randn(1, 4, 1, generator=g)
        spec = AttentionSpec(0.5, band=Band(None, 0), key_valid=valid, sinks=sinks)
    elif case == "per_row_window":
        sinks = torch.randn(2, 4, 19, generator=g) * 2
        spec = AttentionSpec(0.5, band=Band(5, 0), kv_heads_tiled=True, sinks=sinks)
    else:
        sinks = torch.randn(1, 4, 1, generator=g)
        spec = AttentionSpec(0.5, key_valid=torch.zeros(2, 23, dtype=torch.bool), sinks=sinks)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    wide_sinks = sinks.double().requires_grad_()
    validated = spec.validate(*leaves).replace(sinks=wide_sinks.expand(2, 4, 19))  # (validation detaches)
    ref = validated.reference(*leaves)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = torch.autograd.grad(ref, [*leaves, wide_sinks], grad_out)

    with kernel_path(path):
        out, lse = kernels.attention_forward(q, k, v, spec)
        dq, dk, dv, _, _ = kernels.attention_backward(grad_out.to(dtype), Saved(q, k, v, out, lse), spec)
    dsinks = sink_grad(grad_out.to(dtype), out, lse, sinks.expand(2, 4, 19)).sum_to_size(sinks.shape)
    assert not out.isnan().any()
    tolerance = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), ref.detach(), atol=tolerance, rtol=tolerance)
    for name, mine, want in zip(["dq", "dk", "dv", "dsinks"], [dq, dk, dv, dsinks], expected, strict=True):
        error = float((mine.double() - want).abs().max()) / max(float(want.abs().max()), 1e-3)
        assert error < tolerance * 10, (name, error)


def test_dropout_with_sinks_matches_its_keep_mask():
    """Dropout of the probabilities (sink excluded) keeps the sink's share of the denominator."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 17, 8, generator=g) for _ in range(3))
    sinks = torch.randn(1, 2, 1, generator=g)
    spec = AttentionSpec(0.4, band=Band(None, 0), sinks=sinks, dropout=Dropout(0.3, seed=7))
    with kernel_path("triton"):
        out, _ = kernels.attention_forward(q, k, v, spec)
    ref = spec.validate(q, k, v).reference(q, k, v)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def gpt_oss_attention(q, k, v, sinks, valid):
    """gpt-oss's eager attention: scores plus an additive causal & padding mask, the sink column, a row-max
    subtraction, softmax, the sink column dropped."""
    n = q.shape[-2]
    visible = torch.ones(n, n, dtype=torch.bool).tril() & valid[:, None, None, :]
    scores = torch.matmul(q, k.transpose(2, 3)) * 0.35
    scores = scores + torch.where(visible, 0.0, torch.finfo(q.dtype).min)
    column = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, n, -1)
    combined = torch.cat([scores, column], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = torch.softmax(combined, dim=-1, dtype=combined.dtype)
    return torch.matmul(probs[..., :-1], v)


def inputs():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, requires_grad=True) for _ in range(3))
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :4] = False
    return q, k, v, torch.randn(3, requires_grad=True), valid


@pytest.mark.parametrize("path", ["triton", "cpu"])
def test_compiled_sinks_equal_eager(path):
    reports = compare(gpt_oss_attention, *inputs(), path=path)  # the sink logits' gradient compared too
    (rewrite,) = [r for report in reports for r in report.rewrites]
    assert rewrite.variant == "key_padding" and "attention sinks" in rewrite.notes, (rewrite.variant, rewrite.notes)
    assert not [s for report in reports for s in report.skipped]


def sink_kept(q, k, v, sinks, valid):
    combined = torch.cat([q @ k.transpose(2, 3), sinks.reshape(1, -1, 1, 1).expand(2, -1, 10, -1)], dim=-1)
    return torch.softmax(combined, -1)[..., 1:] @ torch.cat([v[:, :, :1], v], 2)[:, :, 1:]


def scaled_after_sink(q, k, v, sinks, valid):
    combined = torch.cat([q @ k.transpose(2, 3), sinks.reshape(1, -1, 1, 1).expand(2, -1, 10, -1)], dim=-1) * 2.0
    return torch.softmax(combined, -1)[..., :-1] @ v


@pytest.mark.parametrize("fn,reason", [
    (sink_kept, "probabilities go to getitem"),
    (scaled_after_sink, "after the sink logits are appended"),
], ids=["other_column_dropped", "scaled_after_the_sink"])
def test_sink_forms_left_alone(fn, reason):
    captured = capture(fn, *inputs())
    assert captured.variants == [] and any(reason in r for r in captured.skip_reasons), captured.skip_reasons
