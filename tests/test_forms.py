"""Each spelling of attention the matcher must recognize: a snapshot of the graph before and after the
pass (expecttest; EXPECTTEST_ACCEPT=1 regenerates them), the chosen variant, and compiled-vs-eager values
and gradients."""

import math

import torch
import torch.nn.functional as F
from expecttest import TestCase
from helpers import capture, compiled_matches_eager
from torch import nn

B, H, N, D = 2, 3, 10, 8


def qkv(*shape, requires_grad=True):
    torch.manual_seed(0)
    shape = shape or (B, H, N, D)
    return [torch.randn(*shape, requires_grad=requires_grad) for _ in range(3)]


class CausalBuffer(nn.Module):
    """nanoGPT style: a registered tril buffer sliced to the sequence length, `== 0` and masked_fill."""

    def __init__(self, block_size=16):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, q, k, v):
        t = q.size(-2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        return F.softmax(att, dim=-1) @ v


class SoftmaxModule(nn.Module):
    """nn.Softmax, einsum for both products, eval-mode nn.Dropout."""

    def __init__(self):
        super().__init__()
        self.softmax = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(0.1)

    def forward(self, q, k, v):
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
        return torch.einsum("bhqk,bhkd->bhqd", self.dropout(self.softmax(scores)), v)


class TensorScale(nn.Module):
    """A 0-d tensor scale held by the module."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor(0.3))

    def forward(self, q, k, v):
        return torch.softmax(torch.matmul(q, k.mT) * self.scale, dim=-1) @ v


def matmul_operator(q, k, v):
    return F.softmax((q @ k.transpose(-2, -1)) * 0.25, dim=-1) @ v


def torch_matmul_div_mt(q, k, v):
    return torch.matmul(torch.softmax(torch.matmul(q, k.mT) / 3.0, -1), v)


def bmm_3d(q, k, v):
    scores = torch.bmm(q, k.transpose(1, 2))
    return torch.bmm(scores.softmax(dim=2), v)


def permute_no_scale(q, k, v):
    return (q @ k.permute(0, 1, 3, 2)).softmax(-1) @ v


def scale_on_q(q, k, v):
    q = q * D**-0.5
    return F.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


def upcast_and_back(q, k, v):
    q, k, v = q.half(), k.half(), v.half()
    scores = q @ k.transpose(-2, -1) * 0.5
    probs = F.softmax(scores.float(), dim=-1).type_as(q)
    return (probs @ v).float()


def softmax_dtype_argument(q, k, v):
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    probs = F.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1, dtype=torch.float32).to(q.dtype)
    return (probs @ v).float()


def dropout_p0_training(q, k, v):
    probs = F.dropout(F.softmax(q @ k.transpose(-2, -1), dim=-1), p=0.0, training=True)
    return probs @ v


def causal_triu(q, k, v):
    n = q.size(-2)
    mask = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    scores = (q @ k.transpose(-2, -1)) * 0.3
    return scores.masked_fill(mask, float("-inf")).softmax(-1) @ v


def causal_tril_where(q, k, v):
    n = q.size(-2)
    visible = torch.tril(torch.ones(n, n, dtype=torch.bool))
    scores = torch.where(visible, q @ k.transpose(-2, -1) * 0.3, torch.finfo(q.dtype).min)
    return scores.softmax(-1) @ v


def baddbmm_empty_alpha(q, k, v):
    scores = torch.empty(q.size(0), q.size(1), k.size(1), dtype=q.dtype)
    scores = torch.baddbmm(scores, q, k.transpose(1, 2), beta=0.0, alpha=0.125)
    return torch.bmm(scores.softmax(-1), v)


def baddbmm_alibi_bias(q, k, v):
    n = k.size(1)
    slopes = torch.linspace(-1.0, -0.1, q.size(0)).view(-1, 1, 1)
    alibi = slopes * torch.arange(n, dtype=q.dtype).view(1, 1, n)  # [B*H, 1, Nk]
    scores = alibi.baddbmm(q, k.transpose(-1, -2), beta=1.0, alpha=0.5)
    return torch.bmm(F.softmax(scores, dim=-1), v)


def two_dim_dot_t(q, k, v):
    return (q @ k.T / 2.0).softmax(-1) @ v


def views_between_products(q, k, v):
    """BART style: 3-d products, the mask added in a 4-d view of the scores."""
    b, h = 2, 3
    n = q.size(1)
    mask = torch.zeros(b, 1, n, n).masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
    scores = torch.bmm(q * 0.3, k.transpose(1, 2))
    scores = scores.view(b, h, n, n) + mask
    scores = scores.view(b * h, n, n)
    return torch.bmm(scores.softmax(dim=-1), v)


def scale_on_k_and_both(q, k, v):
    d = q.size(-1)
    q, k = q * d**-0.25, k * d**-0.25
    scores = (q @ k.transpose(-2, -1)).contiguous().clone()
    return scores.softmax(-1) @ v


def scales_in_place_and_tensors(q, k, v):
    scores = q @ k.transpose(-2, -1)
    scores *= 1.0
    scores /= math.sqrt(q.size(-1))
    scores = scores * torch.full([], 0.5) / torch.tensor(2.0)
    return scores.softmax(-1) @ v


def symbolic_head_dim_scale(q, k, v):
    scores = (q @ k.transpose(-2, -1)) / (q.size(-1) ** 0.5)
    return scores.float().softmax(-1).type(q.dtype) @ v


def additive_mask_and_where(q, k, v, bias):
    n = q.size(-2)
    keep = torch.ones(n, n, dtype=torch.bool).tril()
    scores = torch.where(keep, (q @ k.transpose(-2, -1)) * 0.5 + bias, -torch.finfo(q.dtype).max)
    return torch.dropout(scores.softmax(-1), 0.1, False) @ v


def padding_mask_input(q, k, v, padding):
    scores = (q @ k.transpose(-2, -1)).masked_fill(padding[:, None, None, :] == 0, -1e9)
    return scores.softmax(-1) @ v


def repeat_kv_expand(q, k, v):
    """LLaMA's repeat_kv: [B, Hkv, N, d] -> [B, Hkv*rep, N, d] by expand + reshape (head h reads h // rep)."""
    b, hkv, n, d = k.shape
    k = k[:, :, None, :, :].expand(b, hkv, 3, n, d).reshape(b, hkv * 3, n, d)
    v = v[:, :, None, :, :].expand(b, hkv, 3, n, d).reshape(b, hkv * 3, n, d)
    return F.softmax(torch.matmul(q, k.transpose(2, 3)) * 0.25, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def repeat_interleave_kv(q, k, v):
    k, v = k.repeat_interleave(3, dim=1), torch.repeat_interleave(v, 3, dim=1)
    return (q @ k.mT * 0.25).softmax(-1) @ v


def repeat_tiled_kv(q, k, v):
    k, v = k.repeat(1, 3, 1, 1), v.repeat(1, 3, 1, 1)
    return (q @ k.mT * 0.25).softmax(-1) @ v


def broadcast_single_kv_head(q, k, v):
    return (q @ k.mT * 0.25).softmax(-1) @ v


def sdpa_plain_and_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v) + F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                    scale=0.2)


