"""CUDA-graph safety of the op (issue 16, item 4), checked on the CPU: on the Triton path (as it runs on a GPU,
here through the interpreter) a compiled forward + backward reads no tensor value on the host for the forms that
need no run-time proof (dense, causal, windows, key padding, dropout, sinks, score modifications, a bias, a mask
bias whose tiles are skipped: that proof is computed on the device; document ids), and the dropout seed is drawn
and kept on the inputs' device. Forms whose calls prove a fact per call and may rerun the original ops (finite
fills, a bias beside structural masks) do read their proof's result on the host: listed here so a change to
either list is noticed."""

import contextlib
import traceback

import pytest
import torch

import flash_fx

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

_HOST_READS = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy")


@contextlib.contextmanager
def host_reads():
    """Record every read of a tensor's value on the host (``item``, ``float()``, ``bool()``, ``tolist``...) made
    by flash_fx's code, with the line that made it. Tensor methods are wrapped, so reads inside the custom op's
    implementation (which dispatch modes do not see) are caught too."""
    reads: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in _HOST_READS}

    def wrapped(name, method):
        def read(self, *args, **kwargs):
            ours = [line for line in traceback.format_stack()[:-1] if "flash_fx" in line or "/kernels/" in line
                    or "/patterns/" in line]
            reads.append(f"{name} at {ours[-1].strip().splitlines()[0]}" if ours else name)
            return method(self, *args, **kwargs)
        return read

    for name, method in saved.items():
        setattr(torch.Tensor, name, wrapped(name, method))
    try:
        yield reads
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def attention_call(form):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))
    valid = torch.ones(1, 40, dtype=torch.bool)
    valid[0, :5] = False
    ids = torch.tensor([[0] * 20 + [1] * 20])
    kwargs = {"dense": {}, "causal_dropout": dict(dropout_p=0.2), "window": dict(window=[8, 0]),
              "key_padding": dict(key_valid=valid), "sinks": dict(sinks=torch.zeros(1, 2, 1)),
              "softcap": dict(score_mod="mul(0.1);tanh;mul(10.0)"), "bias": {},
              "documents": dict(q_doc=ids, k_doc=ids), "finite_fill": dict(key_valid=valid, excluded_fill=-1e9),
              "bias_beside_causal": {}, "mask_bias": dict(sparse_bias=True)}[form]
    bias = torch.randn(1, 1, 40, 40) if form.startswith("bias") else None
    if form == "mask_bias":  # a block mask as a 0 / -inf bias whose tiles are skipped where that is proven exact
        blocks = torch.arange(40) // 16
        bias = torch.zeros(40, 40).masked_fill(blocks[:, None] < blocks[None, :], float("-inf"))
    causal = None if form in ("dense", "bias", "mask_bias") else 0
    return (q, k, v, bias, 0.25, causal), kwargs


@pytest.mark.parametrize("form", ["dense", "causal_dropout", "window", "key_padding", "sinks", "softcap", "bias",
                                  "mask_bias", "documents"])
def test_no_host_reads_in_forward_and_backward(form):
    args, kwargs = attention_call(form)
    with host_reads() as reads:
        out, lse, seed = torch.ops.flash_fx.attention(*args, **kwargs)
        out.sum().backward()
    assert reads == [] and flash_fx.kernels.triton_failure() is None
    assert seed.device == args[0].device  # never a CPU tensor beside device inputs


@pytest.mark.parametrize("form,where", [
    ("finite_fill", "check_call"),  # the exclusion proof (flash_fx.exactness)
    ("bias_beside_causal", "check_call"),  # a bias beside masks that replace the scores: NaN / +inf check
])
def test_per_call_proofs_read_the_host(form, where):
    args, kwargs = attention_call(form)
    with host_reads() as reads:
        torch.ops.flash_fx.attention(*args, **kwargs)[0].sum().backward()
    assert reads and any(where in r for r in reads), reads


