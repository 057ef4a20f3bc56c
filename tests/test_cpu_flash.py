"""The CPU path through PyTorch's C++ flash kernel: dense and causal specs (any offset, rows without keys, Nq != Nk,
both GQA mappings, float32 and bfloat16) against the spec's float64 reference forward and backward, the path
taken where it should be (and not where it cannot serve), and compiled models on it equal to eager."""

import pytest
import torch
from flash_fx.kernels import attention_backward, attention_forward, cpu_flash, tiled_torch
from flash_fx.kernels.spec import Alibi, AttentionSpec, Band, Bias, Documents, Dropout, Saved
from soundness import compare, variants

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(autouse=True)
def cpu_kernels(monkeypatch):
    """The CPU paths (not Triton's interpreter), and a record of which one ran."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    taken = []
    for module, name in ((cpu_flash, "attention_forward"), (tiled_torch, "attention_forward")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _m=module: taken.append(_m.__name__) or _real(*a))
    return taken


def qkv(n_q, n_k, heads=4, kv_heads=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((2, heads, n_q, 24), (2, kv_heads, n_k, 24), (2, kv_heads, n_k, 24))
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n_q,n_k,upper", [
    (37, 37, None), (37, 37, 0), (29, 45, 16), (45, 29, -16), (45, 29, 3), (33, 50, -5), (20, 20, 100),
], ids=["dense", "causal", "bottom_right", "bottom_right_rows_without_keys", "tall", "negative_offset", "wide"])
@pytest.mark.parametrize("tiled", [False, True], ids=["grouped", "tiled"])
def test_matches_the_float64_reference(n_q, n_k, upper, tiled, dtype, cpu_kernels):
    q, k, v = qkv(n_q, n_k, dtype=dtype)
    spec = AttentionSpec(24**-0.5, band=Band(None, upper), kv_heads_tiled=tiled)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = spec.validate(*leaves).reference(*leaves).detach()
    alive = ~ref.isnan()  # rows without keys (i + upper < 0): NaN in the reference and in the kernel, no gradient
    first = 0 if upper is None else max(0, -upper)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    live_spec = spec.replace(band=Band(None, None if upper is None else upper + first))  # rows from `first` on
    live = live_spec.validate(leaves[0][:, :, first:], *leaves[1:]).reference(leaves[0][:, :, first:], *leaves[1:])
    ref_grads = torch.autograd.grad(live, leaves, grad_out[:, :, first:])

    out, lse = attention_forward(q, k, v, spec)
    assert cpu_kernels == ["flash_fx.kernels.cpu_flash"]
    assert torch.equal(out.isnan(), ~alive) and torch.equal(lse[..., 0] == float("-inf"), ~alive[..., 0])
    tolerance = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out[alive].double(), ref[alive].detach(), atol=tolerance, rtol=tolerance)
    grads = attention_backward(grad_out.to(dtype), Saved(q, k, v, out, lse), spec)
    for mine, theirs in zip(grads[:3], ref_grads, strict=True):
        assert mine.dtype == dtype
        torch.testing.assert_close(mine.double(), theirs, atol=tolerance * 5, rtol=tolerance * 5)
    assert grads[3] is None and grads[4] is None


@pytest.mark.parametrize("change", [
    dict(bias=Bias(torch.randn(37, 37), requires_grad=True)), dict(dropout=Dropout(0.2, seed=1)),
    dict(alibi=Alibi(torch.ones(1, 4))),
], ids=["bias_with_gradient", "dropout", "alibi"])
def test_specs_it_cannot_serve_run_the_tiled_path(change, cpu_kernels):
    q, k, v = qkv(37, 37)
    spec = AttentionSpec(0.2).replace(**change)
    out, _ = attention_forward(q, k, v, spec)
    assert cpu_kernels == ["flash_fx.kernels.tiled_torch"]
    assert not cpu_flash.serves(spec.validate(q, k, v), q)
    if not spec.dropout.enabled:
        torch.testing.assert_close(out.double(), spec.validate(q, k, v).reference(q, k, v), atol=2e-5, rtol=2e-5)


def structural_cases(n_q, n_k):
    """Specs with a window's lower bound, key validity (a batch row fully padded: rows without keys) and
    documents, alone and together, at sizes spanning several 256-row blocks."""
    key_valid = torch.ones(2, n_k, dtype=torch.bool)
    key_valid[0, -70:] = False
    key_valid[1, :] = False  # batch row 1 sees no key at all
    docs = torch.tensor([0] * 200 + [1] * 250 + [2] * (n_q - 450))
    unsorted = torch.arange(n_q) % 3
    return {
        "window": AttentionSpec(0.2, band=Band(100, 0)),
        "two_sided_window": AttentionSpec(0.2, band=Band(300, 40)),
        "key_padding": AttentionSpec(0.2, key_valid=key_valid),
        "causal_documents": AttentionSpec(0.2, band=Band(None, 0), documents=Documents(docs[None], docs[None])),
        "unsorted_documents": AttentionSpec(0.2, documents=Documents(unsorted[None], unsorted[None])),
        "window_padding_documents_gqa_tiled": AttentionSpec(0.2, band=Band(64, 0), key_valid=key_valid,
                                                            documents=Documents(docs[None], docs[None]),
                                                            kv_heads_tiled=True),
    }


@pytest.mark.parametrize("case", list(structural_cases(600, 600)))
def test_structural_masks_follow_the_schedule_and_match_the_reference(case, cpu_kernels):
    """Windows, key padding and documents on the C++ path (calls over the schedule's full and partial runs),
    against a float64 reference, rows without keys included (NaN, no gradient)."""
    n = 600
    q, k, v = qkv(n, n, seed=7)
    spec = structural_cases(n, n)[case]
    assert_matches_reference_with_dead_rows(q, k, v, spec, cpu_kernels, tolerance=2e-5, grad_tolerance=1e-4)


def assert_matches_reference_with_dead_rows(q, k, v, spec, taken, tolerance, grad_tolerance):
    """The C++ path's forward and backward of ``spec`` against a float64 reference: rows without keys NaN (LSE
    -inf) and without gradient; the reference is the same attention with its masks as a bias, finite on those rows."""
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    terms = spec.validate(*leaves).materialize(*leaves[:2])
    dead = terms.isinf().all(-1, keepdim=True)
    finite = AttentionSpec(spec.scale, bias=Bias(terms.masked_fill(dead, 0.0)), kv_heads_tiled=spec.kv_heads_tiled)
    ref = finite.validate(*leaves).reference(*leaves)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out.masked_fill(dead, 0.0))

    out, lse = attention_forward(q, k, v, spec)
    assert taken == ["flash_fx.kernels.cpu_flash"]
    alive = ~dead.expand(ref.shape)
    assert torch.equal(out.isnan(), ~alive) and torch.equal(lse[..., 0] == float("-inf"), dead[..., 0])
    torch.testing.assert_close(out[alive].double(), ref[alive].detach(), atol=tolerance, rtol=tolerance)
    grads = attention_backward(grad_out.to(q.dtype), Saved(q, k, v, out, lse), spec)
    for mine, theirs in zip(grads[:3], ref_grads, strict=True):
        assert mine.dtype == q.dtype
        torch.testing.assert_close(mine.double(), theirs, atol=grad_tolerance, rtol=grad_tolerance)


def bias_cases(n):
    """Specs with a bias: dense float, transformers' padding mask of float32's lowest value (broadcast), per head with
    -inf holes (rows without keys too), a mask bias whose empty tiles are skipped, and a bias beside a window,
    documents and GQA."""
    g = torch.Generator().manual_seed(11)
    dense = torch.randn(2, 1, n, n, generator=g)
    holes = torch.randn(2, 4, n, n, generator=g).masked_fill(torch.rand(2, 4, n, n, generator=g) < 0.3, float("-inf"))
    holes[1, 2, 5:9] = float("-inf")  # rows without keys
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    blocks = torch.zeros(n, n).masked_fill((i // 256 != j // 256) & (j > 300), float("-inf"))
    docs = torch.tensor([0] * 200 + [1] * (n - 200))
    padding = torch.zeros(2, 1, 1, n)  # transformers' additive padding mask, broadcast over heads and rows
    padding[1, ..., n // 2:] = torch.finfo(torch.float32).min
    return {
        "dense_bias": AttentionSpec(0.2, bias=Bias(dense)),
        "padding_bias_of_lowest_floats": AttentionSpec(0.2, bias=Bias(padding)),
        "per_head_holes": AttentionSpec(0.2, bias=Bias(holes)),
        "mask_bias_skipping_tiles": AttentionSpec(0.2, bias=Bias(blocks, holds_masks=True)),
        "bias_window_documents_gqa": AttentionSpec(0.2, band=Band(150, 0), bias=Bias(dense),
                                                   documents=Documents(docs[None], docs[None]), kv_heads_tiled=True),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(bias_cases(8)))
def test_biases_run_one_call_per_block_and_match_the_reference(case, dtype, cpu_kernels):
    """Biases on the C++ path (one call per block of rows over the keys the schedule visits) against a float64
    reference, forward and backward, at ragged sizes over several blocks; rows without keys NaN, no gradient."""
    n_q, n_k = 600, 520
    q, k, v = qkv(n_q, n_k, dtype=dtype, seed=3)
    spec = bias_cases(max(n_q, n_k))[case]
    values = spec.bias.values
    values = values[..., :n_q if values.shape[-2] > 1 else 1, :n_k]
    spec = spec.replace(bias=Bias(values, holds_masks=spec.bias.holds_masks))
    if spec.documents is not None:
        ids = spec.documents.q_ids
        spec = spec.replace(documents=Documents(ids[:, :n_q], ids[:, :n_k]))
    tolerance = 2e-5 if dtype == torch.float32 else 3e-2
    assert_matches_reference_with_dead_rows(q, k, v, spec, cpu_kernels, tolerance, tolerance * 5)


def test_rows_hidden_entirely_by_a_large_finite_bias_run_the_tiled_path(cpu_kernels):
    """A row that a bias of float32's lowest value hides entirely is eager's uniform average, whose log-sum-exp
    (lowest + log Nk) rounds to lowest: the C++ backward, which takes the rounded value alone, would scale its
    gradients by Nk, so the call runs on the tiled path (pairs of floats) and matches eager forward and backward."""
    q, k, v = (t.requires_grad_() for t in qkv(40, 40, heads=2, kv_heads=2))
    bias = torch.randn(40, 40)
    bias[3] = torch.finfo(torch.float32).min  # query row 3 sees nothing but the fill
    spec = AttentionSpec(0.2, bias=Bias(bias))
    out, lse = attention_forward(q.detach(), k.detach(), v.detach(), spec)
    assert cpu_kernels == ["flash_fx.kernels.cpu_flash", "flash_fx.kernels.tiled_torch"]
    assert not cpu_flash.keeps_precision(lse)
    expected = torch.softmax(q @ k.transpose(-1, -2) * 0.2 + bias, -1) @ v
    torch.testing.assert_close(out, expected.detach(), atol=2e-5, rtol=2e-5)
    grad_out = torch.randn(expected.shape)
    mine = attention_backward(grad_out, Saved(q.detach(), k.detach(), v.detach(), out, lse), spec)
    theirs = torch.autograd.grad(expected, (q, k, v), grad_out)
    for a, b in zip(mine[:3], theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_float64_runs_the_tiled_path(cpu_kernels):
    q, k, v = qkv(20, 20, dtype=torch.float64)
    attention_forward(q, k, v, AttentionSpec(0.2, band=Band(None, 0)))
    assert cpu_kernels == ["flash_fx.kernels.tiled_torch"]


def test_compiled_causal_attention_on_the_cpu_path_equals_eager(cpu_kernels):
    """A compiled model on this path: values and input gradients equal eager's (the soundness suite's compare)."""
    def causal(q, k, v):
        n = q.shape[-2]
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        return (q @ k.transpose(-1, -2) / 4.9).masked_fill(~mask, float("-inf")).softmax(-1) @ v

    q, k, v = (t.requires_grad_() for t in qkv(33, 33, heads=2, kv_heads=2))
    assert variants(compare(causal, q, k, v, path="cpu")) == ["causal"]
    assert "flash_fx.kernels.cpu_flash" in cpu_kernels


def test_compiled_attention_with_an_additive_padding_mask_on_the_cpu_path_equals_eager(cpu_kernels):
    """transformers' eager padding mask (float32's lowest value added to the scores of padded keys) compiled on the
    C++ path: values and input gradients equal eager's."""
    def padded(q, k, v, mask):
        return (q @ k.transpose(-1, -2) * 0.2 + mask).softmax(-1) @ v

    q, k, v = (t.requires_grad_() for t in qkv(40, 40, heads=2, kv_heads=2))
    mask = torch.zeros(2, 1, 1, 40)
    mask[1, ..., 25:] = torch.finfo(torch.float32).min
    assert variants(compare(padded, q, k, v, mask, path="cpu")) == ["bias"]
    assert set(cpu_kernels) == {"flash_fx.kernels.cpu_flash"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", ["causal", "window_padding_documents_gqa_tiled"])
def test_low_precision_error_within_the_spec_bound(case, dtype, cpu_kernels):
    """In 16-bit dtypes the C++ path's error against float64 stays within SPEC's bound: twice eager attention's
    error in the same dtype (plus 1e-6), merging of chunks included."""
    cases = {**structural_cases(600, 600), "causal": AttentionSpec(0.2, band=Band(None, 0))}
    spec = cases[case]
    q, k, v = qkv(600, 600, seed=7, dtype=dtype)
    wide = [t.double() for t in (q, k, v)]
    terms = spec.validate(*wide).materialize(*wide[:2])
    dead = terms.isinf().all(-1, keepdim=True)
    finite = terms.masked_fill(dead, 0.0)
    ref = AttentionSpec(spec.scale, bias=Bias(finite), kv_heads_tiled=spec.kv_heads_tiled).validate(*wide).reference(*wide)
    heads = torch.arange(q.shape[1])
    kv = heads % k.shape[1] if spec.kv_heads_tiled else heads // (q.shape[1] // k.shape[1])
    eager = ((q @ k[:, kv].transpose(-1, -2)) * spec.scale + finite.to(dtype)).softmax(-1) @ v[:, kv]
    out, _ = attention_forward(q, k, v, spec)
    alive = ~dead.expand(ref.shape)
    error, eager_error = ((x.double()[alive] - ref[alive]).abs().max() for x in (out, eager))
    assert cpu_kernels == ["flash_fx.kernels.cpu_flash"] and error <= 2 * eager_error + 1e-6


@pytest.mark.parametrize("kwargs", [{}, {"window": [15, 0]}, {"q_doc": "docs", "k_doc": "docs"}],
                         ids=["causal", "window", "documents"])
def test_memory_of_forward_and_backward_is_linear_in_n(kwargs, cpu_kernels):
    """What the op keeps for the backward grows linearly with N (no Nq x Nk scores or probabilities), and so does
    what any op of the backward allocates (the profiler's memory records of every op, inner ones included, where a
    quadratic temporary would quadruple when N doubles)."""
    import flash_fx  # noqa: F401

    def run(n):
        q, k, v = (t.requires_grad_() for t in qkv(n, n, heads=2, kv_heads=2))
        args = {key: (torch.arange(n)[None].expand(2, n) * 3 // n if value == "docs" else value)
                for key, value in kwargs.items()}
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
            out = torch.ops.flash_fx.attention(q, k, v, None, 0.2, 0, **args)[0]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            out.sum().backward()
        largest = max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)
        return sum(saved), largest

    (saved_n, largest_n), (saved_2n, largest_2n) = run(256), run(512)
    assert saved_2n <= 2.05 * saved_n  # linear (a constant for the seed)
    assert 0 < largest_2n <= 2.5 * largest_n  # a quadratic temporary would quadruple


def decode_cases(n_k):
    """Decode-step specs (few query rows against a cache): a full cache, a static cache's valid slots (a batch row
    with none: rows without keys), a bottom-right causal step, a per-head bias and a key mask as a float bias."""
    key_valid = torch.zeros(2, n_k, dtype=torch.bool)
    key_valid[0, : n_k // 4] = True  # batch row 1: no valid slot
    g = torch.Generator().manual_seed(5)
    per_head = torch.randn(2, 8, 1, n_k, generator=g)
    padding = torch.zeros(2, 1, 1, n_k).masked_fill(~key_valid[:, None, None, :], float("-inf"))
    padding[1] = 0.0
    return {
        "full_cache": AttentionSpec(0.2),
        "static_cache": AttentionSpec(0.2, key_valid=key_valid),
        "causal_step": AttentionSpec(0.2, band=Band(None, n_k - 1)),
        "per_head_bias": AttentionSpec(0.2, bias=Bias(per_head)),
        "key_mask_bias": AttentionSpec(0.2, bias=Bias(padding)),
    }


@pytest.mark.parametrize("tiled", [False, True], ids=["grouped", "tiled"])
@pytest.mark.parametrize("n_q", [1, 3])
@pytest.mark.parametrize("case", list(decode_cases(300)))
def test_decode_steps_pack_the_query_group_into_one_call(case, n_q, tiled, cpu_kernels, monkeypatch):
    """A few query rows against 300 keys, 8 query heads on 2 KV heads: one C++ call per part for all heads (the
    group's heads packed into its rows), not one per member of the group; values and gradients against float64."""
    n_k = 300
    q, k, v = qkv(n_q, n_k, heads=8, kv_heads=2, seed=3)
    spec = decode_cases(n_k)[case].replace(kv_heads_tiled=tiled)
    calls = []
    real = cpu_flash._FORWARD
    monkeypatch.setattr(cpu_flash, "_FORWARD", lambda q, *a, **kw: calls.append(q.shape) or real(q, *a, **kw))
    assert_matches_reference_with_dead_rows(q, k, v, spec, cpu_kernels, tolerance=2e-5, grad_tolerance=1e-4)
    causal_rows = case == "causal_step" and n_q > 1  # a triangle per row: one call per group member
    assert calls and all(shape[1:3] == ((2, n_q) if causal_rows else (2, 4 * n_q)) for shape in calls), calls
