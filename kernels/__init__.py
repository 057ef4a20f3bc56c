"""FlashAttention kernels behind flash_fx's rewrites.

``attention_forward(q, k, v, spec)`` and ``attention_backward(grad_out, saved, spec)`` compute what the
:class:`~flash_fx.kernels.spec.AttentionSpec` stands for (the contract is stated once, in :mod:`spec`): the
Triton kernels when :func:`uses_triton` says so (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), the
tiled PyTorch implementation of the same algorithm otherwise. q, k, v may have any strides.

The forward returns ``(out, lse)``: ``lse[..., 0] + lse[..., 1]`` is each row's natural-log log-sum-exp as an
unevaluated sum (the rounded float32 value and what rounding lost, which keeps the normalizer of a row hidden
entirely by a finite fill, whose ``fill + log(n)`` rounds to ``fill``). The backward returns ``(dq, dk, dv,
dbias, drel)``; dbias is the float32 gradient of the bias expanded to [B, Hq, Nq, Nk] when the spec's bias
requires grad (the caller sums it down to the bias's own shape), drel that of the relative table expanded to
[B, Hq, Nq + Nk - 1] likewise, else None. Dropout's keep mask is never stored: the backward regenerates it from
the spec's seed and offset (:mod:`dropout`), and :func:`dropout_keep_mask` materializes it.

Both paths visit the (query tile, key tile) pairs of the call's tile schedule (:mod:`schedule`): empty tiles
are skipped, partial ones get every mask, full ones none (and no read of a bias that holds masks). The tiled path
walks one query tile of all rows against key columns of 256 (128 x 128 tile pairs for a mask bias);
:func:`tile_density` gives the fraction of tile pairs the forward visits. On the CPU, specs without ALiBi, relative
tables, dropout or a bias that needs a gradient run PyTorch's C++ flash kernel instead (:mod:`cpu_flash`).

Launch configurations (tile sizes, warps, stages) come from :func:`config.choose_tiles`, a table per GPU compute
capability, overridden by a :class:`Launch`. With autotuning on (``FLASH_FX_AUTOTUNE=1`` for CUDA tensors, or
:func:`set_autotune`) and no tile size given, the first call of each :class:`tuning.TuneKey` times a few
candidates around the table's entry and later calls use the fastest; :func:`tuned_configs` lists them.

If a Triton kernel fails to compile or launch on this machine (an error raised by Triton), the entry point warns
once for that configuration (entry, dtype, head dim, features) and runs it on the tiled PyTorch path from then on
(:func:`triton_failures` lists them); results are the same, and other configurations keep the Triton kernels.
"""

from __future__ import annotations

import contextvars
import functools
import os
import warnings
from collections.abc import Callable

import torch
from flash_fx.kernels import config, cpu_flash, decode, filled_rows, sinks, tiled_torch, tuning
from flash_fx.kernels.config import Tiles
from flash_fx.kernels.dropout import dropout_keep_mask
from flash_fx.kernels.schedule import schedule
from flash_fx.kernels.spec import AttentionInputError, AttentionSpec, Launch, Saved
from flash_fx.kernels.tuning import set_autotune, tuned_configs

__all__ = ["SUPPORTED_DTYPES", "AttentionInputError", "AttentionSpec", "Launch", "Saved", "attention_backward",
           "attention_forward", "dropout_keep_mask", "launch_tiles", "set_autotune", "supports", "tile_density",
           "triton_failure", "triton_failures", "triton_interpreted", "tuned_configs", "uses_triton"]

#: The dtypes of q, k, v the kernels take.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

DEFAULT_LAUNCH = Launch()  # the table's tiles (or autotuned ones)
_TRITON_FAILURES: dict[tuple, str] = {}  # configuration (see _configuration) -> why its Triton kernels failed
_FORCED_TILED = contextvars.ContextVar("flash_fx_forced_tiled", default=False)


