"""ALiBi position biases are computed in the kernels from indices: recognition (with its proof), the
variants it leaves, what stays a dense bias, and compiled-vs-eager values and gradients."""

import math

import pytest
import torch
from expecttest import TestCase
from flash_fx.patterns.positions import PositionForm, position_form
from helpers import capture, compiled_matches_eager

B, H, N, D = 2, 4, 21, 8


def qkv(n=N):
    torch.manual_seed(5)
    return [torch.randn(B, H, n, D, requires_grad=True) for _ in range(3)]


def alibi_slopes(heads):
    return torch.tensor([2 ** (-8 * (h + 1) / heads) for h in range(heads)])


class CausalAlibi(torch.nn.Module):
    """The ALiBi paper's decoder: scores + slope[h] * (j - i), causal mask."""

    def __init__(self):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(H))

    def forward(self, q, k, v):
        n = q.size(-2)
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        bias = self.slopes[:, None, None] * (j - i)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)) + bias
        scores = scores.masked_fill(j > i, float("-inf"))
        return scores.softmax(-1) @ v


class SymmetricAlibi(torch.nn.Module):
    """An encoder's ALiBi: -slope[h] * |j - i| (no mask), slopes of shape [1, H, 1, 1]."""

    def __init__(self):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(H).view(1, H, 1, 1))

    def forward(self, q, k, v):
        n = q.size(-2)
        distance = (torch.arange(n)[None, :] - torch.arange(n)[:, None]).abs()
        bias = -distance * self.slopes
        return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * q.size(-1) ** -0.5 + bias, dim=-1) @ v


class AlibiSummedWithMask(CausalAlibi):
    """ALiBi and a causal mask summed into one bias before the scores (as Falcon-style code does)."""

    def forward(self, q, k, v):
        n = q.size(-2)
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        bias = self.slopes[:, None, None] * (j - i) + torch.where(j <= i, 0.0, torch.finfo(q.dtype).min)
        return torch.softmax(q @ k.transpose(-2, -1) * 0.3 + bias, dim=-1) @ v


class LearnedSlopes(CausalAlibi):
    def __init__(self):
        super().__init__()
        del self.slopes
        self.slopes = torch.nn.Parameter(alibi_slopes(H))


class NotPositions(torch.nn.Module):
    """slope * (i * j): data-free, per head, but no relative position: a dense bias."""

    def __init__(self):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(H))

    def forward(self, q, k, v):
        n = q.size(-2)
        bias = self.slopes[:, None, None] * (torch.arange(n)[:, None] * torch.arange(n)[None, :]) / n
        return (q @ k.mT + bias).softmax(-1) @ v


class AlibiTest(TestCase):
    def test_causal_alibi(self):
        captured = capture(CausalAlibi(), *qkv())
        self.assertEqual(captured.variants, ["causal"], captured.skip_reasons)
        self.assertIn("alibi(j - i", captured.reports[0].rewrites[0].mask)
        self.assertExpectedInline(captured.after, """\
def forward(self, L_q_ : torch.Tensor, L_self_buffers_slopes_ : torch.Tensor, L_k_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_self_buffers_slopes_ = L_self_buffers_slopes_
    l_k_ = L_k_
    l_v_ = L_v_
    getitem_2 = l_self_buffers_slopes_[(slice(None, None, None), None, None)]
    unsqueeze = getitem_2.unsqueeze(0)
    getitem = unsqueeze[(slice(None, None, None), slice(None, None, None), 0, 0)]
    float_1 = getitem.float()
    attention_default = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, None, 0.35355339059327373, 0, alibi_slopes = float_1)
    getitem_3 = attention_default[0]
    return (getitem_3,)
""")
        compiled_matches_eager(CausalAlibi(), *qkv())

    def test_symmetric_alibi(self):
        captured = capture(SymmetricAlibi(), *qkv())
        self.assertEqual(captured.variants, ["dense"], captured.skip_reasons)
        self.assertIn("alibi(-|j - i|", captured.reports[0].rewrites[0].mask)
        self.assertIn("alibi_symmetric = True", captured.after)
        compiled_matches_eager(SymmetricAlibi(), *qkv())

    def test_alibi_dynamic_lengths(self):
        """One graph for three lengths; the position proof is re-checked for each."""
        import flash_fx

        model = CausalAlibi()
        flash_fx.clear_reports()
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="flash_fx", dynamic=True, options={"inner": "eager", "report": False})
        for n in (7, 19, 33):
            q, k, v = qkv(n)
            torch.testing.assert_close(compiled(q, k, v), model(q, k, v), atol=2e-5, rtol=2e-5)
        self.assertEqual([[r.variant for r in rep.rewrites] for rep in flash_fx.reports()], [["causal"]])
        torch._dynamo.reset()

    def test_alibi_summed_with_a_mask(self):
        captured = capture(AlibiSummedWithMask(), *qkv())
        self.assertEqual(captured.variants, ["causal"], captured.skip_reasons)
        self.assertIn("alibi(j - i", captured.reports[0].rewrites[0].mask)
        self.assertNotIn("where", captured.after)  # neither the N x N ALiBi plane nor the mask is built
        compiled_matches_eager(AlibiSummedWithMask(), *qkv())

    def test_learned_slopes_stay_dense(self):
        captured = capture(LearnedSlopes(), *qkv())
        self.assertEqual(captured.variants, ["bias"])
        self.assertNotIn("alibi_slopes", captured.after)
        compiled_matches_eager(LearnedSlopes(), *qkv())

    def test_not_positions_stay_dense(self):
        captured = capture(NotPositions(), *qkv())
        self.assertEqual(captured.variants, ["bias"])
        self.assertNotIn("alibi_slopes", captured.after)


