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


def documents_not_equal_causal(q, k, v, seq_ids):
    i, j = indices(q.size(-2))
    hidden = (seq_ids[:, None, :, None] != seq_ids[:, None, None, :]) | (j > i)
    return (q @ k.mT * 0.3).masked_fill(hidden, float("-inf")).softmax(-1) @ v


class RandomStaticMask(torch.nn.Module):
    """A constant mask held in a buffer that is no band: a constant block layout."""

    def __init__(self, n=N):
        super().__init__()
        hidden = torch.rand(n, n, generator=torch.Generator().manual_seed(0)) < 0.3
        hidden[:, 0] = False
        self.register_buffer("hidden", hidden)

    def forward(self, q, k, v):
        return (q @ k.mT).masked_fill(self.hidden, float("-inf")).softmax(-1) @ v


class BlockLayoutMask(torch.nn.Module):
    """A BigBird-like layout in a buffer: blocks of `block` keys visible per block of queries (diagonal, first
    block, a random block), hidden with a finite fill; empty, full and partial 16 x 16 tiles at n=44."""

    def __init__(self, n=44, block=8, fill=float("-inf")):
        super().__init__()
        blocks = -(-n // block)
        layout = torch.eye(blocks, dtype=torch.bool)
        layout[:, 0] = True
        layout[torch.arange(blocks), torch.randint(0, blocks, (blocks,), generator=torch.Generator().manual_seed(1))] = True
        visible = layout.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :n]
        self.register_buffer("visible", visible)
        self.fill = fill

    def forward(self, q, k, v):
        bias = torch.zeros(self.visible.shape).masked_fill(~self.visible, self.fill)
        return torch.softmax(q @ k.transpose(-1, -2) / 4.0 + bias, dim=-1) @ v


def prefix_lm(q, k, v, prefix=5):
    """Bidirectional over the first `prefix` keys, causal after: computed from shapes, not a band."""
    i, j = indices(q.size(-2))
    visible = (j <= i) | (j < prefix)
    return (q @ k.mT * 0.3).masked_fill(~visible, float("-inf")).softmax(-1) @ v


def data_mask(q, k, v, visible):
    """A mask that is model input of full [B, 1, Nq, Nk] shape: only the run time knows its tiles."""
    return (q @ k.mT * 0.3).masked_fill(~visible, float("-inf")).softmax(-1) @ v


def padding_mask():
    mask = torch.ones(B, N, dtype=torch.long)
    mask[1, -5:] = 0
    return mask


def packed_ids():
    return torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [0] * 7 + [1] * 5])


class MaskVariantsTest(TestCase):
    def check(self, fn, inputs, variant, mask, expected_graph=None, **options):
        captured = capture(fn, *inputs, **options)
        self.assertEqual(captured.variants, [variant], captured.skip_reasons)
        (rewrite,) = [r for report in captured.reports for r in report.rewrites]
        self.assertIn(mask, rewrite.mask)
        if expected_graph is not None:
            self.assertExpectedInline(captured.after, expected_graph, skip=1)
        compiled_matches_eager(fn, *inputs, **options)

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
    getitem_1 = hidden[(slice(None, None, None), 0, 0, slice(None, None, None))]
    invert = ~getitem_1
    attention_default = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, None, 0.3, None, key_valid = invert)
    getitem_2 = attention_default[0]
    return (getitem_2,)