def triton_interpreted() -> bool:
    """True when Triton's interpreter runs the Triton kernels on CPU tensors (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def uses_triton(t: torch.Tensor) -> bool:
    """True if attention on ``t`` runs the Triton kernels: CUDA tensors, or CPU ones under the interpreter,
    unless the call's configuration failed in Triton before in this process (see :func:`triton_failures`)."""
    on_device = t.is_cuda or (t.device.type == "cpu" and triton_interpreted())
    return on_device and not _FORCED_TILED.get()


def triton_failures() -> dict[tuple, str]:
    """The configurations whose Triton kernels failed in this process, and why (their errors)."""
    return dict(_TRITON_FAILURES)


def triton_failure() -> str | None:
    """Why a Triton kernel first failed in this process, or None while none has."""
    return next(iter(_TRITON_FAILURES.values()), None)


def _configuration(args: tuple) -> tuple:
    """What selects a compiled Triton kernel: the entry, the dtype, the head dim and the spec's features."""
    backward = isinstance(args[1], Saved)
    q = args[1].q if backward else args[0]
    spec: AttentionSpec = args[2] if backward else args[3]
    features = tuple(sorted(name for name, on in spec.features().items() if on))
    return "attention_backward" if backward else "attention_forward", str(q.dtype), q.shape[-1], q.device.type, features


def _falls_back_to_tiled(entry: Callable) -> Callable:
    """Run ``entry``; if a Triton kernel fails to compile or launch (an error raised by Triton itself: an old GPU
    architecture, too little shared memory, a Triton version the kernels do not support), warn once for that
    configuration and run it, then and later, on the tiled PyTorch path: the same algorithm and semantics
    (dropout stream included), in PyTorch ops. Other configurations keep the Triton kernels."""

    def tiled(*args):
        token = _FORCED_TILED.set(True)
        try:
            return entry(*args)
        finally:
            _FORCED_TILED.reset(token)

    @functools.wraps(entry)
    def run(*args):
        key = _configuration(args)
        if key in _TRITON_FAILURES:
            return tiled(*args)
        try:
            return entry(*args)
        except Exception as error:
            if _FORCED_TILED.get() or not tuning.is_triton_error(error):
                raise
            _TRITON_FAILURES[key] = f"{type(error).__name__}: {error}"[:500]
            warnings.warn(f"flash_fx: the Triton attention kernels failed ({_TRITON_FAILURES[key]}) for {key}; "
                          "this configuration runs the tiled PyTorch implementation of the same algorithm from now "
                          "on", stacklevel=2)
            return tiled(*args)

    return run


@functools.lru_cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _launch_tiles(q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec, launch: Launch,
                  run: Callable[[Tiles], object], *, backward: bool, value_dim: int) -> Tiles:
    """The launch configuration: the table's for this card, with the launch's block sizes if given; with
    autotuning on and no block size given, the fastest candidate for the call's :class:`tuning.TuneKey`."""
    capability = _capability(q.device) if q.is_cuda else None
    head_dim, on_gpu = max(q.shape[-1], value_dim), q.is_cuda  # tiles sized for the wider of q/k and v
    if launch.block_m is None and launch.block_n is None and tuning.autotune_enabled(q.device):
        key = tuning.TuneKey(backward, capability, head_dim, str(q.dtype).removeprefix("torch."),
                             tuning.bucket(q.shape[2]), tuning.bucket(k.shape[2]), gqa=q.shape[1] != k.shape[1],
                             **spec.features())
        found = tuning.candidates(head_dim, q.dtype, capability, backward=backward, on_gpu=on_gpu)
        return tuning.tune(key, found, run, q.device)
    tiles = config.choose_tiles(head_dim, q.dtype, on_gpu, backward=backward, capability=capability)
    return tiles._replace(block_m=launch.block_m or tiles.block_m, block_n=launch.block_n or tiles.block_n)


# ---- the narrow interface the graph pass and the cost model use ----


