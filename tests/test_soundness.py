"""One regression test per class of silently wrong result: compiled must equal eager, values and gradients,
on the Triton kernels (interpreter) and on the tiled PyTorch path; where a rewrite cannot be proved exact the
block is left alone, or the call reruns the original ops, with a report line saying why."""

import math

import pytest
import torch
import torch.nn as nn
from flash_fx.kernels.schedule import masked_threshold
from kernel_calls import spec_of
from soundness import compare, reran, skips, variants

import flash_fx
from flash_fx.exactness import layout_is_exact

MIN = torch.finfo(torch.float32).min
B, H, N, D = 2, 2, 8, 8
PATHS = pytest.mark.parametrize("path", ["triton", "tiled"])


def qkv(nq=N, nk=N, b=B, h=H, hk=H, grad=True):
    torch.manual_seed(nq * 31 + nk)
    return (torch.randn(b, h, nq, D, requires_grad=grad), torch.randn(b, hk, nk, D, requires_grad=grad),
            torch.randn(b, hk, nk, D, requires_grad=grad))


def attend(s, v):
    return s.softmax(-1) @ v


def plain_attention(q, k, v):
    return attend(q @ k.mT, v)


def compile_forced(fn, **options):
    """`fn` compiled by flash_fx (inner eager, rewrites forced), after a Dynamo reset and with no reports kept."""
    torch._dynamo.reset()
    flash_fx.clear_reports()
    return torch.compile(fn, backend="flash_fx", options={"inner": "eager", "report": False, "force": True, **options})


# 1. Writes in place to masks, biases, positions, scores and outputs.

def reference_sdpa_bias(q, k, v):  # the reference implementation in PyTorch's SDPA documentation
    L, S = q.size(-2), k.size(-2)
    b = torch.zeros(L, S, dtype=q.dtype)
    b.masked_fill_(torch.ones(L, S, dtype=torch.bool).triu(1), float("-inf"))
    return attend(q @ k.mT / math.sqrt(q.size(-1)) + b, v)


def tril_in_place(q, k, v):
    m = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool)
    m.tril_()
    return attend((q @ k.mT).masked_fill(~m, float("-inf")), v)


def setitem_mask(q, k, v):
    m = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool).tril()
    m[:, :3] = True
    return attend((q @ k.mT).masked_fill(~m, float("-inf")), v)


def clamped_positions(q, k, v):
    i, j = torch.arange(q.size(-2))[:, None], torch.arange(k.size(-2))[None]
    pos = (j - i).float()
    pos.clamp_(max=0)
    return attend(q @ k.mT + 0.5 * pos, v)


def scores_add_in_place(q, k, v):
    s = q @ k.mT
    s.add_(torch.ones(N, N).triu(1) * -3.0)
    return attend(s, v)


