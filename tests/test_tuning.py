"""Launch configurations: the per-card tile table, the candidates around it, and the opt-in autotuner (with a fake
timer: under the interpreter times mean nothing), whose non-default choices must give the same results."""

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from flash_fx.kernels import config, set_autotune, tuned_configs, tuning  # noqa: E402
from flash_fx.kernels.config import Tiles  # noqa: E402
from kernel_calls import forward as attention_forward  # noqa: E402
from test_kernels import check_attention, random_inputs  # noqa: E402

import flash_fx  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [16, 40, 64, 96, 128, 256]
HOPPER, A100, RTX_3090, UNKNOWN = (9, 0), (8, 0), (8, 6), (7, 5)
FAST = Tiles(32, 16, 1, 1)  # the candidate the fake timer calls fastest: not the interpreter's default


@pytest.fixture
def fake_timer(monkeypatch):
    """Autotuning on, with a timer that runs nothing, records what it was asked to time and calls FAST fastest;
    the setting and the tuned configurations are restored afterwards."""
    timed = []

    def timer(run, tiles, device):
        timed.append(tiles)
        return 1.0 if tiles == FAST else 2.0 + tiles.block_n

    monkeypatch.setattr(tuning, "timer", timer)
    tuning.clear_tuned_configs()
    set_autotune(True)
    yield timed
    set_autotune(None)
    tuning.clear_tuned_configs()


def tiny_inputs(dtype=torch.float32, seed=11):
    q, k, v = random_inputs((1, 2, 37, 16), (1, 2, 29, 16), seed=seed)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("backward", [False, True])
def test_table_values(backward):
    """Hopper keeps the hand-written choice; no capability means Hopper; other cards shrink to their budget."""
    expected = {(64, 2): (Tiles(128, 64, 4, 3), Tiles(64, 64, 4, 2)),
                (128, 2): (Tiles(128, 32, 8, 3), Tiles(64, 64, 8, 2)),
                (256, 4): (Tiles(64, 16, 8, 2), Tiles(32, 32, 8, 1))}
    for (head_dim, size), tiles in expected.items():
        dtype = torch.float16 if size == 2 else torch.float32
        assert config.choose_tiles(head_dim, dtype, True, backward=backward, capability=HOPPER) == tiles[backward]
        assert config.choose_tiles(head_dim, dtype, True, backward=backward) == tiles[backward]
        for card in (A100, RTX_3090, UNKNOWN):
            entry = config.TILE_TABLE.get((card[0], head_dim, size, backward),
                                          config.TILE_TABLE[(9, head_dim, size, backward)])
            chosen = config.choose_tiles(head_dim, dtype, True, backward=backward, capability=card)
            assert chosen == config.fit_to_budget(entry, head_dim, dtype, config.sram_budget(card), backward=backward)
    assert config.choose_tiles(64, torch.float16, False, backward=backward, capability=HOPPER) == (16, 16, 1, 1)


@pytest.mark.parametrize("card", [HOPPER, A100, RTX_3090, UNKNOWN, None])
def test_table_within_budget(card):
    """Every entry of the table fits its card's shared memory; every choice fits the card it is made for."""
    for (major, block_d, size, backward), tiles in config.TILE_TABLE.items():
        dtype = torch.float16 if size == 2 else torch.float32
        assert config.sram_bytes(*tiles[:2], block_d, dtype, tiles.num_stages, backward=backward) <= \
            config.sram_budget((major, 0))
    for head_dim in HEAD_DIMS:
        for dtype in DTYPES:
            for backward in (False, True):
                tiles = config.choose_tiles(head_dim, dtype, True, backward=backward, capability=card)
                assert all(16 <= b <= 128 and b & (b - 1) == 0 for b in tiles[:2])
                assert config.sram_bytes(*tiles[:2], head_dim, dtype, tiles.num_stages,
                                         backward=backward) <= config.sram_budget(card)


@pytest.mark.parametrize("card", [HOPPER, A100])
def test_candidates(card):
    """The table's entry first, at most MAX_CANDIDATES, distinct, valid, within the card's budget and not known to
    spill registers; the table's entries never spill."""
    for head_dim in HEAD_DIMS:
        for dtype in DTYPES:
            for backward in (False, True):
                found = tuning.candidates(head_dim, dtype, card, backward=backward, on_gpu=True)
                assert found[0] == config.choose_tiles(head_dim, dtype, True, backward=backward, capability=card)
                assert 2 <= len(found) <= tuning.MAX_CANDIDATES and len(set(found)) == len(found)
                for tiles in found:
                    assert config.sram_bytes(*tiles[:2], head_dim, dtype, tiles.num_stages, backward=backward) <= \
                        config.sram_budget(card)
                    assert tiles.num_warps in (4, 8) and 1 <= tiles.num_stages <= 4
                    assert not tuning.spills(tiles, head_dim, dtype, card, backward=backward)
    interpreted = tuning.candidates(16, torch.float32, None, backward=False, on_gpu=False)
    assert interpreted == [Tiles(16, 16, 1, 1), Tiles(16, 32, 1, 1), FAST]


