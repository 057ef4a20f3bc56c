"""Rows that a finite fill hides entirely (kernels.filled_rows): eager's uniform average over every key, forward and
backward (the gradient of an added fill reaching q, k, the bias and the relative table; none through a replacing
fill), on every kernel path, against the spec's float64 reference; compiled programs with such masks (transformers'
additive finfo.min mask, masked_fill with -1e9) equal eager with the structural variant in the report; where the
fill does not dwarf the scores, or other masks share the rows, the call or the block is left to eager's ops."""

import math

import pytest
import torch
from flash_fx.kernels.spec import AttentionSpec, Band, Bias, Documents, FilledRows, RelativeTable, Saved, ScoreMod
from soundness import RERAN, compare, kernel_path

from flash_fx import kernels

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

FILL = torch.finfo(torch.float32).min


def inputs(n_q, n_k, heads=4, kv_heads=2, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in ((2, heads, n_q, d), (2, kv_heads, n_k, d),
                                                             (2, kv_heads, n_k, d))]


def left_padding(n_k, pad):
    valid = torch.ones(2, n_k, dtype=torch.bool)
    valid[1, :pad] = False
    return valid


def cases(n_q, n_k):
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(2, 4, n_q, n_k, generator=g)
    table = torch.randn(1, 4, n_q + n_k - 1, generator=g)
    ids = torch.tensor([0] * 5 + [1] * (n_q - 5))
    return {
        # transformers' causal + left padding mask, added: the first rows of batch row 1 see no key
        "causal_padding_added": (AttentionSpec(0.25, band=Band(None, n_k - n_q), key_valid=left_padding(n_k, 7),
                                               filled_rows=FilledRows(FILL, added=True)), False),
        "window_padding_bias_grad": (AttentionSpec(0.25, band=Band(3, 0), key_valid=left_padding(n_k, 9),
                                                   bias=Bias(bias, requires_grad=True),
                                                   filled_rows=FilledRows(FILL, added=True)), True),
        "documents_replaced_tiled_heads": (AttentionSpec(0.25, documents=Documents(ids[None], torch.full((1, n_k), 1)),
                                                         kv_heads_tiled=True, filled_rows=FilledRows(-1e9)), False),
        # Gemma 2: soft-capping before the added mask, so the rows' gradient passes the modification's derivative
        "softcap_padding_added": (AttentionSpec(0.25, band=Band(None, n_k - n_q), key_valid=left_padding(n_k, 7),
                                                score_mod=ScoreMod.parse("mul(0.2);tanh;mul(5.0)"),
                                                filled_rows=FilledRows(FILL, added=True)), False),
        "relative_grad_padding": (AttentionSpec(0.25, key_valid=left_padding(n_k, n_k),
                                                relative=RelativeTable(table, requires_grad=True),
                                                filled_rows=FilledRows(FILL, added=True)), True),
    }


@pytest.mark.parametrize("path", ["triton", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["causal_padding_added", "window_padding_bias_grad", "documents_replaced_tiled_heads",
                                  "softcap_padding_added", "relative_grad_padding"])
def test_completed_rows_match_the_float64_reference(case, dtype, path):
    n_q, n_k = 21, 27
    q, k, v = inputs(n_q, n_k, dtype=dtype)
    spec, term_grads = cases(n_q, n_k)[case]
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    terms = [spec.bias.values if spec.bias else spec.relative.values] if term_grads else []
    wide_terms = [t.double().requires_grad_() for t in terms]
    wide = spec
    if spec.bias is not None:
        wide = wide.replace(bias=Bias(wide_terms[0] if term_grads else spec.bias.values.double()))
    if spec.relative is not None:  # the table as the dense term it stands for (validation detaches a table)
        index = RelativeTable.index(torch.arange(n_q), torch.arange(n_k), n_q)
        wide = wide.replace(relative=None, bias=Bias(wide_terms[0][:, :, index]))
    ref = wide.validate(*leaves).reference(*leaves)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, leaves + wide_terms, grad_out)

    with kernel_path(path):
        out, lse = kernels.attention_forward(q, k, v, spec)
        dq, dk, dv, dbias, drel = kernels.attention_backward(grad_out.to(dtype), Saved(q, k, v, out, lse), spec)
    visible = spec.validate(q, k, v).visible(torch.arange(n_q), torch.arange(n_k))
    completed = ~visible.any(-1)  # [B, Nq]
    assert completed.any() and (~completed).any()  # both kinds of rows are exercised
    assert not out.isnan().any()
    hidden = completed[:, None].expand(lse.shape[:3])
    fill = torch.tensor(spec.filled_rows.fill, dtype=torch.float32)
    assert torch.equal(lse[..., 0][hidden], fill.expand(int(hidden.sum())))
    assert torch.allclose(lse[..., 1][hidden], torch.tensor(math.log(n_k)))
    tolerance = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), ref.detach(), atol=tolerance, rtol=tolerance)
    mine = [dq, dk, dv] + ([dbias.sum_to_size(terms[0].shape) if spec.bias else drel.sum_to_size(terms[0].shape)]
                           if term_grads else [])
    for got, want in zip(mine, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, atol=tolerance * 10, rtol=tolerance * 10)
    if not spec.filled_rows.added:  # a replacing fill: the completed rows (the first five) pass no gradient to q
        assert dq[:, :, :5].abs().max() == 0


