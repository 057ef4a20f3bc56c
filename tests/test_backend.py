"""The backend: registration, options, reports, explain, verify, run-time guards and failure behaviour."""

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import compiled_matches_eager
from torch import nn

import flash_fx


def attention(q, k, v):
    return F.softmax((q @ k.transpose(-2, -1)) * 0.5, dim=-1) @ v


def inputs(*shape, requires_grad=False):
    torch.manual_seed(2)
    shape = shape or (2, 2, 8, 4)
    return [torch.randn(*shape, requires_grad=requires_grad) for _ in range(3)]


def test_entry_point_in_fresh_process():
    script = textwrap.dedent("""
        import torch
        def f(q, k, v):
            return torch.softmax(q @ k.transpose(-2, -1) * 0.5, -1) @ v
        q = torch.randn(1, 2, 8, 4)
        out = torch.compile(f, backend="flash_fx", options={"inner": "eager"})(q, q, q)
        assert torch.allclose(out, f(q, q, q), atol=1e-5)
        import sys
        assert "flash_fx" in sys.modules  # loaded by Dynamo through the entry point
        import flash_fx
        print("variants", [r.variant for rep in flash_fx.reports() for r in rep.rewrites])
    """)
    env = {**os.environ, "FLASH_FX_REPORT": "0"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "variants ['dense']" in done.stdout
    assert "flash_fx report" not in done.stdout  # silenced by FLASH_FX_REPORT=0


def test_unknown_option_names_valid_ones():
    compiled = torch.compile(attention, backend="flash_fx", options={"inner": "eager", "colour": "blue"})
    with pytest.raises(Exception, match=r"unknown option\(s\) \['colour'\]; valid options are"):
        compiled(*inputs())
    torch._dynamo.reset()


@pytest.mark.parametrize("options, message", [
    ({"inner": "tvm"}, "valid values are"),
    ({"variants": ["dense", "flashy"]}, "unknown variant"),
    ({"verify": "maybe"}, "valid values are"),
])
def test_bad_option_values(options, message):
    with pytest.raises(ValueError, match=message):
        flash_fx.options.parse_options(options)


def test_report_printed_and_kept(capsys):
    flash_fx.clear_reports()
    torch._dynamo.reset()
    torch.compile(attention, backend="flash_fx", options={"inner": "eager"})(*inputs())
    printed = capsys.readouterr().out
    assert "flash_fx report for graph" in printed and "dense" in printed and "test_backend.py:" in printed
    (report,) = flash_fx.reports()
    (rewrite,) = report.rewrites
    assert rewrite.variant == "dense" and rewrite.scale == "0.5" and rewrite.q_shape == (2, 2, 8, 4)
    assert rewrite.location.startswith("test_backend.py:") and rewrite.hbm_after < rewrite.hbm_before
    assert str(report) in printed
    flash_fx.clear_reports()
    assert flash_fx.reports() == []
    torch._dynamo.reset()


def test_report_false_is_silent(capsys):
    torch._dynamo.reset()
    torch.compile(attention, backend="flash_fx", options={"inner": "eager", "report": False})(*inputs())
    assert "flash_fx report" not in capsys.readouterr().out
    torch._dynamo.reset()


def test_explain_reports_without_rewriting():
    def fn(q, k, v):
        return attention(q, k, v), (q @ k.mT).softmax(dim=-2)

    (report,) = flash_fx.explain(fn, *inputs())
    assert [r.variant for r in report.rewrites] == ["dense"]
    assert ["not the key axis" in s.reason for s in report.skipped] == [True]


def test_verify_passes_on_correct_rewrite():
    compiled_fn = torch.compile(attention, backend="flash_fx", options={"inner": "eager", "verify": True})
    q, k, v = inputs()
    torch.testing.assert_close(compiled_fn(q, k, v), attention(q, k, v))
    torch._dynamo.reset()


def test_verify_catches_a_wrong_kernel(monkeypatch):
    from flash_fx import kernels

    real = kernels.attention_forward

    def wrong(*args, **kwargs):
        out, lse = real(*args, **kwargs)
        return out + 1.0, lse

    monkeypatch.setattr(kernels, "attention_forward", wrong)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"verify: graph \d+ \(dense at test_backend.py"):
        torch.compile(attention, backend="flash_fx", options={"inner": "eager", "verify": True})(*inputs())
    torch._dynamo.reset()
    q, k, v = inputs()
    compiled_fn = torch.compile(attention, backend="flash_fx", options={"inner": "eager", "verify": "fallback"})
    with pytest.warns(UserWarning, match="ran its original ops"):
        torch.testing.assert_close(compiled_fn(q, k, v), attention(q, k, v))
    torch._dynamo.reset()


