"""A softmax-invariant row-max subtraction (``s - s.max(-1, keepdim=True).values`` and its spellings) is looked
through: the block is rewritten, the max is dropped, and values and gradients equal eager's, masks and finite
fills included. Subtractions that are not a row max keep the block."""

import pytest
import torch
from helpers import capture
from soundness import compare, variants


def qkv(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, n, 8, generator=g, requires_grad=True) for _ in range(3)]


def causal(scores):
    n = scores.shape[-1]
    return scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))


SPELLINGS = {
    "max_values": lambda s: s - s.max(-1, keepdim=True).values,
    "amax_detached": lambda s: s - s.amax(dim=-1, keepdim=True).detach(),
    "torch_max_getitem": lambda s: s - torch.max(s, dim=-1, keepdim=True)[0],
    "sub_method_last_dim": lambda s: s.sub(s.amax(s.dim() - 1, keepdim=True)),
}


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_row_max_shift_is_looked_through(spelling):
    shift = SPELLINGS[spelling]

    def shifted(q, k, v):
        return shift(causal(q @ k.transpose(-1, -2) * 0.3)).softmax(-1) @ v

    captured = capture(shifted, *qkv())
    assert captured.variants == ["causal"] and "max" not in captured.after and "sub" not in captured.after
    assert variants(compare(shifted, *qkv(seed=1))) == ["causal"]


def test_shift_before_scale_and_mask():
    """A per-row constant stays one through a scale and out of the entries a -inf mask replaces."""
    def shifted_first(q, k, v):
        scores = q @ k.transpose(-1, -2)
        return causal((scores - scores.amax(-1, keepdim=True)) * 0.3).softmax(-1) @ v

    assert variants(compare(shifted_first, *qkv(seed=2))) == ["causal"]


def test_finite_fill_after_the_shift_on_rows_it_hides_entirely():
    """A finite fill (-1e9) hiding a whole batch row: eager's uniform average, which the op proves or reruns."""
    def padded(q, k, v, valid):
        scores = q @ k.transpose(-1, -2) * 0.3
        scores = scores - scores.max(-1, keepdim=True).values
        return scores.masked_fill(~valid[:, None, None, :], -1e9).softmax(-1) @ v

    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[0, 7:] = False
    valid[1] = False  # every key of batch row 1 hidden by the finite fill
    compare(padded, *qkv(seed=3), valid)


def test_subtractions_that_are_not_a_row_max_keep_the_block():
    def column_max(q, k, v):
        s = q @ k.transpose(-1, -2) * 0.3
        return (s - s.amax(-2, keepdim=True)).softmax(-1) @ v

    def not_kept_dim(q, k, v):
        s = q @ k.transpose(-1, -2) * 0.3
        return (s - s.amax(-1)[..., None]).softmax(-1) @ v

    def other_tensor(q, k, v):
        s = q @ k.transpose(-1, -2) * 0.3
        return (s - (s * 2).amax(-1, keepdim=True)).softmax(-1) @ v

    def mean(q, k, v):
        s = q @ k.transpose(-1, -2) * 0.3
        return (s - s.mean(-1, keepdim=True)).softmax(-1) @ v

    for fn in (column_max, not_kept_dim, other_tensor, mean):
        captured = capture(fn, *qkv())
        assert captured.variants == [] and captured.after == captured.before, fn.__name__


def test_row_max_used_elsewhere_keeps_the_block():
    def returned_max(q, k, v):
        s = q @ k.transpose(-1, -2) * 0.3
        m = s.amax(-1, keepdim=True)
        return (s - m).softmax(-1) @ v + m

    (reason,) = capture(returned_max, *qkv()).skip_reasons
    assert "row max" in reason and "add" in reason


@pytest.mark.parametrize("path", ["triton", "cpu"])
@pytest.mark.parametrize("fill", [float("-inf"), -1e9], ids=["inf_fill", "finite_fill"])
def test_shift_with_an_in_place_mask_dead_rows_and_nq_ne_nk(path, fill):
    """Values and gradients equal eager's on both kernel paths: Nq != Nk, a mask built in place (tril_, then a
    whole query row hidden), infinite and finite fills (NaN where eager has NaN)."""
    def shifted(q, k, v):
        visible = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool)
        visible.tril_(diagonal=k.shape[-2] - q.shape[-2])
        visible[3] = False  # query row 3 sees no key
        s = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~visible, fill)
        return (s - s.amax(-1, keepdim=True)).softmax(-1) @ v

    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 3, 10, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 3, 14, 8, generator=g, requires_grad=True) for _ in range(2))
    compare(shifted, q, k, v, path=path, dead_rows=True)
