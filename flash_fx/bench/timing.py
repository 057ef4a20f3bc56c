"""Timing and environment records for the benchmarks: medians, warm-up excluded, same run, same device."""

from __future__ import annotations

import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch


class Deadline:
    """A point in time after which a benchmark section starts nothing new (``None`` seconds: never)."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.perf_counter() + seconds

    def expired(self) -> bool:
        return self.end is not None and time.perf_counter() > self.end

    def left(self) -> float:
        """Seconds left (infinite without a limit, never negative)."""
        return float("inf") if self.end is None else max(0.0, self.end - time.perf_counter())


NO_DEADLINE = Deadline(None)


def median_seconds(fn: Callable[[], object], device: str, reps: int) -> float:
    """Median run time of ``fn`` in seconds.

    On CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs, warm-up excluded), timing for
    about ``reps`` x 10 ms after a 10 ms warm-up (the first call, which compiles, is outside both). On the CPU:
    ``time.perf_counter`` around ``reps`` calls after one warm-up call.
    """
    if device == "cuda":
        from triton.testing import do_bench

        fn()  # compile and autotune outside the timed region
        return do_bench(fn, warmup=10, rep=max(reps, 1) * 10, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(max(reps, 1)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_name(device: str) -> str:
    """The card's name (CUDA) or the CPU's model."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def commit() -> str:
    """The git commit of the checkout the benchmark runs from ("unknown" outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: str) -> dict[str, str]:
    """What produced a result: device, torch and Triton versions, commit."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version, "commit": commit()}
