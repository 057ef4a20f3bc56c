"""User options of the flash_fx backend (SPEC.md, "Interface")."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from flash_fx.cost import CPU, DEVICES

INNER_COMPILERS = ("inductor", "aot_eager", "eager")
#: torch.compile's modes, passed to the inner Inductor as plain torch.compile passes them.
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
VARIANTS = ("dense", "causal", "sliding_window", "key_padding", "document", "block_sparse", "bias")
_DEFAULTS: dict[str, Any] = {
    "inner": "inductor",
    "report": True,
    "verify": False,
    "variants": VARIANTS,
    "force": False,
    "device": None,
    "min_speedup": 1.0,
    "tiles": None,
    "autotune": False,
    "mode": "default",
}


@dataclass(frozen=True)
class Options:
    """Validated backend options; see SPEC.md for their meaning."""

    inner: str = "inductor"
    report: bool | str = True
    verify: bool | str = False
    variants: tuple[str, ...] = field(default=VARIANTS)
    force: bool = False
    device: str | None = None  # what the cost model predicts for: "A100", "H100", "H200", "cpu" (None: the inputs')
    min_speedup: float = 1.0  # rewrite only where the predicted speedup reaches this
    tiles: tuple[int, int] | None = None  # (Br, Bc) for the cost model instead of the SRAM-derived choice
    autotune: bool = False  # turn on the kernels' launch-configuration autotuning (flash_fx.kernels.set_autotune)
    mode: str = "default"  # torch.compile's mode for the inner Inductor (MODES)

    @property
    def prints_report(self) -> bool:
        """Whether a report is printed: the option, unless FLASH_FX_REPORT=0 silences all reports."""
        return bool(self.report) and os.environ.get("FLASH_FX_REPORT", "1") != "0"


def parse_options(options: dict[str, Any] | None) -> Options:
    """Check a `torch.compile(..., options=...)` dict and return the Options it asks for.

    Raises ValueError naming the valid options or values when something is unknown. ``autotune=True`` turns
    the kernels' autotuning on for the process (:func:`flash_fx.kernels.set_autotune`).
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(_DEFAULTS))
    if unknown:
        raise ValueError(
            f"flash_fx: unknown option(s) {unknown}; valid options are {sorted(_DEFAULTS)}"
        )
    merged = {**_DEFAULTS, **options}
    if merged["inner"] not in INNER_COMPILERS:
        raise ValueError(f"flash_fx: option inner={merged['inner']!r}; valid values are {INNER_COMPILERS}")
    if merged["report"] not in (True, False, "verbose"):
        raise ValueError(f"flash_fx: option report={merged['report']!r}; valid values are True, False, 'verbose'")
    if merged["verify"] not in (True, False, "fallback"):
        raise ValueError(f"flash_fx: option verify={merged['verify']!r}; valid values are True, False, 'fallback'")
    variants = (merged["variants"],) if isinstance(merged["variants"], str) else tuple(merged["variants"])
    bad = sorted(set(variants) - set(VARIANTS))
    if bad:
        raise ValueError(f"flash_fx: unknown variant(s) {bad}; valid variants are {list(VARIANTS)}")
    if merged["device"] is not None and merged["device"] not in (*DEVICES, CPU):
        raise ValueError(f"flash_fx: option device={merged['device']!r}; valid values are None, "
                         f"{', '.join(map(repr, (*DEVICES, CPU)))}")
    speedup = merged["min_speedup"]
    if isinstance(speedup, bool) or not isinstance(speedup, int | float) or not speedup > 0:
        raise ValueError(f"flash_fx: option min_speedup={speedup!r} must be a positive number")
    tiles = merged["tiles"]
    if tiles is not None:
        if (not isinstance(tiles, tuple | list) or len(tiles) != 2
                or not all(isinstance(t, int) and t >= 16 and t & (t - 1) == 0 for t in tiles)):
            raise ValueError(f"flash_fx: option tiles={tiles!r} must be (Br, Bc), powers of two >= 16")
        tiles = (tiles[0], tiles[1])
    if merged["mode"] not in MODES:
        raise ValueError(f"flash_fx: mode={merged['mode']!r}; valid modes are {MODES}")
    if merged["mode"] != "default" and merged["inner"] != "inductor":
        raise ValueError(f"flash_fx: mode={merged['mode']!r} configures the inner Inductor; it cannot go with "
                         f"inner={merged['inner']!r} (use inner='inductor', or drop the mode)")
    if merged["autotune"] not in (True, False):
        raise ValueError(f"flash_fx: option autotune={merged['autotune']!r}; valid values are True, False")
    if merged["autotune"]:
        from flash_fx.kernels import set_autotune

        set_autotune(True)
    return Options(
        inner=merged["inner"],
        report=merged["report"],
        verify=merged["verify"],
        variants=variants,
        force=bool(merged["force"]),
        device=merged["device"],
        min_speedup=float(speedup),
        tiles=tiles,
        autotune=bool(merged["autotune"]),
        mode=merged["mode"],
    )
