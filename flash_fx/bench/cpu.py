"""The CPU section of ``python -m flash_fx.bench``: flash_fx against PyTorch's own CPU kernels and plain
``torch.compile``, in one process, medians of wall time (``python -m flash_fx.bench cpu``).

Op level (B1, 12 heads, d 64, float32): causal attention at N through the flash_fx op (the C++ flash path)
against PyTorch's C++ CPU flash kernel (forward) and ``F.scaled_dot_product_attention(is_causal=True)``
(forward + backward), and against the tiled PyTorch path flash_fx ran before; a causal sliding window of 256 keys
and packed documents (4 per sequence, causal) at 2N against the same C++ kernel and SDPA given the dense mask.
The two sides of each op row are timed in turn, rep by rep, in alternating order. Decode level (:func:`decode_rows`):
one query per sequence against a KV cache, GQA 8:1, d 128, at a full cache and at a static cache filled to 25%.
Model level: the 2-layer,
width-768 transformers of :mod:`models` (GPT, sliding window, packed documents), one inference forward and one
training step (forward, backward, AdamW) under ``backend="flash_fx"`` (Inductor inside) against
``torch.compile``'s default. Every row says what was timed, against what, and the ratio
``baseline / flash_fx`` (above 1: flash_fx is faster).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from flash_fx.bench import models
from flash_fx.bench.timing import NO_DEADLINE, Deadline
from flash_fx.cpu_profile import seconds_in_turn

WINDOW = 256
DOCUMENTS = 4
MODEL_KINDS = ("gpt", "sliding_window", "packed")


def _row(level: str, case: str, n: int, mode: str, flash_s: float, baseline_s: float, baseline: str) -> dict:
    return {"level": level, "case": case, "n": n, "mode": mode, "flash_fx_ms": flash_s * 1e3, "baseline": baseline,
            "baseline_ms": baseline_s * 1e3, "ratio": baseline_s / flash_s}


def _masks(kind: str, n: int) -> tuple[dict, torch.Tensor]:
    """The flash_fx op's keyword arguments for a masked case and the same mask as a dense 0 / -inf float mask."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    if kind == "sliding window":
        visible, kwargs = (j <= i) & (j > i - WINDOW), {"window": [WINDOW - 1, 0]}
    else:
        doc = torch.arange(n) * DOCUMENTS // n
        visible, kwargs = (j <= i) & (doc[:, None] == doc[None, :]), {"q_doc": doc[None], "k_doc": doc[None]}
    return kwargs, torch.zeros(n, n).masked_fill(~visible, float("-inf"))


def op_rows(n: int, heads: int = 12, head_dim: int = 64, reps: int = 5) -> Iterator[dict]:
    """The op-level rows (see the module docstring); masked cases at 2N. Each row's two sides are timed in turn."""
    import flash_fx  # noqa: F401  (registers torch.ops.flash_fx.attention)
    from flash_fx.kernels import AttentionSpec, tiled_torch
    from flash_fx.kernels.schedule import schedule
    from flash_fx.kernels.spec import Band

    cpp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    scale = head_dim**-0.5
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, head_dim, requires_grad=True) for _ in range(3))
    spec = AttentionSpec(scale, band=Band(None, 0)).validate(q, k, v)

    def flash() -> torch.Tensor:
        return torch.ops.flash_fx.attention(q, k, v, None, scale, 0)[0]

    yield _row("op", "causal", n, "forward", *_forward_pair(flash, lambda: cpp(q, k, v, 0.0, True, scale=scale),
                                                           reps), "C++ CPU flash kernel")
    yield _row("op", "causal", n, "forward", *_forward_pair(flash, lambda: tiled_torch.attention_forward(
        q, k, v, spec, schedule(spec, n, n, n, 256)), reps), "flash_fx tiled path (before)")
    yield _row("op", "causal", n, "forward+backward", *_step_pair(
        flash, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), reps), "SDPA is_causal")
    for kind in ("sliding window", "documents"):
        torch.manual_seed(0)
        yield from _masked_rows(kind, *(torch.randn(1, heads, 2 * n, head_dim, requires_grad=True) for _ in range(3)),
                                scale, reps)


