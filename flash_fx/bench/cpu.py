"""CPU attention-op timings against PyTorch's own CPU kernels, in one process (medians).

    python -m flash_fx.bench.cpu --n 2048          # B1 H12 d64 fp32 causal at N, sliding window 256 at 2N

Rows: the flash_fx op forward (the C++ flash path on the CPU), PyTorch's C++ CPU flash kernel forward, the tiled
PyTorch path forward (what flash_fx ran on the CPU before the C++ path), and forward+backward of the flash_fx op
and of ``F.scaled_dot_product_attention(is_causal=True)``, with the two ratios the CPU goals are stated in.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F


def median_ms(fn: Callable[[], object], reps: int) -> float:
    """Median wall time of ``fn()`` in milliseconds after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def causal_rows(n: int, heads: int = 12, head_dim: int = 64, reps: int = 5) -> dict[str, float]:
    """The timings (ms) of causal attention B1 x ``heads`` x ``n`` x ``head_dim`` fp32 on the CPU."""
    import flash_fx  # noqa: F401  (registers torch.ops.flash_fx.attention)
    from flash_fx.kernels import AttentionSpec, tiled_torch
    from flash_fx.kernels.schedule import schedule
    from flash_fx.kernels.spec import Band

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, head_dim, requires_grad=True) for _ in range(3))
    scale = head_dim**-0.5
    spec = AttentionSpec(scale, band=Band(None, 0)).validate(q, k, v)

    def flash_forward() -> None:
        with torch.no_grad():
            torch.ops.flash_fx.attention(q, k, v, None, scale, 0)

    def cpp_forward() -> None:
        with torch.no_grad():
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)

    def tiled_forward() -> None:
        with torch.no_grad():
            tiled_torch.attention_forward(q, k, v, spec, schedule(spec, n, n, n, 256))

    def flash_step() -> None:
        torch.ops.flash_fx.attention(q, k, v, None, scale, 0)[0].sum().backward()

    def sdpa_step() -> None:
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    return {"flash_fx forward": median_ms(flash_forward, reps), "C++ CPU flash forward": median_ms(cpp_forward, reps),
            "tiled path forward": median_ms(tiled_forward, reps), "flash_fx fwd+bwd": median_ms(flash_step, reps),
            "SDPA causal fwd+bwd": median_ms(sdpa_step, reps)}


def window_rows(n: int, window: int = 256, heads: int = 12, head_dim: int = 64, reps: int = 3) -> dict[str, float]:
    """Forward timings (ms) of causal sliding-window attention (``window`` keys back) B1 x ``heads`` x ``n`` fp32:
    the flash_fx op (the schedule's calls of the C++ kernel) against the C++ kernel given the dense mask."""
    import flash_fx  # noqa: F401  (registers torch.ops.flash_fx.attention)

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, head_dim) for _ in range(3))
    scale = head_dim**-0.5
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    mask = torch.zeros(n, n).masked_fill(~((j <= i) & (j >= i - window)), float("-inf"))

    def flash_forward() -> None:
        torch.ops.flash_fx.attention(q, k, v, None, scale, 0, window=[window, 0])

    def cpp_forward() -> None:
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask, scale=scale)

    with torch.no_grad():
        return {"flash_fx window forward": median_ms(flash_forward, reps),
                "C++ CPU flash forward, dense window mask": median_ms(cpp_forward, reps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    os.environ["TRITON_INTERPRET"] = "0"
    rows = causal_rows(args.n, args.heads, args.head_dim, args.reps)
    print(f"causal attention B1 H{args.heads} N{args.n} d{args.head_dim} fp32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, medians of {args.reps}:")
    print("| what | ms |\n| --- | --- |")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.1f} |")
    print(f"forward: C++ CPU flash / flash_fx = {rows['C++ CPU flash forward'] / rows['flash_fx forward']:.2f}x; "
          f"fwd+bwd: SDPA / flash_fx = {rows['SDPA causal fwd+bwd'] / rows['flash_fx fwd+bwd']:.2f}x "
          "(above 1: flash_fx faster)")
    window_n = 2 * args.n
    window = window_rows(window_n, 256, args.heads, args.head_dim, max(1, args.reps // 2))
    print(f"sliding window 256, causal, N{window_n}: " + "; ".join(f"{k} {v:.1f} ms" for k, v in window.items()))
    print(f"window forward: C++ CPU flash with the dense mask / flash_fx = "
          f"{window['C++ CPU flash forward, dense window mask'] / window['flash_fx window forward']:.2f}x")


if __name__ == "__main__":
    main()
