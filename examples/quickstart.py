"""Quickstart: compile a small GPT-style model with backend="flash_fx", print the report, check against eager.

    python examples/quickstart.py            # CPU: attention runs PyTorch's C++ flash kernel (causal, no dropout)
    TRITON_INTERPRET=1 python examples/quickstart.py   # CPU: the Triton kernels, through the interpreter
On a CUDA machine the same script runs the Triton kernels compiled for the GPU.
"""

import math
import time

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    """Attention as nanoGPT's manual path writes it: a tril buffer, masked_fill, softmax, dropout."""

    def __init__(self, width: int, heads: int, block_size: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.attn_dropout = nn.Dropout(dropout)
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.size()
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        att = self.attn_dropout(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, block_size: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, block_size, dropout)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 512, width: int = 128, heads: int = 4, layers: int = 2, block_size: int = 1024):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Embedding(block_size, width)
        self.blocks = nn.ModuleList(Block(width, heads, block_size, dropout=0.1) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position(torch.arange(tokens.size(1), device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def explain_inputs() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A model and example inputs for `python -m flash_fx explain examples/quickstart.py:explain_inputs`."""
    return TinyGPT().eval(), (torch.randint(0, 512, (2, 1000)),)


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm())


def median_ms(fn, reps: int = 7) -> float:
    """Median wall time of ``fn()`` in milliseconds after one warm-up call (CUDA synchronised)."""
    fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def time_against_baselines(model: nn.Module, compiled: nn.Module, tokens: torch.Tensor) -> None:
    """Forward time of eager, plain torch.compile and backend="flash_fx" on this machine, medians, in one run
    (autograd on, as the correctness check ran, so the compiled graphs are reused)."""
    plain = torch.compile(model)  # Inductor, torch.compile's default
    times = {"eager": median_ms(lambda: model(tokens)), "torch.compile": median_ms(lambda: plain(tokens)),
             "flash_fx": median_ms(lambda: compiled(tokens))}
    print("forward, median of 7 on this machine: " + ", ".join(f"{k} {v:.2f} ms" for k, v in times.items()))
    print(f"flash_fx vs eager {times['eager'] / times['flash_fx']:.2f}x, "
          f"vs torch.compile {times['torch.compile'] / times['flash_fx']:.2f}x (higher is faster)")


def main() -> None:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = TinyGPT().to(device).eval()  # eval: dropout off, so compiled and eager outputs are comparable
    tokens = torch.randint(0, 512, (2, 1000), device=device)

    compiled = torch.compile(model, backend="flash_fx")  # no flash_fx import needed: an entry point
    start = time.perf_counter()
    logits = compiled(tokens)
    print(f"compiled forward (including compilation): {time.perf_counter() - start:.1f} s")
    logits.float().logsumexp(-1).mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    expected = model(tokens)
    expected.float().logsumexp(-1).mean().backward()
    grad_error = max(relative_error(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
    print(f"logits relative error vs eager: {relative_error(logits, expected):.2e}")
    print(f"largest parameter-gradient relative error vs eager: {grad_error:.2e}")

    import flash_fx

    rewrites = [r for report in flash_fx.reports() for r in report.rewrites]
    print(f"attention blocks rewritten: {len(rewrites)} ({', '.join(sorted({r.variant for r in rewrites}))})")
    assert len(rewrites) == 2 and relative_error(logits, expected) < 1e-4 and grad_error < 1e-3
    time_against_baselines(model, compiled, tokens)
    print("quickstart OK")


if __name__ == "__main__":
    main()