def test_autotune_off_by_default(monkeypatch):
    """Off unless asked; FLASH_FX_AUTOTUNE=1 alone does not tune the interpreter, only CUDA tensors."""
    monkeypatch.setattr(tuning, "timer", lambda *args: pytest.fail("timed while autotuning is off"))
    monkeypatch.setenv("FLASH_FX_AUTOTUNE", "1")
    assert tuning.autotune_enabled(torch.device("cuda", 0))
    assert not tuning.autotune_enabled(torch.device("cpu"))
    monkeypatch.delenv("FLASH_FX_AUTOTUNE")
    assert not tuning.autotune_enabled(torch.device("cuda", 0))
    attention_forward(*tiny_inputs(), scale=0.25)
    assert tuned_configs() == []


def test_autotune_picks_caches_and_records(fake_timer):
    q, k, v = tiny_inputs()
    out, _ = attention_forward(q, k, v, scale=0.25, causal_offset=0)
    assert fake_timer == tuning.candidates(16, q.dtype, None, backward=False, on_gpu=False)
    (row,) = tuned_configs()
    assert row["kernel"] == "forward" and (row["block_m"], row["block_n"]) == (FAST.block_m, FAST.block_n)
    assert (row["n_q"], row["n_k"], row["head_dim"], row["dtype"], row["causal"]) == (64, 32, 16, "float32", True)
    assert {c["ms"] for c in row["candidates"]} == {1.0, 18.0, 34.0}
    attention_forward(q, k, v, scale=0.25, causal_offset=0)  # same key: cached, not timed again
    attention_forward(q, k, v, scale=0.25, causal_offset=0, block_m=16)  # explicit block size: no tuning
    assert len(fake_timer) == 3 and len(tuned_configs()) == 1
    attention_forward(q, k, v, scale=0.25)  # another key (not causal): tuned again
    assert len(fake_timer) == 6 and len(tuned_configs()) == 2


def test_failing_candidate_skipped():
    """A candidate Triton cannot compile is skipped; if none compiles, the error reaches the caller."""
    def run(tiles):
        if tiles.block_n > 16:
            raise triton.runtime.errors.OutOfResources(300_000, 232_448, "shared memory")

    key = tuning.TuneKey(False, None, 16, "float32", 32, 32)
    try:
        chosen = tuning.tune(key, [Tiles(16, 32, 1, 1), Tiles(16, 16, 1, 1)], lambda t: run(t), torch.device("cpu"))
        assert chosen == Tiles(16, 16, 1, 1)
        assert [c["ms"] == math.inf for c in tuned_configs()[0]["candidates"]] == [True, False]
        with pytest.raises(triton.runtime.errors.OutOfResources):
            tuning.tune(tuning.TuneKey(True, None, 16, "float32", 32, 32), [Tiles(16, 32, 1, 1)], run,
                        torch.device("cpu"))
    finally:
        tuning.clear_tuned_configs()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_tuned_config_matches_default(fake_timer, dtype):
    """The tuned (non-default) tiles give the forward and backward of the default ones, both within the SPEC bound
    of a float64 reference (ragged 37 x 29 shapes, so both tile grids have partial tiles)."""
    q, k, v = random_inputs((1, 2, 37, 16), (1, 2, 29, 16), seed=23)
    tuned_out, tuned_grads = check_attention(q, k, v, dtype, causal_offset=3)
    assert {(row["kernel"], row["block_m"], row["block_n"]) for row in tuned_configs()} == \
        {("forward", FAST.block_m, FAST.block_n), ("backward", FAST.block_m, FAST.block_n)}
    set_autotune(False)
    out, grads = check_attention(q, k, v, dtype, causal_offset=3)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for tuned, default in zip((tuned_out, *tuned_grads[:3]), (out, *grads[:3]), strict=True):
        torch.testing.assert_close(tuned, default, **tolerance)


def test_autotune_option(fake_timer):
    """The backend option `autotune=True` turns autotuning on at compile time."""
    set_autotune(None)

    def attention(q, k, v):
        return F.softmax((q @ k.transpose(-2, -1)) * 0.25, dim=-1) @ v

    torch._dynamo.reset()
    q, k, v = tiny_inputs()
    options = {"inner": "eager", "report": False, "force": True, "autotune": True}
    out = torch.compile(attention, backend="flash_fx", options=options)(q, k, v)
    torch._dynamo.reset()
    assert tuning.autotune_enabled() and tuned_configs()[0]["block_m"] == FAST.block_m
    torch.testing.assert_close(out, attention(q, k, v), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="option autotune='yes'"):
        flash_fx.options.parse_options({"autotune": "yes"})


def test_compile_check_records_launches():
    """The compile check's recorded launches (compiling them for sm_90 takes minutes: run it by hand, see README)
    carry the configuration; nothing is launched."""
    from flash_fx.bench import compile_check

    tiles = Tiles(64, 32, 8, 2)
    calls = compile_check._launches(tiles, 64, torch.float16, True, backward=True)
    assert set(calls) == {"_delta_kernel", "_dkdv_kernel", "_dq_kernel"}
    for name in ("_dkdv_kernel", "_dq_kernel"):
        _, _, kwargs = calls[name]
        assert (kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["num_warps"], kwargs["num_stages"]) == tiles
        assert kwargs["HAS_UPPER"] and kwargs["BLOCK_D"] == 64
    assert set(compile_check._launches(tiles, 64, torch.float16, False, backward=False)) == \
        {"_attention_forward_kernel"}