def supports(head_dim: int, value_dim: int, dtype: torch.dtype, device_type: str) -> list[str]:
    """Why the kernels cannot run attention with these head dims (of q and k, of v: they may differ, as in MLA),
    dtype and device type: report lines for the pass; empty when they can."""
    reasons = []
    if dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {dtype} is not supported by the kernels (fp16, bf16, fp32)")
    if device_type not in ("cpu", "cuda"):
        reasons.append(f"device {device_type} is neither CUDA nor CPU")
    if max(head_dim, value_dim) > config.MAX_HEAD_DIM:
        reasons.append(f"head dim {max(head_dim, value_dim)} is over {config.MAX_HEAD_DIM}")
    return reasons


def launch_tiles(head_dim: int, dtype: torch.dtype, capability: tuple[int, int] | None) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_N)`` the forward kernel launches with on a GPU of this compute capability (the table's
    entry, without autotuning), or (capability None) the blocks the CPU path steps by, for the cost model and
    the report's tile density."""
    if capability is None:
        return cpu_flash.BLOCK, cpu_flash.BLOCK
    tiles = config.table_tiles(head_dim, dtype, capability, backward=False)
    return tiles.block_m, tiles.block_n


def tile_density(spec: AttentionSpec, n_q: int, n_k: int, block_m: int, block_n: int) -> float:
    """Fraction of the (query tile, key tile) pairs of ``block_m`` x ``block_n`` tiles that a call of the validated
    ``spec`` visits (averaged over what its schedule depends on)."""
    if n_q == 0 or n_k == 0:
        return 0.0
    return schedule(spec, n_q, n_k, block_m, block_n).density


# ---- the entry points ----


def _holds_masks(spec: AttentionSpec) -> bool:
    return spec.bias is not None and spec.bias.holds_masks


def _tiled_blocks(spec: AttentionSpec, launch: Launch, n_q: int) -> tuple[int, int]:
    """Tile sizes of the tiled PyTorch path: one query tile of all rows against key columns of 256 (big matrix
    products, few Python steps), or 128 x 128 tile pairs with a mask bias (whose skipped tiles pay for them)."""
    if not _holds_masks(spec):
        return launch.block_m or max(n_q, 1), launch.block_n or 256
    block_n = launch.block_n or 128
    return launch.block_m or block_n, block_n


def _check_triton_head_dim(q: torch.Tensor, v: torch.Tensor) -> None:
    if max(q.shape[-1], v.shape[-1]) > config.MAX_HEAD_DIM:
        raise AttentionInputError(f"the Triton kernels support head dims up to {config.MAX_HEAD_DIM}, "
                                  f"got {q.shape[-1]} (q, k) and {v.shape[-1]} (v)")


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
                      launch: Launch = DEFAULT_LAUNCH) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Hq, Nq, D] in q.dtype, lse [B, Hq, Nq, 2] float32 pairs)`` of ``spec`` (validated here; an
    :class:`AttentionInputError` names what does not fit). With no keys (Nk == 0) the output is zeros and the LSE
    pairs (-inf, 0), as eager ``softmax(...) @ v`` gives. Rows a finite fill hides entirely are completed after
    the kernels (:mod:`filled_rows`), and sinks rescale the rows (:mod:`sinks`; the backward needs nothing more)."""
    out, lse = _forward(q, k, v, spec, launch)
    if spec.filled_rows is not None and k.shape[2] > 0:
        out, lse = filled_rows.complete_forward(q, k, v, spec, out, lse)
    if spec.sinks is not None:
        out, lse = sinks.complete_forward(out, lse, spec.sinks.float().expand(lse.shape[:3]))
    return out, lse


@_falls_back_to_tiled
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
             launch: Launch) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' forward (rows without keys: NaN, LSE -inf)."""
    spec = spec.validate(q, k, v)
    if q.numel() == 0 or k.shape[2] == 0:
        out = torch.zeros((*q.shape[:3], v.shape[-1]), dtype=q.dtype, device=q.device)
        lse = torch.zeros((*q.shape[:3], 2), dtype=torch.float32, device=q.device)
        lse[..., 0] = float("-inf")
        return out, lse
    n_q, n_k = q.shape[2], k.shape[2]
    if not uses_triton(q):
        result = cpu_flash.attention_forward(q, k, v, spec) if cpu_flash.serves(spec, q) else None
        if result is not None:
            return result
        plan = schedule(spec, n_q, n_k, *_tiled_blocks(spec, launch, n_q), q.device)
        return tiled_torch.attention_forward(q, k, v, spec, plan)
    _check_triton_head_dim(q, v)
    # Imported here: Triton decides at decoration time whether kernels run compiled or interpreted.
    if decode.chooses(n_q, q.shape[1], k.shape[1], spec.dropout.enabled):
        from flash_fx.kernels import triton_decode

        plan = decode.plan(q, k, v, launch.splits)
        tiles = schedule(spec, n_q, n_k, n_q, plan.block_n, q.device)
        return triton_decode.attention_forward(q, k, v, spec, plan,
                                               tiles.by_kv_head(q.shape[1], k.shape[1], spec.kv_heads_tiled))
    from flash_fx.kernels import triton_forward

    def run(tiles: Tiles) -> tuple[torch.Tensor, torch.Tensor]:
        return triton_forward.attention_forward(q, k, v, spec, tiles,
                                                schedule(spec, n_q, n_k, tiles.block_m, tiles.block_n, q.device))

    return run(_launch_tiles(q, k, spec, launch, run, backward=False, value_dim=v.shape[-1]))


