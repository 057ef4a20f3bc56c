"""Launch configuration shared by the Triton kernels: tile sizes per GPU, dot precision, interpreter quirks."""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

#: Largest head dimension the Triton kernels support.
MAX_HEAD_DIM = 256

KB = 1024

#: Shared memory one thread block may use, by compute capability (CUDA C Programming Guide, "Technical
#: Specifications per Compute Capability"): A100 (8.0) and Jetson Orin (8.7) 163 KB of their 164 KB per SM,
#: the other 8.x cards (RTX 30xx/40xx, A10, L4, L40) 99 KB, H100/H200 (9.0) and B200 (10.0) 227 KB.
SRAM_BUDGETS: dict[tuple[int, int], int] = {
    (8, 0): 163 * KB, (8, 6): 99 * KB, (8, 7): 163 * KB, (8, 9): 99 * KB, (9, 0): 227 * KB, (10, 0): 227 * KB,
}

#: The capability assumed when none is given (tests, cost estimates): Hopper, the card the table was written for.
DEFAULT_CAPABILITY = (9, 0)

#: Budget of a card not in :data:`SRAM_BUDGETS`: the smallest of the cards above.
UNKNOWN_CARD_BUDGET = 99 * KB

#: Shared memory budget of the default card (kept for callers that predate per-card budgets).
SRAM_BUDGET_BYTES = SRAM_BUDGETS[DEFAULT_CAPABILITY]


def interpreter_active() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def padded_head_dim(head_dim: int) -> int:
    """The head-dim tile width: the next power of two >= ``head_dim`` (and >= 16, the smallest dot)."""
    return max(16, 1 << (head_dim - 1).bit_length())


class Tiles(NamedTuple):
    """One launch configuration of a kernel: its tile sizes, warps and software-pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


#: Tiles under the interpreter: small, so test shapes cross many tile boundaries.
INTERPRETER_TILES = Tiles(16, 16, 1, 1)

#: (padded head dim, element size): (forward tiles, backward tiles) on Hopper (compute capability 9). For 16-bit
#: dtypes, the hand-written choice of this project so far (untimed: no GPU has been lent to it): wide query tiles
#: in the forward (128 rows up to head dim 128), 64 x 64 or smaller in the backward, which keeps four [BLOCK, D]
#: tiles live per program. float32 (IEEE dots run on FMA units, not tensor cores) is register-bound: where the
#: earlier choice spilled registers in the sm_90 compile check (``python -m flash_fx.bench.compile_check``, see
#: README "Launch configurations") it has 8 warps or narrower tiles instead; no float32 entry spills now.
_HOPPER: dict[tuple[int, int], tuple[Tiles, Tiles]] = {
    (16, 2): (Tiles(128, 64, 4, 3), Tiles(64, 64, 4, 2)),
    (32, 2): (Tiles(128, 64, 4, 3), Tiles(64, 64, 4, 2)),
    (64, 2): (Tiles(128, 64, 4, 3), Tiles(64, 64, 4, 2)),
    (128, 2): (Tiles(128, 32, 8, 3), Tiles(64, 64, 8, 2)),
    (256, 2): (Tiles(64, 32, 8, 2), Tiles(32, 32, 8, 1)),
    (16, 4): (Tiles(64, 64, 4, 3), Tiles(64, 64, 8, 2)),  # backward was 4 warps: dK/dV spilled
    (32, 4): (Tiles(64, 64, 8, 3), Tiles(64, 32, 8, 2)),  # was 64 x 64, 4 warps in both: spilled
    (64, 4): (Tiles(64, 32, 8, 3), Tiles(32, 32, 8, 2)),  # was 64 x 64, 4 warps in both: spilled
    (128, 4): (Tiles(64, 16, 8, 3), Tiles(32, 16, 8, 2)),  # was 64 x 32 and 32 x 32: spilled
    (256, 4): (Tiles(64, 16, 8, 2), Tiles(32, 32, 8, 1)),
}

#: The same for Ampere (compute capability 8; A100: 163 KB of shared memory per block). Hopper's entries all fit
#: A100's budget and compile for sm_80 without spills, except one (below); with no timings on either card, nothing
#: else justifies differing.
_AMPERE: dict[tuple[int, int], tuple[Tiles, Tiles]] = {
    **_HOPPER,
    (64, 4): (Tiles(64, 32, 8, 3), Tiles(32, 32, 8, 3)),  # 2 stages spilled in the sm_80 dK/dV kernel, 3 do not
}

#: (compute capability major, padded head dim, element size, backward) -> tiles.
TILE_TABLE: dict[tuple[int, int, int, bool], Tiles] = {
    (major, block_d, size, backward): tiles[backward]
    for major, rows in ((8, _AMPERE), (9, _HOPPER))
    for (block_d, size), tiles in rows.items()
    for backward in (False, True)
}


def sram_budget(capability: tuple[int, int] | None) -> int:
    """Shared memory bytes one program may use on a card of this compute capability (None: the default card)."""
    return SRAM_BUDGETS.get(capability or DEFAULT_CAPABILITY, UNKNOWN_CARD_BUDGET)


def sram_bytes(block_m: int, block_n: int, head_dim: int, dtype: torch.dtype, num_stages: int, *,
               backward: bool = False) -> int:
    """Estimated shared memory of a program; for 16-bit dtypes on sm_90 it matches the compiled kernels' to 1 KB
    (``python -m flash_fx.bench.compile_check``).

    Forward: its Q tile plus ``num_stages`` buffered K and V tiles. Backward: the larger of the dQ program (its Q
    and dO tiles plus ``num_stages`` buffered K and V tiles) and the dK/dV program (its K and V tiles plus
    ``num_stages`` buffered Q and dO tiles, and 1 KB for their LSE and delta rows).
    """
    width = padded_head_dim(head_dim) * dtype.itemsize
    if not backward:
        return block_m * width + num_stages * 2 * block_n * width
    dq = (2 * block_m + num_stages * 2 * block_n) * width
    dkdv = (2 * block_n + num_stages * 2 * block_m) * width + KB
    return max(dq, dkdv)


def table_key(head_dim: int, dtype: torch.dtype, capability: tuple[int, int] | None,
              backward: bool) -> tuple[int, int, int, bool]:
    """The :data:`TILE_TABLE` key of a call: (capability major, padded head dim, 2 for 16-bit dtypes or 4 for
    float32, backward); no capability means the default card's."""
    size = 4 if dtype.itemsize >= 4 else 2
    return (capability or DEFAULT_CAPABILITY)[0], padded_head_dim(head_dim), size, backward