def _padded_attention(kind):
    """Attention as transformers' eager code writes it with an additive finfo.min mask (kind "added"), or with
    masked_fill(-1e9) of a boolean mask (kind "filled")."""

    def fn(q, k, v, valid):
        n_q, n_k = q.shape[-2], k.shape[-2]
        i = torch.arange(n_q)[:, None]
        j = torch.arange(n_k)[None, :]
        visible = (j <= i) & valid[:, None, None, :]
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        if kind == "added":
            scores = scores + torch.where(visible, 0.0, torch.finfo(q.dtype).min)
        else:
            scores = scores.masked_fill(~visible, -1e9)
        return scores.softmax(-1) @ v

    return fn


@pytest.mark.parametrize("path", ["triton", "cpu"])
@pytest.mark.parametrize("kind", ["added", "filled"])
def test_compiled_padding_masks_are_structural_and_exact(kind, path):
    q, k, v = (t.requires_grad_() for t in inputs(12, 12, heads=2, kv_heads=2, d=8))
    valid = left_padding(12, 4)
    reports = compare(_padded_attention(kind), q, k, v, valid, path=path)
    (rewrite,) = [r for report in reports for r in report.rewrites]
    assert rewrite.variant == "key_padding" and "uniform average" in rewrite.mask, rewrite.mask
    assert not [s for report in reports for s in report.skipped]  # no call ran the original ops


def test_a_fill_the_scores_do_not_vanish_beside_reruns_the_original_ops():
    """-1e4 added to scores of magnitude ~10: the hidden rows' entries differ (not uniform), so the op does not
    complete them; that call runs eager's ops (correct values, a report line saying why). (A masked_fill of -1e4
    replaces the scores: its rows are uniform whatever the scores, and are completed.)"""

    def fn(q, k, v, valid):
        scores = q @ k.transpose(-1, -2)
        return (scores + torch.where(valid[:, None, None, :], 0.0, -1e4)).softmax(-1) @ v

    q, k, v = (t.requires_grad_() for t in inputs(10, 10, heads=2, kv_heads=2, d=8))
    reports = compare(fn, q * 3, k * 3, v, left_padding(10, 10))
    reasons = [s.reason for report in reports for s in report.skipped]
    assert any(RERAN in r and "do not round to the fill" in r for r in reasons), reasons


def test_two_masks_sharing_the_rows_keep_the_bias():
    """A -inf causal masked_fill and an added finfo.min padding mask: a hidden row mixes -inf and finite entries
    (eager averages over the padding keys alone), which is not the uniform completion; the padding mask stays a
    bias and the result equals eager's."""

    def fn(q, k, v, valid):
        n = q.shape[-2]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        scores = (q @ k.transpose(-1, -2)).masked_fill(~causal, float("-inf"))
        scores = scores + torch.where(valid[:, None, None, :], 0.0, FILL)
        return scores.softmax(-1) @ v

    q, k, v = (t.requires_grad_() for t in inputs(10, 10, heads=2, kv_heads=2, d=8))
    reports = compare(fn, q, k, v, left_padding(10, 3))
    (rewrite,) = [r for report in reports for r in report.rewrites]
    assert rewrite.variant == "bias" and "uniform average" not in rewrite.mask, rewrite.mask
