"""The card's measured ceilings and each measurement's floor: how close a time is to what the hardware allows.

A kernel cannot run faster than its FLOPs over the card's matrix throughput, nor than the bytes it must move
(each input read once, each output written once) over the card's bandwidth. Both ceilings are measured in the
same run (a large matrix product, a large copy), so the floors are this card's, not a datasheet's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flash_fx.bench.timing import median_seconds


@dataclass(frozen=True)
class Ceilings:
    """Measured matrix throughput (FLOP/s, in the benchmark's dtype) and copy bandwidth (bytes read + written / s)."""

    flops_per_s: float
    bytes_per_s: float

    def floor_seconds(self, flop: float, nbytes: float) -> float:
        """The larger of the compute floor and the memory floor."""
        return max(flop / self.flops_per_s, nbytes / self.bytes_per_s)

    def row(self, device_name: str, dtype: torch.dtype) -> dict:
        return {"device": device_name, "dtype": str(dtype).removeprefix("torch."),
                "matmul_tflops": self.flops_per_s / 1e12, "copy_tb_per_s": self.bytes_per_s / 1e12}


def measure(device: str, dtype: torch.dtype, reps: int = 5) -> Ceilings:
    """Time an n x n x n matrix product and a copy (8192 and 1 GiB on CUDA; 1024 and 64 MiB on the CPU)."""
    n, copy_bytes = (8192, 2**30) if device == "cuda" else (1024, 2**26)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    matmul = median_seconds(lambda: a @ b, device, reps)
    source = torch.randn(copy_bytes // 4, device=device)
    target = torch.empty_like(source)
    copy = median_seconds(lambda: target.copy_(source), device, reps)
    return Ceilings(flops_per_s=2 * n**3 / matmul, bytes_per_s=2 * copy_bytes / copy)


def attention_min_bytes(batch: int, heads: int, n: int, head_dim: int, itemsize: int, mode: str) -> float:
    """Bytes an exact attention kernel must move at least: Q, K, V read and O (+ the float32 LSE) written in the
    forward; Q, K, V, O, dO and the LSE read and dQ, dK, dV written in the backward."""
    tensor = batch * heads * n * head_dim * itemsize
    lse = batch * heads * n * 4
    forward, backward = 4 * tensor + lse, 8 * tensor + lse
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}[mode]