""")

    def test_key_padding_with_finite_fill_is_proved_per_call(self):
        # masked_fill replaces the hidden scores: key padding, its finite fill proved negligible at each call
        captured = capture(key_padding_finite_fill, *qkv(), padding_mask())
        self.assertEqual(captured.variants, ["key_padding"])
        self.assertIn("excluded_fill", captured.after)
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
    getitem_2 = getitem[(slice(None, None, None), 0, slice(None, None, None), 0)]
    getitem_3 = getitem_1[(slice(None, None, None), 0, 0, slice(None, None, None))]
    attention_default = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, None, 0.3, None, q_doc = getitem_2, k_doc = getitem_3)
    getitem_4 = attention_default[0]
    return (getitem_4,)
""")

    def test_documents_causal_finite_fill(self):
        self.check(documents_causal, [*qkv(), packed_ids()], "document", "causal & document")

    def test_documents_written_with_not_equal(self):
        self.check(documents_not_equal_causal, [*qkv(), packed_ids()], "document", "causal & document")

    def test_random_static_mask_keeps_the_bias(self):
        # a random mask hides a few entries of every tile: no tile is empty, so the cost model keeps the plain bias
        q = torch.randn(1, 2, 256, 16)
        for captured in (capture(RandomStaticMask(n=256), q, q, q), capture(RandomStaticMask(), *qkv())):
            self.assertEqual(captured.variants, ["bias"])
            (rewrite,) = captured.reports[0].rewrites
            self.assertIn("constant mask", rewrite.mask)
            self.assertIn("block layout not used: the mask empties no tile", rewrite.notes)
            self.assertNotIn("sparse_bias", captured.after)
        compiled_matches_eager(RandomStaticMask(), *qkv())

    def test_block_layout_buffer(self):
        # 16 x 16 tiles (the interpreter's) give the layout empty, full and partial tiles at N = 44; at the cost
        # model's GPU tiles N = 44 is one tile, where the layout would not pay (see test_cost)
        for fill in (float("-inf"), torch.finfo(torch.float32).min):
            model = BlockLayoutMask(fill=fill)
            self.check(model, qkv(44), "block_sparse", "constant mask[44x44] (block layout)", tiles=(16, 16))

    def test_prefix_lm_is_block_sparse(self):
        self.check(prefix_lm, qkv(44), "block_sparse", "prefix_lm(prefix=5)[44x44] (block layout)", """\
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    arange = torch.arange(44)
    i = arange[(slice(None, None, None), None)]
    arange_1 = torch.arange(44)
    j = arange_1[(None, slice(None, None, None))]
    le = j <= i
    lt = j < 5
    visible = le | lt
    invert = ~visible
    where = torch.where(invert, -inf, 0.0)
    attention_default = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, where, 0.3, None, sparse_bias = True)
    getitem = attention_default[0]
    return (getitem,)
""", tiles=(16, 16))

    def test_data_mask_is_bias_with_run_time_tiles(self):
        visible = torch.rand(B, 1, N, N, generator=torch.Generator().manual_seed(2)) < 0.6
        visible[..., 0] = True
        captured = capture(data_mask, *qkv(), visible)
        self.assertEqual(captured.variants, ["bias"])
        (rewrite,) = captured.reports[0].rewrites
        self.assertIsNone(rewrite.tile_density)
        self.assertIn("empty tiles skipped at run time", rewrite.mask)
        self.assertIn("run time", str(captured.reports[0]))
        self.assertIn("sparse_bias = True", captured.after)
        compiled_matches_eager(data_mask, *qkv(), visible)

    def test_genuine_bias_is_not_sparse(self):
        bias = torch.randn(1, 1, N, N)
        captured = capture(lambda q, k, v, b: torch.softmax(q @ k.mT + b, -1) @ v, *qkv(), bias)
        self.assertEqual(captured.variants, ["bias"])
        self.assertNotIn("sparse_bias", captured.after)

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


def test_constant_layout_density():
    """A constant layout's density comes from its tiles at the tile sizes the kernels launch with on the card, and
    lowers the predicted bytes (head dim 64: re-reading K and V per query tile costs more than the layout's pass)."""
    n = 1024
    q = torch.randn(1, 1, n, 64)
    model = BlockLayoutMask(n=n, block=128)
    (sparse,) = capture(model, q, q, q).reports[0].rewrites
    everything = BlockLayoutMask(n=n, block=128)
    everything.visible.fill_(True)
    everything.visible[5, 3] = False  # one hidden key (not a band): every tile stays visited
    (dense,) = capture(everything, q, q, q).reports[0].rewrites
    assert sparse.variant == "block_sparse" and dense.variant == "bias" and dense.tile_density == 1.0
    # 128-key blocks align with the launch tiles (64 x 32): the density is the fraction of visible blocks (about 1/3)
    assert sparse.tile_density == pytest.approx(model.visible[::128, ::128].float().mean().item())
    assert sparse.tile_density < 0.4
    assert sparse.hbm_after < dense.hbm_after


def test_report_tile_density():
    """The report gives the fraction of tiles the kernels visit (GPU tile sizes), and the cost uses it."""
    q = torch.randn(1, 1, 1024, 16)
    (window,) = capture(sliding_window_causal, q, q, q).reports[0].rewrites
    (causal,) = capture(additive_causal, q, q, q).reports[0].rewrites
    assert window.tile_density < 0.25 < 0.45 < causal.tile_density < 0.6
    assert window.hbm_after < causal.hbm_after
    assert "tiles" in str(capture(additive_causal, q, q, q).reports[0])