def scores_masked_fill_in_place(q, k, v):
    s = q @ k.mT
    s.masked_fill_(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    return attend(s, v)


def output_written(q, k, v):
    o = attend(q @ k.mT, v)
    o.mul_(2)
    return o


def query_scaled_in_place(q, k, v):
    q = q * 1.0
    q.mul_(0.5)  # q itself is scaled: the op must not read q and fold the scale a second time
    return attend(q @ k.mT, v)


@PATHS
@pytest.mark.parametrize("fn", [query_scaled_in_place, reference_sdpa_bias, tril_in_place, setitem_mask, clamped_positions,
                                scores_add_in_place, scores_masked_fill_in_place, output_written],
                         ids=lambda f: f.__name__)
def test_writes_in_place_are_seen(fn, path):
    reports = compare(fn, *qkv(), path=path)
    assert len(variants(reports)) == 1


@PATHS
def test_logical_or_in_place_and_buffer_copy(path):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mask", torch.ones(N, N, dtype=torch.bool).tril())

        def forward(self, q, k, v, extra):
            self.mask.copy_(extra)  # the mask read below is `extra`, not the registered causal mask
            m = self.mask.clone()
            m.logical_or_(torch.eye(N, dtype=torch.bool))
            return attend((q @ k.mT).masked_fill(~m, float("-inf")), v)

    extra = torch.rand(N, N) > 0.5
    reports = compare(Model(), *qkv(), extra, path=path)
    assert variants(reports) == ["bias"]


@PATHS
def test_bias_written_after_the_attention_is_left_alone(path):
    def fn(q, k, v, bias):
        b = bias.clone()
        o = attend(q @ k.mT + b, v)
        b.zero_()
        return o * b.sum()

    reports = compare(fn, *qkv(), torch.randn(N, N, requires_grad=True), path=path)
    assert variants(reports) == [] and any("written in place" in r for r in skips(reports))


# 2 and 3. Rows hidden entirely by finite fills (masked_fill / where block the gradient; added masks do not),
# alone or by the combination of several terms.

def dead_row_mask():
    m = torch.zeros(N, N, dtype=torch.bool)
    m[3] = True
    m[:, 5] = True
    return m


@PATHS
@pytest.mark.parametrize("form", ["masked_fill", "where", "masked_fill_1e4", "added"])
def test_rows_hidden_by_one_finite_fill(form, path):
    def fn(q, k, v, hidden):
        s = q @ k.mT
        if form == "masked_fill":
            s = s.masked_fill(hidden, MIN)
        elif form == "where":
            s = torch.where(hidden, MIN, s)
        elif form == "masked_fill_1e4":
            s = s.masked_fill(hidden, -1e4)
        else:
            s = s + torch.zeros(N, N).masked_fill(hidden, MIN)
        return attend(s, v)

    reports = compare(fn, *qkv(), dead_row_mask(), path=path)
    assert variants(reports) == ["bias"]


def left_padding():
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[0, :3] = False
    return valid


@PATHS
@pytest.mark.parametrize("form", ["causal_and_padding", "where_causal_plus_added_padding", "two_added_min"])
def test_rows_hidden_by_a_combination_of_masks(form, path):
    def fn(q, k, v, valid):
        causal = torch.ones(N, N, dtype=torch.bool).tril()
        s = q @ k.mT
        if form == "causal_and_padding":
            return attend(s.masked_fill(~(causal & valid[:, None, None, :]), MIN), v)
        padding = torch.zeros(B, 1, 1, N).masked_fill(~valid[:, None, None, :], MIN)
        if form == "where_causal_plus_added_padding":
            return attend(torch.where(causal, s, MIN) + padding, v)
        return attend(s + torch.zeros(N, N).masked_fill(~causal, MIN) + padding, v)

    reports = compare(fn, *qkv(), left_padding(), path=path)
    if form == "causal_and_padding":  # one fill: its hidden rows are completed as eager computes them
        assert variants(reports) == ["key_padding"] and not reran(reports)
    else:  # a row mixes two masks' entries: not uniform over the keys; that call runs the original ops
        assert len(variants(reports)) == 1 and reran(reports)


@PATHS
def test_added_finite_mask_with_dead_rows_stays_on_the_kernels(path):
    """transformers' eager mask (causal & left padding, added as 0 / finfo.min): its structural form, with the rows
    no key reaches completed as eager's uniform average (kernels.filled_rows), gradients included."""
    def fn(q, k, v, valid):
        visible = torch.ones(N, N, dtype=torch.bool).tril() & valid[:, None, None, :]
        return attend(q @ k.mT + torch.where(visible, 0.0, MIN), v)

    reports = compare(fn, *qkv(), left_padding(), path=path)
    assert variants(reports) == ["key_padding"] and not reran(reports)


@PATHS
def test_rows_not_hidden_run_the_kernels(path):
    def fn(q, k, v):
        causal = torch.ones(N, N, dtype=torch.bool).tril()
        return attend((q @ k.mT).masked_fill(~causal, MIN), v)

    reports = compare(fn, *qkv(), path=path)
    assert variants(reports) == ["causal"] and not reran(reports)


# 4. A band with more queries than keys leaves rows without a key.

@PATHS
@pytest.mark.parametrize("fill", [MIN, float("-inf")])
def test_bottom_right_band_with_more_queries_than_keys(fill, path):
    def fn(q, k, v):
        visible = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool).tril(k.size(-2) - q.size(-2))
        return attend((q @ k.mT).masked_fill(~visible, fill), v)

    reports = compare(fn, *qkv(nq=10, nk=6), path=path, dead_rows=True)
    assert variants(reports) == ["causal"]


