"""What must never be rewritten: each case leaves the graph unchanged and reports why."""

import torch
import torch.nn.functional as F
from helpers import capture
from torch import nn

B, H, N, D = 2, 2, 8, 4


def inputs():
    torch.manual_seed(1)
    return [torch.randn(B, H, N, D) for _ in range(3)]


def assert_unchanged(fn, reason_part, *args):
    captured = capture(fn, *(args or inputs()))
    assert captured.after == captured.before
    assert captured.variants == []
    assert any(reason_part in reason for reason in captured.skip_reasons), captured.skip_reasons


def test_scores_returned():
    def fn(q, k, v):
        scores = q @ k.transpose(-2, -1)
        return scores.softmax(-1) @ v, scores

    assert_unchanged(fn, "scores")


def test_scaled_scores_reused():
    def fn(q, k, v):
        scores = (q @ k.transpose(-2, -1)) * 0.5
        return scores.softmax(-1) @ v + scores.sum()

    assert_unchanged(fn, "also used outside the attention")


def test_probabilities_returned():
    def fn(q, k, v):
        probs = F.softmax(q @ k.transpose(-2, -1), dim=-1)
        return probs @ v, probs

    assert_unchanged(fn, "probabilities")


def test_probabilities_saved_by_hook():
    saved = []

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.softmax = nn.Softmax(dim=-1)
            self.softmax.register_forward_hook(lambda module, args, out: saved.append(out))

        def forward(self, q, k, v):
            return self.softmax(q @ k.transpose(-2, -1)) @ v

    assert_unchanged(Attention(), "probabilities")


def test_softmax_over_query_axis():
    def fn(q, k, v):
        return (q @ k.transpose(-2, -1)).softmax(dim=-2) @ v

    assert_unchanged(fn, "not the key axis")


def test_softmax_over_heads_positive_index():
    def fn(q, k, v):
        return (q @ k.transpose(-2, -1)).softmax(dim=1) @ v

    assert_unchanged(fn, "not the key axis")


def test_dropout_that_drops_everything():
    def fn(q, k, v):
        return F.dropout(F.softmax(q @ k.transpose(-2, -1), dim=-1), p=1.0, training=True) @ v

    assert_unchanged(fn, "not in [0, 1)")


def test_two_dropouts():
    def fn(q, k, v):
        probs = F.dropout(F.softmax(q @ k.transpose(-2, -1), dim=-1), p=0.1, training=True)
        return F.dropout(probs, p=0.2, training=True) @ v

    assert_unchanged(fn, "two dropouts")


def test_softmax_without_matmul():
    def fn(q, k, v):
        return (q + k).softmax(-1) * v

    assert_unchanged(fn, "not from a Q @ K^T product")


def test_probabilities_not_multiplied_by_v():
    def fn(q, k, v):
        return (q @ k.transpose(-2, -1)).softmax(-1).sum(-1)

    assert_unchanged(fn, "not to a P @ V product")


def test_float64():
    assert_unchanged(lambda q, k, v: (q @ k.mT).softmax(-1) @ v, "dtype torch.float64",
                     *[x.double() for x in inputs()])


def test_head_dim_over_256():
    q = torch.randn(1, 1, 4, 300)
    assert_unchanged(lambda q, k, v: (q @ k.mT).softmax(-1) @ v, "head dim 300", q, q, q)


def test_value_head_dim_over_256():
    """A value head dim may differ from q's and k's (tests/test_value_dim.py), up to the kernels' limit: MLA's
    absorbed latent form (q/k 64, v 512) is beyond it."""
    q, k = torch.randn(1, 2, 4, 64), torch.randn(1, 2, 6, 64)
    v = torch.randn(1, 2, 6, 512)
    assert_unchanged(lambda q, k, v: (q @ k.mT).softmax(-1) @ v, "head dim 512 is over 256", q, k, v)


def test_masked_fill_with_ordinary_value():
    def fn(q, k, v):
        mask = torch.triu(torch.ones(N, N, dtype=torch.bool), 1)
        return (q @ k.mT).masked_fill(mask, 0.0).softmax(-1) @ v

    assert_unchanged(fn, "not a mask fill")


def test_variant_not_allowed():
    def fn(q, k, v):
        mask = torch.triu(torch.ones(N, N, dtype=torch.bool), 1)
        return (q @ k.mT).masked_fill(mask, float("-inf")).softmax(-1) @ v

    captured = capture(fn, *inputs(), variants=["dense"])
    assert captured.variants == [] and captured.after == captured.before
    assert any("not in the allowed variants" in r for r in captured.skip_reasons)


def test_pv_contracting_the_query_axis():
    def fn(q, k, v):
        probs = (q @ k.transpose(-2, -1)).softmax(-1)
        return probs.transpose(-2, -1) @ v

    assert_unchanged(fn, "not to a P @ V product")


def test_non_scalar_scale():
    def fn(q, k, v, temperature):
        return ((q @ k.transpose(-2, -1)) * temperature).softmax(-1) @ v

    # a per-query temperature (a per-head one is a score modification: tests/test_score_mods.py)
    assert_unchanged(fn, "non-scalar tensor", *inputs(), torch.rand(B, H, N, 1) + 0.5)


def test_mask_that_widens_the_scores():
    def fn(q, k, v, bias):
        return ((q @ k.transpose(-2, -1)) + bias).softmax(-1) @ v

    captured = capture(fn, *inputs(), torch.randn(3, B, H, N, N))
    assert captured.after == captured.before and captured.variants == []
    assert any("does not broadcast to the scores" in r for r in captured.skip_reasons), captured.skip_reasons


def test_attention_weights_returned_hint():
    def fn(q, k, v):
        weights = (q @ k.transpose(-2, -1)).softmax(-1)
        return weights @ v, weights

    assert_unchanged(fn, "output_attentions=False")


def test_complex_operands():
    def fn(q, k, v):
        scores = (q @ k.transpose(-2, -1)).real
        return scores.softmax(-1) @ v.real

    q = torch.randn(B, H, N, D, dtype=torch.complex64)
    assert_unchanged(fn, "not from a Q @ K^T product", q, q, q)