def attention_backward(grad_out: torch.Tensor, saved: Saved, spec: AttentionSpec,
                       launch: Launch = DEFAULT_LAUNCH) -> tuple[torch.Tensor, ...]:
    """``(dq, dk, dv, dbias, drel)`` of ``spec`` (the forward's, with the gradients it asks for; see the module
    docstring) from the forward's ``saved`` inputs and outputs; dq, dk, dv have the shapes and dtypes of q, k, v."""
    if spec.filled_rows is None or saved.k.shape[2] == 0:
        return _backward(grad_out, saved, spec, launch)
    lse, completed = filled_rows.kernel_lse(saved.lse, spec)
    grads = _backward(grad_out, saved._replace(lse=lse), spec, launch)
    return filled_rows.complete_backward(grad_out, saved.q, saved.k, saved.v, saved.out, completed, spec, grads)


@_falls_back_to_tiled
def _backward(grad_out: torch.Tensor, saved: Saved, spec: AttentionSpec, launch: Launch) -> tuple[torch.Tensor, ...]:
    """The kernels' backward (rows with LSE -inf pass no gradient)."""
    q, k, v, _, lse = saved
    spec = spec.validate(q, k, v)
    if tuple(lse.shape) != (*q.shape[:3], 2):
        raise AttentionInputError(f"lse must be the forward's [B, Hq, Nq, 2] log-sum-exp pairs "
                                  f"{(*q.shape[:3], 2)}, got {tuple(lse.shape)}")
    features = spec.features()
    if q.numel() == 0 or k.numel() == 0:
        dbias = drel = None
        if features["bias_grad"]:
            dbias = torch.zeros((*q.shape[:3], k.shape[2]), dtype=torch.float32, device=q.device)
        if features["rel_grad"]:
            drel = torch.zeros(spec.relative.values.shape, dtype=torch.float32, device=q.device)
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dbias, drel
    n_q, n_k = q.shape[2], k.shape[2]
    if not uses_triton(q):
        if cpu_flash.serves(spec, q) and cpu_flash.keeps_precision(lse):
            return cpu_flash.attention_backward(grad_out, saved, spec)
        plan = schedule(spec, n_q, n_k, *_tiled_blocks(spec, launch, n_q), q.device)
        return tiled_torch.attention_backward(grad_out, saved, spec, plan)
    _check_triton_head_dim(q, v)
    from flash_fx.kernels import triton_backward

    saved = saved._replace(lse=lse.contiguous())

    def run(tiles: Tiles) -> tuple[torch.Tensor, ...]:
        return triton_backward.attention_backward(grad_out, saved, spec, tiles,
                                                  schedule(spec, n_q, n_k, tiles.block_m, tiles.block_n, q.device))

    return run(_launch_tiles(q, k, spec, launch, run, backward=True, value_dim=v.shape[-1]))