# 5. Buffers changed between calls by any means.

@pytest.mark.parametrize("change", ["data", "numpy", "new_tensor"])
def test_changed_mask_buffer_is_always_seen(change):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mask", torch.ones(N, N, dtype=torch.bool).tril())

        def forward(self, q, k, v):
            return attend((q @ k.mT).masked_fill(~self.mask, float("-inf")), v)

    model = Model()
    q, k, v = qkv(grad=False)
    compiled = compile_forced(model)
    torch.testing.assert_close(compiled(q, k, v), model(q, k, v))
    new = torch.ones(N, N, dtype=torch.bool).tril(-1) | torch.eye(N, dtype=torch.bool).flip(0)
    if change == "data":
        model.mask.data.copy_(new)
    elif change == "numpy":
        model.mask.numpy()[...] = new.numpy()
    else:
        del model.mask
        model.register_buffer("mask", new)
    torch.testing.assert_close(compiled(q, k, v), model(q, k, v))
    torch._dynamo.reset()


# 6. NaN and +inf that eager overwrites.

@PATHS
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_values_hidden_by_a_later_fill_never_reach_the_result(value, path):
    def fn(q, k, v, bias, visible):
        return attend((q @ k.mT + bias).masked_fill(~visible, float("-inf")), v)

    visible = torch.rand(N, N) > 0.4
    visible[:, 0] = True
    bias = torch.randn(N, N)
    bias[~visible] = value
    compare(fn, *qkv(), bias, visible, path=path)


@PATHS
def test_nan_in_a_bias_under_a_causal_fill(path):
    def fn(q, k, v, bias):
        causal = torch.ones(N, N, dtype=torch.bool).tril()
        return attend((q @ k.mT + bias).masked_fill(~causal, float("-inf")), v)

    bias = torch.randn(N, N)
    bias[0, 5] = float("nan")
    compare(fn, *qkv(), bias, path=path)


# 7. A fill that the scores do not dwarf.

@PATHS
def test_fill_that_is_not_negligible(path):
    def rescaled(q, k, v):
        causal = torch.ones(N, N, dtype=torch.bool).tril()
        return attend((q @ k.mT * 1e4).masked_fill(~causal, -1e4) * 1e-4, v)

    def large_scores(q, k, v):
        causal = torch.ones(N, N, dtype=torch.bool).tril()
        return attend((q @ k.mT * 3e3).masked_fill(~causal, -1e4), v)

    assert variants(compare(rescaled, *qkv(), path=path)) == []
    reports = compare(large_scores, *qkv(), path=path)
    assert variants(reports) == ["causal"] and reran(reports)


# 8. Document ids and casts.

@PATHS
@pytest.mark.parametrize("kind", ["int64_wide", "bool", "float"])
def test_document_ids_of_any_dtype(kind, path):
    def fn(q, k, v, ids):
        same = ids[:, None, :, None] == ids[:, None, None, :]
        return attend((q @ k.mT).masked_fill(~same, float("-inf")), v)

    ids = torch.zeros(B, N, dtype=torch.int64)
    ids[:, 4:] = 2**32  # equal to 0 once truncated to int32
    ids = {"int64_wide": ids, "bool": ids != 0, "float": (ids != 0).float()}[kind]
    reports = compare(fn, *qkv(), ids, path=path)
    assert variants(reports) == ["bias" if kind == "float" else "document"]


def test_integer_cast_of_the_scores_is_left_alone():
    def fn(q, k, v):
        return attend((q @ k.mT * 10).to(torch.int32).float(), v)

    assert variants(compare(fn, *qkv())) == []


# 9. One-sided windows.

@PATHS
def test_one_sided_window(path):
    def fn(q, k, v):
        i, j = torch.arange(q.size(-2))[:, None], torch.arange(k.size(-2))[None]
        return attend((q @ k.mT).masked_fill(j < i - 2, float("-inf")), v)

    assert variants(compare(fn, *qkv(), path=path)) == ["sliding_window"]


