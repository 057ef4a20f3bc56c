"""Opt-in autotuning of the Triton kernels' launch configurations.

The table in :mod:`flash_fx.kernels.config` gives one configuration per (card, head dim, dtype, direction).
With autotuning on (``FLASH_FX_AUTOTUNE=1`` for CUDA tensors, or :func:`set_autotune`), the first call for a
:class:`TuneKey` times a few candidate configurations around the table's (:func:`candidates`) and every later
call with that key uses the fastest. Block sizes are baked into Python-side arguments (per-tile document
bounds, block-sparse layouts), so tuning happens here, by calling the launch function once per candidate,
not with ``triton.autotune`` on the kernels.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import torch
from flash_fx.kernels import config
from flash_fx.kernels.config import Tiles

__all__ = ["TuneKey", "autotune_enabled", "candidates", "clear_tuned_configs", "neighbours", "set_autotune", "spills",
           "timer", "tune", "tuned_configs"]

#: At most this many candidates per key: the first compile of each must stay well under a minute in all.
MAX_CANDIDATES = 6

#: The table entries' neighbours that ptxas spilled registers for (stored bytes > 0) in
#: ``python -m flash_fx.bench.compile_check`` (Triton 3.7.1; sm_90 and sm_80, dense kernels; on sm_90 for head
#: dims 64 and 128 in 16-bit dtypes causal ones too, which spill a little more; bfloat16 as float16):
#: (capability major, padded head dim, element size, backward, BLOCK_M, BLOCK_N, num_warps, num_stages). Candidates
#: among them are not timed; no table entry is among them.
SPILLS: frozenset[tuple[int, ...]] = frozenset({
    (8, 16, 4, True, 64, 64, 4, 2), (8, 16, 4, True, 64, 128, 8, 2), (8, 32, 2, False, 128, 128, 4, 3),
    (8, 32, 2, True, 64, 128, 4, 2), (8, 32, 2, True, 128, 64, 4, 2), (8, 32, 4, True, 64, 32, 4, 2),
    (8, 32, 4, True, 64, 64, 8, 2), (8, 32, 4, True, 128, 32, 8, 2), (8, 64, 2, False, 128, 32, 4, 3),
    (8, 64, 2, False, 128, 64, 4, 2), (8, 64, 2, False, 128, 128, 4, 3), (8, 64, 2, True, 64, 128, 4, 2),
    (8, 64, 2, True, 128, 64, 4, 2), (8, 64, 4, False, 64, 32, 4, 3), (8, 64, 4, False, 128, 32, 8, 3),
    (8, 64, 4, True, 32, 32, 8, 2), (8, 64, 4, True, 64, 32, 8, 3), (8, 128, 2, False, 128, 32, 4, 3),
    (8, 128, 2, True, 64, 64, 4, 2), (8, 128, 2, True, 64, 128, 8, 2), (8, 128, 2, True, 128, 64, 8, 2),
    (8, 256, 4, False, 64, 16, 4, 2), (8, 256, 4, True, 32, 32, 4, 1), (9, 16, 4, True, 64, 64, 4, 2),
    (9, 16, 4, True, 64, 128, 8, 2), (9, 16, 4, True, 128, 64, 8, 2), (9, 32, 2, True, 128, 64, 4, 2),
    (9, 32, 4, False, 64, 64, 4, 3), (9, 32, 4, True, 64, 32, 4, 2), (9, 32, 4, True, 64, 64, 8, 2),
    (9, 32, 4, True, 128, 32, 8, 2), (9, 64, 2, False, 128, 128, 4, 3), (9, 64, 2, True, 64, 32, 4, 2),
    (9, 64, 2, True, 64, 128, 4, 2), (9, 64, 2, True, 128, 64, 4, 2), (9, 64, 4, False, 64, 32, 4, 3),
    (9, 64, 4, False, 64, 64, 8, 3), (9, 64, 4, False, 128, 32, 8, 3), (9, 64, 4, True, 64, 32, 8, 2),
    (9, 128, 2, True, 64, 32, 8, 2), (9, 128, 2, True, 64, 64, 4, 2), (9, 128, 2, True, 64, 128, 8, 2),
    (9, 128, 2, True, 128, 64, 8, 2), (9, 128, 4, False, 64, 16, 4, 3), (9, 128, 4, False, 64, 32, 8, 3),
    (9, 128, 4, False, 128, 16, 8, 3), (9, 128, 4, True, 32, 16, 4, 2), (9, 128, 4, True, 32, 32, 8, 2),
    (9, 128, 4, True, 64, 16, 8, 2), (9, 256, 2, True, 32, 64, 8, 1), (9, 256, 2, True, 64, 32, 8, 1),
    (9, 256, 4, False, 64, 16, 4, 2), (9, 256, 4, False, 64, 32, 8, 2), (9, 256, 4, False, 128, 16, 8, 2),
    (9, 256, 4, True, 32, 32, 4, 1), (9, 256, 4, True, 32, 64, 8, 1), (9, 256, 4, True, 64, 32, 8, 1),
})

_SETTING: bool | None = None  # set_autotune's value; None: follow FLASH_FX_AUTOTUNE (CUDA tensors only)

T = TypeVar("T")


@dataclass(frozen=True)
class TuneKey:
    """What a tuned configuration is cached under: the kernel direction, card, shape class and the
    specialization flags that change the kernels' cost."""

    backward: bool
    capability: tuple[int, int] | None
    head_dim: int
    dtype: str
    n_q: int  # bucketed: the next power of two
    n_k: int
    causal: bool = False
    window: bool = False
    sparse: bool = False
    bias: bool = False
    dropout: bool = False
    gqa: bool = False
    key_padding: bool = False
    documents: bool = False
    alibi: bool = False
    rel: bool = False
    bias_grad: bool = False
    rel_grad: bool = False
    kv_tiled: bool = False
    mod: bool = False  # a score modification (its steps are compiled in; their cost is alike)