def test_compiled_dropout_model_reads_nothing_on_the_host():
    """A compiled causal block with dropout, forward and backward: the graph's op calls read no value."""
    def fn(q, k, v):
        n = q.shape[-2]
        scores = (q @ k.transpose(-1, -2)).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        return torch.nn.functional.dropout(scores.softmax(-1), p=0.1) @ v

    q, k, v = (torch.randn(2, 2, 24, 8, requires_grad=True) for _ in range(3))
    compiled = torch.compile(fn, backend="flash_fx", options={"inner": "aot_eager", "report": False, "force": True})
    compiled(q, k, v)  # compile outside the check (Dynamo's tracing reads sizes and values of its own)
    with host_reads() as reads:
        compiled(q, k, v).sum().backward()
    torch._dynamo.reset()
    assert reads == []


@pytest.mark.parametrize("form", ["full_cache", "static_cache", "causal_step", "static_cache_as_bias"])
def test_decode_steps_read_nothing_on_the_host(form, monkeypatch):
    """A decode step (one query row, GQA 8:2, keys split across programs) on the decode kernels, forward and
    backward: no host read, the static cache's valid slots included."""
    from flash_fx.kernels import decode, triton_decode

    launches = []
    real = triton_decode.attention_forward
    monkeypatch.setattr(triton_decode, "attention_forward", lambda *a: launches.append(a[4]) or real(*a))
    monkeypatch.setattr(decode, "INTERPRETER_SMS", 32)  # a card with more SMs than programs: split the keys
    torch.manual_seed(0)
    q = torch.randn(2, 8, 1, 16, requires_grad=True)
    k, v = (torch.randn(2, 2, 100, 16, requires_grad=True) for _ in range(2))
    valid = torch.arange(100)[None].expand(2, 100) < torch.tensor([[30], [77]])
    kwargs = {"full_cache": {}, "static_cache": dict(key_valid=valid), "causal_step": {},
              "static_cache_as_bias": dict(sparse_bias=True)}[form]
    causal = 99 if form == "causal_step" else None
    # transformers' eager decode mask: 0 / finfo.min per key, its masked tiles skipped where that is proven exact
    bias = (torch.zeros(2, 1, 1, 100).masked_fill(~valid[:, None, None], torch.finfo(torch.float32).min)
            if form == "static_cache_as_bias" else None)
    with host_reads() as reads:
        out, lse, seed = torch.ops.flash_fx.attention(q, k, v, bias, 0.25, causal, **kwargs)
        out.sum().backward()
    assert reads == [] and flash_fx.kernels.triton_failure() is None
    assert launches and launches[0].splits > 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a GPU")
def test_cuda_graph_capture_and_replay():
    """On a GPU: a decode step over a static cache and a causal block with dropout, captured in one CUDA graph and
    replayed: the decode output equals the op run outside the graph, and each replay draws a fresh dropout mask."""
    torch.manual_seed(0)
    device = "cuda"
    q = torch.randn(2, 8, 1, 64, device=device, dtype=torch.float16)
    k, v = (torch.randn(2, 2, 1000, 64, device=device, dtype=torch.float16) for _ in range(2))
    valid = torch.arange(1000, device=device)[None].expand(2, 1000) < torch.tensor([[300], [777]], device=device)
    x = torch.randn(1, 4, 256, 64, device=device, dtype=torch.float16)

    def step():
        decoded = torch.ops.flash_fx.attention(q, k, v, None, 0.125, None, key_valid=valid)[0]
        dropped = torch.ops.flash_fx.attention(x, x, x, None, 0.125, 0, dropout_p=0.5)[0]
        return decoded, dropped

    expected, _ = step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up (compiles the kernels) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decoded, dropped = step()
    graph.replay()
    first = dropped.clone()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(decoded, expected)
    assert not torch.equal(first, dropped)  # a fresh seed drawn on the device at each replay
