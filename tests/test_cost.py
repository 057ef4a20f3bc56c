"""The cost model: byte and FLOP formulas against hand counts, tiles from SRAM, the device table, the decision and
its options, and symbolic formulas under dynamic shapes."""

import math

import pytest
import sympy as sp
import torch
from flash_fx.kernels import config
from helpers import capture
from test_masks import BlockLayoutMask

from flash_fx import cost, cpu_profile
from flash_fx.options import parse_options


def shape(**overrides):
    fields = dict(batch_heads=1, nq=2, nk=2, head_dim=1, dtype=torch.float32, density=1.0, elementwise_passes=0,
                  mask_bytes_per_score=0.0, training=False)
    return cost.AttentionShape(**{**fields, **overrides})


def test_eager_bytes_by_hand():
    # q, k, v read and out written: 8 elements; scores written 4; softmax reads and writes 4 + 4; P read 4
    assert cost.eager_bytes(shape()) == 4 * (8 + 4 + 8 + 4)
    # one scale pass reads and writes the scores, a float32 mask of the scores' size is read once
    assert cost.eager_bytes(shape(elementwise_passes=1, mask_bytes_per_score=4.0)) == 4 * (24 + 8) + 16
    # the backward: dO, q, k, v read, dq, dk, dv written ... (4*2 + 4*2) * d, and 7 score-sized passes
    assert cost.eager_bytes(shape(training=True)) == 96 + 4 * (16 + 7 * 4)


def test_flash_bytes_by_hand():
    # q read, out written (2 * 2 * 1), k and v once for the one query tile (2 * 2 * 1), LSE pair written (8 B a row)
    assert cost.flash_bytes(shape(), 16, 16) == (4 + 4) * 4 + 16
    # four query tiles of one row each read k and v four times; half the tiles visited read them twice
    big = shape(nq=4, nk=4)
    assert cost.flash_bytes(big, 1, 16) == (8 + 4 * 8) * 4 + 32
    assert float(cost.flash_bytes(shape(nq=4, nk=4, density=0.5), 1, 16)) == (8 + 2 * 8) * 4 + 32
    # a layout pass reads the whole mask once more
    masked = shape(mask_bytes_per_score=1.0, layout_pass=True, density=0.5)
    assert float(cost.flash_bytes(masked, 16, 16) - cost.flash_bytes(shape(density=0.5), 16, 16)) == 4 * 0.5 + 4


def test_flops_by_hand():
    assert cost.flops(shape(), recompute=False) == 16
    assert cost.flops(shape(training=True), recompute=False) == 48
    assert cost.flops(shape(training=True), recompute=True) == 56  # the backward recomputes Q K^T
    assert float(cost.flops(shape(density=0.25), recompute=True)) == 4


def test_symbolic_formula_evaluates_at_the_hint():
    n = sp.Symbol("s0", positive=True, integer=True)
    symbolic = shape(nq=n, nk=n, head_dim=64, batch_heads=8)
    expr = cost.flash_bytes(symbolic, 64, 128)
    assert expr.free_symbols == {n}
    concrete = cost.flash_bytes(shape(nq=1000, nk=1000, head_dim=64, batch_heads=8), 64, 128)
    assert float(expr.subs({n: 1000})) == float(concrete)


def test_tiles_from_sram_and_from_the_launch_table():
    """The paper's tiles from SRAM, for comparison; the model counts the tiles the kernels launch with."""
    a100, h100 = cost.DEVICES["A100"], cost.DEVICES["H100"]
    assert cost.paper_tiles(a100, 64, torch.float16) == (64, 384)  # the paper's B_c = ceil(M / 4d) for 192 KB
    assert cost.paper_tiles(h100, 128, torch.float16) == (128, 228)
    for device, head_dim, dtype in ((a100, 64, torch.float16), (h100, 128, torch.float16), (h100, 256, torch.float32)):
        tiles = config.table_tiles(head_dim, dtype, device.capability, backward=False)
        assert cost.model_tiles(device, head_dim, dtype) == (tiles.block_m, tiles.block_n)
    assert cost.model_tiles(a100, 64, torch.float16) != cost.model_tiles(h100, 256, torch.float32)


