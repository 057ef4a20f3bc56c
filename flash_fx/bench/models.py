"""Whole-model benchmark: one training step (forward, backward, AdamW) and one inference forward of small
transformers, eager vs ``torch.compile`` with Inductor vs ``torch.compile(backend="flash_fx")``.

The models are written the way model code spells attention (scores, mask, softmax, weighted sum), so the
compilers see what they see in the wild. Kinds: a GPT-2-like causal decoder, a BERT-like encoder with a
key-padding mask, a sliding-window decoder, and a packed-sequence (document-masked, causal) decoder.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

import flash_fx
from flash_fx.bench.timing import NO_DEADLINE, Deadline, median_seconds

KINDS = ("gpt", "bert_padded", "sliding_window", "packed")
WINDOW = 256


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, kind: str):
        super().__init__()
        self.heads, self.kind = heads, kind
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (z.view(b, n, self.heads, c // self.heads).transpose(1, 2) for z in self.qkv(x).split(c, dim=2))
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
        i = torch.arange(n, device=x.device)[:, None]
        j = torch.arange(n, device=x.device)[None, :]
        if self.kind == "gpt":
            hidden = j > i
        elif self.kind == "bert_padded":
            hidden = ~key_valid[:, None, None, :]
        elif self.kind == "sliding_window":
            hidden = (j > i) | (i - j >= WINDOW)
        else:
            hidden = (doc_ids[:, None, :, None] != doc_ids[:, None, None, :]) | (j > i)
        scores = scores.masked_fill(hidden, float("-inf"))
        y = scores.softmax(-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, kind: str):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, heads, kind)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x, key_valid, doc_ids):
        x = x + self.attn(self.ln1(x), key_valid, doc_ids)
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """A pre-norm transformer; ``kind`` picks the attention mask (see the module docstring)."""

    def __init__(self, kind: str, width: int, heads: int, layers: int, vocab: int = 50304, max_len: int = 4096):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Embedding(max_len, width)
        self.blocks = nn.ModuleList(Block(width, heads, kind) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, tokens, key_valid, doc_ids):
        x = self.embed(tokens) + self.position(torch.arange(tokens.size(1), device=tokens.device))
        for block in self.blocks:
            x = block(x, key_valid, doc_ids)
        return self.head(self.norm(x))


def model_inputs(batch: int, n: int, vocab: int, device: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Tokens, key validity (the second half of the batch padded by a quarter) and packed document ids (4 docs)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, n), generator=generator)
    key_valid = torch.ones(batch, n, dtype=torch.bool)
    key_valid[batch // 2:, n - n // 4:] = False
    cuts = torch.sort(torch.randint(1, n, (batch, 3), generator=generator), dim=1).values
    doc_ids = (torch.arange(n)[None, None, :] >= cuts[:, :, None]).sum(1)
    return tokens.to(device), key_valid.to(device), doc_ids.to(device)


def compiled(model: Transformer, backend: str, inner: str, regional: bool,
             cost_device: str | None = None) -> Callable:
    """``model`` under ``backend``: the whole model compiled, or (``regional``) each transformer block, which the
    blocks share, so a 12-layer model compiles one block instead of twelve inlined ones (both compiled backends
    alike; embedding, final norm and head then run eagerly). ``inner`` compiles the rest of flash_fx's graphs,
    ``cost_device`` is its option ``device``."""
    if backend == "eager":
        return model
    kwargs = {} if backend == "inductor" else {
        "backend": "flash_fx", "options": {"report": False, "inner": inner, "device": cost_device}}
    if not regional:
        return torch.compile(model, **kwargs)
    for block in model.blocks:
        block.compile(**kwargs)
    return model


def _time_backend(model: Transformer, backend: str, inputs: tuple[torch.Tensor, ...], device: str,
                  dtype: torch.dtype, reps: int, regional: bool, inner: str,
                  cost_device: str | None) -> dict[str, float | str]:
    """Median seconds of a training step and of an inference forward of ``model`` under ``backend``, and which
    attention variants flash_fx rewrote over the graphs it compiled, training and inference ("rewritten")."""
    runner = compiled(model, backend, inner, regional, cost_device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = dict(device_type=device, dtype=dtype, enabled=dtype != torch.float32)

    def train_step() -> None:
        with torch.autocast(**autocast):
            loss = runner(*inputs).float().logsumexp(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def inference() -> None:
        with torch.no_grad(), torch.autocast(**autocast):
            runner(*inputs)

    flash_fx.clear_reports()
    times: dict[str, float | str] = {}
    for mode, fn in (("train step", train_step), ("inference", inference)):
        try:
            times[mode] = median_seconds(fn, device, reps)
        except Exception as error:  # e.g. out of memory at this length: reported, not fatal
            print(f"# {backend} {mode}: {type(error).__name__}: {str(error)[:160]}")
            times[mode] = float("nan")
    variants = [r.variant for rep in flash_fx.reports() for r in rep.rewrites]
    times["rewritten"] = ", ".join(f"{variants.count(v)} {v}" for v in sorted(set(variants))) or "-"
    return times


def run(device: str, cases: list[tuple[str, int]], backends: list[str], width: int, heads: int, layers: int,
        tokens: int, vocab: int, reps: int, dtype: torch.dtype, regional: bool = True,
        deadline: Deadline = NO_DEADLINE, inner: str = "inductor", cost_device: str | None = None) -> Iterator[dict]:
    """One row per (kind, N) of ``cases`` (in that order), backend and mode: median ms per step and the speedup over
    eager. Each case has ``tokens`` tokens per batch (batch = tokens // N). Stops at ``deadline``. ``inner`` is
    flash_fx's inner compiler ("aot_eager" for a quick smoke run on the CPU), ``cost_device`` the device its cost
    model predicts for (None: where the model runs)."""
    max_len = max(n for _, n in cases)
    for kind, n in cases:
        if deadline.expired():
            print(f"# models: deadline reached; skipped from {kind} N={n} on")
            return
        batch = max(1, tokens // n)
        torch.manual_seed(0)
        base = Transformer(kind, width, heads, layers, vocab=vocab, max_len=max_len).to(device)
        inputs = model_inputs(batch, n, vocab, device)
        times = {}
        for backend in backends:
            model = Transformer(kind, width, heads, layers, vocab=vocab, max_len=max_len).to(device)
            model.load_state_dict(base.state_dict())
            print(f"# {kind} N={n} batch={batch} {backend}")
            torch._dynamo.reset()  # each model's blocks compile afresh, never against Dynamo's recompile limit
            times[backend] = _time_backend(model, backend, inputs, device, dtype, reps, regional, inner, cost_device)
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
        for backend, by_mode in times.items():
            for mode in ("train step", "inference"):
                seconds, eager = by_mode[mode], times.get("eager", {}).get(mode, float("nan"))
                yield {"model": kind, "n": n, "batch": batch, "layers": layers, "width": width,
                       "backend": backend, "mode": mode, "ms": seconds * 1e3, "vs_eager": eager / seconds,
                       "attention rewritten": by_mode["rewritten"] if backend == "flash_fx" else "-"}