def sdpa_masks(q, k, v):
    n = q.size(-2)
    keep = torch.ones(n, n, dtype=torch.bool).tril()
    bias = torch.zeros(n, n).masked_fill(~keep, torch.finfo(q.dtype).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep) + F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias)


def sdpa_gqa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def learned_bias(q, k, v, bias):
    return ((q @ k.mT) * 0.5 + bias).softmax(-1) @ v


class Layer(nn.Module):
    def forward(self, x):
        return F.softmax(x @ x.transpose(-2, -1) * 0.1, dim=-1) @ x


class Stack(nn.Module):
    """The same attention module called in a loop: one rewrite per call."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Layer() for _ in range(3))

    def forward(self, q, k, v):
        x = q + k + v
        for layer in self.layers:
            x = layer(x)
        return x


class SnapshotCase(TestCase):
    """check(): the rewrite's variant(s), a snapshot of the graph before and after, and compiled == eager."""

    def check(self, fn, inputs, variant, expected_graph, count=1, **tolerance):
        captured = capture(fn, *inputs)
        self.assertEqual(captured.variants, [variant] * count if isinstance(variant, str) else variant,
                         captured.skip_reasons)
        self.assertExpectedInline(captured.before + "---- after flash_fx ----\n" + captured.after, expected_graph,
                                  skip=1)
        compiled_matches_eager(fn, *inputs, **tolerance)


