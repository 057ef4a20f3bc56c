"""Rewrite reports: what the pass did to each compiled graph and why, printed and kept in memory."""

from __future__ import annotations

from dataclasses import dataclass, field

from flash_fx.units import format_bytes

_REPORTS: list[Report] = []


@dataclass(frozen=True)
class RewriteRecord:
    """One attention replaced by a flash kernel call."""

    variant: str
    location: str
    q_shape: tuple
    k_shape: tuple
    v_shape: tuple
    dtype: str
    scale: str
    mask: str
    notes: str
    hbm_before: float
    hbm_after: float
    time_before: float
    time_after: float
    tile_density: float | None = 1.0  # fraction of tiles the kernels visit (sparse variants < 1; None: run time)
    flops_before: float = 0.0
    flops_after: float = 0.0
    hbm_formula: str = ""  # "eager -> flash" HBM bytes as formulas of the graph's size symbols (dynamic shapes)
    tiles: tuple[int, int] = (0, 0)  # (Br, Bc) the cost model counted with
    device: str = ""  # the card the cost model assumed
    kernel: str = "prefill"  # the forward kernels the call's example shape runs: "prefill" or "decode"


@dataclass(frozen=True)
class SkipRecord:
    """One softmax left as it was, and why."""

    location: str
    reason: str


@dataclass
class Report:
    """The rewrites and skips of one compiled graph."""

    graph_id: int
    rewrites: list[RewriteRecord] = field(default_factory=list)
    skipped: list[SkipRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how the graph is compiled, where flash_fx changed it

    def __str__(self) -> str:
        lines = [f"flash_fx report for graph {self.graph_id}: "
                 f"{len(self.rewrites)} rewritten, {len(self.skipped)} skipped"]
        if self.rewrites:
            header = ("variant", "location", "q", "k", "dtype", "scale", "mask", "tiles", "bytes before -> after",
                      "GFLOP before -> after", "time before -> after", "notes")
            rows = [(r.variant, r.location, _shape(r.q_shape), _shape(r.k_shape), r.dtype, r.scale, r.mask,
                     "run time" if r.tile_density is None else f"{r.tile_density:.0%}",
                     f"{format_bytes(r.hbm_before)} -> {format_bytes(r.hbm_after)}",
                     f"{r.flops_before / 1e9:.3g} -> {r.flops_after / 1e9:.3g}",
                     f"{_seconds(r.time_before)} -> {_seconds(r.time_after)}", r.notes) for r in self.rewrites]
            lines += _table(header, rows)
            models = sorted({(r.device, r.tiles) for r in self.rewrites if r.device})
            lines += [f"  cost model: {device}, tiles Br x Bc = {tiles[0]} x {tiles[1]}" for device, tiles in models]
            lines += [f"  HBM bytes at {r.location} ({r.variant}), symbolic: {r.hbm_formula}"
                      for r in self.rewrites if r.hbm_formula]
        if self.skipped:
            lines += _table(("skipped", "reason"), [(s.location, s.reason) for s in self.skipped])
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def record(report: Report) -> None:
    """Keep a report for `reports()`."""
    _REPORTS.append(report)


def reports() -> list[Report]:
    """The reports of the graphs compiled so far in this process (oldest first)."""
    return list(_REPORTS)


def clear_reports() -> None:
    """Forget all reports."""
    _REPORTS.clear()


def _table(header: tuple, rows: list[tuple]) -> list[str]:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return ["  " + fmt.format(*header).rstrip()] + ["  " + fmt.format(*map(str, row)).rstrip() for row in rows]


def _shape(shape: tuple) -> str:
    return "x".join(str(s) for s in shape)


def _seconds(t: float) -> str:
    return f"{t * 1e6:.3g} us" if t < 1e-3 else f"{t * 1e3:.3g} ms"