# 10. nn.MultiheadAttention with a fully padded sequence.

@PATHS
def test_multihead_attention_fully_padded_sequence(path):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()

    def fn(x, padding):
        return mha(x, x, x, key_padding_mask=padding, need_weights=False)[0]

    padding = torch.zeros(2, N, dtype=torch.bool)
    padding[1] = True
    assert variants(compare(fn, torch.randn(2, N, 16, requires_grad=True), padding, path=path)) == ["bias"]


# Shapes that used to crash.

@PATHS
def test_broadcast_shapes(path):
    def masked(q, k, v, m):
        return attend((q @ k.mT).masked_fill(~m, float("-inf")), v)

    valid = left_padding()
    q1, (_, k, v) = qkv(b=1)[0], qkv()
    assert variants(compare(masked, q1, k, v, valid[:, None, None, :], path=path)) == ["key_padding"]
    flag = torch.tensor([True, True]).view(B, 1, 1, 1)
    assert variants(compare(masked, *qkv(), flag, path=path)) == ["bias"]
    one_head = qkv(h=1)[0]
    assert variants(compare(plain_attention, one_head, k, v, path=path)) == ["dense"]
    flat = torch.randn(N, D, requires_grad=True)
    assert variants(compare(plain_attention, flat, k, v, path=path)) == ["dense"]


def test_graph_writing_its_inputs_reruns_from_the_state_before_the_call():
    """A call that reruns the original ops first undoes the compiled graph's own writes to its inputs."""
    def fn(q, k, v, counter, hidden):
        counter.add_(1)
        return attend((q @ k.mT).masked_fill(hidden, MIN), v) * counter

    counter = torch.zeros(())
    twin = torch.zeros(())
    q, k, v = qkv(grad=False)
    expected = fn(q, k, v, twin, dead_row_mask())
    compiled = compile_forced(fn)
    torch.testing.assert_close(compiled(q, k, v, counter, dead_row_mask()), expected)
    assert counter.item() == twin.item() == 1.0
    torch._dynamo.reset()


def test_explain_keeps_the_users_compiled_code():
    q, k, v = qkv(grad=False)
    compiled = compile_forced(plain_attention)
    compiled(q, k, v)
    flash_fx.explain(plain_attention, q, k, v, force=True)
    compiled(q, k, v)
    assert len(flash_fx.reports()) == 1  # the second call ran the code compiled before explain, no recompile
    torch._dynamo.reset()


def test_verify_does_not_compare_two_dropout_draws():
    def dropped(q, k, v):
        return torch.nn.functional.dropout((q @ k.mT).softmax(-1), 0.3, training=True) @ v

    compile_forced(dropped, verify=True)(*qkv(grad=False))
    assert any("verify: not compared" in reason for reason in skips(flash_fx.reports()))
    torch._dynamo.reset()


def test_inputs_the_kernels_cannot_take_run_the_original_ops(monkeypatch):
    """A run-time input error of the kernels never reaches the user: the call runs the original ops, and the
    warning names the model line and the option that keeps flash_fx off the block."""
    from flash_fx import kernels

    def refuses(*args, **kwargs):
        raise kernels.AttentionInputError("q_doc must have shape [2 or 1, 8], got (3, 8)")

    q, k, v = qkv(grad=False)
    compiled = compile_forced(plain_attention)
    monkeypatch.setattr(kernels, "attention_forward", refuses)
    with pytest.warns(UserWarning, match=r"dense attention at test_soundness.py:\d+ .*'variants'"):
        torch.testing.assert_close(compiled(q, k, v), plain_attention(q, k, v))
    torch._dynamo.reset()


