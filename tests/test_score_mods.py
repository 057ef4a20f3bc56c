"""Score modifications (kernels.spec.ScoreMod): a pointwise chain on the scaled scores before the masks, taken from
the model's own code (Gemma 2's soft-capping, clamps, a per-head sigmoid gate, a squared ReLU), run inside both
kernel paths with its derivative: the kernels against the spec's float64 reference forward and backward, compiled
programs against eager (values and gradients, the report naming the modification), a snapshot of the rewrite,
and the forms that must stay with eager's ops (a function after a mask or after a row-max subtraction, a factor
that needs a gradient)."""

import pytest
import torch
from flash_fx.kernels.spec import AttentionSpec, Band, Bias, ScoreMod
from flash_fx.kernels.spec import Saved as SavedTensors
from helpers import capture
from soundness import compare, kernel_path

from flash_fx import kernels

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

MODS = {
    "softcap": ("mul(0.2);tanh;mul(5.0)", None),
    "clamp": ("clamp(-1.5,0.75)", None),
    "sigmoid_gate": ("mul_head", torch.sigmoid(torch.tensor([[0.3, -1.2, 2.0, 0.0]]))),
    "squared_relu": ("relu;square;mul(0.5)", None),
    "sigmoid_tanh_chain": ("sigmoid;add(-0.5);mul(4.0);tanh", None),
}


def qkv(dtype, n_q=19, n_k=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in ((2, 4, n_q, 16), (2, 2, n_k, 16), (2, 2, n_k, 16))]


