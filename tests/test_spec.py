"""The attention spec and the tile schedule: what a spec stands for (materialize / reference against terms built
independently), both kernel paths against the spec's float64 reference forward and backward, the op schema round
trip, validation errors, and the schedule's classes against a brute force over the dense mask."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from flash_fx.kernels import attention_backward, attention_forward  # noqa: E402
from flash_fx.kernels.schedule import EMPTY, FULL, schedule  # noqa: E402
from flash_fx.kernels.spec import (  # noqa: E402
    UNBOUNDED,
    Alibi,
    AttentionInputError,
    AttentionSpec,
    Band,
    Bias,
    Documents,
    Dropout,
    RelativeTable,
    Saved,
)
from test_kernels import alibi_bias, relative_bias  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

B, HQ, HKV, NQ, NK, D = 2, 4, 2, 37, 43, 16


def inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=g).to(dtype) for h, n in ((HQ, NQ), (HKV, NK), (HKV, NK)))
    return q, k, v


def documents():
    """Sorted ids; every query sees keys of its own document (no row is hidden entirely with the band below)."""
    q_ids = torch.tensor([[0] * 9 + [1] * 11 + [2] * 17, [0] * 20 + [1] * 17])
    k_ids = torch.tensor([[0] * 11 + [1] * 13 + [2] * 19, [0] * 24 + [1] * 19])
    return Documents(q_ids, k_ids)


def full_spec(**changes):
    """A spec with every term: band, key validity, documents, bias, ALiBi, relative table, GQA tiled."""
    g = torch.Generator().manual_seed(5)
    key_valid = torch.ones(B, NK, dtype=torch.bool)
    key_valid[1, 3:5] = False
    spec = AttentionSpec(
        scale=D**-0.5, band=Band(12, 6), key_valid=key_valid, documents=documents(),
        bias=Bias(torch.randn(1, HQ, NQ, NK, generator=g)), alibi=Alibi(torch.rand(1, HQ, generator=g) * 0.1, True),
        relative=RelativeTable(torch.randn(B, 1, NQ + NK - 1, generator=g)), kv_heads_tiled=True)
    return spec.replace(**changes)


def test_materialize_is_the_sum_of_its_terms():
    """The dense terms of a spec, against each term built independently (and -inf exactly where a mask hides)."""
    q, k, _ = inputs()
    spec = full_spec().validate(*inputs())
    terms = spec.materialize(q, k)
    expected = spec.bias.values.double() + alibi_bias(spec.alibi.slopes[:1], True, NQ, NK, torch.float64)
    expected = expected + relative_bias(spec.relative.values.double(), NQ, NK, torch.float64)
    i, j = torch.arange(NQ)[:, None], torch.arange(NK)[None, :]
    visible = ((j <= i + 6) & (j >= i - 12))[None] & spec.key_valid[:, None, :]
    visible &= spec.documents.q_ids[:, :, None] == spec.documents.k_ids[:, None, :]
    expected = expected.masked_fill(~visible[:, None], float("-inf"))
    assert torch.equal(terms.isinf(), expected.isinf())
    torch.testing.assert_close(terms[~terms.isinf()], expected[~expected.isinf()])


CASES = {
    "everything": lambda: full_spec(),
    "causal_gqa_grouped": lambda: AttentionSpec(0.3, band=Band(None, NK - NQ)),
    "mask_bias": lambda: AttentionSpec(0.25, bias=Bias(torch.zeros(1, 1, NQ, NK).masked_fill(
        torch.rand(NQ, NK, generator=torch.Generator().manual_seed(2)) < 0.4, float("-inf")), holds_masks=True)),
    "dropout_window": lambda: AttentionSpec(0.25, band=Band(4, 4), dropout=Dropout(0.3, seed=11, offset=5)),
}


@pytest.mark.parametrize("path", ["triton", "tiled"])
@pytest.mark.parametrize("case", list(CASES))
def test_both_paths_equal_the_spec_reference(case, path, monkeypatch):
    """Forward and backward of both kernel paths against the spec's own float64 reference (autograd through
    ``reference`` for the gradients), float32 inputs at ragged sizes."""
    if path == "tiled":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = inputs(seed=3)
    spec = CASES[case]()
    wants_bias = spec.bias is not None and not spec.bias.holds_masks
    if wants_bias:
        spec = spec.replace(bias=Bias(spec.bias.values.clone().requires_grad_(), spec.bias.holds_masks))
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    checked = spec.validate(*leaves)
    if wants_bias:  # the reference differentiates the bias too
        checked = checked.replace(bias=Bias(spec.bias.values.double().expand(B, HQ, NQ, NK)))
    ref = checked.reference(*leaves)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out)

    out, lse = attention_forward(q, k, v, spec)
    torch.testing.assert_close(out.double(), ref.detach(), atol=2e-5, rtol=2e-5)
    dq, dk, dv, dbias, drel = attention_backward(grad_out.float(), Saved(q, k, v, out, lse),
                                                 spec.with_grads(False, False))
    for mine, theirs in zip((dq, dk, dv), ref_grads, strict=True):
        torch.testing.assert_close(mine.double(), theirs, atol=5e-5, rtol=5e-5)
    assert dbias is None and drel is None


def test_op_args_round_trip():
    """op_args and from_op_args are inverse: every term survives the custom op's flat schema."""
    spec = full_spec(dropout=Dropout(0.1), excluded_fill=-1e9,
                     bias=Bias(torch.zeros(1, 1, NQ, NK), holds_masks=True))
    args, kwargs = spec.op_args()
    back = AttentionSpec.from_op_args(*args, **kwargs)
    assert back.band == spec.band and back.scale == spec.scale and back.kv_heads_tiled
    assert back.key_valid is spec.key_valid and back.documents.q_ids is spec.documents.q_ids
    assert back.bias.values is spec.bias.values and back.bias.holds_masks
    assert back.alibi.slopes is spec.alibi.slopes and back.alibi.symmetric
    assert back.relative.values is spec.relative.values and back.dropout.p == 0.1 and back.excluded_fill == -1e9
    plain_args, plain_kwargs = AttentionSpec(0.5).op_args()
    assert plain_args == (None, 0.5, None) and plain_kwargs == {}
    window_only = AttentionSpec(0.5, band=Band(3, None)).op_args()
    assert window_only == ((None, 0.5, None), {"window": [3, UNBOUNDED]})
    assert AttentionSpec.from_op_args(None, 0.5, 2, window=[3, 5]).band == Band(3, 2)


