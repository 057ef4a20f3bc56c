"""Benchmark output: a CSV, a markdown table and (when matplotlib is installed) a plot per run."""

from __future__ import annotations

import csv
import datetime
from collections.abc import Iterable
from pathlib import Path


def results_dir(root: str, device_name: str) -> Path:
    """``root/<device>-<date>``, created."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in device_name)
    path = Path(root) / f"{safe}-{datetime.date.today().isoformat()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def stream_csv(rows: Iterable[dict], path: Path) -> list[dict]:
    """Write ``rows`` to ``path`` as they come, flushed row by row (a run cut short keeps what it measured), and
    return them. Nothing is written when there are none."""
    collected: list[dict] = []
    handle, writer = None, None
    try:
        for row in rows:
            if writer is None:
                handle = path.open("w", newline="")
                writer = csv.DictWriter(handle, fieldnames=list(row))
                writer.writeheader()
            writer.writerow(row)
            handle.flush()
            collected.append(row)
    finally:
        if handle is not None:
            handle.close()
    return collected


def markdown_table(rows: list[dict], environment: dict[str, str]) -> str:
    """The rows as a markdown table under a line naming the device, versions and commit."""
    header = list(rows[0])
    lines = [", ".join(f"{k}: {v}" for k, v in environment.items()), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[h]) for h in header) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


#: Per benchmark: x, y, the fields that tell lines apart, the fields that tell panels apart, axis labels.
PLOTS = {
    "sparse": ("layout_density", "ms", ("method",), ("n", "mode"), "fraction of non-empty tiles", "time (ms)"),
    "kernels": ("n", "tflops", ("method", "dtype"), ("mode", "head_dim", "causal"), "sequence length", "TFLOP/s"),
    "models": ("n", "ms", ("backend",), ("model", "mode"), "sequence length", "time per step (ms)"),
    "memory": ("n", "peak_mb", ("method",), (), "sequence length", "peak memory (MB)"),
}


def plot(name: str, rows: list[dict], path: Path, title: str) -> bool:
    """A PNG of one benchmark's rows, one panel per combination of its panel fields (False, and nothing written,
    without matplotlib or for a benchmark without a plot)."""
    if name not in PLOTS:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    x_key, y_key, line_keys, panel_keys, x_label, y_label = PLOTS[name]
    panels = sorted({tuple(r[k] for k in panel_keys) for r in rows}, key=str)
    columns = min(4, len(panels))
    grid_rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(grid_rows, columns, figsize=(4.5 * columns, 3.5 * grid_rows), squeeze=False)
    for axis, panel in zip(axes.flat, panels, strict=False):
        chosen = [r for r in rows if tuple(r[k] for k in panel_keys) == panel]
        for line in sorted({tuple(r[k] for k in line_keys) for r in chosen}, key=str):
            points = sorted((r[x_key], r[y_key]) for r in chosen if tuple(r[k] for k in line_keys) == line)
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=", ".join(map(str, line)))
        if name != "sparse":
            axis.set_xscale("log", base=2)
        axis.set_title(", ".join(f"{k}={v}" for k, v in zip(panel_keys, panel, strict=True)) or title, fontsize=8)
        axis.set_xlabel(x_label, fontsize=8)
        axis.set_ylabel(y_label, fontsize=8)
        axis.legend(fontsize=5)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
