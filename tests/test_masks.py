"""Masks decide the kernel: structural masks are recognized (with proofs) and evaluated in the kernel from
indices, key validity or document ids; everything else stays a dense bias. Each case: the variant, the
report's mask description, a snapshot where the graph shape matters, and compiled-vs-eager values and grads."""

import pytest
import torch
from expecttest import TestCase
from flash_fx.patterns.masks import Band, _band_of
from helpers import capture, compiled_matches_eager

B, H, N, D = 2, 2, 12, 8


def qkv(n=N):
    torch.manual_seed(3)
    return [torch.randn(B, H, n, D, requires_grad=True) for _ in range(3)]


def indices(n):
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    return i, j


def sliding_window_causal(q, k, v):
    i, j = indices(q.size(-2))
    visible = (j <= i) & (i - j < 4)
    return (q @ k.mT * 0.3).masked_fill(~visible, float("-inf")).softmax(-1) @ v


def two_sided_window(q, k, v):
    i, j = indices(q.size(-2))
    hidden = (j > i + 2) | (j < i - 3)
    return (q @ k.mT * 0.3).masked_fill(hidden, float("-inf")).softmax(-1) @ v


def additive_causal(q, k, v):
    i, j = indices(q.size(-2))
    bias = torch.where(j <= i, 0.0, torch.finfo(q.dtype).min)
    return (q @ k.mT * 0.3 + bias).softmax(-1) @ v


def key_padding(q, k, v, attention_mask):
    hidden = attention_mask[:, None, None, :] == 0
    return (q @ k.mT * 0.3).masked_fill(hidden, float("-inf")).softmax(-1) @ v


def key_padding_finite_fill(q, k, v, attention_mask):
    hidden = attention_mask[:, None, None, :] == 0
    return (q @ k.mT * 0.3).masked_fill(hidden, torch.finfo(q.dtype).min).softmax(-1) @ v


def causal_and_padding_in_graph(q, k, v, attention_mask):
    """The shape of transformers' in-graph mask: aranges, a gather of the padding mask, AND, where, add."""
    n = q.size(-2)
    batch = torch.arange(q.size(0))[:, None, None, None]
    q_idx = torch.arange(n)[None, None, :, None]
    kv_idx = torch.arange(n)[None, None, None, :]
    visible = q_idx.new_ones((), dtype=torch.bool) & (kv_idx <= q_idx) & attention_mask.bool()[batch, kv_idx]
    mask = torch.where(visible.expand(q.size(0), -1, n, n), torch.zeros(()), float("-inf"))
    return (q @ k.mT * 0.3 + mask).softmax(-1) @ v


def documents(q, k, v, seq_ids):
    same = seq_ids[:, None, :, None] == seq_ids[:, None, None, :]
    return (q @ k.mT * 0.3).masked_fill(~same, float("-inf")).softmax(-1) @ v


def documents_causal(q, k, v, seq_ids):
    i, j = indices(q.size(-2))
    visible = (seq_ids[:, None, :, None] == seq_ids[:, None, None, :]) & (j <= i)
    return (q @ k.mT * 0.3).masked_fill(~visible, torch.finfo(q.dtype).min).softmax(-1) @ v


class RandomStaticMask(torch.nn.Module):
    """A constant mask held in a buffer that is no band: it stays a dense bias."""

    def __init__(self):
        super().__init__()
        hidden = torch.rand(N, N, generator=torch.Generator().manual_seed(0)) < 0.3
        hidden[:, 0] = False
        self.register_buffer("hidden", hidden)

    def forward(self, q, k, v):
        return (q @ k.mT).masked_fill(self.hidden, float("-inf")).softmax(-1) @ v


def padding_mask():
    mask = torch.ones(B, N, dtype=torch.long)
    mask[1, -5:] = 0
    return mask


def packed_ids():
    return torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [0] * 7 + [1] * 5])


