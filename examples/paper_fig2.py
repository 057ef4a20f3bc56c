"""Reproduce the HBM figures of the FlashAttention paper's Fig. 2 from access counts, not fitted constants.

GPT-2 medium attention, forward + backward: N = 1024, d = 64, 16 heads, batch 64, fp16, A100 (192 KB SRAM per
SM). Two models are counted as sympy expressions and evaluated:
- standard attention as the paper's Algorithms 0 and 3 run it with a causal mask and dropout: every step reads
  and writes the N x N matrices (scores, mask, softmax, dropout and the saved keep mask in bytes);
- the paper's Algorithm 1 (forward) and Algorithm 4 (backward): K_j, V_j stream in the OUTER loop, so Q, O, l, m
  (forward) and Q, O, dO, dQ, l, m (backward) are read -- and O, l, m, dQ written -- once per key block,
  Tc = ceil(N / Bc) times, with Bc = ceil(M / 4d) elements.
Beside them, flash_fx's own kernels (flash_fx.cost.flash_bytes: FlashAttention-2 loop order, K and V streamed
once per query tile, a dK/dV kernel and a separate dQ kernel, tiles from flash_fx.cost.model_tiles for the A100).
The last line is machine-readable.
"""

from __future__ import annotations

import sympy as sp
import torch

from flash_fx import cost

N, d, BH, Bc, e = sp.symbols("N d BH B_c e", positive=True)  # e: bytes per element
A100 = cost.DEVICES["A100"]  # 192 KB SRAM per SM, 1.555 TB/s, 312 TFLOP/s fp16
PAPER = {"standard": (40.3, 66.6, 41.7), "flash": (4.4, 75.2, 7.3)}  # GB, GFLOPs, ms


def standard_hbm() -> sp.Expr:
    """Bytes of Algorithm 0 (forward) and the standard backward, with masking and dropout."""
    forward = 4 * N * d + N**2 * (1 + 2 + 2 + 2 + 1)  # QK^T, mask r/w, softmax r/w, dropout r/w, P@V read
    backward = 4 * N * d + N**2 * (1 + 1 + 2 + 3 + 2 + 1 + 1) + 4 * N * d  # dV, dP, dropout, softmax, mask, dQ, dK
    keep_mask = 2 * N**2 / e  # the dropout keep mask, one byte per element, written then read
    return BH * e * (forward + backward + keep_mask)


def algorithm1_hbm(block_c: sp.Expr) -> sp.Expr:
    """Bytes of the paper's Algorithm 1 (forward) and Algorithm 4 (backward) for key blocks of block_c rows."""
    tc = sp.ceiling(N / block_c)
    forward = 2 * N * d + N * d + tc * (N * d + 2 * N * d) + tc * 4 * N  # K, V; O init; Q, O r/w; l, m r/w
    backward = 4 * N * d + N * d + tc * (5 * N * d + 2 * N)  # K, V, dK, dV; dQ init; Q, O, dO, dQ r/w; l, m
    return BH * e * (forward + backward)


def standard_flops() -> sp.Expr:
    return BH * (4 * N**2 * d + 8 * N**2 * d)


def flash_flops() -> sp.Expr:
    return BH * (4 * N**2 * d + 10 * N**2 * d)  # the backward recomputes Q K^T


def main() -> None:
    values = {N: 1024, d: 64, BH: 64 * 16, e: 2}
    _, block_c = cost.paper_tiles(A100, values[d], torch.float16)
    rows = {
        "standard": (standard_hbm().subs(values), standard_flops().subs(values)),
        "flash (paper Alg. 1/4)": (algorithm1_hbm(block_c).subs(values), flash_flops().subs(values)),
    }
    ours = cost.AttentionShape(batch_heads=64 * 16, nq=1024, nk=1024, head_dim=64, dtype=torch.float16,
                               density=1.0, elementwise_passes=0, mask_bytes_per_score=0.0, training=True)
    tiles = cost.model_tiles(A100, values[d], torch.float16)
    rows[f"flash_fx kernels {tiles[0]}x{tiles[1]}"] = (cost.flash_bytes(ours, *tiles), flash_flops().subs(values))
    print(f"standard HBM bytes: {sp.simplify(standard_hbm())}")
    print(f"Algorithm 1/4 HBM bytes: {algorithm1_hbm(Bc)}   (B_c = ceil(M / 4d) = {block_c})")
    print(f"{'':24}{'HBM GB':>10}{'paper':>8}{'GFLOPs':>10}{'paper':>8}{'pred. ms':>10}{'paper':>8}")
    for name, (hbm, flop_count) in rows.items():
        hbm, flop_count = float(hbm), float(flop_count)
        ms = max(hbm / A100.hbm_bytes_per_s, flop_count / A100.matmul_flops_per_s) * 1e3
        paper = PAPER["standard" if name == "standard" else "flash"]
        shown = ("-", "-", "-") if name.startswith("flash_fx") else paper
        print(f"{name:24}{hbm / 1e9:>10.2f}{shown[0]!s:>8}{flop_count / 1e9:>10.1f}{shown[1]!s:>8}{ms:>10.2f}"
              f"{shown[2]!s:>8}")
    print("HBM accesses vs block size (paper Fig. 2 middle, Algorithm 1/4):")
    for size in (64, 128, 256, 512):
        print(f"  B_c = {size:3d}: {float(algorithm1_hbm(sp.Integer(size)).subs(values)) / 1e9:.2f} GB")
    standard_gb, flash_gb = (float(rows[k][0]) / 1e9 for k in ("standard", "flash (paper Alg. 1/4)"))
    ours_gb = float(rows[f"flash_fx kernels {tiles[0]}x{tiles[1]}"][0]) / 1e9
    print(f"paper_fig2 standard_hbm_gb={standard_gb:.2f} flash_hbm_gb={flash_gb:.2f} flash_fx_hbm_gb={ours_gb:.2f}")


if __name__ == "__main__":
    main()