@pytest.mark.parametrize("path", ["triton", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mod", list(MODS))
def test_kernels_match_the_float64_reference(mod, dtype, path):
    """Forward and backward with a causal band, key padding and GQA; a bias too for the softcap (added after the
    modification, so its gradient is dS itself while q and k get dS times the modification's derivative)."""
    text, factor = MODS[mod]
    q, k, v = qkv(dtype)
    valid = torch.ones(2, 23, dtype=torch.bool)
    valid[1, 17:] = False
    bias = Bias(torch.randn(1, 4, 19, 23, generator=torch.Generator().manual_seed(5)), requires_grad=True) \
        if mod == "softcap" else None
    spec = AttentionSpec(0.5, band=Band(None, 4), key_valid=valid, bias=bias, score_mod=ScoreMod.parse(text, factor))
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    wide_bias = [bias.values.double().requires_grad_()] if bias else []
    wide = spec.replace(bias=Bias(wide_bias[0])) if bias else spec
    ref = wide.validate(*leaves).reference(*leaves)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = torch.autograd.grad(ref, leaves + wide_bias, grad_out)

    with kernel_path(path):
        out, lse = kernels.attention_forward(q, k, v, spec)
        dq, dk, dv, dbias, _ = kernels.attention_backward(grad_out.to(dtype), SavedTensors(q, k, v, out, lse), spec)
    got = [dq, dk, dv] + ([dbias.sum_to_size(bias.values.shape)] if bias else [])
    tolerance = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.double(), ref.detach(), atol=tolerance, rtol=tolerance)
    for name, mine, want in zip(["dq", "dk", "dv", "dbias"], got, expected, strict=False):
        assert mine.shape == want.shape, name
        scale = float(want.abs().max())
        error = float((mine.double() - want).abs().max()) / scale
        assert error < tolerance * 10, (name, error)


def causal_mask(q, additive):
    n = q.shape[-2]
    visible = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    return torch.where(visible, 0.0, torch.finfo(q.dtype).min) if additive else visible


def softcap(q, k, v):
    """Gemma 2's eager attention: scale, soft-cap with tanh, then the additive mask."""
    mask = causal_mask(q, True)
    scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    scores = torch.tanh(scores / 2.0) * 2.0
    scores = scores + mask
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def clamped(q, k, v):
    mask = causal_mask(q, False)
    scores = (q @ k.transpose(-1, -2)).clamp(min=-2.0, max=1.5)
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


class Gated(torch.nn.Module):
    """A per-head sigmoid gate on the scores, from a buffer."""

    def __init__(self, heads):
        super().__init__()
        self.register_buffer("gate", torch.linspace(-1.0, 2.0, heads))

    def forward(self, q, k, v):
        mask = causal_mask(q, True)
        scores = q @ k.transpose(-1, -2) * 0.3
        scores = scores * torch.sigmoid(self.gate).view(1, -1, 1, 1)
        return (scores + mask).softmax(-1) @ v


def squared_relu(q, k, v):
    mask = causal_mask(q, False)
    scores = torch.relu(q @ k.transpose(-1, -2) * 0.25) ** 2
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def inputs():
    torch.manual_seed(0)
    return [torch.randn(2, 3, 12, 8, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("path", ["triton", "cpu"])
@pytest.mark.parametrize("fn,described", [
    (softcap, "tanh(s) * 2"),
    (clamped, "clamp(s, -2, 1.5)"),
    (Gated(3), "s * factor[h]"),
    (squared_relu, "(relu(s))^2"),
], ids=["softcap", "clamp", "sigmoid_gate", "squared_relu"])
def test_compiled_modifications_equal_eager(fn, described, path):
    reports = compare(fn, *inputs(), path=path)
    (rewrite,) = [r for report in reports for r in report.rewrites]
    assert rewrite.variant == "causal" and f"scores modified: {described}" in rewrite.notes, rewrite.notes


def test_softcap_rewrite_snapshot():
    captured = capture(softcap, *inputs())
    assert captured.variants == ["causal"], captured.skip_reasons
    call = [line.strip() for line in captured.after.splitlines() if "flash_fx.attention" in line]
    assert call == ["attention_default = torch.ops.flash_fx.attention.default(l_q_, l_k_, l_v_, None, 0.1767766952966369, "
                    "0, excluded_fill = -3.4028234663852886e+38, score_mod = 'tanh;mul(2.0)')"], call


def tanh_after_mask(q, k, v):
    return torch.tanh((q @ k.transpose(-1, -2)) + causal_mask(q, True)).softmax(-1) @ v


def tanh_after_row_max(q, k, v):
    mask = causal_mask(q, True)
    scores = q @ k.transpose(-1, -2)
    scores = scores - scores.amax(-1, keepdim=True)
    return (torch.tanh(scores) + mask).softmax(-1) @ v


class LearnedGate(Gated):
    def __init__(self, heads):
        super().__init__(heads)
        self.gate = torch.nn.Parameter(torch.zeros(heads))


@pytest.mark.parametrize("fn,reason", [
    (tanh_after_mask, "tanh of the scores is applied after a mask or bias"),
    (tanh_after_row_max, "tanh of the scores is applied after a row-max subtraction"),
    (LearnedGate(3), "multiplied by a per-head tensor"),
], ids=["after_mask", "after_row_max", "learned_gate"])
def test_modifications_the_kernels_cannot_take_stay_with_eager(fn, reason):
    captured = capture(fn, *inputs())
    assert captured.variants == [] and any(reason in r for r in captured.skip_reasons), captured.skip_reasons
    compare(fn, *inputs())  # and the program still computes what eager computes


@pytest.mark.parametrize("path", ["triton", "cpu"])
@pytest.mark.parametrize("fill", [float("-inf"), torch.finfo(torch.float32).min], ids=["inf", "finfo_min"])
def test_softcap_with_an_in_place_mask_dead_rows_and_more_queries(fill, path):
    """Soft-capping before a mask built in place (a padding row hides every key of some queries), Nq != Nk: values
    and gradients equal eager's, NaN where eager's are NaN (the -inf fill's dead rows)."""
    def fn(q, k, v, valid):
        mask = torch.zeros(q.shape[0], 1, q.shape[-2], k.shape[-2], dtype=torch.bool)
        mask[:, :, :, :] = ~valid[:, None, None, :]  # written in place
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril(k.shape[-2] - q.shape[-2])
        mask |= ~causal
        scores = torch.tanh(q @ k.transpose(-1, -2) * 0.2) * 5.0
        return scores.masked_fill(mask, fill).softmax(-1) @ v

    torch.manual_seed(1)
    q = torch.randn(2, 2, 13, 8, requires_grad=True)
    k, v = (torch.randn(2, 2, 9, 8, requires_grad=True) for _ in range(2))
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :3] = False  # with the band's offset -4 the first rows of batch row 1 see no key
    reports = compare(fn, q, k, v, valid, path=path, dead_rows=True)
    assert len([r for report in reports for r in report.rewrites]) == 1
