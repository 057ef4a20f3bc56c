"""Uses of the scores and probabilities that read none of their values (dead nodes, shape and dtype reads) are not
escapes: the block is rewritten, dead uses are erased, shape/dtype reads get a one-element stand-in, and values and
gradients equal eager's. Uses that read values still keep the block, and the reason names them."""

import torch
from helpers import capture, compiled_matches_eager


def qkv(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, n, 8, generator=g, requires_grad=True) for _ in range(3)]


def metadata_and_dead_uses(q, k, v, x):
    scores = q @ k.transpose(-1, -2) * 0.3
    y = x.reshape_as(scores)  # reads the scores' shape
    scores.clone()  # dead
    p = scores.softmax(-1).type_as(scores)  # reads their dtype
    z = torch.zeros_like(p)
    extra = scores.new_zeros(3)  # reads their dtype and device
    return p @ v + y.mean(-1, keepdim=True) + z.sum() + extra.sum()


def test_dead_and_metadata_uses_are_not_escapes():
    q, k, v = qkv()
    x = torch.randn(2 * 3 * 12 * 12, requires_grad=True)
    captured = capture(metadata_and_dead_uses, q, k, v, x)
    assert captured.variants == ["dense"] and captured.skip_reasons == []
    after = captured.after
    assert "clone" not in after and "softmax" not in after and "matmul" not in after  # no N x N product left
    # the shape/dtype reads read a one-element stand-in of the scores' or probabilities' shape, one per node
    assert after.count(".expand(2, 3, 12, 12)") == 2 and after.count("torch.zeros((), dtype = torch.float32") == 2
    assert "reshape_as(expand" in after and "zeros_like(expand" in after and ".new_zeros(3)" in after
    compiled_matches_eager(metadata_and_dead_uses, q, k, v, x)


def test_uses_that_read_values_keep_the_block_and_are_named():
    def summed(q, k, v):
        scores = q @ k.transpose(-1, -2) * 0.3
        return scores.softmax(-1) @ v + scores.sum()

    def returned(q, k, v):
        p = (q @ k.transpose(-1, -2) * 0.3).softmax(-1)
        return p @ v, p

    def written_clone(q, k, v):
        scores = q @ k.transpose(-1, -2) * 0.3
        copy = scores.clone()
        copy.add_(1.0)  # a write: not dead, and the copy is returned
        return scores.softmax(-1) @ v, copy

    q, k, v = qkv()
    (reason,) = capture(summed, q, k, v).skip_reasons
    assert reason.startswith("scores (") and "by sum (" in reason and "output_attentions" not in reason
    (reason,) = capture(returned, q, k, v).skip_reasons
    assert "attention probabilities" in reason and "the graph's outputs" in reason and "output_attentions" in reason
    assert "matmul" not in reason  # the P @ V product itself is not named as an outside use
    (reason,) = capture(written_clone, q, k, v).skip_reasons
    assert "clone" in reason


def test_unused_random_draws_on_the_scores_are_not_dead():
    """An unused dropout or bernoulli of the scores still draws from the generator: erasing it would shift every
    later random number, so the block is kept."""
    import torch.nn.functional as F

    def dropped(q, k, v):
        scores = q @ k.transpose(-1, -2) * 0.3
        F.dropout(scores, 0.1, training=True)
        return scores.softmax(-1) @ v

    def sampled(q, k, v):
        scores = q @ k.transpose(-1, -2) * 0.3
        scores.sigmoid().bernoulli()
        return scores.softmax(-1) @ v

    q, k, v = qkv()
    for fn, name in ((dropped, "dropout"), (sampled, "sigmoid")):
        captured = capture(fn, q, k, v)
        assert captured.variants == [] and name in captured.skip_reasons[0]


def test_shape_reads_at_dynamic_shapes_stay_escapes():
    """At symbolic sizes a stand-in would need the sizes as graph values: such a read keeps the block (for now)."""
    q, k, v = qkv(n=16)
    x = torch.randn(2 * 3 * 16 * 16)

    def reshaped(q, k, v, x):
        scores = q @ k.transpose(-1, -2) * 0.3
        return scores.softmax(-1) @ v, x.reshape_as(scores)

    captured = capture(reshaped, q, k, v, x, dynamic=True)
    assert captured.variants == [] and "reshape_as" in captured.skip_reasons[0]
    assert capture(reshaped, q, k, v, x).variants == ["dense"]