def test_block_layout_is_used_only_where_it_is_exact():
    """The layout skips entries at or below its threshold; it is used only where every row that keeps a visible
    entry beats the skipped ones by more than the scores can make up (decided from the inputs, forward and
    backward alike); elsewhere the dense bias pass runs."""
    q, k, _ = qkv(grad=False)
    threshold = masked_threshold(torch.float32)
    bias = torch.zeros(N, N).masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), MIN)
    bias[3] = MIN  # a row the bias hides entirely: the layout keeps its tile whole
    assert layout_is_exact(q, k, spec_of(D**-0.5, bias=bias), threshold)
    near = bias.clone()
    near[~torch.ones(N, N, dtype=torch.bool).triu(1)] = threshold * (1 - 2**-20)  # visible entries near the fills
    assert not layout_is_exact(q * 1e14, k * 1e14, spec_of(D**-0.5, bias=near), threshold)
    slopes = torch.full((1, H), 1e36)
    assert not layout_is_exact(q, k, spec_of(D**-0.5, bias=bias, alibi_slopes=slopes), threshold)


def test_an_unproven_layout_reads_the_masked_tiles():
    """The layout proof is a device-side flag the schedule applies (no host read): false turns every tile the bias
    masks into a partial tile that is read (the dense pass's result), true skips them; both equal the float64
    reference on inputs where skipping is exact."""
    from flash_fx.kernels import attention_forward
    from flash_fx.kernels.schedule import EMPTY, schedule
    from flash_fx.kernels.spec import AttentionSpec, Bias

    n = 48
    q, k, v = qkv(n, n, grad=False)
    blocks = torch.arange(n) // 16
    values = torch.zeros(n, n).masked_fill(blocks[:, None] != blocks[None, :], MIN)
    reference = AttentionSpec(D**-0.5, bias=Bias(values)).validate(q, k, v).reference(q, k, v)
    for proven in (True, False):
        spec = AttentionSpec(D**-0.5, bias=Bias(values, holds_masks=True, layout_exact=torch.tensor(proven)))
        classes = schedule(spec.validate(q, k, v), n, n, 16, 16).classes
        assert bool((classes == EMPTY).any()) == proven
        out, _ = attention_forward(q, k, v, spec)
        torch.testing.assert_close(out.double(), reference, atol=2e-5, rtol=2e-5)


def test_a_mask_bias_layout_is_reduced_once_per_contents(monkeypatch):
    """A constant mask's tile classes are computed on its first call and reused; an in-place write to the mask (its
    version counter moves) makes the next call reduce it again, and the output follows the new contents."""
    import importlib

    from flash_fx.kernels import attention_forward
    from flash_fx.kernels.spec import AttentionSpec, Bias

    schedule = importlib.import_module("flash_fx.kernels.schedule")  # the module (the package exports its function)
    reductions = []
    real = schedule.bias_classes
    monkeypatch.setattr(schedule, "bias_classes", lambda *a: reductions.append(1) or real(*a))
    n = 48
    q, k, v = qkv(n, n, grad=False)
    blocks = torch.arange(n) // 16
    mask = torch.zeros(n, n).masked_fill(blocks[:, None] < blocks[None, :], float("-inf"))

    def run():
        spec = AttentionSpec(D**-0.5, bias=Bias(mask, holds_masks=True, layout_exact=torch.tensor(True)))
        out, _ = attention_forward(q, k, v, spec)
        reference = AttentionSpec(D**-0.5, bias=Bias(mask.clone())).validate(q, k, v).reference(q, k, v)
        torch.testing.assert_close(out.double(), reference, atol=2e-5, rtol=2e-5)

    run()
    run()
    assert len(reductions) == 1
    mask[20:, :16] = float("-inf")  # written in place: the old layout would skip nothing new but keep stale tiles
    mask[:16, 20:] = 0.0  # and now tiles the old layout skipped are visible
    run()
    assert len(reductions) == 2


def test_per_tensor_cache_keeps_results_per_contents():
    """kernels.schedule.per_tensor: computed once per tensor contents, again after an in-place write, and never kept
    for an inference tensor (which has no version counter to tell a write)."""
    from flash_fx.kernels.schedule import per_tensor

    computed = []
    kept = torch.zeros(3)
    for _ in range(2):
        per_tensor(kept, ("test",), lambda: computed.append("kept"))
    kept.add_(1)
    per_tensor(kept, ("test",), lambda: computed.append("written"))
    with torch.inference_mode():
        inference = torch.zeros(3)
    for _ in range(2):
        per_tensor(inference, ("test",), lambda: computed.append("inference"))
    assert computed == ["kept", "written", "inference", "inference"]