def _forward_pair(flash: Callable[[], object], baseline: Callable[[], object], reps: int) -> tuple[float, float]:
    def without_grad(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                fn()
        return run
    return seconds_in_turn(without_grad(flash), without_grad(baseline), reps=reps)


def _step_pair(flash: Callable[[], torch.Tensor], baseline: Callable[[], torch.Tensor],
               reps: int) -> tuple[float, float]:
    return seconds_in_turn(lambda: flash().sum().backward(), lambda: baseline().sum().backward(), reps=reps)


def _masked_rows(kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 reps: int) -> Iterator[dict]:
    """Forward and forward + backward of one masked case against the dense-mask baselines."""
    n = q.shape[2]
    kwargs, mask = _masks(kind, n)
    cpp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    def flash() -> torch.Tensor:
        return torch.ops.flash_fx.attention(q, k, v, None, scale, None, **kwargs)[0]

    yield _row("op", kind, n, "forward", *_forward_pair(
        flash, lambda: cpp(q, k, v, 0.0, False, attn_mask=mask, scale=scale), reps),
        "C++ CPU flash kernel, dense mask")
    yield _row("op", kind, n, "forward+backward", *_step_pair(
        flash, lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), reps), "SDPA, dense mask")


#: Decode rows: query heads, KV heads (GQA 8:1), head dim, and the filled fraction of the static cache.
DECODE_HEADS, DECODE_KV_HEADS, DECODE_HEAD_DIM, DECODE_FILLED = 32, 4, 128, 0.25


def decode_rows(cases: list[tuple[int, int]], reps: int = 5) -> Iterator[dict]:
    """Decode-step rows (one query per sequence against ``Nk`` cached keys, batch ``B``, for each ``(B, Nk)``):
    the flash_fx op against SDPA without a mask at a full cache, and with the cache filled to 25% (key validity)
    against SDPA given the same mask (dense, 0 / -inf), forward, float32, KV heads shared by ``enable_gqa``."""
    import flash_fx  # noqa: F401  (registers torch.ops.flash_fx.attention)

    for batch, n_k in cases:
        yield from _decode_case(batch, n_k, reps)


def _decode_case(batch: int, n_k: int, reps: int) -> Iterator[dict]:
    """The two decode rows of one batch size and cache length."""
    scale = DECODE_HEAD_DIM**-0.5
    torch.manual_seed(0)
    q = torch.randn(batch, DECODE_HEADS, 1, DECODE_HEAD_DIM)
    k, v = (torch.randn(batch, DECODE_KV_HEADS, n_k, DECODE_HEAD_DIM) for _ in range(2))
    valid = torch.zeros(batch, n_k, dtype=torch.bool)
    valid[:, : max(1, int(n_k * DECODE_FILLED))] = True
    mask = torch.zeros(batch, 1, 1, n_k).masked_fill(~valid[:, None, None, :], float("-inf"))
    shape = f"B{batch} H{DECODE_HEADS}/{DECODE_KV_HEADS} d{DECODE_HEAD_DIM}"
    yield _row("decode", f"{shape}, full cache", n_k, "forward", *_forward_pair(
        lambda: torch.ops.flash_fx.attention(q, k, v, None, scale, None),
        lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True), reps), "SDPA, no mask")
    yield _row("decode", f"{shape}, cache {DECODE_FILLED:.0%} filled", n_k, "forward", *_forward_pair(
        lambda: torch.ops.flash_fx.attention(q, k, v, None, scale, None, key_valid=valid),
        lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True), reps),
        "SDPA, same mask")


def decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A decode step's attention as transformers' SDPA path writes it: the KV heads repeated for their query groups
    (``repeat_kv``), then SDPA with the cache's mask (None: a full cache)."""
    group = q.shape[1] // k.shape[1]

    def repeat_kv(x: torch.Tensor) -> torch.Tensor:
        return x[:, :, None].expand(x.shape[0], x.shape[1], group, *x.shape[2:]).reshape(
            x.shape[0], x.shape[1] * group, *x.shape[2:])

    return F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), attn_mask=mask)


def compiled_decode_rows(cases: list[tuple[int, int]], reps: int = 5) -> Iterator[dict]:
    """:func:`decode_step` compiled with ``backend="flash_fx"`` (Inductor inside) against ``torch.compile``'s default,
    forward, at a full cache and at a static cache filled to 25%; one compilation per backend and mask kind
    (``dynamic=True``: the cache length and batch are sizes of the graph)."""
    import flash_fx

    compiled = {(backend, masked): torch.compile(decode_step, backend=backend, dynamic=True,
                                                 **({"options": {"report": False}} if backend == "flash_fx" else {}))
                for backend in ("flash_fx", "inductor") for masked in (False, True)}
    flash_fx.clear_reports()
    for batch, n_k in cases:
        torch.manual_seed(0)
        q = torch.randn(batch, DECODE_HEADS, 1, DECODE_HEAD_DIM)
        k, v = (torch.randn(batch, DECODE_KV_HEADS, n_k, DECODE_HEAD_DIM) for _ in range(2))
        valid = torch.arange(n_k) < max(1, int(n_k * DECODE_FILLED))
        mask = torch.zeros(batch, 1, 1, n_k).masked_fill(~valid, float("-inf"))
        shape = f"B{batch} H{DECODE_HEADS}/{DECODE_KV_HEADS} d{DECODE_HEAD_DIM}, compiled repeat_kv + SDPA"
        for masked, case in ((False, "full cache"), (True, f"cache {DECODE_FILLED:.0%} filled, mask")):
            inputs = (q, k, v, mask if masked else None)
            ours, plain = compiled[("flash_fx", masked)], compiled[("inductor", masked)]
            yield _row("decode", f"{shape}, {case}", n_k, "forward", *_forward_pair(
                lambda ours=ours, inputs=inputs: ours(*inputs), lambda plain=plain, inputs=inputs: plain(*inputs),
                reps), "torch.compile default")


def model_rows(cases: list[tuple[str, int]], width: int = 768, heads: int = 12, layers: int = 2,
               vocab: int = 50304, reps: int = 3, deadline: Deadline = NO_DEADLINE) -> Iterator[dict]:
    """The model-level rows: flash_fx (Inductor inside) against ``torch.compile``'s default, batch 1."""
    by_case: dict[tuple, dict] = {}
    for row in models.run("cpu", cases, ["inductor", "flash_fx"], width, heads, layers, 0, vocab, reps,
                          torch.float32, deadline=deadline):
        key = (row["model"], row["n"], row["mode"])
        by_case.setdefault(key, {})[row["backend"]] = row
        if len(by_case[key]) == 2:
            flash, plain = by_case[key]["flash_fx"], by_case[key]["inductor"]
            yield _row("model", f"{row['model']} ({flash['attention rewritten']})", row["n"], row["mode"],
                       flash["ms"] / 1e3, plain["ms"] / 1e3, "torch.compile default")


def run(op_n: int, model_cases: list[tuple[str, int]], reps: int, deadline: Deadline = NO_DEADLINE,
        decode_cases: list[tuple[int, int]] | None = None) -> Iterator[dict]:
    """All rows of the section: op level at ``op_n`` (masked cases at twice that), the decode rows of
    ``decode_cases`` ((B, Nk) pairs), then ``model_cases``."""
    if op_n:
        yield from op_rows(op_n, reps=reps)
    if decode_cases:
        yield from decode_rows(decode_cases, reps=reps)
        yield from compiled_decode_rows(decode_cases, reps=reps)
    if model_cases:
        yield from model_rows(model_cases, reps=max(1, reps // 2 + 1), deadline=deadline)