@pytest.mark.parametrize("change,message", [
    (dict(key_valid=torch.ones(B, NK)), "key_valid must be a bool tensor"),
    (dict(key_valid=torch.ones(B, NK + 1, dtype=torch.bool)), r"key_valid must have shape \[2 or 1, 43\]"),
    (dict(bias=Bias(torch.zeros(3, HQ, NQ, NK))), "does not broadcast"),
    (dict(bias=Bias(torch.zeros(NQ, NK, dtype=torch.int32))), "bias must be a float tensor"),
    (dict(documents=Documents(torch.zeros(B, NQ), torch.zeros(B, NK))), "q_doc must hold integer ids"),
    (dict(dropout=Dropout(0.5)), "needs a seed"),
    (dict(dropout=Dropout(1.0, seed=1)), r"dropout_p must lie in \[0, 1\)"),
])
def test_validate_names_what_does_not_fit(change, message):
    with pytest.raises(AttentionInputError, match=message):
        AttentionSpec(1.0).replace(**change).validate(*inputs())


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (8, 16), (32, 8)])
@pytest.mark.parametrize("case", ["band_and_padding", "documents", "mask_bias"])
def test_schedule_never_skips_a_visible_pair_nor_unmasks_a_hidden_one(case, block_m, block_n):
    """Empty tiles hold no visible pair; full ones hold only visible pairs (and are not the ragged last key tile);
    band and key validity classes are exact (partial iff some pair is visible and some hidden or the tile ragged)."""
    q, k, v = inputs()
    spec = {"band_and_padding": full_spec(documents=None, bias=None, alibi=None, relative=None),
            "documents": full_spec(band=Band(), bias=None, alibi=None, relative=None),
            "mask_bias": CASES["mask_bias"]()}[case].validate(q, k, v)
    visible = ~spec.materialize(q, k).isinf()  # [B, H, Nq, Nk]
    classes = schedule(spec, NQ, NK, block_m, block_n).classes
    tiles_q, tiles_k = -(-NQ // block_m), -(-NK // block_n)
    assert classes.shape[-2:] == (tiles_q, tiles_k)
    classes = classes.expand(B, HQ, tiles_q, tiles_k)
    for i in range(tiles_q):
        for j in range(tiles_k):
            tile = visible[..., i * block_m:(i + 1) * block_m, j * block_n:(j + 1) * block_n].flatten(-2)
            some, every = tile.any(-1), tile.all(-1)
            cls = classes[..., i, j]
            assert not (some & (cls == EMPTY)).any(), "a tile with a visible pair is skipped"
            assert not (~every & (cls == FULL)).any(), "a tile with a hidden pair runs without masks"
            if (j + 1) * block_n > NK:
                assert not (cls == FULL).any(), "the ragged last key tile needs its range check"
            elif case == "band_and_padding":
                assert torch.equal(cls == EMPTY, ~some) and torch.equal(cls == FULL, every)
