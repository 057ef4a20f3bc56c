"""Terms applied in the merged [B*H, Nq, Nk] layout beside a mask in the split [B, H, Nq, Nk] one (BLOOM's
baddbmm ALiBi input then a view and an added mask; DeBERTa-v2's relative bias added before the view): one spec,
the merged term viewed in the split layout; values and gradients equal eager's; and the forms left alone."""

import re

import pytest
import torch
from helpers import capture
from soundness import compare

B, H, N, D = 2, 3, 10, 8


def bloom_like(q, k, v, alibi, valid):
    """q, k, v as [B*H, N, D]; alibi [B*H, 1, N] enters through baddbmm; the mask is added after a view."""
    scores = alibi.baddbmm(q, k.transpose(-1, -2), beta=1.0, alpha=D ** -0.5)
    scores = scores.view(B, H, N, N)
    visible = torch.ones(N, N, dtype=torch.bool).tril() & valid[:, None, None, :]
    scores = scores + torch.where(visible, 0.0, torch.finfo(q.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.bmm(probs.view(B * H, N, N), v)


def deberta_like(q, k, v, rel, valid):
    """A learned [B*H, N, N] bias added in the merged layout, then a view and a masked_fill in the split one."""
    scores = torch.bmm(q, k.transpose(-1, -2)) * D ** -0.5 + rel
    scores = scores.view(-1, H, N, N).masked_fill(~valid[:, None, None, :], torch.finfo(q.dtype).min)
    return torch.bmm(scores.softmax(-1).view(-1, N, N), v)


def inputs(bias_shape):
    torch.manual_seed(0)
    q, k, v = (torch.randn(B * H, N, D, requires_grad=True) for _ in range(3))
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[1, :3] = False
    return q, k, v, torch.randn(bias_shape, requires_grad=True), valid


@pytest.mark.parametrize("path", ["triton", "cpu"])
@pytest.mark.parametrize("fn,bias_shape", [(bloom_like, (B * H, 1, N)), (deberta_like, (B * H, N, N)),
                                           (deberta_like, (1, N, N))], ids=["bloom", "deberta", "shared_bias"])
def test_merged_and_split_terms_make_one_spec(fn, bias_shape, path):
    reports = compare(fn, *inputs(bias_shape), path=path)  # the bias's gradient compared too
    (rewrite,) = [r for report in reports for r in report.rewrites]
    assert "(batch*heads layout)" in rewrite.mask and "key_padding" in rewrite.mask, rewrite.mask


def test_the_merged_term_is_viewed_in_the_split_layout():
    captured = capture(bloom_like, *inputs((B * H, 1, N)))
    assert captured.variants == ["bias"], captured.skip_reasons
    assert re.search(r"= l_alibi_\.reshape\(2, 3, size_\d+, size_\d+\)", captured.after), captured.after


def merged_mask(q, k, v, alibi, valid):
    """A boolean mask applied in the merged layout beside a split one: left alone."""
    scores = (q @ k.transpose(-1, -2)).masked_fill(alibi < 0, float("-inf"))
    scores = scores.view(B, H, N, N).masked_fill(~valid[:, None, None, :], float("-inf"))
    return scores.softmax(-1).view(B * H, N, N) @ v


def test_a_mask_in_the_merged_layout_is_left_alone():
    captured = capture(merged_mask, *inputs((B * H, N, N)))
    reason = "mask is applied in the merged batch*heads layout"
    assert captured.variants == [] and any(reason in r for r in captured.skip_reasons), captured.skip_reasons
