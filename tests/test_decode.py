"""The decode kernels (kernels.triton_decode: the query heads of a KV head packed into one tile, the keys split
across programs, the splits merged by their log-sum-exps), under Triton's interpreter: outputs and LSE pairs of
every mask and term against the spec's float64 reference, one split and several, both GQA mappings, a few query
rows; the gradients of the prefill backward kernels from the decode forward's outputs; the rule that picks them;
and a test that fails if the prefill forward ran instead."""

import pytest
import torch
from flash_fx.kernels import Launch, attention_backward, attention_forward, decode, triton_decode, triton_forward
from flash_fx.kernels.spec import (
    Alibi,
    AttentionSpec,
    Band,
    Bias,
    Documents,
    FilledRows,
    RelativeTable,
    Saved,
    ScoreMod,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

HEADS, KV_HEADS, N_K, DIM = 8, 2, 90, 24


def case_spec(case: str, n_q: int) -> AttentionSpec:
    """One decode call's spec: the masks and terms a decode step meets (its random parts fixed by the case)."""
    g = torch.Generator().manual_seed(len(case))
    valid = torch.zeros(2, N_K, dtype=torch.bool)
    valid[0, :23] = True
    valid[1, 40:77] = True  # a ring buffer's valid slots need not start at 0
    empty_row = valid.clone()
    empty_row[1] = False  # batch row 1: no valid slot (rows without keys, or filled rows)
    holes = torch.randn(2, HEADS, n_q, N_K, generator=g).masked_fill(torch.rand(2, HEADS, n_q, N_K, generator=g) < 0.5,
                                                                     float("-inf"))
    holes[..., :16] = float("-inf")  # the first key tile hidden from every head: empty in the union schedule
    filled = torch.zeros(2, 1, 1, N_K)
    filled[0, ..., 30:] = torch.finfo(torch.float32).min
    filled[1] = torch.finfo(torch.float32).min  # batch row 1: every key hidden by a finite fill
    docs_q = torch.full((2, n_q), 1)
    docs_k = (torch.arange(N_K) >= 50).int().expand(2, N_K)
    return {
        "full_cache": AttentionSpec(0.3),
        "static_cache": AttentionSpec(0.3, key_valid=valid),
        "causal_step": AttentionSpec(0.3, band=Band(None, N_K - n_q)),
        "sliding_window": AttentionSpec(0.3, band=Band(40, N_K - n_q)),
        "documents": AttentionSpec(0.3, documents=Documents(docs_q, docs_k)),
        "per_head_mask_bias": AttentionSpec(0.3, bias=Bias(holes, holds_masks=True)),
        "finite_fill_bias": AttentionSpec(0.3, bias=Bias(filled)),
        "no_valid_slot": AttentionSpec(0.3, key_valid=empty_row),
        "filled_rows": AttentionSpec(0.3, key_valid=empty_row, filled_rows=FilledRows(torch.finfo(torch.float32).min,
                                                                                      True)),
        "alibi": AttentionSpec(0.3, band=Band(None, N_K - n_q), alibi=Alibi(torch.rand(1, HEADS, generator=g))),
        "relative": AttentionSpec(0.3, relative=RelativeTable(torch.randn(1, HEADS, n_q + N_K - 1, generator=g))),
        "softcap": AttentionSpec(0.3, key_valid=valid, score_mod=ScoreMod.parse("mul(0.2);tanh;mul(5.0)")),
        "head_gate": AttentionSpec(0.3, score_mod=ScoreMod.parse("mul_head", torch.rand(1, HEADS, generator=g))),
        "sinks": AttentionSpec(0.3, key_valid=valid, sinks=torch.randn(1, HEADS, 1, generator=g)),
    }[case]


def qkv(n_q, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((2, HEADS, n_q, DIM), (2, KV_HEADS, N_K, DIM), (2, KV_HEADS, N_K, DIM))
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


@pytest.fixture
def launched(monkeypatch):
    """The forward kernels that ran: the decode plans, and whether the prefill forward ran."""
    ran = {"decode": [], "prefill": 0}
    real_decode, real_prefill = triton_decode.attention_forward, triton_forward.attention_forward
    monkeypatch.setattr(triton_decode, "attention_forward",
                        lambda *a: ran["decode"].append(a[4]) or real_decode(*a))

    def prefill(*a):
        ran["prefill"] += 1
        return real_prefill(*a)

    monkeypatch.setattr(triton_forward, "attention_forward", prefill)
    return ran


def reference(spec, q, k, v):
    """Float64 output, LSE and the rows that see a key (LSE from the dense scores, a sink's logit included)."""
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    valid = spec.validate(*leaves)
    out = valid.reference(*leaves)
    kv = valid.kv_index(q.shape[1], k.shape[1], q.device)
    scores = valid.modified(leaves[0] @ leaves[1][:, kv].transpose(-1, -2) * spec.scale) + valid.materialize(q, k)
    if valid.sinks is not None:
        scores = torch.cat([scores, valid.sinks.double()[..., None]], -1)
    return leaves, out, scores.logsumexp(-1).detach()


CASES = ["full_cache", "static_cache", "no_valid_slot", "causal_step", "sliding_window", "documents",
         "per_head_mask_bias", "finite_fill_bias", "filled_rows", "alibi", "relative", "softcap", "head_gate", "sinks"]
#: (query rows, tiled GQA mapping, key splits): every case at two, the cache cases at all four.
LAYOUTS = {"one_row_3_splits": (1, False, 3), "three_rows_tiled_1_split": (3, True, 1),
           "one_row_tiled_1_split": (1, True, 1), "three_rows_3_splits": (3, False, 3)}


@pytest.mark.parametrize("case,layout", [
    (case, layout) for case in CASES for layout in LAYOUTS
    if case in ("full_cache", "static_cache", "no_valid_slot") or layout in list(LAYOUTS)[:2]])
def test_decode_kernels_match_the_float64_reference(case, layout, launched):
    """Outputs, LSE pairs and (through the prefill backward kernels, after a split forward) gradients against
    float64; rows without a key NaN with LSE -inf and no gradient."""
    n_q, tiled, splits = LAYOUTS[layout]
    q, k, v = qkv(n_q)
    spec = case_spec(case, n_q).replace(kv_heads_tiled=tiled)
    leaves, ref, ref_lse = reference(spec, q, k, v)
    out, lse = attention_forward(q, k, v, spec, Launch(splits=splits))
    assert launched["prefill"] == 0 and launched["decode"][0].splits == splits
    dead = ref.isnan().all(-1)
    assert torch.equal(out.isnan().all(-1), dead) and not out[~dead].isnan().any()
    torch.testing.assert_close(out[~dead].double(), ref[~dead].detach(), atol=2e-5, rtol=2e-5)
    if spec.filled_rows is None:
        assert torch.equal(lse[..., 0] == float("-inf"), dead)
        torch.testing.assert_close(lse[~dead].double().sum(-1), ref_lse[~dead], atol=2e-5, rtol=1e-6)

    if splits == 1:
        return
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grad_out = grad_out.masked_fill(dead[..., None], 0.0)
    expected = torch.autograd.grad(ref.masked_fill(dead[..., None], 0.0), leaves, grad_out)
    grads = attention_backward(grad_out.float(), Saved(q, k, v, out, lse), spec)
    for name, mine, want in zip("qkv", grads[:3], expected, strict=True):
        # the float64 softmax backward of a row without keys is NaN (0 * NaN): such rows pass no gradient
        torch.testing.assert_close(mine.double(), want.nan_to_num(0.0), atol=1e-4, rtol=1e-4, msg=f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_decode_is_within_twice_eagers_error(dtype, launched):
    """fp16/bf16 decode step over a static cache, three splits: error against float64 within twice that of eager
    attention in the same dtype (the contract's bound), plus 1e-6."""
    q, k, v = qkv(1, dtype, seed=4)
    spec = case_spec("static_cache", 1)
    _, ref, _ = reference(spec, q, k, v)
    out, _ = attention_forward(q, k, v, spec, Launch(splits=3))
    assert launched["decode"] and launched["prefill"] == 0
    eager = spec.validate(q, k, v).replace()
    kv = eager.kv_index(HEADS, KV_HEADS, q.device)
    scores = (q @ k[:, kv].transpose(-1, -2)) * spec.scale + eager.materialize(q, k, dtype)
    eager_out = scores.float().softmax(-1).to(dtype) @ v[:, kv]
    eager_error = (eager_out.double() - ref).abs().max().item()
    assert (out.double() - ref).abs().max().item() <= 2 * eager_error + 1e-6


def test_the_rule_picks_decode_for_short_queries_without_dropout():
    assert decode.chooses(1, 32, 4, dropout=False)  # 8 rows
    assert decode.chooses(2, 64, 2, dropout=False)  # 64 rows
    assert not decode.chooses(3, 64, 2, dropout=False)  # 96 rows: over a tile
    assert not decode.chooses(17, 4, 4, dropout=False)  # a prefill chunk
    assert not decode.chooses(1, 8, 8, dropout=True)  # dropout's stream is per query head
    assert not decode.chooses(0, 8, 8, dropout=False)


def test_plan_splits_the_keys_to_fill_the_card():
    """Enough splits for two programs per SM when B * Hkv is small, each of at least four key tiles, at most the
    key tiles; a given split count is kept."""
    q, k = torch.empty(1, 32, 1, 128), torch.empty(1, 4, 4096, 128)
    interpreted = decode.plan(q, k, k)  # 2 SMs assumed under the interpreter: 4 programs already
    assert interpreted.splits == 1 and interpreted.block_m == 16
    assert decode.plan(q, k, k, splits=7).splits == 7
    assert decode.plan(q, k[:, :, :20], k[:, :, :20], splits=7).splits == 2  # 20 keys: two tiles of 16


def test_prefill_lengths_and_dropout_keep_the_prefill_kernel(launched):
    q, k, v = qkv(20)
    attention_forward(q, k, v, AttentionSpec(0.3))
    assert launched["prefill"] == 1 and not launched["decode"]


@pytest.mark.parametrize("path", ["triton", "cpu"])
@pytest.mark.parametrize("fill", [float("-inf"), torch.finfo(torch.float32).min], ids=["-inf", "finfo.min"])
def test_compiled_decode_step_with_an_in_place_mask_equals_eager(fill, path, monkeypatch):
    """A compiled decode-shaped block (3 query rows against 70 cached keys, GQA 8:2 through repeat_kv) whose cache
    mask is built in place (masked_fill_ on a fresh tensor), with a batch row whose every slot is hidden (dead rows:
    NaN under -inf, eager's uniform average under finfo.min): values and gradients equal eager's, and on the Triton
    path the decode kernels ran."""
    from soundness import compare

    launches = []
    real = triton_decode.attention_forward
    monkeypatch.setattr(triton_decode, "attention_forward", lambda *a: launches.append(1) or real(*a))

    def step(q, k, v, filled):
        k, v = (x[:, :, None].expand(2, 2, 4, 70, 16).reshape(2, 8, 70, 16) for x in (k, v))
        scores = q @ k.transpose(-1, -2) * 0.25
        hidden = torch.zeros(2, 1, 1, 70, dtype=torch.bool)
        hidden.masked_fill_(torch.arange(70) >= filled[:, None, None, None], True)  # built in place
        return scores.masked_fill(hidden, fill).softmax(-1) @ v

    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 8, 3, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 70, 16, generator=g, requires_grad=True) for _ in range(2))
    filled = torch.tensor([41, 0])  # batch row 1: no filled slot
    reports = compare(step, q, k, v, filled, path=path, dead_rows=True)
    assert [r.kernel for report in reports for r in report.rewrites] == ["decode"]
    assert path == "cpu" or launches