def test_device_table():
    assert cost.device_model("A100").hbm_bytes_per_s == 1.555e12
    with pytest.raises(ValueError, match="known devices"):
        cost.device_model("V100")
    if not torch.cuda.is_available():
        assert cost.device_model().name == cost.DEFAULT_DEVICE


def attention(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) * 0.125, dim=-1) @ v


def test_decision_small_kept_large_rewritten():
    small = torch.randn(1, 1, 16, 64)
    large = torch.randn(2, 8, 1024, 64)
    kept = capture(attention, small, small, small, min_speedup=1.2).reports[0]
    assert kept.rewrites == [] and "kept" in kept.skipped[0].reason and "threshold 1.2x" in kept.skipped[0].reason
    (rewrite,) = capture(attention, large, large, large, min_speedup=1.2).reports[0].rewrites
    assert rewrite.time_before / rewrite.time_after >= 1.2 and "predicted" in rewrite.notes
    forced = capture(attention, small, small, small, min_speedup=1.2, force=True).reports[0]
    assert len(forced.rewrites) == 1 and "forced" in forced.rewrites[0].notes


def test_device_and_tiles_options():
    x = torch.randn(2, 8, 1024, 64)
    (a100,) = capture(attention, x, x, x, device="A100").reports[0].rewrites
    (h200,) = capture(attention, x, x, x, device="H200").reports[0].rewrites
    assert a100.device == "A100" and h200.device == "H200" and a100.time_after > h200.time_after
    (small_tiles,) = capture(attention, x, x, x, tiles=(32, 32)).reports[0].rewrites
    assert small_tiles.tiles == (32, 32) and small_tiles.hbm_after > a100.hbm_after
    assert "tiles Br x Bc = 32 x 32" in str(capture(attention, x, x, x, tiles=(32, 32)).reports[0])
    # 16-row query tiles re-read K and V 64 times: more bytes than eager, so the model keeps eager
    kept = capture(attention, x, x, x, tiles=(16, 16)).reports[0]
    assert kept.rewrites == [] and "no fewer HBM bytes" in kept.skipped[0].reason


@pytest.mark.parametrize(("options", "message"), [
    ({"device": "V100"}, "device"), ({"min_speedup": 0}, "min_speedup"), ({"min_speedup": "2"}, "min_speedup"),
    ({"tiles": (24, 16)}, "tiles"), ({"tiles": 64}, "tiles"),
])
def test_bad_cost_options(options, message):
    with pytest.raises(ValueError, match=message):
        parse_options(options)


def test_a_constant_block_layout_is_used_where_it_empties_a_tile():
    """A constant mask's layout is reduced on its first call only (kernels.schedule.per_tensor), so the cost model
    charges it no per-call pass over the mask: it is used wherever it empties a tile, and a mask that empties none
    stays a plain bias."""
    n = 1024
    q = torch.randn(1, 2, n, 64)
    sparse = BlockLayoutMask(n=n, block=128)
    (chosen,) = capture(sparse, q, q, q).reports[0].rewrites
    assert chosen.variant == "block_sparse" and chosen.tile_density < 0.5
    one_empty = BlockLayoutMask(n=n, block=128)
    one_empty.visible.fill_(True)
    one_empty.visible[:128, 128:256] = False  # one 128 x 128 block hidden: the tiles it covers are empty
    (used,) = capture(one_empty, q, q, q).reports[0].rewrites
    assert used.variant == "block_sparse" and 0.9 < used.tile_density < 1.0
    nearly_full = BlockLayoutMask(n=n, block=128)
    nearly_full.visible.fill_(True)
    nearly_full.visible[5, 3] = False
    captured = capture(nearly_full, q, q, q)
    (kept_dense,) = captured.reports[0].rewrites
    assert kept_dense.variant == "bias" and "the mask empties no tile" in kept_dense.notes
    assert "sparse_bias" not in captured.after


def test_symbolic_report_under_dynamic_shapes():
    x = torch.randn(2, 4, 256, 64)
    (static,) = capture(attention, x, x, x).reports[0].rewrites
    report = capture(attention, x, x, x, dynamic=True).reports[0]
    (dynamic,) = report.rewrites
    assert static.hbm_formula == "" and dynamic.hbm_formula
    assert "ceiling(" in dynamic.hbm_formula and " -> " in dynamic.hbm_formula
    assert dynamic.hbm_before == static.hbm_before and dynamic.hbm_after == static.hbm_after
    assert "symbolic:" in str(report)