def test_pass_failure_leaves_graph(monkeypatch):
    import flash_fx.backend as backend

    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(backend, "run_attention_pass", broken)
    flash_fx.clear_reports()
    torch._dynamo.reset()
    q, k, v = inputs()
    out = torch.compile(attention, backend="flash_fx", options={"inner": "eager", "report": False})(q, k, v)
    torch.testing.assert_close(out, attention(q, k, v))
    (report,) = flash_fx.reports()
    assert report.rewrites == [] and "injected" in report.skipped[0].reason
    torch._dynamo.reset()


class BufferCausal(nn.Module):
    def __init__(self, n=8):
        super().__init__()
        self.register_buffer("mask", torch.tril(torch.ones(n, n, dtype=torch.bool)))

    def forward(self, q, k, v):
        scores = (q @ k.transpose(-2, -1)).masked_fill(~self.mask, float("-inf"))
        return scores.softmax(-1) @ v


def test_mutated_mask_buffer_falls_back_to_original(monkeypatch):
    from flash_fx import kernels

    model = BufferCausal()
    compiled_model = torch.compile(model, backend="flash_fx", options={"inner": "eager", "report": False})
    q, k, v = inputs()
    torch.testing.assert_close(compiled_model(q, k, v), model(q, k, v))
    with torch.no_grad():
        model.mask[2, 0] = False  # no longer causal
    with pytest.warns(UserWarning, match="proof does not hold"):
        out = compiled_model(q, k, v)
    torch.testing.assert_close(out, model(q, k, v))
    with torch.no_grad():
        model.mask[2, 0] = True  # causal again: the kernels run again (the revert was for those calls only)
    calls = []
    real = kernels.attention_forward
    monkeypatch.setattr(kernels, "attention_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    torch.testing.assert_close(compiled_model(q, k, v), model(q, k, v))
    assert calls
    torch._dynamo.reset()


def test_fake_tensor_calls_run_unchecked_and_leave_the_first_real_call_verified():
    """DDP's graph splitter calls each compiled piece on fake tensors while compiling: no data may be read then,
    and the proof check and verify still happen on the first real call."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from flash_fx.backend import compile_graph
    from flash_fx.options import parse_options

    compiled = []

    def capture(gm, example_inputs):
        compiled.append((compile_graph(gm, example_inputs, parse_options({"inner": "eager", "report": False,
                                                                          "verify": True})), example_inputs))
        return compiled[-1][0]

    model = BufferCausal()
    q, k, v = inputs()
    torch.compile(model, backend=capture)(q, k, v)
    guarded, example_inputs = compiled[-1]
    guarded.verified = False  # as compiled, before its first call
    with FakeTensorMode() as mode:
        out = guarded(*[mode.from_tensor(t) for t in example_inputs])
    assert tuple(out[0].shape) == tuple(q.shape) and not guarded.verified
    torch._dynamo.reset()


def causal_scaled(q, k, v):
    n = q.size(-2)
    mask = torch.triu(torch.ones(n, n, dtype=torch.bool, device=q.device), diagonal=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    return scores.masked_fill(mask, float("-inf")).softmax(-1) @ v


def test_dynamic_shapes_one_graph_for_several_lengths():
    flash_fx.clear_reports()
    torch._dynamo.reset()
    compiled_fn = torch.compile(causal_scaled, backend="flash_fx", dynamic=True,
                                options={"inner": "eager", "report": False})
    for n in (5, 9, 17):
        q, k, v = inputs(2, 2, n, 8)
        torch.testing.assert_close(compiled_fn(q, k, v), causal_scaled(q, k, v), atol=1e-5, rtol=1e-5)
    assert [[r.variant for r in rep.rewrites] for rep in flash_fx.reports()] == [["causal"]]
    torch._dynamo.reset()


def test_aot_eager_gradients():
    (report,) = compiled_matches_eager(causal_scaled, *inputs(2, 3, 11, 8, requires_grad=True), inner="aot_eager")
    assert [r.variant for r in report.rewrites] == ["causal"]


def test_inductor_end_to_end_with_gradients():
    (report,) = compiled_matches_eager(causal_scaled, *inputs(1, 2, 13, 16, requires_grad=True), inner="inductor",
                                       atol=1e-4, rtol=1e-4)
    assert [r.variant for r in report.rewrites] == ["causal"]


def test_inductor_cache_keys_carry_the_op_interface(monkeypatch):
    """A cached compiled backward from another flash_fx version must not be reused (stale op schema)."""
    import torch._inductor.compile_fx as inductor

    from flash_fx.cache_salt import CacheSalt, interface_hash

    seen = []
    monkeypatch.setattr(inductor, "compile_fx", lambda gm, inputs, config_patches=None: seen.append(config_patches)
                        or gm.forward)
    torch._dynamo.reset()
    torch.compile(attention, backend="flash_fx", options={"report": False})(*inputs())
    torch._dynamo.reset()
    (patches,) = seen
    salt = patches["post_grad_custom_pre_pass"]
    assert isinstance(salt, CacheSalt) and salt.uuid() == interface_hash() and len(salt.uuid()) == 64


@pytest.mark.parametrize("how", ["torch.compile(mode=...)", "options={'mode': ...}"])
@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "default"])
def test_mode_reaches_the_inner_inductor(mode, how, monkeypatch):
    """torch.compile's mode configures the inner Inductor as plain torch.compile would (Inductor's own table of
    mode settings), beside flash_fx's cache salt; options carry it where other options are given too."""
    import torch._inductor.compile_fx as inductor
    from torch._inductor import list_mode_options

    seen = []
    monkeypatch.setattr(inductor, "compile_fx", lambda gm, inputs, config_patches=None: seen.append(config_patches)
                        or gm.forward)
    torch._dynamo.reset()
    if how.startswith("torch.compile"):
        compiled = torch.compile(attention, backend="flash_fx", mode=mode)
    else:
        compiled = torch.compile(attention, backend="flash_fx", options={"mode": mode, "report": False})
    compiled(*inputs())
    torch._dynamo.reset()
    (patches,) = seen
    expected = list_mode_options(mode)
    assert {key: patches[key] for key in expected} == expected and "post_grad_custom_pre_pass" in patches
    assert mode == "default" or expected  # every other mode changes something


