"""The performance bars flash_fx is measured against, evaluated on one run's rows.

Each bar is a ratio of two times (or peaks) measured in the same run on the same device, with its goal; the
worst case over the shapes the bar covers is reported with where it occurred. A bar whose measurements are
missing (a section skipped, a baseline unavailable) says so instead of passing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

Rows = list[dict]


def _pick(rows: Rows, value: str, **where: object) -> dict[tuple, float]:
    """``value`` of the rows matching ``where``, keyed by the rows' remaining identifying fields."""
    found = {}
    for row in rows:
        if all(str(row.get(k)) == str(v) for k, v in where.items()):
            key = tuple((k, row[k]) for k in ("n", "head_dim", "dtype", "causal", "density", "model", "mode")
                        if k in row and k not in where)
            found[key] = float(row[value])
    return found


def _worst(ratios: Iterable[tuple[tuple, float]]) -> tuple[float, str]:
    """The smallest finite ratio and where it was measured (NaN, "" when there is none)."""
    finite = [(ratio, key) for key, ratio in ratios if math.isfinite(ratio)]
    if not finite:
        return float("nan"), ""
    ratio, key = min(finite)
    return ratio, ", ".join(f"{k}={v}" for k, v in key)


def _ratio(numerator: dict[tuple, float], denominator: dict[tuple, float],
           keep: Callable[[dict], bool] = lambda key: True) -> list[tuple[tuple, float]]:
    return [(key, numerator[key] / denominator[key]) for key in numerator
            if key in denominator and keep(dict(key)) and denominator[key] > 0]


def _fastest_sdpa(rows: Rows, mode: str) -> dict[tuple, float]:
    best: dict[tuple, float] = {}
    for method in {r["method"] for r in rows if str(r["method"]).startswith("sdpa ")}:
        for key, ms in _pick(rows, "ms", method=method, mode=mode).items():
            if math.isfinite(ms):
                best[key] = min(best.get(key, math.inf), ms)
    return best


def _kernel_bars(rows: Rows) -> list[tuple[str, float, list]]:
    def large_d128(key: dict) -> bool:
        return key["n"] >= 2048 and key["head_dim"] == 128 and key["dtype"] in ("float16", "bfloat16")

    bars = []
    for mode, goal in (("forward", 1.0), ("forward+backward", 0.9)):
        flash = _pick(rows, "ms", method="flash_fx", mode=mode)
        bars.append((f"{mode}, d=128, N>=2K, fp16/bf16: fastest SDPA backend time / flash_fx time", goal,
                     _ratio(_fastest_sdpa(rows, mode), flash, large_d128)))
    flash = _pick(rows, "ms", method="flash_fx", mode="forward")
    dense = {tuple(kv for kv in key if kv[0] != "causal"): ms for key, ms in flash.items() if not dict(key)["causal"]}
    causal = {tuple(kv for kv in key if kv[0] != "causal"): ms for key, ms in flash.items() if dict(key)["causal"]}
    bars.append(("forward, d=128, N>=2K: flash_fx non-causal time / causal time", 1.7,
                 _ratio(dense, causal, lambda key: key["n"] >= 2048 and key["head_dim"] == 128)))
    return bars


def _sparse_bars(rows: Rows) -> list[tuple[str, float, list]]:
    sparse = _pick(rows, "ms", method="flash_fx sparse", density=0.25)
    return [("block-sparse, 25% density: dense flash_fx time / sparse time", 3.0,
             _ratio(_pick(rows, "ms", method="flash_fx dense", density=0.25), sparse)),
            ("block-sparse, 25% density: FlexAttention time / flash_fx sparse time", 1.0,
             _ratio(_pick(rows, "ms", method="flex", density=0.25), sparse))]


def _model_bars(rows: Rows) -> list[tuple[str, float, list]]:
    step = "train step"
    flash = _pick(rows, "ms", backend="flash_fx", mode=step)
    eager = _pick(rows, "ms", backend="eager", mode=step)
    inductor = _pick(rows, "ms", backend="inductor", mode=step)

    def gpt_1k(key: dict) -> bool:
        return key["model"] == "gpt" and key["n"] == 1024

    def long_or_masked(key: dict) -> bool:
        return (key["model"] == "gpt" and key["n"] == 4096) or key["model"] in ("sliding_window", "packed")

    return [("GPT-2-small train step, N=1024: eager time / flash_fx time", 1.5, _ratio(eager, flash, gpt_1k)),
            ("GPT-2-small train step, N=1024: Inductor time / flash_fx time", 1.0, _ratio(inductor, flash, gpt_1k)),
            ("train step, GPT N=4096, sliding-window, packed: Inductor time / flash_fx time", 1.3,
             _ratio(inductor, flash, long_or_masked))]


def _memory_bars(rows: Rows) -> list[tuple[str, float, list]]:
    flash = _pick(rows, "peak_mb", method="flash_fx")
    eager = _pick(rows, "peak_mb", method="eager")
    points = sorted((dict(key)["n"], mb) for key, mb in flash.items() if math.isfinite(mb) and mb > 0)
    growth = []
    if len(points) >= 2:  # how peak memory grows with N: 1 = linear, 2 = quadratic
        (n0, m0), (n1, m1) = points[0], points[-1]
        growth = [((("n", f"{n0}..{n1}"),), 1 / (math.log(m1 / m0) / math.log(n1 / n0)))]
    return [("memory, N=8K: eager peak / flash_fx peak", 5.0, _ratio(eager, flash, lambda key: key["n"] == 8192)),
            ("memory: 1 / (exponent of flash_fx peak in N), 1 = linear", 0.9, growth)]


def _decode_bars(rows: Rows) -> list[tuple[str, float, list]]:
    def ratios(case: str, baseline: str) -> list[tuple[tuple, float]]:
        return [(tuple((k, row[k]) for k in ("dtype", "batch", "n_k")), float(row["ratio"])) for row in rows
                if row["case"] == case and row["baseline"] == baseline]

    return [("decode step, full cache: SDPA with the same mask time / flash_fx time", 1.0,
             ratios("full cache", "SDPA, same mask")),
            ("decode step, full cache: SDPA without a mask time / flash_fx time", 0.9,
             ratios("full cache", "SDPA, no mask")),
            ("decode step, static cache 25% filled: SDPA with the mask time / flash_fx time", 2.0,
             ratios("cache 25% filled", "SDPA, same mask"))]


def evaluate(results: dict[str, Rows]) -> list[dict]:
    """One row per bar: its goal, the worst measured ratio, where, and whether the goal is met."""
    sections = {"kernels": _kernel_bars, "sparse": _sparse_bars, "models": _model_bars, "memory": _memory_bars,
                "decode": _decode_bars}
    rows = []
    for name, bars in sections.items():
        for bar, goal, ratios in bars(results.get(name, [])):
            measured, where = _worst(ratios)
            rows.append({"bar": bar, "goal": goal, "measured (worst case)": measured, "where": where or "-",
                         "met": "not measured" if math.isnan(measured) else ("yes" if measured >= goal else "no")})
    return rows
