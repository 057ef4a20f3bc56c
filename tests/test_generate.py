"""Compiled generation (issue 16, item 5): `generate` with a static cache, the model's forward compiled with
`backend="flash_fx"`, produces eager's greedy tokens, with left padding; every decode step's attention is rewritten,
its static-cache mask read as key validity (the cache's unfilled slots are invalid keys, their tiles skipped), and it
runs the decode kernels (the query heads of a KV head packed into one tile)."""

import pytest
import torch

import flash_fx

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore")


def model_of(name: str, impl: str):
    t = transformers
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, attn_implementation=impl)
    if name == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(**common))
    return t.Gemma3ForCausalLM(t.Gemma3TextConfig(**common, head_dim=8, sliding_window=4,
                                                  layer_types=["sliding_attention", "full_attention"]))


@pytest.mark.parametrize("name,impl", [("llama", "sdpa"), ("llama", "eager"), ("gemma3", "sdpa")])
def test_static_cache_generation_matches_eager(name, impl, monkeypatch):
    from flash_fx.kernels import triton_decode

    decode_launches = []
    real = triton_decode.attention_forward
    monkeypatch.setattr(triton_decode, "attention_forward", lambda *a: decode_launches.append(a[0].shape) or real(*a))
    torch.manual_seed(0)
    model = model_of(name, impl).eval()
    ids = torch.randint(3, 64, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    options = dict(max_new_tokens=6, do_sample=False, cache_implementation="static", pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, **options)
    flash_fx.clear_reports()
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="flash_fx",
                                  options={"inner": "eager", "report": False, "force": True})
    with torch.no_grad():
        tokens = model.generate(ids, attention_mask=mask, **options)
    torch._dynamo.reset()
    assert torch.equal(tokens, expected)
    decode = [r for report in flash_fx.reports() for r in report.rewrites if r.q_shape[2] == 1]
    skipped = [s.reason for report in flash_fx.reports() for s in report.skipped]
    assert len(decode) == 2 and not skipped, (decode, skipped)  # both layers of the decode step
    # the static cache's mask: key validity (in-graph SDPA mask), or a per-key bias whose masked keys' tiles are
    # skipped at run time (eager's mask, built outside the compiled forward)
    assert all("key_padding" in r.mask or "per key" in r.mask for r in decode), [r.mask for r in decode]
    # the decode variant: both query heads of a KV head in one tile, and the decode kernels ran for every step
    assert all(r.kernel == "decode" and "decode kernels: 2 query heads per KV head" in r.notes for r in decode)
    # prefill under SDPA: the static cache's mask over its unfilled slots (an in-graph boolean built from the input
    # mask) is a mask whose empty tiles are skipped at run time; eager's float mask [B, 1, Nq, Nk] stays a bias (a
    # float bias shared by the heads is not taken for a mask: a genuine one would pay a pass for nothing)
    prefill = [r for report in flash_fx.reports() for r in report.rewrites if r.q_shape[2] > 1]
    assert prefill and (impl == "eager" or all("skipped at run time" in r.mask for r in prefill)), prefill
    steps = [shape for shape in decode_launches if shape[2] == 1]
    assert len(steps) == 2 * (options["max_new_tokens"] - 1), decode_launches