class FormsTest(SnapshotCase):

    def test_matmul_operator(self):
        self.check(matmul_operator, qkv(), "dense", """\
def forward(self, L_k_ : torch.Tensor, L_q_ : torch.Tensor, L_v_ : torch.Tensor):
    l_k_ = L_k_
    l_q_ = L_q_
    l_v_ = L_v_
    transpose = l_k_.transpose(-2, -1)
    matmul = l_q_ @ transpose
    mul = matmul * 0.25
    softmax = torch.nn.functional.softmax(mul, dim = -1)
    matmul_1 = softmax @ l_v_
    return (matmul_1,)
---- after flash_fx ----
def forward(self, L_k_ : torch.Tensor, L_q_ : torch.Tensor, L_v_ : torch.Tensor):
    l_k_ = L_k_
    l_q_ = L_q_
    l_v_ = L_v_
    attention_default = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, None, 0.25, None)
    getitem = attention_default[0]
    return (getitem,)
""")

    def test_torch_matmul_div_mt(self):
        self.check(torch_matmul_div_mt, qkv(), "dense", """\
def forward(self, L_k_ : torch.Tensor, L_q_ : torch.Tensor, L_v_ : torch.Tensor):
    l_k_ = L_k_
    l_q_ = L_q_
    l_v_ = L_v_
    getattr_1 = l_k_.mT
    matmul = torch.matmul(l_q_, getattr_1)
    truediv = matmul / 3.0
    softmax = torch.softmax(truediv, -1)
    matmul_1 = torch.matmul(softmax, l_v_)
    return (matmul_1,)
---- after flash_fx ----
def forward(self, L_k_ : torch.Tensor, L_q_ : torch.Tensor, L_v_ : torch.Tensor):
    l_k_ = L_k_
    l_q_ = L_q_
    l_v_ = L_v_
    attention_default = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, None, 0.3333333333333333, None)
    getitem = attention_default[0]
    return (getitem,)
""")

    def test_bmm_3d(self):
        self.check(bmm_3d, qkv(B * H, N, D), "dense", """\
def forward(self, L_k_ : torch.Tensor, L_q_ : torch.Tensor, L_v_ : torch.Tensor):
    l_k_ = L_k_
    l_q_ = L_q_
    l_v_ = L_v_
    transpose = l_k_.transpose(1, 2)
    scores = torch.bmm(l_q_, transpose)
    softmax = scores.softmax(dim = 2)
    bmm_1 = torch.bmm(softmax, l_v_)
    return (bmm_1,)
---- after flash_fx ----
def forward(self, L_k_ : torch.Tensor, L_q_ : torch.Tensor, L_v_ : torch.Tensor):
    l_k_ = L_k_
    l_q_ = L_q_
    l_v_ = L_v_
    unsqueeze = l_q_.unsqueeze(0)
    unsqueeze_1 = l_k_.unsqueeze(0)
    unsqueeze_2 = l_v_.unsqueeze(0)
    attention_default = torch.ops.flash_fx.attention.default(unsqueeze, unsqueeze_1, unsqueeze_2, None, 1.0, None)
    getitem = attention_default[0]
    squeeze = getitem.squeeze(0)
    return (squeeze,)
""")

    def test_permute_no_scale(self):
        self.check(permute_no_scale, qkv(), "dense", """\
def forward(self, L_k_ : torch.Tensor, L_q_ : torch.Tensor, L_v_ : torch.Tensor):
    l_k_ = L_k_
    l_q_ = L_q_
    l_v_ = L_v_
    permute = l_k_.permute(0, 1, 3, 2)
    matmul = l_q_ @ permute
    softmax = matmul.softmax(-1)
    matmul_1 = softmax @ l_v_
    return (matmul_1,)
---- after flash_fx ----
def forward(self, L_k_ : torch.Tensor, L_q_ : torch.Tensor, L_v_ : torch.Tensor):
    l_k_ = L_k_
    l_q_ = L_q_
    l_v_ = L_v_
    attention_default = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, None, 1.0, None)
    getitem = attention_default[0]
    return (getitem,)
""")

    def test_scale_on_q(self):
        self.check(scale_on_q, qkv(), "dense", """\
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    q = l_q_ * 0.3535533905932738
    transpose = l_k_.transpose(-2, -1)
    matmul = q @ transpose
    softmax = torch.nn.functional.softmax(matmul, dim = -1)
    matmul_1 = softmax @ l_v_
    return (matmul_1,)
---- after flash_fx ----
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    attention_default = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, None, 0.3535533905932738, None)
    getitem = attention_default[0]
    return (getitem,)
""")

    def test_nn_softmax_einsum_eval_dropout(self):
        self.check(SoftmaxModule().eval(), qkv(), "dense", """\
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    einsum = torch.functional.einsum('bhqd,bhkd->bhqk', l_q_, l_k_)
    scores = einsum / 2.8284271247461903
    softmax = torch.nn.functional.softmax(scores, -1, _stacklevel = 5)
    dropout = torch.nn.functional.dropout(softmax, 0.1, False, False)
    einsum_1 = torch.functional.einsum('bhqk,bhkd->bhqd', dropout, l_v_)
    return (einsum_1,)
---- after flash_fx ----
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    attention_default = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, None, 0.35355339059327373, None)
    getitem = attention_default[0]
    return (getitem,)
""")

    def test_tensor_scale(self):
        self.check(TensorScale(), qkv(), "dense", """\
def forward(self, L_k_ : torch.Tensor, L_q_ : torch.Tensor, L_self_buffers_scale_ : torch.Tensor, L_v_ : torch.Tensor):
    l_k_ = L_k_
    l_q_ = L_q_
    l_self_buffers_scale_ = L_self_buffers_scale_
    l_v_ = L_v_
    getattr_1 = l_k_.mT
    matmul = torch.matmul(l_q_, getattr_1)
    mul = matmul * l_self_buffers_scale_
    softmax = torch.softmax(mul, dim = -1)
    matmul_1 = softmax @ l_v_
    return (matmul_1,)
---- after flash_fx ----
def forward(self, L_k_ : torch.Tensor, L_q_ : torch.Tensor, L_self_buffers_scale_ : torch.Tensor, L_v_ : torch.Tensor):
    l_k_ = L_k_
    l_q_ = L_q_
    l_self_buffers_scale_ = L_self_buffers_scale_
    l_v_ = L_v_
    mul_1 = l_q_ * l_self_buffers_scale_
    attention_default = torch.ops.flash_fx.attention.default(mul_1, l_k_, l_v_, None, 1.0, None)
    getitem = attention_default[0]
    return (getitem,)
""")

    def test_upcast_and_back(self):
        self.check(upcast_and_back, qkv(), "dense", """\
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    q = l_q_.half()
    k = l_k_.half()
    v = l_v_.half()
    transpose = k.transpose(-2, -1)
    matmul = q @ transpose
    scores = matmul * 0.5
    float_1 = scores.float()
    softmax = torch.nn.functional.softmax(float_1, dim = -1)
    probs = softmax.type_as(q)
    matmul_1 = probs @ v
    float_2 = matmul_1.float()
    return (float_2,)
---- after flash_fx ----
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    q = l_q_.half()
    k = l_k_.half()
    v = l_v_.half()
    attention_default = torch.ops.flash_fx.attention.default(q, k, v, None, 0.5, None)
    getitem = attention_default[0]
    float_2 = getitem.float()
    return (float_2,)
""", atol=2e-2, rtol=2e-2)

    def test_softmax_dtype_argument(self):
        self.check(softmax_dtype_argument, qkv(), "dense", """\
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    q = l_q_.bfloat16()
    k = l_k_.bfloat16()
    v = l_v_.bfloat16()
    transpose = k.transpose(-2, -1)
    matmul = q @ transpose
    mul = matmul * 0.5
    softmax = torch.nn.functional.softmax(mul, dim = -1, dtype = torch.float32)
    probs = softmax.to(torch.bfloat16)
    matmul_1 = probs @ v
    float_1 = matmul_1.float()
    return (float_1,)
---- after flash_fx ----
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    q = l_q_.bfloat16()
    k = l_k_.bfloat16()
    v = l_v_.bfloat16()
    attention_default = torch.ops.flash_fx.attention.default(q, k, v, None, 0.5, None)
    getitem = attention_default[0]
    float_1 = getitem.float()
    return (float_1,)
""", atol=5e-2, rtol=5e-2)

    def test_dropout_p0_training(self):
        self.check(dropout_p0_training, qkv(), "dense", """\
def forward(self, L_k_ : torch.Tensor, L_q_ : torch.Tensor, L_v_ : torch.Tensor):
    l_k_ = L_k_
    l_q_ = L_q_
    l_v_ = L_v_
    transpose = l_k_.transpose(-2, -1)
    matmul = l_q_ @ transpose
    softmax = torch.nn.functional.softmax(matmul, dim = -1)
    probs = torch.nn.functional.dropout(softmax, p = 0.0, training = True)
    matmul_1 = probs @ l_v_
    return (matmul_1,)
---- after flash_fx ----
def forward(self, L_k_ : torch.Tensor, L_q_ : torch.Tensor, L_v_ : torch.Tensor):
    l_k_ = L_k_
    l_q_ = L_q_
    l_v_ = L_v_
    attention_default = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, None, 1.0, None)
    getitem = attention_default[0]
    return (getitem,)
""")

    def test_causal_buffer(self):
        self.check(CausalBuffer(), qkv(), "causal", """\
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_self_buffers_bias_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_self_buffers_bias_ = L_self_buffers_bias_
    l_v_ = L_v_
    transpose = l_k_.transpose(-2, -1)
    matmul = l_q_ @ transpose
    att = matmul * 0.35355339059327373
    getitem = l_self_buffers_bias_[(slice(None, None, None), slice(None, None, None), slice(None, 10, None), slice(None, 10, None))]
    eq = getitem == 0
    att_1 = att.masked_fill(eq, -inf)
    softmax = torch.nn.functional.softmax(att_1, dim = -1)
    matmul_1 = softmax @ l_v_
    return (matmul_1,)
---- after flash_fx ----
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_self_buffers_bias_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_self_buffers_bias_ = L_self_buffers_bias_
    l_v_ = L_v_
    attention_default = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, None, 0.35355339059327373, 0)
    getitem_1 = attention_default[0]
    return (getitem_1,)
""")

    def test_causal_triu(self):
        self.check(causal_triu, qkv(), "causal", """\
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    ones = torch.ones(10, 10, dtype = torch.bool)
    mask = torch.triu(ones, diagonal = 1)
    transpose = l_k_.transpose(-2, -1)
    matmul = l_q_ @ transpose
    scores = matmul * 0.3
    masked_fill = scores.masked_fill(mask, -inf)
    softmax = masked_fill.softmax(-1)
    matmul_1 = softmax @ l_v_
    return (matmul_1,)
---- after flash_fx ----
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    attention_default = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, None, 0.3, 0)
    getitem = attention_default[0]
    return (getitem,)
""")

    def test_causal_tril_where(self):
        self.check(causal_tril_where, qkv(), "causal", """\
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    ones = torch.ones(10, 10, dtype = torch.bool)
    visible = torch.tril(ones)
    transpose = l_k_.transpose(-2, -1)
    matmul = l_q_ @ transpose
    mul = matmul * 0.3
    scores = torch.where(visible, mul, -3.4028234663852886e+38)
    softmax = scores.softmax(-1)
    matmul_1 = softmax @ l_v_
    return (matmul_1,)
---- after flash_fx ----
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    attention_default = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, None, 0.3, 0, excluded_fill = -3.4028234663852886e+38)
    getitem = attention_default[0]
    return (getitem,)
""")

    def test_cross_attention_lengths(self):
        q = torch.randn(B, H, 5, D, requires_grad=True)
        k, v = torch.randn(B, H, 11, D, requires_grad=True), torch.randn(B, H, 11, D, requires_grad=True)
        self.assertEqual(capture(matmul_operator, q, k, v).variants, ["dense"])
        compiled_matches_eager(matmul_operator, q, k, v)

    def test_baddbmm_empty_alpha(self):
        self.check(baddbmm_empty_alpha, qkv(B * H, N, D), "dense", """\
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    scores = torch.empty(6, 10, 10, dtype = torch.float32)
    transpose = l_k_.transpose(1, 2)
    scores_1 = torch.baddbmm(scores, l_q_, transpose, beta = 0.0, alpha = 0.125)
    softmax = scores_1.softmax(-1)
    bmm = torch.bmm(softmax, l_v_)
    return (bmm,)
---- after flash_fx ----
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    unsqueeze = l_q_.unsqueeze(0)
    unsqueeze_1 = l_k_.unsqueeze(0)
    unsqueeze_2 = l_v_.unsqueeze(0)
    attention_default = torch.ops.flash_fx.attention.default(unsqueeze, unsqueeze_1, unsqueeze_2, None, 0.125, None)
    getitem = attention_default[0]
    squeeze = getitem.squeeze(0)
    return (squeeze,)
""")

    def test_baddbmm_alibi_bias(self):
        self.check(baddbmm_alibi_bias, qkv(B * H, N, D), "bias", """\
def forward(self, L_k_ : torch.Tensor, L_q_ : torch.Tensor, L_v_ : torch.Tensor):
    l_k_ = L_k_
    l_q_ = L_q_
    l_v_ = L_v_
    linspace = torch.linspace(-1.0, -0.1, 6)
    slopes = linspace.view(-1, 1, 1)
    arange = torch.arange(10, dtype = torch.float32)
    view_1 = arange.view(1, 1, 10)
    alibi = slopes * view_1
    transpose = l_k_.transpose(-1, -2)
    scores = alibi.baddbmm(l_q_, transpose, beta = 1.0, alpha = 0.5)
    softmax = torch.nn.functional.softmax(scores, dim = -1)
    bmm = torch.bmm(softmax, l_v_)
    return (bmm,)
---- after flash_fx ----
def forward(self, L_k_ : torch.Tensor, L_q_ : torch.Tensor, L_v_ : torch.Tensor):
    l_k_ = L_k_
    l_q_ = L_q_
    l_v_ = L_v_
    linspace = torch.linspace(-1.0, -0.1, 6)
    slopes = linspace.view(-1, 1, 1)
    arange = torch.arange(10, dtype = torch.float32)
    view_1 = arange.view(1, 1, 10)
    alibi = slopes * view_1
    unsqueeze = l_q_.unsqueeze(0)
    unsqueeze_1 = l_k_.unsqueeze(0)
    unsqueeze_2 = l_v_.unsqueeze(0)
    attention_default = torch.ops.flash_fx.attention.default(unsqueeze, unsqueeze_1, unsqueeze_2, alibi, 0.5, None)
    getitem = attention_default[0]
    squeeze = getitem.squeeze(0)
    return (squeeze,)
""")

    def test_two_dim_dot_t(self):
        self.check(two_dim_dot_t, qkv(N, D), "dense", """\
def forward(self, L_k_ : torch.Tensor, L_q_ : torch.Tensor, L_v_ : torch.Tensor):
    l_k_ = L_k_
    l_q_ = L_q_
    l_v_ = L_v_
    getattr_1 = l_k_.T
    matmul = l_q_ @ getattr_1
    truediv = matmul / 2.0
    softmax = truediv.softmax(-1)
    matmul_1 = softmax @ l_v_
    return (matmul_1,)
---- after flash_fx ----
def forward(self, L_k_ : torch.Tensor, L_q_ : torch.Tensor, L_v_ : torch.Tensor):
    l_k_ = L_k_
    l_q_ = L_q_
    l_v_ = L_v_
    unsqueeze = l_q_.unsqueeze(0)
    unsqueeze_1 = unsqueeze.unsqueeze(0)
    unsqueeze_2 = l_k_.unsqueeze(0)
    unsqueeze_3 = unsqueeze_2.unsqueeze(0)
    unsqueeze_4 = l_v_.unsqueeze(0)
    unsqueeze_5 = unsqueeze_4.unsqueeze(0)
    attention_default = torch.ops.flash_fx.attention.default(unsqueeze_1, unsqueeze_3, unsqueeze_5, None, 0.5, None)
    getitem = attention_default[0]
    squeeze = getitem.squeeze(0)
    squeeze_1 = squeeze.squeeze(0)
    return (squeeze_1,)
""")

    def test_views_between_products(self):
        self.check(views_between_products, qkv(B * H, N, D), "causal", """\
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    zeros = torch.zeros(2, 1, 10, 10)
    ones = torch.ones(10, 10, dtype = torch.bool)
    triu = torch.triu(ones, 1)
    mask = zeros.masked_fill(triu, -inf)
    mul = l_q_ * 0.3
    transpose = l_k_.transpose(1, 2)
    scores = torch.bmm(mul, transpose)
    view = scores.view(2, 3, 10, 10)
    scores_1 = view + mask
    scores_2 = scores_1.view(6, 10, 10)
    softmax = scores_2.softmax(dim = -1)
    bmm_1 = torch.bmm(softmax, l_v_)
    return (bmm_1,)
---- after flash_fx ----
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    size = l_q_.size(-2)
    size_1 = l_q_.size(-1)
    reshape = l_q_.reshape(2, 3, size, size_1)
    size_2 = l_k_.size(-2)
    size_3 = l_k_.size(-1)
    reshape_1 = l_k_.reshape(2, 3, size_2, size_3)
    size_4 = l_v_.size(-2)
    size_5 = l_v_.size(-1)
    reshape_2 = l_v_.reshape(2, 3, size_4, size_5)
    attention_default = torch.ops.flash_fx.attention.default(reshape, reshape_1, reshape_2, None, 0.3, 0)
    getitem = attention_default[0]
    flatten = getitem.flatten(0, 1)
    return (flatten,)
""")

    def test_scale_on_k_and_both(self):
        self.check(scale_on_k_and_both, qkv(), "dense", """\
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    q = l_q_ * 0.5946035575013605
    k = l_k_ * 0.5946035575013605
    transpose = k.transpose(-2, -1)
    matmul = q @ transpose
    contiguous = matmul.contiguous()
    scores = contiguous.clone()
    softmax = scores.softmax(-1)
    matmul_1 = softmax @ l_v_
    return (matmul_1,)
---- after flash_fx ----
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    attention_default = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, None, 0.35355339059327373, None)
    getitem = attention_default[0]
    return (getitem,)
""")

    def test_scales_in_place_and_tensors(self):
        q, k, v = qkv(requires_grad=False)
        self.check(scales_in_place_and_tensors, [q, k, v], "dense", """\
def forward(self, L_k_ : torch.Tensor, L_q_ : torch.Tensor, L_v_ : torch.Tensor):
    l_k_ = L_k_
    l_q_ = L_q_
    l_v_ = L_v_
    transpose = l_k_.transpose(-2, -1)
    scores = l_q_ @ transpose
    scores *= 1.0;  scores_1 = scores
    scores_1 /= 2.8284271247461903;  scores_2 = scores_1
    full = torch.full([], 0.5)
    mul = scores_2 * full
    tensor = torch.tensor(2.0)
    scores_3 = mul / tensor
    softmax = scores_3.softmax(-1)
    matmul_1 = softmax @ l_v_
    return (matmul_1,)
---- after flash_fx ----
def forward(self, L_k_ : torch.Tensor, L_q_ : torch.Tensor, L_v_ : torch.Tensor):
    l_k_ = L_k_
    l_q_ = L_q_
    l_v_ = L_v_
    full = torch.full([], 0.5)
    tensor = torch.tensor(2.0)
    mul_1 = l_q_ * full
    truediv = mul_1 / tensor
    attention_default = torch.ops.flash_fx.attention.default(truediv, l_k_, l_v_, None, 0.35355339059327373, None)
    getitem = attention_default[0]
    return (getitem,)
""")

    def test_symbolic_head_dim_scale(self):
        self.check(symbolic_head_dim_scale, qkv(), "dense", """\
def forward(self, L_k_ : torch.Tensor, L_q_ : torch.Tensor, L_v_ : torch.Tensor):
    l_k_ = L_k_
    l_q_ = L_q_
    l_v_ = L_v_
    transpose = l_k_.transpose(-2, -1)
    matmul = l_q_ @ transpose
    scores = matmul / 2.8284271247461903
    float_1 = scores.float()
    softmax = float_1.softmax(-1)
    type_1 = softmax.type(torch.float32)
    matmul_1 = type_1 @ l_v_
    return (matmul_1,)
---- after flash_fx ----
def forward(self, L_k_ : torch.Tensor, L_q_ : torch.Tensor, L_v_ : torch.Tensor):
    l_k_ = L_k_
    l_q_ = L_q_
    l_v_ = L_v_
    attention_default = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, None, 0.35355339059327373, None)
    getitem = attention_default[0]
    return (getitem,)
""")

    def test_additive_mask_and_where(self):
        self.check(additive_mask_and_where, [*qkv(), torch.randn(1, H, N, N)], "bias", """\
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_bias_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_bias_ = L_bias_
    l_v_ = L_v_
    ones = torch.ones(10, 10, dtype = torch.bool)
    keep = ones.tril()
    transpose = l_k_.transpose(-2, -1)
    matmul = l_q_ @ transpose
    mul = matmul * 0.5
    add = mul + l_bias_
    scores = torch.where(keep, add, -3.4028234663852886e+38)
    softmax = scores.softmax(-1)
    dropout = torch.dropout(softmax, 0.1, False)
    matmul_1 = dropout @ l_v_
    return (matmul_1,)
---- after flash_fx ----
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_bias_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_bias_ = L_bias_
    l_v_ = L_v_
    attention_default = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, l_bias_, 0.5, 0, excluded_fill = -3.4028234663852886e+38)
    getitem = attention_default[0]
    return (getitem,)
""")

    def test_padding_mask_input(self):
        padding = torch.ones(B, N, dtype=torch.long)
        padding[0, -3:] = 0
        self.check(padding_mask_input, [*qkv(), padding], "key_padding", """\
def forward(self, L_k_ : torch.Tensor, L_q_ : torch.Tensor, L_padding_ : torch.Tensor, L_v_ : torch.Tensor):
    l_k_ = L_k_
    l_q_ = L_q_
    l_padding_ = L_padding_
    l_v_ = L_v_
    transpose = l_k_.transpose(-2, -1)
    matmul = l_q_ @ transpose
    getitem = l_padding_[(slice(None, None, None), None, None, slice(None, None, None))]
    eq = getitem == 0
    scores = matmul.masked_fill(eq, -1000000000.0)
    softmax = scores.softmax(-1)
    matmul_1 = softmax @ l_v_
    return (matmul_1,)
---- after flash_fx ----
def forward(self, L_k_ : torch.Tensor, L_q_ : torch.Tensor, L_padding_ : torch.Tensor, L_v_ : torch.Tensor):
    l_k_ = L_k_
    l_q_ = L_q_
    l_padding_ = L_padding_
    l_v_ = L_v_
    getitem = l_padding_[(slice(None, None, None), None, None, slice(None, None, None))]
    eq = getitem == 0
    getitem_1 = eq[(slice(None, None, None), 0, 0, slice(None, None, None))]
    invert = ~getitem_1
    attention_default = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, None, 1.0, None, key_valid = invert, excluded_fill = -1000000000.0, filled_rows = -1000000000.0)
    getitem_2 = attention_default[0]
    return (getitem_2,)
""")

    def test_repeat_kv_expand(self):
        q = qkv(B, 6, N, D)[0]
        self.check(repeat_kv_expand, [q, *qkv(B, 2, N, D)[1:]], "dense", """\
def forward(self, L_k_ : torch.Tensor, L_v_ : torch.Tensor, L_q_ : torch.Tensor):
    l_k_ = L_k_
    l_v_ = L_v_
    l_q_ = L_q_
    getitem = l_k_[(slice(None, None, None), slice(None, None, None), None, slice(None, None, None), slice(None, None, None))]
    expand = getitem.expand(2, 2, 3, 10, 8)
    k = expand.reshape(2, 6, 10, 8)
    getitem_1 = l_v_[(slice(None, None, None), slice(None, None, None), None, slice(None, None, None), slice(None, None, None))]
    expand_1 = getitem_1.expand(2, 2, 3, 10, 8)
    v = expand_1.reshape(2, 6, 10, 8)
    transpose = k.transpose(2, 3)
    matmul = torch.matmul(l_q_, transpose)
    mul = matmul * 0.25
    softmax = torch.nn.functional.softmax(mul, dim = -1, dtype = torch.float32)
    to = softmax.to(torch.float32)
    matmul_1 = to @ v
    return (matmul_1,)
---- after flash_fx ----
def forward(self, L_k_ : torch.Tensor, L_v_ : torch.Tensor, L_q_ : torch.Tensor):
    l_k_ = L_k_
    l_v_ = L_v_
    l_q_ = L_q_
    attention_default = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, None, 0.25, None)
    getitem_2 = attention_default[0]
    return (getitem_2,)
""")

    def test_repeat_interleave_kv(self):
        self.check(repeat_interleave_kv, [qkv(B, 6, N, D)[0], *qkv(B, 2, N, D)[1:]], "dense", """\
def forward(self, L_k_ : torch.Tensor, L_v_ : torch.Tensor, L_q_ : torch.Tensor):
    l_k_ = L_k_
    l_v_ = L_v_
    l_q_ = L_q_
    k = l_k_.repeat_interleave(3, dim = 1)
    v = torch.repeat_interleave(l_v_, 3, dim = 1)
    getattr_1 = k.mT
    matmul = l_q_ @ getattr_1
    mul = matmul * 0.25
    softmax = mul.softmax(-1)
    matmul_1 = softmax @ v
    return (matmul_1,)
---- after flash_fx ----
def forward(self, L_k_ : torch.Tensor, L_v_ : torch.Tensor, L_q_ : torch.Tensor):
    l_k_ = L_k_
    l_v_ = L_v_
    l_q_ = L_q_
    attention_default = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, None, 0.25, None)
    getitem = attention_default[0]
    return (getitem,)
""")

    def test_repeat_tiled_kv(self):
        self.check(repeat_tiled_kv, [qkv(B, 6, N, D)[0], *qkv(B, 2, N, D)[1:]], "dense", """\
def forward(self, L_k_ : torch.Tensor, L_v_ : torch.Tensor, L_q_ : torch.Tensor):
    l_k_ = L_k_
    l_v_ = L_v_
    l_q_ = L_q_
    k = l_k_.repeat(1, 3, 1, 1)
    v = l_v_.repeat(1, 3, 1, 1)
    getattr_1 = k.mT
    matmul = l_q_ @ getattr_1
    mul = matmul * 0.25
    softmax = mul.softmax(-1)
    matmul_1 = softmax @ v
    return (matmul_1,)
---- after flash_fx ----
def forward(self, L_k_ : torch.Tensor, L_v_ : torch.Tensor, L_q_ : torch.Tensor):
    l_k_ = L_k_
    l_v_ = L_v_
    l_q_ = L_q_
    attention_default = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, None, 0.25, None, kv_heads_tiled = True)
    getitem = attention_default[0]
    return (getitem,)
""")

    def test_broadcast_single_kv_head(self):
        self.check(broadcast_single_kv_head, [qkv(B, 4, N, D)[0], *qkv(B, 1, N, D)[1:]], "dense", """\
def forward(self, L_k_ : torch.Tensor, L_q_ : torch.Tensor, L_v_ : torch.Tensor):
    l_k_ = L_k_
    l_q_ = L_q_
    l_v_ = L_v_
    getattr_1 = l_k_.mT
    matmul = l_q_ @ getattr_1
    mul = matmul * 0.25
    softmax = mul.softmax(-1)
    matmul_1 = softmax @ l_v_
    return (matmul_1,)
---- after flash_fx ----
def forward(self, L_k_ : torch.Tensor, L_q_ : torch.Tensor, L_v_ : torch.Tensor):
    l_k_ = L_k_
    l_q_ = L_q_
    l_v_ = L_v_
    attention_default = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, None, 0.25, None)
    getitem = attention_default[0]
    return (getitem,)
""")

    def test_sdpa_plain_and_causal(self):
        self.check(sdpa_plain_and_causal, qkv(), ["dense", "causal"], """\
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    scaled_dot_product_attention = torch._C._nn.scaled_dot_product_attention(l_q_, l_k_, l_v_)
    scaled_dot_product_attention_1 = torch._C._nn.scaled_dot_product_attention(l_q_, l_k_, l_v_, is_causal = True, scale = 0.2)
    add = scaled_dot_product_attention + scaled_dot_product_attention_1
    return (add,)
---- after flash_fx ----
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    attention_default = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, None, 0.3535533905932738, None)
    getitem = attention_default[0]
    getitem_1 = attention_default[1]
    zero_dead_rows = flash_fx_op_zero_dead_rows(getitem, getitem_1)
    attention_default_1 = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, None, 0.2, 0)
    getitem_2 = attention_default_1[0]
    getitem_3 = attention_default_1[1]
    zero_dead_rows_1 = flash_fx_op_zero_dead_rows(getitem_2, getitem_3)
    add = zero_dead_rows + zero_dead_rows_1
    return (add,)
""")

    def test_sdpa_masks(self):
        self.check(sdpa_masks, qkv(), ["causal", "causal"], """\
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    ones = torch.ones(10, 10, dtype = torch.bool)
    keep = ones.tril()
    zeros = torch.zeros(10, 10)
    invert = ~keep
    bias = zeros.masked_fill(invert, -3.4028234663852886e+38)
    scaled_dot_product_attention = torch._C._nn.scaled_dot_product_attention(l_q_, l_k_, l_v_, attn_mask = keep)
    scaled_dot_product_attention_1 = torch._C._nn.scaled_dot_product_attention(l_q_, l_k_, l_v_, attn_mask = bias)
    add = scaled_dot_product_attention + scaled_dot_product_attention_1
    return (add,)
---- after flash_fx ----
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    attention_default = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, None, 0.3535533905932738, 0)
    getitem = attention_default[0]
    getitem_1 = attention_default[1]
    zero_dead_rows = flash_fx_op_zero_dead_rows(getitem, getitem_1)
    attention_default_1 = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, None, 0.3535533905932738, 0, excluded_fill = -3.4028234663852886e+38)
    getitem_2 = attention_default_1[0]
    getitem_3 = attention_default_1[1]
    zero_dead_rows_1 = flash_fx_op_zero_dead_rows(getitem_2, getitem_3)
    add = zero_dead_rows + zero_dead_rows_1
    return (add,)
""")

    def test_sdpa_gqa(self):
        self.check(sdpa_gqa, [qkv(B, 6, N, D)[0], *qkv(B, 2, N, D)[1:]], "dense", """\
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    scaled_dot_product_attention = torch._C._nn.scaled_dot_product_attention(l_q_, l_k_, l_v_, enable_gqa = True)
    return (scaled_dot_product_attention,)
---- after flash_fx ----
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    attention_default = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, None, 0.3535533905932738, None)
    getitem = attention_default[0]
    getitem_1 = attention_default[1]
    zero_dead_rows = flash_fx_op_zero_dead_rows(getitem, getitem_1)
    return (zero_dead_rows,)
""")

    def test_module_called_in_a_loop(self):
        self.check(Stack(), qkv(), "dense", """\
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    add = l_q_ + l_k_
    x = add + l_v_
    transpose = x.transpose(-2, -1)
    matmul = x @ transpose
    mul = matmul * 0.1
    softmax = torch.nn.functional.softmax(mul, dim = -1)
    x_1 = softmax @ x
    transpose_1 = x_1.transpose(-2, -1)
    matmul_2 = x_1 @ transpose_1
    mul_1 = matmul_2 * 0.1
    softmax_1 = torch.nn.functional.softmax(mul_1, dim = -1)
    x_2 = softmax_1 @ x_1
    transpose_2 = x_2.transpose(-2, -1)
    matmul_4 = x_2 @ transpose_2
    mul_2 = matmul_4 * 0.1
    softmax_2 = torch.nn.functional.softmax(mul_2, dim = -1)
    x_3 = softmax_2 @ x_2
    return (x_3,)
---- after flash_fx ----
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    add = l_q_ + l_k_
    x = add + l_v_
    attention_default = torch.ops.flash_fx.attention.default(x, x, x, None, 0.1, None)
    getitem = attention_default[0]
    attention_default_1 = torch.ops.flash_fx.attention.default(getitem, getitem, getitem, None, 0.1, None)
    getitem_1 = attention_default_1[0]
    attention_default_2 = torch.ops.flash_fx.attention.default(getitem_1, getitem_1, getitem_1, None, 0.1, None)
    getitem_2 = attention_default_2[0]
    return (getitem_2,)
""", count=3)

    def test_learned_bias(self):
        bias = torch.randn(1, H, N, N, requires_grad=True)
        self.check(learned_bias, [*qkv(), bias], "bias", """\
def forward(self, L_k_ : torch.Tensor, L_q_ : torch.Tensor, L_bias_ : torch.Tensor, L_v_ : torch.Tensor):
    l_k_ = L_k_
    l_q_ = L_q_
    l_bias_ = L_bias_
    l_v_ = L_v_
    getattr_1 = l_k_.mT
    matmul = l_q_ @ getattr_1
    mul = matmul * 0.5
    add = mul + l_bias_
    softmax = add.softmax(-1)
    matmul_1 = softmax @ l_v_
    return (matmul_1,)
---- after flash_fx ----
def forward(self, L_k_ : torch.Tensor, L_q_ : torch.Tensor, L_bias_ : torch.Tensor, L_v_ : torch.Tensor):
    l_k_ = L_k_
    l_q_ = L_q_
    l_bias_ = L_bias_
    l_v_ = L_v_
    attention_default = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, l_bias_, 0.5, None)
    getitem = attention_default[0]
    return (getitem,)
""")


