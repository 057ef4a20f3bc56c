"""Cost model: HBM bytes and FLOPs of eager attention and of the flash kernels, as sympy expressions, and the
rewrite decision they drive.

Counts follow the loop structure of the code that runs. Eager attention (one op after the other) writes and
re-reads the Nq x Nk scores at every elementwise step (scale, masks, casts), the softmax reads and writes them,
and training keeps the probabilities for a backward that reads and writes Nq x Nk matrices again. The flash
kernels (FlashAttention-2 loop order, see flash_fx.kernels) stream K and V once per query tile of ``Br`` rows in
the forward and in the dQ kernel, and Q, dO, LSE and delta once per key tile of ``Bc`` rows in the dK/dV kernel;
sparse variants visit only the fraction ``density`` of the tile pairs. Sizes may be sympy expressions of the
graph's symbolic sizes (``s0``...), so the report can show the formula and its value at the example shape.

Tiles are those the kernels launch with on the card (its compute capability's entry of the kernels' table), so the
counts and the tile density follow the loops that run; :func:`paper_tiles` gives the FlashAttention paper's
choice from SRAM (``Bc = ceil(M / 4d)``, ``Br = min(Bc, d)`` for M elements) for comparison.
Time is a roofline: ``max(bytes / bandwidth, flops / peak)`` plus the call's fixed time (one launch on a card).

The device is the one the kernels will run on (:func:`device_for`): a card from :data:`DEVICES` (or the current
one), or this machine's CPU, whose figures are measured once per process (:mod:`flash_fx.cpu_profile`): the rate of the
unfused ops' passes over the scores, float32 matrix throughput, the flash op's attained throughput and the fixed
time of a call of each; on a CPU the fixed times decide small attentions, which stay unfused.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import sympy as sp
import torch

from flash_fx import cpu_profile, kernels
from flash_fx.kernels.spec import Band
from flash_fx.units import format_bytes

Size = int | sp.Expr


@dataclass(frozen=True)
class Device:
    """What the model needs of a device: on-chip memory for one program, memory bandwidth, matrix throughput and
    the fixed time of one attention call, unfused and flash, forward and forward + backward."""

    name: str
    sram_bytes: int  # shared memory per program (0 on a CPU, which has none managed by software)
    hbm_bytes_per_s: float  # memory bandwidth (a CPU: the rate its unfused attention ops attain, measured)
    matmul_flops_per_s: float  # dense fp16/bf16 tensor-core peak on a card; measured float32 on a CPU
    capability: tuple[int, int] | None  # CUDA compute capability (selects the launch tiles); None: a CPU
    launch_overhead_s: float = 5e-6  # fixed time of a flash call's forward (one kernel launch on a card)
    eager_overhead_s: float = 5e-6  # the same for the unfused ops
    launch_overhead_training_s: float = 5e-6  # forward + backward
    eager_overhead_training_s: float = 5e-6
    flash_flops_per_s: float | None = None  # what the flash kernels attain, where measured (None: the peak)

    @property
    def is_cpu(self) -> bool:
        return self.capability is None

    @property
    def memory(self) -> str:
        """What the bytes the model counts move through: a card's HBM, a CPU's main memory."""
        return "main-memory" if self.is_cpu else "HBM"

    def fixed_s(self, flash: bool, training: bool) -> float:
        """Fixed time of one attention call: flash or unfused, with its backward or not."""
        if flash:
            return self.launch_overhead_training_s if training else self.launch_overhead_s
        return self.eager_overhead_training_s if training else self.eager_overhead_s


#: Published figures of known cards (SXM parts; SRAM: shared memory + L1 per SM as the paper counts it).
DEVICES = {
    "A100": Device("A100", 192 * 1024, 1.555e12, 312e12, (8, 0)),
    "H100": Device("H100", 228 * 1024, 3.35e12, 989e12, (9, 0)),
    "H200": Device("H200", 228 * 1024, 4.8e12, 989e12, (9, 0)),
}
DEFAULT_DEVICE = "H100"  # the card assumed when the model runs without one (explain on a laptop)
CPU = "cpu"  # the name of this machine's CPU for the option ``device`` (figures measured: flash_fx.cpu_profile)


def device_model(name: str | None = None) -> Device:
    """The named card from :data:`DEVICES` (or this machine's CPU for ``"cpu"``); without a name the current CUDA
    device (its shared memory per block from torch's device properties, bandwidth and peak from the table entry
    its name contains, H100's otherwise), or :data:`DEFAULT_DEVICE` when there is no GPU."""
    if name == CPU:
        return cpu_device()
    if name is not None:
        if name not in DEVICES:
            raise ValueError(f"unknown device {name!r}; known devices are {sorted(DEVICES)} and {CPU!r}")
        return DEVICES[name]
    if not torch.cuda.is_available():
        return DEVICES[DEFAULT_DEVICE]
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    known = next((d for key, d in DEVICES.items() if key in props.name), DEVICES[DEFAULT_DEVICE])
    sram = getattr(props, "shared_memory_per_block_optin", 0) or known.sram_bytes
    return replace(known, name=props.name, sram_bytes=int(sram), capability=(props.major, props.minor))


def cpu_device() -> Device:
    """This machine's CPU from its timings, measured once per process (:func:`flash_fx.cpu_profile.measure`)."""
    return _cpu_device(cpu_profile.measure())


@functools.cache
def _cpu_device(profile: cpu_profile.CpuProfile) -> Device:
    """The device of a profile: the unfused ops' rate is their byte count over their time on the reference
    attention (fixed time left out), the flash op's attained throughput its FLOP count over its time."""
    heads, n, head_dim = profile.reference
    tiles = kernels.launch_tiles(head_dim, torch.float32, None)
    density = kernels.tile_density(kernels.AttentionSpec(1.0, band=Band(None, 0)), n, n, *tiles)
    reference = AttentionShape(heads, n, n, head_dim, torch.float32, density, elementwise_passes=2,
                               mask_bytes_per_score=1.0, training=False)
    eager_rate = float(eager_bytes(reference)) / max(profile.eager_reference_s - profile.eager_fixed_s, 1e-9)
    flash_rate = float(flops(reference, recompute=True)) / max(profile.flash_reference_s - profile.flash_fixed_s, 1e-9)
    return Device(profile.name, 0, eager_rate, profile.matmul_flops_per_s, None, profile.flash_fixed_s,
                  profile.eager_fixed_s, profile.flash_fixed_training_s, profile.eager_fixed_training_s, flash_rate)


def device_for(device_type: str, name: str | None = None) -> Device:
    """The device the model predicts for: the named one (option ``device``), else where the kernels will run:
    this machine's CPU for CPU tensors, the current card for CUDA tensors. Under Triton's interpreter, which runs
    the GPU kernels on CPU tensors to check them, the default card."""
    if name is None and device_type == "cpu" and not kernels.triton_interpreted():
        return cpu_device()
    return device_model(name)


def paper_tiles(device: Device, head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """The paper's (Br, Bc) for the card's SRAM: Bc = ceil(M / 4d) elements, Br = min(Bc, d)."""
    if device.is_cpu:
        raise ValueError(f"{device.name} has no SRAM managed by software; the paper's tiles are a GPU's")
    elements = device.sram_bytes // dtype.itemsize
    block_c = math.ceil(elements / (4 * head_dim))
    return min(block_c, head_dim), block_c


def model_tiles(device: Device, head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(Br, Bc) the model counts with: the tiles the forward kernel launches with on the card, or the blocks the
    CPU path steps by (:func:`flash_fx.kernels.launch_tiles`)."""
    return kernels.launch_tiles(head_dim, dtype, device.capability)


@dataclass(frozen=True)
class AttentionShape:
    """What the cost depends on. Sizes are ints or sympy expressions of the graph's size symbols."""

    batch_heads: Size
    nq: Size
    nk: Size
    head_dim: Size
    dtype: torch.dtype
    density: float  # fraction of (query tile, key tile) pairs the flash kernels visit (1.0 dense)
    elementwise_passes: int  # eager's passes over the scores: scale, masks, casts
    mask_bytes_per_score: float  # bytes of mask/bias read per score element by eager (after broadcasting)
    training: bool
    kernel_bias_bytes_per_score: float | None = None  # the same for the kernels' dense bias (None: as eager)
    layout_pass: bool = False  # the kernels reduce the mask bias to a tile layout first (forward and backward)
    value_dim: Size | None = None  # head dim of v and the output when it differs from q's and k's (MLA)
    kv_group: int = 1  # query heads whose K and V one program reads once (the decode kernels' GQA packing)

    @property
    def dv(self) -> Size:
        """The head dim of v and the output."""
        return self.head_dim if self.value_dim is None else self.value_dim


def eager_bytes(s: AttentionShape) -> sp.Expr:
    """HBM bytes of the unfused ops: Q@K^T, elementwise passes over the scores, softmax, P@V (+ backward)."""
    e = s.dtype.itemsize
    scores = s.nq * s.nk
    qkv = (s.nq + s.nk) * s.head_dim + (s.nk + s.nq) * s.dv  # read q, k, v, write out
    forward = qkv * e + scores * e  # the two products and the scores they write
    forward += s.elementwise_passes * 2 * scores * e + scores * _num(s.mask_bytes_per_score)
    forward += 2 * scores * e + scores * e  # softmax reads and writes; P @ V reads P
    if not s.training:
        return sp.expand(s.batch_heads * forward)
    # dV = P^T dO, dP = dO V^T, softmax backward (reads P, dP, writes dS), dQ = dS K, dK = dS^T Q,
    # and the masks/scale passes again on dS.
    backward = (2 * s.nq + 2 * s.nk) * (s.head_dim + s.dv) * e + scores * e * (1 + 1 + 3 + 2)
    backward += s.elementwise_passes * 2 * scores * e
    return sp.expand(s.batch_heads * (forward + backward))


def flash_bytes(s: AttentionShape, block_r: int, block_c: int) -> sp.Expr:
    """HBM bytes of the flash kernels for query tiles of ``block_r`` rows and key tiles of ``block_c`` rows."""
    e = s.dtype.itemsize
    d, dv = s.head_dim, s.dv
    visible = _num(s.density)
    q_tiles = sp.ceiling(s.nq / block_r)
    k_tiles = sp.ceiling(s.nk / block_c)
    bias_bytes = s.mask_bytes_per_score if s.kernel_bias_bytes_per_score is None else s.kernel_bias_bytes_per_score
    mask = s.nq * s.nk * _num(bias_bytes) * visible
    if s.layout_pass:  # one read of the whole mask to classify its tiles (upper bound: broadcast dims count)
        mask += s.nq * s.nk * _num(bias_bytes)
    # Q read and O written once; K and V once per visited query tile (shared by the kv_group query heads of a
    # decode tile); the LSE written (a float32 pair: the rounded value and its residual; the backward reads the
    # residual only with a bias, which this count leaves out).
    kv_reads = sp.Max(1, q_tiles * visible) * s.nk * (d + dv) / s.kv_group
    forward = (s.nq * (d + dv) + kv_reads) * e + 8 * s.nq + mask
    if not s.training:
        return sp.expand(s.batch_heads * forward)
    preprocess = 2 * s.nq * dv * e + 4 * s.nq  # delta = rowsum(dO * O)
    dkdv = 2 * s.nk * (d + dv) * e + sp.Max(1, k_tiles * visible) * (s.nq * (d + dv) * e + 8 * s.nq) + mask
    dq = s.nq * (d + dv) * e + sp.Max(1, q_tiles * visible) * s.nk * (d + dv) * e + 8 * s.nq + mask
    return sp.expand(s.batch_heads * (forward + preprocess + dkdv + dq))


def flops(s: AttentionShape, recompute: bool) -> sp.Expr:
    """Matrix FLOPs: 2*Nq*Nk*(d + dv) forward (times the visited fraction for the flash kernels), 2x that for the
    eager backward and 2.5x for the flash backward, which recomputes Q K^T."""
    forward = 2 * s.nq * s.nk * (s.head_dim + s.dv) * (_num(s.density) if recompute else 1)
    total = forward * (1 + (sp.Rational(5, 2) if recompute else 2)) if s.training else forward
    return sp.expand(s.batch_heads * total)


def estimate_time(bytes_moved: float, flop_count: float, device: Device, *, flash: bool, training: bool) -> float:
    """Roofline time on the device (the flash kernels' attained throughput where measured) plus the fixed time of
    the call, flash or unfused, with its backward or not."""
    peak = (device.flash_flops_per_s or device.matmul_flops_per_s) if flash else device.matmul_flops_per_s
    return max(bytes_moved / device.hbm_bytes_per_s, flop_count / peak) + device.fixed_s(flash, training)


@dataclass(frozen=True)
class Plan:
    """The decision for one match: bytes, FLOPs and time before and after, and whether to rewrite."""

    hbm_before: float
    hbm_after: float
    flops_before: float
    flops_after: float
    time_before: float
    time_after: float
    rewrite: bool
    reason: str
    tiles: tuple[int, int]
    device: str
    hbm_formula: str = ""  # "eager -> flash" bytes as formulas of the size symbols (only when symbolic)


def plan(s: AttentionShape, hints: dict[sp.Symbol, int], *, device: Device, force: bool = False,
         min_speedup: float = 1.0, tiles: tuple[int, int] | None = None) -> Plan:
    """Decide a rewrite: flash must move fewer bytes and be predicted ``min_speedup`` times faster (or ``force``).

    ``hints`` gives each size symbol its example value; ``tiles`` overrides the (Br, Bc) of :func:`model_tiles`.
    """
    head_dim = int(_evaluate(sp.sympify(s.head_dim), hints))
    block_r, block_c = tiles or model_tiles(device, head_dim, s.dtype)
    before_expr, after_expr = eager_bytes(s), flash_bytes(s, block_r, block_c)
    before, after = _evaluate(before_expr, hints), _evaluate(after_expr, hints)
    flops_before, flops_after = _evaluate(flops(s, recompute=False), hints), _evaluate(flops(s, recompute=True), hints)
    time_before = estimate_time(before, flops_before, device, flash=False, training=s.training)
    time_after = estimate_time(after, flops_after, device, flash=True, training=s.training)
    speedup = time_before / time_after
    wins = after < before and speedup >= min_speedup
    if wins:
        reason = (f"flash moves {before / after:.1f}x fewer {device.memory} bytes, predicted {speedup:.2f}x faster "
                  f"on {device.name}")
    elif force:
        reason = f"forced: the model predicts {speedup:.2f}x on {device.name}"
    elif after >= before:
        reason = (f"kept: flash would move {format_bytes(after)} vs {format_bytes(before)}, no fewer "
                  f"{device.memory} bytes")
    else:
        saved = before - after
        reason = (f"kept: flash saves {format_bytes(saved)} but is predicted only {speedup:.2f}x faster "
                  f"(threshold {min_speedup:g}x; fixed time per call {device.fixed_s(True, s.training) * 1e6:.3g} "
                  f"us flash, {device.fixed_s(False, s.training) * 1e6:.3g} us unfused)")
    symbolic = bool(before_expr.free_symbols | after_expr.free_symbols)
    formula = f"{_short(before_expr)} -> {_short(after_expr)}" if symbolic else ""
    return Plan(before, after, flops_before, flops_after, time_before, time_after, wins or force, reason,
                (block_r, block_c), device.name, formula)


def _num(x: float) -> sp.Expr:
    """A number for a formula: integral values as integers (1.0 -> 1), so formulas stay readable."""
    return sp.Integer(int(x)) if float(x).is_integer() else sp.Float(x)


def _evaluate(expr: sp.Expr, hints: dict[sp.Symbol, int]) -> float:
    return float(sp.sympify(expr).subs(hints))


def _short(expr: sp.Expr) -> str:
    """A formula with 3-digit coefficients (ceilings kept)."""
    return str(sp.N(expr, 3)).replace("**", "^")