@pytest.mark.parametrize("options, message", [
    ({"mode": "fastest"}, "valid modes are"),
    ({"mode": "reduce-overhead", "inner": "eager"}, "configures the inner Inductor"),
])
def test_bad_modes(options, message):
    with pytest.raises(ValueError, match=message):
        flash_fx.options.parse_options(options)


def test_explain_command_line():
    """`python -m flash_fx explain FILE:FACTORY` prints the reports without running kernels, options included."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "flash_fx", "explain", str(root / "examples" / "quickstart.py") + ":explain_inputs",
         "--option", "device=A100", "--option", "tiles=(64, 64)"],
        capture_output=True, text=True, timeout=300, cwd=root,
    )
    assert done.returncode == 0, done.stderr
    assert "2 rewritten" in done.stdout and "causal" in done.stdout
    assert "cost model: A100, tiles Br x Bc = 64 x 64" in done.stdout


@pytest.mark.parametrize("form", ["finite_fill", "key_padding"])
def test_reduce_overhead_skips_cuda_graphs_only_for_graphs_that_read_the_host(form, monkeypatch):
    """Under mode="reduce-overhead" a graph whose attention proves a finite fill's exclusion per call (a host read a
    CUDA graph cannot capture) is compiled without CUDA graphs and its report says why; a graph whose calls read
    nothing on the host keeps them."""
    import torch._inductor.compile_fx as inductor

    seen = []
    monkeypatch.setattr(inductor, "compile_fx", lambda gm, inputs, config_patches=None: seen.append(config_patches)
                        or gm.forward)

    def padded(q, k, v, valid):
        scores = q @ k.transpose(-1, -2) / 4.0
        if form == "finite_fill":
            scores = scores.masked_fill(~valid[:, None, None, :], -1e9)
        else:
            scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        return scores.softmax(-1) @ v

    q, k, v = (torch.randn(2, 2, 40, 16) for _ in range(3))
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, 30:] = False
    flash_fx.clear_reports()
    torch._dynamo.reset()
    compiled = torch.compile(padded, backend="flash_fx",
                             options={"mode": "reduce-overhead", "report": False, "force": True})
    compiled(q, k, v, valid)
    torch._dynamo.reset()
    (patches,) = seen
    (report,) = flash_fx.reports()
    assert report.rewrites, report
    if form == "finite_fill":
        assert patches["triton.cudagraphs"] is False
        assert report.notes == ["CUDA graphs off for this graph: an attention call proves its finite-fill "
                                "exclusions on the host"]
    else:
        assert patches["triton.cudagraphs"] is True and not report.notes