class MaskVariantsTest(TestCase):
    def check(self, fn, inputs, variant, mask, expected_graph=None):
        captured = capture(fn, *inputs)
        self.assertEqual(captured.variants, [variant], captured.skip_reasons)
        (rewrite,) = [r for report in captured.reports for r in report.rewrites]
        self.assertIn(mask, rewrite.mask)
        if expected_graph is not None:
            self.assertExpectedInline(captured.after, expected_graph, skip=1)
        compiled_matches_eager(fn, *inputs)

    def test_sliding_window_causal(self):
        self.check(sliding_window_causal, qkv(), "sliding_window", "sliding_window(left=3, right=0)", """\
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    attention_default = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, None, 0.3, 0, window = [3, 0])
    getitem = attention_default[0]
    return (getitem,)
""")

    def test_two_sided_window(self):
        self.check(two_sided_window, qkv(), "sliding_window", "sliding_window(left=3, right=2)")

    def test_additive_causal(self):
        self.check(additive_causal, qkv(), "causal", "causal")

    def test_key_padding(self):
        self.check(key_padding, [*qkv(), padding_mask()], "key_padding", "key_padding", """\
def forward(self, L_attention_mask_ : torch.Tensor, L_k_ : torch.Tensor, L_q_ : torch.Tensor, L_v_ : torch.Tensor):
    l_attention_mask_ = L_attention_mask_
    l_k_ = L_k_
    l_q_ = L_q_
    l_v_ = L_v_
    getitem = l_attention_mask_[(slice(None, None, None), None, None, slice(None, None, None))]
    hidden = getitem == 0
    size = l_q_.size(0)
    getitem_1 = hidden[(slice(None, None, None), 0, 0, slice(None, None, None))]
    expand = getitem_1.expand(size, -1)
    invert = ~expand
    attention_default = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, None, 0.3, None, key_valid = invert)
    getitem_2 = attention_default[0]
    return (getitem_2,)
""")

    def test_key_padding_with_finite_fill_stays_dense(self):
        captured = capture(key_padding_finite_fill, *qkv(), padding_mask())
        self.assertEqual(captured.variants, ["bias"])
        self.assertIn("finite fill", captured.reports[0].rewrites[0].mask)
        compiled_matches_eager(key_padding_finite_fill, *qkv(), padding_mask())

    def test_causal_and_padding_in_graph(self):
        self.check(causal_and_padding_in_graph, [*qkv(), padding_mask()], "key_padding", "causal & key_padding")

    def test_documents(self):
        self.check(documents, [*qkv(), packed_ids()], "document", "document", """\
def forward(self, L_seq_ids_ : torch.Tensor, L_k_ : torch.Tensor, L_q_ : torch.Tensor, L_v_ : torch.Tensor):
    l_seq_ids_ = L_seq_ids_
    l_k_ = L_k_
    l_q_ = L_q_
    l_v_ = L_v_
    getitem = l_seq_ids_[(slice(None, None, None), None, slice(None, None, None), None)]
    getitem_1 = l_seq_ids_[(slice(None, None, None), None, None, slice(None, None, None))]
    size = l_q_.size(0)
    getitem_2 = getitem[(slice(None, None, None), 0, slice(None, None, None), 0)]
    expand = getitem_2.expand(size, -1)
    getitem_3 = getitem_1[(slice(None, None, None), 0, 0, slice(None, None, None))]
    expand_1 = getitem_3.expand(size, -1)
    attention_default = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, None, 0.3, None, q_doc = expand, k_doc = expand_1)
    getitem_4 = attention_default[0]
    return (getitem_4,)
""")

    def test_documents_causal_finite_fill(self):
        self.check(documents_causal, [*qkv(), packed_ids()], "document", "causal & document")

    def test_random_static_mask_is_dense(self):
        model = RandomStaticMask()
        captured = capture(model, *qkv())
        self.assertEqual(captured.variants, ["bias"])
        self.assertIn("not a causal or sliding-window band", captured.reports[0].rewrites[0].mask)
        compiled_matches_eager(model, *qkv())

    def test_dynamic_window_one_graph(self):
        import flash_fx

        flash_fx.clear_reports()
        torch._dynamo.reset()
        compiled = torch.compile(sliding_window_causal, backend="flash_fx", dynamic=True,
                                 options={"inner": "eager", "report": False})
        for n in (7, 13, 20):
            q, k, v = qkv(n)
            torch.testing.assert_close(compiled(q, k, v), sliding_window_causal(q, k, v), atol=2e-5, rtol=2e-5)
        self.assertEqual([[r.variant for r in rep.rewrites] for rep in flash_fx.reports()], [["sliding_window"]])
        torch._dynamo.reset()


@pytest.mark.parametrize("spec", [Band(None, 0), Band(None, 2), Band(None, -3), Band(4, 0), Band(2, 3), Band(5, None)])
def test_band_round_trip(spec):
    assert _band_of(spec.materialize(13, 13)) == spec


def test_not_a_band():
    visible = Band(None, 0).materialize(6, 6)
    visible[4, 1] = False
    assert _band_of(visible) is None


def test_report_tile_density():
    """The report gives the fraction of tiles the kernels visit (GPU tile sizes), and the cost uses it."""
    q = torch.randn(1, 1, 1024, 16)
    (window,) = capture(sliding_window_causal, q, q, q).reports[0].rewrites
    (causal,) = capture(additive_causal, q, q, q).reports[0].rewrites
    assert window.tile_density < 0.25 < 0.45 < causal.tile_density < 0.6
    assert window.hbm_after < causal.hbm_after
    assert "tiles" in str(capture(additive_causal, q, q, q).reports[0])
