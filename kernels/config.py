"""Launch configuration shared by the Triton kernels: tile sizes, dot precision, interpreter quirks."""

from __future__ import annotations

import os

import torch

#: Shared memory we allow one forward program to use (H100 has 228 KB per SM; leave headroom).
SRAM_BUDGET_BYTES = 200 * 1024

#: Largest head dimension the Triton kernels support.
MAX_HEAD_DIM = 256


def interpreter_active() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def padded_head_dim(head_dim: int) -> int:
    """The head-dim tile width: the next power of two >= ``head_dim`` (and >= 16, the smallest dot)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def sram_bytes(block_m: int, block_n: int, head_dim: int, dtype: torch.dtype, num_stages: int) -> int:
    """Estimated shared memory of a forward program: its Q tile plus ``num_stages`` buffered K and V tiles."""
    width = padded_head_dim(head_dim) * dtype.itemsize
    return block_m * width + num_stages * 2 * block_n * width


def choose_tiles(
    head_dim: int, dtype: torch.dtype, on_gpu: bool, *, backward: bool = False
) -> tuple[int, int, int, int]:
    """Pick ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` for a head dim and dtype.

    In the interpreter (``on_gpu=False``) tiles are 16 x 16, so small test shapes cross many tile
    boundaries. On a GPU the forward uses wide query tiles (128 rows for head dims <= 128 in 16-bit
    dtypes) and the backward, which keeps four [BLOCK, D] tiles live per program, uses 64 x 64 or
    smaller; every choice keeps ``sram_bytes`` under ``SRAM_BUDGET_BYTES``.
    """
    if not on_gpu:
        return 16, 16, 1, 1
    block_d = padded_head_dim(head_dim)
    wide = dtype.itemsize >= 4
    num_warps = 4 if block_d <= 64 else 8
    if backward:
        block = 64 if block_d <= 64 or (block_d <= 128 and not wide) else 32
        return block, block, num_warps, 2 if block_d <= 128 else 1
    if block_d <= 64:
        block_m, block_n, num_stages = (64 if wide else 128), 64, 3
    elif block_d <= 128:
        block_m, block_n, num_stages = (64 if wide else 128), 32, 3
    else:
        block_m, block_n, num_stages = 64, (16 if wide else 32), 2
    return block_m, block_n, num_warps, num_stages


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision: IEEE for float32 unless the user allowed TF32 (as eager matmul does)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether dot operands must be cast to float32 first.

    Triton's interpreter multiplies the raw bits of bfloat16 operands, so there (and only there)
    bfloat16 dots run in float32 after the same rounding to bfloat16 the GPU kernel does.
    """
    return dtype == torch.bfloat16 and interpreter_active()
