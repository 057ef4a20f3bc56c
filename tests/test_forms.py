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


class FormsTest(TestCase):
    def check(self, fn, inputs, variant, expected_graph, **tolerance):
        captured = capture(fn, *inputs)
        self.assertEqual(captured.variants, [variant], captured.skip_reasons)
        self.assertExpectedInline(captured.before + "---- after flash_fx ----\n" + captured.after, expected_graph,
                                  skip=1)
        compiled_matches_eager(fn, *inputs, **tolerance)

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
    permute = l_k_.permute(0, 1, 3, 2)
    transpose = permute.transpose(-2, -1)
    attention_default = torch.ops.flash_fx.attention.default(l_q_, transpose, l_v_, None, 0.35355339059327373, None)
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
    attention_default = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, None, 0.3, 0)
    getitem = attention_default[0]
    return (getitem,)
""")

    def test_cross_attention_lengths(self):
        q = torch.randn(B, H, 5, D, requires_grad=True)
        k, v = torch.randn(B, H, 11, D, requires_grad=True), torch.randn(B, H, 11, D, requires_grad=True)
        self.assertEqual(capture(matmul_operator, q, k, v).variants, ["dense"])
        compiled_matches_eager(matmul_operator, q, k, v)