@dataclass
class _Tuned:
    tiles: Tiles
    times_ms: dict[Tiles, float]


_CACHE: dict[TuneKey, _Tuned] = {}


def bucket(n: int) -> int:
    """A sequence length's tuning bucket: the next power of two (at least 1)."""
    return 1 << max(n - 1, 0).bit_length()


def set_autotune(enabled: bool | None) -> None:
    """Turn autotuning on or off for this process (None: follow ``FLASH_FX_AUTOTUNE`` again)."""
    global _SETTING
    _SETTING = enabled


def autotune_enabled(device: torch.device | None = None) -> bool:
    """Whether calls on ``device`` tune: :func:`set_autotune`'s setting, else ``FLASH_FX_AUTOTUNE=1`` for CUDA
    devices (the interpreter tunes only when turned on explicitly, with :func:`set_autotune`)."""
    if _SETTING is not None:
        return _SETTING
    on_gpu = device is not None and device.type == "cuda"
    return on_gpu and os.environ.get("FLASH_FX_AUTOTUNE") == "1"


def timer(run: Callable[[], object], tiles: Tiles, device: torch.device) -> float:
    """Milliseconds one call of ``run`` (the launch with ``tiles``) takes: the median of
    ``triton.testing.do_bench`` on CUDA, one ``perf_counter`` measurement elsewhere. Tests replace this."""
    if device.type == "cuda":
        from triton.testing import do_bench

        with torch.cuda.device(device):
            return float(do_bench(run, return_mode="median"))
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3


def _valid(tiles: Tiles, on_gpu: bool) -> bool:
    """Powers of two, tiles of 16 to 128 rows; on a GPU 4 or 8 warps and 1 to 4 stages."""
    blocks_ok = all(16 <= b <= 128 and b & (b - 1) == 0 for b in tiles[:2])
    if not on_gpu:
        return blocks_ok
    return blocks_ok and tiles.num_warps in (4, 8) and 1 <= tiles.num_stages <= 4


