"""Benchmark output: a CSV, a markdown table and (when matplotlib is installed) a plot per run."""

from __future__ import annotations

import csv
import datetime
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


def plot(name: str, rows: list[dict], path: Path, title: str) -> bool:
    """A PNG of one benchmark's rows (False, and nothing written, without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    x_key, y_key, line_keys, x_label, y_label = {
        "sparse": ("layout_density", "ms", ("method", "n", "mode"), "fraction of non-empty tiles", "time (ms)"),
        "kernels": ("n", "tflops", ("method", "mode", "dtype", "head_dim", "causal"), "sequence length", "TFLOP/s"),
        "models": ("n", "ms", ("model", "backend", "mode"), "sequence length", "time per step (ms)"),
        "memory": ("n", "peak_mb", ("method",), "sequence length", "peak memory (MB)"),
    }[name]
    figure, axis = plt.subplots(figsize=(8, 5))
    for key in sorted({tuple(r[k] for k in line_keys) for r in rows}, key=str):
        points = sorted((r[x_key], r[y_key]) for r in rows if tuple(r[k] for k in line_keys) == key)
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=", ".join(map(str, key)))
    if name != "sparse":
        axis.set_xscale("log", base=2)
    axis.set_xlabel(x_label)
    axis.set_ylabel(y_label)
    axis.set_title(title)
    axis.legend(fontsize=5, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