def fit_to_budget(tiles: Tiles, head_dim: int, dtype: torch.dtype, budget: int, *, backward: bool = False) -> Tiles:
    """``tiles`` shrunk until :func:`sram_bytes` fits ``budget``: fewer stages first, then narrower key tiles,
    then fewer query rows (never below one stage and 16 x 16)."""
    while sram_bytes(*tiles[:2], head_dim, dtype, tiles.num_stages, backward=backward) > budget:
        if tiles.num_stages > 1:
            tiles = tiles._replace(num_stages=tiles.num_stages - 1)
        elif tiles.block_n > 16:
            tiles = tiles._replace(block_n=tiles.block_n // 2)
        elif tiles.block_m > 16:
            tiles = tiles._replace(block_m=tiles.block_m // 2)
        else:
            break
    return tiles


def table_tiles(head_dim: int, dtype: torch.dtype, capability: tuple[int, int] | None, *,
                backward: bool = False) -> Tiles:
    """The table's tiles for this card (Hopper's for a card the table lacks), fitted to the card's budget."""
    key = table_key(head_dim, dtype, capability, backward)
    tiles = TILE_TABLE.get(key) or TILE_TABLE[(DEFAULT_CAPABILITY[0], *key[1:])]
    return fit_to_budget(tiles, head_dim, dtype, sram_budget(capability), backward=backward)


def choose_tiles(
    head_dim: int, dtype: torch.dtype, on_gpu: bool, *, backward: bool = False,
    capability: tuple[int, int] | None = None,
) -> Tiles:
    """Pick ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` for a head dim, dtype and card.

    In the interpreter (``on_gpu=False``) tiles are 16 x 16 with one warp and stage. On a GPU they come from
    :data:`TILE_TABLE` for the card's compute ``capability`` (None: Hopper), within its shared memory budget.
    """
    if not on_gpu:
        return INTERPRETER_TILES
    return table_tiles(head_dim, dtype, capability, backward=backward)


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision: IEEE for float32 unless the user allowed TF32 for CUDA matmuls (as eager matmul does),
    with either API: ``torch.backends.cuda.matmul.fp32_precision = "tf32"`` (or the global
    ``torch.backends.fp32_precision`` it inherits with "none") or the legacy ``allow_tf32``, which sets it too.
    (Reading ``allow_tf32`` after the new API was used raises in recent PyTorch, so the new setting is read.)"""
    if dtype != torch.float32:
        return "ieee"
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # a PyTorch without the fp32_precision API
        return "tf32" if matmul.allow_tf32 else "ieee"
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "ieee")
    return "tf32" if precision == "tf32" else "ieee"


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether dot operands must be cast to float32 first.

    Triton's interpreter multiplies the raw bits of bfloat16 operands, so there (and only there)
    bfloat16 dots run in float32 after the same rounding to bfloat16 the GPU kernel does.
    """
    return dtype == torch.bfloat16 and interpreter_active()