def neighbours(head_dim: int, dtype: torch.dtype, capability: tuple[int, int] | None, *, backward: bool,
               on_gpu: bool) -> list[Tiles]:
    """The table's configuration first, then its neighbours (key tiles doubled and halved, query tiles doubled
    or halved and, on a GPU, one stage more or fewer and the other warp count) that are valid and fit the card's
    shared memory budget."""
    base = config.choose_tiles(head_dim, dtype, on_gpu, backward=backward, capability=capability)
    m, n, warps, stages = base
    found = [base, Tiles(m, 2 * n, warps, stages), Tiles(m, n // 2, warps, stages),
             Tiles(2 * m if m < 128 else m // 2, n, warps, stages)]
    if on_gpu:
        found += [Tiles(m, n, warps, stages + 1 if stages < 3 else stages - 1), Tiles(m, n, 12 - warps, stages)]
    budget = config.sram_budget(capability)
    fits = [t for t in found
            if not on_gpu or config.sram_bytes(*t[:2], head_dim, dtype, t.num_stages, backward=backward) <= budget]
    return [t for i, t in enumerate(fits) if t not in fits[:i] and _valid(t, on_gpu)]


def spills(tiles: Tiles, head_dim: int, dtype: torch.dtype, capability: tuple[int, int] | None, *,
           backward: bool) -> bool:
    """Whether the compile check saw ptxas spill registers for this configuration (:data:`SPILLS`)."""
    return (*config.table_key(head_dim, dtype, capability, backward), *tiles) in SPILLS


def candidates(head_dim: int, dtype: torch.dtype, capability: tuple[int, int] | None, *, backward: bool,
               on_gpu: bool) -> list[Tiles]:
    """What the autotuner times: the :func:`neighbours` that did not spill registers in the compile check, at
    most :data:`MAX_CANDIDATES`, the table's configuration first."""
    found = neighbours(head_dim, dtype, capability, backward=backward, on_gpu=on_gpu)
    kept = [t for t in found if not on_gpu or not spills(t, head_dim, dtype, capability, backward=backward)]
    return kept[:MAX_CANDIDATES]


def is_triton_error(error: BaseException) -> bool:
    """Whether ``error`` was raised by Triton itself (a kernel that cannot compile or launch here)."""
    return type(error).__module__.startswith("triton")


def tune(key: TuneKey, found: list[Tiles], run: Callable[[Tiles], T], device: torch.device) -> Tiles:
    """The fastest of ``found`` for ``key``: cached, or timed now (each candidate's ``run`` through
    :func:`timer`) and cached for the process. A candidate that Triton cannot compile or launch is skipped (its
    time recorded as infinite); if none can, the last error is raised. While a CUDA graph is being captured
    nothing is timed: an untuned key gets the table's configuration (``found[0]``)."""
    if key in _CACHE:
        return _CACHE[key].tiles
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return found[0]
    times: dict[Tiles, float] = {}
    failure: BaseException | None = None
    for tiles in found:
        try:
            times[tiles] = timer(lambda tiles=tiles: run(tiles), tiles, device)
        except Exception as error:
            if not is_triton_error(error):
                raise
            times[tiles], failure = math.inf, error
    if failure is not None and all(t == math.inf for t in times.values()):
        raise failure
    best = min(times, key=times.__getitem__)
    _CACHE[key] = _Tuned(best, times)
    return best


def tuned_configs() -> list[dict[str, Any]]:
    """Every configuration tuned in this process: the key's fields (``kernel`` "forward" or "backward"), the
    chosen ``block_m``, ``block_n``, ``num_warps``, ``num_stages``, and ``candidates``, each configuration with
    its time ``ms``."""
    rows = []
    for key, tuned in _CACHE.items():
        fields = {name: value for name, value in asdict(key).items() if name != "backward"}
        rows.append({"kernel": "backward" if key.backward else "forward", **fields, **tuned.tiles._asdict(),
                     "candidates": [{**tiles._asdict(), "ms": ms} for tiles, ms in tuned.times_ms.items()]})
    return rows


def clear_tuned_configs() -> None:
    """Forget the configurations tuned so far (the next call of each key tunes again)."""
    _CACHE.clear()