@pytest.mark.parametrize(("plane", "form"), [
    (lambda i, j: j - i, PositionForm(1.0, False)),
    (lambda i, j: i - j, PositionForm(-1.0, False)),
    (lambda i, j: j + 0 * i, PositionForm(1.0, False)),  # per-row constants do not matter to softmax
    (lambda i, j: -(j - i).abs(), PositionForm(1.0, True)),
    (lambda i, j: (j - i).abs() + 3, PositionForm(-1.0, True)),
    (lambda i, j: i * j, None),
    (lambda i, j: (j - i) ** 2, None),
])
def test_position_form(plane, form):
    i, j = torch.arange(6)[:, None], torch.arange(9)[None, :]
    assert position_form(plane(i, j).expand(6, 9)) == form


class RelativeTableTest(TestCase):
    """T5's learned relative buckets: looked up at the Nq + Nk - 1 relative positions, not per (i, j)."""

    def t5(self, impl="eager"):
        transformers = pytest.importorskip("transformers")
        cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                    relative_attention_num_buckets=8, relative_attention_max_distance=12,
                                    dropout_rate=0.0, attn_implementation=impl)
        torch.manual_seed(0)
        ids = torch.randint(0, 64, (2, 23))
        return transformers.T5Model(cfg), ids, ids[:, :13]

    def test_t5_tables_read_per_relative_position(self):
        for impl in ("eager", "sdpa"):  # sdpa: the table reaches SDPA as where(causal, table, finfo.min)
            with self.subTest(impl=impl):
                self.check_t5_tables(impl)

    def check_t5_tables(self, impl):
        model, ids, decoder_ids = self.t5(impl)

        def run(ids, decoder_ids):
            return model(input_ids=ids, decoder_input_ids=decoder_ids, use_cache=False).last_hidden_state

        captured = capture(run, ids, decoder_ids)
        masks = [r.mask for report in captured.reports for r in report.rewrites]
        self.assertEqual(captured.variants, ["dense", "dense", "causal", "dense", "causal", "dense"])
        self.assertEqual(sum("relative_table" in m for m in masks), 4)  # encoder and decoder self-attention
        self.assertEqual(sum("zero bias" in m for m in masks), 2)  # cross-attention's all-zero position bias
        self.assertEqual(captured.after.count("rel_bias = "), 4)
        # the only table lookups left are those at the relative positions (the Nq x Nk lookups are gone)
        lookups = [line for line in captured.after.splitlines() if "relative_attention_bias" in line
                   and "embedding(" in line]
        self.assertTrue(lookups and all("torch.nn.functional.embedding(cat" in line for line in lookups), lookups)

    def test_t5_matches_eager_in_training(self):
        model, ids, decoder_ids = self.t5()
        model.train()

        def run(ids, decoder_ids):
            return model(input_ids=ids, decoder_input_ids=decoder_ids, use_cache=False).last_hidden_state

        expected = run(ids, decoder_ids)
        expected.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        torch._dynamo.reset()
        compiled = torch.compile(run, backend="flash_fx", options={"inner": "eager", "report": False})
        actual = compiled(ids, decoder_ids)
        actual.square().mean().backward()
        torch._dynamo.reset()
        torch.testing.assert_close(actual, expected, atol=2e-5, rtol=2e-5)
        for name, param in model.named_parameters():
            if name in grads:
                torch.testing.assert_close(param.grad, grads[name], atol=2e-5, rtol=2e-4, msg=name)


def test_toeplitz():
    from flash_fx.patterns.positions import is_toeplitz

    i, j = torch.arange(5)[:, None], torch.arange(8)[None, :]
    assert is_toeplitz((j - i).clamp(-2, 3))
    assert not is_toeplitz(j * i)