class MultiheadAttentionTest(SnapshotCase):
    """nn.MultiheadAttention (Dynamo keeps F.multi_head_attention_forward as one call) with need_weights=False."""

    def run_case(self, batch_first, masks, inner):
        torch.manual_seed(0)
        module = nn.MultiheadAttention(16, 4, batch_first=batch_first).train()
        x = torch.randn(2, 7, 16) if batch_first else torch.randn(7, 2, 16)
        padding = torch.zeros(2, 7, dtype=torch.bool)
        padding[1, -2:] = True
        causal = torch.ones(7, 7, dtype=torch.bool).triu(1)

        def fn(x):
            extra = {"key_padding_mask": padding, "attn_mask": causal} if masks else {}
            return module(x, x, x, need_weights=False, **extra)[0]

        (report,) = compiled_matches_eager(fn, x.requires_grad_(), inner=inner)
        self.assertEqual([r.variant for r in report.rewrites], ["bias" if masks else "dense"])
        return report

    def test_plain_and_masked(self):
        for batch_first in (True, False):
            for masks in (False, True):
                self.run_case(batch_first, masks, "aot_eager")

    def test_snapshot(self):
        torch.manual_seed(0)
        module = nn.MultiheadAttention(16, 4, batch_first=True)
        self.check(lambda x: module(x, x, x, need_weights=False)[0], [torch.randn(2, 7, 16)], "dense", """\
def forward(self, L_x_ : torch.Tensor, L_module_parameters_in_proj_bias_ : torch.nn.parameter.Parameter, L_module_parameters_in_proj_weight_ : torch.nn.parameter.Parameter, L_module_modules_out_proj_parameters_weight_ : torch.nn.parameter.Parameter, L_module_modules_out_proj_parameters_bias_ : torch.nn.parameter.Parameter):
    l_x_ = L_x_
    l_module_parameters_in_proj_bias_ = L_module_parameters_in_proj_bias_
    l_module_parameters_in_proj_weight_ = L_module_parameters_in_proj_weight_
    l_module_modules_out_proj_parameters_weight_ = L_module_modules_out_proj_parameters_weight_
    l_module_modules_out_proj_parameters_bias_ = L_module_modules_out_proj_parameters_bias_
    query = l_x_.transpose(1, 0)
    multi_head_attention_forward = torch.nn.functional.multi_head_attention_forward(query, query, query, 16, 4, l_module_parameters_in_proj_weight_, l_module_parameters_in_proj_bias_, None, None, False, 0.0, l_module_modules_out_proj_parameters_weight_, l_module_modules_out_proj_parameters_bias_, training = True, key_padding_mask = None, need_weights = False, attn_mask = None, average_attn_weights = True, is_causal = False)
    attn_output = multi_head_attention_forward[0]
    attn_output_1 = attn_output.transpose(1, 0)
    return (attn_output_1,)
---- after flash_fx ----
def forward(self, L_x_ : torch.Tensor, L_module_parameters_in_proj_bias_ : torch.nn.parameter.Parameter, L_module_parameters_in_proj_weight_ : torch.nn.parameter.Parameter, L_module_modules_out_proj_parameters_weight_ : torch.nn.parameter.Parameter, L_module_modules_out_proj_parameters_bias_ : torch.nn.parameter.Parameter):
    l_x_ = L_x_
    l_module_parameters_in_proj_bias_ = L_module_parameters_in_proj_bias_
    l_module_parameters_in_proj_weight_ = L_module_parameters_in_proj_weight_
    l_module_modules_out_proj_parameters_weight_ = L_module_modules_out_proj_parameters_weight_
    l_module_modules_out_proj_parameters_bias_ = L_module_modules_out_proj_parameters_bias_
    query = l_x_.transpose(1, 0)
    multi_head_attention_forward = flash_fx_mha_multi_head_attention(query, query, query, 4, l_module_parameters_in_proj_weight_, l_module_parameters_in_proj_bias_, l_module_modules_out_proj_parameters_weight_, l_module_modules_out_proj_parameters_bias_, None, None, None, None, None, 0.0)
    attn_output = multi_head_attention_forward[0]
    attn_output_1 = attn_output.transpose(1, 0)
    return (attn_output_1,)
""")

    def test_weights_requested_but_unused_are_dropped(self):
        """need_weights=True (the module's default) with the weights never read: rewritten, equal to eager."""
        module = nn.MultiheadAttention(16, 4)
        x = torch.randn(7, 2, 16, requires_grad=True)
        captured = capture(lambda x: module(x, x, x)[0], x)
        self.assertEqual(captured.variants, ["dense"])
        self.assertNotIn("multi_head_attention_forward(", captured.after)
        compiled_matches_eager(lambda x: module(x, x, x)[0], x)

    def test_weights_read_are_skipped_naming_the_reader(self):
        module = nn.MultiheadAttention(16, 4)
        x = torch.randn(7, 2, 16)

        def with_weights(x):
            out, weights = module(x, x, x)
            return out + weights.sum()

        captured = capture(with_weights, x)
        self.assertEqual(captured.variants, [])
        self.assertIn("returns the attention weights, which", captured.skip_reasons[0])
        self.assertIn("need_weights=False", captured.skip_reasons[0])