# ---- the CPU as a device of the cost model ----

FIXED_CPU = cpu_profile.CpuProfile("CPU test, 2 threads", matmul_flops_per_s=150e9, reference=(4, 512, 64),
                                   eager_reference_s=5.6e-3, flash_reference_s=2.7e-3, eager_fixed_s=30e-6,
                                   flash_fixed_s=100e-6, eager_fixed_training_s=80e-6, flash_fixed_training_s=300e-6)


def test_cpu_profile_is_measured_once_per_process(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU paths, as a CPU user runs them
    cpu_profile.measure.cache_clear()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # as a compile may run: unaffected
        profile = cpu_profile.measure()
    assert profile is cpu_profile.measure()
    assert profile.name.startswith("CPU ") and "threads" in profile.name
    timings = [profile.eager_reference_s, profile.flash_reference_s, profile.eager_fixed_s, profile.flash_fixed_s,
               profile.eager_fixed_training_s, profile.flash_fixed_training_s]
    assert all(math.isfinite(t) and 0 < t < 10 for t in timings)
    assert 1e8 < profile.matmul_flops_per_s < 1e14 and profile.reference == (4, 512, 64)


def test_cpu_rates_reproduce_the_timings_they_come_from(monkeypatch):
    """The rates derived for the CPU predict the reference attention's measured times, each side."""
    monkeypatch.setattr(cost.cpu_profile, "measure", lambda: FIXED_CPU)
    cpu = cost.cpu_device()
    heads, n, head_dim = FIXED_CPU.reference
    density = cost.kernels.tile_density(cost.kernels.AttentionSpec(1.0, band=cost.Band(None, 0)), n, n, 256, 256)
    shape = cost.AttentionShape(heads, n, n, head_dim, torch.float32, density, elementwise_passes=2,
                                mask_bytes_per_score=1.0, training=False)
    plan = cost.plan(shape, {}, device=cpu)
    assert math.isclose(plan.time_before, FIXED_CPU.eager_reference_s, rel_tol=1e-6)
    assert math.isclose(plan.time_after, FIXED_CPU.flash_reference_s, rel_tol=1e-6)
    assert plan.rewrite and f"predicted {5.6 / 2.7:.2f}x faster on {FIXED_CPU.name}" in plan.reason


def test_the_device_predicted_for_is_where_the_kernels_run(monkeypatch):
    monkeypatch.setattr(cost.cpu_profile, "measure", lambda: FIXED_CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cpu = cost.device_for("cpu")
    assert cpu.is_cpu and cpu.name == FIXED_CPU.name and cpu.memory == "main-memory"
    assert cost.device_for("cpu", "A100").name == "A100"  # the option plans for a card on a laptop
    assert cost.device_for("cuda", "cpu").is_cpu
    assert cost.model_tiles(cpu, 64, torch.float32) == (256, 256)  # the blocks the CPU path steps by
    with pytest.raises(ValueError, match="no SRAM"):
        cost.paper_tiles(cpu, 64, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter runs the GPU kernels: plan for the default card
    assert cost.device_for("cpu").name == cost.DEFAULT_DEVICE


def test_cpu_decisions_follow_its_fixed_call_times(monkeypatch):
    """On a CPU the flash op's larger fixed time keeps small attentions unfused; large ones are rewritten, and the
    report names the CPU."""
    monkeypatch.setattr(cost.cpu_profile, "measure", lambda: FIXED_CPU)
    small, large = torch.randn(1, 1, 16, 16), torch.randn(1, 2, 512, 64)
    kept = capture(attention, small, small, small, device="cpu").reports[0]
    reason = kept.skipped[0].reason
    assert kept.rewrites == [] and "fixed time per call 100 us flash, 30 us unfused" in reason
    report = capture(attention, large, large, large, device="cpu").reports[0]
    (rewrite,) = report.rewrites
    assert rewrite.device == FIXED_CPU.name and "main-memory bytes" in rewrite.notes
    assert f"cost model: {FIXED_CPU.name}, tiles Br x Bc = 256 x 256" in str(report)
    (on_card,) = capture(attention, small, small, small, device="H100").reports[0].rewrites
    assert on_card.device == "H100"  # 5 us launches on a card: the same small attention is rewritten there