def dropout_training(q, k, v):
    return F.dropout(F.softmax(q @ k.mT * 0.3, dim=-1), p=0.25, training=True) @ v


def sdpa_dropout(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.25, is_causal=True)


class FusedDropoutTest(TestCase):
    """Training-mode dropout on the probabilities runs inside the kernels with its own random stream: the
    compiled result equals eager attention with the kernels' keep mask (regenerated from the seed the op
    draws), reproducibly under torch.manual_seed."""

    def check_against_mask(self, fn, scale, causal):
        from flash_fx.kernels import dropout_keep_mask

        q, k, v = qkv()
        captured = capture(fn, q, k, v)
        (rewrite,) = captured.reports[0].rewrites
        self.assertIn("dropout p=0.25 fused", rewrite.notes)
        self.assertIn("dropout_p = 0.25", captured.after)
        compiled = torch.compile(fn, backend="flash_fx", options={"inner": "aot_eager", "report": False})
        torch.manual_seed(123)
        out = compiled(q, k, v)
        torch.manual_seed(123)
        self.assertTrue(torch.equal(compiled(q, k, v), out))  # reproducible under torch.manual_seed
        torch.manual_seed(123)
        seed = int(torch.randint(0, 2**31 - 1, (1,)))  # what the op draws
        keep = dropout_keep_mask(seed, 0, B * H, N, N, 0.25).view(B, H, N, N)
        scores = q @ k.mT * scale
        if causal:
            scores = scores.masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), float("-inf"))
        expected = (scores.softmax(-1) * keep / 0.75) @ v
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), grad)
        want = torch.autograd.grad(expected, (q, k, v), grad)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
        torch._dynamo.reset()

    def test_dropout_training(self):
        self.check_against_mask(dropout_training, 0.3, causal=False)

    def test_sdpa_dropout(self):
        self.check_against_mask(sdpa_dropout, D**-0.5, causal=True)
